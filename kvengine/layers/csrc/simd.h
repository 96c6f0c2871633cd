// Helpers the kernels of this folder share: up to 16 bf16 values <-> 16 fp32 lanes (AVX-512), and a switch from
// a row count to a kernel template instantiated for it.
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

// FN<n>(...) for n = rows in 1..7, FN<8> for 8 or more (the kernels take at most 8 rows of x per pass)
#define KV_ROWS_SWITCH(FN, rows, ...)  \
  switch (rows) {                      \
    case 1: FN<1>(__VA_ARGS__); break; \
    case 2: FN<2>(__VA_ARGS__); break; \
    case 3: FN<3>(__VA_ARGS__); break; \
    case 4: FN<4>(__VA_ARGS__); break; \
    case 5: FN<5>(__VA_ARGS__); break; \
    case 6: FN<6>(__VA_ARGS__); break; \
    case 7: FN<7>(__VA_ARGS__); break; \
    default: FN<8>(__VA_ARGS__); break; \
  }
