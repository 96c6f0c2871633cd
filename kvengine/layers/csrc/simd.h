// AVX-512 helpers the kernels of this folder share: up to 16 bf16 values <-> 16 fp32 lanes.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace kvengine::simd {

// the first n of 16 lanes (all 16 for n >= 16)
inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// bf16 -> fp32 is exact (the bf16 bits are the fp32's high half); lanes past n read nothing and are 0
inline __m512 load16(const c10::BFloat16* p, int64_t n = 16) {
  __m256i v = _mm256_maskz_loadu_epi16(first(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// fp32 -> bf16 rounded to nearest even (as c10::BFloat16 rounds); lanes past n are not written
inline void store16(c10::BFloat16* p, __m512 v, int64_t n = 16) {
  _mm256_mask_storeu_epi16(p, first(n), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

}  // namespace kvengine::simd
