// The fp32-activation matmuls of the avx2 and portable tiers (fp32_mm.h): check the operands, quantize x's rows
// to int8 in groups of 32, and run the tier's tile kernel over every (weight tile, block of rows) pair.
// Plain C++: each tier compiles it with its own flags, so the quantization loop is vectorized for that CPU.

#include "fp32_mm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace KV_OPS {
namespace {

// x's rows quantized by groups of 32, as vnni_mm.cpp does: codes [M, K] int8, scales da [M, G] and sums
// sx [M, G] = da * sum(codes); codes = round(x * (127 / max|x|)), ties to even. With `magnitudes`, also |codes|
// [M, K] (q8_tile's unsigned operand; else null). The arrays are the calling thread's scratch, reused by its next
// matmul: a decode step makes four per layer, and an allocation each cost ~5% of a one-sequence step.
struct QuantizedRows {
  int8_t *codes, *magnitude;
  float *scale, *sum;
};

QuantizedRows quantize_rows(const at::Tensor& x, bool magnitudes) {
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  thread_local std::vector<int8_t> code_rows, magnitude_rows;
  thread_local std::vector<float> scale_rows, sum_rows;
  code_rows.resize(M * K);
  magnitude_rows.resize(magnitudes ? M * K : 0);
  scale_rows.resize(M * G);
  sum_rows.resize(M * G);
  const QuantizedRows r{code_rows.data(), magnitudes ? magnitude_rows.data() : nullptr, scale_rows.data(),
                        sum_rows.data()};
  const float* xp = x.data_ptr<float>();
  int8_t *qp = r.codes, *ap = r.magnitude;
  float *dp = r.scale, *sp = r.sum;
  at::parallel_for(0, M * G, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* v = xp + b * kGroup;
      float amax = 0.f;
      for (int k = 0; k < kGroup; ++k) amax = std::max(amax, std::fabs(v[k]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t codes[kGroup];
      for (int k = 0; k < kGroup; ++k) codes[k] = static_cast<int32_t>(std::nearbyint(v[k] * inv));
      int32_t total = 0;
      for (int k = 0; k < kGroup; ++k) {
        qp[b * kGroup + k] = static_cast<int8_t>(codes[k]);
        total += codes[k];
      }
      if (ap)
        for (int k = 0; k < kGroup; ++k) ap[b * kGroup + k] = static_cast<int8_t>(std::abs(codes[k]));
      dp[b] = amax / 127.f;
      sp[b] = dp[b] * static_cast<float>(total);
    }
  });
  return r;
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % kGroup == 0, op,
              ": x must be [M, K] float32 with K a multiple of 32");
}

}  // namespace

at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dm) {
  check_x(x, "q4_gemm");
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  const int64_t tiles = kvengine::operands::q4_tiles(w, dm, K), N = 16 * tiles;
  const QuantizedRows xr = quantize_rows(x.contiguous(), false);
  at::Tensor y = at::empty({M, N}, x.options());  // [M, N]
  const int8_t* qp = xr.codes;
  const float *dp = xr.scale, *sp = xr.sum;
  const at::Half* dmp = dm.data_ptr<at::Half>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  kvengine::tiles::for_tiles<kRows>(M, tiles, [&](int64_t t, int64_t i0, int64_t r) {
    q4_tile(qp + i0 * K, dp + i0 * G, sp + i0 * G, wp, dmp, yp + i0 * N, static_cast<int>(r), K, N, t);
  });
  return y;
}

at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  check_x(x, "q8_gemm");
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  const int64_t tiles = kvengine::operands::q8_tiles(w, scale, K), N = 16 * tiles;
  const QuantizedRows xr = quantize_rows(x.contiguous(), kTilesReadMagnitudes);
  at::Tensor y = at::empty({M, N}, x.options());  // [M, N]
  const int8_t *qp = xr.codes, *ap = xr.magnitude;
  const float *dp = xr.scale, *sp = scale.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  kvengine::tiles::for_tiles<kRows>(M, tiles, [&](int64_t t, int64_t i0, int64_t r) {
    q8_tile(qp + i0 * K, ap ? ap + i0 * K : nullptr, dp + i0 * G, wp, sp, yp + i0 * N,
            static_cast<int>(r), K, N, t);
  });
  return y;
}

}  // namespace KV_OPS

KV_LIBRARY(KV_OPS, m) {
  m.def(kvengine::schema::kQ4Gemm);
  m.def(kvengine::schema::kQ8Gemm);
}

KV_LIBRARY_IMPL(KV_OPS, CPU, m) {
  m.impl("q4_gemm", &KV_OPS::q4_gemm);
  m.impl("q8_gemm", &KV_OPS::q8_gemm);
}
