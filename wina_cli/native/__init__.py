"""wina's native kernels for ONNX Runtime: where the built library is, and whether it can be used.

The library is built by the set-up (`make native`, part of `make setup`) from wina_ops.cc against ONNX Runtime's
headers (scripts/fetch_ort_headers.sh). `WINA_NATIVE_LIB` points at another build; `WINA_NATIVE_LIB=off`
disables the native kernels, so the graph's standard-op function bodies run instead. `WINA_TASKS` sets how many
tasks the kernels split a one-row product into (one per thread of ONNX Runtime's intra-op pool; by default the
library counts the physical cores, which is the pool's default size); wina sets it itself when it sizes the pool.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_LIBRARY = HERE / "libwina_ops.so"
CUDA_LIBRARY = HERE / "libwina_ops_cuda.so"
ENV = "WINA_NATIVE_LIB"
TASKS_ENV = "WINA_TASKS"
MAX_TASKS = 1024  # the library's own bound


def cpu_library() -> Path | None:
    """The CPU kernel library to register, or None when it is absent or disabled."""
    override = os.environ.get(ENV)
    if override is not None:
        if override.lower() in ("", "0", "off", "none"):
            return None
        return Path(override)
    return CPU_LIBRARY if CPU_LIBRARY.is_file() else None


def cuda_library() -> Path | None:
    """The CUDA kernel library (built only where nvcc exists), or None."""
    if os.environ.get(ENV, "x").lower() in ("", "0", "off", "none"):
        return None
    return CUDA_LIBRARY if CUDA_LIBRARY.is_file() else None


@contextmanager
def task_count(threads: int | None):
    """While a session is created (its kernels read `WINA_TASKS` then): a user's `WINA_TASKS` checked, or, when
    wina sizes the pool itself (`threads`), set to that size, and restored afterwards."""
    from ..errors import ConfigError

    given = os.environ.get(TASKS_ENV)
    if given is not None:
        if not (given.isdigit() and 1 <= int(given) <= MAX_TASKS):
            raise ConfigError(f"{TASKS_ENV}='{given}' is not a task count",
                              "the native kernels split each one-row product into that many tasks, one per thread "
                              "of ONNX Runtime's intra-op pool",
                              f"set {TASKS_ENV} to an integer from 1 to {MAX_TASKS}, or unset it (one task per "
                              "physical core, the pool's default size)")
        yield
        return
    if threads:
        os.environ[TASKS_ENV] = str(min(int(threads), MAX_TASKS))
    try:
        yield
    finally:
        if threads:
            os.environ.pop(TASKS_ENV, None)
