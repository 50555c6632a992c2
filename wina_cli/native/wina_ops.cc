// Native CPU kernels for the ai.wina operator set (see wina_cli/onnx_ops.py for the op contracts).
//
//   GatedMatMul(X[..., in] f32, W[in, out] f32|f16, scale[in] f32) attr threshold: keep |x_i|*scale_i > threshold
//   TopKMatMul (same inputs)                                         attr k: keep the k highest scores per row
//   Y[..., out] = sum over kept i of x_i * W[i, :]
//   GatedMatMulDenseRows / TopKMatMulDenseRows: a fourth input dense[S] bool (X [..., S, in]) flags the positions
//   whose rows keep every channel (a gate policy: the prompt, or the first tokens, computed dense)
//
// The point of the kernel is what it does not read: with W stored [in, out], each input channel's weights are one
// contiguous row, and a dropped channel's row is never touched. Work is split over the kept rows (each task sums a
// slice of them into its own partial Y, added up afterwards) on ONNX Runtime's own intra-op thread pool, so the
// library adds no threads of its own.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
#define WINA_F16C 1
#endif

namespace {

const OrtApi* g_api = nullptr;

// The kept channels of one row: indices ascending (rows of W are then read in address order) and their values.
struct Kept {
  std::vector<int32_t> idx;
  std::vector<float> val;
};

void keep_all(const float* x, int64_t n, Kept& out) {
  out.idx.resize(n);
  out.val.assign(x, x + n);
  for (int64_t i = 0; i < n; ++i) out.idx[i] = static_cast<int32_t>(i);
}

void keep_threshold(const float* x, const float* scale, int64_t n, float thr, Kept& out) {
  // Branch-free: about half the channels pass, at random, so a branch would mispredict on every other one.
  out.idx.resize(n);
  out.val.resize(n);
  int32_t* idx = out.idx.data();
  float* val = out.val.data();
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    idx[m] = static_cast<int32_t>(i);
    val[m] = x[i];
    m += std::fabs(x[i]) * scale[i] > thr;
  }
  out.idx.resize(m);
  out.val.resize(m);
}

void keep_topk(const float* x, const float* scale, int64_t n, int64_t k, std::vector<std::pair<float, int32_t>>& tmp,
               Kept& out) {
  out.idx.clear();
  out.val.clear();
  k = std::min(k, n);
  if (k <= 0) return;
  tmp.resize(n);
  for (int64_t i = 0; i < n; ++i) tmp[i] = {std::fabs(x[i]) * scale[i], static_cast<int32_t>(i)};
  if (k < n) {
    std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  }
  for (int64_t j = 0; j < k; ++j) out.idx.push_back(tmp[j].second);
  std::sort(out.idx.begin(), out.idx.end());
  for (int32_t i : out.idx) out.val.push_back(x[i]);
}

// y[0:out] = sum over a in [a0, a1) of val[a] * W[idx[a], :]. Eight rows per sweep, in two independent FMA
// chains, so Y is loaded and stored once per eight weight rows and the adds do not wait on each other. Written
// with intrinsics: the compiler's own vectorization of the same loop read about 10-20% slower at SmolLM2's
// shapes.
#if defined(__AVX512F__)
inline void sweep8_f32(float* __restrict y, const float* const* r, const float* v8, int64_t out) {
  __m512 v[8];
  for (int q = 0; q < 8; ++q) v[q] = _mm512_set1_ps(v8[q]);
  int64_t j = 0;
  auto step = [&](int64_t j, __mmask16 m) {
    __m512 acc = _mm512_maskz_loadu_ps(m, y + j);
    __m512 acc2 = _mm512_mul_ps(v[1], _mm512_maskz_loadu_ps(m, r[1] + j));
    acc = _mm512_fmadd_ps(v[0], _mm512_maskz_loadu_ps(m, r[0] + j), acc);
    acc2 = _mm512_fmadd_ps(v[3], _mm512_maskz_loadu_ps(m, r[3] + j), acc2);
    acc = _mm512_fmadd_ps(v[2], _mm512_maskz_loadu_ps(m, r[2] + j), acc);
    acc2 = _mm512_fmadd_ps(v[5], _mm512_maskz_loadu_ps(m, r[5] + j), acc2);
    acc = _mm512_fmadd_ps(v[4], _mm512_maskz_loadu_ps(m, r[4] + j), acc);
    acc2 = _mm512_fmadd_ps(v[7], _mm512_maskz_loadu_ps(m, r[7] + j), acc2);
    acc = _mm512_fmadd_ps(v[6], _mm512_maskz_loadu_ps(m, r[6] + j), acc);
    _mm512_mask_storeu_ps(y + j, m, _mm512_add_ps(acc, acc2));
  };
  for (; j + 16 <= out; j += 16) step(j, 0xffff);
  if (j < out) step(j, static_cast<__mmask16>((1u << (out - j)) - 1));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline void sweep8_f32(float* __restrict y, const float* const* r, const float* v8, int64_t out) {
  __m256 v[8];
  for (int q = 0; q < 8; ++q) v[q] = _mm256_set1_ps(v8[q]);
  int64_t j = 0;
  for (; j + 8 <= out; j += 8) {
    __m256 acc = _mm256_loadu_ps(y + j);
    __m256 acc2 = _mm256_mul_ps(v[1], _mm256_loadu_ps(r[1] + j));
    acc = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(r[0] + j), acc);
    acc2 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(r[3] + j), acc2);
    acc = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(r[2] + j), acc);
    acc2 = _mm256_fmadd_ps(v[5], _mm256_loadu_ps(r[5] + j), acc2);
    acc = _mm256_fmadd_ps(v[4], _mm256_loadu_ps(r[4] + j), acc);
    acc2 = _mm256_fmadd_ps(v[7], _mm256_loadu_ps(r[7] + j), acc2);
    acc = _mm256_fmadd_ps(v[6], _mm256_loadu_ps(r[6] + j), acc);
    _mm256_storeu_ps(y + j, _mm256_add_ps(acc, acc2));
  }
  for (; j < out; ++j)
    y[j] += (v8[0] * r[0][j] + v8[1] * r[1][j]) + (v8[2] * r[2][j] + v8[3] * r[3][j]) +
            (v8[4] * r[4][j] + v8[5] * r[5][j]) + (v8[6] * r[6][j] + v8[7] * r[7][j]);
}
#else
inline void sweep8_f32(float* __restrict y, const float* const* r, const float* v8, int64_t out) {
  for (int64_t j = 0; j < out; ++j)
    y[j] += (v8[0] * r[0][j] + v8[1] * r[1][j]) + (v8[2] * r[2][j] + v8[3] * r[3][j]) +
            (v8[4] * r[4][j] + v8[5] * r[5][j]) + (v8[6] * r[6][j] + v8[7] * r[7][j]);
}
#endif

// Kept rows are scattered, so each is a new memory stream that the hardware prefetcher only picks up after a few
// misses; the rows two sweeps ahead are prefetched, up to kPrefetchBytes of each. (Measured with and without, on
// SmolLM2 and Llama shapes: within run-to-run noise; kept from the previous kernel.)
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_rows(const char* w, int64_t row_bytes, const int32_t* idx, size_t a, size_t a1) {
  const int64_t n = std::min(row_bytes, kPrefetchBytes);
  for (size_t q = a; q < std::min(a + 8, a1); ++q) {
    const char* r = w + static_cast<int64_t>(idx[q]) * row_bytes;
    for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(r + off, 0, 3);
  }
}

inline float half_to_float(uint16_t h) {
#ifdef WINA_F16C
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      uint32_t m = man;
      do { m <<= 1; ++e; } while ((m & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// The same sweep over float16 rows, widened to float32 as they are loaded.
#if defined(__AVX512F__)
// GCC 12's _mm512_cvtph_ps starts from an undefined register and warns about it; the value is fully written.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline void sweep8_f16(float* __restrict y, const uint16_t* const* r, const float* v8, int64_t out) {
  __m512 v[8];
  for (int q = 0; q < 8; ++q) v[q] = _mm512_set1_ps(v8[q]);
  auto ld = [&](int q, int64_t j) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[q] + j)));
  };
  int64_t j = 0;
  for (; j + 16 <= out; j += 16) {
    __m512 acc = _mm512_loadu_ps(y + j);
    __m512 acc2 = _mm512_mul_ps(v[1], ld(1, j));
    acc = _mm512_fmadd_ps(v[0], ld(0, j), acc);
    acc2 = _mm512_fmadd_ps(v[3], ld(3, j), acc2);
    acc = _mm512_fmadd_ps(v[2], ld(2, j), acc);
    acc2 = _mm512_fmadd_ps(v[5], ld(5, j), acc2);
    acc = _mm512_fmadd_ps(v[4], ld(4, j), acc);
    acc2 = _mm512_fmadd_ps(v[7], ld(7, j), acc2);
    acc = _mm512_fmadd_ps(v[6], ld(6, j), acc);
    _mm512_storeu_ps(y + j, _mm512_add_ps(acc, acc2));
  }
  for (; j < out; ++j)
    for (int q = 0; q < 8; ++q) y[j] += v8[q] * half_to_float(r[q][j]);
}
#pragma GCC diagnostic pop
#elif defined(WINA_F16C)
inline void sweep8_f16(float* __restrict y, const uint16_t* const* r, const float* v8, int64_t out) {
  __m256 v[8];
  for (int q = 0; q < 8; ++q) v[q] = _mm256_set1_ps(v8[q]);
  auto ld = [&](int q, int64_t j) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[q] + j)));
  };
  int64_t j = 0;
  for (; j + 8 <= out; j += 8) {
    __m256 acc = _mm256_loadu_ps(y + j);
    __m256 acc2 = _mm256_mul_ps(v[1], ld(1, j));
    acc = _mm256_fmadd_ps(v[0], ld(0, j), acc);
    acc2 = _mm256_fmadd_ps(v[3], ld(3, j), acc2);
    acc = _mm256_fmadd_ps(v[2], ld(2, j), acc);
    acc2 = _mm256_fmadd_ps(v[5], ld(5, j), acc2);
    acc = _mm256_fmadd_ps(v[4], ld(4, j), acc);
    acc2 = _mm256_fmadd_ps(v[7], ld(7, j), acc2);
    acc = _mm256_fmadd_ps(v[6], ld(6, j), acc);
    _mm256_storeu_ps(y + j, _mm256_add_ps(acc, acc2));
  }
  for (; j < out; ++j)
    for (int q = 0; q < 8; ++q) y[j] += v8[q] * half_to_float(r[q][j]);
}
#else
inline void sweep8_f16(float* __restrict y, const uint16_t* const* r, const float* v8, int64_t out) {
  for (int64_t j = 0; j < out; ++j)
    for (int q = 0; q < 8; ++q) y[j] += v8[q] * half_to_float(r[q][j]);
}
#endif

inline float widen(float v) { return v; }
inline float widen(uint16_t h) { return half_to_float(h); }
inline void sweep8(float* __restrict y, const float* const* r, const float* v8, int64_t out) {
  sweep8_f32(y, r, v8, out);
}
inline void sweep8(float* __restrict y, const uint16_t* const* r, const float* v8, int64_t out) {
  sweep8_f16(y, r, v8, out);
}

// y[0:out] = sum over a in [a0, a1) of val[a] * W[idx[a], :], W float32 or float16 (uint16_t bits).
template <typename T>
void accumulate(float* __restrict y, const T* __restrict w, int64_t out, const Kept& kept, size_t a0, size_t a1) {
  std::fill(y, y + out, 0.0f);
  size_t a = a0;
  const int32_t* idx = kept.idx.data();
  const float* val = kept.val.data();
  const char* wb = reinterpret_cast<const char*>(w);
  const int64_t row_bytes = out * static_cast<int64_t>(sizeof(T));
  prefetch_rows(wb, row_bytes, idx, a, a1);
  prefetch_rows(wb, row_bytes, idx, a + 8, a1);
  for (; a + 8 <= a1; a += 8) {
    prefetch_rows(wb, row_bytes, idx, a + 16, a1);
    const T* r[8];
    for (int q = 0; q < 8; ++q) r[q] = w + static_cast<int64_t>(idx[a + q]) * out;
    sweep8(y, r, val + a, out);
  }
  for (; a < a1; ++a) {
    const T* r = w + static_cast<int64_t>(idx[a]) * out;
    const float v = val[a];
    for (int64_t j = 0; j < out; ++j) y[j] += v * widen(r[j]);
  }
}

struct Job {
  const std::vector<Kept>* rows;
  const void* w;
  bool f16;
  float* y;
  float* partial;  // [rows, parts, out] when parts > 1
  int64_t out;
  int64_t parts;   // slices of the kept rows per row, summed after the parallel section
};

void run_task(void* data, size_t t) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t row = static_cast<int64_t>(t) / job.parts;
  const int64_t part = static_cast<int64_t>(t) % job.parts;
  const Kept& kept = (*job.rows)[row];
  const size_t n = kept.idx.size();
  const size_t a0 = n * part / job.parts, a1 = n * (part + 1) / job.parts;
  float* y = job.parts == 1 ? job.y + row * job.out : job.partial + (row * job.parts + part) * job.out;
  if (job.f16)
    accumulate(y, static_cast<const uint16_t*>(job.w), job.out, kept, a0, a1);
  else
    accumulate(y, static_cast<const float*>(job.w), job.out, kept, a0, a1);
}

// The inputs and output of a gated matmul, checked: X[..., in] float, W[in, out] float32 or float16, scale[in];
// Y[..., out] is allocated here. Shared by the CPU and CUDA kernels.
struct GatedArgs {
  const float* x;
  const void* w;
  bool f16;
  const float* scale;
  float* y;
  int64_t rows, in, out;
  int64_t seq;  // X's second-to-last dimension (its positions), 0 for a single row
  const OrtValue* x_value;
  const OrtValue* w_value;
  OrtValue* y_value;
};

GatedArgs read_args(Ort::KernelContext& ctx) {
  auto x = ctx.GetInput(0);
  auto w = ctx.GetInput(1);
  auto scale = ctx.GetInput(2);
  const auto xshape = x.GetTensorTypeAndShapeInfo().GetShape();
  const auto winfo = w.GetTensorTypeAndShapeInfo();
  const auto wshape = winfo.GetShape();
  const auto wtype = winfo.GetElementType();
  if (wshape.size() != 2 || xshape.empty() || xshape.back() != wshape[0])
    ORT_CXX_API_THROW("ai.wina gated matmul: X[..., in] and W[in, out] do not match", ORT_INVALID_ARGUMENT);
  if (wtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && wtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
    ORT_CXX_API_THROW("ai.wina gated matmul: W must be float32 or float16", ORT_INVALID_ARGUMENT);
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < xshape.size(); ++d) rows *= xshape[d];
  std::vector<int64_t> yshape(xshape.begin(), xshape.end());
  yshape.back() = wshape[1];
  auto y = ctx.GetOutput(0, yshape);
  return {x.GetTensorData<float>(), w.GetTensorRawData(), wtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
          scale.GetTensorData<float>(), y.GetTensorMutableData<float>(), rows, wshape[0], wshape[1],
          xshape.size() >= 2 ? xshape[xshape.size() - 2] : 0, static_cast<const OrtValue*>(x),
          static_cast<const OrtValue*>(w), static_cast<OrtValue*>(y)};
}

// Rows from which a float32 call runs as a GEMM on masked X (below about 64 rows gathering was faster).
constexpr int64_t kGemmRows = 64;

struct GatedKernel {
  bool topk;
  float threshold = 0.0f;
  int64_t k = 0;
  std::vector<Kept> rows;  // per-call scratch, reused across calls (a kernel instance is not run concurrently)
  std::vector<std::pair<float, int32_t>> tmp;
  std::vector<float> partial;
  // ONNX Runtime's own MatMul: a call whose rows are all dense is a plain product, and so is a many-row call
  // once X's dropped channels are zeroed
  Ort::Op matmul{nullptr};

  GatedKernel(const OrtKernelInfo* info, bool is_topk) : topk(is_topk) {
    Ort::ConstKernelInfo ki(info);
    if (topk)
      k = ki.GetAttribute<int64_t>("k");
    else
      threshold = ki.GetAttribute<float>("threshold");
    const char* names[] = {"T"};
    const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    matmul = Ort::Op::Create(info, "MatMul", "", 13, names, types, 1, nullptr, 0, 2, 1);
  }

  // X with its dropped channels zeroed: one buffer per calling thread, shared by every node (a buffer per node
  // would keep a prompt's worth of X alive for each of them).
  static std::vector<float>& masked_scratch() {
    thread_local std::vector<float> buf;
    return buf;
  }

  // Y = masked X times W, by ONNX Runtime's MatMul.
  void matmul_masked(OrtKernelContext* context, const GatedArgs& args, std::vector<float>& masked) {
    auto xshape = Ort::ConstValue(args.x_value).GetTensorTypeAndShapeInfo().GetShape();
    auto mem = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
    Ort::Value xm = Ort::Value::CreateTensor<float>(mem, masked.data(), masked.size(), xshape.data(), xshape.size());
    const OrtValue* inputs[] = {static_cast<const OrtValue*>(xm), args.w_value};
    OrtValue* outputs[] = {args.y_value};
    matmul.Invoke(context, inputs, 2, outputs, 1);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const GatedArgs args = read_args(ctx);
    const int64_t in = args.in, out = args.out, nrows = args.rows;
    if (nrows == 0 || out == 0) return;
    const float* xp = args.x;
    const float* sp = args.scale;
    const bool* dense = nullptr;
    int64_t positions = 1;
    if (ctx.GetInputCount() > 3) {
      auto d = ctx.GetInput(3);
      const auto dshape = d.GetTensorTypeAndShapeInfo().GetShape();
      if (dshape.size() != 1 || args.seq == 0 || dshape[0] != args.seq)
        ORT_CXX_API_THROW("ai.wina gated matmul: dense[S] must have one flag per position of X[..., S, in]",
                          ORT_INVALID_ARGUMENT);
      dense = d.GetTensorData<bool>();
      positions = dshape[0];
      // A gate policy's dense prompt: every row keeps every channel, so with float32 weights ONNX Runtime's
      // MatMul (a blocked GEMM, far faster for many rows than gathering rows token by token) does the call.
      if (!args.f16 && std::all_of(dense, dense + positions, [](bool b) { return b; })) {
        const OrtValue* inputs[] = {args.x_value, args.w_value};
        OrtValue* outputs[] = {args.y_value};
        matmul.Invoke(context, inputs, 2, outputs, 1);
        return;
      }
    }
    // Many rows (a prefill): gathering each row's kept weight rows reads W once per token, while ONNX Runtime's
    // blocked GEMM reads each weight tile once for many tokens. With float32 weights the call becomes that GEMM
    // on X with its dropped channels zeroed, which computes the same products (a zeroed channel adds 0 * W).
    const bool gemm = !args.f16 && nrows >= kGemmRows;
    if (gemm && !topk) {
      // The threshold rule zeroes X's dropped channels in one pass, without listing the kept ones.
      std::vector<float>& masked = masked_scratch();
      masked.resize(static_cast<size_t>(nrows * in));
      for (int64_t r = 0; r < nrows; ++r) {
        const float* src = xp + r * in;
        float* dst = masked.data() + r * in;
        if (dense != nullptr && dense[r % positions]) {
          std::copy(src, src + in, dst);
          continue;
        }
        for (int64_t i = 0; i < in; ++i) dst[i] = std::fabs(src[i]) * sp[i] > threshold ? src[i] : 0.0f;
      }
      matmul_masked(context, args, masked);
      return;
    }
    rows.resize(nrows);
    for (int64_t r = 0; r < nrows; ++r) {
      if (dense != nullptr && dense[r % positions])
        keep_all(xp + r * in, in, rows[r]);
      else if (topk)
        keep_topk(xp + r * in, sp, in, k, tmp, rows[r]);
      else
        keep_threshold(xp + r * in, sp, in, threshold, rows[r]);
    }
    if (gemm) {  // top-k: the kept channels listed above, scattered into a zeroed X
      std::vector<float>& masked = masked_scratch();
      masked.assign(static_cast<size_t>(nrows * in), 0.0f);
      for (int64_t r = 0; r < nrows; ++r) {
        float* dst = masked.data() + r * in;
        const Kept& kr = rows[r];
        for (size_t a = 0; a < kr.idx.size(); ++a) dst[kr.idx[a]] = kr.val[a];
      }
      matmul_masked(context, args, masked);
      return;
    }
    // Each task sums whole weight rows (long contiguous reads, which the hardware prefetcher streams well) of a
    // slice of one row's kept channels into its own partial Y; the partials are added up afterwards. A single
    // token is split kTasks ways so the pool stays busy; a prefill has a task per row already.
    constexpr int64_t kTasks = 4;
    const int64_t parts = std::max<int64_t>(1, kTasks / nrows);
    float* yp = args.y;
    if (parts > 1) partial.resize(static_cast<size_t>(nrows * parts * out));
    Job job{&rows, args.w, args.f16, yp,
            parts > 1 ? partial.data() : nullptr, out, parts};
    const size_t total = static_cast<size_t>(nrows * parts);
    if (total == 1)
      run_task(&job, 0);
    else
      Ort::ThrowOnError(g_api->KernelContext_ParallelFor(context, run_task, total, 0, &job));
    if (parts > 1) {
      for (int64_t r = 0; r < nrows; ++r) {
        float* dst = yp + r * out;
        const float* src = partial.data() + r * parts * out;
        std::copy(src, src + out, dst);
        for (int64_t p = 1; p < parts; ++p)
          for (int64_t j = 0; j < out; ++j) dst[j] += src[p * out + j];
      }
    }
  }
};

// The op classes differ only in name, kernel and execution provider.
template <typename Kernel>
struct GatedOp : Ort::CustomOpBase<GatedOp<Kernel>, Kernel> {
  const char* name;
  const char* provider;
  bool topk;
  bool dense_rows;  // the ...DenseRows variant: a fourth input dense[S]
  GatedOp(const char* op_name, const char* ep, bool is_topk, bool with_dense_rows = false)
      : name(op_name), provider(ep), topk(is_topk), dense_rows(with_dense_rows) {}
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new Kernel(info, topk); }
  const char* GetName() const { return name; }
  const char* GetExecutionProviderType() const { return provider; }
  size_t GetInputTypeCount() const { return dense_rows ? 4 : 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    // W may be float32 or float16; the kernel checks which at run time.
    if (i == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

GatedOp<GatedKernel> g_gated("GatedMatMul", "CPUExecutionProvider", false);
GatedOp<GatedKernel> g_topk("TopKMatMul", "CPUExecutionProvider", true);
GatedOp<GatedKernel> g_gated_rows("GatedMatMulDenseRows", "CPUExecutionProvider", false, true);
GatedOp<GatedKernel> g_topk_rows("TopKMatMulDenseRows", "CPUExecutionProvider", true, true);

#ifdef WINA_WITH_CUDA
}  // namespace
extern "C" int wina_cuda_gated_matmul(const float* x, const void* w, bool w_f16, const float* scale, float* y,
                                      int64_t rows, int64_t in, int64_t out, float threshold, void* stream);
namespace {

// GatedMatMul on the CUDA execution provider (threshold mode; top-k nodes stay on the CPU kernel). Unverified on
// hardware: see wina_ops_cuda.cu.
struct CudaGatedKernel {
  float threshold;
  CudaGatedKernel(const OrtKernelInfo* info, bool /*topk: threshold mode only*/) {
    threshold = Ort::ConstKernelInfo(info).GetAttribute<float>("threshold");
  }
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const GatedArgs a = read_args(ctx);
    const int err = wina_cuda_gated_matmul(a.x, a.w, a.f16, a.scale, a.y, a.rows, a.in, a.out, threshold,
                                           ctx.GetGPUComputeStream());
    if (err != 0) ORT_CXX_API_THROW("ai.wina gated matmul: CUDA launch failed", ORT_RUNTIME_EXCEPTION);
  }
};

GatedOp<CudaGatedKernel> g_cuda_gated("GatedMatMul", "CUDAExecutionProvider", false);
#endif
std::mutex g_domain_mutex;
std::vector<Ort::CustomOpDomain> g_domains;  // must outlive every session that uses them

}  // namespace

extern "C" {

// Entry point ONNX Runtime calls from SessionOptions.register_custom_ops_library.
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                      const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an older runtime: ORT reports the failed registration itself
  g_api = api;
  Ort::InitApi(api);
  try {
    Ort::CustomOpDomain domain("ai.wina");
    domain.Add(&g_gated);
    domain.Add(&g_topk);
    domain.Add(&g_gated_rows);
    domain.Add(&g_topk_rows);
#ifdef WINA_WITH_CUDA
    domain.Add(&g_cuda_gated);
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(g_domain_mutex);
    g_domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// For tools that want to know what they loaded.
__attribute__((visibility("default"))) const char* WinaOpsVersion() { return "1"; }
}
