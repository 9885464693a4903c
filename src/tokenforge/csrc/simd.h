// AVX2 helpers shared by the CPU kernels: eight-lane loads that widen bf16, a horizontal sum, exp.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace tf {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 is the top half of a float32
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp for eight lanes: 2^n * e^g with n = round(x / ln 2), |g| <= ln(2) / 2, e^g by its Taylor series to
// degree 6 (relative error ~1e-7); lanes below -87 (masked keys, far-off scores) give exactly 0, lanes
// above 88 saturate at e^88 (finite: -ffast-math assumes no infinities).
inline __m256 exp8(__m256 x) {
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 g = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147181f), x);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(small, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// float32 -> bf16 rounding to nearest, ties to even (as torch's .to(torch.bfloat16)); inputs are finite.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace tf
