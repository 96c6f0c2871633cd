// The avx2 tier's tile kernels (fp32_mm.h), for x86 CPUs with AVX2 and FMA (most laptops, desktops and cloud VMs;
// no AVX-512, no bf16 arithmetic).
//
// Without VPDPBUSD, a 4-byte dot product per int32 lane is VPMADDUBSW (unsigned bytes times signed bytes, adjacent
// pairs summed into int16) then VPMADDWD by ones (adjacent int16 pairs into int32). A 256-bit register holds half
// of a 64-byte tile row block: 8 output rows x 4 inputs, so each half (rows 8h..8h+7) is its own pass over the
// groups: a group's weights are loaded (and, for int4, unpacked) into 8 registers once, then serve every one of
// the pass's R <= kRows (64) rows of x, whose sums wait in a small L1 array (kRows = 4 kept them in registers and
// redid the unpacking every 4 rows: ~20% slower at 32 and more rows); x's codes come group-major (fp32_mm.h's
// block_slot), the int4 kernel takes 4 rows' products at a time, and the first half's pass asks for the tile's
// weights 1 KB ahead (fp32_mm.h's kPassPrefetchBytes).
//   int4: weights 0..15 are the unsigned operand; a group's 8 products per lane stay below 8 * 2 * 15 * 127 =
//         30480, so they are summed in int16 and widened once per group.
//   int8: the stored bytes q + 128 turn back into signed q (xor 0x80); one row's kernel then has VPMADDUBSW take
//         |x| (made once per step by q8_gemm, not per tile) as the unsigned operand and q with x's sign as the
//         signed one (|x| * sign(x) q = x q); the many-row kernel takes |q| (made once per group, read from L1) and
//         x with q's sign, so that each 4 inputs of x are broadcast once rather than twice (x and |x|: on Zen 3 a
//         broadcast takes a vector pipe; 1.06-1.24x at 32 to 256 rows). A pair is at most 2 * 127 * 127, no
//         saturation; the int16 pairs are widened per 4 inputs.
// The integer sums equal vnni_mm.cpp's exactly; the fp32 steps after them are the same operations in the same order.
//
// One row of x (a decode step of one sequence) takes its own kernels: both halves in one pass over the groups, the
// row's sums in registers and each broadcast of x serving both halves, the weights asked for 2 KB ahead and
// non-temporally (fp32_mm.h's Reuse::kOnce: read once a step, they leave the caches to the layer's other reads).
// At one row the many-row loop's stores of each group's sums to L1 and its two passes cost more than its products
// (1.2-1.6x on the model's shapes, AMD EPYC Zen 3). They do the same arithmetic per output in the same order, so a
// row's result does not depend on how many rows it is multiplied with.
//
// The avxvnni tier compiles this same file with -mavxvnni (__AVXVNNI__): AVX-VNNI's 256-bit VPDPBUSD (Alder Lake
// and later, Zen 4 and later) does a lane's 4-byte dot product and its int32 sum in one instruction, in place of
// each VPMADDUBSW / VPADDW / VPMADDWD chain. The sums are the same integers, so the two tiers agree bit for bit.

#include <immintrin.h>

#include "fp32_mm.h"
#include "q4_scales.h"

namespace KV_OPS {
namespace {

// 4 bytes of x's codes broadcast to every int32 lane
inline __m256i codes4(const int8_t* p) { return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }

// Half h (rows 8h..8h+7) of an int4 tile's group g: its 4 loads unpacked into 8 registers, wv[c] pairing with x's
// inputs 4c..4c+3 (low nibbles of load j are inputs 8j..8j+3, high nibbles 8j+4..8j+7).
inline void q4_half(const uint8_t* wg, int h, __m256i* wv) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * 64 + 32 * h));
    wv[2 * j] = _mm256_and_si256(p, nibble);
    wv[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), nibble);
  }
}

// sum over the group's 32 inputs of q * x for the half's 8 rows, as fp32 lanes. `Tree`: the 8 products summed as a
// tree, 3 adds deep instead of a chain of 7 (integers: the order changes nothing, so both forms give the same sums).
// In the many-row kernel, 4 rows' chains in flight, the chain's latency showed: the tree ran 1.03-1.09x (int4 gemms
// of the default and 1B shapes at 32 and 256 rows, AMD EPYC Zen 3, AVX2 only). The one-row kernel, whose two halves
// are already two chains and which waits on its weight reads, keeps the chain (its A/B: 0.88-1.23x; again, whole
// batch-1 decode steps in one process: default model 0.97x, 1B shape 1.0x), and so does the int8 kernel (its sums
// as a tree: 0.97-1.0x). The avxvnni build ignores `Tree`: each VPDPBUSD adds into the sum itself.
template <bool Tree = false>
inline __m256 q4_dot(const __m256i* wv, const int8_t* xg) {
#ifdef __AVXVNNI__
  __m256i s = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) s = _mm256_dpbusd_avx_epi32(s, wv[c], codes4(xg + 4 * c));
  return _mm256_cvtepi32_ps(s);
#else
  if constexpr (Tree) {
    __m256i p[8];
    for (int c = 0; c < 8; ++c) p[c] = _mm256_maddubs_epi16(wv[c], codes4(xg + 4 * c));
    for (int w = 4; w > 0; w /= 2)
      for (int c = 0; c < w; ++c) p[c] = _mm256_add_epi16(p[c], p[c + w]);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p[0], _mm256_set1_epi16(1)));
  }
  __m256i s = _mm256_maddubs_epi16(wv[0], codes4(xg));
  for (int c = 1; c < 8; ++c) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wv[c], codes4(xg + 4 * c)));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(s, _mm256_set1_epi16(1)));
#endif
}

// q4_dot as an object the shared group step (q4_scales.h) calls inline
constexpr auto q4_dot_of = [](const __m256i* wv, const int8_t* xg) { return q4_dot<true>(wv, xg); };

// a group's scales for one half of a tile (its 8 rows) and the many-row group step: q4_scales.h
using Lanes = kvengine::lanes::Lanes8;
template <bool Symmetric>
using Q4Scales = kvengine::tiles::Q4Scales<Symmetric, Lanes>;
using kvengine::tiles::q4_rows;

// Half h of an int8 tile's group g: 8 loads of stored bytes q + 128, back to signed q
inline void q8_half(const uint8_t* wg, int h, __m256i* wv) {
  for (int c = 0; c < 8; ++c)
    wv[c] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * 64 + 32 * h)),
                             _mm256_set1_epi8(static_cast<char>(0x80)));
}

// sum over the group's 32 inputs of q * x (xg the codes, ag their magnitudes) for the half's 8 rows, as int32 lanes
inline __m256i q8_dot(const __m256i* wv, const int8_t* xg, const int8_t* ag) {
  __m256i s = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    const __m256i x4 = codes4(xg + 4 * c), a4 = codes4(ag + 4 * c);
#ifdef __AVXVNNI__
    s = _mm256_dpbusd_avx_epi32(s, a4, _mm256_sign_epi8(wv[c], x4));
#else
    s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(a4, _mm256_sign_epi8(wv[c], x4)),
                                              _mm256_set1_epi16(1)));
#endif
  }
  return s;
}

// The same sums from the weights' magnitudes wa (in L1, made once per group) and x's codes given each weight's sign:
// |q| * (x sign(q)) = q x, one broadcast of x per 4 inputs instead of two (x and |x|).
inline __m256i q8_dot_signed(const __m256i* wv, const __m256i* wa, const int8_t* xg) {
  __m256i s = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    const __m256i xs = _mm256_sign_epi8(codes4(xg + 4 * c), wv[c]);
#ifdef __AVXVNNI__
    s = _mm256_dpbusd_avx_epi32(s, _mm256_load_si256(wa + c), xs);
#else
    s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_load_si256(wa + c), xs),
                                              _mm256_set1_epi16(1)));
#endif
  }
  return s;
}

// one group's step of a row's sums over a half: acc + s * da (the tile's scale multiplies the total at the end)
inline __m256 q8_step(__m256 acc, __m256i s, float da) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(da), acc);
}

// Rows the int4 many-row kernel's group step takes at once (the rest one at a time): 4 ran 1.2-1.35x faster than
// one at a time at 32 and more rows on Zen 3. The int8 kernel's longer chains (a sign, a product and a widening
// per 4 inputs) ran no faster in twos (0.8-1.2x, within noise), so it takes one row at a time.
constexpr int kQ4RowStep = 4;

// The one-row kernels (see the header)
template <bool Symmetric>
void q4_tile_row(const int8_t* xq, const float* da, const float* sx, const uint8_t* wt, const at::Half* dmt,
                 float* y, int64_t G) {
  using S = Q4Scales<Symmetric>;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i w0[8], w1[8];
    const at::Half* dg = dmt + g * S::kHalves;
    prefetch_q4_group<Reuse::kOnce>(wt + g * 256, dg, S::kHalves, kPrefetchBytes);  // a later group's codes, scales
    q4_half(wt + g * 256, 0, w0);
    q4_half(wt + g * 256, 1, w1);
    const int8_t* xg = xq + g * kGroup;
    const __m256 p0 = q4_dot(w0, xg), p1 = q4_dot(w1, xg);  // (the scales converted after: fewer live registers)
    a0 = S(dg, 0).step(a0, p0, da[g], sx[g]);
    a1 = S(dg, 1).step(a1, p1, da[g], sx[g]);
  }
  _mm256_storeu_ps(y, a0);
  _mm256_storeu_ps(y + 8, a1);
}

void q8_tile_row(const int8_t* xq, const int8_t* xa, const float* da, const uint8_t* wt, const float* scale, float* y,
                 int64_t G) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i w0[8], w1[8];
    prefetch_lines<Reuse::kOnce>(wt + g * 512, kPrefetchBytes, 8);
    q8_half(wt + g * 512, 0, w0);
    q8_half(wt + g * 512, 1, w1);
    a0 = q8_step(a0, q8_dot(w0, xq + g * kGroup, xa + g * kGroup), da[g]);
    a1 = q8_step(a1, q8_dot(w1, xq + g * kGroup, xa + g * kGroup), da[g]);
  }
  _mm256_storeu_ps(y, _mm256_mul_ps(a0, _mm256_loadu_ps(scale)));
  _mm256_storeu_ps(y + 8, _mm256_mul_ps(a1, _mm256_loadu_ps(scale + 8)));
}

// one tile (q4_tile takes them one at a time)
template <bool Symmetric>
void q4_one(const int8_t* xq, const float* da, const float* sx, const uint8_t* w, const at::Half* dm, float* y, int R,
            int64_t K, int64_t N, int64_t t) {
  using S = Q4Scales<Symmetric>;
  const int64_t G = K / kGroup;
  const uint8_t* wt = w + t * G * 256;
  const at::Half* dmt = dm + t * G * S::kHalves;
  if (R == 1) return q4_tile_row<Symmetric>(xq, da, sx, wt, dmt, y + 16 * t, G);
  alignas(32) float acc[kRows][8];  // one half's sums for each row, in L1: a group unpacked once serves all R rows
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < R; ++i) _mm256_store_ps(acc[i], _mm256_setzero_ps());
#pragma GCC unroll 1  // unrolled, GCC keeps two groups' weights and spills them (1.2x slower on Zen 3)
    for (int64_t g = 0; g < G; ++g) {
      __m256i wv[8];
      if (h == 0) prefetch_q4_group(wt + g * 256, dmt + g * S::kHalves, S::kHalves, kPassPrefetchBytes);
      q4_half(wt + g * 256, h, wv);
      const S sc(dmt + g * S::kHalves, h);
      const int64_t s = in_block(0, g, R);  // the group's R rows follow one another (fp32_mm.h's block_slot)
      const int8_t* xg = xq + s * kGroup;
      const float *dag = da + s, *sxg = sx + s;
      int i = 0;
#pragma GCC unroll 1
      for (; i + kQ4RowStep <= R; i += kQ4RowStep)
        q4_rows<kQ4RowStep, Lanes>(wv, xg + i * kGroup, kGroup, dag + i, sxg + i, sc, acc + i, q4_dot_of);
      for (; i < R; ++i) q4_rows<1, Lanes>(wv, xg + i * kGroup, kGroup, dag + i, sxg + i, sc, acc + i, q4_dot_of);
    }
    for (int i = 0; i < R; ++i) _mm256_storeu_ps(y + i * N + 16 * t + 8 * h, _mm256_load_ps(acc[i]));
  }
}

// one int8 tile (q8_tile takes them one at a time). Its passes repeat q4_one's around a different group step; one
// template taking both steps as lambdas gave the same results but ran the int4 gemms 0.93-0.99x (32 and 1,024 rows
// of the default and 1B shapes, old and new alternating in one process, AMD EPYC Zen 3), so each keeps its loop.
void q8_one(const int8_t* xq, const Q8Side& side, const float* da, const uint8_t* w, const float* scale, float* y,
            int R, int64_t K, int64_t N, int64_t t) {
  const int64_t G = K / kGroup;
  const int8_t* xa = side.magnitudes;
  const uint8_t* wt = w + t * K * 16;
  if (R == 1) return q8_tile_row(xq, xa, da, wt, scale + 16 * t, y + 16 * t, G);
  alignas(32) float acc[kRows][8];  // as in q4_tile
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < R; ++i) _mm256_store_ps(acc[i], _mm256_setzero_ps());
#pragma GCC unroll 1
    for (int64_t g = 0; g < G; ++g) {
      __m256i wv[8];
      if (h == 0) prefetch_lines(wt + g * 512, kPassPrefetchBytes, 8);
      q8_half(wt + g * 512, h, wv);
      alignas(32) __m256i wa[8];
      for (int c = 0; c < 8; ++c) wa[c] = _mm256_abs_epi8(wv[c]);
      const int64_t s = in_block(0, g, R);
      const int8_t* xg = xq + s * kGroup;
      const float* dag = da + s;
#pragma GCC unroll 1
      for (int i = 0; i < R; ++i)
        _mm256_store_ps(acc[i], q8_step(_mm256_load_ps(acc[i]), q8_dot_signed(wv, wa, xg + i * kGroup), dag[i]));
    }
    const __m256 sc = _mm256_loadu_ps(scale + 16 * t + 8 * h);
    for (int i = 0; i < R; ++i) _mm256_storeu_ps(y + i * N + 16 * t + 8 * h, _mm256_mul_ps(_mm256_load_ps(acc[i]), sc));
  }
}

}  // namespace

KV_TILES_ONE_AT_A_TIME

const Q8Reads kQ8Reads = Q8Reads::kMagnitudes;

}  // namespace KV_OPS
