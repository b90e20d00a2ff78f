// The register-blocked micro-kernel of the tiled algorithm (tiled.cpp), written once with GCC's
// vector extensions and compiled once per instruction set: tiled.cpp includes this file inside a
// namespace per ISA, under `#pragma GCC target`, after defining
//   FASTPRUNE_LANES    floats per vector register (16 for AVX-512, 8 for AVX2, 4 for SSE2),
//   FASTPRUNE_MAX_ACC  how many accumulator registers a tile may take (the rest hold the weight and
//                      the loads: 24 of AVX-512's 32, 12 of AVX2's 16, 12 of SSE's 16).
// No includes here: the file is pasted into a namespace.

constexpr int kLanes = FASTPRUNE_LANES;
constexpr int kMaxAcc = FASTPRUNE_MAX_ACC;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float uvec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));  // unaligned

// One output channel over one tile: R runs of VR vectors each (run r starts run_stride floats after
// run r - 1, in the input and in the staged layout alike), accumulated in registers over the
// channel's non-zeros [e0, e1): acc[r][j] += vals[e] * base[offs[e] + r * run_stride + j * kLanes : + kLanes].
// The sums (plus the bias) go to scratch, run r at scratch + r * pitch. Each non-zero costs one
// broadcast and R * VR fused multiply-adds with a memory operand: no accumulator traffic at all.
template <int R, int VR>
void tile_kernel(const float* __restrict__ base, int64_t run_stride, const int32_t* __restrict__ offs,
                 const float* __restrict__ vals, int64_t e0, int64_t e1, float bias, float* __restrict__ scratch,
                 int64_t pitch) {
  vec acc[R][VR];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
    for (int j = 0; j < VR; ++j) acc[r][j] = vec{} + bias;
  for (int64_t e = e0; e < e1; ++e) {
    const float* p = base + offs[e];
    const vec v = vec{} + vals[e];
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
      for (int j = 0; j < VR; ++j) acc[r][j] += v * *reinterpret_cast<const uvec*>(p + r * run_stride + j * kLanes);
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 24
    for (int j = 0; j < VR; ++j) *reinterpret_cast<uvec*>(scratch + r * pitch + j * kLanes) = acc[r][j];
}

using TileFn = void (*)(const float*, int64_t, const int32_t*, const float*, int64_t, int64_t, float, float*, int64_t);

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
