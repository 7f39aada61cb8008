// grokctl CPU kernels, called from JAX through the XLA FFI (grokctl/kernels/__init__.py).
//
// grokctl_qmatmul:  y[M, N] f32 = x[M, K] (f32 | bf16) @ dequant(w int8 [(E,) K, N], s bf16 [(E,) G, N])
//   with expert index e (int32 scalar; 0 for a 2-D weight). Weights are dequantized exactly,
//   float(int8) * float(scale) (no bf16 rounding of the weight: the fixture's "exact dequant,
//   bf16 activations" variant of the reference's `int8 * bf16`), products accumulated in f32.
//   Weights are streamed once, row by row, and dequantized in registers.
// grokctl_qmatmul4: the same over packed int4 [(E,) K/2, N]; each weight is round_to_bf16(nibble
//   * scale) (the native int4 format's value). A scale group whose scales have 5 significant bits
//   (quantize's) needs no rounding: it is summed unscaled and scaled once (int4_group_exact).
// grokctl_matmul_nt_bf16:  y[M, V] f32 = x[M, D] bf16 @ table[V, D]^T bf16, f32 accumulation
//   (the tied unembedding's logits); the table may be given as its bit patterns (uint16).
//
// ISA: AVX-512 (F/BW/VL) and AVX2+FMA variants compiled with target attributes and chosen at run
// time with __builtin_cpu_supports, plus a portable scalar path; a library never executes an
// instruction the CPU lacks. Where the CPU has AMX (and Linux grants the tile state), int8
// products of 8 or more rows of x run on the bf16 tiles (q8_block_amx) and the logits of 2 or
// more rows over an int8 table on the int8 tiles (ntq_rows_amx). Threads: the XLA intra-op
// thread pool (FFI ThreadPool context), at most GROKCTL_CPU_THREADS (default: the CPUs this
// process may run on).

#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define GROKCTL_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even at bf16 precision (finite values), kept as an f32.
inline float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

struct QProblem {
  const float* x;     // [M, K]
  const uint16_t* xb; // [M, K] bf16 bits when x was given in bf16, else nullptr
  const int8_t* w;    // [K, N]
  const uint16_t* s;  // [G, N] bf16 bits
  float* y;           // [M, N]
  int64_t M, K, N, G;
  int bits = 8;       // 8: int8 [K, N]; 4: packed int4 [K/2, N] (rows 2i, 2i+1 in a byte)
  const uint16_t* xt = nullptr;  // x as AMX tiles (amx_x_tiles), when the AMX path takes it
  int xplanes = 0;
};

// y[M, V] = x[M, D] @ t[V, D]^T over a table of bf16 bits (T = uint16_t) or of int8 rows
// (T = int8_t: native int8-per-row embeddings; the caller scales the rows).
template <class T>
struct NTP {
  const float* x;     // [M, D]
  const uint16_t* xb; // [M, D] bf16 bits when x was given in bf16, else nullptr
  const T* t;         // [V, D]
  float* y;           // [M, V]
  int64_t M, D, V;
};
using NTProblem = NTP<uint16_t>;

// A GEMV unit's accumulators, per thread: the unit's sums and a scale group's (w columns x MB
// rows <= 6144, slab_cols, plus padding). The address of a thread_local in a shared library is a
// __tls_get_addr call, and GCC recomputes it rather than keep it in a register when registers
// run short — inside the kernels' inner loops, with a vzeroupper and spilled vectors around each
// call (4 % of an int4 decode step's samples, `perf`). A unit takes the addresses once, through
// `opaque`, which hides where they came from.
struct UnitBuffers {
  alignas(64) float acc[6144 + 64 * 4];
  alignas(64) float ag[6144 + 64 * 4];
};
template <class T>
inline T* opaque(T* p) {
  asm("" : "+r"(p));
  return p;
}
inline UnitBuffers& unit_buffers() {
  static thread_local UnitBuffers buffers;
  return *opaque(&buffers);
}

// f(std::integral_constant<int, MB>{}, m0) over rows [0, M) in blocks of 4 and a 1-3 row tail:
// the register-blocked kernels are templates on the block height.
template <class F>
inline void row_blocks(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) f(std::integral_constant<int, 4>{}, m);
  switch (M - m) {
    case 3: f(std::integral_constant<int, 3>{}, m); break;
    case 2: f(std::integral_constant<int, 2>{}, m); break;
    case 1: f(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// f(std::integral_constant<int, R>{}, v, rs) over table rows [v0, v1), each call taking rows
// v + r rs, r < R: blocks of 4 rows rs apart (rows v + j + rs r of a block of 4 rs, j < rs: with
// rs = page_rows, one page apart), then the rest 4 at a time, then singly (rs = 1).
template <class F>
inline void table_blocks(int64_t v0, int64_t v1, int64_t rs, F&& f) {
  int64_t v = v0;
  for (; v + 4 * rs <= v1; v += 4 * rs)
    for (int64_t j = 0; j < rs; ++j) f(std::integral_constant<int, 4>{}, v + j, rs);
  for (; v + 4 <= v1; v += 4) f(std::integral_constant<int, 4>{}, v, int64_t(1));
  for (; v < v1; ++v) f(std::integral_constant<int, 1>{}, v, int64_t(1));
}

// Rows of the table per NT work unit, and rows of x per pass over a unit (the logits of a long
// prompt: x in L2-sized chunks, each unit's table rows read once from memory).
constexpr int64_t kTableRows = 256;
constexpr int64_t kNtRowChunk = 64;

// Work unit of the GEMV: a slab of kSlabRows weight rows x a chunk of at most kSlabCols(M)
// columns. A unit streams its slab row after row (each row a contiguous run of up to 24 KB, the
// next row right after it when the chunk is the whole width): the hardware prefetchers see one
// long stream. Its f32 accumulators (M x chunk) stay in L1. Slabs write partial sums that the
// caller adds in slab order, so results do not depend on the thread count.
// Rows per slab: at least 256, at most 16 slabs (a fixed function of K, not of the threads).
inline int64_t slab_rows(int64_t K) { return std::max<int64_t>(256, ((K + 15) / 16 + 7) / 8 * 8); }
inline int64_t slab_cols(int64_t M) { return std::max<int64_t>(64, (6144 / std::max<int64_t>(M, 1)) / 64 * 64); }

// Rows of `bytes` per 4 KB page. The L2 hardware prefetcher follows one stream per page; rows of
// 1-2 KB read side by side (a GEMV pass's 8 rows, a logits block's 4) put 2-4 streams in a page
// and the weights or the table streamed at 75-85 % of the read rate. The kernels take such rows
// `page_rows` apart instead, so that each page is read front to back, pass after pass, by one
// stream (docs/PERFORMANCE.md, "Decode, sixth round").
inline int64_t page_rows(int64_t bytes) { return bytes < 4096 ? (4096 + bytes - 1) / bytes : 1; }


// ---------------------------------------------------------------- scalar (any CPU, tails)
// int8 weight rows [k0, k1) x columns [n0, n1): partial sums into out (row stride N), in the
// vector paths' form: a scale group's rows summed unscaled, then scaled once.
void q8_block_scalar(const QProblem& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out) {
  const int64_t kb = p.K / p.G;
  std::vector<float> acc(n1 - n0), ag(n1 - n0);
  for (int64_t m = 0; m < p.M; ++m) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const float* xm = p.x + m * p.K;
    for (int64_t k = k0; k < k1;) {
      const int64_t gend = std::min(k1, (k / kb + 1) * kb);
      const uint16_t* sr = p.s + (k / kb) * p.N;
      std::fill(ag.begin(), ag.end(), 0.0f);
      for (; k < gend; ++k) {
        const int8_t* wr = p.w + k * p.N;
        for (int64_t n = n0; n < n1; ++n) ag[n - n0] += xm[k] * float(wr[n]);
      }
      for (int64_t n = n0; n < n1; ++n) acc[n - n0] += bf16_to_f32(sr[n]) * ag[n - n0];
    }
    std::copy(acc.begin(), acc.end(), out + m * p.N + n0);
  }
}

inline int nibble(uint8_t b, int high) {  // two's-complement 4-bit value
  const int v = high ? (b >> 4) : (b & 15);
  return v >= 8 ? v - 16 : v;
}

// An int4 scale group is exact when nibble x scale is a bf16 value for every nibble (|q| <= 8):
// each scale has at most 5 significant bits (its 3 lowest mantissa bits zero; `quantize` writes
// such scales, format.INT4_SCALE_BITS), is normal and 8 x scale finite — or is zero. Then the
// model's value round_bf16(nibble x scale) is nibble x scale, and the GEMV sums x . nibble
// unscaled over the group and scales once (int8's form): a table lookup per nibble instead of
// a convert, a multiply, a rounding and a pairing.
inline bool int4_group_exact(const uint16_t* s, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t mag = s[i] & 0x7fffu, e = mag >> 7;
    bad |= (mag & 7u) | uint32_t(mag != 0 && (e == 0 || e > 251));
  }
  return bad == 0;
}

// The 16 nibbles' values: as bf16 bits (32 entries, index & 15 the nibble, for a 5-bit vpermw
// index) and as f32.
struct NibbleTables {
  alignas(64) uint16_t bf16[32];
  alignas(64) float f32[16];
  NibbleTables() {
    for (int i = 0; i < 32; ++i) {
      const float f = float(nibble(uint8_t(i & 15), 0));
      uint32_t u;
      std::memcpy(&u, &f, 4);
      bf16[i] = uint16_t(u >> 16);  // small integers: exact in bf16
      if (i < 16) f32[i] = f;
    }
  }
};
const NibbleTables kNibbles;

// int4 weight rows [k0, k1) x columns [n0, n1): partial sums into out (row stride N).
void q4_block_scalar(const QProblem& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out) {
  const int64_t kb = p.K / p.G;
  const uint8_t* w8 = reinterpret_cast<const uint8_t*>(p.w);
  std::vector<float> acc(n1 - n0);
  for (int64_t m = 0; m < p.M; ++m) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const float* xm = p.x + m * p.K;
    for (int64_t k = k0; k < k1; ++k) {
      const uint8_t* wr = w8 + (k / 2) * p.N;
      const uint16_t* sr = p.s + (k / kb) * p.N;
      const float xv = xm[k];
      for (int64_t n = n0; n < n1; ++n)
        acc[n - n0] += xv * round_bf16(float(nibble(wr[n], int(k & 1))) * bf16_to_f32(sr[n]));
    }
    std::copy(acc.begin(), acc.end(), out + m * p.N + n0);
  }
}

inline float table_f32(uint16_t h) { return bf16_to_f32(h); }
inline float table_f32(int8_t q) { return float(q); }

template <class T>
void nt_rows_scalar(const NTP<T>& p, int64_t v0, int64_t v1) {
  for (int64_t v = v0; v < v1; ++v) {
    const T* tr = p.t + v * p.D;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xm = p.x + m * p.D;
      float acc = 0.0f;
      for (int64_t d = 0; d < p.D; ++d) acc += xm[d] * table_f32(tr[d]);
      p.y[m * p.V + v] = acc;
    }
  }
}

// x split into digit planes for the int8-table logits on VNNI (see ntq_block_vnni).
constexpr int kPlanes = 4;

struct XPlanes {
  int64_t Dp = 0;                      // D rounded up to 64 (digits zero-padded)
  std::vector<int8_t> digits;          // [M, kPlanes, Dp]
  std::vector<int64_t> bias;           // [M]: 128 sum_k 128^(kPlanes-1-k) sum_i dk_i
  std::vector<int> exps;               // [M]: e
  std::vector<std::vector<std::pair<int64_t, float>>> rest;  // [M]: (i, r_i) where r_i != 0
};

// False (nothing usable) when a row of x holds an inf or NaN: the f32 path propagates them.
inline bool make_planes(const uint16_t* xb, int64_t M, int64_t D, XPlanes& xp) {
  xp.Dp = (D + 63) / 64 * 64;
  xp.digits.assign(size_t(M * kPlanes * xp.Dp), 0);
  xp.bias.assign(size_t(M), 0);
  xp.exps.assign(size_t(M), 0);
  xp.rest.assign(size_t(M), {});
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.0f;
    for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(bf16_to_f32(xb[m * D + i])));
    if (!std::isfinite(amax)) return false;
    int e = 0;
    std::frexp(amax, &e);  // amax < 2^e (0 for an all-zero row: every digit 0)
    xp.exps[size_t(m)] = e;
    for (int64_t i = 0; i < D; ++i) {
      float r = std::ldexp(bf16_to_f32(xb[m * D + i]), 6 - e);  // |r| < 64
      for (int k = 0; k < kPlanes; ++k) {
        const float d = std::nearbyint(r);
        xp.digits[size_t((m * kPlanes + k) * xp.Dp + i)] = int8_t(d);
        xp.bias[size_t(m)] += int64_t(d) * (int64_t(1) << (7 * (kPlanes - 1 - k) + 7));
        r = (r - d) * 128.0f;  // exact; |r| <= 64
      }
      if (r != 0.0f) xp.rest[size_t(m)].emplace_back(i, r);
    }
  }
  return true;
}

// What one unit of row m's combined digit sums is worth: 2^(e-6) 128^-(kPlanes-1), a power of two.
inline double plane_unit(const XPlanes& xp, int64_t m) {
  return std::ldexp(1.0, xp.exps[size_t(m)] - 6 - 7 * (kPlanes - 1));
}

// t (row m's exact digit sum against table row `row`, in units) plus its remainders' products,
// added in one order by every path (the logits of a row are the same bits on each).
inline double add_remainders(const XPlanes& xp, int64_t m, const int8_t* row, double t) {
  for (const auto& [i, rem] : xp.rest[size_t(m)]) t += double(rem) * double(row[i]) / 128.0;
  return t;
}

#ifdef GROKCTL_X86
// Software prefetches of the weight stream go to L2 (T1), not L1: an L1 prefetch holds one of
// the core's few L1 miss buffers until its line arrives, so with the dequantize/FMA work in
// flight the loads never overlapped it (the logits over an int8 table ran at the sum of compute
// time and read time: 16 ms on one AMD Zen 4 thread; 5.4 ms, the plain read rate, with T1).
#ifndef GROKCTL_PREFETCH_HINT
#define GROKCTL_PREFETCH_HINT _MM_HINT_T1
#endif
constexpr auto kPrefetch = GROKCTL_PREFETCH_HINT;
// How far ahead the logits kernels prefetch, in table rows (16 KB-32 KB on a 1024-wide table).
constexpr int64_t kTablePrefetchRows = 16;

// A GEMV pass's prefetch at column c of its rows wr[0..U): at every 64th column, the same column
// of the next pass's rows (`ahead` bytes on), one line each, into L2.
template <int U, class T>
inline void prefetch_next_pass(const T* const (&wr)[U], int64_t ahead, int64_t c) {
  if (c % 64 == 0)
    for (int u = 0; u < U; ++u) _mm_prefetch(reinterpret_cast<const char*>(wr[u] + ahead + c), kPrefetch);
}

// ---------------------------------------------------------------- AVX-512
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

// int8 x bf16 scale, exactly (an 8-bit by 8-bit product fits f32's 24-bit significand).
AVX512 inline __m512 dequant16_512(__m128i raw, __m512 s) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), s);
}

AVX512 inline __m512 load_bf16x16_512(const uint16_t* ptr, __mmask16 mask) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, ptr)), 16));
}

// acc[m] += scale_n * ag[m] over a unit's columns: a scale group's unscaled sums into the unit's.
template <int MB>
AVX512 inline void fold_group_512(float* acc, const float* ag, const uint16_t* srow, int64_t stride,
                                  int nv, __mmask16 last) {
  for (int v = 0; v < nv; ++v) {
    const __m512 sv = load_bf16x16_512(srow + v * 16, v == nv - 1 ? last : __mmask16(0xffff));
    for (int m = 0; m < MB; ++m) {
      float* a = acc + m * stride + v * 16;
      _mm512_store_ps(a, _mm512_fmadd_ps(sv, _mm512_load_ps(ag + m * stride + v * 16), _mm512_load_ps(a)));
    }
  }
}

// The int8 GEMV. A scale group's rows are summed unscaled, sum_k x_k * float(q_kn) (exact
// products of a bf16 or f32 x and an int8, f32 sums), in a group accumulator; at the group's end
// the unit's accumulator takes scale_gn * that sum. Per 16 weights: one widening load, one
// convert, one FMA per row of x, so two cores stream the weights at their read bandwidth
// (benchmarks/gemv_harness.cc). Eight weight rows per pass, rs rows apart (q8_unit_512), each
// prefetched a block ahead, their products summed in two chains of four (docs/PERFORMANCE.md,
// "Decode, sixth round").
template <int MB, int U>
AVX512 void q8_rows_512(const QProblem& p, float* ag, int64_t stride, int64_t m0, int64_t n0,
                        int nv, __mmask16 last, int64_t k, int64_t rs) {
  const int8_t* wr[U];
  __m512 xf[MB][U];
  for (int u = 0; u < U; ++u) {
    wr[u] = p.w + (k + u * rs) * p.N + n0;
    for (int m = 0; m < MB; ++m) xf[m][u] = _mm512_set1_ps(p.x[(m0 + m) * p.K + k + u * rs]);
  }
  auto step = [&](int v, auto masked) AVX512 {
    constexpr bool M_ = decltype(masked)::value;
    const __mmask16 mask = M_ ? last : __mmask16(0xffff);
    prefetch_next_pass(wr, U * rs * p.N, v * 16);
    // Two chains per row (the pass's first and second half of rows, added at the end): half the
    // FMA latency chain per step, so more steps' loads are in flight ("Decode, sixth round").
    constexpr int H = U > 1 ? U / 2 : U;
    __m512 a[MB], b[MB];
    for (int m = 0; m < MB; ++m) a[m] = _mm512_load_ps(ag + m * stride + v * 16), b[m] = _mm512_setzero_ps();
    for (int u = 0; u < U; ++u) {
      const __m128i raw = M_ ? _mm_maskz_loadu_epi8(mask, wr[u] + v * 16)
                             : _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[u] + v * 16));
      const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
      for (int m = 0; m < MB; ++m) {
        if (u < H) a[m] = _mm512_fmadd_ps(xf[m][u], wf, a[m]);
        else b[m] = _mm512_fmadd_ps(xf[m][u], wf, b[m]);
      }
    }
    for (int m = 0; m < MB; ++m)
      _mm512_store_ps(ag + m * stride + v * 16, U > 1 ? _mm512_add_ps(a[m], b[m]) : a[m]);
  };
  const int full = last == __mmask16(0xffff) ? nv : nv - 1;
  for (int v = 0; v < full; ++v) step(v, std::false_type{});
  if (full < nv) step(full, std::true_type{});
}

// Rows [m0, m0+MB), weight rows [k0, k1), columns [n0, n0+w) (w <= slab_cols(M)): partial sums
// into out (row stride N).
template <int MB>
AVX512 void q8_unit_512(const QProblem& p, int64_t m0, int64_t k0, int64_t k1, int64_t n0,
                        int64_t w, float* out) {
  UnitBuffers& ub = unit_buffers();
  float* const acc = ub.acc;
  float* const ag = ub.ag;
  const int64_t stride = (w + 15) / 16 * 16;
  const int nv = int(stride / 16);
  const __mmask16 last = (w % 16) ? __mmask16((1u << (w % 16)) - 1) : __mmask16(0xffff);
  std::memset(acc, 0, sizeof(float) * stride * MB);
  const int64_t kb = p.K / p.G;
  // A pass's 8 rows in 8 different pages (page_rows): rows k + j + rs u of a block of 8 rs,
  // pass j = 0 .. rs-1; the group's rows past the last whole block 8 at a time.
  const int64_t rs = page_rows(p.N);
  for (int64_t k = k0; k < k1;) {
    const int64_t gend = std::min(k1, (k / kb + 1) * kb);
    const uint16_t* srow = p.s + (k / kb) * p.N + n0;
    std::memset(ag, 0, sizeof(float) * stride * MB);
    for (; k + 8 * rs <= gend; k += 8 * rs)
      for (int64_t j = 0; j < rs; ++j) q8_rows_512<MB, 8>(p, ag, stride, m0, n0, nv, last, k + j, rs);
    for (; k + 8 <= gend; k += 8) q8_rows_512<MB, 8>(p, ag, stride, m0, n0, nv, last, k, 1);
    for (; k < gend; ++k) q8_rows_512<MB, 1>(p, ag, stride, m0, n0, nv, last, k, 1);
    fold_group_512<MB>(acc, ag, srow, stride, nv, last);
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < nv; ++v) {
      const __mmask16 mask = v == nv - 1 ? last : __mmask16(0xffff);
      _mm512_mask_storeu_ps(out + (m0 + m) * p.N + n0 + v * 16, mask,
                            _mm512_load_ps(acc + m * stride + v * 16));
    }
}

AVX512 void q8_block_512(const QProblem& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out) {
  row_blocks(p.M, [&](auto mb, int64_t m0) AVX512 {
    q8_unit_512<decltype(mb)::value>(p, m0, k0, k1, n0, n1 - n0, out);
  });
}

// ---------------------------------------------------------------- AMX (bf16 tiles)
// The int8 GEMM for several rows of x (batched decode, a MoE step's experts with several rows)
// on the AMX tile unit: each weight, an int8, is exactly a bf16; x is bf16 (as given) or, for f32
// x, three bf16 planes whose sum is x exactly (x = hi + mid + lo, each the truncation of what is
// left). TDPBF16PS multiplies bf16 pairs exactly and sums in f32, so a scale group's sums are
// x . int8 over the group's rows, as the AVX-512 kernel's (exact products, f32 sums; another
// order), scaled once per group. The weights are converted into tiles once per unit (one pass
// over its slab, two rows at a time: the VNNI pair layout) and every row of x reuses them:
// ~10 vector instructions per 32 weights whatever M, where the FMA kernel spends M / 16 FMAs
// per weight. Tiles are 16 rows x 64 bytes: C (sums) 0-3; pairs of row blocks take A (x) 4 and 5,
// B (weights) 6 and 7 (amx_cblock22), a last odd row block A 4 and 7, B 5 and 6 (amx_cblock).
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")))
#define AMX_TILES __attribute__((target("avx512f,avx512bw,avx512vl")))  // laying out x for the tiles

constexpr int64_t kTile = 512;  // bf16 elements of a 16 x 32 tile (1 KB)

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// x [M, K] as A tiles: [planes][ceil(M / 16)][K / 32][16 rows][32] bf16 bits, rows past M zero;
// planes = 1 (bf16 x, its bits) or 3 (f32 x: hi + mid + lo; a non-finite x is hi alone, quiet).
inline int amx_planes(const uint16_t* xb) { return xb ? 1 : 3; }
inline int64_t amx_x_size(int64_t M, int64_t K, const uint16_t* xb) {
  return amx_planes(xb) * (M + 15) / 16 * (K / 32) * kTile;
}
// 16 bits (the top half of each of 16 f32 lanes), as 16 uint16.
AMX_TILES inline __m256i high_halves(__m512i v) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)); }
// A row's 32 elements of one k-step, x as given (bf16 bits, or f32 in three planes), into the
// planes' tile rows (plane_stride elements apart). f32: each plane the truncation to bf16 of what
// is left (r - piece is exact and never overflows); a non-finite lane is hi alone (a NaN quiet),
// its other planes zero — the three sum to x exactly for every finite x.
AMX_TILES inline void amx_x_row(const float* x, const uint16_t* xb, uint16_t* dst, int64_t plane_stride) {
  if (xb) {
    std::memcpy(dst, xb, 64);
    return;
  }
  const __m512i top = _mm512_set1_epi32(int(0xffff0000u));
  for (int h = 0; h < 2; ++h) {
    __m512 r = _mm512_loadu_ps(x + 16 * h);
    const __m512i u = _mm512_castps_si512(r);
    const __mmask16 finite =
        _mm512_cmpneq_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7f800000)), _mm512_set1_epi32(0x7f800000));
    const __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
    for (int pl = 0; pl < 3; ++pl) {
      const __m512i piece = _mm512_and_si512(_mm512_castps_si512(r), top);
      __m512i bits = pl == 0 ? _mm512_mask_or_epi32(piece, nan, piece, _mm512_set1_epi32(0x400000))
                             : _mm512_maskz_mov_epi32(finite, piece);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + pl * plane_stride + 16 * h), high_halves(bits));
      r = _mm512_sub_ps(r, _mm512_castsi512_ps(piece));
    }
  }
}
// Row blocks [rb0, rb1) of x's tiles (all of them by default).
AMX_TILES inline void amx_x_tiles(const float* x, const uint16_t* xb, int64_t M, int64_t K, uint16_t* dst,
                                  int64_t rb0 = 0, int64_t rb1 = -1) {
  const int64_t nrb = (M + 15) / 16, ks = K / 32, planes = amx_planes(xb), plane = nrb * ks * kTile;
  for (int64_t m = rb0 * 16; m < (rb1 < 0 ? nrb : rb1) * 16; ++m)
    for (int64_t s = 0; s < ks; ++s) {
      uint16_t* row = dst + ((m / 16 * ks + s) * 16 + m % 16) * 32;
      if (m < M) {
        amx_x_row(x + m * K + s * 32, xb ? xb + m * K + s * 32 : nullptr, row, plane);
      } else {
        for (int64_t pl = 0; pl < planes; ++pl) std::memset(row + pl * plane, 0, 64);
      }
    }
}

// Rows k and k+1 of a unit's w columns as one VNNI-paired row of each of its column blocks' B
// tiles: for columns c, bf16(w[k][c]), bf16(w[k+1][c]) side by side. b: the first block's row;
// blocks bstride elements apart.
AMX inline void amx_b_pair(const int8_t* r0, const int8_t* r1, int64_t w, uint16_t* b, int64_t bstride) {
  for (int64_t c = 0; c * 16 < w; ++c) {
    __m128i a, d;
    if ((c + 1) * 16 <= w) {
      a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + c * 16));
      d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + c * 16));
    } else {
      const __mmask16 m = __mmask16((1u << (w - c * 16)) - 1);
      a = _mm_maskz_loadu_epi8(m, r0 + c * 16);
      d = _mm_maskz_loadu_epi8(m, r1 + c * 16);
    }
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi8(a, d)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpackhi_epi8(a, d)));
    _mm512_storeu_si512(b + c * bstride, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
}

// GCC's tile intrinsics paste their register numbers into the instruction's text: they take
// literals only, so a template picks its instruction among the literal forms.
#define GROKCTL_TDP(t, a, b) \
  if constexpr (T == t && A == a && B == b) _tile_dpbf16ps(t, a, b);
template <int T, int A, int B>
AMX inline void amx_tdp() {
  GROKCTL_TDP(0, 4, 5) GROKCTL_TDP(1, 4, 5) GROKCTL_TDP(2, 4, 5) GROKCTL_TDP(3, 4, 5)
  GROKCTL_TDP(0, 7, 5) GROKCTL_TDP(1, 7, 5) GROKCTL_TDP(2, 7, 5) GROKCTL_TDP(3, 7, 5)
  GROKCTL_TDP(0, 4, 6) GROKCTL_TDP(1, 4, 6) GROKCTL_TDP(2, 4, 6) GROKCTL_TDP(3, 4, 6)
  GROKCTL_TDP(0, 7, 6) GROKCTL_TDP(1, 7, 6) GROKCTL_TDP(2, 7, 6) GROKCTL_TDP(3, 7, 6)
}
#undef GROKCTL_TDP

// C tile T += A . B over every plane of x: A tiles 4 and 7 in turn (rows of x), B in tile BT.
template <int T, int BT>
AMX inline void amx_planes_dot(const uint16_t* a, int64_t a_plane, int planes) {
  for (int pl = 0; pl < planes; ++pl) {
    if (pl % 2 == 0) {
      _tile_loadd(4, a + pl * a_plane, 64);
      amx_tdp<T, 4, BT>();
    } else {
      _tile_loadd(7, a + pl * a_plane, 64);
      amx_tdp<T, 7, BT>();
    }
  }
}

// k-step s into phase QI's C tiles (rb * Q + QI for each of the NB row blocks); B in tile 5 or 6.
template <int NB, int Q, int QI>
AMX inline void amx_step(const uint16_t* bt, const uint16_t* at, int64_t a_plane, int64_t a_rb, int planes,
                         int64_t s) {
  constexpr int BT = QI % 2 ? 6 : 5;
  if constexpr (BT == 5) _tile_loadd(5, bt + s * kTile, 64);
  else _tile_loadd(6, bt + s * kTile, 64);
  const uint16_t* a = at + s * kTile;
  amx_planes_dot<0 * Q + QI, BT>(a, a_plane, planes);
  if constexpr (NB > 1) amx_planes_dot<1 * Q + QI, BT>(a + a_rb, a_plane, planes);
  if constexpr (NB > 2) amx_planes_dot<2 * Q + QI, BT>(a + 2 * a_rb, a_plane, planes);
  if constexpr (NB > 3) amx_planes_dot<3 * Q + QI, BT>(a + 3 * a_rb, a_plane, planes);
}

// NB row blocks x one column block over `steps` k-steps of 32. The four C tiles are NB row blocks
// x Q = 4 / NB phases (k-step s adds into phase s % Q): independent sums, so consecutive
// TDPBF16PS do not wait for each other's results. The tiles are stored to c (tile t at c + 256 t,
// 16 x 16 f32); the caller adds a row block's phases.
template <int NB>
AMX void amx_cblock(const uint16_t* bt, const uint16_t* at, int64_t a_plane, int64_t a_rb, int planes,
                    int64_t steps, float* c) {
  constexpr int Q = 4 / NB;
  _tile_zero(0);
  if constexpr (NB * Q > 1) _tile_zero(1);
  if constexpr (NB * Q > 2) _tile_zero(2);
  if constexpr (NB * Q > 3) _tile_zero(3);
  int64_t s = 0;
  for (; s + Q <= steps; s += Q) {
    amx_step<NB, Q, 0>(bt, at, a_plane, a_rb, planes, s);
    if constexpr (Q > 1) amx_step<NB, Q, 1>(bt, at, a_plane, a_rb, planes, s + 1);
    if constexpr (Q > 2) amx_step<NB, Q, 2>(bt, at, a_plane, a_rb, planes, s + 2);
    if constexpr (Q > 3) amx_step<NB, Q, 3>(bt, at, a_plane, a_rb, planes, s + 3);
  }
  for (; s < steps; ++s) amx_step<NB, Q, 0>(bt, at, a_plane, a_rb, planes, s);
  _tile_stored(0, c, 64);
  if constexpr (NB * Q > 1) _tile_stored(1, c + 256, 64);
  if constexpr (NB * Q > 2) _tile_stored(2, c + 512, 64);
  if constexpr (NB * Q > 3) _tile_stored(3, c + 768, 64);
}

// Two row blocks x NC (1 or 2) column blocks over `steps` k-steps: C tile 2i + j for row block i,
// column block j; A (x) in tiles 4 and 5, B (weights) in 6 and 7, so each loaded tile feeds two
// products and a load never waits on the product before it in the same tile (the 4 x 1 form
// reloads one A tile per product: its TDPBF16PS ran ~7x slower than the unit's peak on 128
// rows). Stored as amx_cblock's: tile t at c + 256 t.
#define GROKCTL_TDP2(t, a, b) \
  if constexpr (T == t && A == a && B == b) _tile_dpbf16ps(t, a, b);
template <int T, int A, int B>
AMX inline void amx_tdp2() {
  GROKCTL_TDP2(0, 4, 6) GROKCTL_TDP2(1, 4, 7) GROKCTL_TDP2(2, 5, 6) GROKCTL_TDP2(3, 5, 7)
}
#undef GROKCTL_TDP2
template <int NC>
AMX void amx_cblock22(const uint16_t* bt, int64_t bstride, const uint16_t* at, int64_t a_plane, int64_t a_rb,
                      int planes, int64_t steps, float* c) {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (NC > 1) {
    _tile_zero(1);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(6, bt + s * kTile, 64);
    if constexpr (NC > 1) _tile_loadd(7, bt + bstride + s * kTile, 64);
    for (int pl = 0; pl < planes; ++pl) {
      const uint16_t* a = at + pl * a_plane + s * kTile;
      _tile_loadd(4, a, 64);
      _tile_loadd(5, a + a_rb, 64);
      amx_tdp2<0, 4, 6>();
      if constexpr (NC > 1) amx_tdp2<1, 4, 7>();
      amx_tdp2<2, 5, 6>();
      if constexpr (NC > 1) amx_tdp2<3, 5, 7>();
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(2, c + 512, 64);
  if constexpr (NC > 1) {
    _tile_stored(1, c + 256, 64);
    _tile_stored(3, c + 768, 64);
  }
}

// Rows [0, M) x weight rows [k0, k1) x columns [n0, n1): partial sums into out (row stride N),
// as q8_block_512. Needs p.xt (amx_x_tiles) and k0, k1 and the groups' bounds multiples of 32.
AMX void q8_block_amx(const QProblem& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out) {
  static thread_local std::vector<float> accv, cv;
  static thread_local std::vector<uint16_t> bv;
  const int64_t w = n1 - n0, ncb = (w + 15) / 16, stride = ncb * 16;
  const int64_t nrb = (p.M + 15) / 16, ksteps = p.K / 32, kb = p.K / p.G;
  const int64_t a_rb = ksteps * kTile, a_plane = nrb * a_rb;
  // One scale group (every int8 unit of whole weight rows): its scaled sums go straight to out;
  // several are added up in acc first.
  const bool direct = k0 / kb == (k1 - 1) / kb;
  if (!direct && accv.size() < size_t(p.M * stride)) accv.resize(size_t(p.M * stride));
  if (cv.size() < 1024) cv.resize(1024);
  float* const acc = accv.data();
  float* const cbuf = cv.data();
  if (!direct) std::memset(acc, 0, sizeof(float) * size_t(p.M * stride));
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
  for (int64_t k = k0; k < k1;) {
    const int64_t gend = std::min(k1, (k / kb + 1) * kb), steps = (gend - k) / 32;
    // One column block's tiles, then a line of padding: the blocks' rows, written side by side,
    // would otherwise lie a multiple of 4 KB apart, in one L1 set.
    const int64_t bstride = steps * kTile + 32;
    if (bv.size() < size_t(ncb * bstride + 32)) bv.resize(size_t(ncb * bstride + 32));
    uint16_t* const bt = bv.data() + (-reinterpret_cast<uintptr_t>(bv.data()) / 2 & 31);  // 64-byte aligned
    for (int64_t kk = k; kk < gend; kk += 2) {
      const int64_t ahead = kk + 16;
      if (ahead + 1 < k1)
        for (int64_t c = 0; c < w; c += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(p.w + ahead * p.N + n0 + c), kPrefetch);
          _mm_prefetch(reinterpret_cast<const char*>(p.w + (ahead + 1) * p.N + n0 + c), kPrefetch);
        }
      const int64_t s = (kk - k) / 32, r = ((kk - k) % 32) / 2;
      amx_b_pair(p.w + kk * p.N + n0, p.w + (kk + 1) * p.N + n0, w, bt + (s * 16 + r) * 32, bstride);
    }
    const uint16_t* srow = p.s + (k / kb) * p.N + n0;
    // rows [m0, m1) of column block c (its lanes `valid`) += sv * (the sum of q tiles at t, 256
    // floats apart), in acc or (direct) out
    auto add_tile = [&](const float* t, int64_t q, int64_t m0, int64_t m1, int64_t c, __m512 sv,
                        __mmask16 valid) AMX {
      for (int64_t m = m0; m < m1; ++m, t += 16) {
        __m512 sum = _mm512_loadu_ps(t);
        for (int64_t ph = 1; ph < q; ++ph) sum = _mm512_add_ps(sum, _mm512_loadu_ps(t + ph * 256));
        if (direct) {
          _mm512_mask_storeu_ps(out + m * p.N + n0 + c * 16, valid, _mm512_fmadd_ps(sv, sum, _mm512_setzero_ps()));
        } else {
          float* a = acc + m * stride + c * 16;
          _mm512_storeu_ps(a, _mm512_fmadd_ps(sv, sum, _mm512_loadu_ps(a)));
        }
      }
    };
    auto x_at = [&](int64_t rb) { return p.xt + rb * a_rb + (k / 32) * kTile; };  // row block rb's tiles
    for (int64_t c = 0; c < ncb; c += 2) {
      const int64_t nc = std::min<int64_t>(2, ncb - c);
      __m512 sv[2];
      __mmask16 valid[2];
      for (int64_t j = 0; j < nc; ++j) {
        valid[j] = __mmask16((1u << std::min<int64_t>(16, w - (c + j) * 16)) - 1);
        sv[j] = load_bf16x16_512(srow + (c + j) * 16, valid[j]);
      }
      int64_t rb0 = 0;
      for (; rb0 + 2 <= nrb; rb0 += 2) {  // pairs of row blocks x this pair of column blocks
        if (nc == 2) amx_cblock22<2>(bt + c * bstride, bstride, x_at(rb0), a_plane, a_rb, p.xplanes, steps, cbuf);
        else amx_cblock22<1>(bt + c * bstride, bstride, x_at(rb0), a_plane, a_rb, p.xplanes, steps, cbuf);
        for (int64_t i = 0; i < 2; ++i)
          for (int64_t j = 0; j < nc; ++j)
            add_tile(cbuf + (2 * i + j) * 256, 1, (rb0 + i) * 16, std::min(p.M, (rb0 + i + 1) * 16), c + j, sv[j],
                     valid[j]);
      }
      if (rb0 < nrb)  // the last, odd row block: four phases of one column block at a time
        for (int64_t j = 0; j < nc; ++j) {
          amx_cblock<1>(bt + (c + j) * bstride, x_at(rb0), a_plane, a_rb, p.xplanes, steps, cbuf);
          add_tile(cbuf, 4, rb0 * 16, p.M, c + j, sv[j], valid[j]);
        }
    }
    k = gend;
  }
  _tile_release();
  if (!direct)
    for (int64_t m = 0; m < p.M; ++m) std::memcpy(out + m * p.N + n0, acc + m * stride, sizeof(float) * size_t(w));
}

// ---------------------------------------------------------------- AMX (int8 tiles): logits
// Logits over an int8 table for several rows of x, in the VNNI path's exact integer arithmetic
// (ntq_block_vnni: each row of x as four signed 7-bit digit planes) on the AMX-INT8 unit: A tiles
// are the table itself, 16 rows x 64 bytes loaded in place (no conversion), B tiles a plane's
// digits of 16 rows of x in the VNNI layout, and TDPBSSD sums the exact products in int32 (|sum| <=
// 64 * 128 * D: exact for D < 2^18; signed bytes, so no flip and no bias as vpdpbusd needs). The
// planes' sums are combined in double (integers below 2^53: exact), the remainders added and the
// result rounded once to f32, as the VNNI path does: the same numbers, bit for bit, for every
// batch size. Tiles: C 0-3 (one per plane), A 4, B 5 and 6.
#define AMXI8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,amx-tile,amx-int8")))

constexpr int64_t kQTile = 1024;  // int8 elements of a 16 x 64 tile

// x's digit planes as B tiles: [ceil(M / 16)][D / 64][kPlanes][16][16 rows of x][4 digits],
// rows past M zero (D a multiple of 64).
inline int64_t amx_digit_size(int64_t M, int64_t D) { return (M + 15) / 16 * (D / 64) * kPlanes * kQTile; }
inline void amx_digit_tiles(const XPlanes& xp, int64_t M, int64_t D, int8_t* dst) {
  const int64_t ks = D / 64;
  std::memset(dst, 0, size_t(amx_digit_size(M, D)));
  for (int64_t m = 0; m < M; ++m)
    for (int k = 0; k < kPlanes; ++k) {
      const int8_t* src = xp.digits.data() + (m * kPlanes + k) * xp.Dp;
      for (int64_t s = 0; s < ks; ++s) {
        int8_t* tile = dst + ((m / 16 * ks + s) * kPlanes + k) * kQTile + m % 16 * 4;
        for (int64_t kk = 0; kk < 16; ++kk) std::memcpy(tile + kk * 64, src + s * 64 + kk * 4, 4);
      }
    }
}

// The 16 table rows of a tile at a, stride bytes apart: x's digit tiles b over ks steps into C
// tiles 0-3, one per plane; next: the table block after this one (rows next_stride bytes apart),
// whose line at each step is prefetched, or null.
AMXI8 inline void amx_digit_block(const int8_t* a, int64_t stride, const int8_t* b, int64_t ks,
                                  const int8_t* next, int64_t next_stride) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < ks; ++s, b += kPlanes * kQTile) {
    if (next)
      for (int r = 0; r < 16; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * next_stride + s * 64), kPrefetch);
    _tile_loadd(4, a + s * 64, stride);
    _tile_loadd(5, b, 64);
    _tile_dpbssd(0, 4, 5);
    _tile_loadd(6, b + kQTile, 64);
    _tile_dpbssd(1, 4, 6);
    _tile_loadd(5, b + 2 * kQTile, 64);
    _tile_dpbssd(2, 4, 5);
    _tile_loadd(6, b + 3 * kQTile, 64);
    _tile_dpbssd(3, 4, 6);
  }
}

// Per row of x, what turns its planes' sums into a logit: the unit 2^(e-6) 128^-3. (TDPBSSD
// multiplies signed bytes: the table is not flipped, and there is no bias to take off.)
struct DigitScale {
  std::vector<double> unit;
  bool rest = false;
};
inline void digit_scale(const XPlanes& xp, int64_t M, DigitScale& ds) {
  ds.unit.assign(size_t((M + 15) / 16 * 16), 0.0);
  ds.rest = false;
  for (int64_t m = 0; m < M; ++m) {
    ds.unit[size_t(m)] = plane_unit(xp, m);
    ds.rest = ds.rest || !xp.rest[size_t(m)].empty();
  }
}

// Table rows [v0, v1) (a multiple of 16 of them) for p's rows of x, which are rows [m0, m0 + p.M)
// of those xp was made from; xt: their digit tiles (amx_digit_tiles; m0 a multiple of 16). A
// tile's 16 rows lie page_rows apart, as the VNNI path's blocks (one stream per page), then 16 at
// a time; x's later blocks of 16 rows load the table tile again, from cache. (Restaging it
// contiguously on the first pass, since rows a page apart share one L1 set, was no faster.)
AMXI8 void ntq_rows_amx(const NTP<int8_t>& p, const XPlanes& xp, const DigitScale& ds, const int8_t* xt, int64_t m0,
                        int64_t v0, int64_t v1) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
  const int64_t ks = p.D / 64, nxb = (p.M + 15) / 16;
  alignas(64) int32_t c[kPlanes][256];
  alignas(64) double t[16];
  alignas(64) float out[16][16];  // [table row][row of x]
  auto block = [&](int64_t v, int64_t rs, int64_t vnext, int64_t rsnext) AMXI8 {
    for (int64_t xb = 0; xb < nxb; ++xb) {
      const int8_t* next = xb == 0 && vnext + 15 * rsnext < p.V ? p.t + vnext * p.D : nullptr;
      amx_digit_block(p.t + v * p.D, rs * p.D, xt + xb * ks * kPlanes * kQTile, ks, next, rsnext * p.D);
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      // sum_k 128^(3-k) S_k in double (every value an integer below 2^53: exact), the
      // remainders added, times the unit, rounded once to f32
      const int64_t mx = m0 + xb * 16, valid = std::min<int64_t>(16, p.M - xb * 16);
      const __m512d k128 = _mm512_set1_pd(128.0);
      const __m512d ulo = _mm512_loadu_pd(ds.unit.data() + mx), uhi = _mm512_loadu_pd(ds.unit.data() + mx + 8);
      for (int r = 0; r < 16; ++r) {
        __m512d lo = _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(c[0] + r * 16)));
        __m512d hi = _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(c[0] + r * 16 + 8)));
        for (int k = 1; k < kPlanes; ++k) {
          lo = _mm512_fmadd_pd(lo, k128, _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(c[k] + r * 16))));
          hi = _mm512_fmadd_pd(hi, k128, _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(c[k] + r * 16 + 8))));
        }
        if (ds.rest) {  // the remainders, in the VNNI path's order
          _mm512_store_pd(t, lo);
          _mm512_store_pd(t + 8, hi);
          const int8_t* row = p.t + (v + r * rs) * p.D;
          for (int64_t m = 0; m < valid; ++m) t[m] = add_remainders(xp, mx + m, row, t[m]);
          lo = _mm512_load_pd(t);
          hi = _mm512_load_pd(t + 8);
        }
        const __m256 flo = _mm512_cvtpd_ps(_mm512_mul_pd(lo, ulo));
        const __m256 fhi = _mm512_cvtpd_ps(_mm512_mul_pd(hi, uhi));
        _mm512_store_ps(out[r], _mm512_insertf32x8(_mm512_castps256_ps512(flo), fhi, 1));
      }
      for (int64_t m = 0; m < valid; ++m) {  // (row by row: a scatter's 16 rows are 16 pages)
        float* yr = p.y + (xb * 16 + m) * p.V + v;
        for (int r = 0; r < 16; ++r) yr[r * rs] = out[r][m];
      }
    }
  };
  const int64_t prs = page_rows(p.D);
  int64_t v = v0;
  for (; v + 16 * prs <= v1; v += 16 * prs)
    for (int64_t j = 0; j < prs; ++j) {
      const bool last = j + 1 == prs;
      const int64_t vn = last ? v + 16 * prs : v + j + 1;
      block(v + j, prs, vn, last && vn + 16 * prs > v1 ? 1 : prs);
    }
  for (; v < v1; v += 16) block(v, 1, v + 16, 1);
  _tile_release();
}

// 16 table elements as f32: bf16 bits, or int8 (exact).
AVX512 inline __m512 table16_512(const uint16_t* ptr, __mmask16 mask) { return load_bf16x16_512(ptr, mask); }
AVX512 inline __m512 table16_512(const int8_t* ptr, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, ptr)));
}

// Logits, R table rows x MB rows of x: per 16 table elements one widening load, one convert
// (int8), one FMA per row of x; each row's next block prefetched (the same stream, R rows on).
template <class T, int MB, int R>
AVX512 void nt_block_512(const NTP<T>& p, int64_t m0, int64_t v, int64_t rs) {  // rows v + r rs
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t d = 0; d < p.D; d += 16) {
    const int64_t rem = p.D - d;
    const __mmask16 mask = rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1);
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, p.x + (m0 + m) * p.D + d);
    for (int r = 0; r < R; ++r) {
      const T* tr = p.t + (v + r * rs) * p.D + d;
      if ((d * int64_t(sizeof(T))) % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(tr + kTablePrefetchRows * p.D), kPrefetch);
      const __m512 t = table16_512(tr, mask);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(xv[m], t, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.V + v + r * rs] = _mm512_reduce_add_ps(acc[r][m]);
}

// Table rows in blocks one page apart (page_rows; each logit's sum unchanged).
template <class T>
AVX512 void nt_rows_512(const NTP<T>& p, int64_t v0, int64_t v1) {
  row_blocks(p.M, [&](auto mb, int64_t m0) AVX512 {
    table_blocks(v0, v1, page_rows(int64_t(sizeof(T)) * p.D), [&](auto rb, int64_t v, int64_t rs) AVX512 {
      nt_block_512<T, decltype(mb)::value, decltype(rb)::value>(p, m0, v, rs);
    });
  });
}


// ---------------------------------------------------------------- AVX-512 + BF16
// int4 and the logits. An int4 weight (nibble x scale) is rounded to bf16 by vcvtne2ps2bf16
// (round to nearest even, the same value as round_bf16 for every finite product; it flushes
// bf16-subnormal results, below 1e-38, to zero), two rows are interleaved into bf16 pairs (one
// pair per column in each 32-bit lane), and bf16 activations take the pair with one vdpbf16ps
// (x_k w_k + x_k+1 w_k+1 per lane, exact products, f32 sums); f32 activations (the expert output
// projection) unpack the pair to two f32 vectors and FMA.
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

template <bool MASKED>
AVX512BF16 inline __m128i load16(const void* ptr, __mmask16 mask) {
  if constexpr (MASKED) return _mm_maskz_loadu_epi8(mask, ptr);
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr));
}

inline uint32_t bf16_pair(const uint16_t* xb) {  // xb[0] low half, xb[1] high half
  return uint32_t(xb[0]) | (uint32_t(xb[1]) << 16);
}

// int4 (two's-complement nibbles; packed row i = logical rows 2i (low) and 2i+1 (high) of the
// same column): one byte holds a row pair, so one 16-byte load feeds 32 weights, P packed rows a
// pass, into the accumulators at acc. EXACT (an exact scale group, int4_group_exact): the sums are
// unscaled, x . nibble — the byte is widened to a 32-bit lane; bf16 activations: the lane's two
// 16-bit halves (the byte, and the byte >> 4) index (low 5 bits) a 32-entry table of the nibbles'
// bf16 values, so one vpermw gives 16 columns' row pair already paired as vdpbf16ps takes them;
// f32 activations: one vpermps per nibble (index = the lane's low 4 bits) and an FMA. Otherwise
// each weight is nibble x scale: sign-extended with shifts, scaled, rounded to bf16 by
// vcvtne2ps2bf16 and paired by one vpermw (f32 activations unpack the pair and FMA).
template <int MB, int P, bool BX, bool EXACT>
AVX512BF16 void q4_rows_512(const QProblem& p, const uint16_t* srow, float* acc, int64_t acc_stride,
                            int64_t m0, int64_t n0, int nv, __mmask16 last, int64_t k, int64_t rs) {
  const uint8_t* wr[P];
  __m512i xp[MB][P];
  __m512 xf[MB][2 * P];
  const uint8_t* w8 = reinterpret_cast<const uint8_t*>(p.w);
  for (int q = 0; q < P; ++q) wr[q] = w8 + (k / 2 + q * rs) * p.N + n0;  // packed rows rs apart
  for (int m = 0; m < MB; ++m) {
    if constexpr (BX) {
      for (int q = 0; q < P; ++q)
        xp[m][q] = _mm512_set1_epi32(int(bf16_pair(p.xb + (m0 + m) * p.K + k + 2 * q * rs)));
    } else {
      for (int u = 0; u < 2 * P; ++u)
        xf[m][u] = _mm512_set1_ps(p.x[(m0 + m) * p.K + k + 2 * (u / 2) * rs + u % 2]);
    }
  }
  const __m512i tb = _mm512_load_si512(kNibbles.bf16);
  const __m512 tf = _mm512_load_ps(kNibbles.f32);
  const __m512i hi_mask = _mm512_set1_epi32(int(0xffff0000u));
  // 16-bit positions: low half of lane c <- row k (position c), high half <- row k+1 (16 + c)
  const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  auto step = [&](int v, auto masked) AVX512BF16 {
    constexpr bool M_ = decltype(masked)::value;
    const __mmask16 mask = M_ ? last : __mmask16(0xffff);
    __m512 sv = _mm512_setzero_ps();
    if constexpr (!EXACT) {
      const __m256i sh = M_ ? _mm256_maskz_loadu_epi16(mask, srow + v * 16)
                            : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(srow + v * 16));
      sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sh), 16));
    }
    prefetch_next_pass(wr, P * rs * p.N, v * 16);
    __m512 a[MB];
    for (int m = 0; m < MB; ++m) a[m] = _mm512_load_ps(acc + m * acc_stride + v * 16);
    for (int q = 0; q < P; ++q) {
      const __m128i raw = load16<M_>(wr[q] + v * 16, mask);
      __m512i w = _mm512_setzero_si512();  // bf16 pairs (rows k, k+1) of 16 columns
      if constexpr (EXACT && BX) {
        const __m512i b = _mm512_cvtepu8_epi32(raw);
        w = _mm512_permutexvar_epi16(_mm512_or_si512(b, _mm512_slli_epi32(b, 12)), tb);
      } else if constexpr (!EXACT) {
        const __m512i b = _mm512_cvtepi8_epi32(raw);
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28)), sv);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4)), sv);
        w = _mm512_permutexvar_epi16(inter, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
      if constexpr (BX) {
        for (int m = 0; m < MB; ++m)
          a[m] = _mm512_dpbf16_ps(a[m], reinterpret_cast<__m512bh>(w),
                                  reinterpret_cast<__m512bh>(xp[m][q]));
      } else {
        __m512 w0, w1;  // rows k and k+1 as f32
        if constexpr (EXACT) {
          const __m512i b = _mm512_cvtepu8_epi32(raw);
          w0 = _mm512_permutexvar_ps(b, tf);
          w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tf);
        } else {
          w0 = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
          w1 = _mm512_castsi512_ps(_mm512_and_si512(w, hi_mask));
        }
        for (int m = 0; m < MB; ++m) {
          a[m] = _mm512_fmadd_ps(xf[m][2 * q], w0, a[m]);
          a[m] = _mm512_fmadd_ps(xf[m][2 * q + 1], w1, a[m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) _mm512_store_ps(acc + m * acc_stride + v * 16, a[m]);
  };
  const int full = last == __mmask16(0xffff) ? nv : nv - 1;
  for (int v = 0; v < full; ++v) step(v, std::false_type{});
  if (full < nv) step(full, std::true_type{});
}

// Rows [m0, m0+MB), weight rows [k0, k1), columns [n0, n0+w): partial sums into out (row stride N).
// An exact scale group is summed unscaled into ag and scaled once; any other group is dequantized
// weight by weight into acc.
template <int MB, bool BX>
AVX512BF16 void q4_unit_512(const QProblem& p, int64_t m0, int64_t k0, int64_t k1, int64_t n0,
                            int64_t w, float* out) {
  UnitBuffers& ub = unit_buffers();
  float* const acc = ub.acc;
  float* const ag = ub.ag;
  const int64_t stride = (w + 15) / 16 * 16;
  const int nv = int(stride / 16);
  const __mmask16 last = (w % 16) ? __mmask16((1u << (w % 16)) - 1) : __mmask16(0xffff);
  std::memset(acc, 0, sizeof(float) * stride * MB);
  const int64_t kb = p.K / p.G;  // even (checked by the caller)
  for (int64_t k = k0; k < k1;) {
    const int64_t gend = std::min(k1, (k / kb + 1) * kb);
    const uint16_t* srow = p.s + (k / kb) * p.N + n0;
    auto rows = [&](auto exact, float* into) AVX512BF16 {  // P = 4 packed rows a pass, then 1
      constexpr bool E = decltype(exact)::value;
      const int64_t rs = page_rows(p.N);  // packed rows one page apart (q8_unit_512)
      for (; k + 8 * rs <= gend; k += 8 * rs)
        for (int64_t j = 0; j < rs; ++j)
          q4_rows_512<MB, 4, BX, E>(p, srow, into, stride, m0, n0, nv, last, k + 2 * j, rs);
      for (; k + 8 <= gend; k += 8) q4_rows_512<MB, 4, BX, E>(p, srow, into, stride, m0, n0, nv, last, k, 1);
      for (; k + 2 <= gend; k += 2) q4_rows_512<MB, 1, BX, E>(p, srow, into, stride, m0, n0, nv, last, k, 1);
    };
    if (int4_group_exact(srow, w)) {
      std::memset(ag, 0, sizeof(float) * stride * MB);
      rows(std::true_type{}, ag);
      fold_group_512<MB>(acc, ag, srow, stride, nv, last);
    } else {
      rows(std::false_type{}, acc);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < nv; ++v) {
      const __mmask16 mask = v == nv - 1 ? last : __mmask16(0xffff);
      _mm512_mask_storeu_ps(out + (m0 + m) * p.N + n0 + v * 16, mask,
                            _mm512_load_ps(acc + m * stride + v * 16));
    }
}

template <bool BX>
AVX512BF16 void q4_block_512(const QProblem& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
                             float* out) {
  const int64_t w = n1 - n0;
  row_blocks(p.M, [&](auto mb, int64_t m0) AVX512BF16 {
    q4_unit_512<decltype(mb)::value, BX>(p, m0, k0, k1, n0, w, out);
  });
}

// Logits over a bf16 table with bf16 activations: one vdpbf16ps per 32 table elements. (An int8
// table at batch 1 takes the VNNI or f32 path: widening it to bf16 for one row cost more than the
// FMAs it saved; a batch widens each block once for all its rows, ntq_rows_bf16 below, or on a
// CPU with AMX takes the int8 tiles, ntq_rows_amx.)
template <int MB, int R, bool PF = true>
AVX512BF16 void ntb_block_512(const NTProblem& p, int64_t m0, int64_t v, int64_t rs = 1) {  // rows v + r rs
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  auto step = [&](int64_t d, auto masked) AVX512BF16 {
    constexpr bool M_ = decltype(masked)::value;
    const int64_t rem = p.D - d;
    const __mmask32 mask = M_ ? __mmask32((1u << rem) - 1) : __mmask32(0xffffffffu);
    __m512i xv[MB];
    for (int m = 0; m < MB; ++m) {
      const uint16_t* xr = p.xb + (m0 + m) * p.D + d;
      xv[m] = M_ ? _mm512_maskz_loadu_epi16(mask, xr) : _mm512_loadu_si512(xr);
    }
    for (int r = 0; r < R; ++r) {
      const uint16_t* tr = p.t + (v + r * rs) * p.D + d;
      // the line kTablePrefetchRows rows on at this offset (a later block's, same stream)
      if (PF && (d * 2) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(tr + kTablePrefetchRows * p.D), kPrefetch);
      const __m512i t = M_ ? _mm512_maskz_loadu_epi16(mask, tr) : _mm512_loadu_si512(tr);
      for (int m = 0; m < MB; ++m)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], reinterpret_cast<__m512bh>(t),
                                     reinterpret_cast<__m512bh>(xv[m]));
    }
  };
  const int64_t full = p.D / 32 * 32;
  for (int64_t d = 0; d < full; d += 32) step(d, std::false_type{});
  if (full < p.D) step(full, std::true_type{});
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.V + v + r * rs] = _mm512_reduce_add_ps(acc[r][m]);
}

// Table rows outer: a block of table rows stays in L1 while every row of x takes it. Blocks one
// page apart (page_rows; each logit's sum is the same).
AVX512BF16 void ntb_rows_512(const NTProblem& p, int64_t v0, int64_t v1) {
  table_blocks(v0, v1, page_rows(2 * p.D), [&](auto rb, int64_t v, int64_t rs) AVX512BF16 {
    row_blocks(p.M, [&](auto mb, int64_t m0) AVX512BF16 {
      ntb_block_512<decltype(mb)::value, decltype(rb)::value>(p, m0, v, rs);
    });
  });
}

// Logits over an int8 table for a batched decode step (kNtBf16Rows rows of x or more): each block
// of 4 table rows is widened once to bf16 (exact: |q| <= 128) in an L1 buffer, then every row of
// x takes it with one vdpbf16ps per 32 elements, as over a bf16 table. The widening (5 uops per
// 32 elements) is shared by all rows, where the f32 and VNNI paths convert or multiply per row.
constexpr int64_t kNtBf16Rows = 2;
// Rows of x from which, on a CPU with AMX, the int8-table logits take the tiles (ntq_rows_amx)
// instead: from 2 rows on (benchmarks/logits_harness.cc, docs/PERFORMANCE.md "AMX logits").
constexpr int64_t kNtAmxRows = 2;

AVX512BF16 void ntq_rows_bf16(const NTP<int8_t>& p, int64_t v0, int64_t v1) {
  static thread_local std::vector<uint16_t> buf_tls;
  std::vector<uint16_t>& buf = *opaque(&buf_tls);  // (UnitBuffers: why)
  buf.resize(size_t(4 * p.D));
  NTProblem q{p.x, p.xb, buf.data(), p.y, p.M, p.D, p.V};
  const int64_t full = p.D / 32 * 32;
  auto widen = [&](int64_t v, int64_t rows) AVX512BF16 {
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* tr = p.t + (v + r) * p.D;
      uint16_t* br = buf.data() + r * p.D;
      for (int64_t d = 0; d < p.D; d += 32) {
        if (d % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(tr + kTablePrefetchRows * p.D + d), kPrefetch);
        const __mmask32 mask = d < full ? ~__mmask32(0) : __mmask32((1u << (p.D - d)) - 1);
        const __m256i raw = _mm256_maskz_loadu_epi8(mask, tr + d);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
        _mm512_mask_storeu_epi16(br + d, mask, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
    }
  };
  table_blocks(v0, v1, 1, [&](auto rb, int64_t v, int64_t) AVX512BF16 {  // (widen reads row by row)
    widen(v, decltype(rb)::value);
    q.y = p.y + v;  // the buffer's row r is table row v + r
    row_blocks(p.M, [&](auto mb, int64_t m0) AVX512BF16 {
      ntb_block_512<decltype(mb)::value, decltype(rb)::value, false>(q, m0, 0);
    });
  });
}

// ---------------------------------------------------------------- AVX-512 VNNI: int8-table logits
// Logits over an int8 table with bf16 activations in integer arithmetic. Converting each int8 to
// f32 for an FMA costs three vector uops per 16 weights on the two vector ports, which kept the
// kernel below the cores' read rate (docs/PERFORMANCE.md, "Decode, fifth round"); vpdpbusd takes
// 64 weights per uop. Each row of x is split exactly into signed 7-bit digits: x_i = 2^(e-6)
// (d0_i + d1_i/128 + d2_i/128^2 + d3_i/128^3 + r_i/128^4) with 2^(e-1) <= max|x| < 2^e,
// |d| <= 64 and r the exact remainder (the f32 steps r -> 128 (r - round(r)) lose nothing). Per
// table row the four integer dot products S_k = sum_i dk_i t_i are exact (the table is flipped to
// unsigned, t + 128, for vpdpbusd, and 128 sum_i dk_i taken off again) and combined exactly in
// 64-bit integers; the few remainders (non-zero only where |x_i| < ~2^-19 max|x|) are added in
// double, and the result is rounded once to f32: the dot product correctly rounded (to within a
// double rounding where remainders exist), where the f32 paths round at every addition.
#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
template <int R>
AVX512VNNI void ntq_block_vnni(const NTP<int8_t>& p, const XPlanes& xp, int64_t m, int64_t v, int64_t rs) {
  __m512i acc[R][kPlanes];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < kPlanes; ++k) acc[r][k] = _mm512_setzero_si512();
  const int8_t* dm = xp.digits.data() + m * kPlanes * xp.Dp;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  auto step = [&](int64_t d, auto masked) AVX512VNNI {
    constexpr bool M_ = decltype(masked)::value;
    const __mmask64 mask = M_ ? __mmask64((uint64_t(1) << (p.D - d)) - 1) : ~__mmask64(0);
    __m512i dv[kPlanes];
    for (int k = 0; k < kPlanes; ++k) dv[k] = _mm512_loadu_si512(dm + k * xp.Dp + d);
    for (int r = 0; r < R; ++r) {
      const int8_t* tr = p.t + (v + r * rs) * p.D + d;
      _mm_prefetch(reinterpret_cast<const char*>(tr + kTablePrefetchRows * p.D), kPrefetch);
      const __m512i t = M_ ? _mm512_maskz_loadu_epi8(mask, tr) : _mm512_loadu_si512(tr);
      const __m512i u = _mm512_xor_si512(t, flip);  // t + 128 as unsigned bytes
      for (int k = 0; k < kPlanes; ++k) acc[r][k] = _mm512_dpbusd_epi32(acc[r][k], u, dv[k]);
    }
  };
  const int64_t full = p.D / 64 * 64;
  for (int64_t d = 0; d < full; d += 64) step(d, std::false_type{});
  if (full < p.D) step(full, std::true_type{});  // padded digits are 0: the masked bytes add 0
  // sum_k 128^(3-k) S_k in 64-bit lanes (|.| < 2^46: exact), less 128 sum_k 128^(3-k) sum_i dk_i
  const int64_t* bias = xp.bias.data() + m;
  const auto& rest = xp.rest[size_t(m)];
  // a power of two: the product is ldexp's value, exactly (t < 2^53, a normal double)
  const double unit = plane_unit(xp, m);
  for (int r = 0; r < R; ++r) {
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
    for (int k = 0; k < kPlanes; ++k) {
      const int shift = 7 * (kPlanes - 1 - k);
      lo = _mm512_add_epi64(lo, _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[r][k])), shift));
      hi = _mm512_add_epi64(hi, _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[r][k], 1)), shift));
    }
    const int64_t total = _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi)) - *bias;
    double t = double(total);  // units of 2^(e-6) 128^-3; exact (< 2^53)
    if (!rest.empty()) {
      const int8_t* row = p.t + (v + r * rs) * p.D;
      t = add_remainders(xp, m, row, t);
    }
    p.y[m * p.V + v + r * rs] = float(t * unit);
  }
}

// Table rows in blocks one page apart (page_rows; each logit is exact, the order changes nothing).
AVX512VNNI void ntq_rows_vnni(const NTP<int8_t>& p, const XPlanes& xp, int64_t v0, int64_t v1) {
  table_blocks(v0, v1, page_rows(p.D), [&](auto rb, int64_t v, int64_t rs) AVX512VNNI {
    for (int64_t m = 0; m < p.M; ++m) ntq_block_vnni<decltype(rb)::value>(p, xp, m, v, rs);
  });
}

// ---------------------------------------------------------------- AVX2 + FMA
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 inline __m256 round_bf16_256(__m256 wf) {
  __m256i b = _mm256_castps_si256(wf);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  b = _mm256_and_si256(b, _mm256_set1_epi32(int(0xffff0000u)));
  return _mm256_castsi256_ps(b);
}

AVX2 inline __m256 load_bf16x8_256(const uint16_t* ptr) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// acc[m] += scale_n * ag[m] over a unit's columns: a scale group's unscaled sums into the unit's.
template <int MB>
AVX2 inline void fold_group_256(float* acc, const float* ag, const uint16_t* srow, int64_t stride, int nv) {
  for (int v = 0; v < nv; ++v) {
    const __m256 sv = load_bf16x8_256(srow + v * 8);
    for (int m = 0; m < MB; ++m) {
      float* a = acc + m * stride + v * 8;
      _mm256_store_ps(a, _mm256_fmadd_ps(sv, _mm256_load_ps(ag + m * stride + v * 8), _mm256_load_ps(a)));
    }
  }
}

// The int8 GEMV on AVX2, in q8_rows_512's form with 8-column vectors: a pass's U rows (rs rows
// apart) summed unscaled into the group accumulator in two chains, the next pass's rows prefetched
// a line per 64 columns. Same additions in the same order as the AVX-512 path.
template <int MB, int U>
AVX2 void q8_rows_256(const QProblem& p, float* ag, int64_t stride, int64_t m0, int64_t n0, int nv,
                      int64_t k, int64_t rs) {
  const int8_t* wr[U];
  __m256 xf[MB][U];
  for (int u = 0; u < U; ++u) {
    wr[u] = p.w + (k + u * rs) * p.N + n0;
    for (int m = 0; m < MB; ++m) xf[m][u] = _mm256_set1_ps(p.x[(m0 + m) * p.K + k + u * rs]);
  }
  constexpr int H = U > 1 ? U / 2 : U;
  for (int v = 0; v < nv; ++v) {
    prefetch_next_pass(wr, U * rs * p.N, v * 8);
    __m256 a[MB], b[MB];
    for (int m = 0; m < MB; ++m) a[m] = _mm256_load_ps(ag + m * stride + v * 8), b[m] = _mm256_setzero_ps();
    for (int u = 0; u < U; ++u) {
      const __m256 wf = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[u] + v * 8))));
      for (int m = 0; m < MB; ++m) {
        if (u < H) a[m] = _mm256_fmadd_ps(xf[m][u], wf, a[m]);
        else b[m] = _mm256_fmadd_ps(xf[m][u], wf, b[m]);
      }
    }
    for (int m = 0; m < MB; ++m)
      _mm256_store_ps(ag + m * stride + v * 8, U > 1 ? _mm256_add_ps(a[m], b[m]) : a[m]);
  }
}

// Rows [m0, m0+MB), weight rows [k0, k1), columns [n0, n0+w), w a multiple of 8 (<= slab_cols(M)):
// partial sums into out (row stride N). q8_unit_512's passes.
template <int MB>
AVX2 void q8_unit_256(const QProblem& p, int64_t m0, int64_t k0, int64_t k1, int64_t n0, int64_t w,
                      float* out) {
  UnitBuffers& ub = unit_buffers();
  float* const acc = ub.acc;
  float* const ag = ub.ag;
  const int nv = int(w / 8);
  std::memset(acc, 0, sizeof(float) * w * MB);
  const int64_t kb = p.K / p.G, rs = page_rows(p.N);
  for (int64_t k = k0; k < k1;) {
    const int64_t gend = std::min(k1, (k / kb + 1) * kb);
    const uint16_t* srow = p.s + (k / kb) * p.N + n0;
    std::memset(ag, 0, sizeof(float) * w * MB);
    for (; k + 8 * rs <= gend; k += 8 * rs)
      for (int64_t j = 0; j < rs; ++j) q8_rows_256<MB, 8>(p, ag, w, m0, n0, nv, k + j, rs);
    for (; k + 8 <= gend; k += 8) q8_rows_256<MB, 8>(p, ag, w, m0, n0, nv, k, 1);
    for (; k < gend; ++k) q8_rows_256<MB, 1>(p, ag, w, m0, n0, nv, k, 1);
    fold_group_256<MB>(acc, ag, srow, w, nv);
  }
  for (int m = 0; m < MB; ++m) std::memcpy(out + (m0 + m) * p.N + n0, acc + m * w, sizeof(float) * w);
}

AVX2 void q8_block_256(const QProblem& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out) {
  const int64_t w = n1 - n0, w8 = w / 8 * 8;
  if (w8 > 0) {
    row_blocks(p.M, [&](auto mb, int64_t m0) AVX2 {
      q8_unit_256<decltype(mb)::value>(p, m0, k0, k1, n0, w8, out);
    });
  }
  if (w8 < w) q8_block_scalar(p, k0, k1, n0 + w8, n1, out);
}

AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class T>
AVX2 inline __m256 load_table8_256(const T* ptr) {  // 8 table elements as f32
  if constexpr (std::is_same_v<T, uint16_t>) return load_bf16x8_256(ptr);
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(ptr));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
}

template <class T, int MB, int R>
AVX2 void nt_block_256(const NTP<T>& p, int64_t m0, int64_t v, int64_t rs) {  // rows v + r rs
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t d8 = p.D / 8 * 8;
  for (int64_t d = 0; d < d8; d += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(p.x + (m0 + m) * p.D + d);
    for (int r = 0; r < R; ++r) {
      const T* tr = p.t + (v + r * rs) * p.D + d;
      if ((d * int64_t(sizeof(T))) % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(tr + kTablePrefetchRows * p.D), kPrefetch);
      const __m256 t = load_table8_256(tr);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(xv[m], t, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float s = hsum256(acc[r][m]);
      const float* xm = p.x + (m0 + m) * p.D;
      const T* tr = p.t + (v + r * rs) * p.D;
      for (int64_t d = d8; d < p.D; ++d) s += xm[d] * table_f32(tr[d]);
      p.y[(m0 + m) * p.V + v + r * rs] = s;
    }
}

// Table rows in blocks one page apart (page_rows; each logit's sum unchanged).
template <class T>
AVX2 void nt_rows_256(const NTP<T>& p, int64_t v0, int64_t v1) {
  row_blocks(p.M, [&](auto mb, int64_t m0) AVX2 {
    table_blocks(v0, v1, page_rows(int64_t(sizeof(T)) * p.D), [&](auto rb, int64_t v, int64_t rs) AVX2 {
      nt_block_256<T, decltype(mb)::value, decltype(rb)::value>(p, m0, v, rs);
    });
  });
}

// int4 on AVX2: 8 columns of a row pair per byte load, nibbles sign-extended with shifts. P packed
// rows a pass (rs apart, as q4_rows_512), their sums in registers, in two chains; an exact scale
// group (int4_group_exact) sums x . nibble unscaled into ag, scaled once at the group's end; any
// other group is scaled and rounded to bf16 weight by weight, into acc.
template <int MB, int P, bool EXACT>
AVX2 void q4_rows_256(const QProblem& p, const uint16_t* srow, float* acc, int64_t stride, int64_t m0,
                      int64_t n0, int nv, int64_t k, int64_t rs) {
  const uint8_t* wr[P];
  __m256 xf[MB][2 * P];
  const uint8_t* w8 = reinterpret_cast<const uint8_t*>(p.w);
  for (int q = 0; q < P; ++q) wr[q] = w8 + (k / 2 + q * rs) * p.N + n0;
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < 2 * P; ++u) xf[m][u] = _mm256_set1_ps(p.x[(m0 + m) * p.K + k + 2 * (u / 2) * rs + u % 2]);
  constexpr int H = P > 1 ? P / 2 : P;
  for (int v = 0; v < nv; ++v) {
    __m256 sv = _mm256_setzero_ps();
    if constexpr (!EXACT) sv = load_bf16x8_256(srow + v * 8);
    prefetch_next_pass(wr, P * rs * p.N, v * 8);
    __m256 a[MB], b[MB];
    for (int m = 0; m < MB; ++m) a[m] = _mm256_load_ps(acc + m * stride + v * 8), b[m] = _mm256_setzero_ps();
    for (int q = 0; q < P; ++q) {
      const __m256i raw = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[q] + v * 8)));
      __m256 lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(raw, 28), 28));
      __m256 hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(raw, 4));
      if constexpr (!EXACT) {
        lo = round_bf16_256(_mm256_mul_ps(lo, sv));
        hi = round_bf16_256(_mm256_mul_ps(hi, sv));
      }
      for (int m = 0; m < MB; ++m) {
        if (q < H) a[m] = _mm256_fmadd_ps(xf[m][2 * q + 1], hi, _mm256_fmadd_ps(xf[m][2 * q], lo, a[m]));
        else b[m] = _mm256_fmadd_ps(xf[m][2 * q + 1], hi, _mm256_fmadd_ps(xf[m][2 * q], lo, b[m]));
      }
    }
    for (int m = 0; m < MB; ++m)
      _mm256_store_ps(acc + m * stride + v * 8, P > 1 ? _mm256_add_ps(a[m], b[m]) : a[m]);
  }
}

// Rows [m0, m0+MB), weight rows [k0, k1), columns [n0, n0+w), w a multiple of 8: partial sums into
// out (row stride N). q4_unit_512's passes.
template <int MB>
AVX2 void q4_unit_256(const QProblem& p, int64_t m0, int64_t k0, int64_t k1, int64_t n0, int64_t w,
                      float* out) {
  UnitBuffers& ub = unit_buffers();
  float* const acc = ub.acc;
  float* const ag = ub.ag;
  const int nv = int(w / 8);
  std::memset(acc, 0, sizeof(float) * w * MB);
  const int64_t kb = p.K / p.G;  // even (checked by the caller)
  for (int64_t k = k0; k < k1;) {
    const int64_t gend = std::min(k1, (k / kb + 1) * kb);
    const uint16_t* srow = p.s + (k / kb) * p.N + n0;
    auto rows = [&](auto exact, float* into) AVX2 {  // P = 4 packed rows a pass, then 1
      constexpr bool E = decltype(exact)::value;
      const int64_t rs = page_rows(p.N);
      for (; k + 8 * rs <= gend; k += 8 * rs)
        for (int64_t j = 0; j < rs; ++j) q4_rows_256<MB, 4, E>(p, srow, into, w, m0, n0, nv, k + 2 * j, rs);
      for (; k + 8 <= gend; k += 8) q4_rows_256<MB, 4, E>(p, srow, into, w, m0, n0, nv, k, 1);
      for (; k + 2 <= gend; k += 2) q4_rows_256<MB, 1, E>(p, srow, into, w, m0, n0, nv, k, 1);
    };
    if (int4_group_exact(srow, w)) {
      std::memset(ag, 0, sizeof(float) * w * MB);
      rows(std::true_type{}, ag);
      fold_group_256<MB>(acc, ag, srow, w, nv);
    } else {
      rows(std::false_type{}, acc);
    }
  }
  for (int m = 0; m < MB; ++m) std::memcpy(out + (m0 + m) * p.N + n0, acc + m * w, sizeof(float) * w);
}

AVX2 void q4_block_256(const QProblem& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out) {
  const int64_t w = n1 - n0, w8 = w / 8 * 8;
  if (w8 > 0) {
    row_blocks(p.M, [&](auto mb, int64_t m0) AVX2 {
      q4_unit_256<decltype(mb)::value>(p, m0, k0, k1, n0, w8, out);
    });
  }
  if (w8 < w) q4_block_scalar(p, k0, k1, n0 + w8, n1, out);
}
#endif  // GROKCTL_X86

// ---------------------------------------------------------------- dispatch
// Levels in order; each has what the one before has. kAvx512Vnni: BF16 and VNNI both.
enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAvx512Vnni = 4, kAmx = 5 };

// AMX tiles with BF16 and INT8 products (every CPU with AMX so far has both), where the CPU has
// them and Linux lets this process use their state (it must ask once: arch_prctl
// ARCH_REQ_XCOMP_PERM for XTILEDATA).
bool amx_usable() {
#if defined(GROKCTL_X86) && defined(__linux__)
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
      !__builtin_cpu_supports("amx-int8"))
    return false;
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
  return false;
#endif
}

int detect_isa() {
#ifdef GROKCTL_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return !__builtin_cpu_supports("avx512bf16")   ? kAvx512
           : !__builtin_cpu_supports("avx512vnni") ? kAvx512Bf16
           : amx_usable()                           ? kAmx
                                                    : kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

// The best ISA this CPU has, capped by GROKCTL_CPU_ISA ("scalar" | "avx2" | "avx512" |
// "avx512_bf16" | "avx512_vnni"; read per call so tests can exercise every path on one machine).
int isa() {
  static const int detected = detect_isa();
  const char* cap = std::getenv("GROKCTL_CPU_ISA");
  if (cap && std::strcmp(cap, "scalar") == 0) return kScalar;
  if (cap && std::strcmp(cap, "avx2") == 0) return std::min<int>(detected, kAvx2);
  if (cap && std::strcmp(cap, "avx512") == 0) return std::min<int>(detected, kAvx512);
  if (cap && std::strcmp(cap, "avx512_bf16") == 0) return std::min<int>(detected, kAvx512Bf16);
  if (cap && std::strcmp(cap, "avx512_vnni") == 0) return std::min<int>(detected, kAvx512Vnni);
  return detected;
}

// Batch 1's int8-table logits in integer arithmetic (VNNI) or in f32, on a CPU that has both:
// GROKCTL_CPU_LOGITS ("vnni" | "f32", read per call) chooses; by default VNNI, except on AMD's
// family 26 (Zen 5). There the VNNI loop computes twice as fast from L2 but streams the table
// from DRAM slower than the f32 one, and a bench-l2 decode step took 11.6-13.3 ms against
// 10.0-11.9 with the f32 logits; on the Xeon of stop 10 the VNNI path was the faster
// (docs/PERFORMANCE.md, "Decode, fifth round" and "eighth round").
bool vnni_logits() {
  const char* choice = std::getenv("GROKCTL_CPU_LOGITS");
  if (choice && std::strcmp(choice, "vnni") == 0) return true;
  if (choice && std::strcmp(choice, "f32") == 0) return false;
  static const bool zen5 = [] {
#ifdef GROKCTL_X86
    unsigned a = 0, b = 0, c = 0, d = 0;
    __builtin_cpu_init();
    if (!__builtin_cpu_is("amd") || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    const unsigned family = ((a >> 8) & 0xf) == 0xf ? 0xf + ((a >> 20) & 0xff) : (a >> 8) & 0xf;
    return family >= 26;
#else
    return false;
#endif
  }();
  return !zen5;
}

// Whether the logits over an int8 table take the AMX path (ntq_rows_amx): several rows of bf16 x
// (one row streams the table as fast on the VNNI path), a width of whole 64-byte tiles, and
// int32 sums that cannot overflow (|digit x int8| <= 2^13 per element).
template <class T>
bool amx_logits(int level, const NTP<T>& p) {
  return std::is_same_v<T, int8_t> && level >= kAmx && p.xb && p.M >= kNtAmxRows && p.D % 64 == 0 &&
         p.D < (int64_t(1) << 18);
}

// The CPUs this process may run on.
int affinity_cpus() {
  static const int value = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, int(CPU_COUNT(&set)));
    return int(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return value;
}

// GROKCTL_CPU_THREADS, else affinity_cpus().
int max_threads() {
  if (const char* env = std::getenv("GROKCTL_CPU_THREADS")) {
    const int want = std::atoi(env);
    if (want > 0) return want;
  }
  return affinity_cpus();
}

// Helper threads of the kernels' own, which stay awake for a while after each call. A decode
// step makes ~40 kernel calls a few microseconds apart; XLA's intra-op pool parks its threads
// between them, and a parked thread took 20-100 us (at times over 1 ms) to start on the next
// call (measured: docs/PERFORMANCE.md, "Decode, fifth round"), the caller streaming alone
// meanwhile. A helper here spins (with pause) for GROKCTL_CPU_SPIN_US (default kSpinUs)
// after its last job, then sleeps on the job counter (futex); with more workers than CPUs
// (GROKCTL_CPU_THREADS above them) it sleeps at once, leaving the CPUs to those still working.
// One caller at a time holds the helpers; a concurrent caller (several XLA devices in one
// process) uses XLA's pool instead.
// The state is never destroyed (threads may outlive static destructors at exit), and a forked
// child builds its own.
constexpr int kSpinUs = 2000;

class Helpers {
 public:
  using Task = std::function<void(int)>;

  static Helpers& get() {
    static std::atomic<Helpers*> current{nullptr};
    Helpers* h = current.load(std::memory_order_acquire);
    if (h == nullptr || h->pid_ != getpid()) {
      static std::mutex m;
      std::lock_guard<std::mutex> lock(m);
      h = current.load(std::memory_order_acquire);
      if (h == nullptr || h->pid_ != getpid()) {
        h = new Helpers();  // never deleted: see above
        current.store(h, std::memory_order_release);
      }
    }
    return *h;
  }

  // Start task(1) .. task(n) on helpers; false (nothing started) when another caller holds them.
  bool start(int n, std::shared_ptr<const Task> task) {
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (int(threads_) < n) {
        const int self = int(++threads_);
        std::thread([this, self] { loop(self); }).detach();
      }
      task_ = std::move(task);
      workers_ = n;
      spin_.store(n + 1 <= affinity_cpus(), std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_seq_cst);
    }
    if (sleepers_.load(std::memory_order_seq_cst) > 0) gen_.notify_all();
    return true;
  }

  void release() { busy_.store(false, std::memory_order_release); }

  // How long the holder may spin waiting for its helpers: GROKCTL_CPU_SPIN_US while every
  // worker has a CPU of its own, else 0 (a spinning waiter would take the CPU a helper needs).
  std::chrono::microseconds wait_spin() const {
    return std::chrono::microseconds(spin_.load(std::memory_order_relaxed) ? spin_us_ : 0);
  }

 private:
  Helpers() : pid_(getpid()) {
    const char* env = std::getenv("GROKCTL_CPU_SPIN_US");
    spin_us_ = env ? std::max(0, std::atoi(env)) : kSpinUs;
  }

  void loop(int self) {
    uint32_t seen = 0;
    bool spin = true;
    for (;;) {
      uint32_t g = gen_.load(std::memory_order_acquire);
      const auto t0 = std::chrono::steady_clock::now();
      const auto limit = std::chrono::microseconds(spin ? spin_us_ : 0);
      for (int spins = 0; g == seen; g = gen_.load(std::memory_order_acquire)) {
        if (++spins % 64 == 0 && std::chrono::steady_clock::now() - t0 > limit) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          gen_.wait(seen, std::memory_order_seq_cst);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        } else {
#ifdef GROKCTL_X86
          _mm_pause();
#endif
        }
      }
      std::shared_ptr<const Task> task;
      int workers;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = gen_.load(std::memory_order_relaxed);
        task = task_;
        workers = workers_;
        spin = spin_.load(std::memory_order_relaxed);
      }
      if (task && self <= workers) (*task)(self);
    }
  }

  const pid_t pid_;
  int spin_us_ = kSpinUs;
  std::atomic<bool> busy_{false};
  std::mutex mu_;
  std::atomic<uint32_t> gen_{0};
  std::atomic<int> sleepers_{0};
  std::shared_ptr<const Task> task_;  // under mu_
  int workers_ = 0;                   // under mu_
  std::atomic<bool> spin_{true};      // set under mu_; read by the holder's wait too
  unsigned threads_ = 0;              // under mu_
};

// Run body(i) for i in [0, units) on the calling thread and up to threads-1 helpers (the
// kernels' own, else tasks on XLA's pool). Each worker owns a contiguous range of units and
// runs it in order, so consecutive units of a weight stream (the slabs of one matrix) run on
// one core, whose prefetches of the next rows run on into its next unit; a worker that runs out
// takes units off the back of another's range. Ranges are claimed with a compare-and-swap on
// (front, back), so a helper that starts late finds its range taken and returns without
// touching `body` (which lives on the caller's stack): the caller only waits for units
// actually being worked on.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t units, F&& body) {
  const int threads = int(std::min<int64_t>(max_threads(), units));
  if (threads <= 1) {
    for (int64_t i = 0; i < units; ++i) body(i);
    return;
  }
  struct alignas(64) Range {
    std::atomic<uint64_t> fb{0};  // front << 32 | back
  };
  struct State {
    explicit State(int n) : ranges(size_t(n)) {}
    std::vector<Range> ranges;
    std::atomic<int64_t> done{0};
  };
  auto st = std::make_shared<State>(threads);
  for (int t = 0; t < threads; ++t) {
    const uint64_t f = uint64_t(units * t / threads), b = uint64_t(units * (t + 1) / threads);
    st->ranges[size_t(t)].fb.store(f << 32 | b, std::memory_order_relaxed);
  }
  // Take the front unit of range r (own) or its back unit (stealing); -1 when it is empty.
  auto take = [](Range& r, bool front) -> int64_t {
    uint64_t cur = r.fb.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t f = cur >> 32, b = cur & 0xffffffffu;
      if (f >= b) return -1;
      const uint64_t next = front ? ((f + 1) << 32 | b) : (f << 32 | (b - 1));
      if (r.fb.compare_exchange_weak(cur, next, std::memory_order_acq_rel, std::memory_order_relaxed))
        return int64_t(front ? f : b - 1);
    }
  };
  using Body = std::remove_reference_t<F>;
  Body* bp = &body;
  auto work = [st, bp, units, threads, take](int self) {
    int64_t finished = 0;
    for (int64_t i; (i = take(st->ranges[size_t(self)], true)) >= 0; ++finished) (*bp)(i);
    for (int k = 1; k < threads; ++k)
      for (int64_t i; (i = take(st->ranges[size_t((self + k) % threads)], false)) >= 0; ++finished)
        (*bp)(i);
    if (finished && st->done.fetch_add(finished, std::memory_order_acq_rel) + finished == units)
      st->done.notify_all();
  };
  Helpers& helpers = Helpers::get();
  const bool own = helpers.start(threads - 1, std::make_shared<const Helpers::Task>(work));
  if (!own)
    for (int t = 1; t < threads; ++t) pool.Schedule([work, t] { work(t); });
  work(0);
  // Spin while the helpers finish their last units, then sleep on the counter (futex). With a
  // CPU per worker the spin lasts as long as the helpers' own (a futex wake-up costs 30-100 us
  // here, a decode step's calls end within ~10 us of each other: "Decode, sixth round"); with
  // more workers than CPUs, or XLA's pool, a short one: spinning would burn the CPU a helper needs.
  {
    const auto t0 = std::chrono::steady_clock::now();
    const auto limit = own ? helpers.wait_spin() : std::chrono::microseconds(0);
    for (int spins = 0; st->done.load(std::memory_order_acquire) < units; ++spins) {
      if (spins >= 256 && spins % 64 == 0 && std::chrono::steady_clock::now() - t0 > limit) break;
#ifdef GROKCTL_X86
      _mm_pause();
#endif
    }
  }
  for (int64_t d; (d = st->done.load(std::memory_order_acquire)) < units;) st->done.wait(d);
  if (own) helpers.release();
}

// A per-thread scratch vector of at least n elements. Never shrinks: a resize that grows value-
// initializes the new tail, and calls alternating between sizes (a MoE layer's gate/up and down
// products) paid a 200 KB memset each.
template <class T>
inline T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

const uint16_t* bf16_bits(ffi::AnyBuffer x) {
  return x.element_type() == ffi::DataType::BF16
             ? reinterpret_cast<const uint16_t*>(x.untyped_data())
             : nullptr;
}

const float* as_f32(ffi::AnyBuffer x, std::vector<float>& tmp) {
  if (x.element_type() == ffi::DataType::F32) return x.typed_data<float>();
  const size_t n = x.element_count();
  float* f = scratch(tmp, n);
  const uint16_t* h = reinterpret_cast<const uint16_t*>(x.untyped_data());
  for (size_t i = 0; i < n; ++i) f[i] = bf16_to_f32(h[i]);
  return f;
}

// Rows of x from which an AMX product's units take every weight row (one slab: column chunks
// only). Many rows make the tile work, not the weight stream, the cost: slabs would only add
// partial sums (a prompt's 128-row expert blocks over 16 slabs of W1: 8 MB to write and add per
// call), and the kernel alone ran 1.7x faster on 128 rows (docs/PERFORMANCE.md, "AMX prefill
// (stop 18)"); batched decode's 32-64-row projections gained a little.
constexpr int64_t kAmxWholeK = 32;
// Columns of such a unit at most. Each unit reads all of x's tiles (a prompt expert's f32 x: 3.75
// MB at 128 rows x 5120), so wider units read them fewer times; 256 (not slab_cols' 64 at these
// rows) made pp512 ~4 % faster (docs/PERFORMANCE.md, "AMX prefill, second round").
constexpr int64_t kAmxCols = 256;

// Slabs of weight rows x column chunks over the thread pool, for one or several problems (a MoE
// step's chosen experts) in one parallel loop; with several slabs each writes its partial sums,
// added into the problem's y in slab order (so results do not depend on the threads) by
// whichever worker finishes the problem's last unit, while the others stream on.
// block(p, k0, k1, n0, n1, out) computes one unit.
template <class Block>
void slab_gemv_many(ffi::ThreadPool& pool, const std::vector<QProblem>& ps, Block&& block) {
  struct Plan {
    int64_t rows, slabs, chunks, cols, unit0, part0;
    float* out;  // the problem's y, or its slabs' partial sums
  };
  static thread_local std::vector<Plan> plans;
  static thread_local std::vector<float> partial;
  static thread_local std::unique_ptr<std::atomic<int64_t>[]> left;  // units to go, per problem
  static thread_local size_t left_n = 0;
  plans.clear();
  const int64_t want = 2 * int64_t(max_threads());  // enough units to balance the threads
  int64_t units = 0, part = 0;
  for (const QProblem& p : ps) {
    Plan pl;
    pl.rows = p.xt && p.M >= kAmxWholeK ? p.K : slab_rows(p.K);
    pl.slabs = (p.K + pl.rows - 1) / pl.rows;
    const int64_t max_cols = p.xt && p.M >= kAmxWholeK ? kAmxCols : slab_cols(p.M);
    pl.chunks = (p.N + max_cols - 1) / max_cols;
    const int64_t per = (want + int64_t(ps.size()) - 1) / int64_t(ps.size());
    if (pl.slabs * pl.chunks < per) pl.chunks = std::min((per + pl.slabs - 1) / pl.slabs, (p.N + 63) / 64);
    pl.cols = ((p.N + pl.chunks - 1) / pl.chunks + 15) / 16 * 16;
    pl.chunks = (p.N + pl.cols - 1) / pl.cols;
    pl.unit0 = units;
    units += pl.slabs * pl.chunks;
    pl.part0 = part;
    if (pl.slabs > 1) part += pl.slabs * p.M * p.N;
    plans.push_back(pl);
  }
  float* const parts = scratch(partial, size_t(part));
  if (left_n < ps.size()) {
    left_n = ps.size();
    left.reset(new std::atomic<int64_t>[left_n]);
  }
  for (size_t j = 0; j < ps.size(); ++j) {
    plans[j].out = plans[j].slabs > 1 ? parts + plans[j].part0 : ps[j].y;
    left[j].store(plans[j].slabs * plans[j].chunks, std::memory_order_relaxed);
  }
  const std::vector<Plan>& pls = plans;
  std::atomic<int64_t>* const lefts = left.get();
  parallel_for(pool, units, [&](int64_t i) {
    size_t j = 0;
    while (j + 1 < pls.size() && pls[j + 1].unit0 <= i) ++j;
    const Plan& pl = pls[j];
    const QProblem& p = ps[j];
    const int64_t u = i - pl.unit0;
    const int64_t k0 = (u / pl.chunks) * pl.rows, k1 = std::min(p.K, k0 + pl.rows);
    const int64_t n0 = (u % pl.chunks) * pl.cols, n1 = std::min(p.N, n0 + pl.cols);
    block(p, k0, k1, n0, n1, pl.slabs > 1 ? pl.out + (u / pl.chunks) * p.M * p.N : pl.out);
    if (pl.slabs <= 1 || lefts[j].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    const int64_t total = p.M * p.N;  // the problem's last unit: add its slabs in order
    float* y = p.y;
    std::memcpy(y, pl.out, sizeof(float) * total);
    for (int64_t sl = 1; sl < pl.slabs; ++sl) {
      const float* src = pl.out + sl * total;
      for (int64_t t = 0; t < total; ++t) y[t] += src[t];
    }
  });
}

// The unit of the int8 (bits 8) or packed int4 (bits 4) GEMV on the best path this CPU has.
void gemv_unit(int level, int bits, const QProblem& p, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
               float* out) {
#ifdef GROKCTL_X86
  if (bits == 8 && level >= kAmx && p.xt) return q8_block_amx(p, k0, k1, n0, n1, out);
  if (bits == 8 && level >= kAvx512) return q8_block_512(p, k0, k1, n0, n1, out);
  if (bits == 4 && level >= kAvx512Bf16)
    return p.xb ? q4_block_512<true>(p, k0, k1, n0, n1, out) : q4_block_512<false>(p, k0, k1, n0, n1, out);
  if (bits == 8 && level >= kAvx2) return q8_block_256(p, k0, k1, n0, n1, out);
  if (bits == 4 && level >= kAvx2) return q4_block_256(p, k0, k1, n0, n1, out);
#endif
  (void)level;
  if (bits == 8) return q8_block_scalar(p, k0, k1, n0, n1, out);
  q4_block_scalar(p, k0, k1, n0, n1, out);
}

// Rows of x from which an int8 product takes the AMX path — bf16 x from 8, f32 x (three planes,
// three times the tile work) from 16; below, the AVX-512 kernel is the faster (docs/
// PERFORMANCE.md, "AMX for several rows") — and the shapes it takes: whole k-steps of 32 in every
// unit and scale group.
inline bool amx_takes(int level, const QProblem& q) {
  return level >= kAmx && q.bits == 8 && q.M >= (q.xb ? 8 : 16) && q.K % 32 == 0 && (q.K / q.G) % 32 == 0 &&
         slab_rows(q.K) % 32 == 0;
}

// Elements of x's AMX tiles from which the threads lay them out together (512 KB).
constexpr size_t kAmxParallelTiles = size_t(1) << 18;

// The products ps on the best path this CPU has, in one parallel loop (slab_gemv_many). Problems
// for the AMX path get x as tiles first, once per x (a MoE layer's gate and up share theirs).
void gemv_many(ffi::ThreadPool& pool, int level, std::vector<QProblem>& ps) {
#ifdef GROKCTL_X86
  static thread_local std::vector<uint16_t> tiles;
  size_t total = 0;
  for (const QProblem& q : ps)
    if (amx_takes(level, q)) total += size_t(amx_x_size(q.M, q.K, q.xb));
  if (total > tiles.size()) tiles.resize(total);
  size_t used = 0;
  struct Job {
    const QProblem* q;
    uint16_t* dst;  // its tiles
    int64_t rb;     // the row block to lay out
  };
  static thread_local std::vector<Job> jobs;
  jobs.clear();
  for (size_t j = 0; j < ps.size(); ++j) {
    QProblem& q = ps[j];
    if (!amx_takes(level, q)) continue;
    for (size_t i = 0; i < j && !q.xt; ++i)
      if (ps[i].xt && ps[i].x == q.x && ps[i].M == q.M && ps[i].K == q.K) q.xt = ps[i].xt, q.xplanes = ps[i].xplanes;
    if (q.xt) continue;
    uint16_t* const dst = tiles.data() + used;
    q.xt = dst;
    q.xplanes = amx_planes(q.xb);
    used += size_t(amx_x_size(q.M, q.K, q.xb));
    for (int64_t rb = 0; rb < (q.M + 15) / 16; ++rb) jobs.push_back({&q, dst, rb});
  }
  // A prompt's x (megabytes of tiles) is laid out by every thread; a decode step's few rows by
  // the caller alone, in less time than waking the helpers takes.
  const Job* const todo = jobs.data();  // (a thread_local's name means each thread's own)
  auto lay_out = [todo](int64_t i) {
    const Job& jb = todo[i];
    amx_x_tiles(jb.q->x, jb.q->xb, jb.q->M, jb.q->K, jb.dst, jb.rb, jb.rb + 1);
  };
  if (used >= kAmxParallelTiles) parallel_for(pool, int64_t(jobs.size()), lay_out);
  else
    for (size_t i = 0; i < jobs.size(); ++i) lay_out(int64_t(i));
#endif
  slab_gemv_many(pool, ps, [&](const QProblem& q, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out) {
    gemv_unit(level, q.bits, q, k0, k1, n0, n1, out);
  });
}

// y[M, N] = x [M, K] @ dequant(w [(E,) K, N] int8, or [(E,) K/2, N] packed int4, expert `expert`).
ffi::Error qmatmul_impl(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer s,
                        ffi::Buffer<ffi::S32>& expert, ffi::Result<ffi::Buffer<ffi::F32>>& y,
                        int bits, const char* name) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto sd = s.dimensions();
  const std::string who(name);
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument(who + ": x must be f32 or bf16");
  const auto wtype = bits == 8 ? ffi::DataType::S8 : ffi::DataType::U8;
  if (w.element_type() != wtype || s.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument(
        who + (bits == 8 ? ": w must be int8" : ": w must be uint8 (packed int4)") + " and scales bf16");
  if (xd.size() != 2 || (wd.size() != 2 && wd.size() != 3) || sd.size() != wd.size())
    return ffi::Error::InvalidArgument(who + ": bad ranks");
  const int64_t M = xd[0], K = xd[1];
  const size_t r = wd.size();
  const int64_t N = wd[r - 1], G = sd[r - 2], Kp = bits == 8 ? K : K / 2;
  if ((bits == 4 && K % 2 != 0) || wd[r - 2] != Kp || sd[r - 1] != N || G <= 0 || K % G != 0 ||
      (bits == 4 && (K / G) % 2 != 0))
    return ffi::Error::InvalidArgument(who + ": shape mismatch");
  int64_t e = 0;
  if (r == 3) {
    e = int64_t(expert.typed_data()[0]);
    e = std::min<int64_t>(std::max<int64_t>(e, 0), wd[0] - 1);  // dynamic_slice's clamping
  }
  static thread_local std::vector<float> xtmp;
  QProblem p{as_f32(x, xtmp),
             bf16_bits(x),
             reinterpret_cast<const int8_t*>(w.untyped_data()) + e * Kp * N,
             reinterpret_cast<const uint16_t*>(s.untyped_data()) + e * G * N,
             y->typed_data(),
             M,
             K,
             N,
             G};
  p.bits = bits;
  static thread_local std::vector<QProblem> ps;
  ps.assign(1, p);
  gemv_many(pool, isa(), ps);
  return ffi::Error::Success();
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer s,
                       ffi::Buffer<ffi::S32> expert, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  return qmatmul_impl(pool, x, w, s, expert, y, 8, "grokctl_qmatmul");
}

ffi::Error QMatmul4Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer s,
                        ffi::Buffer<ffi::S32> expert, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  return qmatmul_impl(pool, x, w, s, expert, y, 4, "grokctl_qmatmul4");
}

// y_j[A, N_j] = row a of x [A, K] times expert idx[a]'s matrix of w_j [E, K(/2), N_j] (int8,
// or packed int4 as uint8) for one or two weights sharing the experts (a MoE layer's gate and
// up projections): a MoE step's assignments in one call. Rows choosing the same expert share
// one pass over its weights; every chosen expert's units of every weight run in one parallel
// loop (one thread-pool wake-up, not one per matrix). A negative id marks a row to skip (a
// prompt's padding past its length): nothing is computed for it and its outputs are zeros.
ffi::Error rows_impl(ffi::ThreadPool& pool, const char* name, ffi::AnyBuffer x, int nmat,
                     const ffi::AnyBuffer* const* ws, const ffi::AnyBuffer* const* ss,
                     ffi::Buffer<ffi::S32>& idx, float* const* ys) {
  const auto xd = x.dimensions();
  auto bad = [&](const char* what) { return ffi::Error::InvalidArgument(std::string(name) + ": " + what); };
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16)
    return bad("x must be f32 or bf16");
  if (xd.size() != 2 || idx.element_count() != size_t(xd[0])) return bad("bad ranks");
  const int64_t A = xd[0], K = xd[1];
  const int level = isa();
  int bits[2] = {0, 0};
  int64_t E = -1, N[2] = {0, 0}, G[2] = {0, 0};
  for (int j = 0; j < nmat; ++j) {
    const auto wd = ws[j]->dimensions();
    const auto sd = ss[j]->dimensions();
    bits[j] = ws[j]->element_type() == ffi::DataType::S8 ? 8 : ws[j]->element_type() == ffi::DataType::U8 ? 4 : 0;
    if (bits[j] == 0 || ss[j]->element_type() != ffi::DataType::BF16)
      return bad("w must be int8 or packed int4 (uint8), scales bf16");
    if (wd.size() != 3 || sd.size() != 3) return bad("bad ranks");
    N[j] = wd[2];
    G[j] = sd[1];
    const int64_t Kp = bits[j] == 8 ? K : K / 2;
    if (wd[1] != Kp || sd[0] != wd[0] || sd[2] != N[j] || G[j] <= 0 || K % G[j] != 0 ||
        (bits[j] == 4 && (K / G[j]) % 2) || (E >= 0 && wd[0] != E))
      return bad("shape mismatch");
    E = wd[0];
  }
  static thread_local std::vector<float> xtmp, xg, yg;
  static thread_local std::vector<uint16_t> xbg;
  static thread_local std::vector<int64_t> order;
  static thread_local std::vector<QProblem> ps;
  const float* xf = as_f32(x, xtmp);
  const uint16_t* xb = bf16_bits(x);
  const int32_t* ids = idx.typed_data();
  order.resize(size_t(A));
  for (int64_t a = 0; a < A; ++a) order[a] = a;
  auto expert_of = [&](int64_t a) { return ids[a] < 0 ? -1 : std::min<int64_t>(ids[a], E - 1); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return expert_of(i) < expert_of(j); });
  int64_t skipped = 0;  // rows to skip, sorted first
  while (skipped < A && expert_of(order[skipped]) < 0) ++skipped;
  scratch(xg, size_t(A * K));
  scratch(yg, size_t(A * (N[0] + N[1])));
  if (xb) scratch(xbg, size_t(A * K));
  for (int64_t r = skipped; r < A; ++r) {
    std::memcpy(xg.data() + r * K, xf + order[r] * K, sizeof(float) * K);
    if (xb) std::memcpy(xbg.data() + r * K, xb + order[r] * K, sizeof(uint16_t) * K);
  }
  ps.clear();
  for (int j = 0; j < nmat; ++j) {
    const int64_t Kp = bits[j] == 8 ? K : K / 2;
    const int8_t* wbase = reinterpret_cast<const int8_t*>(ws[j]->untyped_data());
    const uint16_t* sbase = reinterpret_cast<const uint16_t*>(ss[j]->untyped_data());
    float* yj = yg.data() + A * (j ? N[0] : 0);
    for (int64_t r = skipped; r < A;) {
      const int64_t e = expert_of(order[r]);
      int64_t r1 = r;
      while (r1 < A && expert_of(order[r1]) == e) ++r1;
      QProblem q{xg.data() + r * K, xb ? xbg.data() + r * K : nullptr, wbase + e * Kp * N[j],
                 sbase + e * G[j] * N[j], yj + r * N[j], r1 - r, K, N[j], G[j]};
      q.bits = bits[j];
      ps.push_back(q);
      r = r1;
    }
  }
  gemv_many(pool, level, ps);
  for (int j = 0; j < nmat; ++j) {
    const float* yj = yg.data() + A * (j ? N[0] : 0);
    for (int64_t r = 0; r < A; ++r)
      if (r < skipped) std::memset(ys[j] + order[r] * N[j], 0, sizeof(float) * N[j]);
      else std::memcpy(ys[j] + order[r] * N[j], yj + r * N[j], sizeof(float) * N[j]);
  }
  return ffi::Error::Success();
}

ffi::Error QMatmulRowsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer s,
                           ffi::Buffer<ffi::S32> idx, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const ffi::AnyBuffer* ws[1] = {&w};
  const ffi::AnyBuffer* ss[1] = {&s};
  float* ys[1] = {y->typed_data()};
  return rows_impl(pool, "grokctl_qmatmul_rows", x, 1, ws, ss, idx, ys);
}

ffi::Error QMatmulRows2Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w0, ffi::AnyBuffer s0,
                            ffi::AnyBuffer w1, ffi::AnyBuffer s1, ffi::Buffer<ffi::S32> idx,
                            ffi::Result<ffi::Buffer<ffi::F32>> y0, ffi::Result<ffi::Buffer<ffi::F32>> y1) {
  const ffi::AnyBuffer* ws[2] = {&w0, &w1};
  const ffi::AnyBuffer* ss[2] = {&s0, &s1};
  float* ys[2] = {y0->typed_data(), y1->typed_data()};
  return rows_impl(pool, "grokctl_qmatmul_rows2", x, 2, ws, ss, idx, ys);
}

#ifdef GROKCTL_X86
// The first index of r[0, n)'s maximum, the first NaN if any: one pass for the maximum (and any
// NaN), one for its first index. (The scalar loop's compare-and-branch took 160 us of a 20 ms
// decode step over 131,072 logits.)
AVX512 int64_t argmax_512(const float* r, int64_t n) {
  const int64_t full = n / 16 * 16;
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < full; i += 16) {
    const __m512 v = _mm512_loadu_ps(r + i);
    if (const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) return i + __builtin_ctz(nan);
    top = _mm512_max_ps(top, v);
  }
  float m = _mm512_reduce_max_ps(top);
  for (int64_t i = full; i < n; ++i) {
    if (r[i] != r[i]) return i;
    m = std::max(m, r[i]);
  }
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t i = 0; i < full; i += 16)
    if (const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + i), mv, _CMP_EQ_OQ)) return i + __builtin_ctz(eq);
  for (int64_t i = full; i < n; ++i)
    if (r[i] == m) return i;
  return 0;  // every entry -inf
}
#endif

// idx[B] = the first index of each row's maximum over x[B, V][:, :limit] (f32); a NaN counts as
// the maximum (the first NaN wins), as jnp.argmax. Greedy decoding's pick from the logits.
ffi::Error ArgmaxImpl(ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::S32>> idx, int64_t limit) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || idx->element_count() != size_t(xd[0]))
    return ffi::Error::InvalidArgument("grokctl_argmax: bad shapes");
  const int64_t B = xd[0], V = xd[1];
  const int64_t n = std::max<int64_t>(1, std::min(V, limit));
  const int level = isa();
  for (int64_t b = 0; b < B; ++b) {
    const float* r = x.typed_data() + b * V;
#ifdef GROKCTL_X86
    if (level >= kAvx512) {
      idx->typed_data()[b] = int32_t(argmax_512(r, n));
      continue;
    }
#endif
    (void)level;
    int64_t best = 0;
    float top = r[0];
    if (top != top) {  // NaN first
      idx->typed_data()[b] = 0;
      continue;
    }
    for (int64_t i = 1; i < n; ++i) {
      const float v = r[i];
      if (v != v) {
        best = i;
        break;
      }
      if (v > top) {
        top = v;
        best = i;
      }
    }
    idx->typed_data()[b] = int32_t(best);
  }
  return ffi::Error::Success();
}

// Three products of the same x [M, K] (attention's query, key and value projections) in one
// call: y_j = x @ dequant(w_j) for int8 or packed-int4 2-D weights, all units in one parallel loop.
ffi::Error QMatmul3Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w0, ffi::AnyBuffer s0,
                        ffi::AnyBuffer w1, ffi::AnyBuffer s1, ffi::AnyBuffer w2, ffi::AnyBuffer s2,
                        ffi::Result<ffi::Buffer<ffi::F32>> y0, ffi::Result<ffi::Buffer<ffi::F32>> y1,
                        ffi::Result<ffi::Buffer<ffi::F32>> y2) {
  const auto xd = x.dimensions();
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("grokctl_qmatmul3: x must be f32 or bf16");
  if (xd.size() != 2) return ffi::Error::InvalidArgument("grokctl_qmatmul3: bad ranks");
  const int64_t M = xd[0], K = xd[1];
  static thread_local std::vector<float> xtmp;
  static thread_local std::vector<QProblem> ps;
  const float* xf = as_f32(x, xtmp);
  const uint16_t* xb = bf16_bits(x);
  ps.clear();
  ffi::AnyBuffer* ws[3] = {&w0, &w1, &w2};
  ffi::AnyBuffer* ss[3] = {&s0, &s1, &s2};
  float* ys[3] = {y0->typed_data(), y1->typed_data(), y2->typed_data()};
  const int level = isa();
  for (int j = 0; j < 3; ++j) {
    const auto wd = ws[j]->dimensions();
    const auto sd = ss[j]->dimensions();
    const int bits = ws[j]->element_type() == ffi::DataType::S8 ? 8
                     : ws[j]->element_type() == ffi::DataType::U8 ? 4 : 0;
    if (bits == 0 || ss[j]->element_type() != ffi::DataType::BF16 || wd.size() != 2 || sd.size() != 2)
      return ffi::Error::InvalidArgument("grokctl_qmatmul3: weights must be 2-D int8 or packed int4, scales bf16");
    const int64_t N = wd[1], G = sd[0];
    if (wd[0] != (bits == 8 ? K : K / 2) || sd[1] != N || G <= 0 || K % G != 0 ||
        (bits == 4 && (K / G) % 2))
      return ffi::Error::InvalidArgument("grokctl_qmatmul3: shape mismatch");
    QProblem q{xf, xb, reinterpret_cast<const int8_t*>(ws[j]->untyped_data()),
               reinterpret_cast<const uint16_t*>(ss[j]->untyped_data()), ys[j], M, K, N, G};
    q.bits = bits;
    ps.push_back(q);
  }
  gemv_many(pool, level, ps);
  return ffi::Error::Success();
}

// y rows [v0, v1) of x . t^T on the best path this CPU has.
// `xp`: x's digit planes when the int8 VNNI path applies (bf16 x on a VNNI CPU), else null.
template <class T>
void nt_rows(int level, const NTP<T>& p, const XPlanes* xp, int64_t v0, int64_t v1) {
#ifdef GROKCTL_X86
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (level >= kAvx512Bf16 && p.xb) return ntb_rows_512(p, v0, v1);
  } else {
    if (level >= kAvx512Bf16 && p.xb && p.M >= kNtBf16Rows) return ntq_rows_bf16(p, v0, v1);
    if (level >= kAvx512Vnni && xp) return ntq_rows_vnni(p, *xp, v0, v1);
  }
  if (level >= kAvx512) return nt_rows_512(p, v0, v1);
  if (level >= kAvx2) return nt_rows_256(p, v0, v1);
#endif
  (void)level;
  (void)xp;
  nt_rows_scalar(p, v0, v1);
}

// ---------------------------------------------------------------- decode attention
// out[M, K] += w[M, n] (bf16 values as f32, row stride ws) @ v[n, K] (bf16 bits): each cache row
// read once for all M rows; zero weights (masked keys) skipped, which adds nothing. One body,
// vectorized by the compiler for each ISA (the k loop carries no reduction).
__attribute__((always_inline)) inline void wv_body(const float* w, int64_t ws, int64_t M,
                                                   const uint16_t* v, int64_t n, int64_t K,
                                                   float* out) {
  for (int64_t s = 0; s < n; ++s) {
    const uint16_t* vr = v + s * K;
    for (int64_t m = 0; m < M; ++m) {
      const float a = w[m * ws + s];
      if (a == 0.0f) continue;
      float* o = out + m * K;
      for (int64_t k = 0; k < K; ++k) {
        uint32_t u = uint32_t(vr[k]) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        o[k] += a * f;
      }
    }
  }
}
#ifdef GROKCTL_X86
AVX512 void wv_512(const float* w, int64_t ws, int64_t M, const uint16_t* v, int64_t n, int64_t K,
                   float* out) {
  wv_body(w, ws, M, v, n, K, out);
}
AVX2 void wv_256(const float* w, int64_t ws, int64_t M, const uint16_t* v, int64_t n, int64_t K,
                 float* out) {
  wv_body(w, ws, M, v, n, K, out);
}
#endif
void wv_scalar(const float* w, int64_t ws, int64_t M, const uint16_t* v, int64_t n, int64_t K,
               float* out) {
  wv_body(w, ws, M, v, n, K, out);
}
void wv(int level, const float* w, int64_t ws, int64_t M, const uint16_t* v, int64_t n, int64_t K,
        float* out) {
#ifdef GROKCTL_X86
  if (level >= kAvx512) return wv_512(w, ws, M, v, n, K, out);
  if (level >= kAvx2) return wv_256(w, ws, M, v, n, K, out);
#endif
  (void)level;
  wv_scalar(w, ws, M, v, n, K, out);
}

// The attention of new tokens over a KV cache of bf16 bit patterns, one unit per (batch row, kv head): the
// reference's numerics (grokctl/model/attention.py) with f32 sums in another order. Row (t, r)
// is query head g*R + r of token t: logits = bf16(q . k) * multiplier, soft-capped
// (cap * tanh(l / cap)), masked (key s valid and s <= position), softmax in f32, the weights
// rounded to bf16, then weights @ v in f32. Only keys up to the last position the unit's tokens
// may see are read (the rest are masked: weight exactly 0). A row with no visible key gets the
// reference's uniform 1/S weights over the whole cache.
ffi::Error AttendImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::Buffer<ffi::U16> kc,
                      ffi::Buffer<ffi::U16> vc, ffi::Buffer<ffi::S32> positions,
                      ffi::Buffer<ffi::PRED> valid, ffi::Result<ffi::Buffer<ffi::F32>> out,
                      float multiplier, float softcap) {
  const auto qd = q.dimensions();
  const auto cd = kc.dimensions();
  if ((q.element_type() != ffi::DataType::F32 && q.element_type() != ffi::DataType::BF16) ||
      qd.size() != 4 || cd.size() != 4 || vc.dimensions() != cd)
    return ffi::Error::InvalidArgument("grokctl_attend: q [B, T, H, K] f32|bf16, caches [B, G, S, K] bf16 bits (u16)");
  const int64_t B = qd[0], T = qd[1], H = qd[2], K = qd[3], G = cd[1], S = cd[2];
  if (cd[0] != B || cd[3] != K || G <= 0 || H % G != 0 || positions.dimensions().size() != 2 ||
      positions.dimensions()[0] != B || positions.dimensions()[1] != T ||
      valid.dimensions().size() != 2 || valid.dimensions()[0] != B || valid.dimensions()[1] != S)
    return ffi::Error::InvalidArgument("grokctl_attend: shape mismatch");
  const int64_t R = H / G, M = T * R;
  static thread_local std::vector<float> qtmp;
  const float* qf = as_f32(q, qtmp);
  const uint16_t* qb = bf16_bits(q);
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(kc.untyped_data());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(vc.untyped_data());
  const int32_t* pos = positions.typed_data();
  const bool* ok = reinterpret_cast<const bool*>(valid.untyped_data());
  float* y = out->typed_data();
  const int level = isa();
  const float uniform = round_bf16(1.0f / float(S));
  parallel_for(pool, B * G, [&](int64_t unit) {
    const int64_t b = unit / G, g = unit % G;
    static thread_local std::vector<float> xs, sc, acc;
    static thread_local std::vector<uint16_t> xbs;
    static thread_local std::vector<int64_t> ends;
    xs.resize(M * K);
    xbs.resize(qb ? M * K : 0);
    ends.resize(T);
    int64_t n = 0;  // keys read: up to the furthest position among the unit's tokens
    for (int64_t t = 0; t < T; ++t) {
      ends[t] = std::clamp<int64_t>(int64_t(pos[b * T + t]) + 1, 0, S);
      n = std::max(n, ends[t]);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t src = ((b * T + t) * H + g * R + r) * K;
        std::memcpy(&xs[(t * R + r) * K], qf + src, sizeof(float) * K);
        if (qb) std::memcpy(&xbs[(t * R + r) * K], qb + src, sizeof(uint16_t) * K);
      }
    }
    const uint16_t* kb = kp + (b * G + g) * S * K;
    const uint16_t* vb = vp + (b * G + g) * S * K;
    const bool* okb = ok + b * S;
    sc.assign(M * std::max<int64_t>(n, 1), 0.0f);
    if (n > 0) nt_rows(level, NTP<uint16_t>{xs.data(), qb ? xbs.data() : nullptr, kb, sc.data(), M, K, n}, nullptr, 0, n);
    acc.assign(M * K, 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < R; ++r) {
        float* l = sc.data() + (t * R + r) * n;
        float mx = -INFINITY;
        int64_t seen = 0;
        for (int64_t s = 0; s < ends[t]; ++s) {
          if (!okb[s]) continue;
          const float x = round_bf16(l[s]) * multiplier;
          l[s] = softcap * std::tanh(x / softcap);
          mx = std::max(mx, l[s]);
          ++seen;
        }
        float* o = acc.data() + (t * R + r) * K;
        if (seen == 0) {  // every key masked: the reference's uniform weights over all S keys
          std::fill(l, l + n, 0.0f);
          for (int64_t s = 0; s < S; ++s)
            for (int64_t k = 0; k < K; ++k) o[k] += uniform * bf16_to_f32(vb[s * K + k]);
          continue;
        }
        float sum = 0.0f;
        for (int64_t s = 0; s < n; ++s) {
          if (s < ends[t] && okb[s]) {
            l[s] = std::exp(l[s] - mx);
            sum += l[s];
          } else {
            l[s] = 0.0f;
          }
        }
        for (int64_t s = 0; s < n; ++s) l[s] = round_bf16(l[s] / sum);
      }
    wv(level, sc.data(), n, M, vb, n, K, acc.data());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < R; ++r)
        std::memcpy(y + ((b * T + t) * H + g * R + r) * K, acc.data() + (t * R + r) * K,
                    sizeof(float) * K);
  });
  return ffi::Error::Success();
}

// Logits over a bf16 (T = uint16_t) or int8 (T = int8_t) table, threaded over its rows.
template <class T>
ffi::Error matmul_nt(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer t,
                     ffi::Result<ffi::Buffer<ffi::F32>>& y, ffi::DataType table_type,
                     const char* name) {
  const auto xd = x.dimensions();
  const auto td = t.dimensions();
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument(std::string(name) + ": x must be f32 or bf16");
  // a bf16 table may come as its bit patterns (uint16: the engine's table, quant.bf16_tables)
  const bool bits = table_type == ffi::DataType::BF16 && t.element_type() == ffi::DataType::U16;
  if ((t.element_type() != table_type && !bits) || xd.size() != 2 || td.size() != 2 ||
      xd[1] != td[1])
    return ffi::Error::InvalidArgument(std::string(name) + ": bad table or shapes");
  static thread_local std::vector<float> xtmp;
  const NTP<T> p{as_f32(x, xtmp), bf16_bits(x), reinterpret_cast<const T*>(t.untyped_data()),
                 y->typed_data(), xd[0], xd[1], td[0]};
  const int64_t units = (p.V + kTableRows - 1) / kTableRows;
  const int level = isa();
  static thread_local XPlanes planes;
  const XPlanes* xp = nullptr;
  if constexpr (std::is_same_v<T, int8_t>) {
    const bool amx = amx_logits(level, p);
    if (level >= kAvx512Vnni && p.xb && (amx || (p.M < kNtBf16Rows && vnni_logits())) &&
        make_planes(p.xb, p.M, p.D, planes))
      xp = &planes;
#ifdef GROKCTL_X86
    if (amx && xp) {
      // (the workers see their own thread_locals: they get these by address)
      static thread_local std::vector<int8_t> tiles_tls;
      static thread_local DigitScale ds_tls;
      tiles_tls.resize(size_t(amx_digit_size(p.M, p.D)));
      amx_digit_tiles(*xp, p.M, p.D, tiles_tls.data());
      digit_scale(*xp, p.M, ds_tls);
      const int8_t* const tiles = tiles_tls.data();
      const DigitScale& ds = ds_tls;
      parallel_for(pool, units, [&](int64_t i) {
        const int64_t v0 = i * kTableRows, v1 = std::min(p.V, v0 + kTableRows), v16 = v0 + (v1 - v0) / 16 * 16;
        for (int64_t m0 = 0; m0 < p.M; m0 += kNtRowChunk) {
          NTP<T> q = p;
          q.y += m0 * p.V;
          q.M = std::min(kNtRowChunk, p.M - m0);
          ntq_rows_amx(q, *xp, ds, tiles + m0 / 16 * amx_digit_size(16, p.D), m0, v0, v16);
        }
        for (int64_t m = 0; m < p.M; ++m)  // a last unit's rows past a multiple of 16: the same sums
          for (int64_t v = v16; v < v1; ++v) ntq_block_vnni<1>(p, *xp, m, v, 1);
      });
      return ffi::Error::Success();
    }
#endif
  }
  parallel_for(pool, units, [&](int64_t i) {
    const int64_t v0 = i * kTableRows, v1 = std::min(p.V, v0 + kTableRows);
    // rows of x in chunks that stay in L2 while the unit's table rows (also in L2) pass by
    for (int64_t m0 = 0; m0 < p.M; m0 += kNtRowChunk) {
      NTP<T> q = p;
      q.x += m0 * p.D;
      if (q.xb) q.xb += m0 * p.D;
      q.y += m0 * p.V;
      q.M = std::min(kNtRowChunk, p.M - m0);
      nt_rows(level, q, xp, v0, v1);
    }
  });
  return ffi::Error::Success();
}

ffi::Error MatmulNTImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer t,
                        ffi::Result<ffi::Buffer<ffi::F32>> y) {
  return matmul_nt<uint16_t>(pool, x, t, y, ffi::DataType::BF16, "grokctl_matmul_nt_bf16");
}

ffi::Error MatmulNTQ8Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer t,
                          ffi::Result<ffi::Buffer<ffi::F32>> y) {
  return matmul_nt<int8_t>(pool, x, t, y, ffi::DataType::S8, "grokctl_matmul_nt_int8");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokctlQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokctlQMatmul4, QMatmul4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokctlQMatmulRows, QMatmulRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokctlQMatmulRows2, QMatmulRows2Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokctlArgmax, ArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("limit"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokctlQMatmul3, QMatmul3Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokctlMatmulNT, MatmulNTImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokctlMatmulNTQ8, MatmulNTQ8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokctlAttend, AttendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("multiplier")
                                  .Attr<float>("softcap"));

extern "C" __attribute__((visibility("default"))) int grokctl_cpu_isa() { return isa(); }
extern "C" __attribute__((visibility("default"))) int grokctl_cpu_vnni_logits() {
  return isa() >= kAvx512Vnni && vnni_logits();
}
extern "C" __attribute__((visibility("default"))) int grokctl_cpu_threads() { return max_threads(); }
