// A standalone experiment (bench/NOTES.md, session 11): does blocking the input channels, so that a
// block's input window stays in L1 while the output channels' partial sums wait in L1 between blocks,
// beat the tiled algorithm's order (each output channel's non-zeros over all input channels, the
// window in L2)? One 256 -> 256 3x3 conv on an 8x8 map, batch block of 16 images (one AVX-512 vector a
// position), tiles of 8 rows x 3 positions (24 accumulators), random non-zeros at a given density.
//   A: per tile, per output channel: all its non-zeros, accumulators in registers (tiled_kernel.h).
//   B: per tile, per chunk of Q output channels, per block of cb input channels, per output channel:
//      its non-zeros in the block, accumulators loaded from and stored to the chunk's partial sums.
// Build and run (one thread; arguments: C OC density cb Q):
//   g++ -O3 -march=native -o channel_blocking channel_blocking.cpp && ./channel_blocking 256 256 0.1 16 16
// Prints ns per non-zero (24 FMAs each) of A with software prefetches at several distances, then of A
// and B and their ratio; B's outputs are checked against A's.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <chrono>
#include <algorithm>
#include <random>
#include <cstring>
typedef float vec __attribute__((vector_size(64)));
typedef float uvec __attribute__((vector_size(64), aligned(4)));
constexpr int R = 8, VR = 3;
// The tile kernel: acc (from `io` when `load`, else zero) += the non-zeros [e0, e1), stored to `io`.
// PL > 0: a software prefetch of PL lines (from line L0) of each of the R runs of the non-zero PD
// ahead (offs is padded past its end), as tiled_kernel.h does since session 11 (PD = 4, PL = 1).
template <int PD = 0, int PL = 0, int L0 = 0>
static inline void kern(const float* __restrict__ base, int64_t rs, const int32_t* __restrict__ offs,
                        const float* __restrict__ vals, int64_t e0, int64_t e1, float* __restrict__ io, bool load) {
  vec acc[R][VR];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
    for (int j = 0; j < VR; ++j) acc[r][j] = load ? *reinterpret_cast<vec*>(io + (r * VR + j) * 16) : vec{};
  const float* rb[R];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) rb[r] = base + r * rs;
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t o = offs[e];
    const float v = vals[e];
    if constexpr (PL > 0) {
      const int64_t ahead = offs[e + PD];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
        for (int l = L0; l < L0 + PL; ++l) __builtin_prefetch(rb[r] + ahead + l * 16, 0, 3);
    }
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
      for (int j = 0; j < VR; ++j) acc[r][j] += v * *reinterpret_cast<const uvec*>(rb[r] + o + j * 16);
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
    for (int j = 0; j < VR; ++j) *reinterpret_cast<vec*>(io + (r * VR + j) * 16) = acc[r][j];
}
int main(int argc, char** argv) {
  const int C = atoi(argv[1]), OC = atoi(argv[2]); const double density = atof(argv[3]);
  const int cb = atoi(argv[4]), Q = atoi(argv[5]);
  const int H = 8, W = 8, nb = 16, gh = H + 2, gw = W + 2, plane = gh * gw * nb;
  float* x = (float*)aligned_alloc(64, (size_t)(C * plane + 4096) * 4);
  for (int i = 0; i < C * plane + 4096; ++i) x[i] = (i % 7) * 0.1f;
  std::mt19937 rng(1); std::uniform_real_distribution<float> U(0, 1);
  std::vector<int32_t> rp(OC + 1), offs, col; std::vector<float> vals;
  for (int o = 0; o < OC; ++o) {
    rp[o] = offs.size();
    for (int c = 0; c < C; ++c) for (int t = 0; t < 9; ++t) if (U(rng) < density) {
      col.push_back(c); offs.push_back(c * plane + ((t / 3) * gw + t % 3) * nb); vals.push_back(U(rng)); }
  }
  rp[OC] = offs.size();
  for (int i = 0; i < 64; ++i) offs.push_back(0);  // the prefetch reads offsets past the end
  const int nblk = (C + cb - 1) / cb;
  std::vector<int32_t> seg((size_t)OC * (nblk + 1));
  for (int o = 0; o < OC; ++o) { int e = rp[o];
    for (int b = 0; b <= nblk; ++b) { while (e < rp[o + 1] && col[e] < b * cb) ++e; seg[(size_t)o * (nblk + 1) + b] = e; } }
  const int tiles = 2;  // x0 = 0, 3 (8 x 3 tiles)
  float* out = (float*)aligned_alloc(64, (size_t)OC * tiles * 24 * 64);
  float* ps = (float*)aligned_alloc(64, (size_t)Q * 24 * 64);
  // A, with the tile kernel variant K (kern<> has no prefetch).
  auto runP = [&](auto K) {
    for (int t = 0; t < tiles; ++t) { const float* base = x + (t * 3) * nb;
      for (int o = 0; o < OC; ++o) K(base, gw * nb, offs.data(), vals.data(), rp[o], rp[o + 1], out + ((size_t)o * tiles + t) * 384, false); }
  };
  auto runA = [&] { runP(kern<>); };
  auto runB = [&] {
    for (int t = 0; t < tiles; ++t) { const float* base = x + (t * 3) * nb;
      for (int o0 = 0; o0 < OC; o0 += Q) {
        const int o1 = std::min(OC, o0 + Q);
        for (int b = 0; b < nblk; ++b)
          for (int o = o0; o < o1; ++o) { const int32_t* s = &seg[(size_t)o * (nblk + 1) + b];
            kern<>(base, gw * nb, offs.data(), vals.data(), s[0], s[1], ps + (o - o0) * 384, b > 0); }
        for (int o = o0; o < o1; ++o) memcpy(out + ((size_t)o * tiles + t) * 384, ps + (o - o0) * 384, 384 * 4);
      } }
  };
  runA(); std::vector<float> a(out, out + (size_t)OC * tiles * 384);
  runB(); double md = 0; for (size_t i = 0; i < a.size(); ++i) md = std::max(md, (double)std::fabs(a[i] - out[i]));
  const double nz = rp[OC] * (double)tiles;
  auto timeit = [&](auto f) { double b = 1e9; for (int rep = 0; rep < 30; ++rep) { auto t0 = std::chrono::steady_clock::now(); f();
      b = std::min(b, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()); } return b / nz * 1e9; };
  for (int round = 0; round < 2; ++round)
    printf("prefetch: A %.2f | first line, %d / %d / %d / %d ahead: %.2f / %.2f / %.2f / %.2f | all 3 lines, 4 ahead: %.2f ns/nz\n",
           timeit(runA), 2, 3, 4, 6, timeit([&] { runP(kern<2, 1>); }), timeit([&] { runP(kern<3, 1>); }),
           timeit([&] { runP(kern<4, 1>); }), timeit([&] { runP(kern<6, 1>); }), timeit([&] { runP(kern<4, 3>); }));
  for (int round = 0; round < 3; ++round) {
    double best[2] = {1e9, 1e9};
    for (int rep = 0; rep < 30; ++rep) for (int k = 0; k < 2; ++k) {
      auto t0 = std::chrono::steady_clock::now(); if (k == 0) runA(); else runB();
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); best[k] = std::min(best[k], s); }
    printf("A %.1f ns/nz (%.1f cyc@3.4)  B(cb=%d,Q=%d) %.1f ns/nz  A/B %.2f  maxdiff %.1e\n", best[0] / nz * 1e9, best[0] / nz * 3.4e9, cb, Q,
           best[1] / nz * 1e9, best[0] / best[1], md);
  }
}
