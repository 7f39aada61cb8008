// The GEMV kernels alone, outside XLA: one bench-l2 expert matrix ([1, 1024] x [1024, 5120], 8
// scale groups), DRAM-resident (copies rotated, ~200 MB), 1 and 2 threads, against a plain
// streaming read of the same bytes (the ceiling): int8 (bf16 x), then packed int4 with exact
// scales (5 significant bits, what `quantize` writes: bf16 x and f32 x) and with any bf16 scales
// (the weight-by-weight path); the AVX2 paths too ("avx2" lines: the only ones on a CPU without
// AVX-512). docs/PERFORMANCE.md.
//
//   g++ -O3 -std=c++20 -pthread -isystem $(python -c "import jax; print(jax.ffi.include_dir())") \
//       benchmarks/gemv_harness.cc -o /tmp/gemv_harness && /tmp/gemv_harness
#include "harness.h"

namespace {
constexpr int64_t K = 1024, N = 5120, G = 8, M = 1, per_rep = 8;

// Best of 15 repetitions of per_rep matrices per thread; `unit(wm, u)` does slab u (4 slabs of
// 256 rows, as the kernel cuts) of the matrix at wm.
template <class F>
double best_seconds(int threads, int64_t copies, size_t matrix_bytes, const uint8_t* w, F&& unit) {
  double best = 1e9;
  for (int r = 0; r < 15; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> th;
    for (int t = 0; t < threads; ++t)
      th.emplace_back([&, t, r] {
        for (int c = 0; c < per_rep; ++c) {
          const uint8_t* wm = w + size_t((r * per_rep + c) % copies) * matrix_bytes;
          for (int u = t; u < 4; u += threads) unit(wm, u);
        }
      });
    for (auto& h : th) h.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}
}  // namespace

int main() {
  if (!harness::has_avx2()) return 0;
  const int level = isa();
  std::vector<float> x(M * K, 1.0f), y(4 * M * N);
  std::vector<uint16_t> xb(M * K, 0x3f80), exact(G * N, 0x3c00), any(G * N, 0x3c01);
  std::atomic<long> sink{0};
  for (int bits : {8, 4}) {
    const int64_t copies = bits == 8 ? 40 : 80;
    const size_t bytes = size_t(bits == 8 ? K * N : K / 2 * N);
    std::vector<uint8_t> w(bytes * copies);
    for (size_t i = 0; i < w.size(); ++i) w[i] = uint8_t((i * 2654435761u) >> 24);
    const size_t slab = bytes / 4;
    struct Kind {
      const char* name;
      int what;  // 0 plain read; 1 bf16 x, exact scales; 2 f32 x, exact; 3 bf16 x, any scales; 4 AVX2, bf16 x, exact
      int level;  // the ISA level it needs
    };
    const std::vector<Kind> all = bits == 8 ? std::vector<Kind>{{"plain read", 0, kAvx2},
                                                                {"int8 GEMV", 1, kAvx512},
                                                                {"int8 GEMV avx2", 4, kAvx2}}
                                            : std::vector<Kind>{{"plain read", 0, kAvx2},
                                                                {"int4 exact", 1, kAvx512Bf16},
                                                                {"int4 exact f32x", 2, kAvx512Bf16},
                                                                {"int4 any scale", 3, kAvx512Bf16},
                                                                {"int4 exact avx2", 4, kAvx2}};
    std::vector<Kind> kinds;
    for (const Kind& kind : all)
      if (level >= kind.level) kinds.push_back(kind);
    for (const Kind& kind : kinds)
      for (int threads : {1, 2}) {
        const double s = best_seconds(threads, copies, bytes, w.data(), [&](const uint8_t* wm, int u) {
          if (kind.what == 0) {
            sink += harness::read_sum(reinterpret_cast<const int8_t*>(wm) + u * slab, slab);
            return;
          }
          QProblem p{x.data(), kind.what == 2 ? nullptr : xb.data(), reinterpret_cast<const int8_t*>(wm),
                     kind.what == 3 ? any.data() : exact.data(), y.data(), M, K, N, G, bits};
          if (kind.what == 4 && bits == 8) q8_block_256(p, u * 256, u * 256 + 256, 0, N, y.data() + u * N);
          else if (kind.what == 4) q4_block_256(p, u * 256, u * 256 + 256, 0, N, y.data() + u * N);
          else if (bits == 8) q8_block_512(p, u * 256, u * 256 + 256, 0, N, y.data() + u * N);
          else if (p.xb) q4_block_512<true>(p, u * 256, u * 256 + 256, 0, N, y.data() + u * N);
          else q4_block_512<false>(p, u * 256, u * 256 + 256, 0, N, y.data() + u * N);
        });
        std::printf("%-16s %d thread(s): %.3f ms per matrix, %.1f GB/s of %s\n", kind.name, threads,
                    s * 1e3 / per_rep, double(per_rep * bytes) / s / 1e9, bits == 8 ? "int8" : "packed int4");
      }
  }
  return 0;
}
