// GGUF (ggml) block formats, decoded 32 weights at a time into one shape the kernels share.
//
// A row of W is a sequence of raw blocks exactly as in a GGUF file: Q8_0, Q4_0, Q4_1 hold 32 weights per
// block, Q4_K and Q6_K 256 (a super-block of eight 32-weight sub-blocks). Whatever the format, sub-block s
// of a row decodes to
//   q  : 32 unsigned bytes (one __m256i), the weights' integer codes, and
//   ws, wo : eight floats each, one per group of 4 consecutive weights (the lanes of a 4-byte dot product),
// with weight[e] = ws[e / 4] * q[e] + wo[e / 4]. K-quants first read their super-block's header (its
// sub-block scales, once per 256 weights: decode_at). Most formats have one scale and offset per 32 weights;
// Q6_K's scales change every 16 weights, i.e. every 4 lanes. Q8_0's signed codes are stored with 128 added
// (wo = -128 d) so that every format feeds the same unsigned x signed byte dot product (VNNI's vpdpbusd).
// Layouts follow ggml's block_q8_0 / q4_0 / q4_1 / q4_K / q6_K (see gguf.quants for the reference).
#pragma once

#include <cstdint>

#include "simd.h"

namespace tf {
namespace {

// GGML type ids (gguf.GGMLQuantizationType).
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14;

inline float half(const uint8_t* p) {
  uint16_t h;
  __builtin_memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Split 16 bytes of packed nibbles: weights 0-15 from the low nibbles, 16-31 from the high ones.
inline __m256i nibbles(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

struct Sub {
  __m256i q;
  __m256 ws, wo;
};

template <int Q>
struct Format;

template <>
struct Format<kQ8_0> {
  struct Head {};
  static void head(const uint8_t*, int, Head&) {}
  static constexpr int kBlock = 32, kBytes = 34;
  static Sub decode(const uint8_t* row, int s, const Head&) {
    const uint8_t* b = row + s * kBytes;
    const float d = half(b);
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
    return {_mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80))), _mm256_set1_ps(d),
            _mm256_set1_ps(-128.0f * d)};
  }
};

template <>
struct Format<kQ4_0> {
  struct Head {};
  static void head(const uint8_t*, int, Head&) {}
  static constexpr int kBlock = 32, kBytes = 18;
  static Sub decode(const uint8_t* row, int s, const Head&) {
    const uint8_t* b = row + s * kBytes;
    const float d = half(b);
    return {nibbles(b + 2), _mm256_set1_ps(d), _mm256_set1_ps(-8.0f * d)};
  }
};

template <>
struct Format<kQ4_1> {
  struct Head {};
  static void head(const uint8_t*, int, Head&) {}
  static constexpr int kBlock = 32, kBytes = 20;
  static Sub decode(const uint8_t* row, int s, const Head&) {
    const uint8_t* b = row + s * kBytes;
    return {nibbles(b + 4), _mm256_set1_ps(half(b)), _mm256_set1_ps(half(b + 2))};
  }
};

// Q4_K: d, dmin (fp16), 12 bytes of 6-bit scales and mins for the 8 sub-blocks, then 128 bytes of nibbles:
// byte chunk c (32 bytes) holds sub-block 2c in its low nibbles and 2c + 1 in its high ones.
template <>
struct Format<kQ4_K> {
  static constexpr int kBlock = 256, kBytes = 144;
  struct Head {
    float scale[8], offset[8];  // d * scale and -dmin * min of each sub-block
  };
  // Once per super-block: the 6-bit scales and mins (low 6 bits in bytes 0-7, the top 2 bits of sub-blocks
  // 4-7 in the top bits of bytes 0-7 and their low 4 bits in bytes 8-11).
  static void head(const uint8_t* row, int sb, Head& h) {
    const uint8_t* b = row + sb * kBytes;
    const float d = half(b), dmin = half(b + 2);
    const uint8_t* sc = b + 4;
    for (int j = 0; j < 4; ++j) {
      h.scale[j] = d * (sc[j] & 63);
      h.offset[j] = -dmin * (sc[j + 4] & 63);
      h.scale[j + 4] = d * ((sc[j + 8] & 0x0F) | ((sc[j] >> 6) << 4));
      h.offset[j + 4] = -dmin * ((sc[j + 8] >> 4) | ((sc[j + 4] >> 6) << 4));
    }
  }
  static Sub decode(const uint8_t* row, int s, const Head& h) {
    const uint8_t* b = row + (s >> 3) * kBytes;
    const int j = s & 7;
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * (j >> 1)));
    const __m256i q = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
    return {q, _mm256_set1_ps(h.scale[j]), _mm256_set1_ps(h.offset[j])};
  }
};

// Q6_K: 128 bytes of low nibbles (ql), 64 bytes of 2-bit high parts (qh), 16 int8 scales (one per 16
// weights), d (fp16). Weight r of half h (0..127) takes ql[64h + r % 64] >> (4 (r / 64)) and
// qh[32h + r % 32] >> (2 (r / 32)); its code is (low | high << 4) - 32.
template <>
struct Format<kQ6_K> {
  static constexpr int kBlock = 256, kBytes = 210;
  struct Head {
    float scale[16];  // d * scale of each 16 weights
  };
  static void head(const uint8_t* row, int sb, Head& h) {
    const uint8_t* b = row + sb * kBytes;
    const float d = half(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int i = 0; i < 16; ++i) h.scale[i] = d * sc[i];
  }
  static Sub decode(const uint8_t* row, int s, const Head& h) {
    const uint8_t* b = row + (s >> 3) * kBytes;
    const int j = s & 7, half_ = j >> 2, part = j & 3;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * half_ + 32 * (part & 1)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * half_));
    const __m256i lo = _mm256_and_si256(part >= 2 ? _mm256_srli_epi16(ql, 4) : ql, m4);
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * part)), m2);
    const __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
    const __m256 ws = _mm256_set_m128(_mm_set1_ps(h.scale[2 * j + 1]), _mm_set1_ps(h.scale[2 * j]));
    return {q, ws, _mm256_mul_ps(ws, _mm256_set1_ps(-32.0f))};
  }
};

// Decode sub-block s of a row, refreshing the super-block header when s starts one.
template <int Q>
inline Sub decode_at(const uint8_t* row, int s, typename Format<Q>::Head& h) {
  if constexpr (Format<Q>::kBlock == 256) {
    if ((s & 7) == 0) Format<Q>::head(row, s >> 3, h);
  }
  return Format<Q>::decode(row, s, h);
}

// The same dispatch everywhere: a C entry point takes the GGML type id.
template <template <int> class Fn, typename... Args>
int by_format(int qtype, Args... args) {
  switch (qtype) {
    case kQ8_0: Fn<kQ8_0>::run(args...); return 0;
    case kQ4_0: Fn<kQ4_0>::run(args...); return 0;
    case kQ4_1: Fn<kQ4_1>::run(args...); return 0;
    case kQ4_K: Fn<kQ4_K>::run(args...); return 0;
    case kQ6_K: Fn<kQ6_K>::run(args...); return 0;
    default: return -1;
  }
}

inline int64_t row_bytes(int qtype, int K) {
  switch (qtype) {
    case kQ8_0: return static_cast<int64_t>(K / 32) * 34;
    case kQ4_0: return static_cast<int64_t>(K / 32) * 18;
    case kQ4_1: return static_cast<int64_t>(K / 32) * 20;
    case kQ4_K: return static_cast<int64_t>(K / 256) * 144;
    case kQ6_K: return static_cast<int64_t>(K / 256) * 210;
    default: return -1;
  }
}

}  // namespace
}  // namespace tf
