"""The artifact: round trip through the torch runtime, determinism, checksums, atomic writes, re-export."""
from __future__ import annotations

import filecmp
import json
import shutil

import pytest
import torch

from clihelp import as_json, run_inproc
from wina_cli import probe
from wina_cli.artifact import read_artifact
from wina_cli.errors import ArtifactError
from wina_cli.runtime import load_runtime

CAL = ["--num-samples", "6", "--seq-len", "64", "--sparsity", "0.5"]


def calibrate(capsys, model_dir, data, out, *extra):
    code, stdout, stderr = run_inproc(["calibrate", "--model", model_dir, "--data", data, "-o", out, *CAL,
                                       "--json", *extra], capsys)
    assert code == 0, stderr
    return as_json(stdout)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_llama_dir, calib_text):
    out = tmp_path_factory.mktemp("art") / "a"
    from wina_cli.cli import main  # module-scoped fixtures cannot take capsys: call main directly

    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(tiny_llama_dir), "--data", str(calib_text), "-o", str(out), *CAL])
    assert e.value.code == 0
    return out


def test_manifest_records_provenance_and_checks(artifact):
    art = read_artifact(artifact)
    m = art.manifest
    assert m["format_version"] == 1
    assert set(m["versions"]) >= {"wina", "torch", "transformers"}
    assert m["source"]["sha256"] and m["source"]["model_type"] == "llama"
    assert m["calibration"]["tokens"] == 6 * 64 and m["calibration"]["text_sha256"]
    assert [p["name"] for p in m["pipeline"]] == ["load", "tokenize", "fold_norms", "rotate", "collect_stats",
                                                   "allocate", "set_gates"]
    assert m["validation"]["transform"]["max_rel_delta"] < 1e-3
    assert m["validation"]["export"]["dense"]["max_abs_delta"] <= 1e-5
    assert len(m["gates"]["layers"]) == 2 and "threshold" in m["gates"]["layers"][0]["q"]
    assert {"config.json", "model.safetensors", "recipe.yaml"} <= set(m["files"])


def test_runtime_at_sparsity_zero_reproduces_the_source_model(artifact, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    rt = load_runtime(artifact)
    ids = probe.probe_ids(src.config.vocab_size, 21)
    ref = probe.logits(src, ids)
    rt.use_plan(rt.plan_for("wina", "threshold", "greedy", 0.0))
    cmp = probe.compare(ref, probe.logits(rt.model, ids))
    assert cmp["max_rel_delta"] < 1e-3 and cmp["top1_agreement"] == 1.0
    rt.use_plan(rt.default_plan)
    sparse = probe.compare(ref, probe.logits(rt.model, ids))
    assert sparse["max_abs_delta"] > cmp["max_abs_delta"]  # the gates are really applied


def test_same_inputs_give_the_same_bytes(artifact, tmp_path, tiny_llama_dir, calib_text, capsys):
    again = tmp_path / "b"
    result = calibrate(capsys, tiny_llama_dir, calib_text, again)
    # each pass reports the memory high-water mark so far; like the timings, it stays out of the artifact
    assert all(p["peak_rss_mb"] > 0 for p in result["passes"])
    manifest = json.loads((again / "wina.json").read_text())
    assert all("peak_rss_mb" not in p and "seconds" not in p for p in manifest["pipeline"])
    files = sorted(p.name for p in artifact.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(artifact, again, files, shallow=False)
    assert mismatch == [] and errors == []
    # where the checkpoint sat is recorded only as the user named it (manifest and recipe), never as a path
    # transformers resolved, which would differ between checkouts
    config = json.loads((again / "config.json").read_text())
    assert "_name_or_path" not in config and str(tiny_llama_dir) not in (again / "config.json").read_text()


def test_corrupt_weights_are_detected(artifact, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    with pytest.raises(ArtifactError) as e:
        read_artifact(bad)
    assert "checksum" in e.value.message
    code, _, err = run_inproc(["inspect", bad], capsys)
    assert code == 8 and "checksum" in err


def test_missing_file_and_unknown_version(artifact, tmp_path):
    bad = tmp_path / "bad2"
    shutil.copytree(artifact, bad)
    (bad / "config.json").unlink()
    with pytest.raises(ArtifactError) as e:
        read_artifact(bad)
    assert "missing config.json" in e.value.message
    bad3 = tmp_path / "bad3"
    shutil.copytree(artifact, bad3)
    text = (bad3 / "wina.json").read_text().replace('"format_version": 1', '"format_version": 99')
    (bad3 / "wina.json").write_text(text)
    with pytest.raises(ArtifactError) as e:
        read_artifact(bad3)
    assert "format version 99" in e.value.message


def test_float16_export_validates_and_loads(artifact, tmp_path, capsys):
    out = tmp_path / "fp16"
    code, stdout, err = run_inproc(["export", artifact, "--format", "safetensors", "--dtype", "float16", "-o", out,
                                    "--json"], capsys)
    assert code == 0, err
    v = as_json(stdout)["validation"]
    assert v["dense"]["max_rel_delta"] <= v["tolerance_rel"]
    rt = load_runtime(out)
    assert rt.model.dtype == torch.float16
    assert (out / "model.safetensors").stat().st_size < 0.7 * (artifact / "model.safetensors").stat().st_size


def test_failure_mid_write_leaves_nothing(artifact, tmp_path, monkeypatch, capsys):
    import exporters.safetensors as ex

    def explode(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "validate_written", explode)
    out = tmp_path / "never"
    code, _, err = run_inproc(["export", artifact, "-o", out], capsys)
    assert code != 0
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(artifact, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_inproc(["export", artifact, "-o", out], capsys)
    assert code == 7 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_inproc(["export", artifact, "-o", out, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "wina.json").exists()
