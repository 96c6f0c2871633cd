// The packed-weight matrix products of packed_mm.cpp, for the other kernels of this extension
// (decode_layer.cpp calls them without going through the dispatcher).
#pragma once

#include <ATen/ATen.h>

namespace kvengine {

// x [M, K] bf16, q [N, K/2] uint8 (native.pack_int4), dm [N, 2, K/32] fp16 -> [M, N] bf16
at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& dm);
// x [M, K] bf16, q [N, K] int8, scale [N] fp32 -> [M, N] bf16
at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale);
// x [M, K] bf16, w [N, K] bf16 (K a multiple of 32) -> [M, N] bf16
at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& w);

}  // namespace kvengine
