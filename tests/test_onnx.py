"""The ONNX side: ai.wina op parity (native kernels and function bodies), decoder graphs of every family validated
against the torch runtime, the fallback without the native library, failing validation, and the CLI."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from clihelp import ROOT, as_json, run_inproc, run_sub
from conftest import FAMILIES, make_text, save_tiny

from wina_cli import native, onnx_ops

CAL = ["--num-samples", "8", "--seq-len", "64"]


def test_native_library_is_built():
    # `make setup` builds it; every native test below relies on it, so its absence is a failure, not a skip.
    assert native.cpu_library() is not None and native.cpu_library().is_file()


# -- op level ----------------------------------------------------------------------------------------------------
def _op_model(op: str, n_in: int, n_out: int, wtype: int, **attrs) -> bytes:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, None)
    w = helper.make_tensor_value_info("W", wtype, [n_in, n_out])
    s = helper.make_tensor_value_info("scale", TensorProto.FLOAT, [n_in])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    node = helper.make_node(op, ["X", "W", "scale"], ["Y"], domain=onnx_ops.DOMAIN, **attrs)
    g = helper.make_graph([node], "op", [x, w, s], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", onnx_ops.OPSET),
                                            helper.make_opsetid(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION)],
                          functions=onnx_ops.functions())
    m.ir_version = 10
    return m.SerializeToString()


def _run(model: bytes, use_native: bool, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    if use_native:
        so.register_custom_ops_library(str(native.cpu_library()))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _reference(x, w, scale, threshold=None, k=None):
    score = np.abs(x) * scale
    if threshold is not None:
        keep = score > threshold
    else:
        keep = np.zeros_like(x, dtype=bool)
        if k > 0:
            np.put_along_axis(keep, np.argsort(-score, axis=-1)[..., :k], True, axis=-1)
    return (x * keep) @ w.astype(np.float32), keep


CASES = [  # (x shape, n_in, n_out): a decode row, a prefill batch, a batch of prefills, odd sizes
    ((1, 1, 64), 64, 96), ((1, 7, 130), 130, 33), ((3, 5, 200), 200, 1100), ((2, 2, 17), 17, 5),
    ((2, 40, 96), 96, 72)]  # 80 rows: float32 weights take the native kernel's GEMM-on-masked-X path


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "function"])
@pytest.mark.parametrize("wdtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,n_in,n_out", CASES)
def test_gated_matmul_matches_reference(use_native, wdtype, shape, n_in, n_out):
    rng = np.random.default_rng(n_in)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((n_in, n_out)).astype(wdtype)
    scale = rng.random(n_in).astype(np.float32) + 0.1
    wtype = TensorProto.FLOAT if wdtype == np.float32 else TensorProto.FLOAT16
    feeds = {"X": x, "W": w, "scale": scale}
    for thr, what in ((0.0, "threshold 0: every nonzero channel"), (float(np.median(np.abs(x) * scale)), "half"),
                      (1e9, "every channel dropped")):
        ref, keep = _reference(x, w, scale, threshold=thr)
        got = _run(_op_model(onnx_ops.GATED, n_in, n_out, wtype, threshold=thr), use_native, feeds)
        assert got.shape == ref.shape, what
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max() + 1e-5, err_msg=what)
        if thr == 1e9:
            assert not keep.any() and np.all(got == 0.0)
    for k in (0, 1, n_in // 3, n_in):
        ref, _ = _reference(x, w, scale, k=k)
        if k == 0:
            # the exporter lowers k = 0 to a threshold no score passes; TopK itself needs k >= 1
            got = _run(_op_model(onnx_ops.GATED, n_in, n_out, wtype, threshold=float("inf")), use_native, feeds)
        else:
            got = _run(_op_model(onnx_ops.TOPK, n_in, n_out, wtype, k=k), use_native, feeds)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max() + 1e-5, err_msg=f"k={k}")


def test_native_kernel_claims_the_node(tmp_path):
    """With the library registered, the node runs the native kernel (profiled as the custom op, no inlined
    standard ops)."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(native.cpu_library()))
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    sess = ort.InferenceSession(_op_model(onnx_ops.GATED, 8, 4, TensorProto.FLOAT, threshold=0.1), so,
                                providers=["CPUExecutionProvider"])
    sess.run(None, {"X": np.ones((1, 8), np.float32), "W": np.ones((8, 4), np.float32),
                    "scale": np.ones(8, np.float32)})
    events = json.loads(Path(sess.end_profiling()).read_text())
    ops = {e["args"].get("op_name") for e in events if e.get("cat") == "Node"}
    assert onnx_ops.GATED in ops and "Where" not in ops


def _rows_model(op: str, n_in: int, n_out: int, wtype=TensorProto.FLOAT, **attrs) -> bytes:
    m = onnx.load_from_string(_op_model(op, n_in, n_out, wtype, **attrs))
    m.graph.input.append(helper.make_tensor_value_info("dense", TensorProto.BOOL, None))
    m.graph.node[0].input.append("dense")
    return m.SerializeToString()


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "function"])
@pytest.mark.parametrize("wdtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("seq", [5, 40], ids=["rows", "gemm"])  # 2 x 40 rows: the native GEMM-on-masked-X path
def test_dense_rows_ops_keep_every_channel_of_flagged_positions(use_native, wdtype, seq):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, seq, 40)).astype(np.float32)
    w = rng.standard_normal((40, 24)).astype(wdtype)
    wtype = TensorProto.FLOAT if wdtype == np.float32 else TensorProto.FLOAT16
    scale = rng.random(40).astype(np.float32) + 0.1
    dense = np.resize(np.array([True, False, True, False, False]), seq)
    feeds = {"X": x, "W": w, "scale": scale, "dense": dense}
    thr = float(np.median(np.abs(x) * scale))
    for op, kw, ref_kw in ((onnx_ops.GATED_ROWS, {"threshold": thr}, {"threshold": thr}),
                           (onnx_ops.TOPK_ROWS, {"k": 13}, {"k": 13})):
        _, keep = _reference(x, w, scale, **ref_kw)
        keep = keep | dense[None, :, None]
        ref = (x * keep) @ w
        got = _run(_rows_model(op, 40, 24, wtype, **kw), use_native, feeds)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=op)
        np.testing.assert_allclose(got[:, 0], x[:, 0] @ w, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=op)
        assert np.abs(got[:, 1] - x[:, 1] @ w).max() > 1e-2, "an unflagged row must stay gated"
        # every position flagged (a dense prompt): the native kernel hands the call to ONNX Runtime's MatMul (for
        # float16 weights, on a float32 copy, when there are 64+ rows)
        every = _run(_rows_model(op, 40, 24, wtype, **kw), use_native, {**feeds, "dense": np.ones(seq, bool)})
        np.testing.assert_allclose(every, x @ w, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=op)
    if use_native:  # one flag per position, or a clear error
        with pytest.raises(Exception, match="one flag per position"):
            _run(_rows_model(onnx_ops.GATED_ROWS, 40, 24, wtype, threshold=thr), True, {**feeds, "dense": dense[:3]})


def _fused_model(n_in: int, outs: list[int], wtype: int, thresholds: list[float], dense_rows: bool) -> bytes:
    n = len(outs)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
              helper.make_tensor_value_info("W", wtype, [n_in, sum(outs)])]
    inputs += [helper.make_tensor_value_info(f"scale{p}", TensorProto.FLOAT, [n_in]) for p in range(n)]
    if dense_rows:
        inputs.append(helper.make_tensor_value_info("dense", TensorProto.BOOL, None))
    ys = [helper.make_tensor_value_info(f"Y{p}", TensorProto.FLOAT, None) for p in range(n)]
    node = helper.make_node(onnx_ops.fused_name(n, dense_rows), [i.name for i in inputs], [y.name for y in ys],
                            domain=onnx_ops.DOMAIN, thresholds=thresholds, splits=outs)
    m = helper.make_model(helper.make_graph([node], "fused", inputs, ys),
                          opset_imports=[helper.make_opsetid("", onnx_ops.OPSET),
                                         helper.make_opsetid(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION)],
                          functions=onnx_ops.functions())
    m.ir_version = 10
    return m.SerializeToString()


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "function"])
@pytest.mark.parametrize("wdtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dense_rows", [False, True], ids=["plain", "dense-rows"])
@pytest.mark.parametrize("shape,n_in,n_out", CASES)
def test_fused_gated_matmul_matches_each_projection(use_native, wdtype, dense_rows, shape, n_in, n_out):
    """FusedGatedMatMul2/3 (weights side by side): each output is what GatedMatMul gives for its own column block,
    scale and threshold; a projection with threshold -inf keeps every channel; one that drops everything gives
    zeros."""
    rng = np.random.default_rng(n_out)
    x = rng.standard_normal(shape).astype(np.float32)
    wtype = TensorProto.FLOAT if wdtype == np.float32 else TensorProto.FLOAT16
    dense = np.resize(np.array([False, True, False]), shape[-2])
    for outs in ([n_out, max(1, n_out // 3)], [n_out, 7, max(1, n_out // 2)]):
        ws = [rng.standard_normal((n_in, o)).astype(wdtype) for o in outs]
        scales = [rng.random(n_in).astype(np.float32) + 0.1 for _ in outs]
        half = [float(np.median(np.abs(x) * s)) for s in scales]
        for thresholds in (half, [-np.inf] + half[1:], half[:-1] + [1e9]):
            feeds = {"X": x, "W": np.concatenate(ws, axis=1), **{f"scale{p}": s for p, s in enumerate(scales)}}
            if dense_rows:
                feeds["dense"] = dense
            got = _run_all(_fused_model(n_in, outs, wtype, thresholds, dense_rows), use_native, feeds)
            assert len(got) == len(outs)
            for p, (w, s, thr) in enumerate(zip(ws, scales, thresholds)):
                _, keep = _reference(x, w, s, threshold=thr)
                if dense_rows:
                    keep = keep | dense[..., :, None]
                ref = (x * keep) @ w.astype(np.float32)
                what = f"projection {p} of {len(outs)}, threshold {thr}"
                np.testing.assert_allclose(got[p], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max() + 1e-5,
                                           err_msg=what)
                if thr == -np.inf and not dense_rows:
                    np.testing.assert_allclose(got[p], x @ w.astype(np.float32), rtol=1e-4,
                                               atol=1e-4 * np.abs(ref).max(), err_msg=what)
                if thr == 1e9 and not dense_rows:
                    assert np.all(got[p] == 0.0), what


@pytest.mark.parametrize("wdtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dense_rows", [False, True], ids=["plain", "dense-rows"])
@pytest.mark.parametrize("rows", [(2, 40), (1, 70)], ids=["batch", "prompt"])
def test_fused_prefill_of_projections_that_nearly_agree(wdtype, dense_rows, rows):
    """Many rows, one scale, thresholds equal or a fraction of a percent apart (TEAL with one sparsity): the
    native kernel runs one product of X and the whole of W, then adds the channels only some projections keep.
    Each output must still be its own projection's gated product."""
    rng = np.random.default_rng(len(rows) + int(dense_rows))
    n_in, outs = 96, [80, 24, 24]
    x = rng.standard_normal((*rows, n_in)).astype(np.float32)
    wtype = TensorProto.FLOAT if wdtype == np.float32 else TensorProto.FLOAT16
    ws = [rng.standard_normal((n_in, o)).astype(wdtype) for o in outs]
    scale = np.ones(n_in, np.float32)
    half = float(np.median(np.abs(x)))
    dense = np.resize(np.array([True, False, False, False]), rows[-1])
    for thresholds in ([half] * 3, [half, half * 1.004, half * 0.997], [-np.inf, half, half * 1.002]):
        feeds = {"X": x, "W": np.concatenate(ws, axis=1), **{f"scale{p}": scale for p in range(3)}}
        if dense_rows:
            feeds["dense"] = dense
        native_out = _run_all(_fused_model(n_in, outs, wtype, thresholds, dense_rows), True, feeds)
        for p, (w, thr) in enumerate(zip(ws, thresholds)):
            keep = np.abs(x) > thr
            if dense_rows:
                keep = keep | dense[:, None]
            ref = (x * keep) @ w.astype(np.float32)
            np.testing.assert_allclose(native_out[p], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max() + 1e-5,
                                       err_msg=f"projection {p}, thresholds {thresholds}")


def _run_all(model: bytes, use_native: bool, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    if use_native:
        so.register_custom_ops_library(str(native.cpu_library()))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("tasks", ["1", "2", "3", "7", "64"])
def test_a_one_row_product_split_into_any_number_of_tasks(tasks, monkeypatch):
    """The native kernels split a one-row product into WINA_TASKS tasks (one per thread of the pool), each a slice
    of the kept channels with a partial result: any count, uneven slices and more tasks than kept channels
    included, gives the reference product; two rows take a task each."""
    monkeypatch.setenv(native.TASKS_ENV, tasks)
    rng = np.random.default_rng(int(tasks))
    for n_in, outs in ((130, [40, 9, 9]), (17, [5, 3])):
        ws = [rng.standard_normal((n_in, o)).astype(np.float32) for o in outs]
        scales = [rng.random(n_in).astype(np.float32) + 0.1 for _ in outs]
        for shape in ((1, 1, n_in), (1, 2, n_in)):
            x = rng.standard_normal(shape).astype(np.float32)
            thresholds = [float(np.median(np.abs(x) * s)) for s in scales]
            feeds = {"X": x, "W": np.concatenate(ws, axis=1), **{f"scale{p}": s for p, s in enumerate(scales)}}
            got = _run_all(_fused_model(n_in, outs, TensorProto.FLOAT, thresholds, False), True, feeds)
            single = _run(_op_model(onnx_ops.GATED, n_in, outs[0], TensorProto.FLOAT, threshold=thresholds[0]),
                          True, {"X": x, "W": ws[0], "scale": scales[0]})
            for p, (w, sc, thr) in enumerate(zip(ws, scales, thresholds)):
                ref, _ = _reference(x, w, sc, threshold=thr)
                tol = {"rtol": 1e-4, "atol": 1e-4 * np.abs(ref).max() + 1e-5}
                np.testing.assert_allclose(got[p], ref, **tol, err_msg=f"fused, projection {p}, {shape}")
                if p == 0:
                    np.testing.assert_allclose(single, ref, **tol, err_msg=f"single, {shape}")


def test_the_task_count_is_checked_and_set_from_the_pool_size(monkeypatch, tmp_path):
    from wina_cli.errors import ConfigError
    from wina_cli.onnx_runtime import make_session

    model = tmp_path / "op.onnx"
    model.write_bytes(_op_model(onnx_ops.GATED, 16, 8, TensorProto.FLOAT, threshold=0.5))
    monkeypatch.delenv(native.TASKS_ENV, raising=False)
    with native.task_count(3):  # wina sizing the pool itself: one task per thread, only while sessions are made
        assert native.os.environ[native.TASKS_ENV] == "3"
    assert native.TASKS_ENV not in native.os.environ
    sess, info = make_session(model, threads=1)
    assert info.native_library and native.TASKS_ENV not in native.os.environ
    feeds = {"X": np.ones((1, 1, 16), np.float32), "W": np.ones((16, 8), np.float32), "scale": np.ones(16, np.float32)}
    np.testing.assert_allclose(sess.run(None, feeds)[0], np.full((1, 1, 8), 16.0))
    for bad in ("0", "abc", "2 ", "100000"):
        monkeypatch.setenv(native.TASKS_ENV, bad)
        with pytest.raises(ConfigError, match="is not a task count"):
            make_session(model)
        # the library reads it when its kernels are made, and refuses it as well
        with pytest.raises(Exception, match="WINA_TASKS"):
            _run(model.read_bytes(), True, feeds)
    monkeypatch.setenv(native.TASKS_ENV, "5")  # a user's own count is kept, whatever the pool
    with native.task_count(2):
        assert native.os.environ[native.TASKS_ENV] == "5"


# -- graphs of every family --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_artifacts(tmp_path_factory):
    from wina_cli.cli import main

    root = tmp_path_factory.mktemp("onnx-families")
    text = root / "calib.txt"
    text.write_text(make_text(6000, 1))
    out = {}
    for fam in FAMILIES:
        src = save_tiny(root / f"src-{fam}", fam)
        art = root / f"art-{fam}"
        with pytest.raises(SystemExit) as e:
            main(["calibrate", "--model", str(src), "--data", str(text), "-o", str(art), *CAL, "--sparsity", "0.5"])
        assert e.value.code == 0
        out[fam] = art
    return out


@pytest.mark.parametrize("dense_first", [0, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_generation_with_a_kv_cache_matches_the_whole_sequence(family, dense_first, family_artifacts):
    """`wina generate`'s torch loop (prefill, then one cached step per token, the gates and the gate policy in
    force) gives the logits a cache-free forward of the whole sequence gives at the same positions."""
    import torch

    from wina_cli.runtime import load_runtime
    from wina_cli.sampling import TokenPicker

    rt = load_runtime(family_artifacts[family])
    assert rt.plan is not None
    rt.artifact.config.setdefault("wina", {})["dense_first"] = dense_first
    seen = []
    greedy = TokenPicker()

    def pick(z):
        seen.append(np.array(z, np.float32))
        return greedy(z)

    prompt = [3, 5, 7, 11, 13]
    new = rt.generate(prompt, 6, pick)
    assert len(new) == 6 and len(seen) == 6
    rt.gateset.set_dense_until(dense_first)
    with torch.no_grad():
        full = rt.model(input_ids=torch.tensor([prompt + new[:-1]]), use_cache=False).logits[0].float().numpy()
    ref = full[len(prompt) - 1:]
    assert np.abs(np.stack(seen) - ref).max() <= 1e-4 * np.abs(ref).max()
    assert new == [int(r.argmax()) for r in ref]


@pytest.mark.parametrize("attention", ["fused", "plain"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_of_every_family_validates(family, attention, family_artifacts, tmp_path):
    """Export validates itself (native kernels and function bodies, prefill + 16 KV-cache steps, past the
    tiny models' sliding windows); here we check what it recorded and that the graph is what it claims."""
    from exporters.onnx.export import export_onnx

    fused_kinds = {onnx_ops.fused_name(n, False) for n in onnx_ops.FUSED_ARITIES}
    # one node per projection (the default), dense and sparse; fused projections too, with fused attention
    fused_too = ((True, True), (False, True)) if attention == "fused" else ()
    for dense, fuse in ((True, False), (False, False)) + fused_too:
        out = tmp_path / f"{'dense' if dense else 'sparse'}-{fuse}"
        m = export_onnx(str(family_artifacts[family]), str(out), dense=dense, attention=attention, fuse=fuse)
        assert m["graph"]["attention"] == attention and m["graph"]["fused"] == fuse
        v = m["validation"]
        assert v["decode_steps"] == 16 and set(v["runs"]) == {"native_kernels", "function_bodies"}
        for run in v["runs"].values():
            assert run["max_rel_delta"] <= v["tolerance_rel"] and run["greedy_mismatches"] == 0
        model = onnx.load(str(out / "model.onnx"))
        kinds = {n.op_type for n in model.graph.node if n.domain == onnx_ops.DOMAIN}
        assert (m["graph"]["gated_ops"] == 0) == dense
        # q/k/v and gate/up: one node each per layer when fused (a fused op, or one MatMul where none is gated)
        assert m["graph"]["fused_ops"] == (2 * m["graph"]["num_layers"] if fuse else 0)
        matmuls = sum(n.op_type == "MatMul" and n.name.split("_")[-2].count("+") > 0 for n in model.graph.node)
        assert m["graph"]["fused_ops"] == matmuls + sum(n.op_type in fused_kinds for n in model.graph.node)
        if dense:
            assert kinds == set()
        elif fuse:
            assert kinds & fused_kinds and kinds <= fused_kinds | {onnx_ops.GATED}
        else:
            assert kinds == {onnx_ops.GATED}
        contrib = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
        assert contrib == ({"GroupQueryAttention", "RotaryEmbedding"} if attention == "fused" else set())
        assert {f.name for f in model.functions} == {onnx_ops.GATED, onnx_ops.TOPK, onnx_ops.GATED_ROWS,
                                                     onnx_ops.TOPK_ROWS} | fused_kinds | {
            onnx_ops.fused_name(n, True) for n in onnx_ops.FUSED_ARITIES}
        names = [i.name for i in model.graph.input]
        assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.0.key" in names
        assert json.loads(dict((p.key, p.value) for p in model.metadata_props)["wina.manifest"])["gates"] == m["gates"]
        onnx.checker.check_model(model)


@pytest.mark.parametrize("attention", ["fused", "plain"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_left_padded_batch_matches_torch(family, attention, family_artifacts, tmp_path):
    """The shorter prompt of a batch left-padded: the graph masks the padding (and, for gemma2, a sliding window
    of 8 that 11 positions cross) as the torch model does, in the prefill and in a KV-cache step after it."""
    import torch

    from exporters.onnx.export import export_onnx
    from wina_cli.onnx_runtime import OnnxDecoder
    from wina_cli.runtime import load_runtime

    art = family_artifacts[family]
    export_onnx(str(art), str(tmp_path / "onnx"), dense=True, attention=attention)
    rt = load_runtime(art, dtype="float32")
    rt.use_plan(None)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, rt.model.config.vocab_size, size=(2, 10))
    mask = np.ones((2, 10), np.int64)
    mask[1, :3] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    dec = OnnxDecoder(tmp_path / "onnx")
    got, cache = dec.run(ids, mask, pos, dec.empty_cache(2))
    nxt = rng.integers(3, rt.model.config.vocab_size, size=(2, 1))
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    pos2 = pos[:, -1:] + 1
    got_step, _ = dec.run(nxt, mask2, pos2, cache)
    t = lambda a: torch.as_tensor(a)
    with torch.no_grad():
        ref = rt.model(input_ids=t(ids), attention_mask=t(mask), position_ids=t(pos)).logits.numpy()
        ref_step = rt.model(input_ids=t(np.concatenate([ids, nxt], 1)), attention_mask=t(mask2),
                            position_ids=t(np.concatenate([pos, pos2], 1))).logits[:, -1:].numpy()
    real = mask.astype(bool)
    scale = np.abs(ref[real]).max()
    assert np.abs(got[real] - ref[real]).max() <= 5e-4 * scale
    assert np.abs(got_step - ref_step).max() <= 5e-4 * scale
    # the padding really matters: the same tokens unpadded give other logits for the padded row
    unpadded, _ = dec.run(ids, np.ones_like(mask), np.broadcast_to(np.arange(10), (2, 10)), dec.empty_cache(2))
    assert np.abs(unpadded[1, -1] - got[1, -1]).max() > 1e-3 * scale


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_shared_kv_buffers_match_a_cache_of_arrays(family, family_artifacts, tmp_path):
    """A fused-attention graph says its KV cache may be one buffer per layer, appended to in place: a left-padded
    batch, prefill then KV-cache steps past the buffers' first capacity (they grow) and past gemma2's sliding
    window, gives the logits and cache of the same graph fed arrays, and a stale cache is refused."""
    from exporters.onnx.export import export_onnx
    from wina_cli.onnx_runtime import KVBuffers, OnnxDecoder

    out = tmp_path / "onnx"
    m = export_onnx(str(family_artifacts[family]), str(out))
    assert m["graph"]["kv_cache"] == "shared-buffer" and m["graph"]["gated_ops"] > 0
    shared, arrays = OnnxDecoder(out), OnnxDecoder(out, shared_cache=False)
    assert shared.shared_cache and not arrays.shared_cache
    rng = np.random.default_rng(5)
    vocab = m["graph"]["vocab_size"]
    ids = rng.integers(3, vocab, size=(2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    a, cache_a = shared.run(ids, mask, pos, shared.empty_cache(2, capacity=7))
    b, cache_b = arrays.run(ids, mask, pos, arrays.empty_cache(2))
    assert isinstance(cache_a, KVBuffers) and isinstance(cache_b, dict)
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 1e-5 * scale
    for step in range(8):  # capacity 7: the buffers grow on the second step
        nxt = rng.integers(3, vocab, size=(2, 1))
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        a, cache_a = shared.run(nxt, mask, pos, cache_a)
        b, cache_b = arrays.run(nxt, mask, pos, cache_b)
        assert np.abs(a - b).max() <= 1e-5 * scale, step
    assert cache_a.capacity >= cache_a.length == mask.shape[1] == 14
    for name in shared.past_names:
        assert np.abs(cache_a.view(name) - cache_b[name]).max() <= 1e-5 * np.abs(cache_b[name]).max()
    with pytest.raises(ValueError, match="a cache serves the step after"):
        shared.run(nxt, mask, pos, cache_a)  # the mask says 14 positions, the cache already holds 14


def test_topk_float16_and_external_data(family_artifacts, tmp_path):
    """A top-k sparse graph with float16 weights, written with external data, validates and runs."""
    from exporters.onnx.export import export_onnx
    from wina_cli.onnx_runtime import OnnxDecoder
    from wina_cli.runtime import load_runtime

    art = family_artifacts["llama"]
    rt = load_runtime(art)
    cfg = json.loads((art / "config.json").read_text())
    cfg["wina"]["mode"] = "topk"  # the same calibration serves top-k gates
    (tmp_path / "topk").mkdir()
    for f in art.iterdir():
        (tmp_path / "topk" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "topk" / "config.json").write_text(json.dumps(cfg))
    from wina_cli.artifact import write_manifest

    manifest = json.loads((art / "wina.json").read_text())
    write_manifest(tmp_path / "topk", {k: v for k, v in manifest.items() if k != "files"})
    out = tmp_path / "onnx"
    m = export_onnx(str(tmp_path / "topk"), str(out), weight_dtype="float16", external_above=0)
    assert m["graph"]["weight_dtype"] == "float16" and m["gates"]["mode"] == "topk"
    assert (out / "model.onnx.data").is_file()
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {n.op_type for n in model.graph.node if n.domain == onnx_ops.DOMAIN} == {onnx_ops.TOPK}
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    ids = np.array([3, 5, 7, 11], np.int64)
    assert len(OnnxDecoder(out).greedy(ids, 4)) == 4
    # the bench's floor of such an export: k 0 everywhere, the external weights linked (one file system here)
    from wina_cli.bench.speed import closed_variant

    floor = closed_variant(out, tmp_path / "floor")
    assert (floor / "model.onnx.data").samefile(out / "model.onnx.data")
    fm = onnx.load(str(floor / "model.onnx"), load_external_data=False)
    assert {helper.get_attribute_value(a) for n in fm.graph.node if n.domain == onnx_ops.DOMAIN
            for a in n.attribute if a.name == "k"} == {0}
    np.testing.assert_allclose(OnnxDecoder(floor).prefill(ids[None])[0],
                               OnnxDecoder(floor, use_native=False).prefill(ids[None])[0], atol=1e-4)
    # the speed bench's byte count: gated weights are read as stored (fp16), plain MatMuls' weights as the
    # float32 ONNX Runtime folds their Cast into
    from wina_cli.bench.speed import weight_bytes

    wb = weight_bytes(out)
    cfg = rt.model.config
    assert wb["lm_head"] == cfg.vocab_size * cfg.hidden_size * 4
    assert wb["layers.0.q"] == cfg.hidden_size * cfg.hidden_size * 2
    del rt


def test_same_inputs_give_the_same_graph(family_artifacts, tmp_path):
    from exporters.onnx.export import export_onnx

    # the same artifact in another folder under another name (another checkout, another CI runner)
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(family_artifacts["qwen2"], moved)
    export_onnx(str(family_artifacts["qwen2"]), str(tmp_path / "a"))
    export_onnx(str(moved), str(tmp_path / "b"))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.onnx" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert str(tmp_path) not in (tmp_path / "a" / "wina_onnx.json").read_text()


def test_without_the_native_library_the_function_bodies_run(family_artifacts, tmp_path, monkeypatch):
    from exporters.onnx.export import export_onnx
    from wina_cli.onnx_runtime import OnnxDecoder

    out = tmp_path / "onnx"
    export_onnx(str(family_artifacts["llama"]), str(out))
    ids = np.array([[3, 5, 7, 11, 13]], np.int64)
    with_native = OnnxDecoder(out)
    assert with_native.info.native_library is not None
    monkeypatch.setenv(native.ENV, "off")
    without = OnnxDecoder(out)
    assert without.info.native_library is None
    a, _, _ = with_native.prefill(ids)
    b, _, _ = without.prefill(ids)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    monkeypatch.setenv(native.ENV, str(tmp_path / "missing.so"))
    broken = OnnxDecoder(out)
    assert broken.info.native_library is None and "could not be loaded" in broken.info.notes[0]
    c, _, _ = broken.prefill(ids)
    np.testing.assert_allclose(c, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())


def test_a_corrupted_graph_fails_validation(family_artifacts, tmp_path, monkeypatch, capsys):
    """A graph whose gates keep the wrong channels (one threshold halved) or whose weights drift must fail the
    export with the validation exit code and leave nothing behind."""
    from exporters.onnx import graph as graph_mod

    real_build = graph_mod.DecoderGraph.build

    def threshold_halved(self):
        m = real_build(self)
        node = next(n for n in m.graph.node if n.domain == onnx_ops.DOMAIN)
        attr = next(a for a in node.attribute if a.name == "threshold")
        attr.f *= 0.5
        return m

    def weight_nudged(self):
        m = real_build(self)
        t = next(t for t in m.graph.initializer if t.name == "lm_head.weight_t")
        arr = onnx.numpy_helper.to_array(t).copy()
        arr[:, 0] *= 1.01
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
        return m

    for corrupt in (threshold_halved, weight_nudged):
        monkeypatch.setattr(graph_mod.DecoderGraph, "build", corrupt)
        out = tmp_path / corrupt.__name__
        code, _, err = run_inproc(["export", family_artifacts["llama"], "--format", "onnx", "-o", out], capsys)
        assert code == 9, err
        assert "drifts from the torch runtime" in " ".join(err.split())
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.partial-*"))


@pytest.fixture(scope="module")
def policy_artifacts(tmp_path_factory):
    from wina_cli.cli import main

    root = tmp_path_factory.mktemp("onnx-policies")
    text = root / "calib.txt"
    text.write_text(make_text(6000, 1))
    src = save_tiny(root / "src", "llama")
    out = {}
    for name, flags in (("first", ["--dense-first", "4"]), ("prompt", ["--dense-prompt"])):
        out[name] = root / name
        with pytest.raises(SystemExit) as e:
            main(["calibrate", "--model", str(src), "--data", str(text), "-o", str(out[name]), *CAL,
                  "--sparsity", "0.5", *flags])
        assert e.value.code == 0
    return out


@pytest.mark.parametrize("fuse", [False, True], ids=["single", "fused"])
@pytest.mark.parametrize("policy", ["first", "prompt"])
def test_gate_policies_export_to_onnx(policy, fuse, policy_artifacts, tmp_path, capsys):
    """A policy artifact exports with the dense-rows ops (validated on export against the torch runtime under
    the same policy); run here, the positions the policy names come out exactly as the dense graph's and the
    others do not."""
    from exporters.onnx.export import export_onnx
    from wina_cli.onnx_runtime import OnnxDecoder

    m = export_onnx(str(policy_artifacts[policy]), str(tmp_path / "sparse"), fuse=fuse)
    export_onnx(str(policy_artifacts[policy]), str(tmp_path / "dense"), dense=True, fuse=fuse)
    pol = m["gates"]["policy"]
    assert (pol["dense_first"], pol["dense_prompt"]) == ((4, False) if policy == "first" else (0, True))
    model = onnx.load(str(tmp_path / "sparse" / "model.onnx"))
    kinds = {n.op_type for n in model.graph.node if n.domain == onnx_ops.DOMAIN}
    if fuse:
        fused_rows = {onnx_ops.fused_name(n, True) for n in onnx_ops.FUSED_ARITIES}
        assert kinds & fused_rows and kinds <= fused_rows | {onnx_ops.GATED_ROWS}
    else:
        assert kinds == {onnx_ops.GATED_ROWS}
    assert ("dense_until" in [i.name for i in model.graph.input]) == (policy == "prompt")
    code, stdout, err = run_inproc(["inspect", tmp_path / "sparse"], capsys)
    want = "policy: first 4 tokens dense" if policy == "first" else "policy: dense prompt (graph input dense_until)"
    assert code == 0 and want in " ".join(stdout.split()), stdout
    for run in m["validation"]["runs"].values():
        assert run["max_rel_delta"] <= m["validation"]["tolerance_rel"] and run["greedy_mismatches"] == 0

    ids = np.array([[3, 5, 7, 11, 13, 17, 19, 23]], np.int64)
    sparse, dense = OnnxDecoder(tmp_path / "sparse"), OnnxDecoder(tmp_path / "dense")
    a, cache_a, mask_a = sparse.prefill(ids)
    b, cache_b, mask_b = dense.prefill(ids)
    n = 4 if policy == "first" else ids.shape[1]
    tol = 1e-5 * np.abs(b).max()
    np.testing.assert_allclose(a[:, :n], b[:, :n], rtol=0, atol=tol)
    if policy == "first":
        assert np.abs(a[:, n:] - b[:, n:]).max() > 100 * tol
    step_a, _, _ = sparse.step(np.array([29]), cache_a, mask_a)
    step_b, _, _ = dense.step(np.array([29]), cache_b, mask_b)
    assert np.abs(step_a - step_b).max() > 100 * tol  # decode is sparse under both policies


def test_a_graph_ignoring_the_policy_fails_validation(policy_artifacts, tmp_path, monkeypatch, capsys):
    from exporters.onnx import graph as graph_mod

    def never_dense(self, q_idx):
        return self.b.op("Less", [q_idx, self.b.op("Squeeze", [self.b.i64(0), self.b.i64(0)])], "dense_rows")

    monkeypatch.setattr(graph_mod.DecoderGraph, "_dense_rows", never_dense)
    out = tmp_path / "onnx"
    code, _, err = run_inproc(["export", policy_artifacts["first"], "--format", "onnx", "-o", out], capsys)
    assert code == 9, err
    assert "drifts from the torch runtime" in " ".join(err.split()) and not out.exists()


def test_the_readmes_code_runs_an_export(family_artifacts, tmp_path, monkeypatch):
    """The README's two snippets for running an export from one's own code work as printed (on a tiny export), and
    the one with ONNX Runtime alone decodes the tokens wina's decoder does."""
    from exporters.onnx.export import export_onnx
    from wina_cli.onnx_runtime import OnnxDecoder

    out = tmp_path / "onnx"
    export_onnx(str(family_artifacts["llama"]), str(out))
    section = (ROOT / "README.md").read_text().split("### Running an export from your own code")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2 and all('"artifacts/smollm2-135m-wina-onnx"' in b for b in blocks)
    monkeypatch.chdir(ROOT)  # the second snippet finds the native library where `make setup` builds it
    done = []
    for code in blocks:
        scope: dict = {}
        exec(code.replace('"artifacts/smollm2-135m-wina-onnx"', repr(str(out))), scope)  # noqa: S102
        done.append(scope)
    assert 1 <= len(done[0]["new"]) <= 24
    assert done[1]["out"] == OnnxDecoder(out).greedy(np.array([1, 2, 3, 4]), 8)


# -- the command line --------------------------------------------------------------------------------------------
def test_cli_export_generate_bench_env(family_artifacts, tmp_path):
    art = family_artifacts["llama"]
    out = tmp_path / "onnx"
    r = run_sub(["export", art, "--format", "onnx", "-o", out, "--json"])
    assert r.returncode == 0, r.stderr
    m = as_json(r.stdout)
    assert m["graph"]["gated_ops"] > 0 and (out / "wina_onnx.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    files = json.loads((out / "wina_onnx.json").read_text())["files"]
    assert "model.onnx" in files and "validation_probe.onnx" not in files

    r = run_sub(["inspect", out, "--json"])
    assert r.returncode == 0, r.stderr
    assert as_json(r.stdout)["manifest"]["graph"]["gated_ops"] == m["graph"]["gated_ops"]

    r = run_sub(["generate", out, "--prompt", "river stone", "-n", "6", "--json"])
    assert r.returncode == 0, r.stderr
    g = as_json(r.stdout)
    assert g["runtime"] == "onnx" and g["new_tokens"] >= 1 and g["native_library"]

    # sampling: the seed decides the text; a tokenizer without a chat template cannot take --chat
    sampled = [as_json(run_sub(["generate", out, "-p", "river stone", "-n", "12", "-t", "1.5", "--top-p", "0.95",
                                "--seed", str(s), "--json"]).stdout) for s in (4, 4, 5)]
    assert sampled[0]["completion"] == sampled[1]["completion"] != sampled[2]["completion"]
    assert sampled[0]["sampling"] == {"greedy": False, "temperature": 1.5, "top_k": 0, "top_p": 0.95, "seed": 4}
    r = run_sub(["generate", out, "-p", "river stone", "--chat"])
    assert r.returncode == 3 and "no chat template" in " ".join(r.stderr.split())

    r = run_sub(["generate", out, "--prompt", "river stone", "-n", "3", "--provider", "cuda"])
    assert r.returncode == 0, r.stderr
    from wina_cli.onnx_runtime import cuda_usable

    if not cuda_usable():
        assert "falling back to CPU" in r.stderr
        r = run_sub(["generate", out, "--prompt", "river", "-n", "3", "--provider", "cuda", "--strict"])
        assert r.returncode == 11 and "--strict" in r.stderr

    r = run_sub(["bench", art, "--onnx", out, "--decode-steps", "4", "--warmup", "1", "--no-kernel", "--profile",
                 "--json"])
    assert r.returncode == 0, r.stderr
    b = as_json(r.stdout)
    # --profile: each export alone under ONNX Runtime's profiler, its node time per step by kind
    from wina_cli.models.adapters import PROJECTIONS

    assert set(b["profile"]) == {"dense", "sparse"}
    for prof in b["profile"].values():
        assert prof["steps"] == 4 and {*PROJECTIONS, "lm_head", "attention", "other"} == set(prof["kinds_ms"])
        assert all(v > 0 for v in prof["kinds_ms"].values()) and prof["outside_ms"] >= 0
        assert sum(prof["kinds_ms"].values()) + prof["outside_ms"] == pytest.approx(prof["run_ms"])
    assert set(b["decode_tokens_per_s"]) == {"dense", "sparse"} and b["decode_tokens_per_s"]["sparse"] > 0
    assert b["kernel"] == [] and 0 < b["realized_sparsity_decode"] < 1
    assert b["prefill_tokens"] == 256 and all(v > 0 for v in b["prefill_ms"].values())
    assert b["weight_bytes_per_token"]["sparse"] < b["weight_bytes_per_token"]["dense"]
    # 4 timed steps in two halves of 2, each after 1 warm-up step, bursts of 8: one burst per half
    spread = b["decode_speedup_per_burst"]
    assert spread["bursts"] == 2 and 0 < spread["min"] <= spread["median"] <= spread["max"]

    r = run_sub(["env", "--json"])
    e = as_json(r.stdout)
    assert e["native_kernels"] and e["native_kernels_load"] is True
    assert isinstance(e["native_tasks_per_call"], int) and 1 <= e["native_tasks_per_call"] <= os.cpu_count()
    assert as_json(run_sub(["env", "--json"], extra_env={native.TASKS_ENV: "3"}).stdout)["native_tasks_per_call"] == 3
    e = as_json(run_sub(["env", "--json"], extra_env={native.TASKS_ENV: "x"}).stdout)
    assert "not a task count" in e["native_tasks_per_call"]
    e = as_json(run_sub(["env", "--json"], extra_env={native.ENV: "off"}).stdout)
    assert e["native_kernels"] is None and e["native_tasks_per_call"] is None


def test_fused_export_is_benched_against_a_fused_dense_graph(family_artifacts, tmp_path):
    """--fuse: q/k/v and gate/up as one node each (weights side by side); the speed bench's own dense reference is
    then fused too, and both count the same weight bytes per projection as unfused graphs do."""
    from wina_cli.bench import speed
    from wina_cli.models.adapters import PROJECTIONS

    art = family_artifacts["llama"]
    r = run_sub(["export", art, "--format", "onnx", "--fuse", "-o", tmp_path / "fused", "--json"])
    assert r.returncode == 0, r.stderr
    g = as_json(r.stdout)["graph"]
    assert g["fused"] is True and g["fused_ops"] == 2 * g["num_layers"]
    r = run_sub(["bench", art, "--onnx", tmp_path / "fused", "--kernel-shapes", "576x", "--json"])
    assert r.returncode == 3 and "576x" in r.stderr and "IN x OUT" in r.stderr  # refused before any decoding
    # the kernel microbenchmark at the model's own projection shapes
    r = run_sub(["bench", art, "--onnx", tmp_path / "fused", "--decode-steps", "2", "--warmup", "1",
                 "--prefill-tokens", "0", "--kernel-shapes", "model", "--kernel-working-set", "0", "--json"])
    assert r.returncode == 0, r.stderr
    b = as_json(r.stdout)
    assert b["fused_projections"] == {"dense": True, "sparse": True}
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(art)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv, h, i = c.num_attention_heads * hd, c.num_key_value_heads * hd, c.hidden_size, c.intermediate_size
    want = sorted({(h, q), (h, kv), (q, h), (h, i), (i, h)})
    assert [tuple(s) for s in b["kernel_shapes"]] == want
    assert sorted({tuple(k["shape"]) for k in b["kernel"]}) == want and len(b["kernel"]) == 6 * len(want)
    r = run_sub(["export", art, "--format", "onnx", "--dense", "-o", tmp_path / "dense", "--json"])
    assert r.returncode == 0 and as_json(r.stdout)["graph"]["fused"] is False
    r = run_sub(["export", art, "--format", "onnx", "-o", tmp_path / "single"])
    assert r.returncode == 0, r.stderr
    assert b["weight_bytes_per_token"]["dense"] == speed.bytes_per_token(speed.weight_bytes(tmp_path / "dense"))
    assert speed.weight_bytes(tmp_path / "fused") == speed.weight_bytes(tmp_path / "single")
    # the profile's kinds: one node per layer for each fused group (or projection), one lm_head, and ONNX
    # Runtime's attention and two rotary ops per layer
    from collections import Counter

    for folder, groups in (("fused", ("q+k+v", "gate+up", "o", "down")), ("single", PROJECTIONS)):
        kinds = Counter(speed.node_kind(n.name, n.op_type) for n in speed.graph_of(tmp_path / folder).graph.node)
        assert all(kinds[k] == g["num_layers"] for k in groups), kinds
        assert kinds["lm_head"] == 1 and kinds["attention"] == 3 * g["num_layers"]
        assert set(kinds) == {*groups, "lm_head", "attention", "other"}
    graph = speed.graph_of(tmp_path / "fused")  # a graph loaded once serves both readers
    assert speed.weight_bytes(graph) == speed.weight_bytes(tmp_path / "fused")
    assert speed.gated_projections(graph) == speed.gated_projections(tmp_path / "fused")

    # --floor: a third export, every gate closed, decoded in the same turns; fused and single name the same
    # gated projections
    gated = speed.gated_projections(tmp_path / "fused")
    assert gated and gated == speed.gated_projections(tmp_path / "single")
    assert gated <= set(speed.weight_bytes(tmp_path / "single"))
    r = run_sub(["bench", art, "--onnx", tmp_path / "fused", "--decode-steps", "2", "--warmup", "1",
                 "--prefill-tokens", "0", "--no-kernel", "--floor", "--json"])
    assert r.returncode == 0, r.stderr
    f = as_json(r.stdout)["breakdown"]
    wb = speed.weight_bytes(tmp_path / "fused")
    assert f["floor_ms"] > 0 and f["dense_bytes"] == sum(wb[p] for p in gated)
    assert 0 < f["gated_bytes"] < f["dense_bytes"]


def test_export_replans_criterion_and_allocation(family_artifacts, tmp_path, capsys):
    """--criterion / --allocation re-plan the gates from the artifact's calibration (validated like any export).
    TEAL scores with a uniform allocation give the projections in a fused node the same score and the same target,
    so one threshold table: the node's thresholds come out (nearly) equal, its scales exactly."""
    from onnx import numpy_helper

    art = family_artifacts["llama"]
    default = json.loads((Path(art) / "wina.json").read_text())["gates"]
    assert (default["criterion"], default["allocation"]) != ("teal", "uniform")
    code, out, err = run_inproc(["export", art, "--format", "onnx", "--fuse", "--criterion", "teal", "--allocation",
                                 "uniform", "-o", tmp_path / "teal", "--json"], capsys)
    assert code == 0, err
    m = as_json(out)
    assert {k: m["gates"][k] for k in ("criterion", "allocation", "target")} == \
        {"criterion": "teal", "allocation": "uniform", "target": default["target"]}
    model = onnx.load(str(tmp_path / "teal" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    fused = [n for n in model.graph.node if n.op_type.startswith("FusedGatedMatMul")]
    assert len(fused) == 2 * m["graph"]["num_layers"]
    for n in fused:
        thr = np.array(next(a.floats for a in n.attribute if a.name == "thresholds"))
        assert np.all(np.isfinite(thr)) and np.ptp(thr) <= 0.1 * thr.mean(), (n.name, thr)
        scales = [inits[s] for s in n.input[2:2 + len(thr)]]
        assert all(np.array_equal(scales[0], s) for s in scales[1:])
    # only the allocation: the criterion stays the artifact's; a target too
    code, out, err = run_inproc(["export", art, "--format", "onnx", "--allocation", "uniform", "--sparsity", "0.3",
                                 "-o", tmp_path / "uni", "--json"], capsys)
    assert code == 0, err
    g = as_json(out)["gates"]
    assert (g["criterion"], g["allocation"], g["target"]) == (default["criterion"], "uniform", 0.3)
    for bad in (["--criterion", "magnitude"], ["--allocation", "even"], ["--dense", "--criterion", "teal"],
                ["--sparsity", "0", "--allocation", "uniform"], ["--format", "safetensors", "--allocation", "uniform"]):
        args = ["export", art, *(["--format", "onnx"] if "--format" not in bad else []), *bad, "-o", tmp_path / "x"]
        code, _, err = run_inproc(args, capsys)
        assert code == 3 and (bad[-2] in err or bad[-1] in err), (bad, err)
        assert not (tmp_path / "x").exists()


def test_the_floor_variant_closes_every_gate_and_nothing_else(family_artifacts, tmp_path):
    """The floor `wina bench --floor` times: the sparse export with every threshold +inf (k 0), all else as
    exported, so the native kernels and the function bodies agree on it, and it computes something else than the
    sparse export."""
    from exporters.onnx.export import export_onnx
    from wina_cli.bench import speed
    from wina_cli.onnx_runtime import ONNX_MODEL, OnnxDecoder

    src = tmp_path / "sparse"
    export_onnx(family_artifacts["llama"], str(src))
    floor = speed.closed_variant(src, tmp_path / "floor")
    a, b = onnx.load(str(src / ONNX_MODEL)), onnx.load(str(floor / ONNX_MODEL))
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    closed = 0
    for na, nb in zip(a.graph.node, b.graph.node, strict=True):
        assert (na.op_type, list(na.input), list(na.output)) == (nb.op_type, list(nb.input), list(nb.output))
        attrs = {x.name: helper.get_attribute_value(x) for x in nb.attribute}
        if nb.domain != onnx_ops.DOMAIN:
            assert na == nb
            continue
        closed += 1
        assert attrs.get("threshold", np.inf) == np.inf and attrs.get("k", 0) == 0
        assert all(t == np.inf for t in attrs.get("thresholds", []))
    assert closed == json.loads((src / "wina_onnx.json").read_text())["graph"]["gated_ops"] > 0
    # the function bodies keep no channel at +inf: a native kernel that still read rows would differ from them
    ids = np.array([[5, 9, 3, 7]])
    want = OnnxDecoder(floor, "cpu", use_native=False).prefill(ids)[0]
    got = OnnxDecoder(floor, "cpu").prefill(ids)[0]
    sparse = OnnxDecoder(src, "cpu").prefill(ids)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(sparse - got).max() > 1e-3


def test_decode_timing_takes_turns_and_times_what_it_says(family_artifacts, tmp_path):
    from exporters.onnx.export import export_onnx
    from wina_cli.bench.speed import round_ratios, time_decode
    from wina_cli.onnx_runtime import OnnxDecoder

    export_onnx(str(family_artifacts["llama"]), str(tmp_path / "onnx"))
    ids = np.array([3, 5, 7, 11], np.int64)
    runs = time_decode({"a": tmp_path / "onnx", "b": tmp_path / "onnx"}, ids, steps=5, warmup=2, burst=3,
                       prefill_ids=np.resize(ids, 32))
    for r in runs.values():
        assert r.prefill_ms > 0
        # 5 timed steps in two halves (3, then 2), each after 2 warm-up steps, in bursts of 3 whose first step
        # is never timed: half one times 1 + 2, half two 1 + 1
        assert r.steps == 5 and r.ms_per_token > 0 and r.peak_rss_mb > 0
        assert len(r.tokens) == 1 + 12  # the prefill's token, then 2 bursts in each half
        assert len(r.round_ms) == 4 and all(ms > 0 for ms in r.round_ms)
    assert runs["a"].tokens == runs["b"].tokens  # the same greedy decode, whichever turn it ran in
    # the second half's sessions resume the decode: the tokens are one uninterrupted greedy decode's
    assert runs["a"].tokens == OnnxDecoder(tmp_path / "onnx", "cpu").greedy(ids, 13)
    ratios = round_ratios(runs["a"], runs["b"])
    assert len(ratios) == 4 and ratios[0] == runs["a"].round_ms[0] / runs["b"].round_ms[0]


def test_decode_timing_reverses_the_turns_and_the_order_sessions_are_made(family_artifacts, tmp_path,
                                                                           monkeypatch):
    from exporters.onnx.export import export_onnx
    from wina_cli.bench import speed

    export_onnx(str(family_artifacts["llama"]), str(tmp_path / "onnx"))
    calls, made = [], []

    class Recording(speed.OnnxDecoder):
        def step(self, *a, **k):
            calls.append(self.label)
            return super().step(*a, **k)

    def make(folder, *a, **k):
        dec = Recording(folder, *a, **k)
        dec.label = Path(folder).name
        made.append(dec.label)
        return dec

    for name in ("a", "b"):
        shutil.copytree(tmp_path / "onnx", tmp_path / name)
    monkeypatch.setattr(speed, "OnnxDecoder", make)
    speed.time_decode({"a": tmp_path / "a", "b": tmp_path / "b"}, np.array([3, 5, 7], np.int64), steps=4, warmup=0,
                      burst=2)
    # a first pass runs each export alone; then the timed halves, whose sessions are made in opposite orders
    assert made == ["a", "b", "a", "b", "b", "a"]
    # warm-up 0: the first pass runs no steps. Bursts of 2 timing one step each, 2 timed steps per half:
    # a b | b a, then b a | a b
    bursts = [calls[i] for i in range(0, len(calls), 2)]
    assert bursts == ["a", "b", "b", "a", "b", "a", "a", "b"]
    assert all(calls[i] == calls[i + 1] for i in range(0, len(calls), 2))


def test_a_quiet_export_does_not_spin(family_artifacts, tmp_path, monkeypatch):
    """The bench's floor takes turns with quiet threads (they sleep when idle), so it does not slow the export
    that runs after it; the two being compared keep ONNX Runtime's default."""
    from exporters.onnx.export import export_onnx
    from wina_cli.bench import speed

    export_onnx(str(family_artifacts["llama"]), str(tmp_path / "onnx"))
    spins, original = {}, speed.OnnxDecoder

    def make(folder, *a, **k):
        dec = original(folder, *a, **k)
        try:
            entry = dec.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: ONNX Runtime's default, spinning
            entry = "default"
        spins.setdefault(Path(folder).name, set()).add(entry)
        return dec

    for name in ("a", "b"):
        shutil.copytree(tmp_path / "onnx", tmp_path / name)
    monkeypatch.setattr(speed, "OnnxDecoder", make)
    speed.time_decode({k: tmp_path / k for k in ("a", "b")}, np.array([3, 5, 7], np.int64), steps=2, warmup=0,
                      burst=2, quiet=frozenset({"b"}))
    assert spins == {"a": {"default"}, "b": {"0"}}


def test_kernel_microbenchmark_reports_ratios():
    from wina_cli.bench.speed import kernel_bench

    rows = kernel_bench(shapes=((256, 384),), sparsities=(0.0, 0.5), reps=3, n_inputs=4)
    chained = kernel_bench(shapes=((256, 384),), sparsities=(0.5,), reps=3, n_inputs=4, working_set_mb=2.0)
    assert chained[0]["copies"] == 6 and rows[0]["copies"] == 1 and chained[0]["speedup"] > 0
    assert [r["sparsity"] for r in rows] == [0.0, 0.5]
    for r in rows:
        assert r["speedup"] > 0 and r["dense_ms"] > 0 and r["ideal"] >= 1.0
    assert abs(rows[1]["realized_sparsity"] - 0.5) < 0.05


def test_kernel_microbenchmark_makes_its_sessions_in_both_orders(monkeypatch):
    """Half the timed rounds run on sessions made dense first, half on sessions made in the reverse order."""
    import onnx
    import onnxruntime as ort

    from wina_cli.bench.speed import kernel_bench

    made, original = [], ort.InferenceSession

    def record(model, *a, **k):
        node = onnx.load_from_string(model).graph.node[0]
        made.append("dense" if node.op_type == "MatMul" else
                    round(float(next(x.f for x in node.attribute if x.name == "threshold")), 6))
        return original(model, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", record)
    kernel_bench(shapes=((64, 96),), sparsities=(0.25, 0.75), reps=8, n_inputs=4)
    assert len(made) == 6 and made[0] == "dense" and made[3:] == made[:3][::-1]
    assert made[1] < made[2]  # sparsity 0.25 before 0.75


def test_kernel_microbenchmark_takes_turns_in_short_bursts(monkeypatch):
    """Each session makes `burst` + 1 calls in a row (the first untimed), every session in every round, and the
    inputs rotate from round to round, so over the run each session sees all of them."""
    import onnxruntime as ort

    from wina_cli.bench.speed import kernel_bench

    calls, original = [], ort.InferenceSession

    class Recorded:
        def __init__(self, *a, **k):
            self.inner, self.id = original(*a, **k), len(made)
            made.append(self)

        def run(self, outputs, feeds):
            calls.append((self.id, float(feeds["X"].ravel()[0])))
            return self.inner.run(outputs, feeds)

    made = []
    monkeypatch.setattr(ort, "InferenceSession", Recorded)
    rows = kernel_bench(shapes=((64, 96),), sparsities=(0.5,), reps=6, n_inputs=4, burst=2)
    assert len(made) == 4 and rows[0]["speedup"] > 0  # dense and sparse, made again for the second half
    runs = [[calls[0][0], 0]]
    for sid, _ in calls:
        if sid == runs[-1][0]:
            runs[-1][1] += 1
        else:
            runs.append([sid, 1])
    # a turn is one untimed call and two timed ones; turns reverse from round to round, so the session that ends
    # one round starts the next: at most two turns in a row
    assert all(n in (3, 6) for _, n in runs), runs
    # 3 timed rounds (2 + 1 over the halves) and a warm-up round per half: 5 turns of 3 calls for each of 2 gates
    assert len(calls) == 5 * 3 * 2
    inputs_seen = {x for sid, x in calls if sid in (0, 1)}
    assert len(inputs_seen) == 4  # the first half alone runs 3 rounds x 3 calls: every input at least once


def test_kernel_microbenchmark_splits_calls_for_the_pool_it_sizes(monkeypatch):
    """`--threads N`: the native kernels' sessions are made with WINA_TASKS=N, one task per thread."""
    import onnxruntime as ort

    from wina_cli.bench.speed import kernel_bench

    seen, original = [], ort.InferenceSession

    def record(model, so, *a, **k):
        seen.append((so.intra_op_num_threads, native.os.environ.get(native.TASKS_ENV)))
        return original(model, so, *a, **k)

    monkeypatch.delenv(native.TASKS_ENV, raising=False)
    monkeypatch.setattr(ort, "InferenceSession", record)
    kernel_bench(shapes=((64, 96),), sparsities=(0.5,), reps=4, n_inputs=4, threads=1)
    assert sorted(seen, key=str) == [(1, "1"), (1, "1"), (1, None), (1, None)]  # the sparse ones, the dense ones
    assert native.TASKS_ENV not in native.os.environ


def test_kernel_shapes_are_read_or_refused():
    from wina_cli.bench.speed import KERNEL_SHAPES, kernel_shapes

    assert kernel_shapes("llama8b") == KERNEL_SHAPES
    assert kernel_shapes("576x576, 1536X576") == ((576, 576), (1536, 576))
    assert kernel_shapes("model", [(8, 4), (4, 8), (8, 4)]) == ((4, 8), (8, 4))
    for bad in ("576", "576x0", "ax5", "576x576,", "4x4x4"):
        with pytest.raises(ValueError, match="IN x OUT"):
            kernel_shapes(bad)
    with pytest.raises(ValueError, match="not known"):
        kernel_shapes("model")


def test_bad_onnx_inputs(family_artifacts, tmp_path, capsys):
    art = family_artifacts["llama"]
    code, _, err = run_inproc(["export", art, "--format", "onnx", "--dtype", "bfloat16", "-o", tmp_path / "x"],
                              capsys)
    assert code == 3 and "bfloat16" in err
    code, _, err = run_inproc(["export", tmp_path / "nope", "--format", "onnx", "-o", tmp_path / "y"], capsys)
    assert code == 8
    code, _, err = run_inproc(["export", art, "--format", "onnx", "--sparsity", "0.95", "-o", tmp_path / "z"],
                              capsys)
    assert code == 3
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "wina_onnx.json").write_text("{}")
    (broken / "model.onnx").write_bytes(b"not a model")
    code, _, err = run_inproc(["generate", broken, "--prompt", "x"], capsys)
    assert code == 8 and "cannot load" in err
    code, _, err = run_inproc(["generate", art, "--prompt", "x", "--provider", "cuda"], capsys)
    assert code == 3
    code, _, err = run_inproc(["bench", art], capsys)
    assert code == 3 and "nothing to benchmark" in err
    # a tampered ONNX export is caught by inspect's checksum check
    import shutil

    from exporters.onnx.export import export_onnx

    out = tmp_path / "onnx"
    export_onnx(str(art), str(out))
    shutil.copytree(out, tmp_path / "onnx-ok")
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    code, _, err = run_inproc(["inspect", out], capsys)
    assert code == 8 and "checksum" in err
    # the speed bench exports its dense reference in a child process; that export's failure is reported with
    # its exit code, and nothing of it is left behind
    import tempfile

    bad_art = tmp_path / "bad-art"
    shutil.copytree(art, bad_art)
    (bad_art / "model.safetensors").write_bytes(b"truncated")
    before = set(Path(tempfile.gettempdir()).glob("wina-dense-*"))
    code, _, err = run_inproc(["bench", bad_art, "--onnx", tmp_path / "onnx-ok", "--no-kernel"], capsys)
    assert code == 8 and "exporting the dense reference graph failed (exit 8)" in " ".join(err.split()), err
    assert set(Path(tempfile.gettempdir()).glob("wina-dense-*")) == before


def test_cuda_library_builds_where_nvcc_exists_and_falls_back_to_cpu(family_artifacts, tmp_path):
    """The CUDA kernel cannot run here (no GPU); what can be checked is that the set-up built it where nvcc exists,
    that it loads, and that its CPU kernels serve a session that asked for CUDA and fell back."""
    import shutil

    from exporters.onnx.export import export_onnx
    from wina_cli.onnx_runtime import OnnxDecoder, cuda_usable

    if shutil.which("nvcc") is None:
        assert native.cuda_library() is None
        return
    assert native.cuda_library() is not None
    out = tmp_path / "onnx"
    export_onnx(str(family_artifacts["llama"]), str(out))
    ids = np.array([[3, 5, 7, 11, 13]], np.int64)
    cpu = OnnxDecoder(out, "cpu")
    cuda = OnnxDecoder(out, "cuda")
    assert cuda.info.native_library == str(native.cuda_library())
    if not cuda_usable():
        assert cuda.info.providers == ["CPUExecutionProvider"] and "falling back" in cuda.info.notes[-1]
        a, _, _ = cpu.prefill(ids)
        b, _, _ = cuda.prefill(ids)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())
