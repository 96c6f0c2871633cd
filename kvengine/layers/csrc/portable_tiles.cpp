// The portable tier's tile kernels (fp32_mm.h): plain C++ any compiler builds (x86 at its baseline, ARM, ...) and
// vectorizes; the scalar reference the other fp32 tier is checked against in tests/layers.

#include "fp32_mm.h"

namespace KV_OPS {

namespace {

// one tile (q4_tile takes them one at a time)
template <bool Symmetric>
void q4_one(const int8_t* xq, const float* da, const float* sx, const uint8_t* w, const at::Half* dm, float* y, int R,
            int64_t K, int64_t N, int64_t t) {
  const int64_t G = K / kGroup, halves = Symmetric ? 16 : 32;  // fp16 values per tile and group (fp32_mm.h)
  const uint8_t* wt = w + t * G * 256;
  const at::Half* dmt = dm + t * G * halves;
  float acc[kRows][16] = {};
  for (int64_t g = 0; g < G; ++g) {
    int8_t q[16][kGroup];  // the tile's codes for this group: row l, input k
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 16; ++l)
        for (int b = 0; b < 4; ++b) {
          const uint8_t byte = wt[g * 256 + j * 64 + 4 * l + b];
          q[l][8 * j + b] = static_cast<int8_t>(byte & 15);
          q[l][8 * j + 4 + b] = static_cast<int8_t>(byte >> 4);
        }
    const at::Half* dg = dmt + g * halves;
    for (int i = 0; i < R; ++i) {
      const int64_t o = in_block(i, g, R);  // fp32_mm.h's block_slot
      const int8_t* xg = xq + o * kGroup;
      const float a = da[o], s = sx[o];
      for (int l = 0; l < 16; ++l) {
        int32_t dot = 0;
        for (int k = 0; k < kGroup; ++k) dot += q[l][k] * xg[k];
        const float d = static_cast<float>(dg[l]);
        if constexpr (Symmetric) {
          acc[i][l] += d * (static_cast<float>(dot) * a + s);  // s = -8 da * sum(codes) here (fp32_mm.h)
        } else {
          acc[i][l] += static_cast<float>(dot) * (d * a);
          acc[i][l] += static_cast<float>(dg[16 + l]) * s;
        }
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int l = 0; l < 16; ++l) y[i * N + 16 * t + l] = acc[i][l];
}

// one int8 tile (q8_tile takes them one at a time)
void q8_one(const int8_t* xq, const Q8Side& /*side: nothing made for this tier*/, const float* da, const uint8_t* w,
            const float* scale, float* y, int R, int64_t K, int64_t N, int64_t t) {
  const int64_t G = K / kGroup;
  const uint8_t* wt = w + t * K * 16;
  float acc[kRows][16] = {};
  for (int64_t g = 0; g < G; ++g) {
    int16_t q[16][kGroup];  // row l, input k: the stored byte less kQ8Offset
    for (int c = 0; c < 8; ++c)
      for (int l = 0; l < 16; ++l)
        for (int b = 0; b < 4; ++b)
          q[l][4 * c + b] = static_cast<int16_t>(wt[(g * 8 + c) * 64 + 4 * l + b] - kQ8Offset);
    for (int i = 0; i < R; ++i) {
      const int64_t o = in_block(i, g, R);
      const int8_t* xg = xq + o * kGroup;
      for (int l = 0; l < 16; ++l) {
        int32_t dot = 0;
        for (int k = 0; k < kGroup; ++k) dot += q[l][k] * xg[k];
        acc[i][l] += static_cast<float>(dot) * da[o];
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int l = 0; l < 16; ++l) y[i * N + 16 * t + l] = acc[i][l] * scale[16 * t + l];
}

}  // namespace

KV_TILES_ONE_AT_A_TIME

const Q8Reads kQ8Reads = Q8Reads::kNothing;

}  // namespace KV_OPS
