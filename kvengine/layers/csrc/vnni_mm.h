// The int8-activation matrix products of vnni_mm.cpp, for the other kernels of this extension
// (decode_layer.cpp calls them without going through the dispatcher).
#pragma once

#include <ATen/ATen.h>

namespace kvengine {

// x [M, K] bf16, w [N/16, K/32, 4, 64] uint8 (native.tile_int4), dm [N/16, K/32, 2, 16] fp16 -> [M, N] bf16
at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dm);
// x [M, K] bf16, w [N/16, K/4, 64] uint8 (native.tile_int8), scale [N] fp32 -> [M, N] bf16
at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);

}  // namespace kvengine
