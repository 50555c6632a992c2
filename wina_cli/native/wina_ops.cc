// Native CPU kernels for the ai.wina operator set (see wina_cli/onnx_ops.py for the op contracts).
//
//   GatedMatMul(X[..., in] f32, W[in, out] f32|f16, scale[in] f32) attr threshold: keep |x_i|*scale_i > threshold
//   TopKMatMul (same inputs)                                         attr k: keep the k highest scores per row
//   Y[..., out] = sum over kept i of x_i * W[i, :]
//   GatedMatMulDenseRows / TopKMatMulDenseRows: a fourth input dense[S] bool (X [..., S, in]) flags the positions
//   whose rows keep every channel (a gate policy: the prompt, or the first tokens, computed dense)
//   FusedGatedMatMul2/3[DenseRows](X, W[in, sum(splits)], scale_1, ..., scale_N [, dense]) attrs thresholds[N],
//   splits[N]: the N projections that read one X (gate/up; q/k/v) in one call; Y_p = GatedMatMul(X, W's column
//   block p, scale_p) with threshold p
//
// The point of the kernel is what it does not read: with W stored [in, out], each input channel's weights are one
// contiguous row, and a dropped channel's row is never touched. Work is split over the kept rows (each task sums a
// slice of them into its own partial Y, added up afterwards) on ONNX Runtime's own intra-op thread pool, so the
// library adds no threads of its own.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#ifdef WINA_WITH_CUDA
#include "wina_ops_cuda.h"
#endif
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>
#ifdef __linux__
#include <sched.h>
#endif

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

// Room past the end of a list of kept channels for a whole vector store.
constexpr int64_t kListSlack = 16;

#if defined(__AVX512F__)
// Appends the lanes of `mask` (channel indices `lane`, values `v`) to a list at `count`, in lane order. The
// compress is done in a register and stored whole (a compressing store to memory is slow on some cores); the
// list has kListSlack entries of room for the lanes past the kept ones.
inline void append_lanes(Kept& k, int64_t& count, __mmask16 mask, __m512i lane, __m512 v) {
  _mm512_storeu_si512(k.idx.data() + count, _mm512_maskz_compress_epi32(mask, lane));
  _mm512_storeu_ps(k.val.data() + count, _mm512_maskz_compress_ps(mask, v));
  count += _mm_popcnt_u32(mask);
}
#endif

void keep_threshold(const float* x, const float* scale, int64_t n, float thr, Kept& out) {
  // Branch-free: about half the channels pass, at random, so a branch would mispredict on every other one.
  out.idx.resize(n + kListSlack);
  out.val.resize(n + kListSlack);
  int32_t* idx = out.idx.data();
  float* val = out.val.data();
  int64_t m = 0, i = 0;
#if defined(__AVX512F__)
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)), t = _mm512_set1_ps(thr);
  __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512 score = _mm512_mul_ps(_mm512_and_ps(v, magnitude), _mm512_loadu_ps(scale + i));
    append_lanes(out, m, _mm512_cmp_ps_mask(score, t, _CMP_GT_OQ), lane, v);
    lane = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
  }
#endif
  for (; i < n; ++i) {
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

// While a sweep reads bytes [b, b + 64) of its eight rows, the same line of eight rows further down the kept list
// (`pf`) is prefetched into L2: the prefetches go out at the rate the rows are consumed, spread over the sweep.
inline void prefetch_line(const char* const* pf, int64_t b) {
  for (int q = 0; q < 8; ++q) __builtin_prefetch(pf[q] + b, 0, 2);
}

// y[0:out] = sum over a in [a0, a1) of val[a] * W[idx[a], :]. Eight rows per sweep, in two independent FMA
// chains, so Y is loaded and stored once per eight weight rows and the adds do not wait on each other. Written
// with intrinsics: the compiler's own vectorization of the same loop read about 10-20% slower at SmolLM2's
// shapes.
#if defined(__AVX512F__)
inline void sweep8_f32(float* __restrict y, const float* const* r, const float* v8, int64_t out,
                       const char* const* pf) {
  __m512 v[8];
  for (int q = 0; q < 8; ++q) v[q] = _mm512_set1_ps(v8[q]);
  int64_t j = 0;
  auto step = [&](int64_t j, __mmask16 m) {
    prefetch_line(pf, j * 4);
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
inline void sweep8_f32(float* __restrict y, const float* const* r, const float* v8, int64_t out,
                       const char* const* pf) {
  __m256 v[8];
  for (int q = 0; q < 8; ++q) v[q] = _mm256_set1_ps(v8[q]);
  int64_t j = 0;
  for (; j + 8 <= out; j += 8) {
    if ((j & 15) == 0) prefetch_line(pf, j * 4);
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
inline void sweep8_f32(float* __restrict y, const float* const* r, const float* v8, int64_t out,
                       const char* const* pf) {
  for (int64_t j = 0; j < out; ++j) {
    if ((j & 15) == 0) prefetch_line(pf, j * 4);
    y[j] += (v8[0] * r[0][j] + v8[1] * r[1][j]) + (v8[2] * r[2][j] + v8[3] * r[3][j]) +
            (v8[4] * r[4][j] + v8[5] * r[5][j]) + (v8[6] * r[6][j] + v8[7] * r[7][j]);
  }
}
#endif

// Kept rows are scattered, so each is a new memory stream that the hardware prefetcher only picks up after a few
// misses. While a sweep reads its eight rows, the rows `ahead` places further down the list are prefetched into L2
// (prefetcht1), line for line with the reading (prefetch_line), so the prefetches go out at the rate rows are
// consumed; `ahead` keeps about kAheadBytes of rows in flight, one to two sweeps' worth. The first `ahead` rows are
// prefetched before the first sweep, up to kPrimeBytes of each.
// Session 22, against the former scheme (the rows two sweeps ahead prefetched in a block, up to 4 KB of each, before
// every sweep), per op in chains with 512 MB of weight copies, one process's turns: at Llama-8B's shapes 0.83-0.90
// times the time at 50% and 0.76-0.90 at 65%; at SmolLM2's (50%, three runs) 576 x 576 0.91-0.97, 576 x 960
// 0.93-0.95, 576 x 3072 0.81-0.84, 1536 x 576 0.94-1.03; decoding the fast config, 0.93-0.99 (13 of 13 runs
// faster). Prefetching into L1 (prefetcht0) instead was 6-25% slower than into L2 at SmolLM2's shapes, as in
// session 8; 8 or 16 rows ahead for every row length measured within noise of each other in decode.
constexpr int64_t kAheadBytes = 64 * 1024;
constexpr int64_t kPrimeBytes = 4096;

inline size_t rows_ahead(int64_t row_bytes) {
  return static_cast<size_t>(std::clamp<int64_t>(kAheadBytes / std::max<int64_t>(row_bytes, 1), 8, 16));
}

// Up to kPrimeBytes of each of the rows of kept entries [a, b).
inline void prime_rows(const char* w, int64_t stride_bytes, int64_t row_bytes, const int32_t* idx, size_t a,
                       size_t b) {
  const int64_t n = std::min(row_bytes, kPrimeBytes);
  for (size_t q = a; q < b; ++q) {
    const char* r = w + static_cast<int64_t>(idx[q]) * stride_bytes;
    for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(r + off, 0, 2);
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
inline void sweep8_f16(float* __restrict y, const uint16_t* const* r, const float* v8, int64_t out,
                       const char* const* pf) {
  __m512 v[8];
  for (int q = 0; q < 8; ++q) v[q] = _mm512_set1_ps(v8[q]);
  auto ld = [&](int q, int64_t j) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[q] + j)));
  };
  int64_t j = 0;
  for (; j + 16 <= out; j += 16) {
    if ((j & 31) == 0) prefetch_line(pf, j * 2);
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
inline void sweep8_f16(float* __restrict y, const uint16_t* const* r, const float* v8, int64_t out,
                       const char* const* pf) {
  __m256 v[8];
  for (int q = 0; q < 8; ++q) v[q] = _mm256_set1_ps(v8[q]);
  auto ld = [&](int q, int64_t j) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[q] + j)));
  };
  int64_t j = 0;
  for (; j + 8 <= out; j += 8) {
    if ((j & 31) == 0) prefetch_line(pf, j * 2);
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
inline void sweep8_f16(float* __restrict y, const uint16_t* const* r, const float* v8, int64_t out,
                       const char* const* pf) {
  for (int64_t j = 0; j < out; ++j) {
    if ((j & 31) == 0) prefetch_line(pf, j * 2);
    for (int q = 0; q < 8; ++q) y[j] += v8[q] * half_to_float(r[q][j]);
  }
}
#endif

inline float widen(float v) { return v; }
inline float widen(uint16_t h) { return half_to_float(h); }

// dst[0:n] = src[0:n] widened from float16 to float32.
#if defined(__AVX512F__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
inline void widen_row(const uint16_t* src, int64_t n, float* dst) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
#elif defined(WINA_F16C)
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
#endif
  for (; j < n; ++j) dst[j] = half_to_float(src[j]);
}
#if defined(__AVX512F__)
#pragma GCC diagnostic pop
#endif
inline void sweep8(float* __restrict y, const float* const* r, const float* v8, int64_t out, const char* const* pf) {
  sweep8_f32(y, r, v8, out, pf);
}
inline void sweep8(float* __restrict y, const uint16_t* const* r, const float* v8, int64_t out,
                   const char* const* pf) {
  sweep8_f16(y, r, v8, out, pf);
}

// y[0:out] += sum over a in [a0, a1) of val[a] * W[idx[a], 0:out], W float32 or float16 (uint16_t bits) with rows
// `stride` elements apart (a column block of a wider W when stride > out).
template <typename T>
void accumulate(float* __restrict y, const T* __restrict w, int64_t stride, int64_t out, const Kept& kept, size_t a0,
                size_t a1) {
  size_t a = a0;
  const int32_t* idx = kept.idx.data();
  const float* val = kept.val.data();
  const char* wb = reinterpret_cast<const char*>(w);
  const int64_t stride_bytes = stride * static_cast<int64_t>(sizeof(T));
  const int64_t row_bytes = out * static_cast<int64_t>(sizeof(T));
  const size_t ahead = rows_ahead(row_bytes);
  prime_rows(wb, stride_bytes, row_bytes, idx, a, std::min(a + ahead, a1));
  for (; a + 8 <= a1; a += 8) {
    const T* r[8];
    const char* pf[8];  // past the end of the list: the row being read (its lines are on their way already)
    for (int q = 0; q < 8; ++q) {
      r[q] = w + static_cast<int64_t>(idx[a + q]) * stride;
      const size_t f = a + ahead + q;
      pf[q] = f < a1 ? wb + static_cast<int64_t>(idx[f]) * stride_bytes : reinterpret_cast<const char*>(r[q]);
    }
    sweep8(y, r, val + a, out, pf);
  }
  for (; a < a1; ++a) {
    const T* r = w + static_cast<int64_t>(idx[a]) * stride;
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
  std::fill(y, y + job.out, 0.0f);
  if (job.f16)
    accumulate(y, static_cast<const uint16_t*>(job.w), job.out, job.out, kept, a0, a1);
  else
    accumulate(y, static_cast<const float*>(job.w), job.out, job.out, kept, a0, a1);
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

int64_t leading_rows(const std::vector<int64_t>& xshape) {
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < xshape.size(); ++d) rows *= xshape[d];
  return rows;
}

// X [..., S, in]: its positions S, which a gate policy's dense[S] flags; 0 for a single row X [in].
int64_t positions_of(const std::vector<int64_t>& xshape) {
  return xshape.size() >= 2 ? xshape[xshape.size() - 2] : 0;
}

// X [..., in] and W [in, out] (float32 or float16) checked, with out = `width` where width > 0; their shapes, and
// whether W is float16.
bool check_operands(const Ort::ConstValue& x, const Ort::ConstValue& w, std::vector<int64_t>& xshape,
                    std::vector<int64_t>& wshape, int64_t width = 0) {
  xshape = x.GetTensorTypeAndShapeInfo().GetShape();
  const auto winfo = w.GetTensorTypeAndShapeInfo();
  wshape = winfo.GetShape();
  const auto wtype = winfo.GetElementType();
  if (wshape.size() != 2 || xshape.empty() || xshape.back() != wshape[0] || (width > 0 && wshape[1] != width))
    ORT_CXX_API_THROW("ai.wina gated matmul: X[..., in] and W[in, out] do not match (fused: out = sum(splits))",
                      ORT_INVALID_ARGUMENT);
  if (wtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && wtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
    ORT_CXX_API_THROW("ai.wina gated matmul: W must be float32 or float16", ORT_INVALID_ARGUMENT);
  return wtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

GatedArgs read_args(Ort::KernelContext& ctx) {
  auto x = ctx.GetInput(0);
  auto w = ctx.GetInput(1);
  auto scale = ctx.GetInput(2);
  std::vector<int64_t> xshape, wshape;
  const bool f16 = check_operands(x, w, xshape, wshape);
  std::vector<int64_t> yshape(xshape.begin(), xshape.end());
  yshape.back() = wshape[1];
  auto y = ctx.GetOutput(0, yshape);
  return {x.GetTensorData<float>(), w.GetTensorRawData(), f16, scale.GetTensorData<float>(),
          y.GetTensorMutableData<float>(), leading_rows(xshape), wshape[0], wshape[1],
          positions_of(xshape), static_cast<const OrtValue*>(x),
          static_cast<const OrtValue*>(w), static_cast<OrtValue*>(y)};
}

// The dense[S] flags of a gate policy (input `index`), one per position of X [..., S, in].
const bool* read_dense(Ort::KernelContext& ctx, size_t index, int64_t seq, int64_t& positions) {
  auto d = ctx.GetInput(index);
  const auto dshape = d.GetTensorTypeAndShapeInfo().GetShape();
  if (dshape.size() != 1 || seq == 0 || dshape[0] != seq)
    ORT_CXX_API_THROW("ai.wina gated matmul: dense[S] must have one flag per position of X[..., S, in]",
                      ORT_INVALID_ARGUMENT);
  positions = dshape[0];
  return d.GetTensorData<bool>();
}

// The physical cores this process may run on: on Linux the distinct (package, core) pairs among the CPUs of its
// affinity mask, elsewhere (or where sysfs does not say) the logical CPUs.
int64_t physical_cores() {
  const int64_t logical = std::max<int64_t>(1, std::thread::hardware_concurrency());
#ifdef __linux__
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0) return logical;
  std::set<std::pair<long, long>> cores;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (!CPU_ISSET(c, &mask)) continue;
    long id[2];
    const char* field[] = {"physical_package_id", "core_id"};
    for (int k = 0; k < 2; ++k) {
      const std::string path = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/" + field[k];
      FILE* f = std::fopen(path.c_str(), "r");
      const bool read = f != nullptr && std::fscanf(f, "%ld", &id[k]) == 1;
      if (f != nullptr) std::fclose(f);
      if (!read) return std::max<int64_t>(1, CPU_COUNT(&mask));
    }
    cores.emplace(id[0], id[1]);
  }
  return cores.empty() ? logical : static_cast<int64_t>(cores.size());
#else
  return logical;
#endif
}

// How many tasks a one-row product is split into: one per thread of ONNX Runtime's intra-op pool, which by default
// has a thread per physical core (the custom-op API does not tell a kernel its pool's size). WINA_TASKS overrides
// it for a pool of another size (wina sets it when it sizes the pool itself). Each task is a slice of the kept
// rows with a partial Y of its own, and each starts its row prefetches cold, so a task more than the pool has
// threads costs without parallelism. Session 21, decoding the fast config on 2 cores with this library and with
// one that split every call in four (the former fixed count), the two in one process's turns: the four-way build
// took 0.992-1.041 times as long per token (median 1.017; longer in 12 of 16 runs, even in 2), where two copies of
// one build differed by 1.2% and 2.7%. A fixed count also left the threads of a larger pool idle.
int64_t pool_tasks() {
  if (const char* v = std::getenv("WINA_TASKS")) {
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (*v == '\0' || *end != '\0' || n < 1 || n > 1024)
      ORT_CXX_API_THROW(std::string("WINA_TASKS='") + v +
                            "' is not a task count: set it to an integer from 1 to 1024 (the intra-op threads), or "
                            "unset it to use one task per physical core",
                        ORT_INVALID_ARGUMENT);
    return n;
  }
  static const int64_t cores = physical_cores();
  return cores;
}

// Rows from which a float32 call runs as a GEMM on masked X (below about 64 rows gathering was faster).
constexpr int64_t kGemmRows = 64;

// What the gated kernels share: ONNX Runtime's own MatMul (a call whose rows are all dense is a plain product, and
// so is a many-row call once X's dropped channels are zeroed).
struct KernelBase {
  Ort::Op matmul{nullptr};
  int64_t tasks = pool_tasks();  // a one-row call's tasks

  explicit KernelBase(const OrtKernelInfo* info) {
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

  // A float32 copy of W's columns [c0, c0 + out) (W float32 or float16, rows `width` apart), in a buffer per
  // calling thread, as an OrtValue [in, out] for ONNX Runtime's GEMM (which takes float32 only). For a prefill
  // this one pass over W costs far less than gathering W's rows token by token.
  static Ort::Value float_block(const void* w, bool f16, int64_t in, int64_t width, int64_t c0, int64_t out) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(in * out));
    for (int64_t i = 0; i < in; ++i) {
      if (f16) {
        widen_row(static_cast<const uint16_t*>(w) + i * width + c0, out, buf.data() + i * out);
      } else {
        const float* r = static_cast<const float*>(w) + i * width + c0;
        std::copy(r, r + out, buf.data() + i * out);
      }
    }
    const int64_t shape[] = {in, out};
    auto mem = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
    return Ort::Value::CreateTensor<float>(mem, buf.data(), buf.size(), shape, 2);
  }

  // The threshold rule applied to every row of X in one vectorizable pass, without listing the kept channels.
  static void mask_threshold(const float* x, int64_t nrows, int64_t in, const float* scale, float thr,
                             const bool* dense, int64_t positions, std::vector<float>& masked) {
    masked.resize(static_cast<size_t>(nrows * in));
    for (int64_t r = 0; r < nrows; ++r) {
      const float* src = x + r * in;
      float* dst = masked.data() + r * in;
      if (dense != nullptr && dense[r % positions]) {
        std::copy(src, src + in, dst);
        continue;
      }
      for (int64_t i = 0; i < in; ++i) dst[i] = std::fabs(src[i]) * scale[i] > thr ? src[i] : 0.0f;
    }
  }

  // `total` tasks on ONNX Runtime's intra-op pool (a single one runs here, without the hand-off).
  static void run_tasks(OrtKernelContext* context, void (*fn)(void*, size_t), size_t total, void* job) {
    if (total == 1)
      fn(job, 0);
    else
      Ort::ThrowOnError(g_api->KernelContext_ParallelFor(context, fn, total, 0, job));
  }

  // dst[0:out] = the sum of `slices` partial results src[s * stride + 0:out].
  static void sum_partials(float* dst, const float* src, int64_t slices, int64_t stride, int64_t out) {
    std::copy(src, src + out, dst);
    for (int64_t s = 1; s < slices; ++s)
      for (int64_t j = 0; j < out; ++j) dst[j] += src[s * stride + j];
  }

  // Y = X times W by ONNX Runtime's MatMul; X is `x_value`, or `masked` (X's shape) when given.
  void product(OrtKernelContext* context, const OrtValue* x_value, const OrtValue* w_value, OrtValue* y_value,
               std::vector<float>* masked = nullptr) {
    Ort::Value xm{nullptr};
    if (masked != nullptr) {
      auto xshape = Ort::ConstValue(x_value).GetTensorTypeAndShapeInfo().GetShape();
      auto mem = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
      xm = Ort::Value::CreateTensor<float>(mem, masked->data(), masked->size(), xshape.data(), xshape.size());
      x_value = static_cast<const OrtValue*>(xm);
    }
    const OrtValue* inputs[] = {x_value, w_value};
    OrtValue* outputs[] = {y_value};
    matmul.Invoke(context, inputs, 2, outputs, 1);
  }
};

// A single gated op's attribute: k for the top-k ops, the threshold for the others (the other is left as it was).
void read_gate_attribute(const OrtKernelInfo* info, bool topk, float& threshold, int64_t& k) {
  Ort::ConstKernelInfo ki(info);
  if (topk)
    k = ki.GetAttribute<int64_t>("k");
  else
    threshold = ki.GetAttribute<float>("threshold");
}

struct GatedKernel : KernelBase {
  static constexpr bool kFused = false;
  bool topk;
  float threshold = 0.0f;
  int64_t k = 0;
  std::vector<Kept> rows;  // per-call scratch, reused across calls (a kernel instance is not run concurrently)
  std::vector<std::pair<float, int32_t>> tmp;
  std::vector<float> partial;

  GatedKernel(const OrtKernelInfo* info, bool is_topk) : KernelBase(info), topk(is_topk) {
    read_gate_attribute(info, topk, threshold, k);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const GatedArgs args = read_args(ctx);
    const int64_t in = args.in, nrows = args.rows;
    if (nrows == 0 || args.out == 0) return;
    const float* xp = args.x;
    const float* sp = args.scale;
    const bool* dense = nullptr;
    int64_t positions = 1;
    bool all_dense = false;
    if (ctx.GetInputCount() > 3) {
      dense = read_dense(ctx, 3, args.seq, positions);
      all_dense = std::all_of(dense, dense + positions, [](bool b) { return b; });
    }
    // Many rows (a prefill): gathering each row's kept weight rows reads W once per token, while ONNX Runtime's
    // blocked GEMM reads each weight tile once for many tokens. The call becomes that GEMM on X with its dropped
    // channels zeroed, which computes the same products (a zeroed channel adds 0 * W); float16 weights are
    // widened to a float32 copy first. A gate policy's dense prompt (every row keeps every channel) takes the
    // GEMM on X itself, with float32 weights whatever the number of rows (with float16 ones, widening W for a few
    // rows would cost more than reading their rows).
    const bool gemm = nrows >= kGemmRows || (all_dense && !args.f16);
    Ort::Value wide{nullptr};
    const OrtValue* w_value = args.w_value;
    if (gemm && args.f16) {
      wide = float_block(args.w, true, in, args.out, 0, args.out);
      w_value = static_cast<const OrtValue*>(wide);
    }
    if (gemm && all_dense) {
      product(context, args.x_value, w_value, args.y_value);
      return;
    }
    if (gemm && !topk) {
      std::vector<float>& masked = masked_scratch();
      mask_threshold(xp, nrows, in, sp, threshold, dense, positions, masked);
      product(context, args.x_value, w_value, args.y_value, &masked);
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
      product(context, args.x_value, w_value, args.y_value, &masked);
      return;
    }
    // Each task sums whole weight rows (long contiguous reads, which the hardware prefetcher streams well) of a
    // slice of one row's kept channels into its own partial Y; the partials are added up afterwards. A single
    // token is split `tasks` ways so every thread of the pool has a share; several rows get a task each.
    const int64_t out = args.out, parts = std::max<int64_t>(1, tasks / nrows);
    float* yp = args.y;
    if (parts > 1) partial.resize(static_cast<size_t>(nrows * parts * out));
    Job job{&rows, args.w, args.f16, yp, parts > 1 ? partial.data() : nullptr, out, parts};
    run_tasks(context, run_task, static_cast<size_t>(nrows * parts), &job);
    if (parts > 1)
      for (int64_t r = 0; r < nrows; ++r) sum_partials(yp + r * out, partial.data() + r * parts * out, parts, out, out);
  }
};

// FusedGatedMatMulN(X, W, scale_1, ..., scale_N [, dense]), attributes thresholds[N] and splits[N]: the N
// projections that read one X (q, k, v; gate, up) as one node. W [in, sum(splits)] holds their weights side by
// side, so an input channel's weights for all N are one contiguous row; projection p keeps channel i when
// |x_i| * scale_p[i] > thresholds[p] (-inf: the projection is dense). The masks of projections that read the same
// input largely agree, so most kept channels are read as one long row instead of N short scattered ones (in a
// chain of SmolLM2's q/k/v and gate/up products, 4-15% faster than separate GatedMatMuls, whichever ran first; in a
// whole decode step, where other ops run in between, 0.6-5%).
// A fused node's attributes, checked: thresholds[N], and the N + 1 column offsets of its projections in W from
// splits[N].
void read_fused_attributes(const OrtKernelInfo* info, int64_t n, std::vector<float>& thresholds,
                           std::vector<int64_t>& offsets) {
  if (n < 1 || n > 3) ORT_CXX_API_THROW("ai.wina fused gated matmul: 1 to 3 projections", ORT_INVALID_ARGUMENT);
  Ort::ConstKernelInfo ki(info);
  thresholds = ki.GetAttributes<float>("thresholds");
  const auto splits = ki.GetAttributes<int64_t>("splits");
  if (static_cast<int64_t>(thresholds.size()) != n || static_cast<int64_t>(splits.size()) != n)
    ORT_CXX_API_THROW("ai.wina fused gated matmul: one threshold and one split per projection", ORT_INVALID_ARGUMENT);
  offsets.assign(1, 0);
  for (int64_t s : splits) offsets.push_back(offsets.back() + s);
}

// A fused node's scale_p input, checked against W's input channels.
const float* read_scale(Ort::KernelContext& ctx, size_t index, int64_t in) {
  auto s = ctx.GetInput(index);
  if (s.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(in))
    ORT_CXX_API_THROW("ai.wina gated matmul: scale must have one entry per input channel", ORT_INVALID_ARGUMENT);
  return s.GetTensorData<float>();
}

// X and W of a fused node, checked against the width its splits add up to.
struct FusedOperands {
  Ort::ConstValue x, w;
  std::vector<int64_t> xshape, wshape;
  bool f16;
  FusedOperands(Ort::KernelContext& ctx, int64_t width) : x(ctx.GetInput(0)), w(ctx.GetInput(1)) {
    f16 = check_operands(x, w, xshape, wshape, width);
  }
};

struct FusedJob {
  const float* x;
  int64_t in;
  const void* w;
  bool f16;
  int64_t width;  // sum(splits): W's row length
  const std::vector<int64_t>* offsets;  // N + 1 column offsets of the projections in W
  const std::vector<const float*>* scales;
  const std::vector<float>* thresholds;
  const bool* dense;
  int64_t positions;
  int64_t slices;  // channel ranges per row of X
  float* partial;  // [rows * slices, width]
};

template <typename T>
void fused_task(const FusedJob& job, size_t t) {
  const int64_t row = static_cast<int64_t>(t) / job.slices, s = static_cast<int64_t>(t) % job.slices;
  const int64_t c0 = job.in * s / job.slices, c1 = job.in * (s + 1) / job.slices;
  const int64_t n = static_cast<int64_t>(job.thresholds->size()), width = job.width;
  const int64_t* off = job.offsets->data();
  const float* const* scale = job.scales->data();
  const float* thr = job.thresholds->data();
  float* y = job.partial + static_cast<int64_t>(t) * width;
  std::fill(y, y + width, 0.0f);
  const float* x = job.x + row * job.in;
  const bool dense_row = job.dense != nullptr && job.dense[row % job.positions];
  const T* w = static_cast<const T*>(job.w);
  // Channels every projection keeps are read as whole rows of W (the common case: the projections' masks largely
  // agree); the others as the column blocks of the projections that keep them. Listing is branch-free (about half
  // the channels pass, at random).
  thread_local std::vector<Kept> lists;  // [0]: whole rows; [1 + p]: projection p's column block only
  lists.resize(static_cast<size_t>(n + 1));
  for (auto& k : lists) {  // kListSlack: a vector store may write a whole vector past the last kept channel
    k.idx.resize(static_cast<size_t>(c1 - c0 + kListSlack));
    k.val.resize(static_cast<size_t>(c1 - c0 + kListSlack));
  }
  const uint32_t all = (1u << n) - 1;
  int64_t count[4] = {0, 0, 0, 0};
  int64_t c = c0;
#if defined(__AVX512F__)
  // 16 channels at a time: each projection's mask by one compare, the lists written by compressing the kept lanes.
  // The listing is most of a call's fixed cost: a fused q/k/v node whose gates drop everything took 3.7 us in a
  // chain of such nodes, 5.6 us with the scalar loop below alone (a 576 x 16 MatMul: 1.9 us; session 20).
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(c0)),
                                  _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  for (; c + 16 <= c1; c += 16) {
    const __m512 v = _mm512_loadu_ps(x + c), a = _mm512_and_ps(v, magnitude);
    __mmask16 keep[3] = {0xffff, 0xffff, 0xffff};
    __mmask16 whole = 0xffff;
    for (int64_t p = 0; p < n; ++p) {
      if (!dense_row)
        keep[p] = _mm512_cmp_ps_mask(_mm512_mul_ps(a, _mm512_loadu_ps(scale[p] + c)), _mm512_set1_ps(thr[p]),
                                     _CMP_GT_OQ);
      whole &= keep[p];
    }
    append_lanes(lists[0], count[0], whole, lane, v);
    for (int64_t p = 0; p < n; ++p) append_lanes(lists[1 + p], count[1 + p], keep[p] & ~whole, lane, v);
    lane = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
  }
#endif
  for (; c < c1; ++c) {
    const float v = x[c], a = std::fabs(v);
    uint32_t keep = 0;
    for (int64_t p = 0; p < n; ++p) keep |= static_cast<uint32_t>(dense_row || a * scale[p][c] > thr[p]) << p;
    const bool whole = keep == all;
    for (int64_t l = 0; l <= n; ++l) {
      Kept& k = lists[l];
      k.idx[count[l]] = static_cast<int32_t>(c);
      k.val[count[l]] = v;
      count[l] += l == 0 ? whole : (!whole && ((keep >> (l - 1)) & 1u));
    }
  }
  accumulate(y, w, width, width, lists[0], 0, static_cast<size_t>(count[0]));
  for (int64_t p = 0; p < n; ++p)
    accumulate(y + off[p], w + off[p], width, off[p + 1] - off[p], lists[1 + p], 0,
               static_cast<size_t>(count[1 + p]));
}

void run_fused_task(void* data, size_t t) {
  const FusedJob& job = *static_cast<const FusedJob*>(data);
  if (job.f16)
    fused_task<uint16_t>(job, t);
  else
    fused_task<float>(job, t);
}

struct FusedKernel : KernelBase {
  static constexpr bool kFused = true;
  std::vector<float> thresholds;
  std::vector<int64_t> offsets;
  std::vector<const float*> scales;
  std::vector<float> partial;
  // A channel of one row of X that some projections keep and others drop (`keep`: bit p for projection p).
  struct Partly {
    int64_t row;
    int32_t channel;
    uint32_t keep;
  };
  std::vector<Partly> partly;

  FusedKernel(const OrtKernelInfo* info, int64_t n) : KernelBase(info) {
    read_fused_attributes(info, n, thresholds, offsets);
    scales.resize(n);
  }

  // A many-row call (a prefill, or a dense prompt) as one GEMM of the whole of W and X with the channels every
  // projection keeps (the others zeroed), its columns then split among the outputs; the channels only some
  // projections keep are added to those projections' outputs row by row. The projections that read one X mostly
  // agree (TEAL scores at one sparsity give them thresholds a fraction of a percent apart), and one product skips
  // the float32 copy of every projection's column block that the GEMM would need (it takes no row stride). A
  // 256-token prefill of the fast config's fused export, with this and with the per-block products in one
  // process's turns: the per-block products took 0.996-1.108 times as long (median 1.03, six runs, session 20).
  // Returns false, having written nothing, when the channels only some keep would cost more than a 32nd of the
  // GEMM's multiply-adds.
  bool one_product(OrtKernelContext* context, const FusedOperands& ops, int64_t nrows, const bool* dense,
                   int64_t positions, bool all_dense, const std::vector<float*>& yp) {
    const int64_t n = static_cast<int64_t>(thresholds.size());
    const int64_t in = ops.wshape[0], width = ops.wshape[1];
    const float* xp = ops.x.GetTensorData<float>();
    const double budget = static_cast<double>(nrows) * in * width / 32;
    double work = 0;
    partly.clear();
    std::vector<float>& masked = masked_scratch();
    if (!all_dense) {
      masked.resize(static_cast<size_t>(nrows * in));
      thread_local std::vector<int32_t> kept_by;  // per channel of a row: how many projections keep it
      kept_by.resize(static_cast<size_t>(in));
      // 32-bit counts, the floats' width, so the compare-and-add loops vectorize
      int32_t* __restrict cnt = kept_by.data();
      for (int64_t r = 0; r < nrows; ++r) {
        const float* __restrict x = xp + r * in;
        float* __restrict dst = masked.data() + r * in;
        if (dense != nullptr && dense[r % positions]) {
          std::copy(x, x + in, dst);
          continue;
        }
        // one pass per projection, each a plain compare-and-add over the row (vectorized)
        std::fill(cnt, cnt + in, 0);
        for (int64_t p = 0; p < n; ++p) {
          const float* __restrict sc = scales[p];
          const float t = thresholds[p];
          for (int64_t c = 0; c < in; ++c) cnt[c] += std::fabs(x[c]) * sc[c] > t ? 1 : 0;
        }
        const int32_t every = static_cast<int32_t>(n);
        for (int64_t c = 0; c < in; ++c) dst[c] = cnt[c] == every ? x[c] : 0.0f;
        for (int64_t c = 0; c < in; ++c) {
          // kept by some but not all: one unsigned compare, false for nearly every channel (a predictable branch)
          if (static_cast<uint32_t>(cnt[c] - 1) >= static_cast<uint32_t>(every - 1)) continue;
          uint32_t keep = 0;
          for (int64_t p = 0; p < n; ++p) {
            const bool k = std::fabs(x[c]) * scales[p][c] > thresholds[p];
            keep |= static_cast<uint32_t>(k) << p;
            if (k) work += static_cast<double>(offsets[p + 1] - offsets[p]);
          }
          if (work > budget) return false;
          partly.push_back({r, static_cast<int32_t>(c), keep});
        }
      }
    }
    Ort::Value wide{nullptr};
    const OrtValue* w_value = static_cast<const OrtValue*>(ops.w);
    if (ops.f16) {
      wide = float_block(ops.w.GetTensorRawData(), true, in, width, 0, width);
      w_value = static_cast<const OrtValue*>(wide);
    }
    // [rows, width], the one product: one buffer per calling thread, as masked_scratch, so a long prompt's
    // product is not kept alive by every fused node
    thread_local std::vector<float> wide_y;
    wide_y.resize(static_cast<size_t>(nrows * width));
    std::vector<int64_t> yshape(ops.xshape);
    yshape.back() = width;
    auto mem = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
    auto y = Ort::Value::CreateTensor<float>(mem, wide_y.data(), wide_y.size(), yshape.data(), yshape.size());
    product(context, static_cast<const OrtValue*>(ops.x), w_value, static_cast<OrtValue*>(y),
            all_dense ? nullptr : &masked);
    for (int64_t r = 0; r < nrows; ++r)
      for (int64_t p = 0; p < n; ++p) {
        const int64_t o0 = offsets[p], out = offsets[p + 1] - o0;
        const float* src = wide_y.data() + r * width + o0;
        std::copy(src, src + out, yp[p] + r * out);
      }
    for (const Partly& e : partly) {
      const float v = xp[e.row * in + e.channel];
      for (int64_t p = 0; p < n; ++p) {
        if (!((e.keep >> p) & 1u)) continue;
        const int64_t o0 = offsets[p], out = offsets[p + 1] - o0;
        float* dst = yp[p] + e.row * out;
        auto add_row = [&](const auto* w) {
          for (int64_t j = 0; j < out; ++j) dst[j] += v * widen(w[e.channel * width + o0 + j]);
        };
        if (ops.f16)
          add_row(static_cast<const uint16_t*>(ops.w.GetTensorRawData()));
        else
          add_row(static_cast<const float*>(ops.w.GetTensorRawData()));
      }
    }
    return true;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n = thresholds.size();
    const FusedOperands ops(ctx, offsets.back());
    const auto& x = ops.x;
    const auto& wv = ops.w;
    const auto& xshape = ops.xshape;
    const bool f16 = ops.f16;
    const int64_t in = ops.wshape[0], width = ops.wshape[1], nrows = leading_rows(xshape);
    for (size_t p = 0; p < n; ++p) scales[p] = read_scale(ctx, 2 + p, in);
    const bool* dense = nullptr;
    int64_t positions = 1;
    if (ctx.GetInputCount() > 2 + n)
      dense = read_dense(ctx, 2 + n, positions_of(xshape), positions);
    std::vector<OrtValue*> ys(n);
    std::vector<float*> yp(n);
    for (size_t p = 0; p < n; ++p) {
      std::vector<int64_t> yshape(xshape.begin(), xshape.end());
      yshape.back() = offsets[p + 1] - offsets[p];
      auto y = ctx.GetOutput(p, yshape);
      ys[p] = static_cast<OrtValue*>(y);
      yp[p] = y.GetTensorMutableData<float>();
    }
    if (nrows == 0 || width == 0) return;
    const float* xp = x.GetTensorData<float>();
    const bool all_dense = dense != nullptr && std::all_of(dense, dense + positions, [](bool b) { return b; });
    if (nrows >= kGemmRows || (all_dense && !f16)) {
      if (one_product(context, ops, nrows, dense, positions, all_dense, yp)) return;
      // the masks differ too much: ONNX Runtime's GEMM per projection on a float32 copy of its column block (the
      // GEMM takes no row stride), on X with its dropped channels zeroed
      for (size_t p = 0; p < n; ++p) {
        const int64_t o0 = offsets[p], out = offsets[p + 1] - o0;
        Ort::Value bv = float_block(wv.GetTensorRawData(), f16, in, width, o0, out);
        const bool open = std::isinf(thresholds[p]) && thresholds[p] < 0;
        if (all_dense || open) {
          product(context, static_cast<const OrtValue*>(x), static_cast<const OrtValue*>(bv), ys[p]);
        } else {
          std::vector<float>& masked = masked_scratch();
          mask_threshold(xp, nrows, in, scales[p], thresholds[p], dense, positions, masked);
          product(context, static_cast<const OrtValue*>(x), static_cast<const OrtValue*>(bv), ys[p], &masked);
        }
      }
      return;
    }
    // A single token is split into `tasks` channel ranges, a share for every thread of the pool; several rows get
    // a task each.
    const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(tasks / nrows, in));
    partial.resize(static_cast<size_t>(nrows * slices * width));
    FusedJob job{xp, in, wv.GetTensorRawData(), f16, width, &offsets, &scales, &thresholds, dense, positions,
                 slices, partial.data()};
    run_tasks(context, run_fused_task, static_cast<size_t>(nrows * slices), &job);
    for (int64_t r = 0; r < nrows; ++r)
      for (size_t p = 0; p < n; ++p) {
        const int64_t o0 = offsets[p], out = offsets[p + 1] - o0;
        sum_partials(yp[p] + r * out, partial.data() + r * slices * width + o0, slices, width, out);
      }
  }
};

// The op classes differ only in name, kernel, execution provider and arity.
template <typename Kernel>
struct GatedOp : Ort::CustomOpBase<GatedOp<Kernel>, Kernel> {
  const char* name;
  const char* provider;
  bool topk;
  bool dense_rows;  // the ...DenseRows variants: a last input dense[S]
  int64_t fused;    // FusedGatedMatMulN: N products of one X; 0 for the single-product ops
  GatedOp(const char* op_name, const char* ep, bool is_topk, bool with_dense_rows = false, int64_t n_fused = 0)
      : name(op_name), provider(ep), topk(is_topk), dense_rows(with_dense_rows), fused(n_fused) {}
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const {
    if constexpr (Kernel::kFused)
      return new Kernel(info, fused);
    else
      return new Kernel(info, topk);
  }
  const char* GetName() const { return name; }
  const char* GetExecutionProviderType() const { return provider; }
  size_t GetInputTypeCount() const { return 2 + std::max<int64_t>(fused, 1) + (dense_rows ? 1 : 0); }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    // X, W, the scales, then dense. W may be float32 or float16; the kernel checks which at run time.
    if (dense_rows && i + 1 == GetInputTypeCount()) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return static_cast<size_t>(std::max<int64_t>(fused, 1)); }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

GatedOp<GatedKernel> g_gated("GatedMatMul", "CPUExecutionProvider", false);
GatedOp<GatedKernel> g_topk("TopKMatMul", "CPUExecutionProvider", true);
GatedOp<GatedKernel> g_gated_rows("GatedMatMulDenseRows", "CPUExecutionProvider", false, true);
GatedOp<GatedKernel> g_topk_rows("TopKMatMulDenseRows", "CPUExecutionProvider", true, true);
GatedOp<FusedKernel> g_fused2("FusedGatedMatMul2", "CPUExecutionProvider", false, false, 2);
GatedOp<FusedKernel> g_fused3("FusedGatedMatMul3", "CPUExecutionProvider", false, false, 3);
GatedOp<FusedKernel> g_fused2_rows("FusedGatedMatMul2DenseRows", "CPUExecutionProvider", false, true, 2);
GatedOp<FusedKernel> g_fused3_rows("FusedGatedMatMul3DenseRows", "CPUExecutionProvider", false, true, 3);

#ifdef WINA_WITH_CUDA
// The gated products on the CUDA execution provider: GatedMatMul, TopKMatMul, FusedGatedMatMul2/3 and their
// DenseRows variants, every input in device memory. Unverified on hardware: see wina_ops_cuda.cu. The host side
// below only reads shapes and attributes and hands device pointers on.
void cuda_launch(Ort::KernelContext& ctx, const wina_cuda::GemvArgs& a) {
  const int err = wina_cuda_gated_matmul(&a, ctx.GetGPUComputeStream());
  if (err != 0) ORT_CXX_API_THROW("ai.wina gated matmul: CUDA launch failed", ORT_RUNTIME_EXCEPTION);
}

struct CudaGatedKernel {
  static constexpr bool kFused = false;
  float threshold = 0.0f;
  int64_t k = -1;  // top-k ops: channels kept per row
  CudaGatedKernel(const OrtKernelInfo* info, bool topk) { read_gate_attribute(info, topk, threshold, k); }
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const GatedArgs g = read_args(ctx);
    wina_cuda::GemvArgs a{};
    a.x = g.x;
    a.w = g.w;
    a.f16 = g.f16;
    a.rows = g.rows;
    a.in = g.in;
    a.width = g.out;
    a.blocks = 1;
    a.offsets[1] = g.out;
    a.scale[0] = g.scale;
    a.threshold[0] = threshold;
    a.k = k;
    a.y[0] = g.y;
    if (ctx.GetInputCount() > 3) a.dense = read_dense(ctx, 3, g.seq, a.positions);
    cuda_launch(ctx, a);
  }
};

struct CudaFusedKernel {
  static constexpr bool kFused = true;
  std::vector<float> thresholds;
  std::vector<int64_t> offsets;
  CudaFusedKernel(const OrtKernelInfo* info, int64_t n) {
    static_assert(wina_cuda::kMaxBlocks == 3, "read_fused_attributes allows 1 to 3 projections");
    read_fused_attributes(info, n, thresholds, offsets);
  }
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n = thresholds.size();
    const FusedOperands ops(ctx, offsets.back());
    const auto& xshape = ops.xshape;
    wina_cuda::GemvArgs a{};
    a.f16 = ops.f16;
    a.x = ops.x.GetTensorData<float>();
    a.w = ops.w.GetTensorRawData();
    a.rows = leading_rows(xshape);
    a.in = ops.wshape[0];
    a.width = ops.wshape[1];
    a.blocks = static_cast<int>(n);
    for (size_t p = 0; p < n; ++p) {
      a.scale[p] = read_scale(ctx, 2 + p, a.in);
      a.threshold[p] = thresholds[p];
      a.offsets[p + 1] = offsets[p + 1];
      std::vector<int64_t> yshape(xshape.begin(), xshape.end());
      yshape.back() = offsets[p + 1] - offsets[p];
      a.y[p] = ctx.GetOutput(p, yshape).GetTensorMutableData<float>();
    }
    if (ctx.GetInputCount() > 2 + n)
      a.dense = read_dense(ctx, 2 + n, positions_of(xshape), a.positions);
    cuda_launch(ctx, a);
  }
};

const char* const kCuda = "CUDAExecutionProvider";
GatedOp<CudaGatedKernel> g_cuda_gated("GatedMatMul", kCuda, false);
GatedOp<CudaGatedKernel> g_cuda_gated_rows("GatedMatMulDenseRows", kCuda, false, true);
GatedOp<CudaGatedKernel> g_cuda_topk("TopKMatMul", kCuda, true);
GatedOp<CudaGatedKernel> g_cuda_topk_rows("TopKMatMulDenseRows", kCuda, true, true);
GatedOp<CudaFusedKernel> g_cuda_fused2("FusedGatedMatMul2", kCuda, false, false, 2);
GatedOp<CudaFusedKernel> g_cuda_fused3("FusedGatedMatMul3", kCuda, false, false, 3);
GatedOp<CudaFusedKernel> g_cuda_fused2_rows("FusedGatedMatMul2DenseRows", kCuda, false, true, 2);
GatedOp<CudaFusedKernel> g_cuda_fused3_rows("FusedGatedMatMul3DenseRows", kCuda, false, true, 3);
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
    for (auto* op : {&g_fused2, &g_fused3, &g_fused2_rows, &g_fused3_rows}) domain.Add(op);
#ifdef WINA_WITH_CUDA
    for (auto* op : {&g_cuda_gated, &g_cuda_gated_rows, &g_cuda_topk, &g_cuda_topk_rows}) domain.Add(op);
    for (auto* op : {&g_cuda_fused2, &g_cuda_fused3, &g_cuda_fused2_rows, &g_cuda_fused3_rows}) domain.Add(op);
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

// The tasks a kernel made now would split a one-row product into (`wina env`); -1 when WINA_TASKS is no count.
__attribute__((visibility("default"))) int64_t WinaPoolTasks() {
  try {
    return pool_tasks();
  } catch (const Ort::Exception&) {
    return -1;
  }
}
}
