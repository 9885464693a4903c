// bf16 x bf16 matmul with float32 accumulation for few rows: y[M, N] = x[M, K] @ W[N, K]^T, W bf16.
//
// On CPUs with AVX-512 BF16 one instruction (vdpbf16ps) multiplies 32 bf16 pairs and adds them into 16
// float32 lanes, so a bf16 checkpoint's weights are used as stored, with no widening. x is rounded to bf16
// once per call (round to nearest even), so the result equals a float32 matmul of bf16(x) and W up to
// summation order. vdpbf16ps pairs neighbouring K values in each 32-bit lane, which is exactly W's row-major
// layout: no repacking. Each weight row is read from memory once: it stays in L1 while every group of up to
// eight rows uses it; output rows are split across the OpenMP threads in chunks.
//
// Built in every variant; where TF_BF16_DOT is 0 (no AVX-512 BF16, not emulated) the entry point returns -1.
#include "simd.h"  // first: it includes immintrin.h (see there)

#include <cstdint>
#include <cstdlib>

namespace {

#if TF_BF16_DOT
// x as bf16, each row zero padded to a multiple of 32: a per-thread buffer, reused across calls.
uint16_t* x_buffer(size_t elems) {
  struct Buf {
    uint16_t* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  static thread_local Buf b;
  if (elems > b.n) {
    std::free(b.p);
    b.p = static_cast<uint16_t*>(std::aligned_alloc(64, ((elems * 2 + 63) / 64) * 64));
    b.n = b.p != nullptr ? elems : 0;
  }
  return b.p;
}

// Rows [m0, m0 + M) of x (bf16, padded to Kp) against weight rows [n0, n1). Up to four rows take two
// accumulators each to hide the dot's latency; five to eight take one.
template <int M>
void rows(const uint16_t* xb, const uint16_t* w, float* y, int N, int K, int Kp, int n0, int n1) {
  constexpr int NA = M <= 4 ? 2 : 1;
  const int steps = K - K % (32 * NA);  // whole steps of NA x 32 values
  const int full = K & ~31;             // then single 32-value steps; the rest is a masked load
  const __mmask32 tail = static_cast<__mmask32>((K & 31) ? ((1ULL << (K & 31)) - 1) : 0);
  for (int n = n0; n < n1; ++n) {
    const uint16_t* wr = w + static_cast<int64_t>(n) * K;
    __m512 acc[M][NA];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
    int k = 0;
    for (; k < steps; k += 32 * NA) {
      for (int a = 0; a < NA; ++a) {
        const __m512i wv = _mm512_loadu_si512(wr + k + 32 * a);
        for (int m = 0; m < M; ++m)
          acc[m][a] = tf::dot_bf16(acc[m][a], wv, _mm512_load_si512(xb + static_cast<size_t>(m) * Kp + k + 32 * a));
      }
    }
    for (; k < full; k += 32) {
      const __m512i wv = _mm512_loadu_si512(wr + k);
      for (int m = 0; m < M; ++m)
        acc[m][0] = tf::dot_bf16(acc[m][0], wv, _mm512_load_si512(xb + static_cast<size_t>(m) * Kp + k));
    }
    if (tail) {
      const __m512i wv = _mm512_maskz_loadu_epi16(tail, wr + k);
      for (int m = 0; m < M; ++m)
        acc[m][0] = tf::dot_bf16(acc[m][0], wv, _mm512_load_si512(xb + static_cast<size_t>(m) * Kp + k));
    }
    for (int m = 0; m < M; ++m) {
      __m512 t = acc[m][0];
      for (int b = 1; b < NA; ++b) t = _mm512_add_ps(t, acc[m][b]);
      y[static_cast<int64_t>(m) * N + n] = _mm512_reduce_add_ps(t);
    }
  }
}

void group(int M, const uint16_t* xb, const uint16_t* w, float* y, int N, int K, int Kp, int n0, int n1) {
  switch (M) {
    case 1: rows<1>(xb, w, y, N, K, Kp, n0, n1); break;
    case 2: rows<2>(xb, w, y, N, K, Kp, n0, n1); break;
    case 3: rows<3>(xb, w, y, N, K, Kp, n0, n1); break;
    case 4: rows<4>(xb, w, y, N, K, Kp, n0, n1); break;
    case 5: rows<5>(xb, w, y, N, K, Kp, n0, n1); break;
    case 6: rows<6>(xb, w, y, N, K, Kp, n0, n1); break;
    case 7: rows<7>(xb, w, y, N, K, Kp, n0, n1); break;
    default: rows<8>(xb, w, y, N, K, Kp, n0, n1); break;
  }
}
#endif

}  // namespace

extern "C" {

// 2 with the instruction emulated (test variant), 1 with AVX-512 BF16, 0 without (tf_bf16_matmul returns -1).
int tf_bf16_dot_kind() { return TF_BF16_DOT; }

// Returns 0 on success, -1 without a bf16 dot in this build, -2 when out of memory.
int tf_bf16_matmul(const float* x, const uint16_t* w, float* y, int M, int N, int K) {
#if TF_BF16_DOT
  if (M < 1 || N < 1 || K < 1) return -1;
  const int Kp = (K + 31) & ~31;
  uint16_t* xb = x_buffer(static_cast<size_t>(M) * Kp);
  if (xb == nullptr) return -2;
  for (int m = 0; m < M; ++m) {
    for (int k = 0; k < K; ++k) xb[static_cast<size_t>(m) * Kp + k] = tf::to_bf16(x[static_cast<size_t>(m) * K + k]);
    for (int k = K; k < Kp; ++k) xb[static_cast<size_t>(m) * Kp + k] = 0;
  }
  constexpr int kChunk = 32;  // output rows per task
  const int chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int c = 0; c < chunks; ++c) {
    const int n0 = c * kChunk, n1 = n0 + kChunk < N ? n0 + kChunk : N;
    // all row groups over this chunk's weight rows, which stay in L1/L2 between groups
    for (int m0 = 0; m0 < M; m0 += 8) {
      const int mg = M - m0 < 8 ? M - m0 : 8;
      group(mg, xb + static_cast<size_t>(m0) * Kp, w, y + static_cast<int64_t>(m0) * N, N, K, Kp, n0, n1);
    }
  }
  return 0;
#else
  (void)x, (void)w, (void)y, (void)M, (void)N, (void)K;
  return -1;
#endif
}
}
