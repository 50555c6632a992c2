// Launches the CUDA kernels of ai.wina's gated products (wina_ops_cuda_kernel.cuh) for ONNX Runtime's CUDA
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
  GemvArgs run = *args;
  if (run.rows == 0 || run.width == 0) return 0;  // an empty grid is a launch error
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (run.k >= 0) {  // top-k: scratch for the kept channels, freed in stream order after the products
    const cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&run.keep), run.rows * run.in, s);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  for_each_launch(run.rows, run.width, kMaxGridRows, [&](int64_t r0, dim3 grid) {
    if (run.k >= 0) select_topk<<<dim3(1, grid.y), kThreads, 0, s>>>(run, r0);
    if (run.f16)
      gated_gemv<__half><<<grid, kThreads, 0, s>>>(run, r0);
    else
      gated_gemv<float><<<grid, kThreads, 0, s>>>(run, r0);
  });
  if (run.keep != nullptr) cudaFreeAsync(run.keep, s);
  return static_cast<int>(cudaGetLastError());
}
