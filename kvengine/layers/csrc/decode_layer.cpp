// Llama-family decoder layer for M new tokens as one op: a decode step (one token for each of M sequences) or
// a prefill step (several tokens per sequence, each reading its sequence's keys up to itself).
// kvengine/models/llama.py calls it when every linear layer runs kvengine's tile kernels or has bf16 weights.
//
// A decode step of a small model is ~15 tensor ops per layer, and from Python each costs a few microseconds
// of dispatch, more than its arithmetic; torch.compile removes most of that but traces the model again in
// every process. Here the layer is one call: the matrix products are vnni_mm.cpp's (int8 activations, as the
// layer-by-layer path runs them) or, for bf16 weights, packed_mm.cpp's bf16_mm for few rows and PyTorch's
// matmul for more; the rest (RMSNorm, RoPE, the cache writes, attention, SwiGLU, residual adds) are plain loops.
// With quantized weights every row is computed on its own, the same way whatever the other rows are: a
// sequence's logits do not depend on what it is batched with.
//
//   kvengine::decode_layer(x [M, H] bf16, weights, cos [M, D], sin [M, D], k_cache, v_cache,
//                          slots [S, L] int64, seq [M] int64, lens [M] int64, num_heads, num_kv_heads, eps,
//                          scale) -> [M, H] bf16
//     weights: input norm [H], qkv (w, s), o (w, s), post-attention norm [H], gate_up (w, s), down (w, s), a
//     linear layer's (w, s) being q4_gemm's (uint8 [N/16, K/32, 4, 64], fp16 dm) or q8_gemm's (uint8
//     [N/16, K/4, 64], fp32 scale) operands, or a bf16 weight [N, K] and an unused tensor (unquantized models).
//     k_cache / v_cache: the layer's [Hkv, slots, D] bf16 views of the pool. slots: each of the step's S
//     sequences' slot list (padded to L); token i belongs to sequence seq[i] (a sequence's tokens are consecutive
//     rows) and reads lens[i] keys at slots[seq[i], 0 .. lens[i] - 1], its own key and value last: every token's
//     are written first, so tokens of one sequence in one step see each other causally. One list per sequence,
//     not per token, keeps a long prompt's operands linear in its length.
//
// Numerics follow the PyTorch path (models/llama.py) in bf16: every value that is a bf16 tensor there is
// rounded to bf16 here at the same point; inside an operation (a norm, a rotation, a softmax) the arithmetic is
// fp32, where the PyTorch path sometimes rounds in between: logits agree within bf16 noise, not bit for bit.

#include "lanes.h"  // (bf16_attention.h, included inside the namespace below)
#include "packed_mm.h"
#include "simd.h"
#include "tier.h"
#include "vnni_mm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

namespace {

using bf16 = c10::BFloat16;
using kvengine::simd::first;
using kvengine::simd::load16;
using kvengine::simd::store16;
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kFewRows = 4;  // models/llama.py BF16_MM_ROWS: the same bound for the LM head

// The linear layer whose (w, s) are weights[i], weights[i + 1]: q4_gemm's operands, q8_gemm's, or a bf16 weight
// [N, K] (s unused) multiplied by PyTorch's matmul.
at::Tensor linear(const at::Tensor& x, at::TensorList w, int i) {
  if (w[i].dim() == 2) {
    TORCH_CHECK(w[i].scalar_type() == at::kBFloat16 && w[i].size(1) == x.size(1),
                "decode_layer: a float weight must be [N, K] bfloat16");
    // few rows: bound by the weight bytes, which bf16_mm reads at memory speed; more: PyTorch's matmul
    return x.size(0) <= kFewRows && x.size(1) % 32 == 0 ? kvengine::bf16_mm(x, w[i]) : at::linear(x, w[i]);
  }
  return w[i].dim() == 4 ? kvengine::q4_gemm(x, w[i], w[i + 1]) : kvengine::q8_gemm(x, w[i], w[i + 1]);
}

// e^x for 16 lanes: x = k ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^6 (relative error ~1e-7),
// scaled by 2^k; x is clamped to [-104, 88.7] (e^x underflows to 0 and stays finite).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x);  // ln2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, k);
}

// x / rms(x) * w over each row, fp32 inside, one rounding (as F.rms_norm does for bf16)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t n = x.size(1);
  at::Tensor y = at::empty_like(x);  // [M, H]
  const bf16* wp = w.data_ptr<bf16>();
  for (int64_t row = 0; row < x.size(0); ++row) {
    const bf16* xp = x.data_ptr<bf16>() + row * n;
    bf16* yp = y.data_ptr<bf16>() + row * n;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 v = load16(xp + i, n - i);
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    const __m512 r = _mm512_set1_ps(
        1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(n) + static_cast<float>(eps)));
    for (int64_t i = 0; i < n; i += 16)
      store16(yp + i, _mm512_mul_ps(_mm512_mul_ps(load16(xp + i, n - i), r), load16(wp + i, n - i)), n - i);
  }
  return y;
}

// x += y (the bf16 residual add)
void add_into(at::Tensor& x, const at::Tensor& y) {
  bf16* xp = x.data_ptr<bf16>();
  const bf16* yp = y.data_ptr<bf16>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; i += 16) store16(xp + i, _mm512_add_ps(load16(xp + i, n - i), load16(yp + i, n - i)), n - i);
}

// RoPE in the rotate-half layout on `heads` consecutive heads of D values, in place
void rotate_heads(bf16* x, int64_t heads, int64_t D, const bf16* cos, const bf16* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    bf16* v = x + h * D;
    for (int64_t i = 0; i < half; i += 16) {
      const int64_t n = half - i;
      const __m512 a = load16(v + i, n), b = load16(v + half + i, n);
      store16(v + i, _mm512_fmsub_ps(a, load16(cos + i, n), _mm512_mul_ps(b, load16(sin + i, n))), n);
      store16(v + half + i, _mm512_fmadd_ps(b, load16(cos + half + i, n), _mm512_mul_ps(a, load16(sin + half + i, n))), n);
    }
  }
}

// silu(gate) * up, row by row: gate_up [M, 2I] -> out [M, I]
void swiglu(const bf16* gate_up, int64_t M, int64_t I, bf16* out) {
  at::parallel_for(0, M, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < I; i += 16) {
        const bf16* gu = gate_up + r * 2 * I;
        const __m512 g = load16(gu + i, I - i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
        store16(out + r * I + i, _mm512_mul_ps(silu, load16(gu + I + i, I - i)), I - i);
      }
  });
}

#include "bf16_attention.h"

#include "layer_flow.h"

at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                        const at::Tensor& seq, const at::Tensor& lens, int64_t num_heads, int64_t num_kv_heads,
                        double eps, double scale) {
  check_layer_operands(x, w, cos, sin, k_cache, v_cache, slots, seq, lens, num_heads, num_kv_heads, at::kBFloat16,
                       "bfloat16", 16);
  return layer_flow<bf16>(x, w, cos, sin, k_cache, v_cache, slots, seq, lens, num_heads, num_kv_heads, eps, scale);
}

#include "layer_stack.h"

}  // namespace

KV_LIBRARY_FRAGMENT(KV_OPS, m) {
  m.def(kvengine::schema::kDecodeLayer);
  m.def(kvengine::schema::kDecodeLayers);
}

KV_LIBRARY_IMPL(KV_OPS, CPU, m) {
  m.impl("decode_layer", &decode_layer);
  m.impl("decode_layers", &decode_layers);
}
