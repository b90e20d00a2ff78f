// The register-blocked micro-kernel of the tiled algorithm (tiled.cpp), written once with GCC's
// vector extensions and compiled once per instruction set: tiled.cpp includes this file inside a
// namespace per ISA, under `#pragma GCC target`, after defining
//   FASTPRUNE_LANES    floats per vector register (16 for AVX-512, 8 for AVX2, 4 for SSE2),
//   FASTPRUNE_MAX_ACC  how many accumulator registers a tile may take (the rest hold the weight and
//                      the loads: 24 of AVX-512's 32, 12 of AVX2's 16, 12 of SSE's 16).
// No includes here: the file is pasted into a namespace (TileOutput comes from tiled.cpp).

constexpr int kLanes = FASTPRUNE_LANES;
// Tiles of fewer vectors (batch 1, small maps) wait on the FMA latency, not on their loads.
constexpr int kPrefetchMinVectors = 8;
constexpr int kMaxAcc = FASTPRUNE_MAX_ACC;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float uvec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));  // unaligned

// max(a, b) as std::max computes it, lane by lane (a NaN in a wins, in b loses): the pooled outputs
// equal the sums path's store_pooled_row (epilogue.h) bit for bit.
inline vec lane_max(vec a, vec b) { return a < b ? b : a; }

// ReLU then 2x2 max pooling of a finished tile straight from the registers (inference: no window
// positions kept): runs r and r + 1 are a row pair, each position PP vectors (the batch block), and
// pooled position p of the pair takes positions 2p and 2p + 1; out->dst is the pooled output at the
// tile's first window, run_stride its pooled row stride, step its position stride.
template <int R, int VR, int PP>
inline __attribute__((always_inline)) void store_pooled_tile(const vec (&acc)[R][VR], const TileOutput* out) {
  const vec zero = {};
#pragma GCC unroll 24
  for (int r = 0; r + 1 < R; r += 2)
#pragma GCC unroll 24
    for (int p = 0; (2 * p + 2) * PP <= VR; ++p)
#pragma GCC unroll 4
      for (int part = 0; part < PP; ++part) {
        const int j0 = 2 * p * PP + part, j1 = j0 + PP;
        vec m = lane_max(lane_max(acc[r][j0], acc[r][j1]), lane_max(acc[r + 1][j0], acc[r + 1][j1]));
        m = m < zero ? zero : m;  // std::max(m, 0.f)
        *reinterpret_cast<uvec*>(out->dst + (r / 2) * out->run_stride + p * out->step + part * kLanes) = m;
      }
}

// One output channel over one tile: R runs of VR vectors each (run r starts run_stride floats after
// run r - 1 in the staged input), accumulated in registers over the non-zeros [e0, e1):
// acc[r][j] += vals[e] * base[offs[e] + r * run_stride + j * kLanes : + kLanes], from the bias. The
// sums end in `sums` (run r at sums + r * pitch) or, given `out`, in the output. Each non-zero costs one
// broadcast and R * VR fused multiply-adds with a memory operand: no accumulator traffic inside the
// loop. A small tile takes the non-zeros K at a time into K sets of accumulators (tile_chains), so
// consecutive FMAs do not wait on each other; the sets are summed at the end.
template <int R, int VR>
void tile_kernel(const float* __restrict__ base, int64_t run_stride, const int32_t* __restrict__ offs,
                 const float* __restrict__ vals, int64_t e0, int64_t e1, float bias, float* __restrict__ sums,
                 int64_t pitch, const TileOutput* out) {
  constexpr int K = tile_chains(R * VR, kMaxAcc);
  vec acc[K][R][VR];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
    for (int j = 0; j < VR; ++j) {
      acc[0][r][j] = vec{} + bias;
#pragma GCC unroll 4
      for (int k = 1; k < K; ++k) acc[k][r][j] = vec{};
    }
  // One base pointer per run, so that every load is [run base + offset * 4 + j * vector bytes]: one
  // addressing mode, no address arithmetic in the loop.
  const float* run_base[R];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) run_base[r] = base + r * run_stride;
  int64_t e = e0;
  for (; e + K <= e1; e += K) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const int64_t o = offs[e + k];
      const float v = vals[e + k];  // broadcast by the multiplication
      if constexpr (R * VR >= kPrefetchMinVectors) {
        // The first line of each run of the non-zero kPrefetchAhead on (offs has that many zero
        // entries past its end): the loads below wait on L2 otherwise (a tile's window over all input
        // channels does not fit L1), and the hardware prefetcher does not follow the pattern.
        const int64_t ahead = offs[e + k + kPrefetchAhead];
#pragma GCC unroll 24
        for (int r = 0; r < R; ++r) __builtin_prefetch(run_base[r] + ahead, 0, 3);
      }
#pragma GCC unroll 24
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
        for (int j = 0; j < VR; ++j)
          acc[k][r][j] += v * *reinterpret_cast<const uvec*>(run_base[r] + o + j * kLanes);
    }
  }
  for (; e < e1; ++e) {
    const int64_t o = offs[e];
    const float v = vals[e];
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
      for (int j = 0; j < VR; ++j) acc[0][r][j] += v * *reinterpret_cast<const uvec*>(run_base[r] + o + j * kLanes);
  }
#pragma GCC unroll 4
  for (int k = 1; k < K; ++k)
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
      for (int j = 0; j < VR; ++j) acc[0][r][j] += acc[k][r][j];
  if (out == nullptr) {
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
      for (int j = 0; j < VR; ++j) *reinterpret_cast<uvec*>(sums + r * pitch + j * kLanes) = acc[0][r][j];
    return;
  }
  if (out->pool) {
    if (out->per_position == 1) {
      store_pooled_tile<R, VR, 1>(acc[0], out);
    } else if (out->per_position == 2) {
      store_pooled_tile<R, VR, 2>(acc[0], out);
    } else {
      store_pooled_tile<R, VR, 4>(acc[0], out);
    }
    return;
  }
  const vec zero = {};
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
    int64_t position = 0, part = 0;  // vector j's position and its part of it, counted (no division)
#pragma GCC unroll 24
    for (int j = 0; j < VR; ++j) {
      const int64_t at = r * out->run_stride + position * out->step + part * kLanes;
      if (++part == out->per_position) part = 0, ++position;
      vec v = acc[0][r][j];
      if (out->residual != nullptr) v += *reinterpret_cast<const uvec*>(out->residual + at);
      if (out->relu || out->residual != nullptr) v = v < zero ? zero : v;  // NaN stays NaN, as std::max(v, 0)
      *reinterpret_cast<uvec*>(out->dst + at) = v;
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const int32_t*, const float*, int64_t, int64_t, float, float*, int64_t,
                        const TileOutput*);

template <int R, int VR>
constexpr TileFn tile_entry() {
  if constexpr (R * VR <= kMaxAcc) {
    return &tile_kernel<R, VR>;
  } else {
    return nullptr;
  }
}

template <int R, int... J>
TileFn tile_for_runs(int vr, std::integer_sequence<int, J...>) {
  TileFn f = nullptr;
  ((vr == J + 1 ? (void)(f = tile_entry<R, J + 1>()) : void()), ...);
  return f;
}

template <int... I>
TileFn tile_for(int runs, int vr, std::integer_sequence<int, I...>) {
  TileFn f = nullptr;
  ((runs == I + 1 ? (void)(f = tile_for_runs<I + 1>(vr, std::make_integer_sequence<int, kMaxAcc>{})) : void()), ...);
  return f;
}

// The kernel for `runs` runs of `vr` vectors (runs * vr <= kMaxAcc), or nullptr.
inline TileFn kernel_for(int runs, int vr) {
  return tile_for(runs, vr, std::make_integer_sequence<int, kMaxAcc>{});
}
