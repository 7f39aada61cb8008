// The logits kernels alone, outside XLA: [1, 1024] bf16 activations x an int8 table
// [131072, 1024] (134 MB), 1 and 2 threads (each thread a contiguous range of rows, as the
// kernel's workers run), against a plain streaming read of the same bytes: the f32 path (widen,
// convert, FMA; AVX-512 and AVX2) and, on a CPU with AVX-512 VNNI, the integer path (digit
// planes + vpdpbusd). Then a batch: 1-64 rows of x, 2 threads, the bf16 path (each block of
// table rows widened once) and, on a CPU with AMX, the int8 tiles (docs/PERFORMANCE.md, "AMX
// logits").
// Four tables are read in rotation (536 MB: past the caches of the machines seen so far, one of
// which had a 480 MB L3), median of 12 passes. docs/PERFORMANCE.md, "Decode, fourth round" and
// "Decode, fifth round". The kernels' prefetch hint is a compile flag: add
// -DGROKCTL_PREFETCH_HINT=_MM_HINT_T0 to time the L1 prefetch they used before. HUGE=1 in the
// environment puts the tables on 2 MB pages (madvise).
//
//   g++ -O3 -std=c++20 -pthread -isystem $(python -c "import jax; print(jax.ffi.include_dir())") \
//       benchmarks/logits_harness.cc -o /tmp/logits_harness && /tmp/logits_harness
#include "harness.h"

#include <sys/mman.h>

int main() {
  if (!harness::has_avx2()) return 0;
  const int64_t V = 131072, D = 1024, tables = 4;
  const size_t bytes = size_t(V * D);
  std::vector<int8_t*> ts;
  for (int64_t j = 0; j < tables; ++j) {
    int8_t* t = static_cast<int8_t*>(std::aligned_alloc(size_t(1) << 21, bytes));
    if (std::getenv("HUGE")) madvise(t, bytes, MADV_HUGEPAGE);
    for (size_t i = 0; i < bytes; ++i) t[i] = int8_t(((i + size_t(j)) * 2654435761u) >> 24);
    ts.push_back(t);
  }
  std::vector<float> x(D), y(V);
  std::vector<uint16_t> xb(D);
  for (int64_t i = 0; i < D; ++i) {
    xb[size_t(i)] = uint16_t(0x3c00 + (i * 37) % 200) ^ uint16_t((i % 3 == 0) << 15);  // +-[0.0078, 0.05]
    x[size_t(i)] = bf16_to_f32(xb[size_t(i)]);
  }
  XPlanes planes;
  make_planes(xb.data(), 1, D, planes);
  const int level = isa();
  const char* names[] = {"plain read", "f32 logits", "vnni logits", "f32 avx2"};
  const int needs[] = {kAvx2, kAvx512, kAvx512Vnni, kAvx2};
  std::atomic<long> sink{0};
  for (int threads : {1, 2})
    for (int kind = 0; kind < 4; ++kind) {
      if (level < needs[kind]) continue;
      std::vector<double> secs;
      for (int rep = 0; rep < 12; ++rep) {
        const int8_t* t = ts[size_t(rep % tables)];
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<std::thread> th;
        for (int k = 0; k < threads; ++k)
          th.emplace_back([&, k] {
            const int64_t v0 = V / threads * k, v1 = V / threads * (k + 1);
            const NTP<int8_t> p{x.data(), xb.data(), t, y.data(), 1, D, V};
            if (kind == 0) {
              sink += harness::read_sum(t + v0 * D, size_t((v1 - v0) * D));
            } else {
              for (int64_t u = v0; u < v1; u += kTableRows) {
                const int64_t u1 = std::min(v1, u + kTableRows);
                if (kind == 1) nt_rows_512(p, u, u1);
                else if (kind == 2) ntq_rows_vnni(p, planes, u, u1);
                else nt_rows_256(p, u, u1);
              }
            }
          });
        for (auto& h : th) h.join();
        secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(secs.begin(), secs.end());
      const double med = secs[secs.size() / 2];
      std::printf("%-12s %d thread(s): %.2f ms per table, %.1f GB/s\n", names[kind], threads,
                  med * 1e3, double(bytes) / med / 1e9);
    }
  // Batched decode: M rows of x over the table, 2 threads. The bf16 path (each block of table
  // rows widened once, then vdpbf16ps per row of x) against, on a CPU with AMX, the integer path
  // on AMX-INT8 tiles (digit planes as B tiles; the planes and tiles made once per call, timed).
  if (level >= kAvx512Bf16)
    for (int64_t M : {1, 2, 4, 8, 16, 32, 64}) {
      std::vector<uint16_t> xm(size_t(M * D));
      for (int64_t i = 0; i < M * D; ++i) xm[size_t(i)] = xb[size_t(i % D)] ^ uint16_t((i / D) * 7 % 64);
      std::vector<float> xf(size_t(M * D)), ym(size_t(M * V));
      for (int64_t i = 0; i < M * D; ++i) xf[size_t(i)] = bf16_to_f32(xm[size_t(i)]);
      for (int kind = 0; kind < 2; ++kind) {
        if (kind == 1 && level < kAmx) continue;
        std::vector<double> secs;
        std::vector<int8_t> xt;
        DigitScale ds;
        for (int rep = 0; rep < 12; ++rep) {
          const int8_t* t = ts[size_t(rep % tables)];
          const NTP<int8_t> p{xf.data(), xm.data(), t, ym.data(), M, D, V};
          const auto t0 = std::chrono::steady_clock::now();
          if (kind == 1) {
            make_planes(xm.data(), M, D, planes);
            xt.resize(size_t(amx_digit_size(M, D)));
            amx_digit_tiles(planes, M, D, xt.data());
            digit_scale(planes, M, ds);
          }
          std::vector<std::thread> th;
          for (int k = 0; k < 2; ++k)
            th.emplace_back([&, k] {
              for (int64_t u = V / 2 * k; u < V / 2 * (k + 1); u += kTableRows) {
                if (kind == 0) ntq_rows_bf16(p, u, u + kTableRows);
                else ntq_rows_amx(p, planes, ds, xt.data(), 0, u, u + kTableRows);
              }
            });
          for (auto& h : th) h.join();
          secs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(secs.begin(), secs.end());
        const double med = secs[secs.size() / 2];
        std::printf("%-12s M %2ld, 2 threads: %.2f ms per table, %.1f GB/s\n", kind ? "amx int8" : "bf16 widen",
                    long(M), med * 1e3, double(bytes) / med / 1e9);
      }
    }
  for (int8_t* t : ts) std::free(t);
}
