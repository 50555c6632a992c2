"""The CUDA kernel's code, run on the CPU. No machine wina is built or tested on has a GPU, so the kernel cannot
run as CUDA here; tests/cuda_emulation/ compiles the very kernel source (wina_ops_cuda_kernel.cuh) with g++
against a few lines that stand in for CUDA (every thread of a block an OS thread, __syncthreads a barrier), and
these tests hold its output to the op's definition: Y = (X where |X| * scale > threshold, else 0) @ W. This
checks the kernel's indexing, its tiling of the input channels, its partial column block, its gating, its float16
weights and its chunking of rows over launches; not speed, and not what only the hardware does."""
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
    p = subprocess.run([cxx, "-O1", "-std=c++20", "-pthread", "-Wall", "-Werror", "-I", str(kernel_dir), "-o",
                        str(exe), str(HERE / "run_gated_gemv.cc")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("cuda-emulation"), KERNEL.parent)


def run_kernel(exe: Path, folder: Path, x: np.ndarray, w: np.ndarray, scale: np.ndarray, threshold: float,
               max_grid_rows: int = 65535) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rows, n_in = x.shape
    n_out = w.shape[1]
    x.astype(np.float32).tofile(folder / "x.bin")
    w.tofile(folder / "w.bin")
    scale.astype(np.float32).tofile(folder / "scale.bin")
    args = [str(exe), str(folder), str(rows), str(n_in), str(n_out), repr(float(np.float32(threshold))),
            "1" if w.dtype == np.float16 else "0", str(max_grid_rows)]
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return np.fromfile(folder / "y.bin", dtype=np.float32).reshape(rows, n_out)


def definition(x, w, scale, threshold):
    keep = np.abs(x) * scale > np.float32(threshold)
    return (x * keep).astype(np.float64) @ w.astype(np.float64), keep


@pytest.mark.parametrize("wdtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,n_in,n_out,max_grid_rows", [
    (1, 64, 96, 65535),     # a decode step: one row, one partial column block, one tile
    (3, 1500, 300, 65535),  # two tiles of input channels, the second partial; two column blocks, the second partial
    (5, 200, 512, 2),       # rows over three launches of at most 2 rows (the grid's 65535-row limit, scaled down)
    (2, 2048, 256, 65535),  # whole tiles and whole column blocks
])
def test_the_cuda_kernel_computes_the_gated_product(emulator, tmp_path, wdtype, rows, n_in, n_out, max_grid_rows):
    rng = np.random.default_rng(n_in + rows)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    x[:, ::7] = 0.0  # exact zeros: dropped even at threshold 0
    w = rng.standard_normal((n_in, n_out)).astype(wdtype)
    if wdtype == np.float16:  # float16 edge values: subnormal, negative zero, the largest finite
        w.flat[:3] = np.array([6e-8, -0.0, 65504.0], dtype=np.float16)
    scale = (rng.random(n_in) + 0.1).astype(np.float32)
    score = np.abs(x) * scale
    for threshold, what in ((0.0, "threshold 0"), (float(np.median(score)), "about half kept"),
                            (float(np.quantile(score, 0.9)), "about a tenth kept"), (1e30, "every channel dropped")):
        want, keep = definition(x, w, scale, threshold)
        got = run_kernel(emulator, tmp_path / f"{threshold:g}", x, w, scale, threshold, max_grid_rows)
        assert not np.isnan(got).any(), f"{what}: outputs left unwritten"
        scale_of = np.abs(x * keep).astype(np.float64) @ np.abs(w.astype(np.float64))  # bound on rounding
        assert np.all(np.abs(got - want) <= 1e-5 * scale_of + 1e-30), what
        if threshold == 1e30:
            assert not keep.any() and np.all(got == 0.0)
        if threshold == 0.0:
            assert 0 < keep.mean() < 1  # the zeros were dropped, everything else kept


def test_a_wrong_kernel_is_caught(tmp_path):
    """The harness can fail: a copy of the kernel that indexes the weights within a tile as if every tile were the
    first gives a product these tests reject."""
    source = KERNEL.read_text()
    assert source.count("(base + t) * out + j") == 1
    (tmp_path / KERNEL.name).write_text(source.replace("(base + t) * out + j", "t * out + j"))
    exe = build(tmp_path, tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1500)).astype(np.float32)
    w = rng.standard_normal((1500, 40)).astype(np.float32)
    scale = np.ones(1500, np.float32)
    want, _ = definition(x, w, scale, 0.0)
    got = run_kernel(exe, tmp_path / "run", x, w, scale, 0.0)
    assert np.abs(got - want).max() > 1.0
