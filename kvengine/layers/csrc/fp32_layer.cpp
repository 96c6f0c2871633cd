// Llama-family decoder layer for M new tokens as one op, on fp32 activations: the avx2 and portable tiers'
// counterpart of decode_layer.cpp (same operands and semantics, read its header), for CPUs without bf16
// arithmetic. The matrix products are fp32_mm.h's (int8 activations in groups of 32, as the layer-by-layer path
// runs them); the rest are plain loops over fp32 that each tier's flags vectorize. Every row is computed on its
// own: a sequence's result does not depend on what it is batched with.
//
//   KV_OPS::decode_layer(x [M, H] fp32, weights, cos [M, D], sin [M, D], k_cache, v_cache, slots [M, L] int64,
//                        lens [M] int64, num_heads, num_kv_heads, eps, scale) -> [M, H] fp32
//     weights: input norm [H], qkv (w, s), o (w, s), post-attention norm [H], gate_up (w, s), down (w, s), each
//     linear layer's (w, s) q4_gemm's or q8_gemm's operands; norms, cos, sin and the caches fp32.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fp32_mm.h"

namespace KV_OPS {
namespace {

constexpr int64_t kMaxHeadDim = 256;

at::Tensor linear(const at::Tensor& x, at::TensorList w, int i) {
  return w[i].dim() == 4 ? q4_gemm(x, w[i], w[i + 1]) : q8_gemm(x, w[i], w[i + 1]);
}

// x / rms(x) * w over each row (F.rms_norm)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t n = x.size(1);
  at::Tensor y = at::empty_like(x);  // [M, H]
  const float* wp = w.data_ptr<float>();
  for (int64_t row = 0; row < x.size(0); ++row) {
    const float* xp = x.data_ptr<float>() + row * n;
    float* yp = y.data_ptr<float>() + row * n;
    float squares = 0.f;
    for (int64_t i = 0; i < n; ++i) squares += xp[i] * xp[i];
    const float r = 1.f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) yp[i] = xp[i] * r * wp[i];
  }
  return y;
}

// RoPE in the rotate-half layout on `heads` consecutive heads of D values, in place
void rotate_heads(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[half + i];
      v[i] = a * cos[i] - b * sin[i];
      v[half + i] = b * cos[half + i] + a * sin[half + i];
    }
  }
}

// silu(gate) * up, row by row: gate_up [M, 2I] -> out [M, I]
void swiglu(const float* gate_up, int64_t M, int64_t I, float* out) {
  at::parallel_for(0, M, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gu = gate_up + r * 2 * I;
      for (int64_t i = 0; i < I; ++i) out[r * I + i] = gu[i] / (1.f + std::exp(-gu[i])) * gu[I + i];
    }
  });
}

// One query head against the keys at `slots`: softmax(q.k * scale) . v. k, v point at the head's [slots, D] rows.
void attend_head(const float* q, const float* k, const float* v, const int64_t* slots, int64_t L, int64_t D,
                 float scale, float* p, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    const float* row = k + slots[j] * D;
    float dot = 0.f;
    for (int64_t c = 0; c < D; ++c) dot += q[c] * row[c];
    p[j] = dot * scale;
    top = std::max(top, p[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < L; ++j) {
    p[j] = std::exp(p[j] - top);
    total += p[j];
  }
  float acc[kMaxHeadDim] = {};
  for (int64_t j = 0; j < L; ++j) {
    const float* row = v + slots[j] * D;
    for (int64_t c = 0; c < D; ++c) acc[c] += p[j] * row[c];
  }
  for (int64_t c = 0; c < D; ++c) out[c] = acc[c] / total;
}

void add_into(at::Tensor& x, const at::Tensor& y) {
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) xp[i] += yp[i];
}

at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                        const at::Tensor& lens, int64_t num_heads, int64_t num_kv_heads, double eps, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decode_layer: x must be [M, H] float32");
  TORCH_CHECK(w.size() == 10, "decode_layer: 10 weight tensors expected");
  const int64_t M = x.size(0), H = x.size(1), D = k_cache.size(2), Hq = num_heads, Hkv = num_kv_heads;
  for (int i : {0, 5})
    TORCH_CHECK(w[i].scalar_type() == at::kFloat && w[i].is_contiguous() && w[i].numel() == H,
                "decode_layer: norm weights must be [H] float32");
  for (int i : {1, 3, 6, 8})
    TORCH_CHECK(w[i].dim() == 4 || w[i].dim() == 3, "decode_layer: linear weights must be q4_gemm's or q8_gemm's tiles");
  TORCH_CHECK(D % 2 == 0 && D <= kMaxHeadDim && Hq % Hkv == 0 && k_cache.size(0) == Hkv,
              "decode_layer: head_dim must be even, up to 256, heads a multiple of kv heads");
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->scalar_type() == at::kFloat && c->stride(2) == 1 && c->stride(1) == D,
                "decode_layer: caches must be [Hkv, slots, D] float32 with rows of D");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 2 && slots.size(0) == M &&
                  lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == M,
              "decode_layer: slots must be [M, L] int64 and lens [M] int64");
  const int64_t Lmax = slots.size(1);
  const int64_t *sp = slots.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  const int64_t num_slots = std::min(k_cache.size(1), v_cache.size(1));
  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= Lmax, "decode_layer: lens must lie in 1..L");
    TORCH_CHECK(std::all_of(sp + i * Lmax, sp + i * Lmax + lp[i], [&](int64_t s) { return s >= 0 && s < num_slots; }),
                "decode_layer: slots must lie in the cache");
  }
  TORCH_CHECK(cos.numel() == M * D && sin.numel() == M * D && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(),
              "decode_layer: cos/sin must be [M, D] float32");

  // attention block
  at::Tensor qkv = linear(rms_norm(x, w[0], eps), w, 1);  // [M, (Hq + 2 Hkv) D]
  const int64_t width = (Hq + 2 * Hkv) * D;
  TORCH_CHECK(qkv.size(1) == width, "decode_layer: qkv weight must have (heads + 2 kv heads) * D rows");
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t head_stride = k_cache.stride(0);
  for (int64_t i = 0; i < M; ++i) {
    float* row = qkv.data_ptr<float>() + i * width;
    rotate_heads(row, Hq + Hkv, D, cos.data_ptr<float>() + i * D, sin.data_ptr<float>() + i * D);
    const int64_t new_slot = sp[i * Lmax + lp[i] - 1];
    for (int64_t h = 0; h < Hkv; ++h) {
      std::copy_n(row + (Hq + h) * D, D, kc + h * head_stride + new_slot * D);
      std::copy_n(row + (Hq + Hkv + h) * D, D, vc + h * head_stride + new_slot * D);
    }
  }
  at::Tensor attn = at::empty({M, Hq * D}, x.options());  // [M, Hq D]
  float* ap = attn.data_ptr<float>();
  const float* qp = qkv.data_ptr<float>();
  const int64_t group = Hq / Hkv;
  at::parallel_for(0, M * Hq, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(Lmax);  // one head's scores, then weights
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / Hq, h = t % Hq, kv = h / group;
      attend_head(qp + i * width + h * D, kc + kv * head_stride, vc + kv * head_stride, sp + i * Lmax, lp[i], D,
                  static_cast<float>(scale), p.data(), ap + i * Hq * D + h * D);
    }
  });
  at::Tensor out = x.clone();  // [M, H]: the residual stream
  add_into(out, linear(attn, w, 3));

  // MLP block: down(silu(gate) * up)
  at::Tensor gate_up = linear(rms_norm(out, w[5], eps), w, 6);  // [M, 2I]
  const int64_t I = gate_up.size(1) / 2;
  at::Tensor act = at::empty({M, I}, x.options());  // [M, I]
  swiglu(gate_up.data_ptr<float>(), M, I, act.data_ptr<float>());
  add_into(out, linear(act, w, 8));
  return out;
}

}  // namespace
}  // namespace KV_OPS

KV_LIBRARY_FRAGMENT(KV_OPS, m) {
  m.def("decode_layer(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor lens, int num_heads, int num_kv_heads, float eps, float scale) -> Tensor");
}

KV_LIBRARY_IMPL(KV_OPS, CPU, m) { m.impl("decode_layer", &KV_OPS::decode_layer); }
