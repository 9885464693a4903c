// The elementwise work around a decoder layer's matmuls, fused for the CPU: RMSNorm (optionally after the
// residual add), rotary embedding applied in place plus the KV-cache store, and SiLU-and-multiply.
//
// In torch each of these is four to eight small ops, and on a small batch every op costs more in dispatch
// than in arithmetic; one pass per job here reads and writes each value once. All tensors are float32 and
// row-major; the KV cache is float32 or bf16, laid out [num_blocks * block_size, num_kv_heads, D] (slots).
// Rows are split across the OpenMP threads only when a call is large enough to repay the fork. Vectors are
// eight lanes (AVX2) or sixteen (AVX-512, TF_WIDE_FUSED).
#include "simd.h"  // first: it includes immintrin.h (see there)

#include <cmath>
#include <cstring>
#include <cstdint>

namespace {

#if TF_WIDE_FUSED
using V = tf::V16;
#else
using V = tf::V8;
#endif
constexpr int W = V::W;

constexpr int64_t kParallelMin = 1 << 16;  // elements per call before the threads are used

// out = x * rsqrt(mean(x^2) + eps) * w for one row of H values.
inline void norm_row(const float* x, const float* w, float* out, int H, float eps) {
  V::F acc = V::zero();
  int h = 0;
  for (; h + W <= H; h += W) {
    const V::F v = V::load(x + h);
    acc = V::fmadd(v, v, acc);
  }
  float ss = V::hsum(acc);
  for (; h < H; ++h) ss += x[h] * x[h];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
  const V::F rv = V::set1(r);
  for (h = 0; h + W <= H; h += W) V::store(out + h, V::mul(V::mul(V::load(x + h), rv), V::load(w + h)));
  for (; h < H; ++h) out[h] = x[h] * r * w[h];
}

inline void add_row(float* x, const float* d, int H) {
  int h = 0;
  for (; h + W <= H; h += W) V::store(x + h, V::add(V::load(x + h), V::load(d + h)));
  for (; h < H; ++h) x[h] += d[h];
}

// Rotate-half rotary on one head of D values: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
inline void rotate(float* x, const float* cos, const float* sin, int half) {
  int i = 0;
  for (; i + W <= half; i += W) {
    const V::F a = V::load(x + i), b = V::load(x + half + i);
    const V::F c = V::load(cos + i), s = V::load(sin + i);
    V::store(x + i, V::sub(V::mul(a, c), V::mul(b, s)));
    V::store(x + half + i, V::add(V::mul(b, c), V::mul(a, s)));
  }
  for (; i < half; ++i) {
    const float a = x[i], b = x[half + i];
    x[i] = a * cos[i] - b * sin[i];
    x[half + i] = b * cos[i] + a * sin[i];
  }
}

inline void store(float* dst, const float* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = src[i];
}
inline void store(uint16_t* dst, const float* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = tf::to_bf16(src[i]);
}

template <typename T>
void rotary_store(float* qkv, int T_, int stride, int nq, int nkv, int D, const float* cos, const float* sin,
                  const int64_t* positions, T* k_cache, T* v_cache, const int64_t* slots) {
  const int half = D / 2, kv_row = nkv * D;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(T_) * stride >= kParallelMin)
  for (int t = 0; t < T_; ++t) {
    float* row = qkv + static_cast<int64_t>(t) * stride;
    const float* c = cos + positions[t] * half;
    const float* s = sin + positions[t] * half;
    for (int h = 0; h < nq + nkv; ++h) rotate(row + h * D, c, s, half);
    store(k_cache + slots[t] * kv_row, row + nq * D, kv_row);
    store(v_cache + slots[t] * kv_row, row + (nq + nkv) * D, kv_row);
  }
}

}  // namespace

extern "C" {

// out[t] = rmsnorm(x[t]) * w; out may be x.
void tf_rms_norm(const float* x, const float* w, float* out, int T, int H, float eps) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(T) * H >= kParallelMin)
  for (int t = 0; t < T; ++t)
    norm_row(x + static_cast<int64_t>(t) * H, w, out + static_cast<int64_t>(t) * H, H, eps);
}

// The residual step: x[t] += d[t], then out[t] = rmsnorm(x[t]) * w.
void tf_add_rms_norm(float* x, const float* d, const float* w, float* out, int T, int H, float eps) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(T) * H >= kParallelMin)
  for (int t = 0; t < T; ++t) {
    float* xr = x + static_cast<int64_t>(t) * H;
    add_row(xr, d + static_cast<int64_t>(t) * H, H);
    norm_row(xr, w, out + static_cast<int64_t>(t) * H, H, eps);
  }
}

// out[t, :M] = silu(gu[t, :M]) * gu[t, M:]
void tf_silu_mul(const float* gu, float* out, int T, int M) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(T) * M >= kParallelMin)
  for (int t = 0; t < T; ++t) {
    const float* g = gu + static_cast<int64_t>(t) * 2 * M;
    const float* u = g + M;
    float* o = out + static_cast<int64_t>(t) * M;
    int i = 0;
    const V::F one = V::set1(1.0f);
    for (; i + W <= M; i += W) {
      const V::F gv = V::load(g + i);
      const V::F sig = V::div(one, V::add(one, V::exp(V::sub(V::zero(), gv))));
      V::store(o + i, V::mul(V::mul(gv, sig), V::load(u + i)));
    }
    // the tail clamps like exp8 (-ffast-math assumes finite values: an overflowing exp would give NaN)
    for (; i < M; ++i) o[i] = g[i] / (1.0f + std::exp(std::fmin(std::fmax(-g[i], -87.0f), 88.0f))) * u[i];
  }
}

// A grammar's token bitmask applied to one row of logits: logits[t] = -inf for every token t < vocab whose
// bit (t % 32 of word t / 32) is clear. Words with every bit set (the common case) cost one compare.
void tf_apply_bitmask(float* logits, const int32_t* words, int vocab) {
  const uint32_t neg_inf_bits = 0xFF800000u;  // -inf by its bits: -ffast-math assumes no infinities
  float neg_inf;
  std::memcpy(&neg_inf, &neg_inf_bits, 4);
  for (int w = 0; 32 * w < vocab; ++w) {
    const uint32_t bits = static_cast<uint32_t>(words[w]);
    if (bits == 0xFFFFFFFFu) continue;
    const int n = vocab - 32 * w < 32 ? vocab - 32 * w : 32;
    for (int b = 0; b < n; ++b)
      if (!((bits >> b) & 1u)) logits[32 * w + b] = neg_inf;
  }
}

// qkv [T, stride] holds q (nq heads), k and v (nkv heads each) of D values per row, in that order. Rotates q
// and k in place with the cos/sin tables ([positions, D / 2]) at each row's position, then stores k and v
// at each row's cache slot. Returns -1 for an odd D.
int tf_rotary_store_kv(float* qkv, int T, int stride, int nq, int nkv, int D, const float* cos, const float* sin,
                       const int64_t* positions, void* k_cache, void* v_cache, const int64_t* slots,
                       int cache_is_bf16) {
  if (D % 2) return -1;
  if (cache_is_bf16)
    rotary_store(qkv, T, stride, nq, nkv, D, cos, sin, positions, static_cast<uint16_t*>(k_cache),
                 static_cast<uint16_t*>(v_cache), slots);
  else
    rotary_store(qkv, T, stride, nq, nkv, D, cos, sin, positions, static_cast<float*>(k_cache),
                 static_cast<float*>(v_cache), slots);
  return 0;
}
}
