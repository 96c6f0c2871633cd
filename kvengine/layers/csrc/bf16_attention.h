// The avx512 tier's attention: attend_tile for decode_layer.cpp (one kv head, a tile of rows of one sequence;
// tier.h's AttendTile), on bf16 queries and caches with fp32 arithmetic. Included by decode_layer.cpp only,
// inside its namespace, after exp16.
//
// softmax(q.k * scale) . v for each query head of each row, in three passes over the tile, keys taken kKeyBlock
// at a time and widened to fp32 once per block (not once per query):
//   scores  a query's scores 16 keys at a time: per key, D/16 fused multiply-adds in 16 lanes, then the 16 keys'
//           lanes folded into one register of 16 scores (lanes.h's fold);
//   softmax per query: the max, e^(s - max) 16 lanes at a time, their sum in 16 lanes then reduced;
//   values  per query, block by block: its fp32 sums (scratch) += weight x value row, keys in order; rounded to
//           bf16 once at the end.
// Every number a query gets depends only on its own q and keys, not on the tile's other rows nor their number:
// a token attends alike in a decode step, a long prefill and the no-cache recomputation (cached and uncached
// tokens identical). Keys past a query's length are computed in its last group of 16 (reading a real key) and
// dropped.
#pragma once

using kvengine::layer::kKeyBlock;

// rows j0 .. j0 + n - 1 of a head's cache (at the sequence's slots, clamped to the first `valid`) as fp32 [n, D]
inline void widen_block(const bf16* cache, const int64_t* slots, int64_t j0, int64_t n, int64_t valid, int64_t D,
                        float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const bf16* row = cache + slots[std::min(j0 + j, valid - 1)] * D;
    for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(out + j * D + c, load16(row + c));
  }
}

// q . k for 16 fp32 key rows kb[0..15] (row stride D), as the lanes of one register
inline __m512 dot16(const bf16* q, const float* kb, int64_t D) {
  __m512 a[16];
  const __m512 q0 = load16(q);
  for (int j = 0; j < 16; ++j) a[j] = _mm512_mul_ps(q0, _mm512_loadu_ps(kb + j * D));
  for (int64_t c = 16; c < D; c += 16) {
    const __m512 qc = load16(q + c);
    for (int j = 0; j < 16; ++j) a[j] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(kb + j * D + c), a[j]);
  }
  return kvengine::lanes::Lanes16::fold(a);
}

// softmax of one query's L scores in place (lanes past L become 0); returns 1 / the sum of the weights
inline float softmax16(float* p, int64_t L) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < L; j += 16) top = _mm512_mask_max_ps(top, first(L - j), top, _mm512_loadu_ps(p + j));
  const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(first(L - j), exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), most)));
    _mm512_storeu_ps(p + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// acc[c0 .. c0 + 16 C) += sum over the block's first n keys of p[j] vb[j] (vb: [n, D] fp32), keys in order
template <int C>
inline void add_weighted(const float* p, const float* vb, int64_t n, int64_t D, int64_t c0, float* acc) {
  __m512 s[C];
  for (int i = 0; i < C; ++i) s[i] = _mm512_loadu_ps(acc + c0 + 16 * i);
  for (int64_t j = 0; j < n; ++j) {
    const __m512 w = _mm512_set1_ps(p[j]);
    for (int i = 0; i < C; ++i) s[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vb + j * D + c0 + 16 * i), s[i]);
  }
  for (int i = 0; i < C; ++i) _mm512_storeu_ps(acc + c0 + 16 * i, s[i]);
}

inline void add_weighted_row(const float* p, const float* vb, int64_t n, int64_t D, float* acc) {
  for (int64_t c0 = 0; c0 < D; c0 += 128) {
    switch (std::min<int64_t>(8, (D - c0) / 16)) {  // D is a multiple of 16
      case 1: add_weighted<1>(p, vb, n, D, c0, acc); break;
      case 2: add_weighted<2>(p, vb, n, D, c0, acc); break;
      case 3: add_weighted<3>(p, vb, n, D, c0, acc); break;
      case 4: add_weighted<4>(p, vb, n, D, c0, acc); break;
      case 5: add_weighted<5>(p, vb, n, D, c0, acc); break;
      case 6: add_weighted<6>(p, vb, n, D, c0, acc); break;
      case 7: add_weighted<7>(p, vb, n, D, c0, acc); break;
      default: add_weighted<8>(p, vb, n, D, c0, acc); break;
    }
  }
}

// scratch (layer_flow.h's): the scores [queries, stride], each query's fp32 sums [queries, D], the inverse sums of
// its weights [queries], one widened key block [kKeyBlock, D]
void attend_tile(const kvengine::layer::AttendTile<bf16>& t, float* scratch) {
  const int64_t queries = (t.r1 - t.r0) * t.group, D = t.D;
  const int64_t top_len = *std::max_element(t.lens + t.r0, t.lens + t.r1);
  const int64_t stride = (top_len + 15) / 16 * 16;
  float *scores = scratch, *sums = scores + queries * stride, *inv = sums + queries * D, *block = inv + queries;
  const auto query = [&](int64_t r, int64_t g) { return (r - t.r0) * t.group + g; };
  for (int64_t j0 = 0; j0 < top_len; j0 += kKeyBlock) {  // scores
    const int64_t n = std::min(kKeyBlock, top_len - j0);
    widen_block(t.k, t.slots, j0, (n + 15) / 16 * 16, top_len, D, block);
    for (int64_t r = t.r0; r < t.r1; ++r)
      for (int64_t g = 0; g < t.group; ++g)
        for (int64_t j = 0; j < std::min(t.lens[r] - j0, n); j += 16)
          _mm512_storeu_ps(scores + query(r, g) * stride + j0 + j,
                           _mm512_mul_ps(dot16(t.q + r * t.q_stride + g * D, block + j * D, D),
                                         _mm512_set1_ps(t.scale)));
  }
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g) inv[query(r, g)] = softmax16(scores + query(r, g) * stride, t.lens[r]);
  std::fill_n(sums, queries * D, 0.f);
  for (int64_t j0 = 0; j0 < top_len; j0 += kKeyBlock) {  // values
    const int64_t n = std::min(kKeyBlock, top_len - j0);
    widen_block(t.v, t.slots, j0, n, top_len, D, block);
    for (int64_t r = t.r0; r < t.r1; ++r)
      for (int64_t g = 0; g < t.group; ++g)
        if (t.lens[r] > j0)
          add_weighted_row(scores + query(r, g) * stride + j0, block, std::min(t.lens[r] - j0, n), D,
                           sums + query(r, g) * D);
  }
  for (int64_t r = t.r0; r < t.r1; ++r)
    for (int64_t g = 0; g < t.group; ++g)
      for (int64_t c = 0; c < D; c += 16)
        store16(t.out + r * t.out_stride + g * D + c,
                _mm512_mul_ps(_mm512_loadu_ps(sums + query(r, g) * D + c), _mm512_set1_ps(inv[query(r, g)])));
}
