"""wina's native kernels for ONNX Runtime: where the built library is, and whether it can be used.

The library is built by the set-up (`make native`, part of `make setup`) from wina_ops.cc against ONNX Runtime's
headers (scripts/fetch_ort_headers.sh). `WINA_NATIVE_LIB` points at another build; `WINA_NATIVE_LIB=off`
disables the native kernels, so the graph's standard-op function bodies run instead.
"""
from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_LIBRARY = HERE / "libwina_ops.so"
CUDA_LIBRARY = HERE / "libwina_ops_cuda.so"
ENV = "WINA_NATIVE_LIB"


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
