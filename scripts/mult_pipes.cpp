// What one core's multiply pipes allow the int4 many-row kernel (avx512_tiles.cpp's tiles_pass), measured apart
// from kvengine: the rate of independent VPDPBUSDs, then the kernel's loop shape (two 16-row weight tiles unpacked
// in registers, 64 rows of x's codes, a group of 32 inputs at a time) with its per-group scale step as it is (two
// FMAs a tile and row), with one FMA, and with a plain add. The FMAs share the two multiply pipes with VPDPBUSD, so
// the step's cost is the format's ceiling; the last rows stream the weights from 128 MiB with and without asking
// for them 4 groups ahead (as fp32_mm.h's kPassPrefetchBytes does: 1 KB of a tile's 256-byte groups). Needs
// AVX-512 VNNI:
//
//     g++ -O3 -march=native scripts/mult_pipes.cpp -o /tmp/mult_pipes && /tmp/mult_pipes
//
// Rates are GMAC/s of one core (run two at once to see both cores'); docs/benchmarks.md has this host's.

#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__AVX512VNNI__) && defined(__AVX512F__)

namespace {

constexpr int kRows = 64, kGroups = 64, kGroup = 32;  // a block of x: 64 rows x 2,048 inputs
constexpr long kStreamPasses = 2048;                  // passes' weights laid end to end: 2048 x 64 KiB

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

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

enum class Step { kTwoFma, kOneFma, kAdd };

// One pass: for each group, two tiles' 16 output rows x 32 inputs (8 registers each, kept as loaded), every row of
// x's block against them in two VPDPBUSD chains a tile, then the step into the row's sums in L1.
// Ahead: groups ahead whose weights are asked for (0: none); a group of the two tiles is 16 lines here
template <Step S, int Ahead>
__attribute__((noinline)) void pass(const __m512i* w, const int8_t* xq, const float* da, const float* sx,
                                    const float* d, float* acc) {
  for (int g = 0; g < kGroups; ++g) {
    if (Ahead > 0)
      for (int l = 0; l < 16; ++l) __builtin_prefetch(w + (g + Ahead) * 16 + l);
    __m512i wv[2][8];
    for (int u = 0; u < 2; ++u)
      for (int c = 0; c < 8; ++c) wv[u][c] = _mm512_loadu_si512(w + (g * 2 + u) * 8 + c);
    const __m512 dd[2] = {_mm512_loadu_ps(d + g * 32), _mm512_loadu_ps(d + g * 32 + 16)};
    const int8_t* xg = xq + g * kRows * kGroup;
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
        float* a = acc + (i * 2 + u) * 16;
        const __m512 old = _mm512_load_ps(a);
        if (S == Step::kTwoFma)
          _mm512_store_ps(a, _mm512_fmadd_ps(dd[u], _mm512_fmadd_ps(dot, _mm512_set1_ps(da[g * kRows + i]),
                                                                    _mm512_set1_ps(sx[g * kRows + i])), old));
        else if (S == Step::kOneFma)
          _mm512_store_ps(a, _mm512_fmadd_ps(dot, dd[u], old));
        else
          _mm512_store_ps(a, _mm512_add_ps(dot, old));
      }
    }
  }
}

template <Step S, int Ahead>
double pass_rate(const __m512i* w, long passes, const int8_t* xq, const float* da, const float* sx, const float* d,
                 float* acc) {
  const int n = 20000;
  for (int i = 0; i < 200; ++i) pass<S, Ahead>(w, xq, da, sx, d, acc);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) pass<S, Ahead>(w + (i % passes) * (kGroups * 16), xq, da, sx, d, acc);
  return static_cast<double>(n) * kGroups * kRows * 2 * 16 * kGroup / seconds_since(t0) / 1e9;
}

template <typename T>
T* buffer(size_t count) {
  void* p = std::aligned_alloc(64, (count * sizeof(T) + 63) / 64 * 64);
  std::memset(p, 0, count * sizeof(T));
  return static_cast<T*>(p);
}

}  // namespace

int main() {
  const size_t weight_bytes = kStreamPasses * kGroups * 16 * 64;
  auto* w = buffer<__m512i>(weight_bytes / 64);
  for (size_t i = 0; i < weight_bytes; ++i) reinterpret_cast<uint8_t*>(w)[i] = static_cast<uint8_t>(i * 7 % 16);
  auto* xq = buffer<int8_t>(kGroups * kRows * kGroup);
  for (int i = 0; i < kGroups * kRows * kGroup; ++i) xq[i] = static_cast<int8_t>(i * 13 % 255 - 127);
  auto *da = buffer<float>(kGroups * kRows), *sx = buffer<float>(kGroups * kRows), *d = buffer<float>(kGroups * 32);
  for (int i = 0; i < kGroups * kRows; ++i) da[i] = 0.01f, sx[i] = 0.1f;
  for (int i = 0; i < kGroups * 32; ++i) d[i] = 0.5f;
  auto* acc = buffer<float>(kRows * 2 * 16);
  std::printf("| loop (one core) | GMAC/s |\n| --- | --- |\n");
  std::printf("| independent VPDPBUSDs | %.1f |\n", vpdpbusd_peak());
  std::printf("| tile pass, weights in L1, step of two FMAs (the kernel's) | %.1f |\n",
              pass_rate<Step::kTwoFma, 0>(w, 1, xq, da, sx, d, acc));
  std::printf("| tile pass, weights in L1, step of one FMA | %.1f |\n",
              pass_rate<Step::kOneFma, 0>(w, 1, xq, da, sx, d, acc));
  std::printf("| tile pass, weights in L1, step of one add | %.1f |\n",
              pass_rate<Step::kAdd, 0>(w, 1, xq, da, sx, d, acc));
  std::printf("| tile pass, weights streamed from 128 MiB | %.1f |\n",
              pass_rate<Step::kTwoFma, 0>(w, kStreamPasses, xq, da, sx, d, acc));
  std::printf("| tile pass, weights streamed, asked for 4 groups ahead | %.1f |\n",
              pass_rate<Step::kTwoFma, 4>(w, kStreamPasses, xq, da, sx, d, acc));
  return 0;
}

#else

int main() {
  std::puts("mult_pipes: this compiler target has no AVX-512 VNNI (build with -march=native on such a CPU)");
  return 0;
}

#endif
