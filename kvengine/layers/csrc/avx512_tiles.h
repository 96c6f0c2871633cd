// The avx512vnni tier's tile kernels (fp32_mm.h; avx512_tiles.cpp defines that tier's q4_tile / q8_tile from them,
// amx_tiles.cpp its one-row kernels and short blocks), for x86 CPUs with AVX-512 and VNNI but no bf16 arithmetic
// (Intel Cascade Lake, Ice Lake, and the cloud VMs that show a newer Xeon as one of them): fp32 activations, as the
// avx2 tier, with 512-bit registers.
//
// A 512-bit register holds a whole 64-byte tile row block (16 output rows x 4 inputs), so one VPDPBUSD against 4
// bytes of x broadcast to every lane (from memory: the load port does the broadcast) advances all 16 outputs of a
// tile by 4 inputs: no halves, half the instructions of the avx2 tier's VPMADDUBSW / VPMADDWD chains, a quarter of
// their products' instructions. The loops are the avx2 tier's: the one-row kernels keep the row's sums in a
// register and ask for the weights 2 KB ahead; the many-row kernels unpack a group once for all R <= kRows rows of
// x, whose sums wait in L1, and ask for a tile's weights 1 KB ahead (fp32_mm.h's kPassPrefetchBytes). With 32
// registers they take two tiles per pass (kTileSpan, tiles_pass), each broadcast of x feeding both.
//   int4: weights 0..15 are VPDPBUSD's unsigned operand, x's codes its signed one.
//   int8: the stored bytes q + 128 are the unsigned operand as they are; a group's int32 sum starts at -128 times
//         the sum of the row's codes in it (q8_gemm makes those once per step: kQ8Reads), which takes the 128 back.
// The integer sums are the avx2 tier's exactly and the fp32 steps after them the same operations in the same
// order, so the two tiers agree bit for bit (tests/layers/test_native_kernels.py checks it).

#pragma once

#include <immintrin.h>

#include "fp32_mm.h"
#include "q4_scales.h"

namespace KV_OPS::avx512 {

// 4 bytes of x's codes broadcast to every int32 lane
inline __m512i codes4(const int8_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }

// An int4 tile's group: its 4 loads unpacked into 8 registers, wv[c] pairing with x's inputs 4c..4c+3 (low nibbles of
// load j are inputs 8j..8j+3, high nibbles 8j+4..8j+7)
inline void q4_group(const uint8_t* wg, __m512i* wv) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const __m512i p = _mm512_loadu_si512(wg + j * 64);
    wv[2 * j] = _mm512_and_si512(p, nibble);
    wv[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(p, 4), nibble);
  }
}

// sums over a group's 32 inputs of w * x for P tiles' 16 rows each (tile u's unpacked group at wv[u]), each from
// `start`: two chains a tile (VPDPBUSD's latency), each broadcast of 4 bytes of x feeding the P tiles
template <int P>
inline void dot32_tiles(const __m512i* const* wv, const int8_t* xg, __m512i start, __m512i* sum) {
  __m512i s0[P], s1[P];
  for (int u = 0; u < P; ++u) {
    s0[u] = start;
    s1[u] = _mm512_setzero_si512();
  }
  for (int c = 0; c < 8; c += 2) {
    const __m512i x0 = codes4(xg + 4 * c), x1 = codes4(xg + 4 * c + 4);
    for (int u = 0; u < P; ++u) {
      s0[u] = _mm512_dpbusd_epi32(s0[u], wv[u][c], x0);
      s1[u] = _mm512_dpbusd_epi32(s1[u], wv[u][c + 1], x1);
    }
  }
  for (int u = 0; u < P; ++u) sum[u] = _mm512_add_epi32(s0[u], s1[u]);
}

// the same for one tile
inline __m512i dot32(const __m512i* wv, const int8_t* xg, __m512i start) {
  __m512i sum;
  dot32_tiles<1>(&wv, xg, start, &sum);
  return sum;
}

inline __m512 q4_dot(const __m512i* wv, const int8_t* xg) {
  return _mm512_cvtepi32_ps(dot32(wv, xg, _mm512_setzero_si512()));
}

// a group's scales for a tile's 16 rows: q4_scales.h
using Lanes = kvengine::lanes::Lanes16;
template <bool Symmetric>
using Q4Scales = kvengine::tiles::Q4Scales<Symmetric, Lanes>;

// an int8 tile's group: 8 loads of the stored bytes q + 128
inline void q8_group(const uint8_t* wg, __m512i* wv) {
  for (int c = 0; c < 8; ++c) wv[c] = _mm512_loadu_si512(wg + c * 64);
}

// one group's step of a row's sums: acc + (sum (q + 128) x - 128 sum x) * da
inline __m512 q8_step(__m512 acc, const __m512i* wv, const int8_t* xg, int32_t start, float da) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot32(wv, xg, _mm512_set1_epi32(start))), _mm512_set1_ps(da), acc);
}

template <bool Symmetric>
void q4_tile_row(const int8_t* xq, const float* da, const float* sx, const uint8_t* wt, const at::Half* dmt,
                 float* y, int64_t G) {
  using S = Q4Scales<Symmetric>;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i wv[8];
    const at::Half* dg = dmt + g * S::kHalves;
    prefetch_q4_group(wt + g * 256, dg, S::kHalves, kPrefetchBytes);
    q4_group(wt + g * 256, wv);
    acc = S(dg, 0).step(acc, q4_dot(wv, xq + g * kGroup), da[g], sx[g]);
  }
  _mm512_storeu_ps(y, acc);
}

// The many-row kernels' sums for a block's R rows and P tiles, in L1, from zero; store() hands them to y through
// F::finish (rows 0..R-1, row stride N, outputs of tiles t..t+P-1)
template <int P>
struct BlockSums {
  alignas(64) float acc[kRows][P][16];  // [row][tile][output]
  explicit BlockSums(int R) {
    for (int i = 0; i < R; ++i)
      for (int u = 0; u < P; ++u) _mm512_store_ps(acc[i][u], _mm512_setzero_ps());
  }
  template <typename F>
  void store(const F& f, float* y, int R, int64_t N, int64_t t) const {
    for (int i = 0; i < R; ++i)
      for (int u = 0; u < P; ++u)
        _mm512_storeu_ps(y + i * N + 16 * (t + u), f.finish(_mm512_load_ps(acc[i][u]), t + u));
  }
};

// The many-row kernels' pass over P consecutive tiles t..t+P-1 (P = 1 or 2) and the R > 1 rows of a block, for a
// weight format F (Q4Pass, Q8Pass): a group's P tiles loaded once (F::load: 8 P registers of weights and what
// else the format reads per group; F::prefetch asks for a later group's, kPassPrefetchBytes ahead), then each
// row's P sums from dot32_tiles, started at F::start and added to the row's sums by F::step; the rows' sums wait
// in L1, and F::finish turns them into y. Two tiles at a time ran 1.14-1.20x (int4) and 1.15-1.24x (int8) faster
// than one at 32 and 256 rows of the 1B shape's matmuls (AMD EPYC Zen 5), the same sums.
template <int P, typename F>
void tiles_pass(const F& f, const int8_t* xq, float* y, int R, int64_t G, int64_t N, int64_t t) {
  BlockSums<P> sums(R);
  auto& acc = sums.acc;
#pragma GCC unroll 1
  for (int64_t g = 0; g < G; ++g) {
    typename F::Group group[P];
    const __m512i* wv[P];
    for (int u = 0; u < P; ++u) {
      f.prefetch(t + u, g);
      f.load(group[u], t + u, g);
      wv[u] = group[u].wv;
    }
    const int64_t s = in_block(0, g, R);  // the group's R rows follow one another (fp32_mm.h's block_slot)
    const int8_t* xg = xq + s * kGroup;
#pragma GCC unroll 1
    for (int i = 0; i < R; ++i) {
      __m512i sum[P];
      dot32_tiles<P>(wv, xg + i * kGroup, f.start(s + i), sum);
      for (int u = 0; u < P; ++u)
        _mm512_store_ps(acc[i][u], f.step(_mm512_load_ps(acc[i][u]), sum[u], group[u], s + i));
    }
  }
  sums.store(f, y, R, N, t);
}

// The int4 format for tiles_pass: a group's unpacked codes and scales; x's scale da and sum sx per block slot
template <bool Symmetric>
struct Q4Pass {
  using S = Q4Scales<Symmetric>;
  struct Group {
    __m512i wv[8];
    S scales;
  };
  const float *da, *sx;
  const uint8_t* w;
  const at::Half* dm;
  int64_t G;
  const uint8_t* codes(int64_t tile, int64_t g) const { return w + (tile * G + g) * 256; }
  const at::Half* scales(int64_t tile, int64_t g) const { return dm + (tile * G + g) * S::kHalves; }
  void prefetch(int64_t tile, int64_t g) const {
    prefetch_q4_group(codes(tile, g), scales(tile, g), S::kHalves, kPassPrefetchBytes);
  }
  void load(Group& group, int64_t tile, int64_t g) const {
    q4_group(codes(tile, g), group.wv);
    group.scales = S(scales(tile, g), 0);
  }
  __m512i start(int64_t) const { return _mm512_setzero_si512(); }
  __m512 step(__m512 acc, __m512i sum, const Group& group, int64_t slot) const {
    return group.scales.step(acc, _mm512_cvtepi32_ps(sum), da[slot], sx[slot]);  // q4_dot's sum
  }
  __m512 finish(__m512 acc, int64_t) const { return acc; }
};

// tiles_pass over the `span` (1 or 2) tiles from t
template <typename F>
void pass_span(const F& f, const int8_t* xq, float* y, int R, int64_t G, int64_t N, int64_t t, int span) {
  if (span == 2) return tiles_pass<2>(f, xq, y, R, G, N, t);
  tiles_pass<1>(f, xq, y, R, G, N, t);
}

template <bool Symmetric>
inline void q4_tile(const int8_t* xq, const float* da, const float* sx, const uint8_t* w, const at::Half* dm, float* y,
                    int R, int64_t K, int64_t N, int64_t t, int span) {
  using S = Q4Scales<Symmetric>;
  const int64_t G = K / kGroup;
  if (R == 1) {
    for (int u = 0; u < span; ++u)
      q4_tile_row<Symmetric>(xq, da, sx, w + (t + u) * G * 256, dm + (t + u) * G * S::kHalves, y + 16 * (t + u), G);
    return;
  }
  pass_span(Q4Pass<Symmetric>{da, sx, w, dm, G}, xq, y, R, G, N, t, span);
}

// what q8_gemm makes for q8_tile (fp32_mm.h's kQ8Reads), and the tiles a many-row pass takes (kTileSpan)
constexpr Q8Reads kReads = Q8Reads::kCodeSums;
constexpr int kSpan = 2;

// one row of x against the int8 tile at wt (its scales at scale): the row's sums in a register, weights asked for
// ahead, as q4_tile_row
inline void q8_tile_row(const int8_t* xq, const int32_t* cs, const float* da, const uint8_t* wt, const float* scale,
                        float* y, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i wv[8];
    prefetch_lines(wt + g * 512, kPrefetchBytes, 8);
    q8_group(wt + g * 512, wv);
    acc = q8_step(acc, wv, xq + g * kGroup, cs[g], da[g]);
  }
  _mm512_storeu_ps(y, _mm512_mul_ps(acc, _mm512_loadu_ps(scale)));
}

// The int8 format for tiles_pass: a group's 8 loads of the stored bytes; each row's sum starts at its -128 * sum of
// codes (kQ8Reads) and steps by x's scale, and the tile's scale multiplies the total at the end (q8_step's sums)
struct Q8Pass {
  struct Group {
    __m512i wv[8];
  };
  const int32_t* code_sums;
  const float *da, *scale;
  const uint8_t* w;
  int64_t K;
  const uint8_t* codes(int64_t tile, int64_t g) const { return w + tile * K * 16 + g * 512; }
  void prefetch(int64_t tile, int64_t g) const { prefetch_lines(codes(tile, g), kPassPrefetchBytes, 8); }
  void load(Group& group, int64_t tile, int64_t g) const { q8_group(codes(tile, g), group.wv); }
  __m512i start(int64_t slot) const { return _mm512_set1_epi32(code_sums[slot]); }
  __m512 step(__m512 acc, __m512i sum, const Group&, int64_t slot) const {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(da[slot]), acc);
  }
  __m512 finish(__m512 acc, int64_t tile) const { return _mm512_mul_ps(acc, _mm512_loadu_ps(scale + 16 * tile)); }
};

inline void q8_tile(const int8_t* xq, const Q8Side& side, const float* da, const uint8_t* w, const float* scale,
                    float* y, int R, int64_t K, int64_t N, int64_t t, int span) {
  const int32_t* cs = side.code_sums;
  if (R == 1) {
    for (int u = 0; u < span; ++u)
      q8_tile_row(xq, cs, da, w + (t + u) * K * 16, scale + 16 * (t + u), y + 16 * (t + u), K / kGroup);
    return;
  }
  pass_span(Q8Pass{cs, da, scale, w, K}, xq, y, R, K / kGroup, N, t, span);
}

}  // namespace KV_OPS::avx512
