// CUDA kernel for ai.wina.GatedMatMul on ONNX Runtime's CUDA execution provider.
//
// UNVERIFIED ON HARDWARE: it is compiled where nvcc exists, but no machine wina is developed or tested on has a
// GPU, so it has never run. Sessions on the CPU provider never load it.
//
// One thread per output column of one row: every thread evaluates the gate of each input channel (the test is
// the same for the whole block, so the branch does not diverge) and reads the weight row only for kept
// channels; consecutive threads read consecutive columns, so the reads of a kept row are coalesced.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kTile = 1024;  // input channels staged in shared memory at a time

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
    const int64_t n = min(static_cast<int64_t>(kTile), in - base);
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

}  // namespace

// Launches on the session's stream; returns the CUDA error of the launch (0 on success).
extern "C" int wina_cuda_gated_matmul(const float* x, const void* w, bool w_f16, const float* scale, float* y,
                                      int64_t rows, int64_t in, int64_t out, float threshold, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t max_rows = 65535;  // gridDim.y limit: long prefills go in chunks of rows
  for (int64_t r0 = 0; r0 < rows; r0 += max_rows) {
    const int64_t n = rows - r0 < max_rows ? rows - r0 : max_rows;
    dim3 grid(static_cast<unsigned>((out + kThreads - 1) / kThreads), static_cast<unsigned>(n));
    if (w_f16)
      gated_gemv<__half><<<grid, kThreads, 0, s>>>(x + r0 * in, static_cast<const __half*>(w), scale,
                                                   y + r0 * out, in, out, threshold);
    else
      gated_gemv<float><<<grid, kThreads, 0, s>>>(x + r0 * in, static_cast<const float*>(w), scale, y + r0 * out,
                                                  in, out, threshold);
  }
  return static_cast<int>(cudaGetLastError());
}
