// The fp32-activation tiers (avx2, portable): the tile kernels each tier's *_tiles.cpp defines, and the ops
// fp32_mm.cpp builds from them (fp32_layer.cpp calls those without going through the dispatcher).
//
// The operands are vnni_mm.cpp's: x quantized to int8 codes in groups of 32 (scale da = max|x| / 127, sum
// sx = da * sum(codes)), weights in native.tile_int4 / native.tile_int8's tiles of 16 output rows, so a model
// quantized once runs on any tier. Only the activations differ: fp32 in and out, for CPUs without bf16
// arithmetic (a bf16 product there is emulated, several times slower than fp32).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "tier.h"

namespace KV_OPS {

constexpr int64_t kGroup = 32;
constexpr float kQ4Midpoint = 8.f;  // the code of a zero weight in symmetric int4 (native.INT4_MIDPOINT)
constexpr int32_t kQ8Offset = 128;  // int8 weights are stored as q + 128 (native.tile_int8)
// rows of x per pass over a weight tile (the tile kernels take 1..kRows); on Zen 3 32 ran 1-5% faster than 16, and
// 64 2-4% faster than 32 at 64 and more rows once x's blocks were group-major
constexpr int kRows = 64;

// Where quantize_rows puts row i's group g of x [M, K] (G = K / 32 groups a row): the rows are taken in for_tiles'
// blocks of kRows, and a block of R rows is stored group-major, [G, R, 32] codes and [G, R] scales and sums, so the
// tile kernels read one group of all R rows as one run of R * 32 bytes (row-major, K = 8,192 put a group's rows
// 8 KB apart, all in the same L1 sets: 1.1-1.2x slower on Zen 3). Codes start at slot * 32, scale and sum at slot.
// in_block is the slot within a block (row i of its R rows): what the tile kernels, given a block, read.
inline int64_t in_block(int64_t i, int64_t g, int64_t R) { return g * R + i; }
// Codes quantize_rows leaves readable past x's last: the amx tier's tile loads take a group's rows 16 at a time,
// those past a block's end too (multiplied and dropped)
constexpr int64_t kCodePadding = 16 * kGroup;

inline int64_t block_slot(int64_t i, int64_t g, int64_t M, int64_t G) {
  const int64_t i0 = i / kRows * kRows, R = std::min<int64_t>(kRows, M - i0);
  return i0 * G + in_block(i - i0, g, R);
}

// The one-row tile kernels ask for the weights this far ahead of the group they read: a decode step of one sequence
// streams every weight once, and the hardware prefetcher alone left ~2/3 of the machine's read bandwidth unused
// (measured on an AMD EPYC Zen 3 with 2 threads: 1024 B ahead 1.2x, 2048 B 1.3-1.6x, 4096 and 8192 B no better; on
// an Intel Xeon with AVX-512, 4096 B was no better either).
constexpr int64_t kPrefetchBytes = 2048;

// The many-row tile kernels ask for a tile's weights this far ahead of the group they unpack. A group serves every
// row of the block before the next one is read, so the out-of-order core does not reach the next group's loads in
// time, and a step of a few dozen rows (32 concurrent decodes) streams each weight once from memory. 1B Llama
// shape, Q4_0, 2 threads, AMD EPYC Zen 5, against no prefetch: 32 x 64 decodes 1.03-1.08x (avx512vnni) and
// 1.06-1.08x (avx2), the 128,256-row LM head at 32 rows 1.05-1.08x on both, a 1,024-token prefill 1.00x; 512,
// 2048 and 4096 bytes ahead ran within noise of 1024.
constexpr int64_t kPassPrefetchBytes = 1024;

// How often a kernel reads the weight lines it asks for ahead:
//   kReused  more than once (the many-row kernels' two passes over a tile): into every cache level;
//   kOnce    once in the whole step (the one-row kernels of a batch-1 decode): non-temporally (PREFETCHNTA), so the
//            stream of weights does not push out of the caches what the layer reads between its matrix products
//            (the KV cache, x, the activations). SmolLM2's batch-1 decode on the avx2 tier, base and changed
//            kernels alternating in separate processes, 12 runs each: 1.17x (164 -> 193 tok/s, medians; the
//            layer's attention 16 -> 11 us, its norms and rotations ~1.5x), the 1B shape's 1.02x (bound by the
//            weights' reads); AMD EPYC Zen 3, AVX2 only, 2 threads. (Not measured on an AVX-512 host: its
//            one-row kernels keep kReused.)
enum class Reuse { kReused, kOnce };

// the `lines` cache lines `ahead` bytes past p
template <Reuse R = Reuse::kReused>
inline void prefetch_lines(const void* p, int64_t ahead, int lines) {
  constexpr int locality = R == Reuse::kOnce ? 0 : 3;
  for (int l = 0; l < lines; ++l) __builtin_prefetch(static_cast<const char*>(p) + ahead + 64 * l, 0, locality);
}

// an int4 tile's group `ahead` bytes on from the one at wg (its 256 bytes of codes) and the same group's scales
// (`halves` fp16 values a group, from dg)
template <Reuse R = Reuse::kReused>
inline void prefetch_q4_group(const uint8_t* wg, const at::Half* dg, int64_t halves, int64_t ahead) {
  prefetch_lines<R>(wg, ahead, 4);
  prefetch_lines<R>(dg, ahead / 256 * 2 * halves, 1);
}

// Rows 0..R-1 of y (row stride N), outputs 16t..16t+15, from the int4 tile t: for each group g,
// y[i, n] += d[n, g] * da[i, g] * sum_k q * xq[i, k] + m[n, g] * sx[i, g], with x's block of R rows as block_slot
// lays it out (row i's group g at in_block(i, g, R): codes at that * 32, da and sx at that). `Symmetric`: dm holds
// the scales d alone (32 bytes a tile and group, not 64) and m = -8 d (GGUF Q4_0's grid); q4_gemm then passes
// sx = -8 da * sum(codes), and a group's step is y[i, n] += d[n, g] * (da[i, g] * sum_k q * xq[i, k] + sx[i, g]).
// Each tier defines it and instantiates both forms (KV_Q4_TILE_FORMS); q4_gemm picks one per matmul. It computes
// the `span` tiles t..t+span-1, span being 1 or the tier's kTileSpan.
template <bool Symmetric>
void q4_tile(const int8_t* xq, const float* da, const float* sx, const uint8_t* w, const at::Half* dm, float* y, int R,
             int64_t K, int64_t N, int64_t t, int span);
#define KV_Q4_TILE_FORMS                                                                                            \
  template void q4_tile<true>(const int8_t*, const float*, const float*, const uint8_t*, const at::Half*, float*, int, \
                              int64_t, int64_t, int64_t, int);                                                      \
  template void q4_tile<false>(const int8_t*, const float*, const float*, const uint8_t*, const at::Half*, float*,    \
                               int, int64_t, int64_t, int64_t, int);

// What a tier's q8_tile reads of x besides its codes and scales, made by q8_gemm once per matmul rather than once per
// tile (kQ8Reads, set by the tier's *_tiles.cpp): avx2 the codes' magnitudes |xq| (its byte products' unsigned
// operand; int8, laid out as the codes), avx512vnni -kQ8Offset times the sum of each group's codes (the start of
// its VPDPBUSD sums of the stored bytes q + 128; int32, laid out as the scales), portable nothing. Unread ones are
// null.
enum class Q8Reads { kNothing, kMagnitudes, kCodeSums };
extern const Q8Reads kQ8Reads;
struct Q8Side {
  const int8_t* magnitudes;
  const int32_t* code_sums;
};
// The same from the int8 tile t (bytes q + 128): y[i, n] = scale[n] * sum_g da[i, g] * sum_k q * xq[i, k].
// Like q4_tile, it computes the `span` tiles t..t+span-1.
void q8_tile(const int8_t* xq, const Q8Side& side, const float* da, const uint8_t* w, const float* scale, float* y,
             int R, int64_t K, int64_t N, int64_t t, int span);

// Weight tiles a tier's q4_tile and q8_tile take in one pass over a block of rows (set by its *_tiles.cpp):
// avx512vnni 2, so that each broadcast of 4 bytes of x feeds two tiles' VPDPBUSD (their weights in 16 of the 32
// registers), avx2 and portable 1 (AVX2's 16 registers hold one tile's half). The gemms pass it where the tiles
// divide by it (tile_span).
extern const int kTileSpan;
inline int tile_span(int64_t tiles) { return tiles % kTileSpan == 0 ? kTileSpan : 1; }
// q4_tile, q8_tile and kTileSpan for a tier whose passes take one tile: its one-tile kernels q4_one<Symmetric> and
// q8_one (the operands of q4_tile and q8_tile but span) for each tile in turn
#define KV_TILES_ONE_AT_A_TIME                                                                                      \
  template <bool Symmetric>                                                                                         \
  void q4_tile(const int8_t* xq, const float* da, const float* sx, const uint8_t* w, const at::Half* dm, float* y,  \
               int R, int64_t K, int64_t N, int64_t t, int span) {                                                  \
    for (int u = 0; u < span; ++u) q4_one<Symmetric>(xq, da, sx, w, dm, y, R, K, N, t + u);                         \
  }                                                                                                                 \
  KV_Q4_TILE_FORMS                                                                                                  \
  void q8_tile(const int8_t* xq, const Q8Side& side, const float* da, const uint8_t* w, const float* scale,         \
               float* y, int R, int64_t K, int64_t N, int64_t t, int span) {                                        \
    for (int u = 0; u < span; ++u) q8_one(xq, side, da, w, scale, y, R, K, N, t + u);                               \
  }                                                                                                                 \
  const int kTileSpan = 1;

// x [M, K] fp32, w [N/16, K/32, 4, 64] uint8 (native.tile_int4), dm [N/16, K/32, 2, 16] or, for symmetric weights,
// [N/16, K/32, 16] fp16 (native.tile_int4_scales) -> [M, N] fp32
at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dm);
// x [M, K] fp32, w [N/16, K/4, 64] uint8 (native.tile_int8), scale [N] fp32 -> [M, N] fp32
at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);

}  // namespace KV_OPS
