// The fp32-activation matmuls of the avx2 and portable tiers (fp32_mm.h): check the operands, quantize x's rows
// to int8 in groups of 32, and run the tier's tile kernel over every (weight tile, block of rows) pair.
// Plain C++: each tier compiles it with its own flags, so the quantization loop is vectorized for that CPU.

#include "fp32_mm.h"

#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

namespace KV_OPS {
namespace {

// x's rows quantized by groups of 32, as vnni_mm.cpp does: codes int8 (M * K), scales da and sums
// sx = da * sum(codes) * sum_factor (M * G each; the factor is -8 for symmetric int4 weights), in block_slot's
// order; codes = round(x * (127 / max|x|)), ties to even. `side`: what the tier's q8_tile also reads (fp32_mm.h's
// kQ8Reads), the rest null. The arrays are the calling thread's scratch, reused by its next matmul: a decode step
// makes four per layer, and an allocation each cost ~5% of a one-sequence step.
struct QuantizedRows {
  int8_t *codes, *magnitude;
  int32_t* code_sum;
  float *scale, *sum;
};

// One group of 32 values: max|v|, and the codes round(v * inv) (ties to even) with their magnitudes (a: null when
// not wanted) and their sum. With AVX2 in 8-lane steps (the same numbers: max exact, the same fp32 product, the
// same rounding; plain C++ left the max and rounding loops scalar), else plain loops.
#if defined(__AVX2__)
inline float group_amax(const float* v) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 top = _mm256_setzero_ps();
  for (int k = 0; k < kGroup; k += 8)
    top = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(v + k)), top);  // a NaN lane keeps top, as std::max
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t group_codes(const float* v, float inv, int8_t* q, int8_t* a) {
  __m256i c[4];
  for (int k = 0; k < 4; ++k)
    c[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * k), _mm256_set1_ps(inv)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // int32 -> int8 in order: packs interleave 128-bit lanes, the permute puts them back
  const __m256i w = _mm256_packs_epi32(c[0], c[1]), z = _mm256_packs_epi32(c[2], c[3]);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w, z), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), b);
  if (a) _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), _mm256_abs_epi8(b));
  const __m256i t = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1)));
}
#else
inline float group_amax(const float* v) {
  float amax = 0.f;
  for (int k = 0; k < kGroup; ++k) amax = std::max(amax, std::fabs(v[k]));
  return amax;
}

inline int32_t group_codes(const float* v, float inv, int8_t* q, int8_t* a) {
  int32_t codes[kGroup];
  for (int k = 0; k < kGroup; ++k) codes[k] = static_cast<int32_t>(std::nearbyint(v[k] * inv));
  int32_t total = 0;
  for (int k = 0; k < kGroup; ++k) {
    q[k] = static_cast<int8_t>(codes[k]);
    total += codes[k];
  }
  if (a)
    for (int k = 0; k < kGroup; ++k) a[k] = static_cast<int8_t>(std::abs(codes[k]));
  return total;
}
#endif

QuantizedRows quantize_rows(const at::Tensor& x, Q8Reads side = Q8Reads::kNothing, float sum_factor = 1.f) {
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  const bool magnitudes = side == Q8Reads::kMagnitudes, code_sums = side == Q8Reads::kCodeSums;
  thread_local std::vector<int8_t> code_rows, magnitude_rows;
  thread_local std::vector<int32_t> code_sum_rows;
  thread_local std::vector<float> scale_rows, sum_rows;
  code_rows.resize(M * K + kCodePadding);
  magnitude_rows.resize(magnitudes ? M * K : 0);
  code_sum_rows.resize(code_sums ? M * G : 0);
  scale_rows.resize(M * G);
  sum_rows.resize(M * G);
  const QuantizedRows r{code_rows.data(), magnitudes ? magnitude_rows.data() : nullptr,
                        code_sums ? code_sum_rows.data() : nullptr, scale_rows.data(), sum_rows.data()};
  const float* xp = x.data_ptr<float>();
  int8_t *qp = r.codes, *ap = r.magnitude;
  int32_t* cp = r.code_sum;
  float *dp = r.scale, *sp = r.sum;
  at::parallel_for(0, M * G, kvengine::grain_for(kGroup), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* v = xp + b * kGroup;
      const float amax = group_amax(v);
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      const int64_t o = block_slot(b / G, b % G, M, G);
      const int32_t total = group_codes(v, inv, qp + o * kGroup, ap ? ap + o * kGroup : nullptr);
      dp[o] = amax / 127.f;
      sp[o] = dp[o] * static_cast<float>(total) * sum_factor;
      if (cp) cp[o] = -kQ8Offset * total;
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
  bool symmetric = false;
  const int64_t tiles = kvengine::operands::q4_tiles(w, dm, K, &symmetric), N = 16 * tiles;
  const QuantizedRows xr = quantize_rows(x.contiguous(), Q8Reads::kNothing, symmetric ? -kQ4Midpoint : 1.f);
  at::Tensor y = at::empty({M, N}, x.options());  // [M, N]
  const int8_t* qp = xr.codes;
  const float *dp = xr.scale, *sp = xr.sum;
  const at::Half* dmp = dm.data_ptr<at::Half>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const auto tile = symmetric ? q4_tile<true> : q4_tile<false>;
  const int span = tile_span(tiles);
  kvengine::tiles::for_tiles<kRows>(M, tiles / span, [&](int64_t p, int64_t i0, int64_t r) {
    tile(qp + i0 * K, dp + i0 * G, sp + i0 * G, wp, dmp, yp + i0 * N, static_cast<int>(r), K, N, p * span, span);
  });
  return y;
}

at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  check_x(x, "q8_gemm");
  const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
  const int64_t tiles = kvengine::operands::q8_tiles(w, scale, K), N = 16 * tiles;
  const QuantizedRows xr = quantize_rows(x.contiguous(), kQ8Reads);
  at::Tensor y = at::empty({M, N}, x.options());  // [M, N]
  const int8_t *qp = xr.codes, *ap = xr.magnitude;
  const int32_t* cp = xr.code_sum;
  const float *dp = xr.scale, *sp = scale.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int span = tile_span(tiles);
  kvengine::tiles::for_tiles<kRows>(M, tiles / span, [&](int64_t p, int64_t i0, int64_t r) {
    const Q8Side side{ap ? ap + i0 * K : nullptr, cp ? cp + i0 * G : nullptr};
    q8_tile(qp + i0 * K, side, dp + i0 * G, wp, sp, yp + i0 * N, static_cast<int>(r), K, N, p * span, span);
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
