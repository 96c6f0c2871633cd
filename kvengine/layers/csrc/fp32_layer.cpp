// Llama-family decoder layer for M new tokens as one op, on fp32 activations: the avx2 and portable tiers'
// counterpart of decode_layer.cpp (same operands and semantics, read its header), for CPUs without bf16
// arithmetic. The matrix products are fp32_mm.h's (int8 activations in groups of 32, as the layer-by-layer path
// runs them); attention is fp32_attention.h's; the rest are plain loops over fp32 that each tier's flags vectorize
// (e^x with AVX2 is lanes.h's exp). Every row is computed on its own: a sequence's result does not depend
// on what it is batched with.
//
//   KV_OPS::decode_layer(x [M, H] fp32, weights, cos [M, D], sin [M, D], k_cache, v_cache, slots [S, L] int64,
//                        seq [M] int64, lens [M] int64, num_heads, num_kv_heads, eps, scale) -> [M, H] fp32
//     weights: input norm [H], qkv (w, s), o (w, s), post-attention norm [H], gate_up (w, s), down (w, s), each
//     linear layer's (w, s) q4_gemm's or q8_gemm's operands; norms, cos and sin fp32; the caches fp32, or bf16 or
//     fp16 (half the bytes a token: the new keys and values rounded to nearest even as they are written, as PyTorch
//     rounds them for the layer-by-layer path's cache, and widened to fp32 exactly as attention reads them).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "fp32_mm.h"
#if defined(__AVX2__)
#include "lanes.h"  // (here, and in fp32_attention.h, included inside the namespace below)
#endif

namespace KV_OPS {
namespace {

constexpr int64_t kMaxHeadDim = 256;

at::Tensor linear(const at::Tensor& x, at::TensorList w, int i) {
  return w[i].dim() == 4 ? q4_gemm(x, w[i], w[i + 1]) : q8_gemm(x, w[i], w[i + 1]);
}

// a . b over D values in 8 interleaved partial sums, which the tier's flags turn into one vector register (a single
// running sum is a serial chain the compiler may not reorder)
float dot_row(const float* a, const float* b, int64_t D) {
  float part[8] = {};
  int64_t c = 0;
  for (; c + 8 <= D; c += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[c + j] * b[c + j];
  for (; c < D; ++c) part[c % 8] += a[c] * b[c];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

// x / rms(x) * w over each row (F.rms_norm)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t n = x.size(1);
  at::Tensor y = at::empty_like(x);  // [M, H]
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, x.size(0), kvengine::grain_for(n), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const float* xp = x.data_ptr<float>() + row * n;
      float* yp = y.data_ptr<float>() + row * n;
      const float r = 1.f / std::sqrt(dot_row(xp, xp, n) / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) yp[i] = xp[i] * r * wp[i];
    }
  });
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

#include "fp32_attention.h"

#if defined(__AVX2__) && defined(__FMA__)
// out[i] = silu(gate[i]) * up[i] (gu: a row's [gate | up]) from the given i on, W lanes at a time while they fill;
// returns where it stopped. Each lane does the same operations: the width does not change a value.
template <typename W>
int64_t silu_times(const float* gu, int64_t I, int64_t i, float* out) {
  for (; i + W::kLanes <= I; i += W::kLanes) {
    const typename W::V g = W::load(gu + i);
    const typename W::V e = kvengine::lanes::exp<W>(W::sub(W::set1(0.f), g));
    W::store(out + i, W::mul(W::div(g, W::add(W::set1(1.f), e)), W::load(gu + I + i)));
  }
  return i;
}
#endif

// silu(gate) * up, row by row: gate_up [M, 2I] -> out [M, I]
void swiglu(const float* gate_up, int64_t M, int64_t I, float* out) {
  at::parallel_for(0, M, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gu = gate_up + r * 2 * I;
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      i = silu_times<kvengine::lanes::Widest>(gu, I, 0, out + r * I);
      i = silu_times<kvengine::lanes::Lanes8>(gu, I, i, out + r * I);
#endif
      for (; i < I; ++i) out[r * I + i] = gu[i] / (1.f + std::exp(-gu[i])) * gu[I + i];
    }
  });
}

// x += y (the residual add), split between the threads past kParallelValues values: a prefill's adds ran on the
// calling thread alone while the other waited (2.6% of the engine thread's time in SmolLM2's 32-request run, AMD
// EPYC Zen 3; a decode step's 32 rows stay below the grain, on one thread)
void add_into(at::Tensor& x, const at::Tensor& y) {
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), kvengine::grain_for(1), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) xp[i] += yp[i];
  });
}

#include "layer_flow.h"

at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                        const at::Tensor& seq, const at::Tensor& lens, int64_t num_heads, int64_t num_kv_heads,
                        double eps, double scale) {
  static const CacheDtypes kNarrowCaches{{at::kBFloat16, at::kHalf}, "float32, bfloat16 or float16"};  // once
  check_layer_operands(x, w, cos, sin, k_cache, v_cache, slots, seq, lens, num_heads, num_kv_heads, at::kFloat,
                       "float32", 2, kNarrowCaches);
  for (int i : {1, 3, 6, 8})
    TORCH_CHECK(w[i].dim() == 4 || w[i].dim() == 3, "decode_layer: linear weights must be q4_gemm's or q8_gemm's tiles");
  // the layer with caches of C, named by a value of it
  const auto flow = [&](auto cache_value) {
    return layer_flow<float, decltype(cache_value)>(x, w, cos, sin, k_cache, v_cache, slots, seq, lens, num_heads,
                                                    num_kv_heads, eps, scale);
  };
  switch (k_cache.scalar_type()) {
    case at::kBFloat16: return flow(c10::BFloat16{});
    case at::kHalf: return flow(c10::Half{});
    default: return flow(0.f);
  }
}

#include "layer_stack.h"

}  // namespace
}  // namespace KV_OPS

KV_LIBRARY_FRAGMENT(KV_OPS, m) {
  m.def(kvengine::schema::kDecodeLayer);
  m.def(kvengine::schema::kDecodeLayers);
}

KV_LIBRARY_IMPL(KV_OPS, CPU, m) {
  m.impl("decode_layer", &KV_OPS::decode_layer);
  m.impl("decode_layers", &KV_OPS::decode_layers);
}
