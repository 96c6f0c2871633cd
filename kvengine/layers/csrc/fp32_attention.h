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
#pragma once

// One query head against the keys at `slots`: softmax(q.k * scale) . v. k, v point at the head's [slots, D] rows.
void attend_head(const float* q, const float* k, const float* v, const int64_t* slots, int64_t L, int64_t D,
                 float scale, float* p, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    p[j] = dot_row(q, k + slots[j] * D, D) * scale;
    top = std::max(top, p[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < L; ++j) {
    p[j] = std::exp(p[j] - top);
    total += p[j];
  }
  float acc[kMaxHeadDim] = {};
  for (int64_t j = 0; j < L; ++j) {
    const float* row = v + slots[j] * D;
    for (int64_t c = 0; c < D; ++c) acc[c] += p[j] * row[c];
  }
  for (int64_t c = 0; c < D; ++c) out[c] = acc[c] / total;
}


// each of the tile's queries on its own (attend_head), p the scratch
void attend_each(const kvengine::layer::AttendTile<float>& t, float* p) {
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g)
      attend_head(t.q + r * t.q_stride + g * t.D, t.k, t.v, t.slots, t.lens[r], t.D, t.scale, p,
                  t.out + r * t.out_stride + g * t.D);
}

#if defined(__AVX2__) && defined(__FMA__)

using kvengine::layer::kKeyBlock;
using kvengine::lanes::Lanes8;
using WideLanes = kvengine::lanes::Widest;  // 16 lanes where the tier has AVX-512

// q . k for the W::kLanes keys whose rows are kr[0..], as the lanes of one register (D a multiple of W::kLanes)
template <typename W>
inline typename W::V dot_keys(const float* q, const float* const* kr, int64_t D) {
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

// the cache lines of the D floats at `row` prefetched into L1
inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t b = 0; b < D; b += 16) _mm_prefetch(reinterpret_cast<const char*>(row + b), _MM_HINT_T0);
}

// scores pass: s[(r - r0) * group + g][j] = q.k_j * scale for j < lens[r] (rounded up to W::kLanes), key blocks
// outermost
template <typename W>
inline void tile_scores(const kvengine::layer::AttendTile<float>& t, float* s, int64_t stride) {
  const int64_t top_len = *std::max_element(t.lens + t.r0, t.lens + t.r1);
  const bool ahead = t.r1 - t.r0 < kFewRows;
  const typename W::V scale = W::set1(t.scale);
  const float* kr[kKeyBlock];
  for (int64_t j0 = 0; j0 < top_len; j0 += kKeyBlock) {
    const int64_t block = std::min(kKeyBlock, top_len - j0);
    for (int64_t j = 0; j < (block + W::kLanes - 1) / W::kLanes * W::kLanes; ++j)
      kr[j] = t.k + t.slots[std::min(j0 + j, top_len - 1)] * t.D;
    if (ahead)
      for (int64_t j = j0 + kKeyBlock; j < std::min(j0 + kKeyBlock + kKeysAhead, top_len); ++j)
        prefetch_row(t.k + t.slots[j] * t.D, t.D);
    for (int64_t r = t.r0; r < t.r1; ++r) {
      const int64_t end = std::min(t.lens[r] - j0, block);  // this row's keys in the block
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

// Up to kValueQueries queries of one row over the keys j0 .. j1 - 1, the columns c0 .. c0 + C * W::kLanes - 1 of
// each: query a's weights at p + a * p_stride, its sums at out + a * D (out, and each value row, at column c0).
// out_a[c] += p_a[j] v_j[c], keys in order; the queries share each value row's loads. With `ahead`, the value row
// kValuesAhead keys on (up to key last) is prefetched.
struct ValueRun {
  const float* p;
  int64_t p_stride, j0, j1, c0;
  float* out;
  bool ahead;
  int64_t last;
};

template <typename W, int C, int NQ>
inline void add_values(const kvengine::layer::AttendTile<float>& t, const ValueRun& u) {
  typename W::V acc[NQ][C];
  for (int a = 0; a < NQ; ++a)
    for (int i = 0; i < C; ++i) acc[a][i] = W::load(u.out + a * t.D + W::kLanes * i);
  for (int64_t j = u.j0; j < u.j1; ++j) {
    if (u.ahead) prefetch_row(t.v + t.slots[std::min(j + kValuesAhead, u.last)] * t.D + u.c0, C * W::kLanes);
    const float* row = t.v + t.slots[j] * t.D + u.c0;
    typename W::V v[C];
    for (int i = 0; i < C; ++i) v[i] = W::load(row + W::kLanes * i);
    for (int a = 0; a < NQ; ++a) {
      const typename W::V w = W::set1(u.p[a * u.p_stride + j]);
      for (int i = 0; i < C; ++i) acc[a][i] = W::fmadd(w, v[i], acc[a][i]);
    }
  }
  for (int a = 0; a < NQ; ++a)
    for (int i = 0; i < C; ++i) W::store(u.out + a * t.D + W::kLanes * i, acc[a][i]);
}

template <int NQ>
inline void wide_values(const kvengine::layer::AttendTile<float>& t, const ValueRun& u) {
  add_values<WideLanes, kValueRegs, NQ>(t, u);
}

// the `group` queries of row r over keys j0 .. j1 - 1: kValueCols columns at a time, kValueQueries queries
// together; then the rest 8 at a time, a query at a time (D is a multiple of 8)
inline void row_values(const kvengine::layer::AttendTile<float>& t, const float* s, int64_t stride, int64_t r,
                       int64_t j0, int64_t j1, bool ahead) {
  const float* p = s + (r - t.r0) * t.group * stride;
  float* out = t.out + r * t.out_stride;
  const int64_t last = t.lens[r] - 1;
  int64_t c0 = 0;
  for (; c0 + kValueCols <= t.D; c0 += kValueCols)
    for (int64_t a = 0; a < t.group; a += kValueQueries) {
      const ValueRun u{p + a * stride, stride, j0, j1, c0, out + a * t.D + c0, ahead, last};
      switch (std::min<int64_t>(kValueQueries, t.group - a)) {
        case 1: wide_values<1>(t, u); break;
        case 2: wide_values<2>(t, u); break;
        case 3: wide_values<std::min(3, kValueQueries)>(t, u); break;
        default: wide_values<kValueQueries>(t, u); break;
      }
    }
  for (int64_t a = 0; a < t.group; ++a) {
    const ValueRun u{p + a * stride, stride, j0, j1, c0, out + a * t.D + c0, ahead, last};
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

// values pass: out = (1 / total) * sum_j p[j] v_j for every query of the tile, key blocks outermost so that a block's
// value rows serve every query while they are in L1 (one query at a time streamed all its keys' values from L2 for
// each query). A query's sums wait in its out row between blocks, stored and reloaded exactly: each column gets the
// same fused multiply-adds in the same order as in one pass over all its keys.
inline void tile_values(const kvengine::layer::AttendTile<float>& t, const float* s, int64_t stride,
                        const float* inv_total) {
  const int64_t top_len = *std::max_element(t.lens + t.r0, t.lens + t.r1);
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g) std::fill_n(t.out + r * t.out_stride + g * t.D, t.D, 0.f);
  const bool ahead = t.r1 - t.r0 < kFewRows;
  for (int64_t j0 = 0; j0 < top_len; j0 += kKeyBlock)
    for (int64_t r = t.r0; r < t.r1; ++r) {
      const int64_t j1 = std::min(t.lens[r], j0 + kKeyBlock);  // this row's keys in the block
      if (j1 > j0) row_values(t, s, stride, r, j0, j1, ahead);
    }
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g) {
      float* out = t.out + r * t.out_stride + g * t.D;
      const float inv = inv_total[(r - t.r0) * t.group + g];
      for (int64_t c = 0; c < t.D; ++c) out[c] *= inv;
    }
}

// the scores and softmax passes in W's lanes: each query's weights in its row of s, 1 / their sum in inv_total
template <typename W>
inline void tile_weights(const kvengine::layer::AttendTile<float>& t, float* s, int64_t stride, float* inv_total) {
  tile_scores<W>(t, s, stride);
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g) {
      const int64_t i = (r - t.r0) * t.group + g;
      inv_total[i] = softmax_row<W>(s + i * stride, t.lens[r]);
    }
}

void attend_tile(const kvengine::layer::AttendTile<float>& t, float* scratch) {
  if (t.D % 8 != 0) return attend_each(t, scratch);  // the op allows any even head_dim
  const int64_t top_len = *std::max_element(t.lens + t.r0, t.lens + t.r1);
  const int64_t stride = (top_len + 15) / 16 * 16, queries = (t.r1 - t.r0) * t.group;
  float* inv_total = scratch + queries * stride;  // past the scores (layer_flow.h leaves D + 1 floats a query)
  if (WideLanes::kLanes == 16 && t.D % 16 == 0)
    tile_weights<WideLanes>(t, scratch, stride, inv_total);
  else
    tile_weights<Lanes8>(t, scratch, stride, inv_total);
  tile_values(t, scratch, stride, inv_total);
}

#else  // the portable tier

void attend_tile(const kvengine::layer::AttendTile<float>& t, float* p) { attend_each(t, p); }

#endif
