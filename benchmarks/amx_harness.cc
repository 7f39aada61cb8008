// The int8 product of M rows of x on the AMX tiles (q8_block_amx) against the AVX-512 kernel
// (q8_block_512), one thread, over a bench-l2 expert's gate/up shape (bf16 x, one scale group)
// and its output projection (f32 x, 8 groups), units cut as slab_gemv_many cuts them; 8 copies
// in rotation, best of 3. Also the largest difference between the two results (f32 sums in
// another order) relative to the largest output. docs/PERFORMANCE.md, "AMX for several rows".
//
//   g++ -O3 -std=c++20 -pthread -isystem $(python -c "import jax; print(jax.ffi.include_dir())") \
//       benchmarks/amx_harness.cc -o /tmp/amx_harness && /tmp/amx_harness
#include <random>

#include "harness.h"

int main() {
  if (isa() < kAmx) {
    std::printf("this CPU (or this kernel) has no AMX-BF16: nothing to time\n");
    return 0;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  struct Shape {
    int64_t K, N, G;
    bool bf16;
  };
  for (const Shape sh : {Shape{1024, 5120, 1, true}, Shape{5120, 1024, 8, false}}) {
    const int64_t K = sh.K, N = sh.N, G = sh.G, copies = 8;
    std::vector<int8_t> w(size_t(K * N * copies));
    for (auto& v : w) v = int8_t(int(rng() % 255) - 127);
    std::vector<uint16_t> s(size_t(G * N));
    for (auto& v : s) v = uint16_t(0x3c00 + rng() % 128);
    for (const int64_t M : {1, 4, 8, 16, 32, 64}) {
      std::vector<float> x(size_t(M * K));
      std::vector<uint16_t> xb(size_t(M * K));
      for (size_t i = 0; i < x.size(); ++i) {
        const float f = normal(rng) * 0.1f;
        uint32_t u;
        std::memcpy(&u, &f, 4);
        xb[i] = uint16_t(u >> 16);
        x[i] = sh.bf16 ? bf16_to_f32(xb[i]) : f;
      }
      std::vector<float> y[2] = {std::vector<float>(size_t(M * N)), std::vector<float>(size_t(M * N))};
      std::vector<float> part(size_t(M * N));
      const uint16_t* xbp = sh.bf16 ? xb.data() : nullptr;
      std::vector<uint16_t> tiles(size_t(amx_x_size(M, K, xbp)));
      const int64_t rows = slab_rows(K), cols = slab_cols(M);
      auto run = [&](int amx, int64_t c) {
        QProblem p{x.data(), xbp, w.data() + c * K * N, s.data(), y[amx].data(), M, K, N, G};
        if (amx) {  // once per call in the library (gemv_many), so inside the timing here
          amx_x_tiles(p.x, p.xb, M, K, tiles.data());
          p.xt = tiles.data();
          p.xplanes = amx_planes(p.xb);
        }
        std::fill(y[amx].begin(), y[amx].end(), 0.f);
        for (int64_t k0 = 0; k0 < K; k0 += rows)
          for (int64_t n0 = 0; n0 < N; n0 += cols) {
            const int64_t k1 = std::min(K, k0 + rows), n1 = std::min(N, n0 + cols);
            if (amx) q8_block_amx(p, k0, k1, n0, n1, part.data());
            else q8_block_512(p, k0, k1, n0, n1, part.data());
            for (int64_t m = 0; m < M; ++m)
              for (int64_t n = n0; n < n1; ++n) y[amx][size_t(m * N + n)] += part[size_t(m * N + n)];
          }
      };
      double ms[2];
      for (int amx = 0; amx < 2; ++amx) {
        double best = 1e9;
        for (int rep = 0; rep < 3; ++rep) {
          const auto t0 = std::chrono::steady_clock::now();
          for (int64_t c = 0; c < copies; ++c) run(amx, c);
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / copies);
        }
        ms[amx] = best * 1e3;
      }
      double diff = 0, top = 0;
      for (size_t i = 0; i < y[0].size(); ++i) {
        diff = std::max(diff, double(std::fabs(y[0][i] - y[1][i])));
        top = std::max(top, double(std::fabs(y[0][i])));
      }
      std::printf("%4ld x %4ld, %s x, M %2ld: AVX-512 %.3f ms, AMX %.3f ms (%.2fx); max diff %.1e of max\n", K, N,
                  sh.bf16 ? "bf16" : "f32 ", M, ms[0], ms[1], ms[0] / ms[1], diff / top);
    }
  }
  return 0;
}
