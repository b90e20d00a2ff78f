// CUDA kernels of the Gaussian Gram matrix (the `cuda` backend of fastprune::gaussian_gram).
//
// Same plan as the Triton kernels (kernels/hsic.py): a split-K tiled product x x^T on centred rows
// over the upper tiles only, partial sums in a (split, m, m) buffer (deterministic), an epilogue
// that sums them, forms distances and exp and writes both halves; and a backward that forms
// S = (G + G^T) * K tile by tile in shared memory and multiplies it with x. Plain float32 FMA
// tiles (no tensor cores): the Triton kernels are the fast path, this one the independent check.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../hsic_common.h"

namespace fastprune {
namespace {

constexpr int kTile = 32;    // output tile edge (rows and columns)
constexpr int kDepth = 16;   // slice of the reduction dimension held in shared memory
constexpr int kThreads = 16; // threads per tile edge: each thread computes 2 x 2 outputs

template <typename scalar_t>
__global__ void gram_partial_kernel(const scalar_t* __restrict__ x, const float* __restrict__ mean,
                                    float* __restrict__ partial, float* __restrict__ sq_partial, int64_t m,
                                    int64_t d, int64_t stride, int64_t d_per_split) {
  const int ti = blockIdx.x, tj = blockIdx.y, split = blockIdx.z;
  if (tj < ti) return;  // symmetric: lower tiles come from the epilogue's mirror write
  __shared__ float a[kTile][kDepth + 1];
  __shared__ float b[kTile][kDepth + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, lin = ty * kThreads + tx;
  float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  float sq[2] = {0.f, 0.f};
  const int64_t d0 = split * d_per_split, d1 = min(d, d0 + d_per_split);
  for (int64_t k0 = d0; k0 < d1; k0 += kDepth) {
    // 256 threads load 2 x 32 x 16 values: two per thread per matrix.
    for (int e = lin; e < kTile * kDepth; e += kThreads * kThreads) {
      const int r = e / kDepth, c = e % kDepth;
      const int64_t kk = k0 + c, ra = (int64_t)ti * kTile + r, rb = (int64_t)tj * kTile + r;
      const bool in_k = kk < d1;
      const float mu = in_k ? mean[kk] : 0.f;
      a[r][c] = (in_k && ra < m) ? static_cast<float>(x[ra * stride + kk]) - mu : 0.f;
      b[r][c] = (in_k && rb < m) ? static_cast<float>(x[rb * stride + kk]) - mu : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kDepth; ++c) {
      const float a0 = a[ty * 2][c], a1 = a[ty * 2 + 1][c];
      const float b0 = b[tx * 2][c], b1 = b[tx * 2 + 1][c];
      acc[0][0] += a0 * b0, acc[0][1] += a0 * b1, acc[1][0] += a1 * b0, acc[1][1] += a1 * b1;
      if (ti == tj && tx == 0) sq[0] += a0 * a0, sq[1] += a1 * a1;
    }
    __syncthreads();
  }
  float* out = partial + (int64_t)split * m * m;
  for (int u = 0; u < 2; ++u) {
    const int64_t r = (int64_t)ti * kTile + ty * 2 + u;
    if (r >= m) continue;
    for (int v = 0; v < 2; ++v) {
      const int64_t c = (int64_t)tj * kTile + tx * 2 + v;
      if (c < m) out[r * m + c] = acc[u][v];
    }
    if (ti == tj && tx == 0) sq_partial[(int64_t)split * m + r] = sq[u];
  }
}

__global__ void gram_epilogue_kernel(const float* __restrict__ partial, const float* __restrict__ sq_partial,
                                     const float* __restrict__ scale, float* __restrict__ k, int64_t m,
                                     int n_split, bool apply_exp) {
  const int ti = blockIdx.x, tj = blockIdx.y;
  if (tj < ti) return;
  const int64_t r = (int64_t)ti * kTile + threadIdx.y, c = (int64_t)tj * kTile + threadIdx.x;
  if (r >= m || c >= m || (ti == tj && c < r)) return;  // upper triangle + mirror: K exactly symmetric
  float dot = 0.f, sq_r = 0.f, sq_c = 0.f;
  for (int s = 0; s < n_split; ++s) {
    dot += partial[(int64_t)s * m * m + r * m + c];
    sq_r += sq_partial[(int64_t)s * m + r];
    sq_c += sq_partial[(int64_t)s * m + c];
  }
  const float dist = r == c ? 0.f : fmaxf(sq_r + sq_c - 2.f * dot, 0.f);
  const float out = apply_exp ? expf(-scale[0] * dist) : dist;
  k[r * m + c] = out;
  k[c * m + r] = out;
}

// One block computes a kTile (rows) x kTile (feature columns) tile of dX.
template <typename scalar_t>
__global__ void gram_bwd_kernel(const float* __restrict__ grad, const float* __restrict__ kmat,
                                const scalar_t* __restrict__ x, const float* __restrict__ mean,
                                const float* __restrict__ scale, scalar_t* __restrict__ dx, int64_t m, int64_t d,
                                int64_t stride) {
  __shared__ float s[kTile][kDepth + 1];   // S rows of this tile x a slice of partner samples
  __shared__ float xb[kDepth][kTile + 1];  // the partner samples' features
  __shared__ float srow[kTile];
  const int tx = threadIdx.x, ty = threadIdx.y, lin = ty * kThreads + tx;
  const int64_t row0 = (int64_t)blockIdx.x * kTile, col0 = (int64_t)blockIdx.y * kTile;
  float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  if (lin < kTile) srow[lin] = 0.f;
  __syncthreads();
  for (int64_t n0 = 0; n0 < m; n0 += kDepth) {
    for (int e = lin; e < kTile * kDepth; e += kThreads * kThreads) {
      const int r = e / kDepth, c = e % kDepth;
      const int64_t i = row0 + r, j = n0 + c;
      s[r][c] = (i < m && j < m) ? (grad[i * m + j] + grad[j * m + i]) * kmat[i * m + j] : 0.f;
      const int rr = e / kTile, cc = e % kTile;  // the same 512 slots, viewed as kDepth x kTile
      const int64_t jj = n0 + rr, f = col0 + cc;
      xb[rr][cc] = (jj < m && f < d) ? static_cast<float>(x[jj * stride + f]) - mean[f] : 0.f;
    }
    __syncthreads();
    if (lin < kTile) {  // row sums of S, from the tile already in shared memory
      float acc_row = 0.f;
      for (int c = 0; c < kDepth; ++c) acc_row += s[lin][c];
      srow[lin] += acc_row;
    }
#pragma unroll
    for (int c = 0; c < kDepth; ++c) {
      const float s0 = s[ty * 2][c], s1 = s[ty * 2 + 1][c];
      const float x0 = xb[c][tx * 2], x1 = xb[c][tx * 2 + 1];
      acc[0][0] += s0 * x0, acc[0][1] += s0 * x1, acc[1][0] += s1 * x0, acc[1][1] += s1 * x1;
    }
    __syncthreads();
  }
  const float two_scale = 2.f * scale[0];
  for (int u = 0; u < 2; ++u) {
    const int64_t i = row0 + ty * 2 + u;
    if (i >= m) continue;
    for (int v = 0; v < 2; ++v) {
      const int64_t f = col0 + tx * 2 + v;
      if (f >= d) continue;
      const float xi = static_cast<float>(x[i * stride + f]) - mean[f];
      dx[i * d + f] = static_cast<scalar_t>(two_scale * (acc[u][v] - srow[ty * 2 + u] * xi));
    }
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor gaussian_gram_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, bool apply_exp) {
  check_gram_args(x, mean, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t m = x.size(0), d = x.size(1), tiles = cdiv(m, kTile);
  // Split d until there are about 512 blocks, each with at least 8 slices of the reduction.
  const int64_t upper = tiles * (tiles + 1) / 2;
  int64_t n_split = std::max<int64_t>(1, std::min<int64_t>({cdiv(512, upper), cdiv(d, 8 * kDepth), 64}));
  const int64_t d_per_split = cdiv(cdiv(d, n_split), kDepth) * kDepth;
  n_split = cdiv(d, d_per_split);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({n_split, m, m}, fopts);
  at::Tensor sq_partial = at::empty({n_split, m}, fopts);
  at::Tensor out = at::empty({m, m}, fopts);
  const dim3 block(kThreads, kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_gram_cuda", [&] {
    gram_partial_kernel<scalar_t><<<dim3(tiles, tiles, n_split), block, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), mean.const_data_ptr<float>(), partial.mutable_data_ptr<float>(),
        sq_partial.mutable_data_ptr<float>(), m, d, x.stride(0), d_per_split);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gram_epilogue_kernel<<<dim3(tiles, tiles), dim3(kTile, kTile), 0, stream>>>(
      partial.const_data_ptr<float>(), sq_partial.const_data_ptr<float>(), scale.const_data_ptr<float>(),
      out.mutable_data_ptr<float>(), m, static_cast<int>(n_split), apply_exp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gaussian_gram_backward_cuda(const at::Tensor& grad, const at::Tensor& k, const at::Tensor& x,
                                       const at::Tensor& mean, const at::Tensor& scale) {
  check_gram_args(x, mean, scale);
  check_gram_backward_args(grad, k, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t m = x.size(0), d = x.size(1);
  at::Tensor dx = at::empty({m, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_gram_backward_cuda", [&] {
    gram_bwd_kernel<scalar_t><<<dim3(cdiv(m, kTile), cdiv(d, kTile)), dim3(kThreads, kThreads), 0, stream>>>(
        grad.const_data_ptr<float>(), k.const_data_ptr<float>(), x.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<float>(), scale.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(), m, d,
        x.stride(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("gaussian_gram_ext", &gaussian_gram_cuda);
  m.impl("gaussian_gram_backward_ext", &gaussian_gram_backward_cuda);
}

}  // namespace fastprune
