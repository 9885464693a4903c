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
// the decode path, bound by the bytes it reads.
#include "simd.h"  // first: it includes immintrin.h (see there)

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>

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
};

// Offsets are unsigned so that the division by 4 (codes -> lanes) is a shift.
inline size_t code_at(const QX& qx, int row, int s) {
  return static_cast<size_t>(row) * static_cast<size_t>(qx.stride) + 32u * static_cast<unsigned>(s);
}

template <typename T>
T* buffer(int which, size_t count) {
  struct Buf {
    void* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  static thread_local Buf bufs[3];
  Buf& b = bufs[which];
  const size_t bytes = count * sizeof(T);
  if (bytes > b.n) {
    std::free(b.p);
    b.p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    b.n = b.p != nullptr ? bytes : 0;
  }
  return static_cast<T*>(b.p);
}

void quantize_x(const float* x, int M, int K, QX& qx) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * K >= (1 << 16))
  for (int m = 0; m < M; ++m) {
    for (int64_t b = 0; b < qx.stride / 32; ++b) {
      int8_t* q = qx.q + m * qx.stride + 32 * b;
      float* d = qx.d + (m * qx.stride + 32 * b) / 4;
      float* s = qx.s + (m * qx.stride + 32 * b) / 4;
      if (32 * b >= K) {  // padding block
        for (int e = 0; e < 32; ++e) q[e] = 0;
        for (int l = 0; l < 8; ++l) d[l] = s[l] = 0.0f;
        continue;
      }
      const float* xb = x + static_cast<int64_t>(m) * K + 32 * b;
      float amax = 0.0f;
      for (int e = 0; e < 32; ++e) amax = std::fmax(amax, std::fabs(xb[e]));
      const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      for (int l = 0; l < 8; ++l) {
        int sum = 0;
        for (int e = 4 * l; e < 4 * l + 4; ++e) {
          q[e] = static_cast<int8_t>(std::nearbyint(xb[e] * inv));
          sum += q[e];
        }
        d[l] = dx;
        s[l] = dx * static_cast<float>(sum);
      }
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
    const Sub a = tf::decode_at<Q>(w, s, head);
    Sub b;
    if (s + 1 < subs) {
      b = tf::decode_at<Q>(w, s + 1, head);
    } else {  // an odd count: the second half is zero (and x's padding block is zero too)
      b = {_mm256_setzero_si256(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    }
    const __m512i q = _mm512_inserti64x4(_mm512_zextsi256_si512(a.q), b.q, 1);
    const __m512 ws = _mm512_insertf32x8(_mm512_zextps256_ps512(a.ws), b.ws, 1);
    const __m512 wo = _mm512_insertf32x8(_mm512_zextps256_ps512(a.wo), b.wo, 1);
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

template <int Q>
struct Int8Matmul {
  static void run(const float* x, const uint8_t* w, float* y, int M, int N, int K) {
    using F = Format<Q>;
    const int64_t stride = (K + 63) / 64 * 64;
    QX qx{buffer<int8_t>(0, M * stride), buffer<float>(1, M * stride / 4), buffer<float>(2, M * stride / 4), stride};
    quantize_x(x, M, K, qx);
    const int subs = K / 32;
    const int64_t wrow = static_cast<int64_t>(K / F::kBlock) * F::kBytes;
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
      buffer<float>(2, M * stride / 4) == nullptr)
    return -2;
  return tf::by_format<Int8Matmul>(qtype, x, w, y, M, N, K);
}
}
