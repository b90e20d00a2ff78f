// CUDA kernel of the sparse convolution (and of sparse linear, as a 1x1 convolution of a 1x1 map):
// fastprune::sparse_conv2d_tiled_ext, the `cuda` backend of fastprune::sparse_conv2d/sparse_linear.
//
// The weight comes in the output-channel-tiled form of fastprune/reference/sparse.py (TiledWeight):
// tiles of kTile = 16 output channels, each with the sorted union of its channels' non-zero columns
// and a dense (columns, 16) block of values. A block of threads computes one tile for a run of
// output positions (flattened over batch and space; one position a thread, blockDim.x of 32 to 128
// following the output's size, so a 4x4 map at batch 1 does not idle 94% of its lanes). The tile's
// columns and values are staged through shared memory kChunk at a time; each thread loads one input
// value per column and multiplies it into its 16 accumulators (registers): every loaded input
// serves all the tile's channels. Plain float32 FMA (the Triton kernel is the tensor-core path).
// Any input strides (contiguous, channels_last); output contiguous (N, OC, H', W'). One flat grid
// axis, tile-major: up to 2^31 - 1 blocks, so no channel or position count is too large to launch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fastprune {
namespace {

constexpr int kTile = 16;     // output channels per tile (OC_TILE in fastprune/reference/sparse.py)
constexpr int kChunk = 64;    // union columns staged in shared memory at a time
constexpr int kMaxThreads = 128;

struct Geometry {
  int64_t oc, ho, wo, total, n_pblocks, kw, ksize, sh, sw, ph, pw, h, w, sxn, sxc, sxh, sxw;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_conv2d_tiled_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ tile_ptr,
                               const int32_t* __restrict__ tile_cols, const float* __restrict__ tile_vals,
                               const float* __restrict__ bias, scalar_t* __restrict__ out, Geometry g, bool relu) {
  __shared__ float vals[kChunk][kTile];
  __shared__ int64_t offset[kChunk];  // the column's input offset: ic * sxc + r * sxh + s * sxw
  __shared__ int32_t dy[kChunk], dx[kChunk];
  const int64_t tile = blockIdx.x / g.n_pblocks, pblock = blockIdx.x % g.n_pblocks;
  const int64_t p = pblock * blockDim.x + threadIdx.x;
  const bool active = p < g.total;
  const int64_t n = active ? p / (g.ho * g.wo) : 0, rem = active ? p % (g.ho * g.wo) : 0;
  const int64_t y0 = (rem / g.wo) * g.sh - g.ph, x0 = (rem % g.wo) * g.sw - g.pw;
  const scalar_t* image = x + n * g.sxn;
  float acc[kTile];
#pragma unroll
  for (int o = 0; o < kTile; ++o) acc[o] = bias[tile * kTile + o];
  const int64_t start = tile_ptr[tile], end = tile_ptr[tile + 1];
  for (int64_t k0 = start; k0 < end; k0 += kChunk) {
    const int count = static_cast<int>(end - k0 < kChunk ? end - k0 : kChunk);
    for (int i = threadIdx.x; i < count * kTile; i += blockDim.x) vals[i / kTile][i % kTile] = tile_vals[k0 * kTile + i];
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const int64_t col = tile_cols[k0 + i], ic = col / g.ksize, rs = col % g.ksize;
      dy[i] = static_cast<int32_t>(rs / g.kw);
      dx[i] = static_cast<int32_t>(rs % g.kw);
      offset[i] = ic * g.sxc + dy[i] * g.sxh + dx[i] * g.sxw;
    }
    __syncthreads();
    if (active) {
      for (int k = 0; k < count; ++k) {
        const int64_t iy = y0 + dy[k], ix = x0 + dx[k];
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) continue;
        const float v = static_cast<float>(image[offset[k] + y0 * g.sxh + x0 * g.sxw]);
#pragma unroll
        for (int o = 0; o < kTile; ++o) acc[o] += vals[k][o] * v;
      }
    }
    __syncthreads();
  }
  if (!active) return;
#pragma unroll
  for (int o = 0; o < kTile; ++o) {
    const int64_t oc = tile * kTile + o;
    if (oc < g.oc) out[(n * g.oc + oc) * g.ho * g.wo + rem] = static_cast<scalar_t>(relu ? fmaxf(acc[o], 0.f) : acc[o]);
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor sparse_conv2d_tiled_cuda(const at::Tensor& x, const at::Tensor& tile_ptr, const at::Tensor& tile_cols,
                                    const at::Tensor& tile_vals, const at::Tensor& bias, int64_t oc, int64_t kh,
                                    int64_t kw, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                    bool relu) {
  TORCH_CHECK(x.dim() == 4, "sparse_conv2d_tiled: x must be (N, C, H, W)");
  const int64_t tiles = cdiv(oc, kTile);
  TORCH_CHECK(tile_ptr.scalar_type() == at::kInt && tile_cols.scalar_type() == at::kInt &&
                  tile_vals.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "sparse_conv2d_tiled: tile_ptr/tile_cols must be int32, tile_vals/bias float32");
  TORCH_CHECK(tile_ptr.is_contiguous() && tile_cols.is_contiguous() && tile_vals.is_contiguous() && bias.is_contiguous(),
              "sparse_conv2d_tiled: the weight's tensors must be contiguous");
  TORCH_CHECK(tile_ptr.numel() == tiles + 1 && bias.numel() == tiles * kTile && tile_vals.dim() == 2 &&
                  tile_vals.size(1) == kTile && tile_vals.size(0) == tile_cols.numel(),
              "sparse_conv2d_tiled: the weight's tensors do not describe ", oc, " output channels in tiles of ", kTile);
  for (const at::Tensor* t : {&tile_ptr, &tile_cols, &tile_vals, &bias})
    TORCH_CHECK(t->device() == x.device(), "sparse_conv2d_tiled: weight and input on different devices");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const int64_t ho = (h + 2 * pad_h - kh) / stride_h + 1, wo = (w + 2 * pad_w - kw) / stride_w + 1;
  at::Tensor out = at::empty({n, oc, ho, wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = n * ho * wo;
  if (out.numel() == 0) return out;
  // Threads (positions) per block: the output's size rounded up to a warp, at most kMaxThreads.
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, cdiv(total, 32) * 32));
  const int64_t n_pblocks = cdiv(total, threads);
  const Geometry g{oc, ho, wo, total, n_pblocks, kw, kh * kw, stride_h, stride_w, pad_h, pad_w, h, w,
                   x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t blocks = tiles * n_pblocks;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "sparse_conv2d_tiled: ", blocks, " blocks exceed the grid limit");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_conv2d_tiled_cuda", [&] {
    sparse_conv2d_tiled_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), tile_ptr.const_data_ptr<int32_t>(), tile_cols.const_data_ptr<int32_t>(),
        tile_vals.const_data_ptr<float>(), bias.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), g, relu);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) { m.impl("sparse_conv2d_tiled_ext", &sparse_conv2d_tiled_cuda); }

}  // namespace fastprune
