// GGUF block rows <-> float32: dequantize chosen rows (an embedding gather, or a whole weight for a float
// GEMM) and quantize float32 rows into Q8_0 or Q4_0 (a draft copy made at load time).
//
// The quantizers reproduce gguf.quants (ggml's reference rounding) bit for bit, so their arithmetic must be
// exactly float32 as written: this file is compiled without fast-math reassociation and without fused
// multiply-adds for those two functions.
#include "simd.h"  // first: it includes immintrin.h (see there)

#include <cmath>
#include <cstdint>

#include "quant.h"

namespace {

using tf::Format;
using tf::Sub;

// Lanes (one per 4 weights) -> one value per weight, for the 8 weights [8i, 8i + 8).
inline __m256 per_weight(__m256 lanes, int i) {
  const __m256i idx = _mm256_setr_epi32(2 * i, 2 * i, 2 * i, 2 * i, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1);
  return _mm256_permutevar8x32_ps(lanes, idx);
}

template <int Q>
struct Dequant {
  static void run(const uint8_t* w, const int64_t* ids, int T, float* out, int K) {
    using F = Format<Q>;
    const int64_t wrow = static_cast<int64_t>(K / F::kBlock) * F::kBytes;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(T) * K >= (1 << 18))
    for (int t = 0; t < T; ++t) {
      const uint8_t* row = w + (ids != nullptr ? ids[t] : t) * wrow;
      float* o = out + static_cast<int64_t>(t) * K;
      typename F::Head head;
      for (int s = 0; s < K / 32; ++s) {
        const Sub a = tf::decode_at<Q>(row, s, head);
        for (int i = 0; i < 4; ++i) {
          const __m128i b8 = i < 2 ? _mm256_castsi256_si128(a.q) : _mm256_extracti128_si256(a.q, 1);
          const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(i & 1 ? _mm_srli_si128(b8, 8) : b8));
          _mm256_storeu_ps(o + 32 * s + 8 * i, _mm256_fmadd_ps(per_weight(a.ws, i), q, per_weight(a.wo, i)));
        }
      }
    }
  }
};

inline void store_half(uint8_t* p, float v) {
  const uint16_t h = static_cast<uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
  __builtin_memcpy(p, &h, 2);
}

#pragma GCC push_options
#pragma GCC optimize("no-fast-math", "fp-contract=off")

// gguf.quants.Q8_0: d = max|x| / 127, q = round half away from zero (x / d) (via x * (1 / d)).
void quantize_q8_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int e = 0; e < 32; ++e) amax = std::fabs(x[e]) > amax ? std::fabs(x[e]) : amax;
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_half(b, d);
  for (int e = 0; e < 32; ++e) b[2 + e] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[e] * id)));
}

// gguf.quants.Q4_0: d = (the value of largest magnitude, first if tied) / -8, q = min(15, trunc(x / d + 8.5)),
// weights 0-15 in the low nibbles, 16-31 in the high ones.
void quantize_q4_0(const float* x, uint8_t* b) {
  float amax = 0.0f, max = 0.0f;
  for (int e = 0; e < 32; ++e) {
    if (std::fabs(x[e]) > amax) {
      amax = std::fabs(x[e]);
      max = x[e];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_half(b, d);
  int q[32];
  for (int e = 0; e < 32; ++e) {
    const float v = x[e] * id;
    const int c = static_cast<int>(std::trunc(v + 8.5f));
    q[e] = c < 0 ? 0 : (c > 15 ? 15 : c);
  }
  for (int j = 0; j < 16; ++j) b[2 + j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
}

#pragma GCC pop_options

}  // namespace

extern "C" {

// out[t] = the float32 values of row ids[t] of w ([N] rows of K values in qtype; ids null: rows 0..T-1).
// Returns 0, -1 for an unknown format or a K that is not a whole number of blocks.
int tf_quant_dequant_rows(int qtype, const uint8_t* w, const int64_t* ids, int T, float* out, int K) {
  if (tf::row_bytes(qtype, K) <= 0 || K % (qtype == tf::kQ4_K || qtype == tf::kQ6_K ? 256 : 32) != 0) return -1;
  return tf::by_format<Dequant>(qtype, w, ids, T, out, K);
}

// Quantize x [N, K] float32 into rows of Q8_0 or Q4_0 blocks (out: N * row bytes). Returns 0, or -1 for
// another format or a K that is not a multiple of 32.
int tf_quant_quantize(int qtype, const float* x, uint8_t* out, int N, int K) {
  if ((qtype != tf::kQ8_0 && qtype != tf::kQ4_0) || K % 32 != 0 || K < 32) return -1;
  const int bytes = qtype == tf::kQ8_0 ? 34 : 18;
  const int64_t blocks = static_cast<int64_t>(N) * (K / 32);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < blocks; ++i) {
    if (qtype == tf::kQ8_0)
      quantize_q8_0(x + 32 * i, out + bytes * i);
    else
      quantize_q4_0(x + 32 * i, out + bytes * i);
  }
  return 0;
}
}
