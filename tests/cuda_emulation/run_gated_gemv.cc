// Runs wina's CUDA gated GEMV (wina_cli/native/wina_ops_cuda_kernel.cuh) under the CPU emulation, on operands read
// from files the test wrote:
//   run_gated_gemv DIR ROWS IN OUT THRESHOLD F16 MAX_GRID_ROWS
// reads DIR/x.bin (float32 [ROWS, IN]), DIR/w.bin ([IN, OUT], float32, or float16 bits if F16 is 1),
// DIR/scale.bin (float32 [IN]); writes DIR/y.bin (float32 [ROWS, OUT]). MAX_GRID_ROWS stands in for the grid's
// 65535-row limit, so a test can cover the chunked launches with a few rows.
#include "cuda_emulation.h"
#include "wina_ops_cuda_kernel.cuh"  // -I wina_cli/native

#include <cstdio>
#include <cstdlib>
#include <string>

template <typename T>
std::vector<T> read_file(const std::string& path, size_t n) {
  std::vector<T> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

template <typename W>
void run(const std::vector<float>& x, const std::vector<W>& w, const std::vector<float>& scale, std::vector<float>& y,
         int64_t rows, int64_t in, int64_t out, float threshold, int64_t max_rows) {
  using namespace wina_cuda;
  for_each_launch(rows, out, max_rows, [&](int64_t r0, int64_t, dim3 grid) {
    launch(grid, kThreads, [&] { gated_gemv<W>(x.data() + r0 * in, w.data(), scale.data(), y.data() + r0 * out, in,
                                               out, threshold); });
  });
}

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: run_gated_gemv DIR ROWS IN OUT THRESHOLD F16 MAX_GRID_ROWS\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t rows = std::atoll(argv[2]), in = std::atoll(argv[3]), out = std::atoll(argv[4]);
  const float threshold = std::strtof(argv[5], nullptr);
  const bool f16 = std::atoi(argv[6]) != 0;
  const int64_t max_rows = std::atoll(argv[7]);
  const auto x = read_file<float>(dir + "/x.bin", rows * in);
  const auto scale = read_file<float>(dir + "/scale.bin", in);
  std::vector<float> y(rows * out, NAN);  // a column the kernel never writes stays NaN
  if (f16)
    run(x, read_file<__half>(dir + "/w.bin", in * out), scale, y, rows, in, out, threshold, max_rows);
  else
    run(x, read_file<float>(dir + "/w.bin", in * out), scale, y, rows, in, out, threshold, max_rows);
  FILE* f = std::fopen((dir + "/y.bin").c_str(), "wb");
  std::fwrite(y.data(), sizeof(float), y.size(), f);
  std::fclose(f);
  return 0;
}
