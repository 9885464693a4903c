// Skinny matmul for the CPU: y[M, N] = x[M, K] @ W[N, K]^T for M <= 8 rows (small-batch decode).
//
// Such a matmul reads every weight once and does M multiply-adds with it, so it is bound by memory
// bandwidth; this streams W row by row with several independent accumulators, split across the OpenMP
// threads by output rows, and reads bf16 weights directly (half the bytes) or int8 weights with one float
// scale per output row (a quarter of the bytes; the weight-only quantized draft of self-speculation).
// Vectors run along K: eight lanes (AVX2) or sixteen (AVX-512, TF_WIDE_GEMV).
#include "simd.h"  // first: it includes immintrin.h (see there)

#include <cstdint>

namespace {

#if TF_WIDE_GEMV
using V = tf::V16;
#else
using V = tf::V8;
#endif

inline float load1(const float* p) { return *p; }
inline float load1(const int8_t* p) { return static_cast<float>(*p); }
inline float load1(const uint16_t* p) { return tf::from_bf16(*p); }

// NA independent accumulators per row hide the FMA latency; M * NA accumulators plus NA weight vectors
// must fit the register file (16 with AVX2, 32 with AVX-512), so AVX2 takes one per row from five rows on.
template <int M, int NA, typename T>
void rows(const float* x, const T* w, const float* scale, float* y, int N, int K, int n0, int n1) {
  constexpr int step = NA * V::W;
  const int kv = K - K % step;
  for (int n = n0; n < n1; ++n) {
    const T* wr = w + static_cast<int64_t>(n) * K;
    typename V::F acc[M][NA];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = V::zero();
    for (int k = 0; k < kv; k += step) {
      typename V::F wv[NA];
      for (int a = 0; a < NA; ++a) wv[a] = V::load(wr + k + a * V::W);
      for (int m = 0; m < M; ++m)
        for (int a = 0; a < NA; ++a) acc[m][a] = V::fmadd(wv[a], V::load(x + m * K + k + a * V::W), acc[m][a]);
    }
    for (int m = 0; m < M; ++m) {
      typename V::F t = acc[m][0];
      for (int a = 1; a < NA; ++a) t = V::add(t, acc[m][a]);
      float s = V::hsum(t);
      for (int k = kv; k < K; ++k) s += load1(wr + k) * x[m * K + k];
      y[static_cast<int64_t>(m) * N + n] = scale ? s * scale[n] : s;
    }
  }
}

template <int M, typename T>
void rows_for(const float* x, const T* w, const float* scale, float* y, int N, int K, int n0, int n1) {
  constexpr int NA = (V::W == 16 || M <= 4) ? 2 : 1;
  rows<M, NA, T>(x, w, scale, y, N, K, n0, n1);
}

template <typename T>
void gemv(const float* x, const T* w, const float* scale, float* y, int M, int N, int K) {
  constexpr int kChunk = 64;  // output rows per task: long sequential weight streams, enough tasks to balance
  const int chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int c = 0; c < chunks; ++c) {
    const int n0 = c * kChunk, n1 = n0 + kChunk < N ? n0 + kChunk : N;
    switch (M) {
      case 1: rows_for<1, T>(x, w, scale, y, N, K, n0, n1); break;
      case 2: rows_for<2, T>(x, w, scale, y, N, K, n0, n1); break;
      case 3: rows_for<3, T>(x, w, scale, y, N, K, n0, n1); break;
      case 4: rows_for<4, T>(x, w, scale, y, N, K, n0, n1); break;
      case 5: rows_for<5, T>(x, w, scale, y, N, K, n0, n1); break;
      case 6: rows_for<6, T>(x, w, scale, y, N, K, n0, n1); break;
      case 7: rows_for<7, T>(x, w, scale, y, N, K, n0, n1); break;
      default: rows_for<8, T>(x, w, scale, y, N, K, n0, n1); break;
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
