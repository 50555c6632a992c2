// Runs wina's CUDA gated product (wina_cli/native/wina_ops_cuda_kernel.cuh) under the CPU emulation, on operands
// read from files the test wrote:
//   run_gated_gemv DIR ROWS IN F16 MAX_GRID_ROWS POSITIONS K N SPLIT_1..SPLIT_N THRESHOLD_1..THRESHOLD_N
// (K >= 0: top-k, N = 1, its threshold unused; K = -1: threshold gates)
// reads DIR/x.bin (float32 [ROWS, IN]), DIR/w.bin ([IN, sum(SPLIT)], float32, or float16 bits if F16 is 1),
// DIR/scale{p}.bin (float32 [IN]) and, when POSITIONS > 0, DIR/dense.bin (one byte per position, row r at
// position r % POSITIONS); writes DIR/y{p}.bin (float32 [ROWS, SPLIT_p]) and, for top-k, DIR/keep.bin (the kept
// channels, one byte each [ROWS, IN]). MAX_GRID_ROWS stands in for the grid's
// 65535-row limit, so a test can cover chunked launches with a few rows.
#include "cuda_emulation.h"
#include "wina_ops_cuda_kernel.cuh"  // -I wina_cli/native

#include <cstdio>
#include <cstdlib>
#include <memory>
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

int main(int argc, char** argv) {
  if (argc < 9) {
    std::fprintf(stderr, "usage: run_gated_gemv DIR ROWS IN F16 MAX_GRID_ROWS POSITIONS K N SPLITS... THRESHOLDS...\n");
    return 2;
  }
  using namespace wina_cuda;
  const std::string dir = argv[1];
  GemvArgs a{};
  a.rows = std::atoll(argv[2]);
  a.in = std::atoll(argv[3]);
  a.f16 = std::atoi(argv[4]) != 0;
  const int64_t max_rows = std::atoll(argv[5]);
  a.positions = std::atoll(argv[6]);
  a.k = std::atoll(argv[7]);
  a.blocks = std::atoi(argv[8]);
  if (a.blocks < 1 || a.blocks > kMaxBlocks || argc != 9 + 2 * a.blocks || (a.k >= 0 && a.blocks != 1)) {
    std::fprintf(stderr, "N must be 1 to %d (1 for top-k), with N splits and N thresholds\n", kMaxBlocks);
    return 2;
  }
  for (int p = 0; p < a.blocks; ++p) {
    a.offsets[p + 1] = a.offsets[p] + std::atoll(argv[9 + p]);
    a.threshold[p] = std::strtof(argv[9 + a.blocks + p], nullptr);
  }
  a.width = a.offsets[a.blocks];
  const auto x = read_file<float>(dir + "/x.bin", a.rows * a.in);
  a.x = x.data();
  std::vector<float> w32;
  std::vector<__half> w16;
  if (a.f16) {
    w16 = read_file<__half>(dir + "/w.bin", a.in * a.width);
    a.w = w16.data();
  } else {
    w32 = read_file<float>(dir + "/w.bin", a.in * a.width);
    a.w = w32.data();
  }
  std::vector<std::vector<float>> scales, ys;
  for (int p = 0; p < a.blocks; ++p) {
    scales.push_back(read_file<float>(dir + "/scale" + std::to_string(p) + ".bin", a.in));
    a.scale[p] = scales.back().data();
    ys.emplace_back((a.offsets[p + 1] - a.offsets[p]) * a.rows, NAN);  // a column never written stays NaN
  }
  for (int p = 0; p < a.blocks; ++p) a.y[p] = ys[p].data();
  std::unique_ptr<bool[]> dense;
  if (a.positions > 0) {
    const auto bytes = read_file<unsigned char>(dir + "/dense.bin", a.positions);
    dense.reset(new bool[a.positions]);
    for (int64_t i = 0; i < a.positions; ++i) dense[i] = bytes[i] != 0;
    a.dense = dense.get();
  }
  std::vector<unsigned char> keep(a.k >= 0 ? a.rows * a.in : 0, 2);  // 2: never written by select_topk
  if (a.k >= 0) a.keep = keep.data();
  if (a.rows > 0 && a.width > 0)  // as the launcher: an empty grid is not launched
    for_each_launch(a.rows, a.width, max_rows, [&](int64_t r0, dim3 grid) {
      if (a.k >= 0) launch(dim3(1, grid.y), kThreads, [&] { select_topk(a, r0); });
      launch(grid, kThreads, [&] {
        if (a.f16)
          gated_gemv<__half>(a, r0);
        else
          gated_gemv<float>(a, r0);
      });
    });
  if (a.k >= 0) {  // the kept channels too, for the test to check the selection itself
    FILE* f = std::fopen((dir + "/keep.bin").c_str(), "wb");
    std::fwrite(keep.data(), 1, keep.size(), f);
    std::fclose(f);
  }
  for (int p = 0; p < a.blocks; ++p) {
    FILE* f = std::fopen((dir + "/y" + std::to_string(p) + ".bin").c_str(), "wb");
    std::fwrite(ys[p].data(), sizeof(float), ys[p].size(), f);
    std::fclose(f);
  }
  return 0;
}
