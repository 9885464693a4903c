// Skinny matmul for the CPU: y[M, N] = x[M, K] @ W[N, K]^T for M <= 8 rows (small-batch decode).
//
// Such a matmul reads every weight once and does M multiply-adds with it, so it is bound by memory
// bandwidth; this streams W row by row with several independent AVX2 accumulators, split across the
// OpenMP threads by output rows, and reads bf16 weights directly (half the bytes) or int8 weights with one
// float scale per output row (a quarter of the bytes; the weight-only quantized draft of self-speculation).
#include <immintrin.h>

#include <cstdint>

#include "simd.h"

namespace {

using tf::hsum;
using tf::load8;

inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float load1(const float* p) { return *p; }
inline float load1(const int8_t* p) { return static_cast<float>(*p); }
inline float load1(const uint16_t* p) {
  uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Up to four rows: two accumulators per row hide the FMA latency. Five to eight rows: one per row keeps
// the accumulators in the sixteen AVX2 registers.
template <int M, typename T>
void rows_wide(const float* x, const T* w, const float* scale, float* y, int N, int K, int n0, int n1) {
  const int k8 = K & ~7;
  for (int n = n0; n < n1; ++n) {
    const T* wr = w + static_cast<int64_t>(n) * K;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int k = 0; k < k8; k += 8) {
      const __m256 w0 = load8(wr + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[m]);
      for (int k = k8; k < K; ++k) s += load1(wr + k) * x[m * K + k];
      y[static_cast<int64_t>(m) * N + n] = scale ? s * scale[n] : s;
    }
  }
}

template <int M, typename T>
void rows(const float* x, const T* w, const float* scale, float* y, int N, int K, int n0, int n1) {
  const int k16 = K & ~15;
  for (int n = n0; n < n1; ++n) {
    const T* wr = w + static_cast<int64_t>(n) * K;
    __m256 a0[M], a1[M];
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    for (int k = 0; k < k16; k += 16) {
      const __m256 w0 = load8(wr + k), w1 = load8(wr + k + 8);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(_mm256_add_ps(a0[m], a1[m]));
      for (int k = k16; k < K; ++k) s += load1(wr + k) * x[m * K + k];
      y[static_cast<int64_t>(m) * N + n] = scale ? s * scale[n] : s;
    }
  }
}

template <typename T>
void gemv(const float* x, const T* w, const float* scale, float* y, int M, int N, int K) {
  constexpr int kChunk = 64;  // output rows per task: long sequential weight streams, enough tasks to balance
  const int chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int c = 0; c < chunks; ++c) {
    const int n0 = c * kChunk, n1 = n0 + kChunk < N ? n0 + kChunk : N;
    switch (M) {
      case 1: rows<1, T>(x, w, scale, y, N, K, n0, n1); break;
      case 2: rows<2, T>(x, w, scale, y, N, K, n0, n1); break;
      case 3: rows<3, T>(x, w, scale, y, N, K, n0, n1); break;
      case 4: rows<4, T>(x, w, scale, y, N, K, n0, n1); break;
      case 5: rows_wide<5, T>(x, w, scale, y, N, K, n0, n1); break;
      case 6: rows_wide<6, T>(x, w, scale, y, N, K, n0, n1); break;
      case 7: rows_wide<7, T>(x, w, scale, y, N, K, n0, n1); break;
      default: rows_wide<8, T>(x, w, scale, y, N, K, n0, n1); break;
    }
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, -1 for an M this kernel does not take (the caller uses a GEMM instead).
int tf_skinny_matmul(int weight_is_bf16, const float* x, const void* w, float* y, int M, int N, int K) {
  if (M < 1 || M > 8) return -1;
  if (weight_is_bf16)
    gemv<uint16_t>(x, static_cast<const uint16_t*>(w), nullptr, y, M, N, K);
  else
    gemv<float>(x, static_cast<const float*>(w), nullptr, y, M, N, K);
  return 0;
}

// y = (x @ W^T) * scale, W int8 [N, K], scale float [N] (symmetric per-output-row quantization).
int tf_skinny_matmul_int8(const float* x, const int8_t* w, const float* scale, float* y, int M, int N, int K) {
  if (M < 1 || M > 8) return -1;
  gemv<int8_t>(x, w, scale, y, M, N, K);
  return 0;
}
}
