// Every decoder layer of a Llama-family model for a batch of decode rows, in one call.
//
// A decode step of a small model spends as long in the interpreter between kernels (a dozen calls per
// layer, each with its checks and a fresh output tensor) as in the kernels themselves. This loop runs the
// same kernels in the same order with the same arithmetic, so its output is bitwise that of the layer-by-
// layer path (tests/models/test_fused_decode.py), and keeps its scratch buffers between calls.
//
// Per layer: xn = rmsnorm(x) * w_in; qkv = xn @ Wqkv^T (+ b); rotate q, k and store k, v at their slots;
// a = paged attention of q; x += a @ Wo^T and xn = rmsnorm(x) * w_post; g = silu(gate) * up of xn @ Wgu^T;
// x += g @ Wdown^T. A linear layer is GGUF block weights through tf_quant_matmul (int8 activations) or a
// dense weight through the kernel its layer-by-layer path takes at this many rows (panels of float32, the
// skinny kernel over float32 or bf16, the bf16 dot product); a fused projection may come in parts of
// different formats (Q4_K_M files keep v in Q6_K).
#include <cstdint>
#include <cstdlib>
#include <vector>

extern "C" {
int tf_quant_matmul(int qtype, int mode, const float* x, const uint8_t* w, float* y, int M, int N, int K);
int tf_panel_matmul(const float* x, const float* wp, float* y, int M, int N, int K);
int tf_skinny_matmul(int weight_is_bf16, const float* x, const void* w, float* y, int M, int N, int K);
int tf_bf16_matmul(const float* x, const uint16_t* w, float* y, int M, int N, int K);
void tf_rms_norm(const float* x, const float* w, float* out, int T, int H, float eps);
void tf_add_rms_norm(float* x, const float* d, const float* w, float* out, int T, int H, float eps);
void tf_silu_mul(const float* gu, float* out, int T, int M);
int tf_rotary_store_kv(float* qkv, int T, int stride, int nq, int nkv, int D, const float* cos, const float* sin,
                       const int64_t* positions, void* k_cache, void* v_cache, const int64_t* slots,
                       int cache_is_bf16);
int tf_paged_attention(int cache_is_bf16, int head_dim, const float* q, float* out, const void* k_cache,
                       const void* v_cache, const int32_t* block_tables, int max_blocks, const int32_t* seq_lens,
                       const int32_t* query_start, const uint64_t* row_masks, int num_reqs, int num_heads,
                       int num_kv_heads, int block_size, float scale, int window);
}

namespace {

// One linear layer: K inputs, N outputs side by side from up to 3 parts (a fused q/k/v or gate/up kept in
// different formats), each n rows of GGML `qtype` blocks, or a dense weight (a negative qtype below), with an
// optional float32 bias [n].
enum DenseKind { kPanelF32 = -1, kSkinnyF32 = -2, kSkinnyBf16 = -3, kBf16Dot = -4 };

struct TfPart {
  int32_t qtype, n;
  const uint8_t* data;
  const float* bias;
};
struct TfLinear {
  int32_t nparts, n, k, pad;
  TfPart parts[3];
};

// One decoder layer's weights and its KV cache ([blocks, block_size, kv_heads, head_dim] each).
struct TfLayer {
  const float* input_norm;
  const float* post_norm;
  TfLinear qkv, o, gate_up, down;
  void* k_cache;
  void* v_cache;
};

// What every layer shares: the model's shape, the rotary tables and the step's attention metadata.
struct TfStep {
  int32_t T, H, nq, nkv, D, M;  // rows, hidden, q heads, kv heads, head_dim, intermediate size
  float eps, scale;
  int32_t cache_is_bf16, block_size, window, num_reqs, max_blocks, pad;
  const float* cos;
  const float* sin;
  const int64_t* positions;
  const int64_t* slots;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* query_start;
  const uint64_t* row_masks;
};

int dense_or_quant(const TfPart& p, int k, const float* x, float* y, int T) {
  switch (p.qtype) {
    case kPanelF32: return tf_panel_matmul(x, reinterpret_cast<const float*>(p.data), y, T, p.n, k);
    case kSkinnyF32: return tf_skinny_matmul(0, x, p.data, y, T, p.n, k);
    case kSkinnyBf16: return tf_skinny_matmul(1, x, p.data, y, T, p.n, k);
    case kBf16Dot: return tf_bf16_matmul(x, reinterpret_cast<const uint16_t*>(p.data), y, T, p.n, k);
    default: return tf_quant_matmul(p.qtype, 0, x, p.data, y, T, p.n, k);
  }
}

int matmul_part(const TfPart& p, int k, const float* x, float* y, int T) {
  const int rc = dense_or_quant(p, k, x, y, T);
  if (rc != 0 || p.bias == nullptr) return rc;
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < p.n; ++j) y[static_cast<int64_t>(t) * p.n + j] += p.bias[j];
  return 0;
}

int linear(const TfLinear& l, const float* x, float* y, int T) {
  if (l.nparts == 1) return matmul_part(l.parts[0], l.k, x, y, T);
  static thread_local std::vector<float> part;
  int col = 0;
  for (int i = 0; i < l.nparts; ++i) {
    const TfPart& p = l.parts[i];
    part.resize(static_cast<size_t>(T) * p.n);
    const int rc = matmul_part(p, l.k, x, part.data(), T);
    if (rc != 0) return rc;
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < p.n; ++j)
        y[static_cast<int64_t>(t) * l.n + col + j] = part[static_cast<size_t>(t) * p.n + j];
    col += p.n;
  }
  return 0;
}

}  // namespace

extern "C" {

// x [T, H] is the residual stream, updated in place. Returns 0, or the first failing kernel's code
// (-1: a shape or format no kernel takes, -2: out of memory); the caller checks the shapes beforehand.
int tf_decode_layers(const TfLayer* layers, int num_layers, const TfStep* s, float* x) {
  const int T = s->T, qkv_w = (s->nq + 2 * s->nkv) * s->D, q_w = s->nq * s->D;
  static thread_local std::vector<float> xn, qkv, q, attn, delta, gu, act;
  xn.resize(static_cast<size_t>(T) * s->H);
  qkv.resize(static_cast<size_t>(T) * qkv_w);
  q.resize(static_cast<size_t>(T) * q_w);
  attn.resize(static_cast<size_t>(T) * q_w);
  delta.resize(static_cast<size_t>(T) * s->H);
  gu.resize(static_cast<size_t>(T) * 2 * s->M);
  act.resize(static_cast<size_t>(T) * s->M);
  for (int i = 0; i < num_layers; ++i) {
    const TfLayer& l = layers[i];
    tf_rms_norm(x, l.input_norm, xn.data(), T, s->H, s->eps);
    int rc = linear(l.qkv, xn.data(), qkv.data(), T);
    if (rc == 0)
      rc = tf_rotary_store_kv(qkv.data(), T, qkv_w, s->nq, s->nkv, s->D, s->cos, s->sin, s->positions,
                              l.k_cache, l.v_cache, s->slots, s->cache_is_bf16);
    if (rc != 0) return rc;
    for (int t = 0; t < T; ++t)  // the kernel reads q as [T, heads, head_dim], contiguous
      for (int j = 0; j < q_w; ++j) q[static_cast<size_t>(t) * q_w + j] = qkv[static_cast<size_t>(t) * qkv_w + j];
    rc = tf_paged_attention(s->cache_is_bf16, s->D, q.data(), attn.data(), l.k_cache, l.v_cache, s->block_tables,
                            s->max_blocks, s->seq_lens, s->query_start, s->row_masks, s->num_reqs, s->nq, s->nkv,
                            s->block_size, s->scale, s->window);
    if (rc == 0) rc = linear(l.o, attn.data(), delta.data(), T);
    if (rc != 0) return rc;
    tf_add_rms_norm(x, delta.data(), l.post_norm, xn.data(), T, s->H, s->eps);
    rc = linear(l.gate_up, xn.data(), gu.data(), T);
    if (rc != 0) return rc;
    tf_silu_mul(gu.data(), act.data(), T, s->M);
    rc = linear(l.down, act.data(), delta.data(), T);
    if (rc != 0) return rc;
    const int64_t n = static_cast<int64_t>(T) * s->H;
    for (int64_t j = 0; j < n; ++j) x[j] += delta[j];
  }
  return 0;
}
}
