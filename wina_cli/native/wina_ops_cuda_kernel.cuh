// The CUDA kernels of ai.wina's gated products (GatedMatMul, TopKMatMul, FusedGatedMatMul2/3 and their DenseRows
// variants) and how their launches cover the rows, without the launch itself.
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

// Top-k: one block per row finds the k-th highest score by radix selection on the scores' bits (non-negative
// floats order as their bit patterns), eight bits a pass, then marks the kept channels in a.keep: every score
// above it, and as many equal to it as k leaves room for, lowest index first.
__device__ inline uint32_t score_bits(const GemvArgs& a, const float* xr, int64_t i) {
  const float s = fabsf(xr[i]) * a.scale[0][i];
  return __float_as_uint(s);
}

__global__ void select_topk(const GemvArgs a, int64_t row0) {
  __shared__ int hist[256];
  __shared__ uint32_t prefix_s;
  __shared__ int64_t rank_s;  // which of the scores matching the prefix, counted from the highest, is the k-th
  __shared__ int64_t flags[kThreads];
  __shared__ int64_t taken_s;
  const int64_t row = row0 + blockIdx.y;
  const float* xr = a.x + row * a.in;
  unsigned char* keep = a.keep + row * a.in;
  const bool dense_row = a.dense != nullptr && a.dense[row % a.positions];
  if (dense_row || a.k >= a.in || a.k <= 0) {
    for (int64_t i = threadIdx.x; i < a.in; i += kThreads) keep[i] = dense_row || a.k >= a.in;
    return;
  }
  uint32_t prefix = 0, mask = 0;
  if (threadIdx.x == 0) rank_s = a.k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += kThreads) hist[d] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < a.in; i += kThreads) {
      const uint32_t b = score_bits(a, xr, i);
      if ((b & mask) == prefix) atomicAdd(&hist[(b >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      int d = 255;
      while (above + hist[d] < rank_s) above += hist[d--];
      rank_s -= above;
      prefix_s = prefix | (static_cast<uint32_t>(d) << shift);
    }
    __syncthreads();
    prefix = prefix_s;
    mask |= 255u << shift;
  }
  const int64_t ties = rank_s;  // scores equal to the k-th to keep, in index order
  if (threadIdx.x == 0) taken_s = 0;
  __syncthreads();
  for (int64_t base = 0; base < a.in; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const uint32_t b = i < a.in ? score_bits(a, xr, i) : 0u;
    const bool tie = i < a.in && b == prefix;
    flags[threadIdx.x] = tie;
    __syncthreads();
    for (unsigned step = 1; step < kThreads; step *= 2) {  // inclusive prefix sum of the ties in this chunk
      const int64_t add = threadIdx.x >= step ? flags[threadIdx.x - step] : 0;
      __syncthreads();
      flags[threadIdx.x] += add;
      __syncthreads();
    }
    if (i < a.in) keep[i] = b > prefix || (tie && taken_s + flags[threadIdx.x] <= ties);
    __syncthreads();
    if (threadIdx.x == 0) taken_s += flags[kThreads - 1];
    __syncthreads();
  }
}

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
      if (a.k >= 0)  // top-k: the channels select_topk marked
        keep[0][t] = a.keep[row * a.in + base + t];
      else
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
