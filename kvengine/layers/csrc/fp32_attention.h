// The fp32 tiers' attention: attend_tile for fp32_layer.cpp (one kv head, a tile of rows of one sequence; tier.h's
// AttendTile). Included by fp32_layer.cpp only, inside its namespace (each tier's copy is compiled with that tier's
// flags).
//
// softmax(q.k * scale) . v for each query head of each row, in three passes over the tile:
//   scores  keys taken 64 at a time, each block serving every query of the tile while it is in L1; a query's
//           scores W keys at a time, W the lanes of the tier's widest registers (16 with AVX-512 where D is a
//           multiple of 16, else 8): per key, D/W fused multiply-adds in W lanes, then the W keys' lanes folded
//           into one register of W scores (lanes.h's fold);
//   softmax per query, W lanes at a time: the max, e^(s - max) (lanes.h's exp), their sum in W lanes then reduced;
//   values  key blocks outermost again, each block serving every query of the tile; a row's query heads together
//           (up to 4 with AVX-512, 2 with AVX2), sharing each value row's loads; per query, the sum over its keys in
//           order of weight x value row, 64 columns (32 with AVX2) in registers at a time. For a tile of few rows
//           (a decode step's), whose keys and values come from memory once, the rows a few keys ahead are
//           prefetched.
// Every number a query gets depends only on its own q and keys: not on the tile's other rows, nor on how many
// there are. So a token attends alike in a decode step, in a long prefill and in the no-cache recomputation,
// which is what keeps cached and uncached tokens identical. Keys past a query's length are computed in its last
// group of W (reading a real key) and dropped.
//
// Without AVX2 (the portable tier), or for a head_dim that is not a multiple of 8, each query runs attend_head: the
// same three passes as plain loops the compiler vectorizes.
//
// The caches hold C: fp32, or bf16 / fp16 (half the bytes a token). A narrow cache's values are widened to fp32
// exactly: in registers as a tile of few rows loads them, or a block of kKeyBlock keys at a time into a buffer that
// all queries of a tile of many rows read (as_f32). The arithmetic after is the same either way, so a query's
// numbers do not depend on which, and equal an fp32 cache's holding the same (rounded) keys and values.
#pragma once

// A cache row of D values as fp32: an fp32 cache's own row, else the row widened into `buf` (a bf16 value is the top
// half of an fp32's bits; an fp16 one is F16C's conversion where the tier has it). Both are exact.
template <typename C>
inline const float* as_f32(const C* row, int64_t D, float* buf) {
  if constexpr (std::is_same_v<C, float>) {
    return row;
  } else {
    int64_t c = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; c + 8 <= D; c += 8) kvengine::lanes::Lanes8::store(buf + c, kvengine::lanes::Lanes8::load(row + c));
#endif
    for (; c < D; ++c) buf[c] = static_cast<float>(row[c]);
    return buf;
  }
}

// the bytes of `n` values of C from `p` asked for into L1
template <typename C>
inline void prefetch_values(const C* p, int64_t n) {
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(C)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 0, 3);
}

// One query head against the keys at `slots`: softmax(q.k * scale) . v. k, v point at the head's [slots, D] rows.
template <typename C>
void attend_head(const float* q, const C* k, const C* v, const int64_t* slots, int64_t L, int64_t D, float scale,
                 float* p, float* out) {
  float wide[kMaxHeadDim];  // a narrow cache's row as fp32
  float top = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    p[j] = dot_row(q, as_f32(k + slots[j] * D, D, wide), D) * scale;
    top = std::max(top, p[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < L; ++j) {
    p[j] = std::exp(p[j] - top);
    total += p[j];
  }
  float acc[kMaxHeadDim] = {};
  for (int64_t j = 0; j < L; ++j) {
    const float* row = as_f32(v + slots[j] * D, D, wide);
    for (int64_t c = 0; c < D; ++c) acc[c] += p[j] * row[c];
  }
  for (int64_t c = 0; c < D; ++c) out[c] = acc[c] / total;
}


// each of the tile's queries on its own (attend_head), p the scratch
template <typename C>
void attend_each(const kvengine::layer::AttendTile<float, C>& t, float* p) {
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g)
      attend_head(t.q + r * t.q_stride + g * t.D, t.k, t.v, t.slots, t.lens[r], t.D, t.scale, p,
                  t.out + r * t.out_stride + g * t.D);
}

#if defined(__AVX2__) && defined(__FMA__)

using kvengine::layer::kKeyBlock;
using kvengine::lanes::Lanes8;
using WideLanes = kvengine::lanes::Widest;  // 16 lanes where the tier has AVX-512

// Both passes read a block's key (value) rows through pointers to rows of R: the cache's own rows (R = C), or, for a
// narrow cache in a tile of many rows, the block widened to fp32 once (R = float) so that every query of the tile
// reads fp32. A tile of few rows (a decode step's) reads a narrow cache's rows directly, widening each load in
// registers (lanes.h's load): there each row serves one row's queries only, and widening it into L1 first ran
// 0.7x on a 2,048-key decode step.

// q . k for the W::kLanes keys whose rows are kr[0..], as the lanes of one register (D a multiple of W::kLanes)
template <typename W, typename R>
inline typename W::V dot_keys(const float* q, const R* const* kr, int64_t D) {
  typename W::V a[W::kLanes];
  const typename W::V q0 = W::load(q);
  for (int j = 0; j < W::kLanes; ++j) a[j] = W::mul(q0, W::load(kr[j]));
  for (int64_t c = W::kLanes; c < D; c += W::kLanes) {
    const typename W::V qc = W::load(q + c);
    for (int j = 0; j < W::kLanes; ++j) a[j] = W::fmadd(qc, W::load(kr[j] + c), a[j]);
  }
  return W::fold(a);
}

// fewer rows than this in a tile: its keys and values are read once (a decode step's), and prefetched
constexpr int64_t kFewRows = 4;
constexpr int64_t kKeysAhead = 16, kValuesAhead = 16;  // how far ahead, in keys

// The rows of the `n` keys j0 .. j0 + n - 1 of a head's cache `c` (their slots clamped to the first `valid`) as rows
// of R: the cache's own (R = C), or widened to fp32 into buf [n, D]
template <typename R, typename C>
inline void block_rows(const kvengine::layer::AttendTile<float, C>& t, const C* c, int64_t j0, int64_t n,
                       int64_t valid, float* buf, const R** rows) {
  for (int64_t j = 0; j < n; ++j) {
    const C* row = c + t.slots[std::min(j0 + j, valid - 1)] * t.D;
    if constexpr (std::is_same_v<R, C>)
      rows[j] = row;
    else
      rows[j] = as_f32(row, t.D, buf + j * t.D);
  }
}

// scores pass over rows of R: s[(r - r0) * group + g][j] = q.k_j * scale for j < lens[r] (rounded up to W::kLanes),
// key blocks outermost; `block` the scratch a narrow cache's keys are widened into
template <typename W, typename R, typename C>
inline void tile_scores(const kvengine::layer::AttendTile<float, C>& t, float* s, int64_t stride, float* block) {
  const int64_t top_len = *std::max_element(t.lens + t.r0, t.lens + t.r1);
  const bool ahead = t.r1 - t.r0 < kFewRows;
  const typename W::V scale = W::set1(t.scale);
  const R* kr[kKeyBlock];
  for (int64_t j0 = 0; j0 < top_len; j0 += kKeyBlock) {
    const int64_t block_len = std::min(kKeyBlock, top_len - j0);
    block_rows(t, t.k, j0, (block_len + W::kLanes - 1) / W::kLanes * W::kLanes, top_len, block, kr);
    if (ahead)
      for (int64_t j = j0 + kKeyBlock; j < std::min(j0 + kKeyBlock + kKeysAhead, top_len); ++j)
        prefetch_values(t.k + t.slots[j] * t.D, t.D);
    for (int64_t r = t.r0; r < t.r1; ++r) {
      const int64_t end = std::min(t.lens[r] - j0, block_len);  // this row's keys in the block
      for (int64_t g = 0; g < t.group; ++g) {
        const float* q = t.q + r * t.q_stride + g * t.D;
        float* row = s + ((r - t.r0) * t.group + g) * stride + j0;
        for (int64_t j = 0; j < end; j += W::kLanes) W::store(row + j, W::mul(dot_keys<W>(q, kr + j, t.D), scale));
      }
    }
  }
}

// softmax pass over one query's L scores in place, W's lanes at a time (lanes past L become 0); returns 1 / the sum
// of the weights
template <typename W>
inline float softmax_row(float* p, int64_t L) {
  typename W::V top = W::set1(-INFINITY);
  for (int64_t j = 0; j < L; j += W::kLanes) top = W::max(top, W::first(W::load(p + j), L - j, -INFINITY));
  const typename W::V most = W::set1(W::reduce_max(top));
  typename W::V sum = W::set1(0.f);
  for (int64_t j = 0; j < L; j += W::kLanes) {
    const typename W::V e = W::first(kvengine::lanes::exp<W>(W::sub(W::load(p + j), most)), L - j, 0.f);
    W::store(p + j, e);
    sum = W::add(sum, e);
  }
  return 1.f / W::reduce_add(sum);
}

// the values pass's registers (lanes.h): kValueRegs of WideLanes' for up to kValueQueries queries at a time, and
// one query's 8-lane ones for the columns past the last multiple of kValueCols
constexpr int kValueRegs = 4;
constexpr int kValueQueries = WideLanes::kLanes == 16 ? 4 : 2;
constexpr int64_t kValueCols = kValueRegs * WideLanes::kLanes;

// Up to kValueQueries queries of one row over the keys j0 .. j1 - 1, the columns c0 .. c0 + NR * W::kLanes - 1 of
// each: query a's weights at p + a * p_stride, its sums at out + a * D (out at column c0), key j's value row (of R)
// at rows[j - j0]. out_a[c] += p_a[j] v_j[c], keys in order; the queries share each value row's loads. With
// `ahead`, the cache's value row kValuesAhead keys on (up to key last) is prefetched.
template <typename R>
struct ValueRun {
  const float* p;
  int64_t p_stride, j0, j1, c0;
  float* out;
  const R* const* rows;
  bool ahead;
  int64_t last;
};

template <typename W, int NR, int NQ, typename R, typename C>
inline void add_values(const kvengine::layer::AttendTile<float, C>& t, const ValueRun<R>& u) {
  typename W::V acc[NQ][NR];
  for (int a = 0; a < NQ; ++a)
    for (int i = 0; i < NR; ++i) acc[a][i] = W::load(u.out + a * t.D + W::kLanes * i);
  for (int64_t j = u.j0; j < u.j1; ++j) {
    if (u.ahead) prefetch_values(t.v + t.slots[std::min(j + kValuesAhead, u.last)] * t.D + u.c0, NR * W::kLanes);
    const R* row = u.rows[j - u.j0] + u.c0;
    typename W::V v[NR];
    for (int i = 0; i < NR; ++i) v[i] = W::load(row + W::kLanes * i);
    for (int a = 0; a < NQ; ++a) {
      const typename W::V w = W::set1(u.p[a * u.p_stride + j]);
      for (int i = 0; i < NR; ++i) acc[a][i] = W::fmadd(w, v[i], acc[a][i]);
    }
  }
  for (int a = 0; a < NQ; ++a)
    for (int i = 0; i < NR; ++i) W::store(u.out + a * t.D + W::kLanes * i, acc[a][i]);
}

template <int NQ, typename R, typename C>
inline void wide_values(const kvengine::layer::AttendTile<float, C>& t, const ValueRun<R>& u) {
  add_values<WideLanes, kValueRegs, NQ>(t, u);
}

// the `group` queries of row r over keys j0 .. j1 - 1 (their value rows at rows[j - j0]): kValueCols columns at a
// time, kValueQueries queries together; then the rest 8 at a time, a query at a time (D is a multiple of 8)
template <typename R, typename C>
inline void row_values(const kvengine::layer::AttendTile<float, C>& t, const float* s, int64_t stride, int64_t r,
                       int64_t j0, int64_t j1, const R* const* rows, bool ahead) {
  const float* p = s + (r - t.r0) * t.group * stride;
  float* out = t.out + r * t.out_stride;
  const int64_t last = t.lens[r] - 1;
  int64_t c0 = 0;
  for (; c0 + kValueCols <= t.D; c0 += kValueCols)
    for (int64_t a = 0; a < t.group; a += kValueQueries) {
      const ValueRun<R> u{p + a * stride, stride, j0, j1, c0, out + a * t.D + c0, rows, ahead, last};
      switch (std::min<int64_t>(kValueQueries, t.group - a)) {
        case 1: wide_values<1>(t, u); break;
        case 2: wide_values<2>(t, u); break;
        case 3: wide_values<std::min(3, kValueQueries)>(t, u); break;
        default: wide_values<kValueQueries>(t, u); break;
      }
    }
  for (int64_t a = 0; a < t.group; ++a) {
    const ValueRun<R> u{p + a * stride, stride, j0, j1, c0, out + a * t.D + c0, rows, ahead, last};
    switch ((t.D - c0) / 8) {
      case 1: add_values<Lanes8, 1, 1>(t, u); break;
      case 2: add_values<Lanes8, 2, 1>(t, u); break;
      case 3: add_values<Lanes8, 3, 1>(t, u); break;
      case 4: add_values<Lanes8, 4, 1>(t, u); break;
      case 5: add_values<Lanes8, 5, 1>(t, u); break;
      case 6: add_values<Lanes8, 6, 1>(t, u); break;
      case 7: add_values<Lanes8, 7, 1>(t, u); break;
      default: break;
    }
  }
}

// values pass over rows of R: out = (1 / total) * sum_j p[j] v_j for every query of the tile, key blocks outermost so
// that a block's value rows serve every query while they are in L1 (one query at a time streamed all its keys'
// values from L2 for each query). A query's sums wait in its out row between blocks, stored and reloaded exactly:
// each column gets the same fused multiply-adds in the same order as in one pass over all its keys. `block`: as in
// tile_scores.
template <typename R, typename C>
inline void tile_values(const kvengine::layer::AttendTile<float, C>& t, const float* s, int64_t stride,
                        const float* inv_total, float* block) {
  const int64_t top_len = *std::max_element(t.lens + t.r0, t.lens + t.r1);
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g) std::fill_n(t.out + r * t.out_stride + g * t.D, t.D, 0.f);
  const bool ahead = t.r1 - t.r0 < kFewRows;
  const R* rows[kKeyBlock];
  for (int64_t j0 = 0; j0 < top_len; j0 += kKeyBlock) {
    block_rows(t, t.v, j0, std::min(kKeyBlock, top_len - j0), top_len, block, rows);
    for (int64_t r = t.r0; r < t.r1; ++r) {
      const int64_t j1 = std::min(t.lens[r], j0 + kKeyBlock);  // this row's keys in the block
      if (j1 > j0) row_values(t, s, stride, r, j0, j1, rows, ahead);
    }
  }
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g) {
      float* out = t.out + r * t.out_stride + g * t.D;
      const float inv = inv_total[(r - t.r0) * t.group + g];
      for (int64_t c = 0; c < t.D; ++c) out[c] *= inv;
    }
}

// the three passes in W's lanes over rows of R: each query's weights in its row of s, 1 / their sum in inv_total
template <typename W, typename R, typename C>
inline void attend_rows(const kvengine::layer::AttendTile<float, C>& t, float* s, int64_t stride, float* inv_total,
                        float* block) {
  tile_scores<W, R>(t, s, stride, block);
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g) {
      const int64_t i = (r - t.r0) * t.group + g;
      inv_total[i] = softmax_row<W>(s + i * stride, t.lens[r]);
    }
  tile_values<R>(t, s, stride, inv_total, block);
}

template <typename R, typename C>
inline void attend_lanes(const kvengine::layer::AttendTile<float, C>& t, float* s, int64_t stride, float* inv_total,
                         float* block) {
  if (WideLanes::kLanes == 16 && t.D % 16 == 0)
    attend_rows<WideLanes, R>(t, s, stride, inv_total, block);
  else
    attend_rows<Lanes8, R>(t, s, stride, inv_total, block);
}

// scratch (layer_flow.h's): the scores [queries, stride], the inverse sums of their weights [queries]. A narrow
// cache's key block [kKeyBlock, D] is widened into a buffer of the thread's own, not the scratch's tail: there a
// 1,024-row prefill ran 0.81x the fp32 cache's time (1.04-1.07x in a buffer of its own), 4 KB score rows putting the
// block at the page offsets of the score stores (4K aliasing the likely cause, not confirmed with counters).
template <typename C>
void attend_tile(const kvengine::layer::AttendTile<float, C>& t, float* scratch) {
  if (t.D % 8 != 0) return attend_each(t, scratch);  // the op allows any even head_dim
  const int64_t top_len = *std::max_element(t.lens + t.r0, t.lens + t.r1);
  const int64_t stride = (top_len + 15) / 16 * 16, queries = (t.r1 - t.r0) * t.group;
  float* inv_total = scratch + queries * stride;
  if (std::is_same_v<C, float> || t.r1 - t.r0 < kFewRows)
    return attend_lanes<C>(t, scratch, stride, inv_total, nullptr);
  alignas(64) static thread_local float block[kKeyBlock * kMaxHeadDim];
  attend_lanes<float>(t, scratch, stride, inv_total, block);
}

#else  // the portable tier

template <typename C>
void attend_tile(const kvengine::layer::AttendTile<float, C>& t, float* p) { attend_each(t, p); }

#endif
