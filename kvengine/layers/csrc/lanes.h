// fp32 registers of 8 lanes (AVX2) and, where a tier is compiled with AVX-512, of 16, behind one interface, so that
// a step written once serves both widths: the int4 tiles' scale step (q4_scales.h) and the attention's values pass
// (fp32_attention.h). Each lane is its own chain of the same operations, so the width never changes a result.
#pragma once

#include <c10/util/Half.h>
#include <immintrin.h>

namespace kvengine::lanes {

struct Lanes8 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // kLanes fp16 values as fp32 (F16C)
  static V halves(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
};

#if defined(__AVX512F__)
struct Lanes16 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V halves(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};
using Widest = Lanes16;
#else
using Widest = Lanes8;
#endif

}  // namespace kvengine::lanes
