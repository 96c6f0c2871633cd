// The avx512vnni tier's q4_tile / q8_tile (fp32_mm.h): avx512_tiles.h's kernels.

#include "avx512_tiles.h"

namespace KV_OPS {

template <bool Symmetric>
void q4_tile(const int8_t* xq, const float* da, const float* sx, const uint8_t* w, const at::Half* dm, float* y, int R,
             int64_t K, int64_t N, int64_t t, int span) {
  avx512::q4_tile<Symmetric>(xq, da, sx, w, dm, y, R, K, N, t, span);
}
KV_Q4_TILE_FORMS

void q8_tile(const int8_t* xq, const Q8Side& side, const float* da, const uint8_t* w, const float* scale, float* y,
             int R, int64_t K, int64_t N, int64_t t, int span) {
  avx512::q8_tile(xq, side, da, w, scale, y, R, K, N, t, span);
}

const Q8Reads kQ8Reads = avx512::kReads;
const int kTileSpan = avx512::kSpan;

}  // namespace KV_OPS
