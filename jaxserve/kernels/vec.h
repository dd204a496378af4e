// The float vector jaxserve's kernels compute with: 16 lanes (one AVX-512 register, two AVX2 ones, or what
// the portable build's target gives), its load from memory and the sum of its lanes.
#pragma once

#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace jaxserve {

constexpr int L = 16;  // floats per vector
typedef float vf __attribute__((vector_size(L * 4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float sum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float t = 0;
  for (int i = 0; i < L; ++i) t += v[i];
  return t;
#endif
}

}  // namespace jaxserve
