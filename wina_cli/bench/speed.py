"""Speed benchmarks (never timed tests): batch-1 KV-cache decode of a dense vs a sparse ONNX export, and the gated
kernel against ONNX Runtime's dense MatMul at large shapes. Every figure is a ratio against a baseline measured in
the same run, warm-up excluded.
"""
from __future__ import annotations

import gc
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import onnx_ops
from ..memory import peak_rss_mb, reset_peak_rss
from ..onnx_runtime import OnnxDecoder

KERNEL_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # Llama-3-8B: q/o, gate/up, down ([in, out])
KERNEL_SPARSITIES = (0.0, 0.25, 0.5, 0.65, 0.8, 0.9)


def kernel_shapes(spec: str, model_shapes=None) -> tuple[tuple[int, int], ...]:
    """The [in, out] shapes of the kernel microbenchmark: `llama8b` (the default), `model` (the distinct shapes of
    the benchmarked model's projections, `model_shapes`, which the caller supplies), or a list such as
    `576x576,1536x576`. Raises ValueError with the reason."""
    spec = spec.strip()
    if spec == "llama8b":
        return KERNEL_SHAPES
    if spec == "model":
        if not model_shapes:
            raise ValueError("the model's projection shapes are not known here")
        return tuple(sorted({(int(i), int(o)) for i, o in model_shapes}))
    shapes = []
    for part in spec.split(","):
        dims = part.strip().lower().split("x")
        if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"'{part.strip()}' is not a shape IN x OUT such as 576x1536")
        shapes.append((int(dims[0]), int(dims[1])))
    return tuple(shapes)


def in_turns(items: list, round_: int) -> list:
    """The order of a round of turns: as given in even rounds, reversed in odd ones. In op chains a session that
    always took the first turn measured slower than the same session run later."""
    return items if round_ % 2 == 0 else items[::-1]


@dataclass
class DecodeResult:
    label: str
    ms_per_token: float  # median over the timed steps
    tokens_per_s: float
    steps: int  # steps timed (not the first of a burst)
    prefill_ms: float | None  # median prefill of the long prompt, exports taking turns (None: not asked)
    peak_rss_mb: float
    native_library: str | None
    tokens: list[int]
    round_ms: list[float] = field(default_factory=list)  # the median step of each burst that timed any


def round_ratios(base: DecodeResult, other: DecodeResult) -> list[float]:
    """base's step time over other's, burst by burst: the bursts of one round of turns ran a few ms apart, so the
    spread of these ratios shows how much the machine moved the figure within the run."""
    return [a / b for a, b in zip(base.round_ms, other.round_ms)]


def time_decode(folders: dict[str, str | Path], prompt_ids: np.ndarray, steps: int, warmup: int,
                threads: int | None = None, burst: int = 8, prefill_ids: np.ndarray | None = None,
                prefill_rounds: int = 3, quiet: frozenset[str] = frozenset()) -> dict[str, DecodeResult]:
    """Greedy batch-1 decode of each export: `warmup` steps untimed, then until `steps` steps are timed.

    The exports take turns burst by burst (`burst` steps each, the order reversing every round) in one process, so
    drift in the machine's speed, which on a shared VM moves a sequential run by 10-20%, falls on all of them
    alike. The first step of a burst is not timed: the previous export's pool threads may still be spinning on the
    cores. Peak memory is read in a first pass that runs each export alone (prefill and warm-up), where the
    high-water mark is its own.
    The timed steps come in two halves whose sessions are created in opposite orders: the session created first
    ran slower. Session 20, the same export under two labels, created in one order for the whole run: the first
    created was 0-7% slower per token (median 4%, 6 of 6 runs; `wina bench` on such a pair read 1.02-1.03x), so
    `wina bench`, which made the dense export's session first, read in favour of the sparse export. The second
    half's sessions prefill the prompt and every token decoded so far, so the decode continues where the first
    half stopped, over the same context lengths as one run.
    `prefill_ids`, if given, is a longer prompt whose prefill is timed afterwards, exports again taking turns
    (`prefill_rounds` each, after one untimed).
    `quiet`: labels of exports whose threads sleep when idle instead of spinning. ONNX Runtime's threads spin
    for a while after a call, on the cores the next session needs, and a session is slowed by another's spinning,
    not by its own: with three exports in reversed turns the one in the middle always follows another session,
    while the ends follow themselves every other round. A third export that only serves as a reference (the
    floor) is quiet, so it slows neither of the two being compared: with it spinning, the sparse export in the
    middle measured 1.19-1.36x against its dense export where the pair alone measured 1.33-1.41x (4 of 4 lower,
    session 19); quiet, 1.396-1.413x."""
    memory = {}
    # room in a shared KV cache for every step an export runs (timed, both halves' warm-up, untimed first steps)
    capacity = len(prompt_ids) + 2 * (2 * warmup + steps) + 2 * burst
    for label, folder in folders.items():
        gc.collect()
        reset_peak_rss()
        dec = OnnxDecoder(folder, "cpu", threads=threads, spin=label not in quiet)
        logits, cache, mask = dec.prefill(prompt_ids[None, :], capacity=capacity)
        tok = int(logits[0, -1].argmax())
        for _ in range(warmup):
            logits, cache, mask = dec.step(np.array([tok]), cache, mask)
            tok = int(logits[0].argmax())
        memory[label] = peak_rss_mb()
        del dec, cache
    gc.collect()
    labels = list(folders)
    runs = {label: {"tokens": [], "times": [], "bursts": []} for label in labels}
    state = {}
    for order, goal in ((labels, steps - steps // 2), (labels[::-1], steps)):
        state.clear()
        gc.collect()
        for label in order:
            dec = OnnxDecoder(folders[label], "cpu", threads=threads, spin=label not in quiet)
            done = runs[label]["tokens"]
            # the second half's session resumes the decode: the last token is fed by its first step
            ids = np.concatenate([prompt_ids, np.asarray(done[:-1], np.int64)])
            logits, cache, mask = dec.prefill(ids[None, :], capacity=capacity)
            if not done:
                done.append(int(logits[0, -1].argmax()))
            state[label] = {"dec": dec, "cache": cache, "mask": mask}
        ran = 0  # steps each export has run in this half
        while min(len(r["times"]) for r in runs.values()) < goal:
            for label in in_turns(order, ran // burst):
                st, run = state[label], runs[label]
                run["bursts"].append([])
                for i in range(burst):
                    t = time.perf_counter()
                    logits, st["cache"], st["mask"] = st["dec"].step(np.array([run["tokens"][-1]]), st["cache"],
                                                                     st["mask"])
                    dt = time.perf_counter() - t
                    run["tokens"].append(int(logits[0].argmax()))
                    if ran + i >= warmup and i > 0 and len(run["times"]) < goal:
                        run["times"].append(dt)
                        run["bursts"][-1].append(dt)
            ran += burst
    prefill = {label: [] for label in labels}
    if prefill_ids is not None:
        for r in range(prefill_rounds + 1):
            for label in in_turns(labels, r):
                t = time.perf_counter()
                state[label]["dec"].prefill(prefill_ids[None, :])
                if r > 0:
                    prefill[label].append((time.perf_counter() - t) * 1e3)
    out = {}
    for label, run in runs.items():
        med = statistics.median(run["times"])
        out[label] = DecodeResult(label, med * 1e3, 1.0 / med, len(run["times"]),
                                  statistics.median(prefill[label]) if prefill[label] else None, memory[label],
                                  state[label]["dec"].info.native_library, run["tokens"],
                                  [statistics.median(b) * 1e3 for b in run["bursts"] if b])
    state.clear()
    gc.collect()
    return out


# -- where a decode step's time goes, by kind of node -------------------------------------------------------------
# The graph builder names a projection's node n_l{layer}_{projection}_{serial}, a fused one n_l{layer}_q+k+v_{serial},
# and the output head's n_lm_head_{serial} (exporters/onnx/graph.py).
_PROJECTION_NODE = re.compile(r"^n_l\d+_([a-z+]+)_\d+$")
ATTENTION_OPS = ("GroupQueryAttention", "RotaryEmbedding")


def node_kind(name: str, op_type: str) -> str:
    """What a node of wina's decoder graph computes: a projection (q ... down, or a fused group such as q+k+v),
    lm_head, attention (ONNX Runtime's fused attention and rotary ops) or other."""
    from ..models.adapters import PROJECTIONS  # here, not at import: torch must not load before the timed runs

    m = _PROJECTION_NODE.match(name)
    if m and all(p in PROJECTIONS for p in m.group(1).split("+")):
        return m.group(1)
    if name.startswith("n_lm_head_"):
        return "lm_head"
    return "attention" if op_type in ATTENTION_OPS else "other"


def profile_decode(folder: str | Path, prompt_ids: np.ndarray, steps: int, warmup: int,
                   threads: int | None = None) -> dict:
    """ONNX Runtime's profile of one export decoding alone: after the prompt and `warmup` steps, `steps` greedy
    steps, and per step the kernel time of each kind of node (`node_kind`), the run's time (`run_ms`) and what of
    it no node accounts for (`outside_ms`: the executor between nodes). The profiler adds a few us to every node,
    so these figures compare kinds and exports with each other; the timed runs give the speed."""
    with tempfile.TemporaryDirectory(prefix="wina-profile-") as d:
        dec = OnnxDecoder(folder, "cpu", threads=threads, profile_prefix=str(Path(d) / "profile"))
        dec.greedy(prompt_ids, warmup + steps + 1)  # the prompt's run, then warmup + steps decode steps
        events = json.loads(Path(dec.session.end_profiling()).read_text())
        del dec
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-steps:]
    start = runs[0]["ts"]
    kinds: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            k = node_kind(e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", ""))
            kinds[k] = kinds.get(k, 0.0) + e["dur"]
    run_us = sum(e["dur"] for e in runs)
    return {"steps": steps, "run_ms": run_us / steps / 1e3,
            "outside_ms": (run_us - sum(kinds.values())) / steps / 1e3,
            "kinds_ms": {k: v / steps / 1e3 for k, v in kinds.items()}}


def profile_rows(profiles: dict[str, dict]) -> list[tuple[str, dict[str, float]]]:
    """(kind, {export: ms per step}) in reading order: the projections, fused groups, lm_head, attention, other,
    then the executor's time outside the nodes and the whole run."""
    from ..models.adapters import PROJECTIONS

    kinds = set().union(*(p["kinds_ms"] for p in profiles.values()))
    order = [*PROJECTIONS, *sorted(k for k in kinds if "+" in k), "lm_head", "attention", "other"]
    rows = [(k, {e: p["kinds_ms"].get(k, 0.0) for e, p in profiles.items()}) for k in order if k in kinds]
    rows.append(("outside the nodes", {e: p["outside_ms"] for e, p in profiles.items()}))
    rows.append(("the whole run", {e: p["run_ms"] for e, p in profiles.items()}))
    return rows


# -- kernel microbenchmark ---------------------------------------------------------------------------------------
def _op_chain_model(n_in: int, n_out: int, w: np.ndarray, copies: int, threshold: float | None) -> bytes:
    """`copies` independent products of X with as many copies of W (one node each, one output each): a call then
    streams copies x |W| bytes of weights, as a decode step streams every layer's weights once."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1, n_in])
    outs = [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [1, 1, n_out]) for i in range(copies)]
    # distinct values per copy: ONNX Runtime may merge initializers whose bytes are equal
    inits = [numpy_helper.from_array(w * np.float32(1 + i / 1024), f"W{i}") for i in range(copies)]
    opsets = [helper.make_opsetid("", onnx_ops.OPSET)]
    if threshold is None:
        nodes = [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"]) for i in range(copies)]
        functions = []
    else:
        inits.append(numpy_helper.from_array(np.ones(n_in, np.float32), "scale"))
        nodes = [helper.make_node(onnx_ops.GATED, ["X", f"W{i}", "scale"], [f"Y{i}"], domain=onnx_ops.DOMAIN,
                                  threshold=threshold) for i in range(copies)]
        opsets.append(helper.make_opsetid(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION))
        functions = onnx_ops.functions()
    g = helper.make_graph(nodes, "kernel", [x], outs, initializer=inits)
    m = helper.make_model(g, opset_imports=opsets, functions=functions)
    m.ir_version = 10
    return m.SerializeToString()


def kernel_bench(shapes=KERNEL_SHAPES, sparsities=KERNEL_SPARSITIES, reps: int = 64, n_inputs: int = 16,
                 seed: int = 0, threads: int | None = None, working_set_mb: float = 0.0, burst: int = 4,
                 log=lambda m: None) -> list[dict]:
    """Gated GEMV vs ONNX Runtime's dense MatMul, fp32 weights [in, out], batch 1, per product.

    With `working_set_mb` (`wina bench` passes 512), each session multiplies by enough distinct copies of W that
    one call streams at least that many MB of weights, as a decode step streams every layer's weights from
    memory; with 0 one matrix is called again and again, and on a machine whose last-level cache holds hundreds
    of MB (one reported 480 MB) the smaller shapes are then read from that cache, by both kernels alike. Inputs
    cycle over `n_inputs` random vectors so the kept rows change from call to call, and the dense and sparse
    sessions take turns, `burst` timed calls each, so drift in the machine's speed hits all alike. Short bursts:
    the memory bandwidth of these shared machines moves in periods of a second or so (four dense sessions of
    14336 x 4096 in turns read 28-40 GB/s in one round of 14 calls each and 41-48 GB/s, all four, in another,
    session 22), and with bursts of 16 calls (a round of six sessions of the large shapes took seconds) a fast
    period could fall on one session's bursts: one run's dense 14336 x 4096 read 46 GB/s, 30.8 in the run
    before."""
    import onnxruntime as ort

    from .. import native

    lib = native.cpu_library()
    if lib is None:
        return []
    rng = np.random.default_rng(seed)
    rows = []
    for n_in, n_out in shapes:
        w = (rng.standard_normal((n_in, n_out), dtype=np.float32) * 0.02).astype(np.float32)
        copies = max(1, int(np.ceil(working_set_mb * 1e6 / w.nbytes)))
        xs = [rng.standard_normal((1, 1, n_in), dtype=np.float32) for _ in range(n_inputs)]
        pooled = np.abs(np.concatenate([x.ravel() for x in xs]))
        thresholds = [float(np.quantile(pooled, s)) if s > 0 else -1.0 for s in sparsities]

        def make(thr):
            so = ort.SessionOptions()
            # Several sessions are alive at once, each with its own pool: idle workers must sleep, not spin on
            # the cores the running session needs.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if threads:
                so.intra_op_num_threads = threads
            if thr is None:
                return ort.InferenceSession(_op_chain_model(n_in, n_out, w, copies, thr), so,
                                            providers=["CPUExecutionProvider"])
            so.register_custom_ops_library(str(lib))
            with native.task_count(threads):  # the kernels split a call into one task per thread of the pool
                return ort.InferenceSession(_op_chain_model(n_in, n_out, w, copies, thr), so,
                                            providers=["CPUExecutionProvider"])

        # Rounds of bursts: each session in turn makes one untimed call (the previous session's pool threads may
        # still be busy on the same cores), then `burst` timed ones, the inputs taken in rotation. Two halves
        # whose sessions are made in opposite orders, as in time_decode: in a decode, the session made first ran
        # slower.
        gates = (None, *thresholds)
        order = list(range(len(gates)))
        times = [[] for _ in gates]
        rounds = max(2, -(-reps // burst))
        calls = 0
        for half_order, half_rounds in ((order, rounds - rounds // 2), (order[::-1], rounds // 2)):
            sessions = [None] * len(gates)
            for i in half_order:
                sessions[i] = make(gates[i])
            for r in range(-1, half_rounds):  # round -1 warms up
                for i in in_turns(half_order, r):
                    sess = sessions[i]
                    for j in range(burst + 1):
                        x = xs[(calls + j) % len(xs)]
                        t = time.perf_counter()
                        sess.run(None, {"X": x})
                        if r >= 0 and j >= 1:
                            times[i].append((time.perf_counter() - t) / copies)
                calls += burst + 1
            del sessions, sess
            gc.collect()
        dense_ms = statistics.median(times[0]) * 1e3
        for s, thr, ts in zip(sparsities, thresholds, times[1:]):
            ms = statistics.median(ts) * 1e3
            realized = float((pooled <= thr).mean())
            row = {"shape": [n_in, n_out], "sparsity": s, "realized_sparsity": round(realized, 4),
                   "dense_ms": round(dense_ms, 4), "sparse_ms": round(ms, 4), "speedup": round(dense_ms / ms, 3),
                   "ideal": round(1.0 / (1.0 - realized), 3), "copies": copies,
                   "sparse_gb_per_s": round(n_in * n_out * 4 * (1 - realized) / (ms / 1e3) / 1e9, 2),
                   "dense_gb_per_s": round(n_in * n_out * 4 / (dense_ms / 1e3) / 1e9, 2)}
            log(f"kernel {n_in}x{n_out} at {s:.2f}: {row['speedup']:.2f}x (ideal {row['ideal']:.2f}x)")
            rows.append(row)
        gc.collect()
    return rows


def graph_of(export) -> "onnx.ModelProto":
    """An export's graph without its weight data (an export folder, or a graph already loaded, as is)."""
    import onnx

    from ..onnx_runtime import ONNX_MODEL

    if isinstance(export, onnx.ModelProto):
        return export
    return onnx.load(str(Path(export) / ONNX_MODEL), load_external_data=False)


def weight_bytes(folder) -> dict[str, int]:
    """Bytes of the weights a decode step multiplies by, grouped: per projection name `layers.L.P`, `lm_head`,
    and `basis` (the transform's shortcut and post-norm rotations). Embedding rows are gathered, not read whole.
    A float16 weight that feeds a Cast (a plain MatMul's) counts as float32: ONNX Runtime folds the Cast when it
    loads the model, so that MatMul reads float32; the native kernels read float16 as stored."""
    import onnx

    m = graph_of(folder)
    cast_inputs = {n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    widths = _fused_widths(m)
    out: dict[str, int] = {}
    for t in m.graph.initializer:
        half = t.data_type == onnx.TensorProto.FLOAT16 and t.name not in cast_inputs
        n = int(np.prod(t.dims)) * (2 if half else 4)
        if t.name.endswith(".weight_t") and t.name.startswith("layers."):
            name = t.name[: -len(".weight_t")]
            if "+" in name:  # projections side by side (a fused node): each one's columns
                _, l, tag = name.split(".")
                w = widths[t.name]
                for p, wp in zip(tag.split("+"), w):
                    out[f"layers.{l}.{p}"] = n * wp // sum(w)
            else:
                out[name] = n
        elif t.name == "lm_head.weight_t":
            out["lm_head"] = n
        elif ".shortcut_" in t.name or ".post_rot_" in t.name:
            out["basis"] = out.get("basis", 0) + n
    return out


def _fused_widths(m) -> dict[str, list[int]]:
    """Weights of projections side by side: their widths, from the fused op's `splits` or the Split after a dense
    graph's MatMul."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in m.graph.initializer}
    producer_of = {o: n for n in m.graph.node for o in n.output}
    widths = {}
    for n in m.graph.node:
        if n.domain == onnx_ops.DOMAIN and n.op_type.startswith("FusedGatedMatMul"):
            widths[n.input[1]] = list(next(helper.get_attribute_value(a) for a in n.attribute if a.name == "splits"))
        elif n.op_type == "Split" and n.input[0] in producer_of and producer_of[n.input[0]].op_type == "MatMul":
            w = producer_of[n.input[0]].input[1]
            w = producer_of[w].input[0] if w in producer_of and producer_of[w].op_type == "Cast" else w
            if w.endswith(".weight_t") and len(n.input) > 1 and n.input[1] in inits:
                widths[w] = [int(v) for v in numpy_helper.to_array(inits[n.input[1]])]
    return widths


# -- where a decode step's time goes ------------------------------------------------------------------------------
def closed_variant(folder: str | Path, out: str | Path) -> Path:
    """A copy of a sparse export with every gate closed (thresholds +inf, k 0). Each gated op is still called but
    reads no weight row, so its decode step is the floor that gating cannot lower: lm_head, attention, norms, the
    projections left dense, and the gated ops' own calls. Its outputs are meaningless; it exists to be timed."""
    import onnx

    from ..onnx_runtime import ONNX_MODEL

    folder = Path(folder)
    m = graph_of(folder)  # a fresh load, changed below
    for n in m.graph.node:
        if n.domain != onnx_ops.DOMAIN:
            continue
        for a in n.attribute:
            if a.name == "threshold":
                a.f = float("inf")
            elif a.name == "thresholds":
                a.floats[:] = [float("inf")] * len(a.floats)
            elif a.name == "k":
                a.i = 0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Weights kept beside the graph are hard-linked (copied across file systems), never loaded: the variant of a
    # model larger than memory costs no memory. Not a symbolic link: ONNX Runtime refuses external data whose
    # resolved path leaves the model's folder.
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            name = next(e.value for e in t.external_data if e.key == "location")
            dst = out / name
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(folder / name, dst)
                except OSError:
                    shutil.copyfile(folder / name, dst)
    onnx.save_model(m, str(out / ONNX_MODEL))
    return out


def gated_projections(folder) -> set[str]:
    """The projections (`layers.L.P`, the names of `weight_bytes`) that an export computes with gated ops."""
    m = graph_of(folder)
    names = set()
    for n in m.graph.node:
        if n.domain == onnx_ops.DOMAIN and n.input[1].endswith(".weight_t"):
            _, layer, tag = n.input[1][: -len(".weight_t")].split(".")
            names.update(f"layers.{layer}.{p}" for p in tag.split("+"))
    return names


def time_breakdown(dense_ms: float, sparse_ms: float, floor_ms: float, wbytes: dict[str, int], gated: set[str],
                   realized) -> dict:
    """What the floor says of the two decode steps: the gated rows' time (sparse - floor) and the same
    projections' time in the dense export (dense - floor; the floor also holds the closed ops' calls, so this
    slightly under-counts the dense side), each with the weight bytes it read; and the speedups the gated rows
    would allow if read at the dense side's rate (floor + dense part x kept / full bytes) and if read for free."""
    full = {k: v for k, v in wbytes.items() if k in gated}
    kept, total = bytes_per_token(full, realized), float(sum(full.values()))
    dense_part, gated_part = dense_ms - floor_ms, sparse_ms - floor_ms
    rate = lambda b, ms: b / (ms / 1e3) / 1e9 if ms > 0 else None  # noqa: E731 - a formula, named once
    return {"floor_ms": floor_ms, "gated_ms": gated_part, "gated_bytes": kept, "gated_gb_per_s": rate(kept, gated_part),
            "dense_ms": dense_part, "dense_bytes": total, "dense_gb_per_s": rate(total, dense_part),
            "speedup_at_dense_rate": dense_ms / (floor_ms + max(dense_part, 0.0) * kept / max(total, 1.0)),
            "speedup_free_rows": dense_ms / floor_ms}


def bytes_per_token(wbytes: dict[str, int], realized=None) -> float:
    """Weight bytes one decode step reads; `realized` [L, 7] (projection order of PROJECTIONS) discounts the rows
    of dropped channels."""
    from ..models.adapters import PROJECTIONS

    total = 0.0
    for name, n in wbytes.items():
        frac = 1.0
        if realized is not None and name.startswith("layers."):
            _, l, p = name.split(".")
            frac = 1.0 - float(realized[int(l), PROJECTIONS.index(p)])
        total += n * frac
    return total


def realized_on_decode(rt, prompt_ids: np.ndarray, tokens: list[int]):
    """[L, 7] sparsity the torch runtime's gates realize on the decoded positions only (the prompt's counts are
    measured separately and subtracted)."""
    import torch

    from ..models.adapters import PROJECTIONS

    def counts(ids):
        rt.gateset.counting(True)
        with torch.no_grad():
            rt.model(input_ids=torch.as_tensor(ids)[None], use_cache=False)
        c = [[(segs[p].counter.kept, segs[p].counter.total) for p in PROJECTIONS] for segs in rt.gateset.segments]
        rt.gateset.counting(False)
        return np.array(c, dtype=np.float64)

    full = counts(np.concatenate([prompt_ids, np.asarray(tokens[:-1], dtype=np.int64)]))
    pre = counts(prompt_ids)
    kept, total = full[..., 0] - pre[..., 0], full[..., 1] - pre[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - kept / np.maximum(total, 1), 0.0)
