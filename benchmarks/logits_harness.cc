// The logits kernel alone, outside XLA: [1, 1024] f32 x an int8 table [131072, 1024] (134 MB,
// DRAM-resident), 1 and 2 threads (each thread a contiguous range of rows, as the kernel's
// workers run), against a plain streaming read of the same bytes. docs/PERFORMANCE.md, "Decode,
// fourth round". The kernel's prefetch hint is a compile flag: add
// -DGROKCTL_PREFETCH_HINT=_MM_HINT_T0 to time the L1 prefetch it used before. HUGE=1 in the
// environment puts the table on 2 MB pages (madvise).
//
//   g++ -O3 -std=c++20 -pthread -isystem $(python -c "import jax; print(jax.ffi.include_dir())") \
//       benchmarks/logits_harness.cc -o /tmp/logits_harness && /tmp/logits_harness
#include "harness.h"

#include <sys/mman.h>

int main() {
  if (!harness::has_avx512()) return 0;
  const int64_t V = 131072, D = 1024;
  const size_t bytes = size_t(V * D);
  int8_t* t = static_cast<int8_t*>(std::aligned_alloc(size_t(1) << 21, bytes));
  if (std::getenv("HUGE")) madvise(t, bytes, MADV_HUGEPAGE);
  for (size_t i = 0; i < bytes; ++i) t[i] = int8_t((i * 2654435761u) >> 24);
  std::vector<float> x(D), y(V);
  for (int64_t i = 0; i < D; ++i) x[i] = 0.001f * float(i % 97) - 0.03f;
  std::atomic<long> sink{0};
  for (int kind = 0; kind < 2; ++kind)
    for (int threads : {1, 2}) {
      double best = 1e9;
      for (int rep = 0; rep < 7; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<std::thread> th;
        for (int k = 0; k < threads; ++k)
          th.emplace_back([&, k] {
            const int64_t v0 = V / threads * k, v1 = V / threads * (k + 1);
            if (kind == 0) {
              sink += harness::read_sum(t + v0 * D, size_t((v1 - v0) * D));
            } else {
              NTP<int8_t> p{x.data(), nullptr, t, y.data(), 1, D, V};
              for (int64_t u = v0; u < v1; u += kTableRows) nt_rows_512(p, u, std::min(v1, u + kTableRows));
            }
          });
        for (auto& h : th) h.join();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      std::printf("%-12s %d thread(s): %.2f ms per table, %.1f GB/s\n", kind ? "int8 logits" : "plain read",
                  threads, best * 1e3, double(bytes) / best / 1e9);
    }
  std::free(t);
}
