// The amx tier's tile kernels (fp32_mm.h), for Intel Xeons with AMX (Sapphire Rapids and later): the avx512vnni
// tier's kernels (avx512_tiles.h) for one row and short blocks, and for blocks of kAmxRows rows or more a pass whose
// integer products are AMX tile multiplies.
//
// One TDPBSUD multiplies 16 rows of x's codes (A: 16 x 32 signed bytes, a group of each row: block_slot lays a
// group's rows one after another, 32 bytes apart) by a group of one weight tile (B: 8 rows of 16 outputs x 4 inputs,
// unsigned: the very registers the avx512vnni kernels' VPDPBUSD reads, q4_group's unpacked nibbles or q8's stored
// bytes q + 128) into C, 16 rows x 16 outputs of int32 sums: 8,192 products in one instruction, where VPDPBUSD
// makes 64. The sums are those VPDPBUSD makes, exactly; C is stored, and each row's sum takes the avx512vnni
// tier's fp32 step for its group (Q4Pass / Q8Pass: start, step, finish), so the two tiers agree bit for bit. That
// step, one per row, tile and group as before, is now most of the work, and the tile unit's runs beside it only in
// part: on an Intel Xeon with AMX, one step of 16 rows x 2 tiles took 16.5 ns of tile loads, multiplies and stores
// alone, 30 ns of fp32 steps alone, 39 ns interleaved as amx_pass does (a C program in a loop, one core).
//
// Linux gives a process AMX's tile state only once asked (arch_prctl ARCH_REQ_XCOMP_PERM): native.py asks before it
// offers this tier, and tiles_granted asks again here; where the answer is no, every block takes the avx512vnni
// kernels.

#include <sys/syscall.h>
#include <unistd.h>

#include "avx512_tiles.h"

namespace KV_OPS {
namespace {

using avx512::BlockSums;
using avx512::Q4Pass;
using avx512::Q8Pass;

// Blocks of fewer rows than this take the avx512vnni kernels: a tile multiply and store cost the same for 1 row as
// for 16. 2,048 x 2,048 int4 and int8 gemms, 2 threads, Intel Xeon with AMX, against avx512vnni: 4 rows 0.51-0.52x,
// 8 rows 0.71-0.79x, 12 rows 0.91-1.03x, 16 rows 1.01-1.29x, 32 rows 1.23-1.24x.
constexpr int kAmxRows = 16;

bool tiles_granted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>, the kernel's xfeature number
  static const bool granted = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

// The tile registers' roles (GCC's tile intrinsics paste the register's number into their assembly, so these are
// macros): x's codes A, a group of weight tile u B<u>, its products C<u>
#define KV_TILE_A0 0
#define KV_TILE_B0 1
#define KV_TILE_B1 2
#define KV_TILE_C00 3
#define KV_TILE_C01 4
#define KV_TILE_A1 5
#define KV_TILE_C10 6
#define KV_TILE_C11 7
struct TileConfig {  // LDTILECFG's operand, palette 1
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes a row
  uint8_t rows[16] = {};
};

TileConfig tile_config() {
  TileConfig c;
  for (int a : {KV_TILE_A0, KV_TILE_A1}) c.rows[a] = 16, c.colsb[a] = kGroup;  // 16 rows of x, 32 codes each
  for (int b : {KV_TILE_B0, KV_TILE_B1}) c.rows[b] = kGroup / 4, c.colsb[b] = 64;  // 8 rows of 16 outputs x 4 inputs
  for (int p : {KV_TILE_C00, KV_TILE_C01, KV_TILE_C10, KV_TILE_C11}) c.rows[p] = 16, c.colsb[p] = 64;  // int32 sums
  return c;
}
// In static storage: GCC's _tile_loadconfig tells the compiler it reads 8 bytes of its operand, so a configuration
// built on the stack just before lost its other stores to dead-store elimination
const TileConfig kTileConfig = tile_config();

void configure_tiles() { _tile_loadconfig(&kTileConfig); }

// one step's tile multiplies: 16 rows of x from xg + i0 rows into tile A, their products with tile u's group into
// C<u>, stored to c[parity][u]
#define KV_AMX_STEP(A, C0, C1)                        \
  do {                                                \
    _tile_loadd(A, xg + i0 * kGroup, kGroup);         \
    _tile_zero(C0);                                   \
    _tile_dpbsud(C0, A, KV_TILE_B0);                  \
    _tile_stored(C0, c[parity][0], 64);               \
    if constexpr (P == 2) {                           \
      _tile_zero(C1);                                 \
      _tile_dpbsud(C1, A, KV_TILE_B1);                \
      _tile_stored(C1, c[parity][1], 64);             \
    }                                                 \
  } while (0)

template <int P, typename F>
void amx_pass(const F& f, const int8_t* xq, float* y, int R, int64_t G, int64_t N, int64_t t) {
  using Group = typename F::Group;
  BlockSums<P> sums(R);
  auto& acc = sums.acc;
  alignas(64) uint8_t b[P][kGroup * 16];  // [tile][8 rows of 64 bytes]
  alignas(64) int32_t c[2][P][16][16];    // [step parity][tile][row][output]
  Group group[2][P];                      // [group parity][tile]
  struct Pending {
    int64_t slot;  // of its first row
    int i0, rows, parity;
    const Group* group;
  } pending{0, 0, 0, 0, nullptr};
  const auto step_rows = [&](const Pending& p) {
    for (int i = 0; i < p.rows; ++i)
      for (int u = 0; u < P; ++u) {
        const __m512i sum = _mm512_add_epi32(f.start(p.slot + i), _mm512_load_si512(c[p.parity][u][i]));
        float* a = acc[p.i0 + i][u];
        _mm512_store_ps(a, f.step(_mm512_load_ps(a), sum, p.group[u], p.slot + i));
      }
  };
  configure_tiles();
  int parity = 0;
#pragma GCC unroll 1
  for (int64_t g = 0; g < G; ++g) {
    Group* gr = group[g & 1];
    for (int u = 0; u < P; ++u) {
      f.prefetch(t + u, g);
      f.load(gr[u], t + u, g);
      for (int k = 0; k < 8; ++k) _mm512_store_si512(b[u] + 64 * k, gr[u].wv[k]);
    }
    _tile_loadd(KV_TILE_B0, b[0], 64);
    if constexpr (P == 2) _tile_loadd(KV_TILE_B1, b[1], 64);
    const int64_t s = in_block(0, g, R);
    const int8_t* xg = xq + s * kGroup;
#pragma GCC unroll 1
    for (int i0 = 0; i0 < R; i0 += 16) {
      if (parity)
        KV_AMX_STEP(KV_TILE_A1, KV_TILE_C10, KV_TILE_C11);
      else
        KV_AMX_STEP(KV_TILE_A0, KV_TILE_C00, KV_TILE_C01);
      if (pending.group) step_rows(pending);
      pending = Pending{s + i0, i0, std::min(16, R - i0), parity, gr};
      parity ^= 1;
    }
  }
  step_rows(pending);
  _tile_release();
  sums.store(f, y, R, N, t);
}

template <typename F>
void amx_span(const F& f, const int8_t* xq, float* y, int R, int64_t G, int64_t N, int64_t t, int span) {
  if (span == 2) return amx_pass<2>(f, xq, y, R, G, N, t);
  amx_pass<1>(f, xq, y, R, G, N, t);
}

bool amx_block(int R) { return R >= kAmxRows && tiles_granted(); }

}  // namespace

template <bool Symmetric>
void q4_tile(const int8_t* xq, const float* da, const float* sx, const uint8_t* w, const at::Half* dm, float* y, int R,
             int64_t K, int64_t N, int64_t t, int span) {
  if (!amx_block(R)) return avx512::q4_tile<Symmetric>(xq, da, sx, w, dm, y, R, K, N, t, span);
  const int64_t G = K / kGroup;
  amx_span(Q4Pass<Symmetric>{da, sx, w, dm, G}, xq, y, R, G, N, t, span);
}
KV_Q4_TILE_FORMS

void q8_tile(const int8_t* xq, const Q8Side& side, const float* da, const uint8_t* w, const float* scale, float* y,
             int R, int64_t K, int64_t N, int64_t t, int span) {
  if (!amx_block(R)) return avx512::q8_tile(xq, side, da, w, scale, y, R, K, N, t, span);
  amx_span(Q8Pass{side.code_sums, da, scale, w, K}, xq, y, R, K / kGroup, N, t, span);
}

const Q8Reads kQ8Reads = avx512::kReads;
const int kTileSpan = avx512::kSpan;

}  // namespace KV_OPS
