// Small-batch GEMM for the CPU: y[M, N] = x[M, K] @ W[N, K]^T for a few to a few dozen rows (batched decode).
//
// At 8-96 rows a matmul is neither bandwidth-bound like a matrix-vector product nor compute-bound like a
// prefill: the weight stream and the multiply-adds must overlap. The way to get that on AVX2 is to read
// each weight from memory once and use it for every row while it is in a register. So the vectors run
// along the rows: a tile holds 6 output columns x 16 rows in twelve accumulators (two 8-row vectors per
// column), and each weight is broadcast once and multiplied into 16 rows. Row groups past 16 re-read the
// tile's weights from L1.
//
// W is packed once into 6-column panels cut along K into chunks of 128: [K / 128][N / 6][128][6], zero
// padded. A thread takes a fixed range of panels and walks it chunk by chunk, so its weight stream is
// sequential within a chunk while x's chunk ([128][16] transposed rows, 8 KB) stays in L1; partial sums
// wait in a small per-panel buffer between chunks. The next tile's weights are prefetched as a tile runs.
//
// AVX-512 builds (TF_WIDE_PANEL) take 32 rows per tile in sixteen-lane vectors: 6 columns x 32 rows is
// again twelve accumulators, so each weight broadcast feeds twice the multiply-adds of the AVX2 tile.
// Groups of up to 8 rows keep the eight-lane tile, which wastes no lanes on a single decode row.
#include "simd.h"  // first: it includes immintrin.h (see there)

#include <omp.h>

#include <cstdint>
#include <cstdlib>

namespace {

constexpr int kCols = 6;     // output columns per panel
constexpr int kChunk = 128;  // K per chunk
#if TF_WIDE_PANEL
constexpr int kGroup = 32;  // rows per tile
#else
constexpr int kGroup = 16;
#endif

// The 3 cache lines holding 8 steps of K (8 x 6 floats) of the tile that comes next.
__attribute__((always_inline)) inline void prefetch_lines(const float* at) {
  const char* p = reinterpret_cast<const char*>(at);
  _mm_prefetch(p, _MM_HINT_T0);
  _mm_prefetch(p + 64, _MM_HINT_T0);
  _mm_prefetch(p + 128, _MM_HINT_T0);
}

// One tile: kn steps of K for 6 columns and 8 * NV rows. acc: [6][kGroup] partial sums (loaded when accum).
// With one row vector the six accumulators alone would wait on the FMA latency, so even and odd k
// accumulate apart and are added at the end.
template <int NV>
inline void tile(const float* xt, const float* w, float* acc, int kn, bool accum, const float* pf) {
  __m256 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51;
  const __m256 z = _mm256_setzero_ps();
  a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = z;
#define TF_LOAD(j)                                                    \
  a##j##0 = _mm256_load_ps(acc + kGroup * j);                             \
  if constexpr (NV > 1) a##j##1 = _mm256_load_ps(acc + kGroup * j + 8);
  if (accum) { TF_LOAD(0) TF_LOAD(1) TF_LOAD(2) TF_LOAD(3) TF_LOAD(4) TF_LOAD(5) }
#undef TF_LOAD
  const int step = 8 * NV;
  int k = 0;
  if constexpr (NV == 1) {
    for (; k + 2 <= kn; k += 2, w += 2 * kCols, xt += 16) {
      if (pf != nullptr && (k & 7) == 0) prefetch_lines(pf + k * kCols);
      const __m256 x0 = _mm256_load_ps(xt), x1 = _mm256_load_ps(xt + 8);
#define TF_COL2(j)                                                                  \
  a##j##0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j), x0, a##j##0);               \
  a##j##1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + kCols + j), x1, a##j##1);
      TF_COL2(0) TF_COL2(1) TF_COL2(2) TF_COL2(3) TF_COL2(4) TF_COL2(5)
#undef TF_COL2
    }
  }
  for (; k < kn; ++k, w += kCols, xt += step) {
    if (pf != nullptr && (k & 7) == 0) prefetch_lines(pf + k * kCols);
    const __m256 x0 = _mm256_load_ps(xt);
    if constexpr (NV == 1) {
#define TF_COL1(j) a##j##0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j), x0, a##j##0);
      TF_COL1(0) TF_COL1(1) TF_COL1(2) TF_COL1(3) TF_COL1(4) TF_COL1(5)
#undef TF_COL1
    } else {
      const __m256 x1 = _mm256_load_ps(xt + 8);
#define TF_COL(j)                                      \
  {                                                    \
    const __m256 b = _mm256_broadcast_ss(w + j);       \
    a##j##0 = _mm256_fmadd_ps(b, x0, a##j##0);         \
    a##j##1 = _mm256_fmadd_ps(b, x1, a##j##1);         \
  }
      TF_COL(0) TF_COL(1) TF_COL(2) TF_COL(3) TF_COL(4) TF_COL(5)
#undef TF_COL
    }
  }
  if constexpr (NV == 1) {  // even + odd k, into the first 8 of each column's rows
    _mm256_store_ps(acc, _mm256_add_ps(a00, a01));
    _mm256_store_ps(acc + 1 * kGroup, _mm256_add_ps(a10, a11));
    _mm256_store_ps(acc + 2 * kGroup, _mm256_add_ps(a20, a21));
    _mm256_store_ps(acc + 3 * kGroup, _mm256_add_ps(a30, a31));
    _mm256_store_ps(acc + 4 * kGroup, _mm256_add_ps(a40, a41));
    _mm256_store_ps(acc + 5 * kGroup, _mm256_add_ps(a50, a51));
  } else {
#define TF_STORE(j)                          \
  _mm256_store_ps(acc + kGroup * j, a##j##0);    \
  _mm256_store_ps(acc + kGroup * j + 8, a##j##1);
    TF_STORE(0) TF_STORE(1) TF_STORE(2) TF_STORE(3) TF_STORE(4) TF_STORE(5)
#undef TF_STORE
  }
}

#if TF_WIDE_PANEL
// The sixteen-lane tile: NV = 1 (16 rows, even and odd k accumulated apart) or NV = 2 (32 rows).
template <int NV>
inline void tile16(const float* xt, const float* w, float* acc, int kn, bool accum, const float* pf) {
  __m512 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51;
  const __m512 z = _mm512_setzero_ps();
  a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = z;
#define TF_LOAD(j)                                                      \
  a##j##0 = _mm512_load_ps(acc + kGroup * j);                           \
  if constexpr (NV > 1) a##j##1 = _mm512_load_ps(acc + kGroup * j + 16);
  if (accum) { TF_LOAD(0) TF_LOAD(1) TF_LOAD(2) TF_LOAD(3) TF_LOAD(4) TF_LOAD(5) }
#undef TF_LOAD
  int k = 0;
  if constexpr (NV == 1) {
    for (; k + 2 <= kn; k += 2, w += 2 * kCols, xt += 32) {
      if (pf != nullptr && (k & 7) == 0) prefetch_lines(pf + k * kCols);
      const __m512 x0 = _mm512_load_ps(xt), x1 = _mm512_load_ps(xt + 16);
#define TF_COL2(j)                                                    \
  a##j##0 = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), x0, a##j##0);       \
  a##j##1 = _mm512_fmadd_ps(_mm512_set1_ps(w[kCols + j]), x1, a##j##1);
      TF_COL2(0) TF_COL2(1) TF_COL2(2) TF_COL2(3) TF_COL2(4) TF_COL2(5)
#undef TF_COL2
    }
  }
  for (; k < kn; ++k, w += kCols, xt += 16 * NV) {
    if (pf != nullptr && (k & 7) == 0) prefetch_lines(pf + k * kCols);
    const __m512 x0 = _mm512_load_ps(xt);
    if constexpr (NV == 1) {
#define TF_COL1(j) a##j##0 = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), x0, a##j##0);
      TF_COL1(0) TF_COL1(1) TF_COL1(2) TF_COL1(3) TF_COL1(4) TF_COL1(5)
#undef TF_COL1
    } else {
      const __m512 x1 = _mm512_load_ps(xt + 16);
#define TF_COL(j)                                  \
  {                                                \
    const __m512 b = _mm512_set1_ps(w[j]);         \
    a##j##0 = _mm512_fmadd_ps(b, x0, a##j##0);     \
    a##j##1 = _mm512_fmadd_ps(b, x1, a##j##1);     \
  }
      TF_COL(0) TF_COL(1) TF_COL(2) TF_COL(3) TF_COL(4) TF_COL(5)
#undef TF_COL
    }
  }
  if constexpr (NV == 1) {
#define TF_STORE1(j) _mm512_store_ps(acc + kGroup * j, _mm512_add_ps(a##j##0, a##j##1));
    TF_STORE1(0) TF_STORE1(1) TF_STORE1(2) TF_STORE1(3) TF_STORE1(4) TF_STORE1(5)
#undef TF_STORE1
  } else {
#define TF_STORE(j)                            \
  _mm512_store_ps(acc + kGroup * j, a##j##0);  \
  _mm512_store_ps(acc + kGroup * j + 16, a##j##1);
    TF_STORE(0) TF_STORE(1) TF_STORE(2) TF_STORE(3) TF_STORE(4) TF_STORE(5)
#undef TF_STORE
  }
}
#endif


inline int group_rows(int M, int g) { return M - kGroup * g < kGroup ? M - kGroup * g : kGroup; }
// Rows per k in xt: 8 or 16 (AVX2); 8, 16 or 32 (AVX-512).
inline int group_width(int rows) { return rows <= 8 ? 8 : (rows <= 16 ? 16 : 32); }

// One tile of the width the group's rows need.
inline void run_tile(int wd, const float* xt, const float* w, float* acc, int kn, bool accum, const float* pf) {
#if TF_WIDE_PANEL
  if (wd == 32) tile16<2>(xt, w, acc, kn, accum, pf);
  else if (wd == 16) tile16<1>(xt, w, acc, kn, accum, pf);
  else tile<1>(xt, w, acc, kn, accum, pf);
#else
  if (wd == 16) tile<2>(xt, w, acc, kn, accum, pf);
  else tile<1>(xt, w, acc, kn, accum, pf);
#endif
}

}  // namespace

extern "C" {

// wp: W packed as [ceil(K / 128)][ceil(N / 6)][kn][6] (kn = 128, or what is left of K in the last chunk).
// Returns -1 for shapes it does not take, -2 when out of memory.
int tf_panel_matmul(const float* x, const float* wp, float* y, int M, int N, int K) {
  if (M < 1 || N < 1 || K < 1) return -1;
  const int groups = (M + kGroup - 1) / kGroup;
  const int P = (N + kCols - 1) / kCols, C = (K + kChunk - 1) / kChunk;
  // x transposed per row group: [group][K][width], zero padded; partial sums: [group][P][6][kGroup]
  float* xt = tf::scratch<float, 2>(0, static_cast<size_t>(groups) * K * kGroup);
  float* part = tf::scratch<float, 2>(1, static_cast<size_t>(groups) * P * kCols * kGroup);
  if (xt == nullptr || part == nullptr) return -2;
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    for (int g = 0; g < groups; ++g) {  // each thread transposes its share of K
      const int rows = group_rows(M, g), wd = group_width(rows);
      float* dst = xt + static_cast<size_t>(g) * K * kGroup;
      const int k0 = static_cast<int>(static_cast<int64_t>(K) * t / nt);
      const int k1 = static_cast<int>(static_cast<int64_t>(K) * (t + 1) / nt);
      for (int k = k0; k < k1; ++k) {
        float* d = dst + static_cast<size_t>(k) * wd;
        for (int r = 0; r < rows; ++r) d[r] = x[static_cast<size_t>(kGroup * g + r) * K + k];
        for (int r = rows; r < wd; ++r) d[r] = 0.0f;
      }
    }
#pragma omp barrier
    const int p0 = static_cast<int>(static_cast<int64_t>(P) * t / nt);
    const int p1 = static_cast<int>(static_cast<int64_t>(P) * (t + 1) / nt);
    for (int c = 0; c < C; ++c) {
      const int k0 = c * kChunk, kn = K - k0 < kChunk ? K - k0 : kChunk;
      const float* chunk = wp + static_cast<int64_t>(k0) * P * kCols;
      const float* next_chunk = chunk + static_cast<int64_t>(kn) * P * kCols;  // its panels are kChunk or less
      const int next_kn = K - k0 - kn < kChunk ? K - k0 - kn : kChunk;
      for (int p = p0; p < p1; ++p) {
        const float* w = chunk + static_cast<int64_t>(p) * kn * kCols;
        const float* pf = p + 1 < p1 ? w + kn * kCols
                                     : (c + 1 < C ? next_chunk + static_cast<int64_t>(p0) * next_kn * kCols : nullptr);
        for (int g = 0; g < groups; ++g) {
          const int rows = group_rows(M, g), wd = group_width(rows);
          const float* xg = xt + static_cast<size_t>(g) * K * kGroup + static_cast<size_t>(k0) * wd;
          float* acc = part + (static_cast<size_t>(g) * P + p) * kCols * kGroup;
          const float* tile_pf = g == 0 ? pf : nullptr;
          run_tile(wd, xg, w, acc, kn, c > 0, tile_pf);
        }
      }
    }
    for (int g = 0; g < groups; ++g) {  // partial sums [6][kGroup] -> y's rows
      const int rows = group_rows(M, g);
      for (int p = p0; p < p1; ++p) {
        const float* acc = part + (static_cast<size_t>(g) * P + p) * kCols * kGroup;
        const int cols = N - p * kCols < kCols ? N - p * kCols : kCols;
        for (int r = 0; r < rows; ++r) {
          float* yr = y + static_cast<int64_t>(kGroup * g + r) * N + static_cast<int64_t>(p) * kCols;
          for (int j = 0; j < cols; ++j) yr[j] = acc[kGroup * j + r];
        }
      }
    }
  }
  return 0;
}
}
