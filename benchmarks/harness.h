// What the kernel harnesses share: the kernels' source, and the plain streaming read they are
// measured against (the ceiling for a weight stream on these cores).
#pragma once
#include "../grokctl/kernels/cpu_kernels.cc"

#include <chrono>
#include <cstdio>
#include <thread>

namespace harness {
// Sums n bytes with AVX-512 loads (two 64-byte lines per step): the read rate of one thread.
AVX512 inline long read_sum(const int8_t* p, size_t n) {
  __m512i a = _mm512_setzero_si512(), b = a;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    a = _mm512_add_epi32(a, _mm512_loadu_si512(p + i));
    b = _mm512_add_epi32(b, _mm512_loadu_si512(p + i + 64));
  }
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
}

// The harnesses time the AVX-512 paths: false (with a line saying so) on a CPU without them.
inline bool has_avx512() {
  if (isa() >= kAvx512) return true;
  std::printf("this CPU lacks AVX-512: the harness times that path only\n");
  return false;
}
}  // namespace harness
