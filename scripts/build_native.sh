#!/usr/bin/env bash
# Build wina's native ONNX Runtime kernels. Usage: build_native.sh cpu|cuda OUT.so
#   cpu:  the C++ kernels (wina_cli/native/wina_ops.cc)
#   cuda: the same plus the CUDA kernel (wina_ops_cuda.cu), linked against the CUDA runtime next to nvcc.
# -march=native: the library is built by the set-up on the machine that runs it.
set -euo pipefail
kind="$1"; out="$2"
headers=build/ort-headers
[ -f "$headers/onnxruntime_cxx_api.h" ] || bash scripts/fetch_ort_headers.sh "$headers"
flags=(-O3 -march=native -std=c++17 -fPIC -shared -fvisibility=hidden -Wall -I "$headers")
mkdir -p build
if [ "$kind" = cpu ]; then
  g++ "${flags[@]}" wina_cli/native/wina_ops.cc -o "$out.part"
else
  # nvcc may be a wrapper script: ask it where its toolkit is.
  top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  libdir=$(dirname "$(find "$top/" -name 'libcudart.so' 2>/dev/null | head -1)")
  nvcc -O3 -std=c++17 -arch=sm_80 -Xcompiler -fPIC -c wina_cli/native/wina_ops_cuda.cu -o build/wina_ops_cuda.o
  g++ "${flags[@]}" -DWINA_WITH_CUDA wina_cli/native/wina_ops.cc build/wina_ops_cuda.o \
      -L"$libdir" -lcudart -Wl,-rpath,"$libdir" -o "$out.part"
fi
mv "$out.part" "$out"
