// Launches the CUDA kernel of ai.wina's gated products (wina_ops_cuda_kernel.cuh) for ONNX Runtime's CUDA
// execution provider.
//
// UNVERIFIED ON HARDWARE: it is compiled where nvcc exists, but no machine wina is developed or tested on has a
// GPU, so it has never run on one. Its code runs in tests only under a CPU emulation of CUDA's threads (see the
// kernel header). Sessions on the CPU provider never load it.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "wina_ops_cuda_kernel.cuh"

extern "C" int wina_cuda_gated_matmul(const wina_cuda::GemvArgs* args, void* stream) {
  using namespace wina_cuda;
  const GemvArgs a = *args;
  if (a.rows == 0 || a.width == 0) return 0;  // an empty grid is a launch error
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  for_each_launch(a.rows, a.width, kMaxGridRows, [&](int64_t r0, dim3 grid) {
    if (a.f16)
      gated_gemv<__half><<<grid, kThreads, 0, s>>>(a, r0);
    else
      gated_gemv<float><<<grid, kThreads, 0, s>>>(a, r0);
  });
  return static_cast<int>(cudaGetLastError());
}
