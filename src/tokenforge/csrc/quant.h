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

#if TF_AVX512
// Two consecutive sub-blocks (s even, s + 1 < subs) decoded straight into 512-bit vectors: q holds sub-block
// s in bytes 0-31 and s + 1 in bytes 32-63, ws / wo their scale and offset per 4-byte lane. Reading both
// blocks' scales with one conversion and their codes with one split costs about half the instructions of
// two 256-bit decodes joined (the generic form, kept for Q6_K). The values are exactly decode_at's.
struct Pair {
  __m512i q;
  __m512 ws, wo;
};

inline __m512 lanes_of(__m128 f, int a, int b) {  // f[a] in lanes 0-7, f[b] in lanes 8-15
  return _mm512_permutexvar_ps(_mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a),
                               _mm512_castps128_ps512(f));
}

inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

inline uint16_t load16(const uint8_t* p) {
  uint16_t v;
  __builtin_memcpy(&v, p, 2);
  return v;
}

// 16 packed bytes of block A and of block B -> [A's 32 codes, B's 32 codes] (low nibbles first in each).
inline __m512i nibble_pair(const uint8_t* a, const uint8_t* b) {
  const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
                                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1);
  const __m256i m = _mm256_set1_epi8(0x0F);
  const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)),
                                       _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
  return _mm512_shuffle_i64x2(z, z, 0xD8);  // [A lo, B lo, A hi, B hi] -> [A lo, A hi, B lo, B hi]
}

template <int Q>
inline Pair decode_pair(const uint8_t* row, int s, typename Format<Q>::Head& h) {
  const Sub a = decode_at<Q>(row, s, h), b = decode_at<Q>(row, s + 1, h);
  return {_mm512_inserti64x4(_mm512_zextsi256_si512(a.q), b.q, 1),
          _mm512_insertf32x8(_mm512_zextps256_ps512(a.ws), b.ws, 1),
          _mm512_insertf32x8(_mm512_zextps256_ps512(a.wo), b.wo, 1)};
}

template <>
inline Pair decode_pair<kQ4_1>(const uint8_t* row, int s, Format<kQ4_1>::Head&) {
  constexpr int n = Format<kQ4_1>::kBytes;  // d, m (fp16) then 16 bytes of nibbles
  const uint8_t* b = row + s * n;
  const __m128 f = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(static_cast<int>(load32(b))),
                                                 static_cast<int>(load32(b + n)), 1));  // dA mA dB mB
  return {nibble_pair(b + 4, b + n + 4), lanes_of(f, 0, 2), lanes_of(f, 1, 3)};
}

template <>
inline Pair decode_pair<kQ4_0>(const uint8_t* row, int s, Format<kQ4_0>::Head&) {
  constexpr int n = Format<kQ4_0>::kBytes;  // d (fp16) then 16 bytes of nibbles
  const uint8_t* b = row + s * n;
  const __m128 f = _mm_cvtph_ps(_mm_insert_epi16(_mm_cvtsi32_si128(load16(b)), load16(b + n), 1));  // dA dB
  const __m512 ws = lanes_of(f, 0, 1);
  return {nibble_pair(b + 2, b + n + 2), ws, _mm512_mul_ps(ws, _mm512_set1_ps(-8.0f))};
}

template <>
inline Pair decode_pair<kQ8_0>(const uint8_t* row, int s, Format<kQ8_0>::Head&) {
  constexpr int n = Format<kQ8_0>::kBytes;  // d (fp16) then 32 signed codes
  const uint8_t* b = row + s * n;
  const __m128 f = _mm_cvtph_ps(_mm_insert_epi16(_mm_cvtsi32_si128(load16(b)), load16(b + n), 1));
  const __m512i q = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + n + 2)), 1);
  const __m512 ws = lanes_of(f, 0, 1);
  return {_mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80))), ws,
          _mm512_mul_ps(ws, _mm512_set1_ps(-128.0f))};
}

template <>
inline Pair decode_pair<kQ4_K>(const uint8_t* row, int s, Format<kQ4_K>::Head& h) {
  if ((s & 7) == 0) Format<kQ4_K>::head(row, s >> 3, h);
  const int j = s & 7;  // even: sub-blocks j and j + 1 share one 32-byte chunk (low and high nibbles)
  const __m256i v =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (s >> 3) * Format<kQ4_K>::kBytes + 16 + 16 * j));
  const __m256i m = _mm256_set1_epi8(0x0F);
  const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)),
                                       _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
  return {q, _mm512_insertf32x8(_mm512_set1_ps(h.scale[j]), _mm256_set1_ps(h.scale[j + 1]), 1),
          _mm512_insertf32x8(_mm512_set1_ps(h.offset[j]), _mm256_set1_ps(h.offset[j + 1]), 1)};
}
#endif

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
