// What one core's multiply pipes allow the int4 many-row kernels, measured apart from kvengine, in cycles of the
// core's own clock (taken from a chain of dependent 64-bit IMULs, 3 cycles each on every x86 core since 2008) as
// well as GMAC/s, so that a VM's changing clock does not hide the shape of the limits.
//
// AVX-512 VNNI (avx512_tiles.cpp's tiles_pass): the rate of independent VPDPBUSDs, then the kernel's loop shape
// (two 16-row weight tiles unpacked in registers, 64 rows of x's codes, a group of 32 inputs at a time) with its
// per-group scale step as it is (two FMAs a tile and row), with one FMA, and with a plain add. The FMAs share the
// two multiply pipes with VPDPBUSD, so the step's cost is the format's ceiling; the last rows stream the weights
// from 128 MiB with and without asking for them 4 groups ahead (as fp32_mm.h's kPassPrefetchBytes does: 1 KB of a
// tile's 256-byte groups).
//
// AVX2 (avx2_tiles.cpp's q4_one): the rate of independent VPMADDUBSWs alone and issued 1:1 with each other operation
// the kernel's loop holds (VPMADDWD, FMA, VCVTDQ2PS, VPADDW, VPBROADCASTD from memory): where the pair takes twice
// the VPMADDUBSWs' time alone, the two share the pipes. Then the kernel's loop shape (half a 16-row tile, 8 outputs
// x 32 inputs unpacked from int4 into 8 registers, 64 rows, 4 rows' byte products at a time, summed as a tree) with
// its step of two FMAs, one FMA and one add, weights in L1 and streamed from 128 MiB. Built with -march=native, a
// CPU with both runs both.
//
//     g++ -O3 -march=native scripts/mult_pipes.cpp -o /tmp/mult_pipes && /tmp/mult_pipes
//
// Rates are of one core (run two at once to see both cores'); docs/benchmarks.md has the hosts'.

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int kRows = 64, kGroups = 64, kGroup = 32;  // a block of x: 64 rows x 2,048 inputs
constexpr long kStreamBytes = 128L << 20;             // weights streamed: passes laid end to end in 128 MiB

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <typename T>
T* buffer(size_t count) {
  void* p = std::aligned_alloc(64, (count * sizeof(T) + 63) / 64 * 64);
  std::memset(p, 0, count * sizeof(T));
  return static_cast<T*>(p);
}

// the core's clock in GHz: a chain of dependent IMULs, 3 cycles each
double clock_ghz() {
  const long n = 50000000;
  long x = 3;
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) __asm__ volatile("imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0" : "+r"(x));
  return n * 12.0 / seconds_since(t0) / 1e9;
}

// The operands of a pass, as the kernels read them: x's block group-major (codes [G, 64, 32], scales and sums
// [G, 64]), one weight scale per output and group, the rows' sums, and weights for kStreamBytes (int4 codes in
// every nibble) of which a pass reads `pass_bytes` from an offset
struct Operands {
  int8_t* xq;
  float *da, *sx, *d, *acc;
  uint8_t* w;
  long passes;  // of the weights' passes laid end to end
};

[[maybe_unused]] Operands make_operands(long pass_bytes) {
  Operands o{buffer<int8_t>(kGroups * kRows * kGroup), buffer<float>(kGroups * kRows), buffer<float>(kGroups * kRows),
             buffer<float>(kGroups * 32), buffer<float>(kRows * 32), buffer<uint8_t>(kStreamBytes),
             kStreamBytes / pass_bytes};
  for (int i = 0; i < kGroups * kRows * kGroup; ++i) o.xq[i] = static_cast<int8_t>(i * 13 % 255 - 127);
  for (int i = 0; i < kGroups * kRows; ++i) o.da[i] = 0.01f, o.sx[i] = 0.1f;
  for (int i = 0; i < kGroups * 32; ++i) o.d[i] = 0.5f;
  for (long i = 0; i < kStreamBytes; ++i) o.w[i] = static_cast<uint8_t>(i * 7 % 256);
  return o;
}

// GMAC/s of `pass` (the weights from w + offset) over the first `passes` passes of the weights (1: the same, in
// L1), the median of 3 runs
template <typename Pass>
double pass_rate(const Pass& pass, long pass_bytes, long passes, long macs_per_pass) {
  const int n = 10000;
  for (int i = 0; i < 200; ++i) pass(0);
  double rates[3];
  for (double& rate : rates) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) pass((i % passes) * pass_bytes);
    rate = static_cast<double>(n) * macs_per_pass / seconds_since(t0) / 1e9;
  }
  std::sort(rates, rates + 3);
  return rates[1];
}

void row(const char* loop, double gmac, double ghz) { std::printf("| %s | %.1f | %.1f |\n", loop, gmac, gmac / ghz); }

enum class Step { kTwoFma, kOneFma, kAdd };

// the loop shapes' rows of the table, each step with weights in L1, then the kernel's streamed without and with
// asking for them 4 groups ahead (fp32_mm.h's kPassPrefetchBytes: 1 KB of the kernels' 256-byte groups)
template <template <Step, bool> class Pass>
void pass_rows(const Operands& o, double ghz, const char* name) {
  const long bytes = Pass<Step::kTwoFma, false>::kBytes, macs = Pass<Step::kTwoFma, false>::kMacs;
  char text[160];
  const auto line = [&](const char* what, double rate) {
    std::snprintf(text, sizeof text, "%s, %s", name, what);
    row(text, rate, ghz);
  };
  line("weights in L1, step of two FMAs (the kernel's)", pass_rate(Pass<Step::kTwoFma, false>{o}, bytes, 1, macs));
  line("weights in L1, step of one FMA", pass_rate(Pass<Step::kOneFma, false>{o}, bytes, 1, macs));
  line("weights in L1, step of one add", pass_rate(Pass<Step::kAdd, false>{o}, bytes, 1, macs));
  line("weights streamed from 128 MiB", pass_rate(Pass<Step::kTwoFma, false>{o}, bytes, o.passes, macs));
  line("weights streamed, asked for 4 groups ahead", pass_rate(Pass<Step::kTwoFma, true>{o}, bytes, o.passes, macs));
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__)

double vpdpbusd_peak() {
  constexpr int kChains = 12;  // enough independent sums to cover the instruction's latency on two pipes
  const long n = 100000000;
  __m512i a = _mm512_set1_epi8(3);
  const __m512i b = _mm512_set1_epi8(5);
  __m512i acc[kChains];
  for (auto& s : acc) s = _mm512_setzero_si512();
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 12
    for (auto& s : acc) s = _mm512_dpbusd_epi32(s, a, b);
    __asm__ volatile("" : "+v"(a));  // keeps the loop from being folded
  }
  const double s = seconds_since(t0);
  int sink = 0;
  for (const auto& v : acc) sink += _mm512_reduce_add_epi32(v);
  if (sink == 1) std::puts("");
  return n * kChains * 64.0 / s / 1e9;
}

// One pass of avx512_tiles.cpp's shape: for each group, two tiles' 16 output rows x 32 inputs (8 registers each,
// kept as loaded), every row of x's block against them in two VPDPBUSD chains a tile, then the step into the row's
// sums in L1.
template <Step S, bool Ahead>
struct Avx512Pass {
  static constexpr long kBytes = kGroups * 2 * 8 * 64, kMacs = long{kGroups} * kRows * 2 * 16 * kGroup;
  const Operands& o;
  __attribute__((noinline)) void operator()(long offset) const {
    const __m512i* w = reinterpret_cast<const __m512i*>(o.w + offset);
    for (int g = 0; g < kGroups; ++g) {
      if (Ahead)
        for (int l = 0; l < 16; ++l) __builtin_prefetch(w + (g + 4) * 16 + l);  // 4 groups of the two tiles on
      __m512i wv[2][8];
      for (int u = 0; u < 2; ++u)
        for (int c = 0; c < 8; ++c) wv[u][c] = _mm512_loadu_si512(w + (g * 2 + u) * 8 + c);
      const __m512 dd[2] = {_mm512_loadu_ps(o.d + g * 32), _mm512_loadu_ps(o.d + g * 32 + 16)};
      const int8_t* xg = o.xq + g * kRows * kGroup;
#pragma GCC unroll 1
      for (int i = 0; i < kRows; ++i) {
        __m512i s0[2], s1[2];
        for (int u = 0; u < 2; ++u) s0[u] = s1[u] = _mm512_setzero_si512();
        for (int c = 0; c < 8; c += 2) {
          const __m512i x0 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xg + i * kGroup + 4 * c));
          const __m512i x1 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xg + i * kGroup + 4 * c + 4));
          for (int u = 0; u < 2; ++u) {
            s0[u] = _mm512_dpbusd_epi32(s0[u], wv[u][c], x0);
            s1[u] = _mm512_dpbusd_epi32(s1[u], wv[u][c + 1], x1);
          }
        }
        for (int u = 0; u < 2; ++u) {
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[u], s1[u]));
          float* a = o.acc + (i * 2 + u) * 16;
          const __m512 old = _mm512_load_ps(a);
          if (S == Step::kTwoFma)
            _mm512_store_ps(a, _mm512_fmadd_ps(dd[u], _mm512_fmadd_ps(dot, _mm512_set1_ps(o.da[g * kRows + i]),
                                                                      _mm512_set1_ps(o.sx[g * kRows + i])), old));
          else if (S == Step::kOneFma)
            _mm512_store_ps(a, _mm512_fmadd_ps(dot, dd[u], old));
          else
            _mm512_store_ps(a, _mm512_add_ps(dot, old));
        }
      }
    }
  }
};

#endif  // AVX-512 VNNI

#if defined(__AVX2__) && defined(__FMA__)

// Cycles per VPMADDUBSW of VPMADDUBSWs that depend on nothing (each writes a register no later one reads), alone or
// each issued with one `Other` that depends on nothing either (the FMAs: 8 sums, one FMA each an iteration, their
// latency within the VPMADDUBSWs' time): 0.5 alone means two pipes; ~1 with an operation means that operation
// takes the same two.
enum class Other { kNone, kMaddwd, kFma, kCvt, kAddw, kBroadcast };

template <Other O>
double maddubs_cycles_once(double ghz) {
  alignas(32) static int32_t mem[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  const long n = 10000000;
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
#define KV_MADDUBS(r) "vpmaddubsw %%ymm15, %%ymm14, %%ymm" #r "\n\t"
#define KV_EIGHT(M) M(0) M(1) M(2) M(3) M(0) M(1) M(2) M(3)
#define KV_OTHERS(M) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
#define KV_MADDWD(r) "vpmaddwd %%ymm15, %%ymm14, %%ymm" #r "\n\t"
#define KV_FMA(r) "vfmadd231ps %%ymm15, %%ymm14, %%ymm" #r "\n\t"
#define KV_CVT(r) "vcvtdq2ps %%ymm15, %%ymm" #r "\n\t"
#define KV_ADDW(r) "vpaddw %%ymm15, %%ymm14, %%ymm" #r "\n\t"
#define KV_BROADCAST(r) "vpbroadcastd (%0), %%ymm" #r "\n\t"
#define KV_WITH(OTHER)                                                                                   \
  __asm__ volatile(KV_EIGHT(KV_MADDUBS) KV_OTHERS(OTHER)::"r"(mem)                                        \
                   : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
                     "xmm11")
    if constexpr (O == Other::kNone)
      __asm__ volatile(KV_EIGHT(KV_MADDUBS)::: "xmm0", "xmm1", "xmm2", "xmm3");
    else if constexpr (O == Other::kMaddwd)
      KV_WITH(KV_MADDWD);
    else if constexpr (O == Other::kFma)
      KV_WITH(KV_FMA);
    else if constexpr (O == Other::kCvt)
      KV_WITH(KV_CVT);
    else if constexpr (O == Other::kAddw)
      KV_WITH(KV_ADDW);
    else
      KV_WITH(KV_BROADCAST);
  }
  return seconds_since(t0) * ghz * 1e9 / (n * 8.0);
}

// the median of 5 runs (a VM's neighbours move single ones by up to ~1.5x)
template <Other O>
double maddubs_cycles(double ghz) {
  double runs[5];
  for (double& r : runs) r = maddubs_cycles_once<O>(ghz);
  std::sort(runs, runs + 5);
  return runs[2];
}

// x's 4 codes at p broadcast to every int32 lane
inline __m256i codes4(const int8_t* p) { return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }

// One pass of avx2_tiles.cpp's many-row shape: for each half of a 16-row tile and each group, the half's 8 outputs x
// 32 inputs unpacked from the tile's 4 loads into 8 registers, then 4 rows at a time their byte products
// (VPMADDUBSW, summed as a tree in int16, widened by VPMADDWD) and each row's step into its sums in L1.
template <Step S, bool Ahead>
struct Avx2Pass {
  static constexpr long kBytes = kGroups * 256, kMacs = long{kGroups} * kRows * 16 * kGroup;
  const Operands& o;
  __attribute__((noinline)) void operator()(long offset) const {
    const uint8_t* w = o.w + offset;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 1
      for (int g = 0; g < kGroups; ++g) {
        if (Ahead && h == 0)
          for (int l = 0; l < 4; ++l) __builtin_prefetch(w + g * 256 + 1024 + 64 * l);  // 4 groups on
        __m256i wv[8];
        for (int j = 0; j < 4; ++j) {
          const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 256 + j * 64 + 32 * h));
          wv[2 * j] = _mm256_and_si256(p, nibble);
          wv[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), nibble);
        }
        const __m256 d = _mm256_loadu_ps(o.d + g * 32 + 8 * h);
        const int8_t* xg = o.xq + g * kRows * kGroup;
#pragma GCC unroll 1
        for (int i = 0; i < kRows; i += 4) {
          __m256 dot[4];
          for (int r = 0; r < 4; ++r) {
            __m256i p[8];
            for (int c = 0; c < 8; ++c) p[c] = _mm256_maddubs_epi16(wv[c], codes4(xg + (i + r) * kGroup + 4 * c));
            for (int m = 4; m > 0; m /= 2)
              for (int c = 0; c < m; ++c) p[c] = _mm256_add_epi16(p[c], p[c + m]);
            dot[r] = _mm256_cvtepi32_ps(_mm256_madd_epi16(p[0], _mm256_set1_epi16(1)));
          }
          for (int r = 0; r < 4; ++r) {
            float* a = o.acc + (i + r) * 32 + 8 * h;
            const __m256 old = _mm256_load_ps(a);
            const int x = g * kRows + i + r;
            if (S == Step::kTwoFma)
              _mm256_store_ps(a, _mm256_fmadd_ps(d, _mm256_fmadd_ps(dot[r], _mm256_set1_ps(o.da[x]),
                                                                    _mm256_set1_ps(o.sx[x])), old));
            else if (S == Step::kOneFma)
              _mm256_store_ps(a, _mm256_fmadd_ps(dot[r], d, old));
            else
              _mm256_store_ps(a, _mm256_add_ps(dot[r], old));
          }
        }
      }
  }
};

#endif  // AVX2

}  // namespace

int main() {
#if !(defined(__AVX512VNNI__) && defined(__AVX512F__)) && !(defined(__AVX2__) && defined(__FMA__))
  std::puts("mult_pipes: the compiler's target has neither AVX-512 VNNI nor AVX2 + FMA (-march=native?)");
  return 0;
#endif
  const double ghz = clock_ghz();
  std::printf("core clock %.2f GHz (a chain of IMULs)\n\n", ghz);
  std::printf("| loop (one core) | GMAC/s | MAC/cycle |\n| --- | --- | --- |\n");
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  row("independent VPDPBUSDs (zmm)", vpdpbusd_peak(), ghz);
  pass_rows<Avx512Pass>(make_operands(Avx512Pass<Step::kAdd, false>::kBytes), ghz,
                        "avx512vnni pass (2 tiles x 64 rows)");
#endif
#if defined(__AVX2__) && defined(__FMA__)
  const double alone = maddubs_cycles<Other::kNone>(ghz);  // (the peak's row and the pipes table's first)
  row("independent VPMADDUBSWs (ymm)", 32 * ghz / alone, ghz);
  pass_rows<Avx2Pass>(make_operands(Avx2Pass<Step::kAdd, false>::kBytes), ghz, "avx2 pass (half a tile x 64 rows)");
  std::printf("\n| ymm VPMADDUBSW issued with | cycles per VPMADDUBSW |\n| --- | --- |\n");
  std::printf("| nothing | %.2f |\n", alone);
  std::printf("| VPMADDWD | %.2f |\n", maddubs_cycles<Other::kMaddwd>(ghz));
  std::printf("| VFMADD231PS | %.2f |\n", maddubs_cycles<Other::kFma>(ghz));
  std::printf("| VCVTDQ2PS | %.2f |\n", maddubs_cycles<Other::kCvt>(ghz));
  std::printf("| VPADDW | %.2f |\n", maddubs_cycles<Other::kAddw>(ghz));
  std::printf("| VPBROADCASTD from memory | %.2f |\n", maddubs_cycles<Other::kBroadcast>(ghz));
#endif
  return 0;
}
