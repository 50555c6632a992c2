"""`wina export --format onnx`: the decoder graph, written atomically and validated against the torch runtime.

Validation runs ONNX Runtime twice, with wina's native kernels and with the graph's standard-op function bodies
(the path every other execution provider takes), over a prefill and `decode_steps` KV-cache steps, against the
torch runtime with the same weights (and, for a sparse graph, the gate decisions ONNX Runtime made, see
`validate`). Any drift past tolerance, or any greedy token that differs, is an error and nothing is left behind.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from wina_cli import native, probe
from wina_cli import onnx_ops as ops
from wina_cli.artifact import MANIFEST, atomic_folder, file_table, read_artifact, sha256_file
from wina_cli.errors import ConfigError, ValidationError
from wina_cli.onnx_runtime import KV_CACHE_KEY, ONNX_MANIFEST, ONNX_MODEL, OnnxDecoder
from wina_cli.runtime import Runtime, load_runtime

from .graph import ATTENTION, WEIGHT_DTYPES, DecoderGraph

FORMAT_VERSION = 1
EXTERNAL_DATA = "model.onnx.data"
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # initializers past this go to external data
# max |delta logits| / max |reference logit|: float32 graphs differ from torch by summation order only.
TOLERANCE = 5e-4


def versions() -> dict:
    import onnxruntime

    from exporters.safetensors import versions as artifact_versions

    return {**artifact_versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _round_weights(rt: Runtime, weight_dtype: str) -> None:
    """Give the reference exactly the weights the graph stores: projections, embeddings and lm_head in the export
    dtype (norm gains, rotary tables and the transform's basis matrices stay float32 in the graph)."""
    if weight_dtype == "float32":
        return
    ad = rt.adapter
    with torch.no_grad():
        mods = [m for m in rt.gateset.modules] + [ad.embedding(), ad.lm_head()]
        for m in mods:
            m.weight.copy_(m.weight.to(torch.float16).to(m.weight.dtype))


def reference_run(rt: Runtime, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation with the torch runtime: tokens [batch, prompt + steps] and logits for every position
    (gates act per token, so one forward over the final sequence gives what incremental decoding computes)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = rt.model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        logits = rt.model(input_ids=ids, use_cache=False).logits.float()
    return ids, logits


class _ForcedMask:
    """A gate that applies a given mask: the masks ONNX Runtime applied, replayed in the torch runtime."""

    def __init__(self, mask: torch.Tensor):
        self.fixed = mask

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed.shape != x.shape:
            raise ValidationError(f"a replayed gate mask has shape {tuple(self.fixed.shape)} for an input of shape "
                                  f"{tuple(x.shape)}", "the ONNX graph and the torch runtime disagree on a "
                                  "projection's input", "report this with the artifact's recipe")
        return self.fixed


def run_decoder(dec: OnnxDecoder, ids: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, dict]:
    """Prefill on the prompt, then one KV-cache step per following token (teacher forced). Returns the logits of
    every position and, per extra output, its values over every position (concatenated along the sequence)."""
    ids_np = ids.numpy()
    logits, cache, mask = dec.prefill(ids_np[:, :prompt_len])
    got, extras = [logits], {k: [v] for k, v in dec.extra.items()}
    for t in range(prompt_len, ids_np.shape[1]):
        step_logits, cache, mask = dec.step(ids_np[:, t], cache, mask)
        got.append(step_logits[:, None, :])
        for k, v in dec.extra.items():
            extras[k].append(v)
    return (torch.from_numpy(np.concatenate(got, axis=1)),
            {k: torch.from_numpy(np.concatenate(v, axis=1)) for k, v in extras.items()})


def greedy_check(ref: torch.Tensor, got: torch.Tensor, prompt_len: int, max_abs: float) -> dict:
    """The greedy token at the last prompt position and at every decode step: equal, except where the reference's
    top two logits are closer than the measured numerical difference (a tie either side may take)."""
    r, g = ref[:, prompt_len - 1:], got[:, prompt_len - 1:]
    top2 = r.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 2 * max_abs
    differ = r.argmax(-1) != g.argmax(-1)
    return {"greedy_positions": int(differ.numel()), "greedy_mismatches": int((differ & decisive).sum()),
            "greedy_ties_skipped": int((differ & ~decisive).sum())}


def _check(label: str, cmp: dict, tol: float, what: str) -> None:
    if cmp["max_rel_delta"] > tol or cmp["greedy_mismatches"]:
        raise ValidationError(
            f"the ONNX graph ({label.replace('_', ' ')}) drifts from the torch runtime{what}: max |delta logits| "
            f"{cmp['max_abs_delta']:.3g} ({cmp['max_rel_delta']:.3g} of the largest logit, limit {tol}), "
            f"{cmp['greedy_mismatches']} of {cmp['greedy_positions']} greedy tokens differ",
            "the exported graph does not compute what the artifact computes",
            "report this with the artifact's recipe; `--debug` shows where it was raised")


# Validation prompt: 2 x 40 tokens, so the prefill is a call of 80 rows, which takes the native kernels' many-row
# path (a GEMM on masked X, from 64 rows); the decode steps take the row-gathering one.
PROMPT_TOKENS = 40


def validate(model_path: Path, rt: Runtime, gated: list[tuple[int, str, str]], seed: int, decode_steps: int,
             batch: int = 2, prompt_len: int = PROMPT_TOKENS, log=lambda m: None) -> dict:
    """Dense graphs: logits and greedy tokens against the torch runtime. Sparse graphs: a threshold gate is
    discontinuous, so float rounding that differs between two correct implementations flips channels sitting on
    a threshold and, through later layers, moves the logits by far more than rounding does; comparing free-running
    logits proves nothing either way. So every gated op's input is read back from ONNX Runtime, the torch
    runtime's own gate rule is applied to it, and the torch model replays exactly those masks: it must then
    reproduce ONNX Runtime's logits and greedy tokens to the dense tolerance. That proves the graph computes the
    artifact's function and that every op kept the channels the gate rule keeps for the input it saw. The
    free-running comparison is reported beside it."""
    prompt = probe.probe_ids(rt.model.config.vocab_size, seed, batch=batch, seq_len=prompt_len)
    # The reference applies the artifact's gate policy to the same prompt (the graph's dense_until input is fed
    # the prompt's length by the decoder); a graph that ignored the policy then fails the replay below.
    rt.gateset.set_dense_until(rt.dense_until_policy(prompt_len) if gated else 0)
    ids, free_ref = reference_run(rt, prompt, decode_steps)
    tol = TOLERANCE
    result = {"reference": "torch runtime", "prompt_tokens": prompt_len, "decode_steps": decode_steps,
              "batch": batch, "tolerance_rel": tol, "gated_ops": len(gated), "runs": {}}
    probe_path = model_path
    probe_inputs = list(dict.fromkeys(x for _, _, x in gated))  # q, k and v read one input: list it once
    if gated:
        # a copy of the graph that also outputs every gated op's input (same folder: shares external data)
        m = onnx.load(str(model_path), load_external_data=False)
        for name in probe_inputs:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        probe_path = model_path.parent / "validation_probe.onnx"
        onnx.save_model(m, str(probe_path))
    variants = [("function_bodies", False)]
    if native.cpu_library() is not None:
        variants.insert(0, ("native_kernels", True))
    else:
        result["note"] = "native kernel library not built: only the function bodies were validated"
    try:
        for label, use_native in variants:
            log(f"validating with ONNX Runtime ({label.replace('_', ' ')}) over a prefill and {decode_steps} "
                "decode steps")
            dec = OnnxDecoder(probe_path, "cpu", use_native=use_native, extra_outputs=probe_inputs)
            if use_native and dec.info.native_library is None:
                raise ValidationError("the native kernel library is present but ONNX Runtime did not load it",
                                      "; ".join(dec.info.notes) or "unknown reason",
                                      "rebuild it with `make native`, or set WINA_NATIVE_LIB=off")
            got, inputs = run_decoder(dec, ids, prompt_len)
            del dec
            free = probe.compare(free_ref[:, : got.shape[1]], got)
            free.update(greedy_check(free_ref, got, prompt_len, free["max_abs_delta"]))
            if not gated:
                result["runs"][label] = free
                _check(label, free, tol, "")
                continue
            replay = _replay(rt, ids, gated, inputs)
            cmp = probe.compare(replay, got)
            cmp.update(greedy_check(replay, got, prompt_len, cmp["max_abs_delta"]))
            cmp["free_running"] = free
            result["runs"][label] = cmp
            _check(label, cmp, tol, " replaying its own gate decisions")
    finally:
        rt.gateset.set_dense_until(0)
        if probe_path != model_path:
            probe_path.unlink(missing_ok=True)
    return result


def _replay(rt: Runtime, ids: torch.Tensor, gated: list[tuple[int, str, str]], inputs: dict) -> torch.Tensor:
    saved = {}
    try:
        for l, proj, x in gated:
            seg = rt.gateset.segments[l][proj]
            saved[(l, proj)] = seg.gate
            seg.gate = _ForcedMask(seg.gate.mask(inputs[x]))
        with torch.no_grad():
            return rt.model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for (l, proj), gate in saved.items():
            rt.gateset.segments[l][proj].gate = gate


def save_model(model: onnx.ModelProto, folder: Path, external_above: int = PROTOBUF_LIMIT) -> None:
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    path = folder / ONNX_MODEL
    if size > external_above:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def export_onnx(artifact: str, output: str, *, weight_dtype: str = "float32", sparsity: float | None = None,
                criterion: str | None = None, allocation: str | None = None, dense: bool = False,
                overwrite: bool = False, decode_steps: int = 16, seed: int = 0,
                external_above: int = PROTOBUF_LIMIT, attention: str = "fused", fuse: bool = False,
                log=lambda m: None) -> dict:
    if attention not in ATTENTION:
        raise ConfigError(f"unknown attention lowering '{attention}'",
                          f"the exporter writes {' or '.join(ATTENTION)} attention",
                          "pass --attention fused (ONNX Runtime's contrib ops) or --attention plain (standard ops)")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"ONNX export does not write {weight_dtype} weights",
                          f"the graph stores {' or '.join(WEIGHT_DTYPES)} weights", "pass --dtype float32 or float16")
    src = read_artifact(artifact)
    rt = load_runtime(artifact, dtype="float32")
    plan = rt.default_plan
    if sparsity is not None or criterion is not None or allocation is not None:
        # re-planned from the artifact's calibration, as `wina bench` and the torch runtime can at any target
        plan = rt.plan_for(criterion or plan.criterion, plan.mode, allocation or plan.allocation,
                           plan.target if sparsity is None else sparsity)
    if dense or (sparsity is not None and sparsity == 0.0):
        plan = None
    rt.use_plan(plan)
    _round_weights(rt, weight_dtype)
    log("building the ONNX graph")
    builder = DecoderGraph(rt, dense=plan is None, weight_dtype=weight_dtype, attention=attention, fuse=fuse)
    model = builder.build()
    cfg = rt.model.config
    manifest = {
        "format": "onnx", "format_version": FORMAT_VERSION, "versions": versions(),
        # identified by its manifest's hash, not its path: the same artifact exported from another folder or
        # checkout gives the same bytes
        "source_artifact": {"manifest_sha256": sha256_file(src.path / MANIFEST),
                            "source": src.manifest.get("source", {}), "transform": src.wina.get("transform")},
        "gates": plan.describe() if plan is not None else {"dense": True},
        "graph": {"opset": {o.domain: o.version for o in model.opset_import}, "ir_version": model.ir_version,
                  "attention": attention, "fused": fuse, "fused_ops": builder.b.counts["fused"],
                  "max_positions": builder.max_positions,
                  "kv_cache": next((p.value for p in model.metadata_props if p.key == KV_CACHE_KEY), "arrays"),
                  "weight_dtype": weight_dtype, "gated_ops": builder.b.counts["gated"],
                  "dense_matmuls": builder.b.counts["dense"], "num_layers": len(rt.adapter.layers()),
                  "num_kv_heads": builder.kv_heads, "head_dim": builder.head_dim, "vocab_size": int(cfg.vocab_size),
                  "model_type": cfg.model_type},
    }
    if builder.has_policy:
        manifest["gates"]["policy"] = {"text": rt.policy_text(), "dense_first": builder.dense_first,
                                       "dense_prompt": builder.dense_prompt,
                                       "input": "dense_until" if builder.dense_prompt else None}
    with atomic_folder(output, overwrite) as tmp:
        save_model(model, tmp, external_above)
        manifest["validation"] = validate(tmp / ONNX_MODEL, rt, builder.b.gated, seed, decode_steps, log=log)
        del model
        # The validated graph gets the manifest as metadata; external data (if any) stays as written.
        written = onnx.load(str(tmp / ONNX_MODEL), load_external_data=False)
        props = {p.key: p.value for p in written.metadata_props}
        onnx.helper.set_model_props(written, {**props, "wina.manifest": json.dumps(manifest, sort_keys=True)})
        onnx.save_model(written, str(tmp / ONNX_MODEL))
        rt.tokenizer.save_pretrained(str(tmp))
        config = json.loads((src.path / "config.json").read_text())
        config.pop("_name_or_path", None)  # artifacts written before wina dropped it
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        full = {**manifest, "files": file_table(tmp)}
        (tmp / ONNX_MANIFEST).write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    return manifest
