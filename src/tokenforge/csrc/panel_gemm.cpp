// Small-batch GEMM for the CPU: y[M, N] = x[M, K] @ W[N, K]^T for a few to a few dozen rows (batched decode).
//
// At 9-32 rows a matmul is neither bandwidth-bound like a matrix-vector product nor compute-bound like a
// prefill: both the weight stream and the multiply-adds matter, and a GEMM tuned for large batches leaves
// each waiting on the other. Here W is packed once into panels of 16 output columns, [N / 16][K][16], so a
// panel is one sequential stream; the rows go through it six at a time with twelve AVX2 accumulators in
// registers, and while a panel is in use the next one is prefetched, spread over the passes, so memory and
// arithmetic overlap. x is transposed first ([K][rows]), so each k's broadcasts come from one cache line.
// OpenMP threads take whole panels.
#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int kPanel = 16;  // output columns per panel: two AVX2 vectors

// Rows [m0, m0 + R) against one panel over all of K. pf: the next panel (or null); this pass prefetches its
// lines k with k % passes == pass_index, so the passes over a panel share the next one's lines between them.
// The accumulators are named variables, not an array: GCC keeps these in registers (an array it spilled).
#define TF_ROW_FMA(i)                                        \
  if constexpr (R > i) {                                     \
    const __m256 xb = _mm256_broadcast_ss(xk + i);           \
    c##i##0 = _mm256_fmadd_ps(xb, w0, c##i##0);              \
    c##i##1 = _mm256_fmadd_ps(xb, w1, c##i##1);              \
  }
#define TF_ROW_STORE(i)                                      \
  if constexpr (R > i) {                                     \
    float* yr = y + static_cast<int64_t>(m0 + i) * N + n0;   \
    _mm256_storeu_ps(yr, c##i##0);                           \
    _mm256_storeu_ps(yr + 8, c##i##1);                       \
  }

template <int R>
inline void pass(const float* xt, int rows_pad, const float* wp, float* y, int N, int m0, int n0, int K,
                 const float* pf, int passes, int pass_index) {
  const __m256 z = _mm256_setzero_ps();
  __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
  const float* xk = xt + m0;
  const float* wk = wp;
  int countdown = pass_index + 1;
  for (int k = 0; k < K; ++k, xk += rows_pad, wk += kPanel) {
    if (pf != nullptr && --countdown == 0) {
      countdown = passes;
      _mm_prefetch(reinterpret_cast<const char*>(pf + static_cast<int64_t>(k) * kPanel), _MM_HINT_T0);
    }
    const __m256 w0 = _mm256_load_ps(wk), w1 = _mm256_load_ps(wk + 8);
    TF_ROW_FMA(0) TF_ROW_FMA(1) TF_ROW_FMA(2) TF_ROW_FMA(3) TF_ROW_FMA(4) TF_ROW_FMA(5)
  }
  TF_ROW_STORE(0) TF_ROW_STORE(1) TF_ROW_STORE(2) TF_ROW_STORE(3) TF_ROW_STORE(4) TF_ROW_STORE(5)
}

#undef TF_ROW_FMA
#undef TF_ROW_STORE

void pass_any(int R, const float* xt, int rows_pad, const float* wp, float* y, int N, int m0, int n0, int K,
              const float* pf, int passes, int pass_index) {
  switch (R) {
    case 1: pass<1>(xt, rows_pad, wp, y, N, m0, n0, K, pf, passes, pass_index); break;
    case 2: pass<2>(xt, rows_pad, wp, y, N, m0, n0, K, pf, passes, pass_index); break;
    case 3: pass<3>(xt, rows_pad, wp, y, N, m0, n0, K, pf, passes, pass_index); break;
    case 4: pass<4>(xt, rows_pad, wp, y, N, m0, n0, K, pf, passes, pass_index); break;
    case 5: pass<5>(xt, rows_pad, wp, y, N, m0, n0, K, pf, passes, pass_index); break;
    default: pass<6>(xt, rows_pad, wp, y, N, m0, n0, K, pf, passes, pass_index); break;
  }
}

}  // namespace

extern "C" {

// wp: W packed as [N / 16][K][16] (32-byte aligned; N a multiple of 16). Returns -1 for shapes it does not take.
int tf_panel_matmul(const float* x, const float* wp, float* y, int M, int N, int K) {
  if (M < 1 || N % kPanel || K < 1 || reinterpret_cast<uintptr_t>(wp) % 32) return -1;
  const int rows_pad = (M + 7) & ~7;
  thread_local std::vector<float> xt;  // reused across calls: no allocation on the decode path
  xt.resize(static_cast<size_t>(K) * rows_pad);  // padding rows are never read
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) xt[static_cast<size_t>(k) * rows_pad + m] = x[static_cast<size_t>(m) * K + k];
  const int panels = N / kPanel, passes = (M + 5) / 6;
  const float* xtp = xt.data();
#pragma omp parallel for schedule(static)
  for (int p = 0; p < panels; ++p) {
    const float* w = wp + static_cast<int64_t>(p) * K * kPanel;
    const float* next = p + 1 < panels ? w + static_cast<int64_t>(K) * kPanel : nullptr;
    int m0 = 0;
    for (int i = 0; i < passes; ++i) {
      const int R = (M - m0 + (passes - i) - 1) / (passes - i);  // the rows left, split evenly
      pass_any(R, xtp, rows_pad, w, y, N, m0, p * kPanel, K, next, passes, i);
      m0 += R;
    }
  }
  return 0;
}
}
