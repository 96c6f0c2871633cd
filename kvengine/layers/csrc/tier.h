// What every kernel tier shares: the op namespace of the tier being compiled, and the loop that hands (weight tile,
// block of rows of x) pairs to threads.
//
// native.py compiles each tier (avx512, avx2, portable) into its own extension with its own flags and passes
// -DKV_OPS=kvengine_<tier>, so the tiers' ops live side by side in one process (torch.ops.kvengine_avx2.q4_gemm,
// ...): the run uses the one chosen from the CPU's flags, and the tests run every tier the CPU can.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#ifndef KV_OPS
#define KV_OPS kvengine_dev
#endif
// TORCH_LIBRARY pastes its namespace argument as a token; one more macro level expands KV_OPS first
#define KV_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define KV_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define KV_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

// The ops every tier registers, each under its own namespace, with one schema
namespace kvengine::schema {
constexpr const char* kQ4Gemm = "q4_gemm(Tensor x, Tensor w, Tensor dm) -> Tensor";
constexpr const char* kQ8Gemm = "q8_gemm(Tensor x, Tensor w, Tensor scale) -> Tensor";
constexpr const char* kDecodeLayer =
    "decode_layer(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slots, Tensor seq, Tensor lens, int num_heads, int num_kv_heads, float eps, float scale) -> Tensor";
constexpr const char* kDecodeLayers =
    "decode_layers(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!)[] k_caches, "
    "Tensor(b!)[] v_caches, Tensor slots, Tensor seq, Tensor lens, int num_heads, int num_kv_heads, float eps, "
    "float scale) -> Tensor";
}  // namespace kvengine::schema

// What decode_layer's attention hands a tier's attend_tile (layer_flow.h): one kv head's attention for a tile of
// at most kTileRows rows of one sequence. Query head g of row r (g < group) is q[r * q_stride + g * D ..]; it reads
// the first lens[r] of the sequence's `slots` in the head's caches k, v ([slots, D] rows of C: the activations' T,
// or on the fp32 tiers a narrower bf16 / fp16 cache); its result goes to out[r * out_stride + g * D ..].
namespace kvengine::layer {
constexpr int64_t kTileRows = 16;
constexpr int64_t kKeyBlock = 64;  // keys an attend_tile pass takes at a time (kept in L1 for the tile's queries)
// Rows of the MLP block computed at a time (layer_flow.h). A prompt's rows all at once made gate_up [M, 2I] and
// act [M, I] bigger than glibc's largest mmap threshold (32 MiB), so each was mapped, zeroed by the kernel page by
// page and unmapped again, every layer: 1,024 rows of a 1B Llama shape (I = 8,192) spent ~0.3 s of a 2.1 s
// prefill in page faults. 256 rows keep a block's gate_up at 16 MiB for that shape, taken from the heap again.
constexpr int64_t kMlpRows = 256;

template <typename T, typename C = T>
struct AttendTile {
  const T* q;
  int64_t q_stride, r0, r1, group;
  const C *k, *v;
  const int64_t *slots, *lens;
  int64_t D;
  float scale;
  T* out;
  int64_t out_stride;
};
}  // namespace kvengine::layer

// The weight operands every tier's q4_gemm / q8_gemm take (the 16-row tile layouts of native.py), for x of K
// columns; each returns the number of 16-row tiles.
namespace kvengine::operands {
// `symmetric`, where the caller's kernels take that form: set to whether dm holds scales only, [N/16, K/32, 16] for
// weights on GGUF Q4_0's grid (w = (q - 8) d), rather than scales and minimums.
inline int64_t q4_tiles(const at::Tensor& w, const at::Tensor& dm, int64_t K, bool* symmetric = nullptr) {
  const int64_t G = K / 32;
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) == G && w.size(2) == 4 &&
                  w.size(3) == 64, "q4_gemm: w must be [N/16, K/32, 4, 64] uint8");
  const int64_t scales = w.size(0) * G * 16;  // one per output and group
  const bool scales_only = symmetric != nullptr && dm.numel() == scales;
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && (scales_only || dm.numel() == 2 * scales),
              "q4_gemm: dm must be [N/16, K/32, 2, 16] float16",
              symmetric ? " (or [N/16, K/32, 16]: the scales of symmetric weights)" : "");
  if (symmetric) *symmetric = scales_only;
  return w.size(0);
}

inline int64_t q8_tiles(const at::Tensor& w, const at::Tensor& scale, int64_t K) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) == K / 4 &&
                  w.size(2) == 64, "q8_gemm: w must be [N/16, K/4, 64] uint8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == 16 * w.size(0),
              "q8_gemm: scale must be [N] float32");
  return w.size(0);
}
}  // namespace kvengine::operands

namespace kvengine {
// Loops over rows whose work is fewer values than this run on the calling thread (at::parallel_for's grain): a
// parallel region's start and end cost more than the other thread saved. SmolLM2's 32-row decode layer (2 threads)
// ran 1.05x (avx2) and 1.07x (avx512vnni) faster with its norms, rotations and x's quantization on one thread.
constexpr int64_t kParallelValues = int64_t{1} << 15;
// the grain for items of `values` values each
inline int64_t grain_for(int64_t values) {
  return std::max<int64_t>(1, kParallelValues / std::max<int64_t>(1, values));
}
}  // namespace kvengine

namespace kvengine::tiles {

// Rows of x taken kChunk at a time, so their int8 codes stay in cache while every weight tile passes over them.
// The (chunk, tile) items, in that order, are cut into one run per thread holding an equal share of rows x tiles (an
// item weighs its chunk's rows). Cut by the items' number, a last chunk of few rows left one thread more of the work
// (100 rows: 64 against 36; 131 rows: 2.7x the other's); weighed, prefills of 100 and 200 tokens ran 1.17-1.32x (1B
// shape) and 1.08-1.22x (SmolLM2) faster on avx512vnni, 1.20-1.34x and 1.12-1.37x held to AVX2 (AMD EPYC Zen 5, 2
// threads).
// Each run is cut into kPiecesPerThread pieces. A thread takes its own run's pieces in order, then the pieces of the
// others' runs that they have not started, so a thread slowed by a shared core or woken late no longer holds the
// other at the barrier. SmolLM2's 32 x 64 decodes, old and new kernels alternating in one process (AMD EPYC Zen 3,
// AVX2 only, 2 threads): with another busy process on one of the two cores, a decode step took 99 ms against 162
// (medians; rounds 0.93-2.05x); on idle cores 1.00x (0.95-1.05), the 1B shape's batch-1 decode too. Its own pieces
// first keep each thread's weight reads one stream, as a batch-1 decode wants (any piece, first come first served:
// 0.96x).
// f(t, i0, rows) for each of a piece's blocks of up to kRows rows, the tile's weights in cache. Which thread computes
// a block changes nothing in its result.
constexpr int64_t kChunk = 64;
constexpr int64_t kPiecesPerThread = 8;

template <int kRows, typename F>
void for_tiles(int64_t M, int64_t tiles, const F& f) {
  static_assert(kChunk % kRows == 0, "a block of rows starts at a multiple of kRows (fp32_mm.h's block_slot)");
  const int64_t chunks = (M + kChunk - 1) / kChunk, work = M * tiles;
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks * tiles));
  const int64_t pieces = std::max(runs, std::min(runs * kPiecesPerThread, chunks * tiles));
  const auto piece = [&](int64_t k) {
    const int64_t w0 = work * k / pieces, w1 = work * (k + 1) / pieces;  // this piece's share of rows x tiles
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t first = c * kChunk, rows = std::min(kChunk, M - first), base = first * tiles;
      // the tiles whose item starts (base + t * rows) lie in [w0, w1)
      const auto from = [&](int64_t w) { return std::min(tiles, (std::max<int64_t>(0, w - base) + rows - 1) / rows); };
      const int64_t end = first + rows, t1 = from(w1);
      for (int64_t t = from(w0); t < t1; ++t)
        for (int64_t i0 = first; i0 < end; i0 += kRows) f(t, i0, std::min<int64_t>(kRows, end - i0));
    }
  };
  // run v holds pieces pieces * v / runs .. pieces * (v + 1) / runs - 1; taken[v] of them are taken
  std::unique_ptr<std::atomic<int64_t>[]> taken(new std::atomic<int64_t>[runs]);
  for (int64_t v = 0; v < runs; ++v) taken[v] = 0;
  const auto take = [&](int64_t v) {
    const int64_t first = pieces * v / runs, count = pieces * (v + 1) / runs - first;
    for (int64_t i = taken[v]++; i < count; i = taken[v]++) piece(first + i);
  };
  at::parallel_for(0, runs, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t v = k0; v < k1; ++v) take(v);
    for (int64_t d = 1; d < runs; ++d) take((k0 + d) % runs);
  });
}

}  // namespace kvengine::tiles
