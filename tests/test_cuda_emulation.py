"""The CUDA kernel's code, run on the CPU. No machine wina is built or tested on has a GPU, so the kernel cannot
run as CUDA here; tests/cuda_emulation/ compiles the very kernel source (wina_ops_cuda_kernel.cuh) with g++
against a few lines that stand in for CUDA (every thread of a block an OS thread, __syncthreads a barrier), and
these tests hold its output to the ops' definition: Y_p = (X where |X| * scale_p > threshold_p or the row's
position is flagged dense, else 0) @ W[:, block p], or for top-k X where its score is among the row's k highest
(ties to the lower index). This checks the kernels' indexing, their tiling of the input channels, partial column
blocks, gating, top-k selection, fused projections, gate policies, float16 weights and the chunking of rows over
launches; not speed, and not what only the hardware does."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent / "cuda_emulation"
KERNEL = Path(__file__).parents[1] / "wina_cli" / "native" / "wina_ops_cuda_kernel.cuh"


def build(folder: Path, kernel_dir: Path) -> Path:
    exe = folder / "run_gated_gemv"
    cxx = shutil.which("g++")
    assert cxx, "g++ is needed (the set-up's native build needs it too)"
    p = subprocess.run([cxx, "-O1", "-std=c++20", "-pthread", "-Wall", "-Werror", "-I", str(kernel_dir),
                        "-I", str(KERNEL.parent), "-o", str(exe), str(HERE / "run_gated_gemv.cc")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("cuda-emulation"), KERNEL.parent)


def run_kernel(exe: Path, folder: Path, x, w, scales, thresholds, splits, dense=None, max_grid_rows=65535, k=-1):
    """x [rows, in] (rows position-major as X [batch, seq, in] flattens), w [in, sum(splits)]; one scale and
    threshold per split; dense: one flag per position, or None; k >= 0: top-k (one split; returns the outputs and
    the kept-channel mask the selection wrote)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, n_in = x.shape
    x.astype(np.float32).tofile(folder / "x.bin")
    w.tofile(folder / "w.bin")
    for p, s in enumerate(scales):
        s.astype(np.float32).tofile(folder / f"scale{p}.bin")
    if dense is not None:
        np.asarray(dense, np.uint8).tofile(folder / "dense.bin")
    args = [str(exe), str(folder), str(rows), str(n_in), "1" if w.dtype == np.float16 else "0", str(max_grid_rows),
            str(0 if dense is None else len(dense)), str(k), str(len(splits)), *map(str, splits),
            *(repr(float(np.float32(t))) for t in thresholds)]
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ys = [np.fromfile(folder / f"y{p}.bin", dtype=np.float32).reshape(rows, s) for p, s in enumerate(splits)]
    if k >= 0:
        return ys, np.fromfile(folder / "keep.bin", dtype=np.uint8).reshape(rows, n_in)
    return ys


def definition(x, w, scales, thresholds, splits, dense=None):
    """Each block's product in float64 and its keep mask."""
    rows = np.arange(x.shape[0])
    dense_row = np.zeros(x.shape[0], bool) if dense is None else np.asarray(dense, bool)[rows % len(dense)]
    out, masks, c0 = [], [], 0
    for s, t, n in zip(scales, thresholds, splits):
        keep = (np.abs(x) * s > np.float32(t)) | dense_row[:, None]
        out.append((x * keep).astype(np.float64) @ w[:, c0:c0 + n].astype(np.float64))
        masks.append(keep)
        c0 += n
    return out, masks


def check(got, x, w, scales, thresholds, splits, dense=None, what=""):
    want, masks = definition(x, w, scales, thresholds, splits, dense)
    c0 = 0
    for p, (g, y, keep, n) in enumerate(zip(got, want, masks, splits)):
        assert not np.isnan(g).any(), f"{what}, block {p}: outputs left unwritten"
        bound = np.abs(x * keep).astype(np.float64) @ np.abs(w[:, c0:c0 + n].astype(np.float64))  # rounding scale
        assert np.all(np.abs(g - y) <= 1e-5 * bound + 1e-30), f"{what}, block {p}"
        c0 += n
    return masks


def operands(rng, rows, n_in, width, wdtype, n_scales=1):
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    x[:, ::7] = 0.0  # exact zeros: dropped even at threshold 0
    w = rng.standard_normal((n_in, width)).astype(wdtype)
    if wdtype == np.float16:  # float16 edge values: subnormal, negative zero, the largest finite
        w.flat[:3] = np.array([6e-8, -0.0, 65504.0], dtype=np.float16)
    return x, w, [(rng.random(n_in) + 0.1).astype(np.float32) for _ in range(n_scales)]


@pytest.mark.parametrize("wdtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,n_in,n_out,max_grid_rows", [
    (1, 64, 96, 65535),     # a decode step: one row, one partial column block, one tile
    (3, 1500, 300, 65535),  # two tiles of input channels, the second partial; two column blocks, the second partial
    (5, 200, 512, 2),       # rows over three launches of at most 2 rows (the grid's 65535-row limit, scaled down)
    (2, 2048, 256, 65535),  # whole tiles and whole column blocks
])
def test_gated_matmul(emulator, tmp_path, wdtype, rows, n_in, n_out, max_grid_rows):
    rng = np.random.default_rng(n_in + rows)
    x, w, scales = operands(rng, rows, n_in, n_out, wdtype)
    score = np.abs(x) * scales[0]
    for t, what in ((0.0, "threshold 0"), (float(np.median(score)), "about half kept"),
                    (float(np.quantile(score, 0.9)), "about a tenth kept"), (1e30, "every channel dropped")):
        got = run_kernel(emulator, tmp_path / what.replace(" ", "-"), x, w, scales, [t], [n_out],
                         max_grid_rows=max_grid_rows)
        (keep,) = check(got, x, w, scales, [t], [n_out], what=what)
        if t == 1e30:
            assert not keep.any() and np.all(got[0] == 0.0)
        if t == 0.0:
            assert 0 < keep.mean() < 1  # the zeros were dropped, everything else kept


@pytest.mark.parametrize("wdtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits", [(100, 37, 37), (300, 300)], ids=["qkv", "gate-up"])
def test_fused_projections(emulator, tmp_path, wdtype, splits):
    """FusedGatedMatMulN: blocks whose edges fall inside a warp and a thread block, each with its own scale and
    threshold, one of them -inf (a projection left dense)."""
    rng = np.random.default_rng(len(splits))
    x, w, scales = operands(rng, 3, 1100, sum(splits), wdtype, n_scales=len(splits))
    thresholds = [float(np.median(np.abs(x) * s)) for s in scales]
    thresholds[-1] = float("-inf")
    got = run_kernel(emulator, tmp_path, x, w, scales, thresholds, list(splits))
    masks = check(got, x, w, scales, thresholds, list(splits), what="fused")
    assert masks[-1].all() and 0.3 < masks[0].mean() < 0.7
    assert (masks[0] != masks[1]).any()  # the blocks really were gated apart


@pytest.mark.parametrize("splits", [(96,), (64, 80, 80)], ids=["single", "fused"])
def test_dense_rows(emulator, tmp_path, splits):
    """The DenseRows variants: rows at flagged positions keep every channel, the others are gated; rows are
    position-major (X [batch, seq, in]), over chunked launches."""
    rng = np.random.default_rng(7)
    seq, batch = 5, 2
    x, w, scales = operands(rng, batch * seq, 700, sum(splits), np.float32, n_scales=len(splits))
    thresholds = [float(np.median(np.abs(x) * s)) for s in scales]
    dense = [True, True, False, False, True]
    got = run_kernel(emulator, tmp_path, x, w, scales, thresholds, list(splits), dense=dense, max_grid_rows=3)
    masks = check(got, x, w, scales, thresholds, list(splits), dense=dense, what="dense rows")
    flagged = np.tile(dense, batch)
    assert masks[0][flagged].all() and not masks[0][~flagged].all()


def topk_definition(x, scale, k, dense_row):
    """The k highest |x| * scale of each row, ties to the lower index (ONNX TopK, the CPU kernel); every channel of
    a dense row."""
    score = np.abs(x) * scale
    keep = np.zeros(x.shape, bool)
    for r in range(x.shape[0]):
        order = np.lexsort((np.arange(x.shape[1]), -score[r]))  # by score descending, then index ascending
        keep[r, order[:max(0, min(k, x.shape[1]))]] = True
    keep[dense_row] = True
    return keep


@pytest.mark.parametrize("wdtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_topk(emulator, tmp_path, wdtype):
    """TopKMatMul[DenseRows]: the selection over several tiles of 256 channels and four radix passes, with many
    tied scores (values on a coarse grid, one scale), every k from none to all, rows over chunked launches."""
    rng = np.random.default_rng(11)
    rows, n_in, n_out = 6, 1300, 70
    x = (np.round(rng.standard_normal((rows, n_in)) * 4) / 4).astype(np.float32)  # a few dozen distinct values
    x[:, ::5] = 0.0
    w = rng.standard_normal((n_in, n_out)).astype(wdtype)
    scale = np.full(n_in, 0.5, np.float32)
    score = np.abs(x) * scale
    assert len(np.unique(score)) < 40
    for k in (0, 1, 7, n_in // 3, n_in // 2, n_in - 1, n_in, n_in + 5):
        for dense in (None, [True, False, False]):
            dense_row = np.zeros(rows, bool) if dense is None else np.tile(dense, rows // 3)
            want_keep = topk_definition(x, scale, k, dense_row)
            got, keep = run_kernel(emulator, tmp_path / f"k{k}-{dense is not None}", x, w, [scale], [0.0], [n_out],
                                   dense=dense, max_grid_rows=4, k=k)
            assert np.array_equal(keep.astype(bool), want_keep), f"k={k}, dense={dense}"
            if 0 < k < n_in:  # the k-th score is shared by channels the selection had to split by index
                sparse = ~dense_row
                tied = score[sparse] == -np.sort(-score[sparse], axis=1)[:, [k - 1]]
                assert ((tied & keep[sparse].astype(bool)).sum(1) < tied.sum(1)).any(), k
            want = (x * want_keep).astype(np.float64) @ w.astype(np.float64)
            bound = np.abs(x * want_keep).astype(np.float64) @ np.abs(w.astype(np.float64))
            assert np.all(np.abs(got[0] - want) <= 1e-5 * bound + 1e-30), f"k={k}, dense={dense}"


def test_a_wrong_kernel_is_caught(tmp_path):
    """The harness can fail: a copy of the kernel that indexes the weights within a tile as if every tile were the
    first gives a product these tests reject."""
    source = KERNEL.read_text()
    assert source.count("(base + t) * a.width + j") == 1
    (tmp_path / KERNEL.name).write_text(source.replace("(base + t) * a.width + j", "t * a.width + j"))
    exe = build(tmp_path, tmp_path)
    rng = np.random.default_rng(0)
    x, w, scales = operands(rng, 2, 1500, 40, np.float32)
    got = run_kernel(exe, tmp_path / "run", x, w, scales, [0.0], [40])
    want, _ = definition(x, w, scales, [0.0], [40])
    assert np.abs(got[0] - want[0]).max() > 1.0
