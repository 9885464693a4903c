// Paged attention for the CPU: queries attend to keys/values read straight from the block pool.
//
// Layout: q, out [num_tokens, num_heads, D] float32; k_cache, v_cache [num_blocks, block_size, num_kv_heads, D]
// (float32 or bfloat16). Request b owns query tokens [query_start[b], query_start[b+1]) and has seq_lens[b]
// keys in its blocks (block_tables[b, :]), the new tokens' keys already written. Query token j of a request
// with q_len queries sits at position seq_len - q_len + j and sees keys [max(0, pos - window + 1), pos].
// One work item is (request, kv head); it scores every query row of that head group in one pass over the
// keys, so each key and value vector is read from memory once per step.
//
// Draft trees: with row_masks (one uint64 per query token, may be null), query token j sees the request's
// new token i only where bit i of its mask is set (its ancestors and itself); everything before the new
// tokens stays visible. Up to 64 new tokens per request.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float load(const float* p, int d) { return p[d]; }
inline float load(const uint16_t* p, int d) {
  uint32_t u = static_cast<uint32_t>(p[d]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int D, typename T>
void attend_group(const float* q, float* out, const T* k_cache, const T* v_cache, const int32_t* block_table,
                  const uint64_t* row_masks, int seq_len, int q_len, int q_start, int kv_head, int num_heads,
                  int num_kv_heads, int block_size, float scale, int window, std::vector<float>& scores) {
  const int group = num_heads / num_kv_heads;
  const int rows = q_len * group;
  const int first_pos = seq_len - q_len;
  scores.assign(static_cast<size_t>(rows) * seq_len, -INFINITY);
  std::vector<float> acc(static_cast<size_t>(rows) * D, 0.0f);
  std::vector<int> lo(q_len), hi(q_len);
  // may row j see key position p (within [lo[j], hi[j]])? a tree mask decides among the new tokens
  auto masked = [&](int j, int p) {
    return row_masks != nullptr && p >= first_pos && !((row_masks[q_start + j] >> (p - first_pos)) & 1ULL);
  };
  int min_lo = seq_len;
  for (int j = 0; j < q_len; ++j) {
    hi[j] = first_pos + j;
    lo[j] = window > 0 ? (hi[j] - window + 1 > 0 ? hi[j] - window + 1 : 0) : 0;
    if (lo[j] < min_lo) min_lo = lo[j];
  }
  const size_t block_stride = static_cast<size_t>(num_kv_heads) * block_size * D;
  const size_t token_stride = static_cast<size_t>(num_kv_heads) * D;
  const size_t head_off = static_cast<size_t>(kv_head) * D;
  // Pass 1: scores for every (row, key) the row may see.
  for (int p = min_lo; p < seq_len; ++p) {
    const T* k = k_cache + block_table[p / block_size] * block_stride + (p % block_size) * token_stride + head_off;
    float kv[D];
    for (int d = 0; d < D; ++d) kv[d] = load(k, d);
    for (int j = 0; j < q_len; ++j) {
      if (p > hi[j] || p < lo[j] || masked(j, p)) continue;
      for (int g = 0; g < group; ++g) {
        const float* qr = q + (static_cast<size_t>(q_start + j) * num_heads + kv_head * group + g) * D;
        float s = 0.0f;
        for (int d = 0; d < D; ++d) s += qr[d] * kv[d];
        scores[static_cast<size_t>(j * group + g) * seq_len + p] = s * scale;
      }
    }
  }
  // Softmax per row over its visible keys.
  for (int r = 0; r < rows; ++r) {
    const int j = r / group;
    float* s = scores.data() + static_cast<size_t>(r) * seq_len;
    // masked keys are skipped rather than left at -inf: -ffast-math assumes no infinities
    float m = s[hi[j]];  // a row always sees itself
    for (int p = lo[j]; p <= hi[j]; ++p)
      if (!masked(j, p)) m = s[p] > m ? s[p] : m;
    float sum = 0.0f;
    for (int p = lo[j]; p <= hi[j]; ++p) {
      if (masked(j, p)) continue;
      s[p] = std::exp(s[p] - m);
      sum += s[p];
    }
    const float inv = 1.0f / sum;
    for (int p = lo[j]; p <= hi[j]; ++p) s[p] *= inv;
  }
  // Pass 2: weighted sum of values.
  for (int p = min_lo; p < seq_len; ++p) {
    const T* v = v_cache + block_table[p / block_size] * block_stride + (p % block_size) * token_stride + head_off;
    float vv[D];
    for (int d = 0; d < D; ++d) vv[d] = load(v, d);
    for (int j = 0; j < q_len; ++j) {
      if (p > hi[j] || p < lo[j] || masked(j, p)) continue;
      for (int g = 0; g < group; ++g) {
        const int r = j * group + g;
        const float w = scores[static_cast<size_t>(r) * seq_len + p];
        float* a = acc.data() + static_cast<size_t>(r) * D;
        for (int d = 0; d < D; ++d) a[d] += w * vv[d];
      }
    }
  }
  for (int j = 0; j < q_len; ++j)
    for (int g = 0; g < group; ++g) {
      float* o = out + (static_cast<size_t>(q_start + j) * num_heads + kv_head * group + g) * D;
      std::memcpy(o, acc.data() + static_cast<size_t>(j * group + g) * D, D * sizeof(float));
    }
}

template <int D, typename T>
void run(const float* q, float* out, const T* k_cache, const T* v_cache, const int32_t* block_tables,
         int max_blocks, const int32_t* seq_lens, const int32_t* query_start, const uint64_t* row_masks,
         int num_reqs, int num_heads, int num_kv_heads, int block_size, float scale, int window) {
  const int items = num_reqs * num_kv_heads;
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < items; ++it) {
      const int b = it / num_kv_heads, h = it % num_kv_heads;
      const int q_len = query_start[b + 1] - query_start[b];
      if (q_len == 0) continue;
      attend_group<D, T>(q, out, k_cache, v_cache, block_tables + static_cast<size_t>(b) * max_blocks,
                         row_masks, seq_lens[b], q_len, query_start[b], h, num_heads, num_kv_heads, block_size,
                         scale, window, scores);
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
