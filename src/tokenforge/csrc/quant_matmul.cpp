// Matmul straight from GGUF blocks: y[M, N] = x[M, K] @ W[N, K]^T, W in Q8_0, Q4_0, Q4_1, Q4_K or Q6_K.
//
// Activations are quantized once per call to int8 in blocks of 32 (one float scale each, like ggml's
// q8_0), so each 4-weight lane costs one unsigned x signed byte dot product: vpdpbusd (AVX-512 VNNI, 64
// weights per instruction) or vpmaddubsw + vpmaddwd (AVX2, 32). With weight = ws q + wo per lane and x ~ dx
// xq, a sub-block contributes ws dx dot(q, xq) + wo dx sum(xq): the x side (dx and the per-lane sums of
// xq) is computed once per call and shared by all N output rows. Measured against float32 activations (the
// same kernels widening the codes to float and multiplying by x, mode 1 of tf_quant_matmul): see
// kernels.quant_matmul for the figures and the choice.
//
// Each weight row is decoded once per group of up to 8 (AVX-512) or 4 (AVX2) activation rows, which use
// the decoded sub-block from registers; further groups decode it again from L1 (a row is at most a few KB).
// Output rows are split across the OpenMP threads in chunks. One activation row streams the weights once:
// the decode path, bound by the bytes it reads. From kWideMin rows on, AVX-512 builds run the one-scale
// formats through the 16-lane kernel (wide_matmul below: sixteen x rows per vector, one block per column).
#include "simd.h"  // first: it includes immintrin.h (see there)

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "quant.h"

namespace {

using tf::Format;
using tf::Sub;

// x quantized: per row, K int8 codes, then per 4-code lane its block's scale (xd) and dx * sum of its codes
// (xs). Rows are padded to an even number of 32-blocks (zeros) so AVX-512 can take sub-blocks in pairs.
struct QX {
  int8_t* q;
  float* d;
  float* s;
  int64_t stride;  // codes per row (K rounded up to 64)
  float* b;  // per 32-block: dx, then dx * sum of its codes (stride / 16 floats per row)
};

// Offsets are unsigned so that the division by 4 (codes -> lanes) is a shift.
inline size_t code_at(const QX& qx, int row, int s) {
  return static_cast<size_t>(row) * static_cast<size_t>(qx.stride) + 32u * static_cast<unsigned>(s);
}

template <typename T>
T* buffer(int which, size_t count) {
  return tf::scratch<T, 4>(which, count);
}

void quantize_x(const float* x, int M, int K, QX& qx) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * K >= (1 << 16))
  for (int m = 0; m < M; ++m) {
    for (int64_t b = 0; b < qx.stride / 32; ++b) {
      int8_t* q = qx.q + m * qx.stride + 32 * b;
      float* d = qx.d + (m * qx.stride + 32 * b) / 4;
      float* s = qx.s + (m * qx.stride + 32 * b) / 4;
      float* blk = qx.b + (m * qx.stride + 32 * b) / 16;
      if (32 * b >= K) {  // padding block
        for (int e = 0; e < 32; ++e) q[e] = 0;
        for (int l = 0; l < 8; ++l) d[l] = s[l] = 0.0f;
        blk[0] = blk[1] = 0.0f;
        continue;
      }
      const float* xb = x + static_cast<int64_t>(m) * K + 32 * b;
#if TF_AVX512
      // the scalar loop below, 16 lanes at a time (cvtps rounds to nearest even, as nearbyint does)
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(inv)));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(inv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q1));
#else
      float amax = 0.0f;
      for (int e = 0; e < 32; ++e) amax = std::fmax(amax, std::fabs(xb[e]));
      const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      for (int e = 0; e < 32; ++e) q[e] = static_cast<int8_t>(std::nearbyint(xb[e] * inv));
#endif
      int total = 0;
      for (int l = 0; l < 8; ++l) {
        int sum = 0;
        for (int e = 4 * l; e < 4 * l + 4; ++e) sum += q[e];
        d[l] = dx;
        s[l] = dx * static_cast<float>(sum);
        total += sum;
      }
      blk[0] = dx;
      blk[1] = dx * static_cast<float>(total);
    }
  }
}

#if TF_AVX512
// Rows [0, R) of the group against weight row w: two sub-blocks per step, sixteen lanes.
template <int Q, int R>
void dot_rows(const uint8_t* w, int subs, const QX& qx, int m0, float* out) {
  __m512 acc[R], off[R];
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm512_setzero_ps();
  typename Format<Q>::Head head;
  for (int s = 0; s < subs; s += 2) {
    tf::Pair p;
    if (s + 1 < subs) {
      p = tf::decode_pair<Q>(w, s, head);
    } else {  // an odd count: the second half is zero (and x's padding block is zero too)
      const Sub a = tf::decode_at<Q>(w, s, head);
      p = {_mm512_zextsi256_si512(a.q), _mm512_zextps256_ps512(a.ws), _mm512_zextps256_ps512(a.wo)};
    }
    const __m512i q = p.q;
    const __m512 ws = p.ws, wo = p.wo;
    for (int r = 0; r < R; ++r) {
      const size_t at = code_at(qx, m0 + r, s);
      const __m512i xq = _mm512_load_si512(qx.q + at);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xq);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_load_ps(qx.d + at / 4)), acc[r]);
      off[r] = _mm512_fmadd_ps(wo, _mm512_load_ps(qx.s + at / 4), off[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], off[r]));
}
constexpr int kRows = 8;

// The formats with one scale and one offset per 32 weights (Q4_0, Q4_1, Q8_0) take a shorter path: a
// sub-block pair's four numbers (wsA woA wsB woB) are multiplied by x's (dxA sxA dxB sxB) in one 4-wide
// product; its scales go to the lanes once, and the offsets add up in that 4-wide vector. Per pair this
// saves the two 512-bit scale vectors, a multiply and an fma per row.
template <int Q>
struct OneScale : std::false_type {};
template <>
struct OneScale<tf::kQ4_0> : std::true_type {};
template <>
struct OneScale<tf::kQ4_1> : std::true_type {};
template <>
struct OneScale<tf::kQ8_0> : std::true_type {};

// wsA woA wsB woB of sub-blocks s and s + 1 (with_b false: s is the last one; its partner's are zero).
template <int Q>
inline __m128 pair_scales(const uint8_t* row, int s, bool with_b) {
  constexpr int bytes = tf::Format<Q>::kBytes;  // one block of 32 weights
  const uint8_t* b = row + s * bytes;
  if constexpr (Q == tf::kQ4_1) {
    const __m128i h = _mm_cvtsi32_si128(static_cast<int>(tf::load32(b)));
    return _mm_cvtph_ps(with_b ? _mm_insert_epi32(h, static_cast<int>(tf::load32(b + bytes)), 1) : h);
  } else {
    const __m128i h = _mm_cvtsi32_si128(tf::load16(b));
    const __m128 d = _mm_cvtph_ps(with_b ? _mm_insert_epi16(h, tf::load16(b + bytes), 2) : h);  // dA 0 dB 0
    const float o = Q == tf::kQ4_0 ? -8.0f : -128.0f;  // codes stored with 8 (Q4_0) or 128 (Q8_0) added
    return _mm_mul_ps(_mm_moveldup_ps(d), _mm_setr_ps(1.0f, o, 1.0f, o));
  }
}

template <int Q>
inline __m512i pair_codes(const uint8_t* row, int s, bool with_b) {
  constexpr int bytes = tf::Format<Q>::kBytes, at = Q == tf::kQ4_1 ? 4 : 2;  // codes after the fp16 header
  const uint8_t* b = row + s * bytes;
  if (with_b) {
    if constexpr (Q == tf::kQ8_0) {
      const __m512i q = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + at))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + bytes + at)), 1);
      return _mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80)));
    } else {
      return tf::nibble_pair(b + at, b + bytes + at);
    }
  }
  typename tf::Format<Q>::Head head;
  return _mm512_zextsi256_si512(tf::Format<Q>::decode(row, s, head).q);
}

constexpr int kPrefetchAhead = 1024;

template <int Q, int R>
void dot_rows_one_scale(const uint8_t* w, int subs, const QX& qx, int m0, float* out) {
  const __m512i idx = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[R];
  __m128 off[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    off[r] = _mm_setzero_ps();
  }
  for (int s = 0; s < subs; s += 2) {
    const bool with_b = s + 1 < subs;  // else x's padding block (zero) meets zero codes and scales
    // rows lie one after the other: fetch ahead of the hardware prefetcher, which stops at page ends and
    // falls behind two streams of short rows (SmolLM2's Q8_0 LM head at one row, 2 threads: 3.4 -> 2.7 ms)
    _mm_prefetch(reinterpret_cast<const char*>(w) + s * tf::Format<Q>::kBytes + kPrefetchAhead, _MM_HINT_T0);
    const __m512i q = pair_codes<Q>(w, s, with_b);
    const __m128 f = pair_scales<Q>(w, s, with_b);
    for (int r = 0; r < R; ++r) {
      const size_t at = code_at(qx, m0 + r, s);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_load_si512(qx.q + at));
      const __m128 prod = _mm_mul_ps(f, _mm_loadu_ps(qx.b + at / 16));  // wsA dxA, woA sxA, wsB dxB, woB sxB
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(prod)),
                               acc[r]);
      off[r] = _mm_add_ps(off[r], prod);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(16) float o[4];
    _mm_store_ps(o, off[r]);
    out[r] = _mm512_reduce_add_ps(acc[r]) + (o[1] + o[3]);
  }
}

// Many rows: sixteen activation rows in the sixteen 32-bit lanes. x is interleaved once per call so that
// one vector holds four consecutive codes of each of 16 rows; a weight's four codes are broadcast to every
// lane, so one vpdpbusd adds 4 weights x 16 rows and a 32-weight block's eight of them end in one int32 per
// row. The block's scales then cost one convert and two fmas per 16 rows and column, where the row-group
// kernel above pays a convert, a permute and an fma per 64 products. Weights stay in GGUF's layout: each
// column's block is unpacked to 32 bytes once per 16 rows. One-scale formats only (Q4_0, Q4_1, Q8_0).
constexpr int kLanes = 16;  // rows per group
constexpr int kCols = 8;    // columns at a time: eight independent vpdpbusd chains

struct XI {  // one group of 16 rows: codes [subs][8 dwords][16 rows][4], then dx and dx * sum per block
  const int8_t* q;
  const float* d;
  const float* s;
};

void interleave_x(const QX& qx, int m0, int M, int subs, int8_t* q, float* d, float* s) {
  for (int b = 0; b < subs; ++b) {
    for (int r = 0; r < kLanes; ++r) {
      const bool live = m0 + r < M;
      const size_t at = live ? code_at(qx, m0 + r, b) : 0;
      const int32_t* src = reinterpret_cast<const int32_t*>(qx.q + at);
      for (int g = 0; g < 8; ++g) reinterpret_cast<int32_t*>(q)[(b * 8 + g) * kLanes + r] = live ? src[g] : 0;
      d[b * kLanes + r] = live ? qx.b[at / 16] : 0.0f;
      s[b * kLanes + r] = live ? qx.b[at / 16 + 1] : 0.0f;
    }
  }
}

// Block b of a column: 32 codes as unsigned bytes, and its scale and offset (weight = ws * code + wo).
template <int Q>
inline void unpack_block(const uint8_t* row, int b, uint8_t* codes, float& ws, float& wo) {
  const uint8_t* p = row + b * tf::Format<Q>::kBytes;
  ws = tf::half(p);
  if constexpr (Q == tf::kQ8_0) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
    _mm256_store_si256(reinterpret_cast<__m256i*>(codes), _mm256_xor_si256(c, _mm256_set1_epi8(static_cast<char>(0x80))));
    wo = -128.0f * ws;
  } else {
    constexpr int at = Q == tf::kQ4_1 ? 4 : 2;
    const __m128i nib = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + at));
    const __m128i low = _mm_set1_epi8(0x0F);
    _mm_store_si128(reinterpret_cast<__m128i*>(codes), _mm_and_si128(nib, low));
    _mm_store_si128(reinterpret_cast<__m128i*>(codes + 16), _mm_and_si128(_mm_srli_epi16(nib, 4), low));
    wo = Q == tf::kQ4_1 ? tf::half(p + 2) : -8.0f * ws;
  }
}

// C columns (rows of W, wrow bytes apart) against one group of 16 x rows -> out[c * 16 + r].
template <int Q, int C>
void wide_cols(const uint8_t* w, int64_t wrow, int subs, const XI& xi, float* out) {
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  alignas(64) uint8_t codes[C][32];
  float ws[C], wo[C];
  for (int b = 0; b < subs; ++b) {
    for (int c = 0; c < C; ++c) unpack_block<Q>(w + c * wrow, b, codes[c], ws[c], wo[c]);
    // read the codes back from memory: a broadcast load is free of the shuffle port, where broadcasting
    // from a register (what the compiler would do) costs a shift and a broadcast there per vpdpbusd
    asm volatile("" ::: "memory");
    __m512i dot[C];
    for (int c = 0; c < C; ++c) dot[c] = _mm512_setzero_si512();
    const int8_t* xq = xi.q + static_cast<size_t>(b) * 8 * kLanes * 4;
    for (int g = 0; g < 8; ++g) {
      const __m512i xv = _mm512_load_si512(xq + g * kLanes * 4);
      for (int c = 0; c < C; ++c) {
        int32_t four;
        std::memcpy(&four, codes[c] + 4 * g, 4);
        dot[c] = _mm512_dpbusd_epi32(dot[c], _mm512_set1_epi32(four), xv);
      }
    }
    const __m512 dx = _mm512_load_ps(xi.d + b * kLanes), sx = _mm512_load_ps(xi.s + b * kLanes);
    for (int c = 0; c < C; ++c) {
      acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[c]), _mm512_mul_ps(_mm512_set1_ps(ws[c]), dx), acc[c]);
      acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(wo[c]), sx, acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) _mm512_store_ps(out + c * kLanes, acc[c]);
}

template <int Q>
void wide_block(const uint8_t* w, int64_t wrow, int subs, const XI& xi, int cols, float* out) {
  switch (cols) {
    case 1: wide_cols<Q, 1>(w, wrow, subs, xi, out); return;
    case 2: wide_cols<Q, 2>(w, wrow, subs, xi, out); return;
    case 3: wide_cols<Q, 3>(w, wrow, subs, xi, out); return;
    case 4: wide_cols<Q, 4>(w, wrow, subs, xi, out); return;
    case 5: wide_cols<Q, 5>(w, wrow, subs, xi, out); return;
    case 6: wide_cols<Q, 6>(w, wrow, subs, xi, out); return;
    case 7: wide_cols<Q, 7>(w, wrow, subs, xi, out); return;
    default: wide_cols<Q, kCols>(w, wrow, subs, xi, out); return;
  }
}
#else
// AVX2: one sub-block per step; the byte dot product is vpmaddubsw (pairs, int16) then vpmaddwd (lanes).
template <int Q, int R>
void dot_rows(const uint8_t* w, int subs, const QX& qx, int m0, float* out) {
  __m256 acc[R], off[R];
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  typename Format<Q>::Head head;
  for (int s = 0; s < subs; ++s) {
    Sub a = tf::decode_at<Q>(w, s, head);
    __m256i q = a.q;
    if constexpr (Q == tf::kQ8_0) {
      // codes up to 255 times x up to 127, summed in pairs, would overflow int16: use |code| and move the
      // sign onto x instead (the offset then is zero)
      q = _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80)));
      a.wo = _mm256_setzero_ps();
    }
    for (int r = 0; r < R; ++r) {
      const size_t at = code_at(qx, m0 + r, s);
      __m256i xq = _mm256_load_si256(reinterpret_cast<const __m256i*>(qx.q + at));
      __m256i qu = q;
      if constexpr (Q == tf::kQ8_0) {
        xq = _mm256_sign_epi8(xq, q);
        qu = _mm256_abs_epi8(q);
      }
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(qu, xq), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(a.ws, _mm256_load_ps(qx.d + at / 4)), acc[r]);
      off[r] = _mm256_fmadd_ps(a.wo, _mm256_load_ps(qx.s + at / 4), off[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = tf::hsum(_mm256_add_ps(acc[r], off[r]));
}
constexpr int kRows = 4;
#endif

template <int Q>
void rows_group(const uint8_t* w, int subs, const QX& qx, int m0, int rows, float* out) {
#if TF_AVX512
  if constexpr (OneScale<Q>::value) {
    switch (rows) {
      case 1: dot_rows_one_scale<Q, 1>(w, subs, qx, m0, out); return;
      case 2: dot_rows_one_scale<Q, 2>(w, subs, qx, m0, out); return;
      case 3: dot_rows_one_scale<Q, 3>(w, subs, qx, m0, out); return;
      case 4: dot_rows_one_scale<Q, 4>(w, subs, qx, m0, out); return;
      case 5: dot_rows_one_scale<Q, 5>(w, subs, qx, m0, out); return;
      case 6: dot_rows_one_scale<Q, 6>(w, subs, qx, m0, out); return;
      case 7: dot_rows_one_scale<Q, 7>(w, subs, qx, m0, out); return;
      default: dot_rows_one_scale<Q, kRows>(w, subs, qx, m0, out); return;
    }
  }
#endif
  switch (rows) {
    case 1: dot_rows<Q, 1>(w, subs, qx, m0, out); break;
    case 2: dot_rows<Q, 2>(w, subs, qx, m0, out); break;
    case 3: dot_rows<Q, 3>(w, subs, qx, m0, out); break;
#if TF_AVX512
    case 4: dot_rows<Q, 4>(w, subs, qx, m0, out); break;
    case 5: dot_rows<Q, 5>(w, subs, qx, m0, out); break;
    case 6: dot_rows<Q, 6>(w, subs, qx, m0, out); break;
    case 7: dot_rows<Q, 7>(w, subs, qx, m0, out); break;
#endif
    default: dot_rows<Q, kRows>(w, subs, qx, m0, out); break;
  }
}

#if TF_AVX512
// From 9 rows: the 16-lane kernel already wins from 7 (Q4_1 3072x576, 8 rows, 2 threads: 0.43 -> 0.32 ms), but
// up to 8 rows every row is summed as alone (the row-group kernel), so a batch-1 draft chain of up to 7
// tokens is verified with the very numbers plain decoding gives: speculation stays token-identical.
constexpr int kWideMin = 9;

template <int Q>
bool wide_matmul(const QX& qx, const uint8_t* w, int64_t wrow, float* y, int M, int N, int subs) {
  const int groups = (M + kLanes - 1) / kLanes;
  const size_t codes = static_cast<size_t>(subs) * 8 * kLanes * 4, scales = static_cast<size_t>(subs) * kLanes;
  int8_t* xq = tf::scratch<int8_t, 3>(0, groups * codes);  // shared by the threads, filled before they start
  float* xd = tf::scratch<float, 3>(1, groups * scales);
  float* xs = tf::scratch<float, 3>(2, groups * scales);
  if (xq == nullptr || xd == nullptr || xs == nullptr) return false;  // the row-group kernel needs no more
  for (int g = 0; g < groups; ++g)
    interleave_x(qx, g * kLanes, M, subs, xq + g * codes, xd + g * scales, xs + g * scales);
  constexpr int kChunk = 16;
  const int chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int c = 0; c < chunks; ++c) {
    alignas(64) float out[kCols * kLanes];
    const int n1 = (c + 1) * kChunk < N ? (c + 1) * kChunk : N;
    for (int n = c * kChunk; n < n1; n += kCols) {
      const int cols = n1 - n < kCols ? n1 - n : kCols;
      for (int g = 0; g < groups; ++g) {
        const XI xi{xq + g * codes, xd + g * scales, xs + g * scales};
        wide_block<Q>(w + n * wrow, wrow, subs, xi, cols, out);
        const int rows = M - g * kLanes < kLanes ? M - g * kLanes : kLanes;
        for (int r = 0; r < rows; ++r)
          for (int j = 0; j < cols; ++j) y[static_cast<int64_t>(g * kLanes + r) * N + n + j] = out[j * kLanes + r];
      }
    }
  }
  return true;
}
#endif

template <int Q>
struct Int8Matmul {
  static void run(const float* x, const uint8_t* w, float* y, int M, int N, int K) {
    using F = Format<Q>;
    const int64_t stride = (K + 63) / 64 * 64;
    QX qx{buffer<int8_t>(0, M * stride), buffer<float>(1, M * stride / 4), buffer<float>(2, M * stride / 4), stride,
          buffer<float>(3, M * stride / 16)};
    quantize_x(x, M, K, qx);
    const int subs = K / 32;
    const int64_t wrow = static_cast<int64_t>(K / F::kBlock) * F::kBytes;
#if TF_AVX512
    if constexpr (OneScale<Q>::value) {
      if (M >= kWideMin && wide_matmul<Q>(qx, w, wrow, y, M, N, subs)) return;
    }
#endif
    constexpr int kChunk = 16;  // output rows per task
    const int chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
    for (int c = 0; c < chunks; ++c) {
      float out[kRows];
      const int n1 = (c + 1) * kChunk < N ? (c + 1) * kChunk : N;
      for (int n = c * kChunk; n < n1; ++n) {
        for (int m0 = 0; m0 < M; m0 += kRows) {
          const int rows = M - m0 < kRows ? M - m0 : kRows;
          rows_group<Q>(w + n * wrow, subs, qx, m0, rows, out);
          for (int r = 0; r < rows; ++r) y[static_cast<int64_t>(m0 + r) * N + n] = out[r];
        }
      }
    }
  }
};

// The float32-activation alternative, kept to re-measure the choice: codes widened to float, multiplied by
// x as is, one scale and offset per 32-weight sub-block (every format but Q6_K, whose scale changes every
// 16 weights). One row only: the decode case the choice is about.
template <int Q>
struct F32Matvec {
  static void run(const float* x, const uint8_t* w, float* y, int N, int K) {
    using F = Format<Q>;
    const int subs = K / 32;
    const int64_t wrow = static_cast<int64_t>(K / F::kBlock) * F::kBytes;
    float* xsum = buffer<float>(0, subs);
    for (int s = 0; s < subs; ++s) {
      float t = 0.0f;
      for (int e = 0; e < 32; ++e) t += x[32 * s + e];
      xsum[s] = t;
    }
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const uint8_t* wr = w + n * wrow;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      float off = 0.0f;
      typename Format<Q>::Head head;
      for (int s = 0; s < subs; ++s) {
        const Sub a = tf::decode_at<Q>(wr, s, head);
        const float* xs = x + 32 * s;
        __m256 t = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
          const __m128i b8 = i < 2 ? _mm256_castsi256_si128(a.q) : _mm256_extracti128_si256(a.q, 1);
          const __m256i b32 = _mm256_cvtepu8_epi32(i & 1 ? _mm_srli_si128(b8, 8) : b8);
          t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b32), _mm256_loadu_ps(xs + 8 * i), t);
        }
        (s & 1 ? acc1 : acc0) = _mm256_fmadd_ps(t, a.ws, s & 1 ? acc1 : acc0);
        off += _mm256_cvtss_f32(a.wo) * xsum[s];
      }
      y[n] = tf::hsum(_mm256_add_ps(acc0, acc1)) + off;
    }
  }
};

}  // namespace

extern "C" {

// mode 0: int8 activations (any M); mode 1: float32 activations (M = 1, not Q6_K). K must be a whole number
// of blocks. Returns 0, -1 for an unknown format or shape, -2 when out of memory.
int tf_quant_matmul(int qtype, int mode, const float* x, const uint8_t* w, float* y, int M, int N, int K) {
  const int64_t bytes = tf::row_bytes(qtype, K);
  if (bytes <= 0 || M < 1 || N < 1 || K % (qtype == tf::kQ4_K || qtype == tf::kQ6_K ? 256 : 32) != 0) return -1;
  if (mode == 1) {
    if (M != 1 || qtype == tf::kQ6_K) return -1;
    if (buffer<float>(0, K / 32) == nullptr) return -2;
    return tf::by_format<F32Matvec>(qtype, x, w, y, N, K);
  }
  const int64_t stride = (K + 63) / 64 * 64;
  if (buffer<int8_t>(0, M * stride) == nullptr || buffer<float>(1, M * stride / 4) == nullptr ||
      buffer<float>(2, M * stride / 4) == nullptr || buffer<float>(3, M * stride / 16) == nullptr)
    return -2;
  return tf::by_format<Int8Matmul>(qtype, x, w, y, M, N, K);
}
}
