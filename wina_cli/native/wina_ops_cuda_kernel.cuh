// The CUDA kernel of ai.wina.GatedMatMul and how its launches cover the rows, without the launch itself.
//
// Included by wina_ops_cuda.cu, which launches it on ONNX Runtime's CUDA stream, and by the test harness
// (tests/cuda_emulation/), which runs the same code on the CPU with every CUDA thread an OS thread: no machine wina
// is built on has a GPU, so the emulation is what checks the kernel's indexing, tiling and gating. It checks
// neither speed nor anything the hardware adds (memory model, coalescing, launch limits other than grid rows).
//
// One thread per output column of one row: every thread evaluates the gate of each input channel (the test is
// the same for the whole block, so the branch does not diverge) and reads the weight row only for kept
// channels; consecutive threads read consecutive columns, so the reads of a kept row are coalesced.
#pragma once

#include <cstdint>

namespace wina_cuda {

constexpr int kThreads = 256;
constexpr int kTile = 1024;               // input channels staged in shared memory at a time
constexpr int64_t kMaxGridRows = 65535;   // gridDim.y limit: long prefills go in chunks of rows

template <typename W>
__device__ inline float load_weight(const W* w, int64_t i) { return static_cast<float>(w[i]); }

template <>
__device__ inline float load_weight<__half>(const __half* w, int64_t i) { return __half2float(w[i]); }

template <typename W>
__global__ void gated_gemv(const float* __restrict__ x, const W* __restrict__ w, const float* __restrict__ scale,
                           float* __restrict__ y, int64_t in, int64_t out, float threshold) {
  __shared__ float xs[kTile];
  __shared__ unsigned char keep[kTile];
  const int64_t row = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const float* xr = x + row * in;
  float acc = 0.0f;
  for (int64_t base = 0; base < in; base += kTile) {
    const int64_t n = in - base < kTile ? in - base : static_cast<int64_t>(kTile);
    for (int64_t t = threadIdx.x; t < n; t += kThreads) {
      const float v = xr[base + t];
      xs[t] = v;
      keep[t] = fabsf(v) * scale[base + t] > threshold;
    }
    __syncthreads();
    if (j < out) {
      for (int64_t t = 0; t < n; ++t)
        if (keep[t]) acc += xs[t] * load_weight(w, (base + t) * out + j);
    }
    __syncthreads();
  }
  if (j < out) y[row * out + j] = acc;
}

// Calls launch(first_row, rows, grid) once per chunk of at most max_rows rows, grid = (column blocks, rows).
template <typename Launch>
void for_each_launch(int64_t rows, int64_t out, int64_t max_rows, Launch launch) {
  for (int64_t r0 = 0; r0 < rows; r0 += max_rows) {
    const int64_t n = rows - r0 < max_rows ? rows - r0 : max_rows;
    launch(r0, n, dim3(static_cast<unsigned>((out + kThreads - 1) / kThreads), static_cast<unsigned>(n)));
  }
}

}  // namespace wina_cuda
