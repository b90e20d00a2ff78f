// CUDA kernels of the Gaussian Gram matrix (the `cuda` backend of fastprune::gaussian_gram).
//
// All of the m x m x d work is two matrix products, and those go to cuBLAS through ATen (at::mm;
// float32 stays IEEE float32 unless the user enables TF32 for matmuls in torch):
//   forward:  D = Xc Xc^T on centred rows Xc = x - mean, then one elementwise kernel forms
//             K_ij = exp(-scale (D_ii + D_jj - 2 D_ij)) on the upper triangle and mirrors it, so K
//             is exactly symmetric;
//   backward: one kernel forms S' = (G + G^T) * K - diag(rowsum((G + G^T) * K)) once (m x m), then
//             dX = 2 scale S' Xc is a single product: no per-feature-tile recomputation of S and no
//             grid dimension that grows with d.
// `scale` stays a device tensor throughout: no host synchronisation.
//
// Only c10/cuda and ATen op headers are included: ATen/cuda/CUDAContext.h pulls cuBLAS/cuSPARSE
// headers that a bare CUDA toolkit lacks (see docs/ARCHITECTURE.md); at::mm reaches cuBLAS anyway.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../hsic_common.h"

namespace fastprune {
namespace {

constexpr int kTile = 32;       // K tile edge of the epilogue
constexpr int kRows = 8;        // threads along a tile's rows (each covers kTile / kRows rows)
constexpr int kRowThreads = 256;  // threads per row of S'

// K from the product D = Xc Xc^T: the upper triangle is computed, both halves written.
__global__ void gram_from_dot_kernel(const float* __restrict__ dot, const float* __restrict__ scale,
                                     float* __restrict__ k, int64_t m, bool apply_exp) {
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (tj < ti) return;
  const int64_t c = tj * kTile + threadIdx.x;
  if (c >= m) return;
  const float s = scale[0], sq_c = dot[c * m + c];
  for (int u = threadIdx.y; u < kTile; u += kRows) {
    const int64_t r = ti * kTile + u;
    if (r >= m || r > c) continue;
    const float dist = r == c ? 0.f : fmaxf(dot[r * m + r] + sq_c - 2.f * dot[r * m + c], 0.f);
    const float out = apply_exp ? expf(-s * dist) : dist;
    k[r * m + c] = out;
    k[c * m + r] = out;
  }
}

// S' row i: S_ij = (G_ij + G_ji) K_ij off the diagonal; S'_ii = 2 G_ii K_ii - sum_j S_ij (j = i too).
__global__ void __launch_bounds__(kRowThreads)
    gram_s_kernel(const float* __restrict__ grad, const float* __restrict__ kmat, float* __restrict__ s, int64_t m) {
  __shared__ float partial[kRowThreads / 32];
  const int64_t i = blockIdx.x;
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < m; j += kRowThreads) {
    const float v = (grad[i * m + j] + grad[j * m + i]) * kmat[i * m + j];
    sum += v;
    if (j != i) s[i * m + j] = v;
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffff, sum, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kRowThreads / 32; ++w) total += partial[w];
    s[i * m + i] = 2.f * grad[i * m + i] * kmat[i * m + i] - total;
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor centred_rows(const at::Tensor& x, const at::Tensor& mean) {
  return x.to(at::kFloat).sub(mean.view({1, -1}));  // (m, d) float32, one pass
}

at::Tensor gaussian_gram_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, bool apply_exp) {
  check_gram_args(x, mean, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0);
  at::Tensor out = at::empty({m, m}, x.options().dtype(at::kFloat));
  if (m == 0) return out;
  const at::Tensor xc = centred_rows(x, mean);
  const at::Tensor dot = at::mm(xc, xc.t());
  const int64_t tiles = cdiv(m, kTile);  // grid.y <= 65535 tiles: m up to 2M samples
  gram_from_dot_kernel<<<dim3(tiles, tiles), dim3(kTile, kRows), 0, c10::cuda::getCurrentCUDAStream()>>>(
      dot.const_data_ptr<float>(), scale.const_data_ptr<float>(), out.mutable_data_ptr<float>(), m, apply_exp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gaussian_gram_backward_cuda(const at::Tensor& grad, const at::Tensor& k, const at::Tensor& x,
                                       const at::Tensor& mean, const at::Tensor& scale) {
  check_gram_args(x, mean, scale);
  check_gram_backward_args(grad, k, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0);
  if (m == 0) return at::empty({0, x.size(1)}, x.options());
  at::Tensor s = at::empty({m, m}, x.options().dtype(at::kFloat));
  gram_s_kernel<<<m, kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad.const_data_ptr<float>(), k.const_data_ptr<float>(), s.mutable_data_ptr<float>(), m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor dx = at::mm(s, centred_rows(x, mean)).mul_(scale.mul(2.0));
  return x.scalar_type() == at::kFloat ? dx : dx.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("gaussian_gram_ext", &gaussian_gram_cuda);
  m.impl("gaussian_gram_backward_ext", &gaussian_gram_backward_cuda);
}

}  // namespace fastprune
