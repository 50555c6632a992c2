// Launches the CUDA kernel of ai.wina.GatedMatMul (wina_ops_cuda_kernel.cuh) for ONNX Runtime's CUDA execution
// provider.
//
// UNVERIFIED ON HARDWARE: it is compiled where nvcc exists, but no machine wina is developed or tested on has a
// GPU, so it has never run on one. Its code runs in tests only under a CPU emulation of CUDA's threads (see the
// kernel header). Sessions on the CPU provider never load it.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "wina_ops_cuda_kernel.cuh"

// Launches on the session's stream; returns the CUDA error of the launch (0 on success).
extern "C" int wina_cuda_gated_matmul(const float* x, const void* w, bool w_f16, const float* scale, float* y,
                                      int64_t rows, int64_t in, int64_t out, float threshold, void* stream) {
  using namespace wina_cuda;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  for_each_launch(rows, out, kMaxGridRows, [&](int64_t r0, int64_t, dim3 grid) {
    if (w_f16)
      gated_gemv<__half><<<grid, kThreads, 0, s>>>(x + r0 * in, static_cast<const __half*>(w), scale, y + r0 * out,
                                                   in, out, threshold);
    else
      gated_gemv<float><<<grid, kThreads, 0, s>>>(x + r0 * in, static_cast<const float*>(w), scale, y + r0 * out,
                                                  in, out, threshold);
  });
  return static_cast<int>(cudaGetLastError());
}
