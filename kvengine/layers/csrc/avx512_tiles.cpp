// The avx512vnni tier's tile kernels (fp32_mm.h), for x86 CPUs with AVX-512 and VNNI but no bf16 arithmetic
// (Intel Cascade Lake, Ice Lake, and the cloud VMs that show a newer Xeon as one of them): fp32 activations, as the
// avx2 tier, with 512-bit registers.
//
// A 512-bit register holds a whole 64-byte tile row block (16 output rows x 4 inputs), so one VPDPBUSD against 4
// bytes of x broadcast to every lane (from memory: the load port does the broadcast) advances all 16 outputs of a
// tile by 4 inputs: no halves, half the instructions of the avx2 tier's VPMADDUBSW / VPMADDWD chains, a quarter of
// their products' instructions. The loops are the avx2 tier's: the one-row kernels keep the row's sums in a
// register and ask for the weights 2 KB ahead; the many-row kernels unpack a group once for all R <= kRows rows of
// x, whose sums wait in L1. With 32 registers they take two tiles per pass (kTileSpan), each broadcast of x
// feeding both.
//   int4: weights 0..15 are VPDPBUSD's unsigned operand, x's codes its signed one.
//   int8: the stored bytes q + 128 are the unsigned operand as they are; a group's int32 sum starts at -128 times
//         the sum of the row's codes in it (q8_gemm makes those once per step: kQ8Reads), which takes the 128 back.
// The integer sums are the avx2 tier's exactly and the fp32 steps after them the same operations in the same
// order, so the two tiers agree bit for bit (tests/layers/test_native_kernels.py checks it).

#include <immintrin.h>

#include "fp32_mm.h"
#include "q4_scales.h"

namespace KV_OPS {
namespace {

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

// sum over a group's 32 inputs of w * x for the tile's 16 rows, from `start` (two chains: VPDPBUSD's latency)
inline __m512i dot32(const __m512i* wv, const int8_t* xg, __m512i start) {
  __m512i s0 = _mm512_dpbusd_epi32(start, wv[0], codes4(xg));
  __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[1], codes4(xg + 4));
  for (int c = 2; c < 8; c += 2) {
    s0 = _mm512_dpbusd_epi32(s0, wv[c], codes4(xg + 4 * c));
    s1 = _mm512_dpbusd_epi32(s1, wv[c + 1], codes4(xg + 4 * c + 4));
  }
  return _mm512_add_epi32(s0, s1);
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
    prefetch_lines(wt + g * 256, kPrefetchBytes, 4);
    prefetch_lines(dg, kPrefetchBytes / 256 * 2 * S::kHalves, 1);
    q4_group(wt + g * 256, wv);
    acc = S(dg, 0).step(acc, q4_dot(wv, xq + g * kGroup), da[g], sx[g]);
  }
  _mm512_storeu_ps(y, acc);
}

// The many-row kernel over P consecutive tiles t..t+P-1 (P = 1 or 2) and R > 1 rows of a block: a group's P tiles
// unpacked once into 8 P registers, then for each row every broadcast of 4 bytes of x feeds the P tiles' VPDPBUSD
// (two chains a tile: its latency); the rows' sums wait in L1. Two tiles at a time ran 1.14-1.20x faster than one at
// 32 and 256 rows of the 1B shape's matmuls (AMD EPYC Zen 5), the same sums.
template <bool Symmetric, int P>
void q4_pass(const int8_t* xq, const float* da, const float* sx, const uint8_t* w, const at::Half* dm, float* y, int R,
             int64_t K, int64_t N, int64_t t) {
  using S = Q4Scales<Symmetric>;
  const int64_t G = K / kGroup;
  alignas(64) float acc[kRows][P][16];  // [row][tile][output]
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < P; ++u) _mm512_store_ps(acc[i][u], _mm512_setzero_ps());
#pragma GCC unroll 1
  for (int64_t g = 0; g < G; ++g) {
    __m512i wv[P][8];
    S sc[P];
    for (int u = 0; u < P; ++u) {
      q4_group(w + ((t + u) * G + g) * 256, wv[u]);
      sc[u] = S(dm + ((t + u) * G + g) * S::kHalves, 0);
    }
    const int64_t s = in_block(0, g, R);  // the group's R rows follow one another (fp32_mm.h's block_slot)
    const int8_t* xg = xq + s * kGroup;
    const float *dag = da + s, *sxg = sx + s;
#pragma GCC unroll 1
    for (int i = 0; i < R; ++i) {
      const int8_t* xr = xg + i * kGroup;
      __m512i sum[P][2];
      for (int u = 0; u < P; ++u) sum[u][0] = sum[u][1] = _mm512_setzero_si512();
      for (int c = 0; c < 8; c += 2) {
        const __m512i x0 = codes4(xr + 4 * c), x1 = codes4(xr + 4 * c + 4);
        for (int u = 0; u < P; ++u) {
          sum[u][0] = _mm512_dpbusd_epi32(sum[u][0], wv[u][c], x0);
          sum[u][1] = _mm512_dpbusd_epi32(sum[u][1], wv[u][c + 1], x1);
        }
      }
      for (int u = 0; u < P; ++u) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(sum[u][0], sum[u][1]));  // dot32's sum
        _mm512_store_ps(acc[i][u], sc[u].step(_mm512_load_ps(acc[i][u]), dot, dag[i], sxg[i]));
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < P; ++u) _mm512_storeu_ps(y + i * N + 16 * (t + u), _mm512_load_ps(acc[i][u]));
}

}  // namespace

template <bool Symmetric>
void q4_tile(const int8_t* xq, const float* da, const float* sx, const uint8_t* w, const at::Half* dm, float* y, int R,
             int64_t K, int64_t N, int64_t t, int span) {
  using S = Q4Scales<Symmetric>;
  const int64_t G = K / kGroup;
  if (R == 1) {
    for (int u = 0; u < span; ++u)
      q4_tile_row<Symmetric>(xq, da, sx, w + (t + u) * G * 256, dm + (t + u) * G * S::kHalves, y + 16 * (t + u), G);
    return;
  }
  if (span == 2) return q4_pass<Symmetric, 2>(xq, da, sx, w, dm, y, R, K, N, t);
  q4_pass<Symmetric, 1>(xq, da, sx, w, dm, y, R, K, N, t);
}
KV_Q4_TILE_FORMS


const Q8Reads kQ8Reads = Q8Reads::kCodeSums;
const int kTileSpan = 2;

namespace {

// one row of x against the int8 tile at wt (its scales at scale): the row's sums in a register, weights asked for
// ahead, as q4_tile_row
void q8_tile_row(const int8_t* xq, const int32_t* cs, const float* da, const uint8_t* wt, const float* scale, float* y,
                 int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i wv[8];
    prefetch_lines(wt + g * 512, kPrefetchBytes, 8);
    q8_group(wt + g * 512, wv);
    acc = q8_step(acc, wv, xq + g * kGroup, cs[g], da[g]);
  }
  _mm512_storeu_ps(y, _mm512_mul_ps(acc, _mm512_loadu_ps(scale)));
}

// The many-row int8 kernel over P consecutive tiles t..t+P-1 (P = 1 or 2), as q4_pass: a group's P tiles in 8 P
// registers, each broadcast of 4 bytes of x feeding the P tiles' VPDPBUSD, the rows' sums in L1; each sum starts
// at the row's -128 * sum of codes (kQ8Reads). Two tiles ran 1.15-1.24x faster than one at 32 and 256 rows (AMD
// EPYC Zen 5), the same sums.
template <int P>
void q8_pass(const int8_t* xq, const int32_t* cs, const float* da, const uint8_t* w, const float* scale, float* y,
             int R, int64_t K, int64_t N, int64_t t) {
  const int64_t G = K / kGroup;
  alignas(64) float acc[kRows][P][16];  // [row][tile][output]
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < P; ++u) _mm512_store_ps(acc[i][u], _mm512_setzero_ps());
#pragma GCC unroll 1
  for (int64_t g = 0; g < G; ++g) {
    __m512i wv[P][8];
    for (int u = 0; u < P; ++u) q8_group(w + (t + u) * K * 16 + g * 512, wv[u]);
    const int64_t s = in_block(0, g, R);
    const int8_t* xg = xq + s * kGroup;
#pragma GCC unroll 1
    for (int i = 0; i < R; ++i) {
      const int8_t* xr = xg + i * kGroup;
      __m512i sum[P][2];
      for (int u = 0; u < P; ++u) {
        sum[u][0] = _mm512_set1_epi32(cs[s + i]);
        sum[u][1] = _mm512_setzero_si512();
      }
      for (int c = 0; c < 8; c += 2) {
        const __m512i x0 = codes4(xr + 4 * c), x1 = codes4(xr + 4 * c + 4);
        for (int u = 0; u < P; ++u) {
          sum[u][0] = _mm512_dpbusd_epi32(sum[u][0], wv[u][c], x0);
          sum[u][1] = _mm512_dpbusd_epi32(sum[u][1], wv[u][c + 1], x1);
        }
      }
      const __m512 d = _mm512_set1_ps(da[s + i]);
      for (int u = 0; u < P; ++u) {  // q8_step's sum and step
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(sum[u][0], sum[u][1]));
        _mm512_store_ps(acc[i][u], _mm512_fmadd_ps(dot, d, _mm512_load_ps(acc[i][u])));
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < P; ++u)
      _mm512_storeu_ps(y + i * N + 16 * (t + u),
                       _mm512_mul_ps(_mm512_load_ps(acc[i][u]), _mm512_loadu_ps(scale + 16 * (t + u))));
}

}  // namespace

void q8_tile(const int8_t* xq, const Q8Side& side, const float* da, const uint8_t* w, const float* scale, float* y,
             int R, int64_t K, int64_t N, int64_t t, int span) {
  const int32_t* cs = side.code_sums;
  if (R == 1) {
    for (int u = 0; u < span; ++u)
      q8_tile_row(xq, cs, da, w + (t + u) * K * 16, scale + 16 * (t + u), y + 16 * (t + u), K / kGroup);
    return;
  }
  if (span == 2) return q8_pass<2>(xq, cs, da, w, scale, y, R, K, N, t);
  q8_pass<1>(xq, cs, da, w, scale, y, R, K, N, t);
}

}  // namespace KV_OPS
