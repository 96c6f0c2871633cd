// What the avx2 (8 lanes: half a tile) and avx512vnni (16 lanes: a whole tile) int4 tile kernels share: a group's
// scales for L::kLanes rows of a tile, read once per group, whose step() adds one row's product `dot` with the group
// (x's scale da, sum sx) to that row's sums, and the many-row kernels' group step over P rows. Asymmetric weights
// (w = q d + m): 16 scales then 16 minimums per tile and group, acc + dot * (d * da) + m * sx. Symmetric ones (GGUF
// Q4_0's grid, m = -8 d): the 16 scales alone, half the bytes, and acc + d * (dot * da + sx) with
// sx = -8 da * sum(codes) (fp32_mm.h), one multiply fewer.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

#include "lanes.h"

namespace kvengine::tiles {

template <bool Symmetric, typename L>
struct Q4Scales;

template <typename L>
struct Q4Scales<false, L> {
  static constexpr int64_t kHalves = 32;  // fp16 values per tile and group
  typename L::V d, m;
  Q4Scales() = default;
  // rows L::kLanes * h .. of the tile (h = 0 where L covers all 16)
  Q4Scales(const at::Half* dg, int h) : d(L::load(dg + L::kLanes * h)), m(L::load(dg + 16 + L::kLanes * h)) {}
  typename L::V step(typename L::V acc, typename L::V dot, float da, float sx) const {
    return L::fmadd(m, L::set1(sx), L::fmadd(dot, L::mul(d, L::set1(da)), acc));
  }
};

template <typename L>
struct Q4Scales<true, L> {
  static constexpr int64_t kHalves = 16;
  typename L::V d;
  Q4Scales() = default;
  Q4Scales(const at::Half* dg, int h) : d(L::load(dg + L::kLanes * h)) {}
  typename L::V step(typename L::V acc, typename L::V dot, float da, float sx) const {
    return L::fmadd(d, L::fmadd(dot, L::set1(da), L::set1(sx)), acc);
  }
};

// The many-row kernels' step of one group for P consecutive rows of a block (xg, da, sx at the first, the rows'
// codes `group` bytes apart; sums in acc[0..P-1]): the P rows' byte products first (`dot(wv, codes)`, the tier's own),
// so that P independent chains fill the multiply pipes, then each row's scale step.
template <int P, typename L, typename S, typename W, typename Dot>
inline void q4_rows(const W* wv, const int8_t* xg, int64_t group, const float* da, const float* sx, const S& sc,
                    float (*acc)[L::kLanes], const Dot& dot) {
  typename L::V prod[P];
  for (int j = 0; j < P; ++j) prod[j] = dot(wv, xg + j * group);
  for (int j = 0; j < P; ++j) L::store(acc[j], sc.step(L::load(acc[j]), prod[j], da[j], sx[j]));
}

}  // namespace kvengine::tiles
