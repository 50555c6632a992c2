// The CUDA kernel of ai.wina's gated products (GatedMatMul, FusedGatedMatMul2/3 and their DenseRows variants) and
// how its launches cover the rows, without the launch itself.
//
// Included by wina_ops_cuda.cu, which launches it on ONNX Runtime's CUDA stream, and by the test harness
// (tests/cuda_emulation/), which runs the same code on the CPU with every CUDA thread an OS thread: no machine wina
// is built on has a GPU, so the emulation is what checks the kernel's indexing, tiling and gating. It checks
// neither speed nor anything the hardware adds (memory model, coalescing, launch limits other than grid rows).
//
// One thread per output column of one row: the block stages a tile of the row's input channels and every
// projection's gate decision for them in shared memory, then each thread reads the weight row only for channels
// its projection keeps; consecutive threads read consecutive columns, so the reads of a kept row are coalesced, and
// the threads of a warp mostly share a projection and so a branch.
#pragma once

#include <cstdint>

#include "wina_ops_cuda.h"

namespace wina_cuda {

constexpr int kThreads = 256;
constexpr int kTile = 1024;              // input channels staged in shared memory at a time
constexpr int64_t kMaxGridRows = 65535;  // gridDim.y limit: long prefills go in chunks of rows

template <typename W>
__device__ inline float load_weight(const W* w, int64_t i) { return static_cast<float>(w[i]); }

template <>
__device__ inline float load_weight<__half>(const __half* w, int64_t i) { return __half2float(w[i]); }

template <typename W>
__global__ void gated_gemv(const GemvArgs a, int64_t row0) {
  __shared__ float xs[kTile];
  __shared__ unsigned char keep[kMaxBlocks][kTile];
  const int64_t row = row0 + blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int p = 0;  // the projection whose column block holds j
  while (p + 1 < a.blocks && j >= a.offsets[p + 1]) ++p;
  const bool dense_row = a.dense != nullptr && a.dense[row % a.positions];
  const float* xr = a.x + row * a.in;
  const W* w = static_cast<const W*>(a.w);
  float acc = 0.0f;
  for (int64_t base = 0; base < a.in; base += kTile) {
    const int64_t n = a.in - base < kTile ? a.in - base : static_cast<int64_t>(kTile);
    for (int64_t t = threadIdx.x; t < n; t += kThreads) {
      const float v = xr[base + t];
      xs[t] = v;
      for (int b = 0; b < a.blocks; ++b)
        keep[b][t] = dense_row || fabsf(v) * a.scale[b][base + t] > a.threshold[b];
    }
    __syncthreads();
    if (j < a.width) {
      for (int64_t t = 0; t < n; ++t)
        if (keep[p][t]) acc += xs[t] * load_weight(w, (base + t) * a.width + j);
    }
    __syncthreads();
  }
  if (j < a.width) a.y[p][row * (a.offsets[p + 1] - a.offsets[p]) + j - a.offsets[p]] = acc;
}

// Calls launch(first_row, grid) once per chunk of at most max_rows rows, grid = (column blocks, rows).
template <typename Launch>
void for_each_launch(int64_t rows, int64_t width, int64_t max_rows, Launch launch) {
  for (int64_t r0 = 0; r0 < rows; r0 += max_rows) {
    const int64_t n = rows - r0 < max_rows ? rows - r0 : max_rows;
    launch(r0, dim3(static_cast<unsigned>((width + kThreads - 1) / kThreads), static_cast<unsigned>(n)));
  }
}

}  // namespace wina_cuda
