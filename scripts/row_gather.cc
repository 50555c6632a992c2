// Why SmolLM2-sized weight rows cannot be gathered at streaming speed on a given machine, without ONNX Runtime:
// one core multiplies a vector by 60 matrices of 576 x 1536 floats ([in, out], 212 MB in all, well past the
// caches), once reading every row in order and once reading a random half of the rows (kept rows ascending, the
// kernel's order), and prints the bandwidth of each. `1` as the argument asks for transparent huge pages.
//   g++ -O3 -march=native scripts/row_gather.cc -o /tmp/row_gather && /tmp/row_gather 0 && /tmp/row_gather 1
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  const bool huge = argc > 1 && std::atoi(argv[1]) != 0;
  const int layers = 60, in = 576, out = 1536;
  const size_t per = static_cast<size_t>(in) * out, bytes = per * layers * sizeof(float);
  float* w = static_cast<float*>(std::aligned_alloc(1 << 21, bytes));
  if (huge) madvise(w, bytes, MADV_HUGEPAGE);
  for (size_t i = 0; i < per * layers; ++i) w[i] = static_cast<float>(i % 7) * 0.01f;
  std::mt19937 rng(0);
  std::vector<float> y(out), x(in);
  for (auto& v : x) v = static_cast<float>(rng()) / 4e9f;
  double best_gather = 0, best_stream = 0;
  for (int rep = 0; rep < 20; ++rep) {
    std::vector<std::vector<int>> keep(layers);
    for (auto& k : keep)
      for (int i = 0; i < in; ++i)
        if (rng() & 1) k.push_back(i);
    size_t rows = 0;
    auto t0 = std::chrono::steady_clock::now();
    for (int l = 0; l < layers; ++l) {
      const float* m = w + per * l;
      std::fill(y.begin(), y.end(), 0.0f);
      for (int i : keep[l]) {
        const float* r = m + static_cast<size_t>(i) * out;
        for (int j = 0; j < out; ++j) y[j] += x[i] * r[j];
      }
      rows += keep[l].size();
    }
    auto t1 = std::chrono::steady_clock::now();
    for (int l = 0; l < layers; ++l) {
      const float* m = w + per * l;
      std::fill(y.begin(), y.end(), 0.0f);
      for (int i = 0; i < in; ++i) {
        const float* r = m + static_cast<size_t>(i) * out;
        for (int j = 0; j < out; ++j) y[j] += x[i] * r[j];
      }
    }
    auto t2 = std::chrono::steady_clock::now();
    best_gather = std::max(best_gather, rows * out * sizeof(float) / std::chrono::duration<double>(t1 - t0).count());
    best_stream = std::max(best_stream, bytes / std::chrono::duration<double>(t2 - t1).count());
  }
  std::printf("huge pages %s: random half of the rows %.1f GB/s, every row in order %.1f GB/s (checksum %g)\n",
              huge ? "asked" : "off", best_gather / 1e9, best_stream / 1e9, static_cast<double>(y[3]));
  std::free(w);
}
