// Paged attention for the CPU: queries attend to keys/values read straight from the block pool.
//
// Layout: q, out [num_tokens, num_heads, D] float32; k_cache, v_cache [num_blocks, block_size, num_kv_heads, D]
// (float32 or bfloat16). Request b owns query tokens [query_start[b], query_start[b+1]) and has seq_lens[b]
// keys in its blocks (block_tables[b, :]), the new tokens' keys already written. Query token j of a request
// with q_len queries sits at position seq_len - q_len + j and sees keys [max(0, pos - window + 1), pos].
// One work item is (request, kv head): it scores all query rows of that head group in one pass over the
// keys (each key read once, walking the block table a block at a time), runs the softmax eight rows per
// AVX2 vector, and sums the values with the accumulators in registers, the rows of one query token together
// so each value vector is read once for all the heads sharing it. Along D (a key's dot products, the value sums) vectors are sixteen lanes
// in AVX-512 builds where D is a multiple of 16 (TF_WIDE_ATTN), eight otherwise.
//
// Draft trees: with row_masks (one uint64 per query token, may be null), query token j sees the request's
// new token i only where bit i of its mask is set (its ancestors and itself); everything before the new
// tokens stays visible. Up to 64 new tokens per request.
#include "simd.h"  // first: it includes immintrin.h (see there)

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using tf::exp8;

// The vector along D for head size D.
#if TF_WIDE_ATTN
template <int D>
using VD = typename std::conditional<D % 16 == 0, tf::V16, tf::V8>::type;
#else
template <int D>
using VD = tf::V8;
#endif

// Scores of keys a row may not see. Finite on purpose: -ffast-math assumes no infinities, and
// exp(kMasked - max) is exactly 0, so masked keys drop out of the softmax and the weighted sum.
constexpr float kMasked = -1e30f;

template <int D>
inline float dot(const float* a, const float* b) {
  using V = VD<D>;
  constexpr int W = V::W;
  typename V::F acc0 = V::zero(), acc1 = V::zero();
  int d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    acc0 = V::fmadd(V::load(a + d), V::load(b + d), acc0);
    acc1 = V::fmadd(V::load(a + d + W), V::load(b + d + W), acc1);
  }
  if (d < D) acc0 = V::fmadd(V::load(a + d), V::load(b + d), acc0);
  return V::hsum(V::add(acc0, acc1));
}

// Eight dot products of consecutive rows of a [*, D] matrix with one vector, returned as one vector: the
// horizontal sums are shared (three rounds of hadd) instead of eight separate reductions.
template <int D>
inline __m256 dot8(const float* rows, const float* b) {
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int d = 0; d < D; d += 8) {
    const __m256 bv = _mm256_loadu_ps(b + d);
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(rows + i * D + d), bv, acc[i]);
  }
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// A key as float32: float32 caches are read in place, bf16 ones widened into buf.
template <int D, typename T>
inline const float* key_as_float(const T* src, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    return src;
  } else {
    using V = VD<D>;
    for (int d = 0; d < D; d += V::W) V::store(buf + d, V::load(src + d));
    return buf;
  }
}

// Calls fn(p, row) for key positions [from, to), row pointing at position p's vector for head_off: one block
// table lookup per block, not a division per key.
template <typename T, typename Fn>
inline void over_keys(const T* cache, const int32_t* block_table, int from, int to, int block_size,
                      size_t block_stride, size_t token_stride, size_t head_off, Fn&& fn) {
  for (int p = from; p < to;) {
    const int b = p / block_size, t0 = p - b * block_size;
    const int n = block_size - t0 < to - p ? block_size - t0 : to - p;
    const T* row = cache + block_table[b] * block_stride + t0 * token_stride + head_off;
    for (int t = 0; t < n; ++t, row += token_stride) fn(p + t, row);
    p += n;
  }
}

// Vector registers pass 2 may give to accumulators: rows sharing a query token are summed together so
// that each value vector is loaded once for all of them.
constexpr int kAccRegs = TF_WIDE_ATTN ? 24 : 12;

struct Scratch {  // per-thread buffers, reused across work items
  std::vector<float> q, scores, inv;
  std::vector<int> lo;
};

// One (request, kv head): all of its query rows (q_len tokens x the heads sharing this kv head) at once.
// Scores are kept key-major, [key][row] with rows padded to a multiple of 8, so that the softmax runs
// eight rows per vector and each key vector is read once for all rows.
template <int D, typename T>
void attend_group(const float* q, float* out, const T* k_cache, const T* v_cache, const int32_t* block_table,
                  const uint64_t* row_masks, int seq_len, int q_len, int q_start, int kv_head, int num_heads,
                  int num_kv_heads, int block_size, float scale, int window, Scratch& sc) {
  const int group = num_heads / num_kv_heads;
  const int rows = q_len * group;
  const int R = (rows + 7) & ~7;
  const int first_pos = seq_len - q_len;
  std::vector<int>& lo = sc.lo;
  lo.resize(q_len);
  int min_lo = seq_len;
  for (int j = 0; j < q_len; ++j) {
    const int hi = first_pos + j;
    lo[j] = window > 0 ? (hi - window + 1 > 0 ? hi - window + 1 : 0) : 0;
    if (lo[j] < min_lo) min_lo = lo[j];
  }
  const int span = seq_len - min_lo;  // key positions [min_lo, seq_len)
  // the rows' queries, scaled, contiguous (padding rows never reach a dot product: they score kMasked)
  sc.q.resize(static_cast<size_t>(rows) * D);
  for (int r = 0; r < rows; ++r) {
    const float* src = q + (static_cast<size_t>(q_start + r / group) * num_heads + kv_head * group + r % group) * D;
    for (int d = 0; d < D; ++d) sc.q[static_cast<size_t>(r) * D + d] = src[d] * scale;
  }
  sc.scores.resize(static_cast<size_t>(span) * R);
  const size_t block_stride = static_cast<size_t>(num_kv_heads) * block_size * D;
  const size_t token_stride = static_cast<size_t>(num_kv_heads) * D;
  const size_t head_off = static_cast<size_t>(kv_head) * D;
  // Pass 1: every row against every key, then the keys a row may not see are masked: later new tokens
  // (causality), a draft tree's non-ancestors, keys before a sliding window.
  alignas(64) float kv[D];
  const int full = rows & ~7;
  over_keys(k_cache, block_table, min_lo, seq_len, block_size, block_stride, token_stride, head_off,
            [&](int p, const T* key) {
              const float* k = key_as_float<D>(key, kv);
              float* s = sc.scores.data() + static_cast<size_t>(p - min_lo) * R;
              for (int r = 0; r < full; r += 8)
                _mm256_storeu_ps(s + r, dot8<D>(sc.q.data() + static_cast<size_t>(r) * D, k));
              for (int r = full; r < R; ++r)
                s[r] = r < rows ? dot<D>(sc.q.data() + static_cast<size_t>(r) * D, k) : kMasked;
            });
  for (int p = first_pos; p < seq_len; ++p) {
    float* s = sc.scores.data() + static_cast<size_t>(p - min_lo) * R;
    const int i = p - first_pos;  // the new token at key p
    for (int j = 0; j < q_len; ++j)
      if (j < i || (row_masks != nullptr && !((row_masks[q_start + j] >> i) & 1ULL)))
        for (int g = 0; g < group; ++g) s[j * group + g] = kMasked;
  }
  for (int j = 0; j < q_len; ++j)
    for (int p = min_lo; p < lo[j]; ++p)
      for (int g = 0; g < group; ++g) sc.scores[static_cast<size_t>(p - min_lo) * R + j * group + g] = kMasked;
  // Softmax, eight rows per vector; the 1/sum is applied to the output.
  sc.inv.resize(R);
  for (int r = 0; r < R; r += 8) {
    __m256 m = _mm256_set1_ps(kMasked);
    for (int p = 0; p < span; ++p) m = _mm256_max_ps(m, _mm256_loadu_ps(sc.scores.data() + static_cast<size_t>(p) * R + r));
    __m256 sum = _mm256_setzero_ps();
    for (int p = 0; p < span; ++p) {
      float* s = sc.scores.data() + static_cast<size_t>(p) * R + r;
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s), m));
      _mm256_storeu_ps(s, e);
      sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(sc.inv.data() + r, _mm256_div_ps(_mm256_set1_ps(1.0f), sum));
  }
  // Pass 2: the weighted sums of values, the accumulators in registers; the rows of one query token (its
  // heads sharing this kv head) up to RB at a time, so each value vector is loaded once for all of them.
  using V = VD<D>;
  constexpr int W = V::W, NA = D / W, RB = kAccRegs / NA > 0 ? kAccRegs / NA : 1;
  for (int j = 0; j < q_len; ++j) {
    for (int g0 = 0; g0 < group; g0 += RB) {
      const int nr = group - g0 < RB ? group - g0 : RB, r0 = j * group + g0;
      typename V::F acc[RB][NA];
      for (int rr = 0; rr < RB; ++rr)
        for (int i = 0; i < NA; ++i) acc[rr][i] = V::zero();
      over_keys(v_cache, block_table, lo[j], first_pos + j + 1, block_size, block_stride, token_stride, head_off,
                [&](int p, const T* v) {
                  const float* w = sc.scores.data() + static_cast<size_t>(p - min_lo) * R + r0;
                  typename V::F vv[NA];
                  for (int i = 0; i < NA; ++i) vv[i] = V::load(v + W * i);
                  for (int rr = 0; rr < RB; ++rr) {
                    if (rr >= nr || w[rr] == 0.0f) continue;  // masked, or too small to matter
                    const typename V::F wv = V::set1(w[rr]);
                    for (int i = 0; i < NA; ++i) acc[rr][i] = V::fmadd(wv, vv[i], acc[rr][i]);
                  }
                });
      for (int rr = 0; rr < nr; ++rr) {
        const typename V::F inv = V::set1(sc.inv[r0 + rr]);
        float* o = out + (static_cast<size_t>(q_start + j) * num_heads + kv_head * group + g0 + rr) * D;
        for (int i = 0; i < NA; ++i) V::store(o + W * i, V::mul(acc[rr][i], inv));
      }
    }
  }
}

template <int D, typename T>
void run(const float* q, float* out, const T* k_cache, const T* v_cache, const int32_t* block_tables,
         int max_blocks, const int32_t* seq_lens, const int32_t* query_start, const uint64_t* row_masks,
         int num_reqs, int num_heads, int num_kv_heads, int block_size, float scale, int window) {
  const int items = num_reqs * num_kv_heads;
#pragma omp parallel
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < items; ++it) {
      const int b = it / num_kv_heads, h = it % num_kv_heads;
      const int q_len = query_start[b + 1] - query_start[b];
      if (q_len == 0) continue;
      attend_group<D, T>(q, out, k_cache, v_cache, block_tables + static_cast<size_t>(b) * max_blocks,
                         row_masks, seq_lens[b], q_len, query_start[b], h, num_heads, num_kv_heads, block_size,
                         scale, window, scratch);
    }
  }
}

template <typename T>
int dispatch(int head_dim, const float* q, float* out, const T* k, const T* v, const int32_t* bt, int mb,
             const int32_t* sl, const int32_t* qs, const uint64_t* rm, int n, int h, int kvh, int bs, float scale,
             int window) {
  switch (head_dim) {
    case 32: run<32, T>(q, out, k, v, bt, mb, sl, qs, rm, n, h, kvh, bs, scale, window); return 0;
    case 64: run<64, T>(q, out, k, v, bt, mb, sl, qs, rm, n, h, kvh, bs, scale, window); return 0;
    case 80: run<80, T>(q, out, k, v, bt, mb, sl, qs, rm, n, h, kvh, bs, scale, window); return 0;
    case 96: run<96, T>(q, out, k, v, bt, mb, sl, qs, rm, n, h, kvh, bs, scale, window); return 0;
    case 128: run<128, T>(q, out, k, v, bt, mb, sl, qs, rm, n, h, kvh, bs, scale, window); return 0;
    case 16: run<16, T>(q, out, k, v, bt, mb, sl, qs, rm, n, h, kvh, bs, scale, window); return 0;
    case 8: run<8, T>(q, out, k, v, bt, mb, sl, qs, rm, n, h, kvh, bs, scale, window); return 0;
    default: return -1;
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, -1 when head_dim has no compiled variant (the caller falls back to torch).
int tf_paged_attention(int cache_is_bf16, int head_dim, const float* q, float* out, const void* k_cache,
                       const void* v_cache, const int32_t* block_tables, int max_blocks, const int32_t* seq_lens,
                       const int32_t* query_start, const uint64_t* row_masks, int num_reqs, int num_heads,
                       int num_kv_heads, int block_size, float scale, int window) {
  if (cache_is_bf16)
    return dispatch<uint16_t>(head_dim, q, out, static_cast<const uint16_t*>(k_cache),
                              static_cast<const uint16_t*>(v_cache), block_tables, max_blocks, seq_lens,
                              query_start, row_masks, num_reqs, num_heads, num_kv_heads, block_size, scale, window);
  return dispatch<float>(head_dim, q, out, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache),
                         block_tables, max_blocks, seq_lens, query_start, row_masks, num_reqs, num_heads,
                         num_kv_heads, block_size, scale, window);
}

int tf_supported_head_dim(int head_dim) {
  return head_dim == 8 || head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 80 ||
         head_dim == 96 || head_dim == 128;
}
}
