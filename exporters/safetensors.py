"""Write an artifact folder (safetensors + manifest), validated against the model it was written from.

Validation loads the written folder back with the torch runtime and compares logits on a probe batch, dense
and with the deployment gates, against the in-memory reference. A drift past the dtype's tolerance is an error
and nothing is left behind.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

import wina_cli
from wina_cli import probe
from wina_cli.artifact import RECIPE, WEIGHTS, atomic_folder, write_manifest
from wina_cli.errors import ValidationError
from wina_cli.gating import CalibrationStats, Allocation, GatePlan
from wina_cli.models.adapters import PROJECTIONS
from wina_cli.models.load import DTYPES
from wina_cli.runtime import gate_tensors, load_runtime

# max |delta logits| / max |logits| between the written artifact and its in-memory reference
TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 6e-2}


def versions() -> dict:
    import safetensors
    import transformers

    return {"wina": wina_cli.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def gate_table(plan: GatePlan) -> list[dict]:
    rows = []
    for l in range(plan.sparsity.shape[0]):
        rows.append({"layer": l, **{name: {"sparsity": round(float(plan.sparsity[l, p]), 6),
                                           "threshold": float(plan.threshold[l, p]), "k": int(plan.k[l, p])}
                                    for p, name in enumerate(PROJECTIONS)}})
    return rows


def _state_tensors(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out, seen = {}, {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for k, v in model.state_dict().items():
        ptr = v.data_ptr()
        if ptr in seen and tied:
            continue  # a tied copy: the config's tie_word_embeddings restores it
        seen[ptr] = k
        # No copy when the dtype already matches: save_file only reads, and a copy of every weight would double
        # the peak memory of a calibration.
        out[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    return out


def write_artifact(output: str, *, overwrite: bool, model, tokenizer, stats: CalibrationStats,
                   allocation: Allocation, plan: GatePlan, dtype: str, wina_block: dict, manifest: dict,
                   recipe_yaml: str, reference_gateset=None, seed: int = 0, log=lambda m: None) -> dict:
    """Write, validate, then move into place. Returns the validation record."""
    from safetensors.torch import save_file

    with atomic_folder(output, overwrite) as tmp:
        tensors = _state_tensors(model, DTYPES[dtype])
        tensors.update(gate_tensors(stats, allocation, plan))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: safetensors orders metadata keys at random
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        # where the checkpoint sat on the building machine: it would make the same build differ between checkouts,
        # and the manifest's `source` already names the checkpoint (spec and sha256)
        cfg.pop("_name_or_path", None)
        cfg["dtype"] = dtype
        cfg["wina"] = {**wina_block, "dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(str(tmp))
        (tmp / RECIPE).write_text(recipe_yaml)
        # The runtime reads config, weights and tokenizer; the manifest is written once validation passed.
        log("validating the written artifact against the in-memory model")
        validation = validate_written(tmp, model, plan, stats, dtype, reference_gateset, seed)
        manifest = {**manifest, "versions": versions(), "gates": {**plan.describe(), "layers": gate_table(plan)},
                    "validation": {**manifest.get("validation", {}), "export": validation}}
        write_manifest(tmp, manifest)
    return validation


@torch.no_grad()
def validate_written(folder: Path, ref_model, plan: GatePlan, stats, dtype: str, ref_gateset, seed: int) -> dict:
    """Dense: the written weights against the float32 reference, within the dtype's tolerance. Sparse: in float32,
    against the reference with the same gates; in a reduced dtype, against the reference cast to that dtype with
    the same gates (gate decisions of channels sitting on a threshold legitimately flip between dtypes, so the
    float32 model is not the right reference for them)."""

    rt = load_runtime(folder, verify=False, dtype=dtype, partial=True)
    ids = probe.probe_ids(ref_model.config.vocab_size, seed)
    result = {"dtype": dtype, "tolerance_rel": TOLERANCE[dtype]}
    checks = [("dense", None, TOLERANCE[dtype]), ("sparse", plan, TOLERANCE["float32"] if dtype == "float32" else 1e-3)]
    for label, use, tol in checks:
        if ref_gateset is not None:
            ref_gateset.apply(use, stats.col_norms, stats.in_features)
        if label == "sparse" and dtype != "float32":
            ref = probe.logits(_cast_like_loader(ref_model, DTYPES[dtype]), ids)
        else:
            ref = probe.logits(ref_model, ids)
        rt.use_plan(use)
        cmp = probe.compare(ref, probe.logits(rt.model, ids))
        result[label] = {**cmp, "tolerance_rel": tol, "reference": "float32" if label == "dense" or dtype == "float32"
                         else dtype}
        if cmp["max_rel_delta"] > tol:
            raise ValidationError(
                f"the written artifact's {label} logits drift from the reference by {cmp['max_abs_delta']:.3g} "
                f"({cmp['max_rel_delta']:.3g} of the largest logit, limit {tol} for {dtype})",
                "the artifact does not reproduce the model it was written from", "report this with the recipe")
    if ref_gateset is not None:
        ref_gateset.apply(plan, stats.col_norms, stats.in_features)
    return result


def _cast_like_loader(model, dtype: torch.dtype):
    """A copy loaded the way `load_runtime` loads an artifact: the state dict (parameters and persistent
    buffers) assigned in `dtype`, everything the model computes for itself (rotary frequencies, embedding
    scales) left as it is."""
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()},
                      assign=True)
    return m


def reexport(artifact: str, output: str, dtype: str, overwrite: bool, log=lambda m: None) -> dict:
    """Rewrite an artifact (e.g. in float16), validated against the source artifact in float32."""
    from wina_cli.artifact import read_artifact

    src = read_artifact(artifact)
    rt = load_runtime(artifact, dtype="float32")
    recipe_yaml = (Path(artifact) / RECIPE).read_text() if (Path(artifact) / RECIPE).is_file() else ""
    manifest = {k: v for k, v in src.manifest.items() if k not in ("files", "format_version", "versions", "gates")}
    manifest["exported_from"] = {"sha256_weights": src.manifest.get("files", {}).get(WEIGHTS, {}).get("sha256"),
                                 "dtype": src.wina.get("dtype", "float32")}
    return write_artifact(output, overwrite=overwrite, model=rt.model, tokenizer=rt.tokenizer, stats=rt.stats,
                          allocation=rt.allocation, plan=rt.default_plan, dtype=dtype,
                          wina_block={k: v for k, v in src.wina.items() if k != "dtype"}, manifest=manifest,
                          recipe_yaml=recipe_yaml, reference_gateset=rt.gateset,
                          seed=int(src.manifest.get("recipe", {}).get("seed", 0)), log=log)
