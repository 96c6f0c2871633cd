// The fp32 tiers' attention: attend_tile for fp32_layer.cpp (one kv head, a tile of rows of one sequence; tier.h's
// AttendTile), and the 8-lane e^x it and the SwiGLU share. Included by fp32_layer.cpp only, inside its namespace
// (each tier's copy is compiled with that tier's flags).
//
// softmax(q.k * scale) . v for each query head of each row, in three passes over the tile:
//   scores  keys taken 64 at a time, each block serving every query of the tile while it is in L1; a query's
//           scores 8 keys at a time: per key, D/8 fused multiply-adds in 8 lanes, then the 8 keys' lanes folded
//           pairwise into one register of 8 scores;
//   softmax per query: the max, e^(s - max) 8 lanes at a time (exp8), their sum in 8 lanes then folded;
//   values  key blocks outermost again, each block serving every query of the tile; per query, the sum over its
//           keys in order of weight x value row, 64 columns in registers at a time (16-lane ones with AVX-512).
// Every number a query gets depends only on its own q and keys: not on the tile's other rows, nor on how many
// there are. So a token attends alike in a decode step, in a long prefill and in the no-cache recomputation,
// which is what keeps cached and uncached tokens identical. Keys past a query's length are computed in the last
// group of 8 (reading a real key) and dropped.
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

// e^x for 8 lanes: x = k ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), e^r by its Taylor series to r^6 (relative
// error ~1e-7), times 2^k built in the exponent bits; x is clamped to [-87, 88] so 2^k stays a normal float
// (e^-87 ~ 1.6e-38 is 0 to a softmax; silu's e^-x is finite).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.42860677e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));
}

// the 8 lanes' sum, folded in one fixed order
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// the first n of 8 lanes kept (all for n >= 8), the rest `fill`
inline __m256 keep_first(__m256 v, int64_t n, float fill) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i count = _mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8)));
  const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(count, lane));
  return _mm256_blendv_ps(_mm256_set1_ps(fill), v, keep);
}

// q . k for the 8 keys whose rows are kr[0..7], as the lanes of one register
inline __m256 dot8(const float* q, const float* const* kr, int64_t D) {
  __m256 a[8];
  const __m256 q0 = _mm256_loadu_ps(q);
  for (int j = 0; j < 8; ++j) a[j] = _mm256_mul_ps(q0, _mm256_loadu_ps(kr[j]));
  for (int64_t c = 8; c < D; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kr[j] + c), a[j]);
  }
  // hadd pairs neighbouring lanes: u0 = [a0..a3 lanes 0-3 | a0..a3 lanes 4-7], u1 the same for a4..a7
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// scores pass: s[(r - r0) * group + g][j] = q.k_j * scale for j < lens[r] (rounded up to 8), key blocks outermost
inline void tile_scores(const kvengine::layer::AttendTile<float>& t, float* s, int64_t stride) {
  const int64_t top_len = *std::max_element(t.lens + t.r0, t.lens + t.r1);
  const __m256 scale = _mm256_set1_ps(t.scale);
  const float* kr[kKeyBlock];
  for (int64_t j0 = 0; j0 < top_len; j0 += kKeyBlock) {
    const int64_t block = std::min(kKeyBlock, top_len - j0);
    for (int64_t j = 0; j < (block + 7) / 8 * 8; ++j) kr[j] = t.k + t.slots[std::min(j0 + j, top_len - 1)] * t.D;
    for (int64_t r = t.r0; r < t.r1; ++r) {
      const int64_t end = std::min(t.lens[r] - j0, block);  // this row's keys in the block
      for (int64_t g = 0; g < t.group; ++g) {
        const float* q = t.q + r * t.q_stride + g * t.D;
        float* row = s + ((r - t.r0) * t.group + g) * stride + j0;
        for (int64_t j = 0; j < end; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(dot8(q, kr + j, t.D), scale));
      }
    }
  }
}

// softmax pass over one query's L scores in place (lanes past L become 0); returns 1 / the sum of the weights
inline float softmax_row(float* p, int64_t L) {
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < L; j += 8) top = _mm256_max_ps(top, keep_first(_mm256_loadu_ps(p + j), L - j, -INFINITY));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const __m256 most = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; j += 8) {
    const __m256 e = keep_first(exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), most)), L - j, 0.f);
    _mm256_storeu_ps(p + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  return 1.f / sum8(sum);
}

// the values pass's registers (lanes.h): 16-lane ones where the tier has AVX-512 (fewer instructions for the same
// fused multiply-adds), 8-lane ones for the columns past the last 64
using kvengine::lanes::Lanes8;
using WideLanes = kvengine::lanes::Widest;

// out[c] += sum over keys j0..j1-1 of p[j] v_j[c], for C registers of W's columns from c0 (out at c0)
template <typename W, int C>
inline void add_values(const kvengine::layer::AttendTile<float>& t, const float* p, int64_t j0, int64_t j1,
                       int64_t c0, float* out) {
  typename W::V acc[C];
  for (int i = 0; i < C; ++i) acc[i] = W::load(out + W::kLanes * i);
  for (int64_t j = j0; j < j1; ++j) {
    const float* row = t.v + t.slots[j] * t.D + c0;
    for (int i = 0; i < C; ++i) acc[i] = W::fmadd(W::set1(p[j]), W::load(row + W::kLanes * i), acc[i]);
  }
  for (int i = 0; i < C; ++i) W::store(out + W::kLanes * i, acc[i]);
}

// one query's values over keys j0..j1: 64 columns at a time, then the rest 8 at a time (D is a multiple of 8)
inline void query_values(const kvengine::layer::AttendTile<float>& t, const float* p, int64_t j0, int64_t j1,
                         float* out) {
  int64_t c0 = 0;
  for (; c0 + 64 <= t.D; c0 += 64) add_values<WideLanes, 64 / WideLanes::kLanes>(t, p, j0, j1, c0, out + c0);
  switch ((t.D - c0) / 8) {
    case 1: add_values<Lanes8, 1>(t, p, j0, j1, c0, out + c0); break;
    case 2: add_values<Lanes8, 2>(t, p, j0, j1, c0, out + c0); break;
    case 3: add_values<Lanes8, 3>(t, p, j0, j1, c0, out + c0); break;
    case 4: add_values<Lanes8, 4>(t, p, j0, j1, c0, out + c0); break;
    case 5: add_values<Lanes8, 5>(t, p, j0, j1, c0, out + c0); break;
    case 6: add_values<Lanes8, 6>(t, p, j0, j1, c0, out + c0); break;
    case 7: add_values<Lanes8, 7>(t, p, j0, j1, c0, out + c0); break;
    default: break;
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
  for (int64_t j0 = 0; j0 < top_len; j0 += kKeyBlock)
    for (int64_t r = t.r0; r < t.r1; ++r) {
      const int64_t j1 = std::min(t.lens[r], j0 + kKeyBlock);  // this row's keys in the block
      if (j1 <= j0) continue;
      for (int64_t g = 0; g < t.group; ++g)
        query_values(t, s + ((r - t.r0) * t.group + g) * stride, j0, j1, t.out + r * t.out_stride + g * t.D);
    }
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g) {
      float* out = t.out + r * t.out_stride + g * t.D;
      const float inv = inv_total[(r - t.r0) * t.group + g];
      for (int64_t c = 0; c < t.D; ++c) out[c] *= inv;
    }
}

void attend_tile(const kvengine::layer::AttendTile<float>& t, float* scratch) {
  if (t.D % 8 != 0) return attend_each(t, scratch);  // the op allows any even head_dim
  const int64_t top_len = *std::max_element(t.lens + t.r0, t.lens + t.r1);
  const int64_t stride = (top_len + 15) / 16 * 16, queries = (t.r1 - t.r0) * t.group;
  tile_scores(t, scratch, stride);
  float* inv_total = scratch + queries * stride;  // past the scores (layer_flow.h leaves D + 1 floats a query)
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g) {
      const int64_t i = (r - t.r0) * t.group + g;
      inv_total[i] = softmax_row(scratch + i * stride, t.lens[r]);
    }
  tile_values(t, scratch, stride, inv_total);
}

#else  // the portable tier

void attend_tile(const kvengine::layer::AttendTile<float>& t, float* p) { attend_each(t, p); }

#endif
