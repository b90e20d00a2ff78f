// What the CPU sparse kernels share (csrc/sparse/*.cpp): the AXPY inner loops, multi-versioned for
// AVX2 and baseline x86-64; the range of output rows a tap reaches; each algorithm's entry point.
// The algorithms (sparsify times them per layer and keeps the fastest):
//   padded.cpp           algo 1: channel-major zero-padded copy of the input, one long AXPY per
//                        non-zero over the whole batch (any stride; small maps);
//   direct.cpp           algo 2: NCHW planes, row-wise AXPYs, no re-layout (wide maps, batch 1);
//   batch_innermost.cpp  algo 3: activations (C, H, W, N), the batch is the vector dimension;
//   tiled.cpp            algo 4: register-blocked output tiles over a staged, padded, batch-blocked
//                        copy of the input (tiled_kernel.h: the micro-kernel, per instruction set);
//   small_map.cpp        inside algo 4 at batch 1: maps of at most 64 positions, each tap a shift of
//                        the whole plane;
//   generated.cpp        algo 5: AVX-512 machine code written per layer for its pattern (24 output
//                        channels a kernel) over the tiled algorithm's staging (x86_emitter.h);
//   conv.cpp             the op: checks, algorithm by shape, output allocation; linear.cpp the
//                        sparse linear layer; weight_grad.cpp the gradient at the non-zeros.
//                        epilogue.h: ReLU / 2x2 max pooling / residual stores.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPRUNE_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTPRUNE_CPU_CLONES
#endif

namespace fastprune {
namespace sparse_cpu {

// A convolution's CSR weight and geometry, and the epilogue its kernel fuses.
struct ConvArgs {
  const int32_t* rp;    // row_ptr: output channel oc's non-zeros are [rp[oc], rp[oc + 1])
  const int32_t* cols;  // column (ic * kh + r) * kw + s of each non-zero
  const float* vals;
  const float* bias;    // or nullptr
  int64_t oc_count, kh, kw, stride_h, stride_w, pad_h, pad_w;
  bool relu, pool;      // ReLU; ReLU then 2x2 max pooling
  // Where the pooling's window positions go (for its backward pass), or nullptr: the algorithm
  // allocates it with its output's sizes and strides (pool_index_like).
  at::Tensor* pool_index = nullptr;
  // The col_idx tensor itself (or nullptr): lets the tiled algorithm cache what it derives from the
  // pattern per weight and geometry.
  const at::Tensor* cols_tensor = nullptr;
  // The values tensor itself (or nullptr): the generated algorithm's code holds the values.
  const at::Tensor* vals_tensor = nullptr;
};

// The uint8 tensor of the pooling's window positions, out's sizes and strides, when the caller
// asked for it (a.pool_index); nullptr otherwise.
inline uint8_t* pool_index_like(const ConvArgs& a, const at::Tensor& out) {
  if (a.pool_index == nullptr || !a.pool) return nullptr;
  *a.pool_index = at::empty_strided(out.sizes(), out.strides(), out.options().dtype(at::kByte));
  return a.pool_index->mutable_data_ptr<uint8_t>();
}

// An uninitialised CPU tensor of these sizes (and strides), its memory reused from a tensor that
// died, the most recent one large enough (memory_pool.cpp: a large fresh allocation page-faults on
// its first write; a recently freed block is still in cache); small ones from at::empty.
// release_pooled_memory frees the kept blocks, returning their bytes.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options);
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);
int64_t release_pooled_memory();

// Algorithm 1 (padded) and 2 (direct) write into ``out`` (N, OC, H', W'), contiguous or
// channels_last; algorithms 3 and 4 return their (C, H, W, N)-laid output, with the residual epilogue.
void conv_padded(const at::Tensor& x, const ConvArgs& a, at::Tensor& out);
void conv_direct(const at::Tensor& x, const ConvArgs& a, at::Tensor& out);
at::Tensor conv_batch_innermost(const at::Tensor& x, const ConvArgs& a, const std::optional<at::Tensor>& residual);
at::Tensor conv_tiled(const at::Tensor& x, const ConvArgs& a, const std::optional<at::Tensor>& residual);
// Algorithm 5 (generated.cpp): code per layer where generated_applicable, else algorithm 4.
// pad_planes: the output's channel planes one vector apart more than their size (algo 6; see
// generated.cpp's channel_plane), for the next generated layer to read in place.
at::Tensor conv_generated(const at::Tensor& x, const ConvArgs& a, const std::optional<at::Tensor>& residual,
                          bool pad_planes = false);
bool generated_applicable(int64_t n, bool pool, int64_t stride_h, int64_t stride_w, int64_t nnz);
bool generated_supported();  // AVX-512 and executable memory here

// Batch 1 on a small map (small_map.cpp, inside the tiled algorithm): at most kSmallMapMaxPositions
// positions, stride 1, "same" padding, planes contiguous, AVX-512. op / rsp: the (OC, H, W, 1)
// output and residual.
constexpr int64_t kSmallMapMaxPositions = 64;
bool small_map_batch1_applicable(const at::Tensor& x, const ConvArgs& a);
void conv_small_map_batch1(const at::Tensor& x, const ConvArgs& a, float* op, const float* rsp);
// Batch 1, a 3 x 3 conv with stride 1 and padding 1 on rows of 16 or 32 floats (small_map.cpp):
// row taps as aligned addresses, column taps as lane shifts; the same arguments.
bool row_shift_batch1_applicable(const at::Tensor& x, const ConvArgs& a);
void conv_row_shift_batch1(const at::Tensor& x, const ConvArgs& a, float* op, const float* rsp);

// The tiled and generated algorithms' staged input (tiled.cpp): x in batch blocks of nb images at
// staged + b * block_len, each zero-padded and split into S x S stride phases, batch innermost:
// [(phase * C + ic) * gh * gw * nb + (i * gw + j) * nb + k] (conv_tiled stages batch 1 by rows, per
// thread, instead); and per-thread memory for it.
void stage_blocks(const at::Tensor& x, int64_t nb, int64_t S, int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                  int64_t gh, int64_t gw, int64_t block_len, float* staged);
float* staging_memory(int64_t floats, at::Tensor& fallback, const at::TensorOptions& options);

// fn(p) for p in [0, parts), each on a thread of one OpenMP team (parts > 1; OpenMP may grant fewer
// threads than asked, and each then takes every team-size-th part). For work whose parts must not be
// merged or re-cut the way at::parallel_for may (each part stages its own input for its own range).
// Used inside no other parallel region (there the team would be one thread: still correct).
template <typename F>
void run_parts(int64_t parts, const F& fn) {
  if (parts <= 1) {
    if (parts == 1) fn(0);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(parts))
  {
    const int64_t team = omp_get_num_threads();
    for (int64_t p = omp_get_thread_num(); p < parts; p += team) fn(p);
  }
}

// Where part q of `parts` starts in a split of output channels [0, oc_count) into ranges of equal
// cost, an output channel costing its non-zeros (rp: the CSR row pointers, their prefix sums) plus
// `per_channel`: the first channel at or past q / parts of the total (0 for q = 0, oc_count for q = parts).
inline int64_t channel_split(const int32_t* rp, int64_t oc_count, int64_t per_channel, int64_t q, int64_t parts) {
  if (q <= 0) return 0;
  if (q >= parts) return oc_count;
  const double target = static_cast<double>(rp[oc_count] + oc_count * per_channel) * q / parts;
  int64_t lo = 0, hi = oc_count;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (rp[mid] + mid * per_channel < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The residual (a ResNet block's shortcut) of an output allocated (OC, H', W', N), in that layout (a
// view when the previous layers wrote it so too); undefined when there is none. conv.cpp.
at::Tensor residual_batch_innermost(const std::optional<at::Tensor>& residual, const at::Tensor& out_chwn, bool pool);
// The residual (N, OC, H', W') permuted to (OC, H', W', N), checked against the output's sizes; no copy.
at::Tensor residual_batch_innermost_view(const at::Tensor& r, const at::Tensor& out_chwn);
// The CSR arrays' dtypes, shapes and contiguity (TORCH_CHECK): conv.cpp.
void check_csr(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values, int64_t rows);

namespace {

// acc[0:len] += v * src[0:len]: the whole inner loop of a non-zero. Built for AVX2 and baseline.
[[maybe_unused]] FASTPRUNE_CPU_CLONES void axpy(float* __restrict__ acc, const float* __restrict__ src, float v, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) acc[j] += v * src[j];
}

// acc[0:len] += sum of four AXPYs in one pass: the accumulator is loaded and stored once per four
// multiply-adds (an AXPY loads and stores it for each), and four input streams stay few enough for
// the hardware prefetchers.
[[maybe_unused]] FASTPRUNE_CPU_CLONES void axpy4(float* __restrict__ acc, const float* __restrict__ s0, const float* __restrict__ s1,
                                const float* __restrict__ s2, const float* __restrict__ s3, float v0, float v1,
                                float v2, float v3, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) acc[j] += v0 * s0[j] + v1 * s1[j] + v2 * s2[j] + v3 * s3[j];
}

[[maybe_unused]] FASTPRUNE_CPU_CLONES void axpy8(float* __restrict__ acc, const float* const* __restrict__ s, const float* v,
                                int64_t len) {
  const float* __restrict__ s0 = s[0]; const float* __restrict__ s1 = s[1];
  const float* __restrict__ s2 = s[2]; const float* __restrict__ s3 = s[3];
  const float* __restrict__ s4 = s[4]; const float* __restrict__ s5 = s[5];
  const float* __restrict__ s6 = s[6]; const float* __restrict__ s7 = s[7];
  const float v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3], v4 = v[4], v5 = v[5], v6 = v[6], v7 = v[7];
#pragma omp simd
  for (int64_t j = 0; j < len; ++j)
    acc[j] += (v0 * s0[j] + v1 * s1[j] + v2 * s2[j] + v3 * s3[j]) + (v4 * s4[j] + v5 * s5[j] + v6 * s6[j] + v7 * s7[j]);
}

[[maybe_unused]] FASTPRUNE_CPU_CLONES void axpy_strided(float* __restrict__ acc, const float* __restrict__ src, float v, int64_t len,
                                       int64_t stride) {
  for (int64_t j = 0; j < len; ++j) acc[j] += v * src[j * stride];
}

// The output rows (or columns) [lo, hi) whose input position i * S + d lies inside [0, size)
// (floor division: d can reach past the last input row when the padding is wide).
[[maybe_unused]] inline void tap_range(int64_t S, int64_t d, int64_t size, int64_t out, int64_t& lo, int64_t& hi) {
  lo = d >= 0 ? 0 : (-d + S - 1) / S;
  hi = size - 1 - d < 0 ? 0 : std::min<int64_t>(out, (size - 1 - d) / S + 1);
}

}  // namespace
}  // namespace sparse_cpu
}  // namespace fastprune
