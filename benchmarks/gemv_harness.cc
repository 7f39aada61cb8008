// The int8 GEMV kernel alone, outside XLA: one bench-l2 expert matrix ([1, 1024] bf16 x int8
// [1024, 5120], 8 scale groups), DRAM-resident (40 copies, 210 MB, rotated), 1 and 2 threads,
// against a plain streaming read of the same bytes (the ceiling). docs/PERFORMANCE.md.
//
//   g++ -O3 -std=c++20 -pthread -isystem $(python -c "import jax; print(jax.ffi.include_dir())") \
//       benchmarks/gemv_harness.cc -o /tmp/gemv_harness && /tmp/gemv_harness
#include "harness.h"

int main() {
  if (!harness::has_avx512()) return 0;
  const int64_t K = 1024, N = 5120, G = 8, M = 1, copies = 40, per_rep = 8;
  std::vector<int8_t> w(size_t(K * N * copies));
  for (size_t i = 0; i < w.size(); ++i) w[i] = int8_t((i * 2654435761u) >> 24);
  std::vector<uint16_t> s(G * N, 0x3c00), xb(M * K, 0x3f80);
  std::vector<float> x(M * K, 1.0f), y(4 * M * N);
  std::atomic<long> sink{0};
  for (int kind = 0; kind < 2; ++kind)
    for (int threads : {1, 2}) {
      double best = 1e9;
      for (int r = 0; r < 15; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<std::thread> th;
        for (int t = 0; t < threads; ++t)
          th.emplace_back([&, t, r] {
            for (int c = 0; c < per_rep; ++c) {
              const int8_t* wm = w.data() + size_t((r * per_rep + c) % copies) * K * N;
              QProblem p{x.data(), xb.data(), wm, s.data(), y.data(), M, K, N, G};
              for (int u = t; u < 4; u += threads) {  // 4 slabs of 256 rows, as the kernel cuts
                if (kind == 0) sink += harness::read_sum(wm + u * 256 * N, size_t(256 * N));
                else q8_block_512(p, u * 256, u * 256 + 256, 0, N, y.data() + u * N);
              }
            }
          });
        for (auto& h : th) h.join();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      std::printf("%-13s %d thread(s): %.3f ms per matrix, %.1f GB/s of int8\n",
                  kind ? "int8 GEMV" : "plain read", threads, best * 1e3 / per_rep,
                  double(per_rep * K * N) / best / 1e9);
    }
  return 0;
}
