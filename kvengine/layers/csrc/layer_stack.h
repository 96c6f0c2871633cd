// decode_layers: the model's decoder layers in turn, x through each, as one op call a step. A decode step of one
// sequence spends ~100 us a layer on SmolLM2's small matrices, and a call of decode_layer from Python (the
// dispatcher parsing its 22 operands, then the checks) cost ~15 us more each time: ~0.45 ms of a ~5.5 ms token
// (AMD EPYC Zen 3, avx2, 2 threads). Each layer is decode_layer itself (the same checks, the same arithmetic), so
// the results equal those of the op called once a layer.
// Included by decode_layer.cpp and fp32_layer.cpp inside their namespace, after their decode_layer.
#pragma once

//   decode_layers(x [M, H], weights: decode_layer's 10 for each of the L layers in order, cos, sin,
//                 k_caches, v_caches: L caches each, slots, seq, lens, num_heads, num_kv_heads, eps, scale) -> [M, H]
at::Tensor decode_layers(const at::Tensor& x, at::TensorList w, const at::Tensor& cos, const at::Tensor& sin,
                         at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& slots,
                         const at::Tensor& seq, const at::Tensor& lens, int64_t num_heads, int64_t num_kv_heads,
                         double eps, double scale) {
  const size_t layers = k_caches.size();
  TORCH_CHECK(layers > 0 && v_caches.size() == layers && w.size() == 10 * layers,
              "decode_layers: one k and one v cache and 10 weight tensors per layer expected");
  at::Tensor h = x;
  for (size_t l = 0; l < layers; ++l)
    h = decode_layer(h, w.slice(10 * l, 10), cos, sin, k_caches[l], v_caches[l], slots, seq, lens, num_heads,
                     num_kv_heads, eps, scale);
  return h;
}
