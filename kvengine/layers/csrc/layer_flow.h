// The data flow of decode_layer, one Llama-family decoder layer for M new tokens, shared by every tier: the operand
// checks and the order of the steps. decode_layer.cpp (bf16 activations) and fp32_layer.cpp (fp32) include it
// inside their namespace after defining, for their element type T, the steps it calls by name:
//   linear(x, w, i), rms_norm(x, norm, eps), add_into(out, y)      tensors of T
//   rotate_heads(T* x, heads, D, cos, sin), swiglu(gate_up, M, I, out)   rows of T
//   attend_tile(tile, scratch)        one kv head's attention for a tile of rows (tier.h's AttendTile<T, C>), with
//                                     kTileRows * group * (L rounded up to 16 + D + 1) + kKeyBlock * D floats of
//                                     scratch
//   kMaxHeadDim
// Read decode_layer.cpp's header for the operands and their meaning.
// It holds no #include of its own (it is read inside a namespace): the includer brings ATen, <algorithm>,
// <atomic>, <memory> and <vector>.
#pragma once

// The dtypes a tier's caches may have besides its activations' (none: the caches are the activations' dtype) and
// their names for the errors
struct CacheDtypes {
  std::vector<at::ScalarType> narrower;
  const char* names;
};

// Every operand of decode_layer whose activations, norms and cos/sin are `dtype` (named `name` in the errors), caches
// that too or one of `caches`' (the two caches alike), with head_dim a multiple of `head_dim_step`.
inline void check_layer_operands(const at::Tensor& x, at::TensorList w, const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                                 const at::Tensor& seq, const at::Tensor& lens, int64_t Hq, int64_t Hkv,
                                 at::ScalarType dtype, const char* name, int64_t head_dim_step,
                                 const CacheDtypes& caches = {{}, nullptr}) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == dtype && x.is_contiguous(), "decode_layer: x must be [M, H] ", name);
  TORCH_CHECK(w.size() == 10, "decode_layer: 10 weight tensors expected");
  const int64_t M = x.size(0), H = x.size(1), D = k_cache.size(2);
  for (int i : {0, 5})
    TORCH_CHECK(w[i].scalar_type() == dtype && w[i].is_contiguous() && w[i].numel() == H,
                "decode_layer: norm weights must be [H] ", name);
  TORCH_CHECK(D % head_dim_step == 0 && D <= kMaxHeadDim && Hq % Hkv == 0 && k_cache.size(0) == Hkv,
              "decode_layer: head_dim must be a multiple of ", head_dim_step, " up to ", kMaxHeadDim,
              ", heads a multiple of kv heads");
  const at::ScalarType kept = k_cache.scalar_type();
  const bool known = kept == dtype || std::find(caches.narrower.begin(), caches.narrower.end(), kept) !=
                                          caches.narrower.end();
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(known && c->scalar_type() == kept && c->stride(2) == 1 && c->stride(1) == D,
                "decode_layer: caches must be [Hkv, slots, D] ", caches.names ? caches.names : name,
                " with rows of D, both of one dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 2 &&
                  seq.scalar_type() == at::kLong && seq.is_contiguous() && seq.numel() == M &&
                  lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == M,
              "decode_layer: slots must be [S, L] int64, seq and lens [M] int64");
  const int64_t S = slots.size(0), Lmax = slots.size(1);
  const int64_t *sp = slots.data_ptr<int64_t>(), *qp = seq.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  std::vector<int64_t> reads(S, 0);  // how many of each sequence's slots its rows read
  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK(qp[i] >= 0 && qp[i] < S, "decode_layer: seq must lie in 0..S-1");
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= Lmax, "decode_layer: lens must lie in 1..L");
    reads[qp[i]] = std::max(reads[qp[i]], lp[i]);
  }
  const int64_t num_slots = std::min(k_cache.size(1), v_cache.size(1));
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(std::all_of(sp + s * Lmax, sp + s * Lmax + reads[s],
                            [&](int64_t v) { return v >= 0 && v < num_slots; }),
                "decode_layer: slots must lie in the cache");
  TORCH_CHECK(cos.numel() == M * D && sin.numel() == M * D && cos.scalar_type() == dtype &&
                  sin.scalar_type() == dtype && cos.is_contiguous() && sin.is_contiguous(),
              "decode_layer: cos/sin must be [M, D] ", name);
}

// Rows [r0, r1) of one sequence (they read one slot list, each up to its own length): the unit of attention work,
// taken with one kv head at a time.
struct RowTile {
  int64_t r0, r1;
};

// Each run of consecutive rows with the same seq cut into tiles of at most kTileRows rows, the costliest (the most
// keys read) first, so that threads taking the next tile as they finish end together.
inline std::vector<RowTile> row_tiles(const int64_t* seq, const int64_t* lens, int64_t M) {
  std::vector<RowTile> tiles;
  for (int64_t i = 0; i < M;) {
    int64_t j = i + 1;
    while (j < M && seq[j] == seq[i] && j - i < kvengine::layer::kTileRows) ++j;
    tiles.push_back({i, j});
    i = j;
  }
  std::stable_sort(tiles.begin(), tiles.end(), [&](const RowTile& a, const RowTile& b) {
    return lens[a.r1 - 1] * (a.r1 - a.r0) > lens[b.r1 - 1] * (b.r1 - b.r0);
  });
  return tiles;
}

// The layer on checked operands: x [M, H] -> [M, H], the new tokens' K/V written into the caches (of C: T, or a
// narrower float whose constructor from T rounds to nearest even, as PyTorch's conversion does) on the way.
template <typename T, typename C = T>
at::Tensor layer_flow(const at::Tensor& x, at::TensorList w, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                      const at::Tensor& seq, const at::Tensor& lens, int64_t Hq, int64_t Hkv, double eps,
                      double scale) {
  const int64_t M = x.size(0), D = k_cache.size(2), Lmax = slots.size(1);
  const int64_t *sp = slots.data_ptr<int64_t>(), *qp = seq.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();

  // attention block
  at::Tensor qkv = linear(rms_norm(x, w[0], eps), w, 1);  // [M, (Hq + 2 Hkv) D]
  const int64_t width = (Hq + 2 * Hkv) * D;
  TORCH_CHECK(qkv.size(1) == width, "decode_layer: qkv weight must have (heads + 2 kv heads) * D rows");
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
  const int64_t head_stride = k_cache.stride(0);
  at::parallel_for(0, M, kvengine::grain_for(width), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* row = qkv.data_ptr<T>() + i * width;
      rotate_heads(row, Hq + Hkv, D, cos.data_ptr<T>() + i * D, sin.data_ptr<T>() + i * D);
      const int64_t new_slot = sp[qp[i] * Lmax + lp[i] - 1];
      for (int64_t h = 0; h < Hkv; ++h) {
        std::copy_n(row + (Hq + h) * D, D, kc + h * head_stride + new_slot * D);
        std::copy_n(row + (Hq + Hkv + h) * D, D, vc + h * head_stride + new_slot * D);
      }
    }
  });
  at::Tensor attn = at::empty({M, Hq * D}, x.options());  // [M, Hq D]
  const int64_t group = Hq / Hkv;
  const std::vector<RowTile> tiles = row_tiles(qp, lp, M);
  const int64_t items = static_cast<int64_t>(tiles.size()) * Hkv;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    // room for a tile's scores and sums: [kTileRows * group, L rounded up to 16 + D + 1], and a key block
    using kvengine::layer::kKeyBlock, kvengine::layer::kTileRows;
    std::unique_ptr<float[]> scratch(new float[kTileRows * group * ((Lmax + 15) / 16 * 16 + D + 1) + kKeyBlock * D]);
    for (int64_t n = next++; n < items; n = next++) {
      const RowTile& t = tiles[n / Hkv];
      const int64_t kv = n % Hkv;
      const kvengine::layer::AttendTile<T, C> tile{qkv.data_ptr<T>() + kv * group * D, width, t.r0, t.r1, group,
                                                kc + kv * head_stride, vc + kv * head_stride, sp + qp[t.r0] * Lmax,
                                                lp, D, static_cast<float>(scale),
                                                attn.data_ptr<T>() + kv * group * D, Hq * D};
      attend_tile(tile, scratch.get());
    }
  });
  at::Tensor out = x.clone();  // [M, H]: the residual stream
  add_into(out, linear(attn, w, 3));

  // MLP block: down(silu(gate) * up), kMlpRows rows at a time (each row's result is its own, so the same)
  const at::Tensor normed = rms_norm(out, w[5], eps);  // [M, H]
  for (int64_t r0 = 0; r0 < M; r0 += kvengine::layer::kMlpRows) {
    const int64_t rows = std::min(kvengine::layer::kMlpRows, M - r0);
    at::Tensor gate_up = linear(normed.narrow(0, r0, rows), w, 6);  // [rows, 2I]
    const int64_t I = gate_up.size(1) / 2;
    at::Tensor act = at::empty({rows, I}, x.options());  // [rows, I]
    swiglu(gate_up.data_ptr<T>(), rows, I, act.data_ptr<T>());
    at::Tensor out_rows = out.narrow(0, r0, rows);  // [rows, H], contiguous
    add_into(out_rows, linear(act, w, 8));
  }
  return out;
}
