// SIMD helpers shared by the CPU kernels.
//
// One source tree builds every ISA variant (setup.py compiles it once per target: AVX2, AVX-512, AVX-512 BF16),
// so code paths are chosen here with the compiler's target macros, never at run time. V8 (AVX2, eight float
// lanes) always exists; V16 (AVX-512F, sixteen lanes) only where the compiler targets AVX-512F. A kernel
// written against these traits compiles at either width; each kernel picks its width with its own switch
// (TF_WIDE_* below), set where the 16-lane version measured faster than the 8-lane one.
#pragma once

// GCC 12's AVX-512 headers leave "undefined" vectors uninitialized on purpose (_mm512_reduce_add_ps and
// friends), which its -Wuninitialized then reports at the header's own lines: silence it there only. Every
// kernel source includes this header before anything else, so this is where immintrin.h is first read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cstdlib>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define TF_AVX512 1
#else
#define TF_AVX512 0
#endif

// Per-kernel width switches: 1 takes the 16-lane version in AVX-512 builds (see README for the measurements).
#define TF_WIDE_GEMV TF_AVX512
#define TF_WIDE_PANEL TF_AVX512
#define TF_WIDE_ATTN TF_AVX512
#define TF_WIDE_FUSED TF_AVX512

// The bf16 dot product (vdpbf16ps): the instruction where the target has it; TF_BF16_EMULATE (the emulated
// test variant) computes the same sums with AVX-512F so the algorithm is testable on any AVX-512 CPU.
#if TF_AVX512 && defined(TF_BF16_EMULATE)
#define TF_BF16_DOT 2
#elif TF_AVX512 && defined(__AVX512BF16__)
#define TF_BF16_DOT 1
#else
#define TF_BF16_DOT 0
#endif

namespace tf {
namespace {  // internal linkage: every variant library keeps its own copies

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 is the top half of a float32
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
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

inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Width traits: the same kernel source at eight or sixteen float lanes.
struct V8 {
  using F = __m256;
  static constexpr int W = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const uint16_t* p) { return load8(p); }
  static F load(const int8_t* p) { return load8(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F exp(F x) { return exp8(x); }
  static float hsum(F v) { return tf::hsum(v); }
};

#if TF_AVX512
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp16: the same algorithm as exp8 (same polynomial, same clamps, so both widths give the same values).
inline __m512 exp16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 g = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), x);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e));
}

struct V16 {
  using F = __m512;
  static constexpr int W = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const uint16_t* p) { return load16(p); }
  static F load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F exp(F x) { return exp16(x); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
};
#endif

#if TF_BF16_DOT
// acc[i] += a.bf16[2i+1] * b.bf16[2i+1] + a.bf16[2i] * b.bf16[2i] (vdpbf16ps: odd pair first, then even).
// A product of two bf16 values is exact in float32, so the emulation's two FMAs round exactly like the
// instruction's two accumulation steps (the instruction also flushes denormals, which no weight relies on).
inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
#if TF_BF16_DOT == 1
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, hi)), _mm512_castsi512_ps(_mm512_and_si512(b, hi)),
                        acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)),
                         acc);
#endif
}
#endif

// Per-thread 64-byte aligned scratch buffer `which` (of Slots per translation unit) holding at least
// `count` Ts: it grows when asked for more and is reused across calls, so hot paths do not allocate.
// Null when the allocation fails.
template <typename T, int Slots>
T* scratch(int which, size_t count) {
  struct Buf {
    void* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  static thread_local Buf bufs[Slots];
  Buf& b = bufs[which];
  const size_t bytes = count * sizeof(T);
  if (bytes > b.n) {
    std::free(b.p);
    b.p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    b.n = b.p != nullptr ? bytes : 0;
  }
  return static_cast<T*>(b.p);
}

}  // namespace
}  // namespace tf
