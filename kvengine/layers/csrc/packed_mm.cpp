// Packed-weight matrix products on bf16 activations, on x86 CPUs with AVX-512 BF16 (kvengine/layers/native.py
// builds and loads this file; layers/linear.py calls the ops for layers whose shape vnni_mm.cpp's 16-row tiles
// do not fit).
//
// At decode a step multiplies few rows (M <= 8) by every weight once, so the time is the weight bytes read
// and the instructions spent turning them into numbers. Both kernels read each weight row once for all M
// rows of x and keep the work per weight to a few vector instructions (on this project's 2-core Zen 4 box they
// are bound by those instructions, ~37 G weights/s, not by memory bandwidth):
//
//   kvengine::q4_mm(x [M, K] bf16, q [N, K/2] uint8, dm [N, 2, K/32] fp16) -> [M, N] bf16
//     W[n, 32g + j] = d[n, g] * q[n, g, j] + m[n, g] (GGUF Q4_1's block form). 32 bytes hold two groups in
//     the order native.pack_int4 writes: their low and high nibbles, interleaved byte by byte with 0x43,
//     give the 16-bit words 0x4300 | q, which is the bf16 number 128 + q (bf16 128.0 is 0x4300 and its 7
//     mantissa bits count units), group g's 32 in order, then group g+1's. So one VDPBF16PS multiplies 32
//     weights by 32 activations exactly in fp32; the 128 * sum(x) it adds per group is taken back with the
//     group's offset: y = sum_g d_g * dot_g + (m_g - 128 d_g) * sum_g(x).
//   kvengine::q8_mm(x [M, K] bf16, q [N, K] int8, scale [N] fp32) -> [M, N] bf16
//     W[n, k] = q[n, k] * scale[n]; int8 -> fp32 by sign extension and conversion, fp32 FMAs.
//   kvengine::bf16_mm(x [M, K] bf16, w [N, K] bf16) -> [M, N] bf16
//     unquantized weights, 32 per VDPBF16PS: bound by the weight bytes (PyTorch's matmul at one row ran ~5x
//     slower here); decode_layer.cpp uses it for bf16 models' steps of few rows.

#include "packed_mm.h"
#include "simd.h"
#include "tier.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kGroup = 32;
constexpr int kMaxRows = 8;
constexpr int64_t kMaxGroups = 512;  // K <= 16384
// How far ahead of the rows being read to request weights: 2-4 KB measured best here (8 KB was slower).
constexpr int64_t kPrefetchBytes = 4096;

// Ask for the `bytes` of weights `kPrefetchBytes` after `p`, so rows coming from memory are in cache when the
// tile reaches them (the hardware prefetcher alone left a few percent to ~10% on the table here).
inline void prefetch_ahead(const void* p, int64_t bytes, const void* end) {
  const char* c = static_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t b = 0; b < bytes && c + b < end; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

// R rows of W from row n, against M rows of x: R * M independent accumulators, so the FMA chains of
// different rows overlap (one row alone waits on its accumulator every group). xsum [M, G]: group sums of x.
template <int M, int R>
inline void q4_tile(const uint16_t* x, const float* xsum, const uint8_t* q, const uint16_t* dm, c10::BFloat16* y,
                    int64_t K, int64_t N, int64_t n) {
  const int64_t G = K / kGroup;
  prefetch_ahead(q + n * (K / 2), R * (K / 2), q + N * (K / 2));
  prefetch_ahead(dm + n * 2 * G, R * 4 * G, dm + N * 2 * G);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m512i bf16_hi = _mm512_set1_epi8(0x43);  // high byte of bf16 128.0
  alignas(64) float d[R][kMaxGroups], c[R][kMaxGroups];  // each row's scales and offsets m - 128 d
  for (int r = 0; r < R; ++r) {
    const uint16_t* dn = dm + (n + r) * 2 * G;
    for (int64_t g = 0; g < G; g += 16) {
      __mmask16 mask = G - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - g)) - 1);
      __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dn + g));
      __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dn + G + g));
      _mm512_store_ps(d[r] + g, dv);
      _mm512_store_ps(c[r] + g, _mm512_fnmadd_ps(_mm512_set1_ps(128.f), dv, mv));
    }
  }
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 2) {  // two groups: 32 bytes -> 64 weights
    for (int r = 0; r < R; ++r) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (n + r) * (K / 2) + g * 16));
      __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, nibble)),
                                     _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), 1);  // [lo | hi] nibbles
      __m512i wa = _mm512_unpacklo_epi8(z, bf16_hi);  // group g:     32 x bf16(128 + q)
      __m512i wb = _mm512_unpackhi_epi8(z, bf16_hi);  // group g + 1
      __m512 da = _mm512_set1_ps(d[r][g]), db = _mm512_set1_ps(d[r][g + 1]);
      for (int i = 0; i < M; ++i) {
        const uint16_t* xg = x + i * K + g * kGroup;
        __m512 dot_a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wa, (__m512bh)_mm512_loadu_si512(xg));
        __m512 dot_b = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wb, (__m512bh)_mm512_loadu_si512(xg + kGroup));
        acc[r][i] = _mm512_fmadd_ps(db, dot_b, _mm512_fmadd_ps(da, dot_a, acc[r][i]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) {
      __m512 off = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; g += 16) {
        __mmask16 mask = G - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - g)) - 1);
        off = _mm512_fmadd_ps(_mm512_maskz_load_ps(mask, c[r] + g), _mm512_maskz_loadu_ps(mask, xsum + i * G + g), off);
      }
      y[i * N + n + r] = c10::BFloat16(_mm512_reduce_add_ps(_mm512_add_ps(acc[r][i], off)));
    }
}

template <int M>
void q4_rows(const uint16_t* x, const float* xsum, const uint8_t* q, const uint16_t* dm, c10::BFloat16* y,
             int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = M == 1 ? 4 : (M == 2 ? 2 : 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) q4_tile<M, R>(x, xsum, q, dm, y, K, N, n);
  for (; n < n1; ++n) q4_tile<M, 1>(x, xsum, q, dm, y, K, N, n);
}

template <int M, int R>
inline void q8_tile(const float* x, const int8_t* q, const float* scale, c10::BFloat16* y, int64_t K, int64_t N,
                    int64_t n) {
  prefetch_ahead(q + n * K, R * K, q + N * K);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    for (int r = 0; r < R; ++r) {
      __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (n + r) * K + k));
      __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
      for (int i = 0; i < M; ++i) acc[r][i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * K + k), acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) y[i * N + n + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[r][i]) * scale[n + r]);
}

template <int M>
void q8_rows(const float* x, const int8_t* q, const float* scale, c10::BFloat16* y, int64_t K, int64_t N,
             int64_t n0, int64_t n1) {
  constexpr int R = M == 1 ? 4 : (M == 2 ? 2 : 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) q8_tile<M, R>(x, q, scale, y, K, N, n);
  for (; n < n1; ++n) q8_tile<M, 1>(x, q, scale, y, K, N, n);
}

// R rows of a bf16 weight against M rows of x: 32 weights per VDPBF16PS, no unpacking.
template <int M, int R>
inline void bf16_tile(const uint16_t* x, const uint16_t* w, c10::BFloat16* y, int64_t K, int64_t N, int64_t n) {
  prefetch_ahead(w + n * K, R * K * 2, w + N * K);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
      for (int i = 0; i < M; ++i)
        acc[r][i] = _mm512_dpbf16_ps(acc[r][i], wv, (__m512bh)_mm512_loadu_si512(x + i * K + k));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) y[i * N + n + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[r][i]));
}

template <int M>
void bf16_rows(const uint16_t* x, const uint16_t* w, c10::BFloat16* y, int64_t K, int64_t N, int64_t n0,
               int64_t n1) {
  constexpr int R = M == 1 ? 4 : (M == 2 ? 2 : 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) bf16_tile<M, R>(x, w, y, K, N, n);
  for (; n < n1; ++n) bf16_tile<M, 1>(x, w, y, K, N, n);
}

constexpr int64_t kGrain = 32;  // output rows per parallel task

// x's rows in chunks of at most kMaxRows (m0, rows), the output rows split across threads (n0, n1).
template <typename F>
void for_tiles(int64_t M, int64_t N, const F& f) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) { f(m0, rows, n0, n1); });
  }
}

}  // namespace

namespace kvengine {

at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& dm) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "q4_mm: x must be [M, K] bfloat16");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(), "q4_mm: q must be [N, K/2] uint8");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = K / kGroup;
  TORCH_CHECK(K % (2 * kGroup) == 0 && q.size(1) == K / 2 && G <= kMaxGroups,
              "q4_mm: K must be a multiple of 64, at most 16384");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.numel() == N * 2 * G,
              "q4_mm: dm must be [N, 2, K/32] float16");
  at::Tensor xc = x.contiguous();
  at::Tensor xsum = at::empty({M, G}, x.options().dtype(at::kFloat));  // [M, G]: each group's sum of x
  at::Tensor y = at::empty({M, N}, x.options());  // [M, N]
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  float* sums = xsum.data_ptr<float>();
  const at::BFloat16* xb = xc.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * G; ++i) {
    const at::BFloat16* group = xb + i * kGroup;
    sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(kvengine::simd::load16(group), kvengine::simd::load16(group + 16)));
  }
  const auto* dmp = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = xsum.data_ptr<float>();
  auto* yp = y.data_ptr<at::BFloat16>();
  for_tiles(M, N, [&](int64_t m0, int64_t rows, int64_t n0, int64_t n1) {
    KV_ROWS_SWITCH(q4_rows, rows, xp + m0 * K, sp + m0 * G, qp, dmp, yp + m0 * N, K, N, n0, n1)
  });
  return y;
}

at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "q8_mm: x must be [M, K] bfloat16");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q8_mm: q must be [N, K] int8");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(K % 16 == 0 && q.size(1) == K, "q8_mm: K must be a multiple of 16");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "q8_mm: scale must be [N] float32");
  at::Tensor xf = x.to(at::kFloat).contiguous();  // [M, K]
  at::Tensor y = at::empty({M, N}, x.options());  // [M, N]
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  auto* yp = y.data_ptr<at::BFloat16>();
  for_tiles(M, N, [&](int64_t m0, int64_t rows, int64_t n0, int64_t n1) {
    KV_ROWS_SWITCH(q8_rows, rows, xp + m0 * K, qp, sp, yp + m0 * N, K, N, n0, n1)
  });
  return y;
}

at::Tensor bf16_mm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16_mm: x must be [M, K] bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1) &&
                  x.size(1) % 32 == 0, "bf16_mm: w must be [N, K] bfloat16 with K a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());  // [M, N]
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* yp = y.data_ptr<at::BFloat16>();
  for_tiles(M, N, [&](int64_t m0, int64_t rows, int64_t n0, int64_t n1) {
    KV_ROWS_SWITCH(bf16_rows, rows, xp + m0 * K, wp, yp + m0 * N, K, N, n0, n1)
  });
  return y;
}

}  // namespace kvengine

KV_LIBRARY(KV_OPS, m) {
  m.def("q4_mm(Tensor x, Tensor q, Tensor dm) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("bf16_mm(Tensor x, Tensor w) -> Tensor");
}

KV_LIBRARY_IMPL(KV_OPS, CPU, m) {
  m.impl("q4_mm", &kvengine::q4_mm);
  m.impl("q8_mm", &kvengine::q8_mm);
  m.impl("bf16_mm", &kvengine::bf16_mm);
}
