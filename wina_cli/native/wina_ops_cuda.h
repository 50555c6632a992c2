// What the host code (wina_ops.cc, g++) hands the CUDA kernels (wina_ops_cuda.cu, nvcc): plain C++, no CUDA.
#pragma once

#include <cstdint>

namespace wina_cuda {

constexpr int kMaxBlocks = 3;  // projections of one fused node (q, k, v)

// Y_p = (X where |X| * scale_p > threshold_p, or where the row's position is flagged dense) @ W[:, block p], for
// the column blocks p of W [in, width] (one block for GatedMatMul, N for FusedGatedMatMulN). X [rows, in] float32,
// W float32 or float16 (`f16`), Y_p [rows, offsets[p + 1] - offsets[p]] float32, all in device memory.
// With k >= 0 (TopKMatMul, one block), each row keeps instead the k channels of highest |x| * scale, ties going
// to the lower index, as the CPU kernel and the op's function body (ONNX TopK) do.
struct GemvArgs {
  const float* x;
  const void* w;
  bool f16;
  int64_t rows, in, width;
  int blocks;
  int64_t offsets[kMaxBlocks + 1];
  const float* scale[kMaxBlocks];
  float threshold[kMaxBlocks];  // -inf: the block keeps every channel
  float* y[kMaxBlocks];
  const bool* dense;  // dense[positions] of a gate policy, row r at position r % positions; nullptr: none
  int64_t positions;
  int64_t k = -1;                // top-k: channels kept per row; -1: threshold gates
  unsigned char* keep = nullptr;  // top-k: [rows, in] scratch for each row's kept channels, filled by select_topk
};

}  // namespace wina_cuda

// Launches on `stream`; returns the CUDA error of the launches (0 on success).
extern "C" int wina_cuda_gated_matmul(const wina_cuda::GemvArgs* args, void* stream);
