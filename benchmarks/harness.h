// What the kernel harnesses share: the kernels' source, and the plain streaming read they are
// measured against (the ceiling for a weight stream on these cores).
#pragma once
#include "../grokctl/kernels/cpu_kernels.cc"

#include <chrono>
#include <cstdio>
#include <thread>

namespace harness {
// Sums n bytes (two lines per step): the read rate of one thread, with the widest loads this CPU has.
AVX512 inline long read_sum_512(const int8_t* p, size_t n) {
  __m512i a = _mm512_setzero_si512(), b = a;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    a = _mm512_add_epi32(a, _mm512_loadu_si512(p + i));
    b = _mm512_add_epi32(b, _mm512_loadu_si512(p + i + 64));
  }
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
}
AVX2 inline long read_sum_256(const int8_t* p, size_t n) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    a = _mm256_add_epi32(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_add_epi32(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    c = _mm256_add_epi32(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    d = _mm256_add_epi32(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
  long sum = 0;
  for (int32_t v : lanes) sum += v;
  return sum;
}
inline long read_sum(const int8_t* p, size_t n) {
  return isa() >= kAvx512 ? read_sum_512(p, n) : read_sum_256(p, n);
}

// The harnesses time the AVX2 paths and, where the CPU has them, the AVX-512 ones: false (with a
// line saying so) on a CPU without AVX2.
inline bool has_avx2() {
  if (isa() >= kAvx2) return true;
  std::printf("this CPU lacks AVX2: the harnesses time the vector paths only\n");
  return false;
}
}  // namespace harness
