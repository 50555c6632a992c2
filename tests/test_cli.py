"""The command line end to end, in a subprocess as users and CI run it, and every kind of bad input."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clihelp import ROOT, as_json, run_inproc, run_sub

from wina_cli.artifact import sha256_file

SMALL = ["--num-samples", "4", "--seq-len", "64"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama_dir, calib_text):
    """One artifact built by a real subprocess from a config file plus overriding flags."""
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "recipe.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\ndata:\n  path: {calib_text}\n  num_samples: 4\n  seq_len: 64\n"
                   "transform: wina\nsparsity:\n  target: 0.4\nallocation:\n  num_samples: 2\n  seq_len: 32\n"
                   f"output: {d / 'from-config'}\n")
    p = run_sub(["calibrate", "--config", cfg, "--sparsity", "0.5", "--json"])
    assert p.returncode == 0, p.stderr
    return d / "from-config", json.loads(p.stdout)


def test_calibrate_from_config_with_override(built):
    out, result = built
    assert result["gates"]["target"] == 0.5  # the flag overrode the file
    assert result["validation"]["transform"]["max_rel_delta"] < 1e-3
    assert (out / "recipe.yaml").read_text().count("target: 0.5") == 1


def test_recipe_yaml_rebuilds_the_same_artifact(built, tmp_path):
    out, _ = built
    p = run_sub(["calibrate", "--config", out / "recipe.yaml", "-o", tmp_path / "again"])
    assert p.returncode == 0, p.stderr
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert (out / "wina.json").read_text() == (tmp_path / "again" / "wina.json").read_text()


def test_inspect_bench_generate_env(built, eval_text):
    out, _ = built
    p = run_sub(["inspect", out, "--json"])
    assert p.returncode == 0, p.stderr
    assert as_json(p.stdout)["wina"]["transform"] == "wina"
    p = run_sub(["inspect", out])
    assert p.returncode == 0 and "per-layer sparsity" in p.stdout
    p = run_sub(["bench", out, "--data", eval_text, "--sparsity", "0.25,0.5", "--num-samples", "2", "--seq-len", "64",
                 "--json"])
    assert p.returncode == 0, p.stderr
    b = as_json(p.stdout)
    assert b["dense_ppl"] > 1
    sparse = [r for r in b["runs"] if r["criterion"] != "dense"]
    assert len(sparse) == 2 * 2 * 2
    for r in sparse:
        assert {"criterion", "transform", "target_sparsity", "realized_sparsity", "ppl"} <= set(r)
        assert r["realized_sparsity"] > 0.1 and r["ppl"] > 1
    assert all(r["transform"] == "wina" for r in b["runs"])
    from wina_cli.bench.report import markdown

    md = markdown(b).splitlines()
    assert len(md) == 2 + 4 and md[0].endswith("| 0.25 | 0.5 |")  # header, rule, 2 criteria x 2 allocations
    p = run_sub(["generate", out, "--prompt", "river stone", "-n", "5", "--json"])
    assert p.returncode == 0, p.stderr
    assert as_json(p.stdout)["new_tokens"] >= 1
    p = run_sub(["env", "--json"])
    e = as_json(p.stdout)
    assert p.returncode == 0 and "CPUExecutionProvider" in e["onnxruntime_providers"]
    # every installed dependency's version is reported, those without __version__ (gguf) included
    assert all(re.match(r"\d+\.\d+", e[m]) for m in ("transformers", "safetensors", "onnx", "onnxruntime", "gguf")), e


def test_bench_budgets_policies_and_global_allocation(built, eval_text):
    out, _ = built
    p = run_sub(["bench", out, "--data", eval_text, "--sparsity", "0.5", "--configs", "teal/uniform,wina/global",
                 "--ppl-budget", "1%,5%", "--policies", "all,prompt:16,first:8", "--mode", "topk",
                 "--num-samples", "2", "--seq-len", "64", "--json"])
    assert p.returncode == 0, p.stderr
    b = as_json(p.stdout)
    runs = {(r["criterion"], r["allocation"], r["policy"]): r for r in b["runs"]}
    assert set(runs) == {(c, a, pol) for c, a in (("dense", "-"), ("teal", "uniform"), ("wina", "global"))
                         for pol in ("all", "prompt:16", "first:8")}
    for (c, a, pol), r in runs.items():
        assert r["dense_ppl"] == runs[("dense", "-", pol)]["ppl"]  # compared on the tokens the policy scores
        if c != "dense":
            assert r["realized_sparsity"] == pytest.approx(0.5, abs=0.01) if pol == "all" else \
                r["realized_sparsity"] < 0.5 - 0.02  # dense positions read every channel
    assert runs[("dense", "-", "prompt:16")]["ppl"] != runs[("dense", "-", "all")]["ppl"]  # fewer tokens scored
    assert len(b["budgets"]) == 2 * 3 * 2  # configurations x policies x budgets
    for f in b["budgets"]:
        assert 0.0 <= f["target_sparsity"] <= 0.9
        assert f["dense_ppl"] == runs[("dense", "-", f["policy"])]["ppl"]  # the budget is under the row's policy
        assert f["ppl"] <= f["dense_ppl"] * (1 + f["max_ppl_increase"]) * (1 + 1e-9)
        assert f["reference"] == "dense"  # not distilled: one dense model, one search
    from wina_cli.bench.report import markdown

    md = markdown(b).splitlines()
    assert md[0] == "| transform | criterion | allocation | policy | dense | 0.5 | PPL-1% | PPL-5% |"
    assert len(md) == 2 + 2 * 3 and all(" - |" not in line for line in md[2:])  # every policy has its budgets


def test_bench_at_realized_sparsity(built, eval_text):
    out, _ = built
    p = run_sub(["bench", out, "--data", eval_text, "--sparsity", "0.3,0.5", "--configs", "wina/greedy",
                 "--realized", "--num-samples", "2", "--seq-len", "64", "--json"])
    assert p.returncode == 0, p.stderr
    b = as_json(p.stdout)
    assert b["sparsity_basis"] == "realized"
    runs = [r for r in b["runs"] if r["criterion"] != "dense"]
    assert [r["requested_realized"] for r in runs] == [0.3, 0.5]
    for r in runs:  # threshold gates drift from their target; the bench found the target that realizes the ask
        assert abs(r["realized_sparsity"] - r["requested_realized"]) < 0.01, r
    from wina_cli.bench.report import markdown

    assert "| 0.3 | 0.5 |" in markdown(b).splitlines()[0]


def test_bench_markdown_budgets_from_the_tuned_dense_model():
    from wina_cli.bench.report import markdown

    def run(art, crit, ppl, **extra):
        return {"artifact": art, "transform": "none", "criterion": crit, "allocation": "-" if crit == "dense"
                else "uniform", "policy": "all", "target_sparsity": 0.5, "realized_sparsity": 0.5, "ppl": ppl,
                **extra}

    def budget(art, realized, ref=None):
        return {"artifact": art, "criterion": "teal", "allocation": "uniform", "policy": "all",
                "max_ppl_increase": 0.01, "target_sparsity": realized, "realized_sparsity": realized,
                **({} if ref is None else {"reference": ref})}

    result = {"runs": [run("plain", "dense", 10.0), run("plain", "teal", 12.0),
                       run("tuned", "dense", 10.0, tuned_dense_ppl=9.0), run("tuned", "teal", 11.0)],
              "budgets": [budget("plain", 0.25, "dense"), budget("tuned", 0.4, "source checkpoint"),
                          budget("tuned", 0.3, "tuned dense")]}
    md = markdown(result).splitlines()
    assert md[0].endswith("| PPL-1% | PPL-1% from tuned dense |")
    # an artifact that was not tuned has one dense model: its one search fills both columns
    assert md[2].endswith("| 0.250 (0.250) | 0.250 (0.250) |") and md[3].endswith("| 0.400 (0.400) | 0.300 (0.300) |")
    # results written before budgets named their reference render as they did
    old = {"runs": result["runs"][:2], "budgets": [budget("plain", 0.25)]}
    assert markdown(old).splitlines()[0].endswith("| 0.5 | PPL-1% |")


def test_calibrate_within_a_perplexity_budget_and_a_policy(capsys, tmp_path, tiny_llama_dir, calib_text):
    code, stdout, err = run_inproc(["calibrate", "-m", tiny_llama_dir, "-d", calib_text, "-o", tmp_path / "o",
                                    *SMALL, "--transform", "none", "--max-ppl-increase", "1%", "--dense-first", "4",
                                    "--json"], capsys)
    assert code == 0, err
    r = as_json(stdout)
    b = r["validation"]["ppl_budget"]
    assert b["max_ppl_increase"] == 0.01 and r["gates"]["target"] == b["target"]
    manifest = json.loads((tmp_path / "o" / "wina.json").read_text())
    assert manifest["validation"]["ppl_budget"]["target"] == b["target"]
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["wina"]
    assert cfg["dense_first"] == 4 and cfg["dense_prompt"] is False
    code, stdout, err = run_inproc(["export", tmp_path / "o", "--format", "onnx", "-o", tmp_path / "x", "--json"],
                                   capsys)
    assert code == 0, err
    assert as_json(stdout)["gates"]["policy"]["text"] == "first 4 tokens dense"
    code, stdout, err = run_inproc(["generate", tmp_path / "o", "-p", "river stone", "-n", "3", "--json"], capsys)
    assert code == 0, err
    code, stdout, err = run_inproc(["inspect", tmp_path / "o"], capsys)
    text = " ".join(stdout.split())
    assert code == 0 and "perplexity budget +1%" in text and "first 4 tokens dense" in text, text
    _bad(capsys, ["calibrate", "-m", tiny_llama_dir, "-d", calib_text, "-o", tmp_path / "y",
                  "--max-ppl-increase", "lots"], 3, "--max-ppl-increase 'lots'")


def test_kl_allocation_end_to_end(capsys, tmp_path, tiny_llama_dir, calib_text, eval_text):
    code, stdout, err = run_inproc(["calibrate", "-m", tiny_llama_dir, "-d", calib_text, "-o", tmp_path / "o",
                                    *SMALL, "--transform", "none", "--criterion", "teal", "--allocation", "kl",
                                    "--dense-first", "2", "--json"], capsys)
    assert code == 0, err
    r = as_json(stdout)
    assert r["gates"]["allocation"] == "kl"
    info = [p for p in r["passes"] if p["name"] == "allocate"][0]["info"]
    # the KL windows (8 x 512 by default) are cut from the 4 x 64-token calibration windows
    assert info["kl_criteria"] == ["teal"] and info["kl_tokens"] == 4 * 64
    # the default second-order estimate, checked against the KL measured for the middle layer's projections
    check = info["kl_check"]["teal"]
    assert info["kl_estimate"] == "fisher" and info["kl_draws"] == 8 and check["measured"] > 0
    assert info["kl_dense_first"] == 2  # the estimate and its check leave out what the policy computes dense
    assert 1 / 3 <= check["ratio"] <= 3 and check["level"] == 0.5
    code, stdout, err = run_inproc(["bench", tmp_path / "o", "--data", eval_text, "--sparsity", "0.5", "--configs",
                                    "teal/kl,teal/uniform", "--num-samples", "2", "--seq-len", "64", "--json"], capsys)
    assert code == 0, err
    runs = {r["allocation"]: r for r in as_json(stdout)["runs"]}
    assert runs["kl"]["ppl"] > 1 and runs["kl"]["realized_sparsity"] > 0.3
    assert runs["kl"]["ppl"] != runs["uniform"]["ppl"]  # another split of the same target
    _bad(capsys, ["bench", tmp_path / "o", "--data", eval_text, "--configs", "wina/kl", "--num-samples", "2",
                  "--seq-len", "64"], 8, "no kl allocation for criterion 'wina'")


def test_bench_refuses_the_text_an_artifact_was_calibrated_on(capsys, built, calib_text, eval_text):
    art = built[0]
    bench = ["bench", art, "--data", calib_text, "--sparsity", "0.5", "--configs", "teal/uniform", "--num-samples",
             "2", "--seq-len", "64"]
    _bad(capsys, bench, 6, f"overlaps the calibration text of '{art}'", "1 of the 1 files", "--allow-overlap")
    code, stdout, err = run_inproc(bench + ["--allow-overlap", "--json"], capsys)
    assert code == 0, err
    ev = as_json(stdout)["eval"]
    assert ev["fitted_overlap"] == {str(art): {"calibration": [str(calib_text.resolve())]}}
    assert ev["overlap_unchecked"] == {}
    code, stdout, err = run_inproc(bench + ["--allow-overlap"], capsys)
    assert code == 0 and "measured on text it was fitted to" in " ".join(stdout.split())
    # another text is measured, and says it was checked clean
    code, stdout, err = run_inproc(["bench", art, "--data", eval_text, *bench[4:], "--json"], capsys)
    assert code == 0, err
    assert as_json(stdout)["eval"]["fitted_overlap"] == {}


def test_fitted_text_overlap_reads_what_calibration_and_distillation_read(tmp_path):
    from wina_cli.bench.quality import fitted_text_overlap

    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (folder / name).write_text("some text\n")
    a, b, c = (folder / n for n in ("a.txt", "b.txt", "c.txt"))
    manifest = {"calibration": {"path": str(a), "files_read": 1},
                "validation": {"distill": {"steps": 4, "data": {"path": str(folder), "files_read": 2}}}}
    # distillation read the folder's first two files in order (a, b), not c
    assert fitted_text_overlap(manifest, [b.resolve(), c.resolve()]) == ({"distillation": [str(b.resolve())]}, [])
    assert fitted_text_overlap(manifest, [c.resolve()]) == ({}, [])
    assert fitted_text_overlap(manifest, [a.resolve()])[0] == {"calibration": [str(a.resolve())],
                                                              "distillation": [str(a.resolve())]}
    # what cannot be checked from here is said, not passed over
    manifest["calibration"]["path"] = str(tmp_path / "gone")
    del manifest["validation"]["distill"]["data"]["files_read"]
    overlap, unchecked = fitted_text_overlap(manifest, [a.resolve()])
    assert overlap == {} and len(unchecked) == 2
    assert "not found here" in unchecked[0] and "its extent not recorded" in unchecked[1]
    # no distillation, nothing to check for it
    assert fitted_text_overlap({"calibration": {"path": str(a), "files_read": 1}}, [c.resolve()]) == ({}, [])


def test_bench_refuses_a_missing_allocation_before_measuring(capsys, monkeypatch, built, eval_text):
    import wina_cli.runtime

    loaded = []
    real = wina_cli.runtime.load_runtime
    monkeypatch.setattr(wina_cli.runtime, "load_runtime", lambda *a, **k: loaded.append(a) or real(*a, **k))
    # the built artifact has no KL tables; the pair listed after a valid one on the second artifact is still
    # refused before the first artifact is loaded
    art = built[0]
    _bad(capsys, ["bench", art, art, "--data", eval_text, "--configs", "teal/uniform,teal/kl", "--num-samples",
                  "2", "--seq-len", "64"], 8, f"'{art}' has no kl allocation for criterion 'teal'")
    assert loaded == []


def _auto_config(tmp_path, model_dir, text, auto: str) -> Path:
    cfg = tmp_path / "auto.yaml"
    cfg.write_text(f"model: {model_dir}\ndata:\n  path: {text}\n  num_samples: 4\n  seq_len: 64\n"
                   f"method: auto\nauto:\n{auto}holdout:\n  num_samples: 2\n"
                   "allocation:\n  num_samples: 2\n  seq_len: 32\n")
    return cfg


def test_method_auto_measures_every_candidate_and_keeps_the_best(capsys, tmp_path, tiny_llama_dir, calib_text):
    cfg = _auto_config(tmp_path, tiny_llama_dir, calib_text, "  transforms: none,pca-global\n")
    code, stdout, err = run_inproc(["calibrate", "--config", cfg, "-o", tmp_path / "o", "--kl-criteria", "teal",
                                    "--json"], capsys)
    assert code == 0, err
    auto = as_json(stdout)["validation"]["auto"]
    cands = auto["candidates"]
    # kl is a candidate for the criterion whose KL table was measured, and only for it
    assert {(c["transform"], c["criterion"], c["allocation"]) for c in cands} == {
        (t, c, a) for t in ("none", "pca-global") for c in ("wina", "teal") for a in ("greedy", "uniform", "global")
    } | {("none", "teal", "kl"), ("pca-global", "teal", "kl")}
    best = min(cands, key=lambda c: c["ppl"])
    assert auto["chosen"] == best and best["transform"] in auto["reason"]
    wina = json.loads((tmp_path / "o" / "config.json").read_text())["wina"]
    assert (wina["transform"], wina["criterion"], wina["allocation"]) == (best["transform"], best["criterion"],
                                                                          best["allocation"])
    manifest = json.loads((tmp_path / "o" / "wina.json").read_text())
    assert manifest["validation"]["auto"]["chosen"] == best and manifest["calibration"]["holdout_windows"] == 2
    _bad(capsys, ["calibrate", "--config", cfg, "-o", tmp_path / "p", "--method", "guess"], 3, "`method`")
    cfg.write_text(cfg.read_text().replace("none,pca-global", "none,spin"))
    _bad(capsys, ["calibrate", "--config", cfg, "-o", tmp_path / "p"], 3, "`auto.transforms` has spin")


def test_method_auto_within_a_budget(capsys, tmp_path, tiny_llama_dir, calib_text):
    """--method auto with --max-ppl-increase: each candidate gets the budget's search (or is dropped after one
    measurement), across transforms; the artifact's gates are at the winner's target, found again by the budget
    pass from the winner's own measurements."""
    cfg = _auto_config(tmp_path, tiny_llama_dir, calib_text, "  transforms: none,pca-global\n")
    code, stdout, err = run_inproc(["calibrate", "--config", cfg, "-o", tmp_path / "o", "--max-ppl-increase", "2%",
                                    "--json"], capsys)
    assert code == 0, err
    val = as_json(stdout)["validation"]
    auto, budget = val["auto"], val["ppl_budget"]
    assert "highest realized sparsity within +2% of dense perplexity" in auto["reason"]
    cands = auto["candidates"]
    assert len(cands) == 12 and {c["transform"] for c in cands} == {"none", "pca-global"}
    within = [c for c in cands if c["within_budget"]]
    chosen = auto["chosen"]
    assert chosen in within and chosen["realized_sparsity"] == max(c["realized_sparsity"] for c in within)
    assert chosen["ppl"] <= auto["dense_ppl"] * 1.02 * (1 + 1e-9)
    for c in cands:
        if not c["within_budget"]:  # over the budget at a better candidate's target, no sparser there
            assert len(c["measured"]) == 1 and c["ppl"] > c["ppl"] / (1 + c["ppl_increase"]) * 1.02
    assert budget["reused_from_select"] == len(chosen["measured"]) and budget["target"] == chosen["gate_target"]
    wina = json.loads((tmp_path / "o" / "config.json").read_text())["wina"]
    assert wina["target"] == pytest.approx(chosen["gate_target"], abs=1e-6)
    assert (wina["transform"], wina["criterion"], wina["allocation"]) == (chosen["transform"], chosen["criterion"],
                                                                          chosen["allocation"])


def test_method_auto_tries_gate_policies(capsys, tmp_path, tiny_llama_dir, calib_text):
    """auto.dense_first: every criterion x allocation also under each first-N-dense policy, at the same target;
    the sparsity each realized on the held-apart windows is recorded, and the chosen policy is the artifact's."""
    cfg = _auto_config(tmp_path, tiny_llama_dir, calib_text, "  transforms: none\n  dense_first: 0,16\n")
    code, stdout, err = run_inproc(["calibrate", "--config", cfg, "-o", tmp_path / "o", "--json"], capsys)
    assert code == 0, err
    auto = as_json(stdout)["validation"]["auto"]
    cands = {(c["criterion"], c["allocation"], c["dense_first"]): c for c in auto["candidates"]}
    assert set(cands) == {(c, a, n) for c in ("wina", "teal") for a in ("greedy", "uniform", "global") for n in (0, 16)}
    for (c, a, n), cand in cands.items():
        first = cand["measured"][0]  # at the recipe's target: the gates of the policy-free candidate
        assert first["target"] == cands[(c, a, 0)]["measured"][0]["target"] == 0.5
        if n:  # the same gates, and a quarter of each 64-token window computed dense: less realized sparsity
            assert first["realized"] < cands[(c, a, 0)]["measured"][0]["realized"]
            assert first["ppl"] != cands[(c, a, 0)]["measured"][0]["ppl"]
        # compared at the realized sparsity asked for: a candidate off it by more than 0.005 was measured again
        # at a target moved by the difference, and its figures are read at 0.5 between the two measurements
        if abs(first["realized"] - 0.5) > 0.005:
            assert len(cand["measured"]) == 2 and cand["realized_sparsity"] == 0.5
            assert cand["measured"][1]["target"] == pytest.approx(1.0 - first["realized"])
        else:
            assert len(cand["measured"]) == 1 and cand["gate_target"] == 0.5
    assert any(len(c["measured"]) == 2 for c in auto["candidates"])  # the first-16-dense ones at least
    best = min(auto["candidates"], key=lambda c: c["ppl"])
    assert auto["chosen"] == best
    wina = json.loads((tmp_path / "o" / "config.json").read_text())["wina"]
    assert wina["dense_first"] == best["dense_first"]
    # the artifact's gates are set at the target that realized the requested sparsity for the chosen candidate
    assert wina["target"] == pytest.approx(best["gate_target"], abs=1e-6)
    # at the same target instead: one measurement each, and the recipe's target is the artifact's
    code, stdout, err = run_inproc(["calibrate", "--config", cfg, "-o", tmp_path / "q", "--auto-same-target",
                                    "--json"], capsys)
    assert code == 0, err
    same = as_json(stdout)["validation"]["auto"]["candidates"]
    assert all(len(c["measured"]) == 1 and c["gate_target"] == 0.5 for c in same)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["wina"]["target"] == 0.5
    # the CLI flag reaches the same key
    code, stdout, err = run_inproc(["calibrate", "--config", cfg, "-o", tmp_path / "p", "--auto-dense-first", "3",
                                    "--json"], capsys)
    assert code == 0, err
    assert {c["dense_first"] for c in as_json(stdout)["validation"]["auto"]["candidates"]} == {3}


def test_help_is_fast():
    p = run_sub(["--help"])
    assert p.returncode == 0 and "calibrate" in p.stdout
    # Instant help means the CLI module imports no torch until a command runs.
    p = subprocess.run([sys.executable, "-c", "import sys, wina_cli.cli; print('torch' in sys.modules)"],
                       capture_output=True, text=True, cwd=str(ROOT))
    assert p.stdout.strip() == "False"


def test_exit_code_table_matches_errors():
    from wina_cli import errors

    codes = {c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.WinaError)}
    assert codes - {1} <= set(errors.EXIT_CODES)
    assert len(codes) == len([c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.WinaError)])
    readme = (ROOT / "README.md").read_text()
    for code in errors.EXIT_CODES:
        assert f"| {code} |" in readme


# -- bad input: each gets its own exit code, a message that says what and how to fix, and no output folder ----
def _bad(capsys, args, code, *needles, out=None):
    got, stdout, stderr = run_inproc(args, capsys)
    assert got == code, (got, stderr)
    text = " ".join(stderr.split())
    for n in needles:
        assert n in text, (n, text)
    if out is not None:
        assert not out.exists()


def test_missing_model(capsys, tmp_path, calib_text):
    _bad(capsys, ["calibrate", "-m", tmp_path / "nope", "-d", calib_text, "-o", tmp_path / "o"], 4,
         "was not found", "Fix:", out=tmp_path / "o")


def test_model_package_not_installed(capsys, tmp_path, calib_text):
    _bad(capsys, ["calibrate", "-m", "package:no_such_pkg_xyz", "-d", calib_text, "-o", tmp_path / "o"], 4,
         "not installed", out=tmp_path / "o")


def test_hub_id_without_a_hub(tmp_path, calib_text):
    # No hub is reachable from these machines; offline mode makes that explicit and independent of the network.
    p = run_sub(["calibrate", "-m", "someorg/some-model", "-d", calib_text, "-o", tmp_path / "o"],
                extra_env={"HF_HUB_OFFLINE": "1"})
    text = " ".join(p.stderr.split())
    assert p.returncode == 4 and "could not be fetched from the hub" in text and "Fix:" in text, text
    assert not (tmp_path / "o").exists()


def test_corrupt_model_files(capsys, tmp_path, tiny_llama_dir, calib_text):
    bad = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file at all")
    _bad(capsys, ["calibrate", "-m", bad, "-d", calib_text, "-o", tmp_path / "o", *SMALL], 4,
         "could not be loaded", out=tmp_path / "o")
    (bad / "model.safetensors").unlink()
    _bad(capsys, ["calibrate", "-m", bad, "-d", calib_text, "-o", tmp_path / "o", *SMALL], 4, "no weight files")


def test_unsupported_model_type(capsys, tmp_path, tiny_llama_dir, calib_text):
    bad = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    _bad(capsys, ["calibrate", "-m", bad, "-d", calib_text, "-o", tmp_path / "o"], 5, "gpt2", "qwen3")


def test_bad_yaml_and_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: x\n  bad: [indent\n")
    _bad(capsys, ["calibrate", "--config", cfg], 3, "not valid YAML")
    cfg.write_text("model: x\nsparsity:\n  taget: 0.5\n")
    _bad(capsys, ["calibrate", "--config", cfg], 3, "`sparsity.taget`")


def test_sparsity_out_of_range(capsys, tmp_path, calib_text):
    _bad(capsys, ["calibrate", "-m", "x/y", "-d", calib_text, "-o", tmp_path / "o", "--sparsity", "0.95"], 3,
         "[0, 0.9]")


def test_empty_and_short_data(capsys, tmp_path, tiny_llama_dir):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    _bad(capsys, ["calibrate", "-m", tiny_llama_dir, "-d", empty, "-o", tmp_path / "o", *SMALL], 6, "too short",
         out=tmp_path / "o")
    short = tmp_path / "s.txt"
    short.write_text("river stone light " * 20)
    _bad(capsys, ["calibrate", "-m", tiny_llama_dir, "-d", short, "-o", tmp_path / "o", *SMALL], 6, "too short")


def test_existing_output(capsys, tmp_path, tiny_llama_dir, calib_text):
    out = tmp_path / "o"
    out.mkdir()
    _bad(capsys, ["calibrate", "-m", tiny_llama_dir, "-d", calib_text, "-o", out, *SMALL], 7, "--overwrite")


def test_onnx_only_options_are_refused_for_safetensors(capsys, built, tmp_path):
    out, _ = built
    _bad(capsys, ["export", out, "--format", "safetensors", "--dense", "-o", tmp_path / "x"], 3, "ONNX",
         out=tmp_path / "x")


def test_unknown_option_is_a_usage_error():
    p = run_sub(["calibrate", "--frobnicate"])
    assert p.returncode == 2


def test_killed_mid_write_leaves_no_artifact(tmp_path, tiny_llama_dir, calib_text):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "wina_cli", "calibrate", "-m", str(tiny_llama_dir), "-d",
                                 str(calib_text), "-o", str(out), "--num-samples", "32", "--seq-len", "64"],
                                cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        partial = None
        # The partial folder exists from the first byte written until the final rename (weights, config,
        # tokenizer, then loading the written artifact back to validate it): killing at any point of that is
        # killing mid-write. Poll tightly: on a busy 2-core machine the window is a fraction of a second.
        while time.time() < deadline and proc.poll() is None:
            found = list(tmp_path.glob(".killed.partial-*"))
            if found:
                partial = found[0]
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert partial is not None, f"the run finished before it could be killed mid-write: {log.read_text()[-2000:]}"
    assert not out.exists()
    # The next run clears the dead run's partial folder and writes a complete artifact.
    p = run_sub(["calibrate", "-m", tiny_llama_dir, "-d", calib_text, "-o", out, *SMALL])
    assert p.returncode == 0, p.stderr
    assert (out / "wina.json").exists() and not list(tmp_path.glob(".killed.partial-*"))


def test_calibrate_also_writes_the_onnx_exports(tiny_llama_dir, calib_text, tmp_path, capsys):
    art, sparse, dense = tmp_path / "art", tmp_path / "onnx", tmp_path / "onnx-dense"
    args = ["calibrate", "--model", tiny_llama_dir, "--data", calib_text, *SMALL, "--transform", "none",
            "--criterion", "teal", "--allocation", "uniform", "-o", art]
    code, stdout, err = run_inproc([*args, "--onnx", sparse, "--onnx-dense", dense, "--json"], capsys)
    assert code == 0, err
    ex = as_json(stdout)["exports"]
    assert ex["onnx"]["output"] == str(sparse) and ex["onnx"]["graph"]["gated_ops"] > 0
    assert ex["onnx_dense"]["graph"]["gated_ops"] == 0 and ex["onnx_dense"]["graph"]["dense_matmuls"] > 0
    for folder in (sparse, dense):
        m = json.loads((folder / "wina_onnx.json").read_text())
        assert m["source_artifact"]["manifest_sha256"] == sha256_file(art / "wina.json")
        assert (folder / "model.onnx").is_file()
        assert all(r["greedy_mismatches"] == 0 for r in m["validation"]["runs"].values())
    recipe = (art / "recipe.yaml").read_text()
    assert "onnx: ''" in recipe and str(sparse) not in recipe  # where it was written is not part of the recipe
    # an export folder that exists stops the run before any work, without --overwrite
    code, _, err = run_inproc([*args[:-1], tmp_path / "art2", "--onnx", sparse], capsys)
    assert code == 7 and "exists" in err and not (tmp_path / "art2").exists()


def test_distill_record_reads_as_one_sparsity_a_range_or_with_the_text_fitted():
    from wina_cli.cli import _distill_text

    one = {"steps": 8, "lr": 1e-4, "train_tokens": 1024, "sparsity": 0.5, "check_tokens": 128,
           "check_kl_before": 0.5, "check_kl_after": 0.4, "dense_kl_after": 0.1}
    text = _distill_text(one)
    assert "at sparsity 0.5 (top-k)" in text and "0.5000 -> 0.4000;" in text and "constant" in text
    ranged = _distill_text({**one, "sparsity": 0.3, "sparsity_max": 0.6, "check_kl_before_at_max": 0.9,
                            "check_kl_after_at_max": 0.7})
    assert "sparsities drawn from [0.3, 0.6]" in ranged
    assert "0.5000 -> 0.4000 gated at 0.3, 0.9000 -> 0.7000 at 0.6" in ranged
    fitted = _distill_text({**one, "ce_weight": 0.5, "check_ce_before": 3.1, "check_ce_after": 2.9,
                            "dense_ce_after": 2.7, "original_ce": 2.8})
    assert "with 0.5 x the text's cross-entropy, which went 3.1000 -> 2.9000 gated, 2.7000 tuned dense" in fitted
    assert "(the dense original 2.8000)" in fitted and "cross-entropy" not in text


def test_distilled_artifact_end_to_end(capsys, tmp_path, tiny_llama_dir, calib_text, eval_text):
    source = tmp_path / "source"
    shutil.copytree(tiny_llama_dir, source)
    code, stdout, err = run_inproc(["calibrate", "-m", source, "-d", calib_text, "-o", tmp_path / "o", *SMALL,
                                    "--transform", "none", "--criterion", "teal", "--allocation", "uniform",
                                    "--distill-steps", "20", "--distill-lr", "3e-4", "--distill-schedule", "cosine",
                                    "--distill-gate", "quantile", "--distill-ce-weight", "0.5", "--json"], capsys)
    assert code == 0, err
    d = as_json(stdout)["validation"]["distill"]
    # the objective fell (on a tiny random model the fit to the text can cost KL)
    assert d["check_kl_after"] + 0.5 * d["check_ce_after"] < d["check_kl_before"] + 0.5 * d["check_ce_before"]
    assert d["steps"] == 20
    assert d["data"]["files_read"] == 1  # what bench checks an evaluation text against
    recipe = (tmp_path / "o" / "recipe.yaml").read_text()
    assert "steps: 20" in recipe and "schedule: cosine" in recipe and d["schedule"] == "cosine"
    code, stdout, err = run_inproc(["inspect", tmp_path / "o"], capsys)
    text = " ".join(stdout.split())
    assert code == 0 and "distilled: 20 steps (lr 0.0003, cosine)" in text and "(window quantile)" in text
    assert "gate: quantile" in recipe and d["gate"] == "quantile"
    assert "ce_weight: 0.5" in recipe and d["ce_weight"] == 0.5 and "with 0.5 x the text's cross-entropy" in text
    bench = ["bench", tmp_path / "o", "--data", eval_text, "--num-samples", "2", "--seq-len", "64",
             "--sparsity", "0.3", "--configs", "teal/uniform", "--ppl-budget", "20%"]
    code, stdout, err = run_inproc(bench + ["--json"], capsys)
    assert code == 0, err
    result = as_json(stdout)
    dense = next(r for r in result["runs"] if r["criterion"] == "dense")
    # the increases count from the checkpoint the weights were tuned from, and the tuned dense model is shown
    assert dense["reference"] == "source checkpoint" and dense["ppl"] != dense["tuned_dense_ppl"]
    # the budget is searched from both: each found target keeps within its own reference
    by_ref = {b["reference"]: b for b in result["budgets"]}
    assert sorted(by_ref) == ["source checkpoint", "tuned dense"] and len(result["budgets"]) == 2
    assert by_ref["source checkpoint"]["dense_ppl"] == dense["ppl"]
    assert by_ref["tuned dense"]["dense_ppl"] == dense["tuned_dense_ppl"]
    for b in by_ref.values():
        assert b["ppl"] <= b["dense_ppl"] * 1.2
    code, stdout, err = run_inproc(bench + ["--markdown"], capsys)
    assert code == 0 and f"{dense['ppl']:.2f} (tuned {dense['tuned_dense_ppl']:.2f})" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("| none"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert "PPL-20% from tuned dense" in stdout and cells[-2:] == [
        f"{b['realized_sparsity']:.3f} ({b['target_sparsity']:.3f})" for b in by_ref.values()]
    # a source checkpoint that changed since is not taken as the reference
    cfg = source / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    _bad(capsys, bench, 8, "is not the one", "tuned from")
