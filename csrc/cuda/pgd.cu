// CUDA kernels of fastprune::pgd_step_ext (the `cuda` backend).
//
// Linf: a memory-bound elementwise kernel; 16-byte vector loads and stores when every pointer is
// aligned and a sample's size is a multiple of the vector width, so one vector never spans two
// samples and alpha/eps are loaded once per vector.
// L2: a split reduction over (chunk, sample) blocks in three launches (|grad|, then |delta| after
// the step, then the write), the chunking shared with the CPU kernel and the Triton launcher's rule
// (l2_chunks in pgd_common.h). Arithmetic in opmath (float32 for half/bfloat16/float), in the
// reference's order; partial sums in double.
//
// Only c10/cuda headers are included: ATen/cuda/CUDAContext.h pulls cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit lacks (see docs/ARCHITECTURE.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../pgd_common.h"

namespace fastprune {
namespace {

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec {
  scalar_t v[VEC];
};

template <typename acc_t>
__device__ __forceinline__ acc_t linf_update(acc_t x, acc_t g, acc_t xn, acc_t a, acc_t e, acc_t lo, acc_t hi) {
  const acc_t step = g > acc_t(0) ? a : (g < acc_t(0) ? -a : acc_t(0));
  acc_t y = x + step;
  y = fmin(fmax(y, xn - e), xn + e);
  return fmin(fmax(y, lo), hi);
}

// Each thread handles VEC consecutive elements; VEC == 1 is the unaligned fallback.
// x may alias out (the in-place step), so neither is declared __restrict__.
template <typename scalar_t, int VEC>
__global__ void pgd_step_linf_kernel(const scalar_t* x, const scalar_t* __restrict__ g,
                                     const scalar_t* __restrict__ xn, const float* __restrict__ alpha,
                                     const float* __restrict__ eps, scalar_t* out, int64_t numel,
                                     int64_t per_sample, float lo, float hi) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t n_vec = numel / VEC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_vec; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t first = i * VEC;
    const int64_t sample = first / per_sample;  // per_sample % VEC == 0: the vector stays in one sample
    const acc_t a = alpha[sample], e = eps[sample];
    const V xv = reinterpret_cast<const V*>(x)[i];
    const V gv = reinterpret_cast<const V*>(g)[i];
    const V nv = reinterpret_cast<const V*>(xn)[i];
    V ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ov.v[k] = static_cast<scalar_t>(linf_update<acc_t>(static_cast<acc_t>(xv.v[k]), static_cast<acc_t>(gv.v[k]),
                                                          static_cast<acc_t>(nv.v[k]), a, e, lo, hi));
    }
    reinterpret_cast<V*>(out)[i] = ov;
  }
}

template <int THREADS>
__device__ __forceinline__ double block_sum(double v, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < THREADS / 32 ? shared[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
  }
  return v;  // the total, in thread 0
}

// L2 runs as a split reduction: each sample is cut into `n_chunks` chunks of `chunk_len` elements
// and three launches over (chunk, sample) blocks each read the per-chunk partial sums of the one
// before (deterministic, no atomics), so that a small batch of large samples still fills the GPU.
struct Chunk {
  int64_t sample, begin, end;  // flat offsets [begin, end) of this block's chunk
};

// Blocks are numbered sample-major along grid.x (up to 2^31 - 1: no 65535-sample limit).
__device__ __forceinline__ Chunk this_chunk(int64_t per_sample, int64_t chunk_len, int n_chunks) {
  const int64_t sample = blockIdx.x / n_chunks, chunk = blockIdx.x % n_chunks;
  const int64_t begin = sample * per_sample + chunk * chunk_len;
  return {sample, begin, min(begin + chunk_len, (sample + 1) * per_sample)};
}

// Sum of one sample's n_chunks partials (n_chunks <= a few dozen: every thread reads them all).
__device__ __forceinline__ double sample_total(const double* part, int64_t sample, int n_chunks) {
  double total = 0.0;
  for (int c = 0; c < n_chunks; ++c) total += part[sample * n_chunks + c];
  return total;
}

template <typename scalar_t, int THREADS>
__global__ void __launch_bounds__(THREADS)
    pgd_l2_grad_sq_kernel(const scalar_t* __restrict__ g, double* __restrict__ gpart, int64_t per_sample,
                          int64_t chunk_len, int n_chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double shared[THREADS / 32];
  const Chunk ch = this_chunk(per_sample, chunk_len, n_chunks);
  acc_t acc = 0;  // float32 per thread, double across the block and the chunks
  for (int64_t j = ch.begin + threadIdx.x; j < ch.end; j += THREADS) {
    const acc_t gj = static_cast<acc_t>(g[j]);
    acc += gj * gj;
  }
  const double total = block_sum<THREADS>(acc, shared);
  if (threadIdx.x == 0) gpart[blockIdx.x] = total;
}

template <typename acc_t>
__device__ __forceinline__ acc_t l2_scale(const float* alpha, const double* gpart, int64_t sample, int n_chunks) {
  const acc_t gnorm = static_cast<acc_t>(sqrt(sample_total(gpart, sample, n_chunks)));
  return static_cast<acc_t>(alpha[sample]) / fmax(gnorm, acc_t(1e-12));
}

// x may alias out in the in-place form: neither is __restrict__.
template <typename scalar_t, int THREADS>
__global__ void __launch_bounds__(THREADS)
    pgd_l2_delta_sq_kernel(const scalar_t* x, const scalar_t* __restrict__ g, const scalar_t* __restrict__ xn,
                           const float* __restrict__ alpha, const double* __restrict__ gpart,
                           double* __restrict__ dpart, int64_t per_sample, int64_t chunk_len, int n_chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double shared[THREADS / 32];
  const Chunk ch = this_chunk(per_sample, chunk_len, n_chunks);
  const acc_t scale = l2_scale<acc_t>(alpha, gpart, ch.sample, n_chunks);
  acc_t acc = 0;
  for (int64_t j = ch.begin + threadIdx.x; j < ch.end; j += THREADS) {
    const acc_t d = (static_cast<acc_t>(x[j]) + scale * static_cast<acc_t>(g[j])) - static_cast<acc_t>(xn[j]);
    acc += d * d;
  }
  const double total = block_sum<THREADS>(acc, shared);
  if (threadIdx.x == 0) dpart[blockIdx.x] = total;
}

template <typename scalar_t, int THREADS>
__global__ void __launch_bounds__(THREADS)
    pgd_l2_write_kernel(const scalar_t* x, const scalar_t* __restrict__ g, const scalar_t* __restrict__ xn,
                        const float* __restrict__ alpha, const float* __restrict__ eps,
                        const double* __restrict__ gpart, const double* __restrict__ dpart, scalar_t* out,
                        int64_t per_sample, int64_t chunk_len, int n_chunks, float lo, float hi) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunk ch = this_chunk(per_sample, chunk_len, n_chunks);
  const acc_t scale = l2_scale<acc_t>(alpha, gpart, ch.sample, n_chunks);
  const acc_t dnorm = static_cast<acc_t>(sqrt(sample_total(dpart, ch.sample, n_chunks)));
  const acc_t factor = fmin(acc_t(1), static_cast<acc_t>(eps[ch.sample]) / fmax(dnorm, acc_t(1e-12)));
  for (int64_t j = ch.begin + threadIdx.x; j < ch.end; j += THREADS) {
    const acc_t xnj = static_cast<acc_t>(xn[j]);
    const acc_t d = (static_cast<acc_t>(x[j]) + scale * static_cast<acc_t>(g[j])) - xnj;
    out[j] = static_cast<scalar_t>(fmin(fmax(xnj + d * factor, acc_t(lo)), acc_t(hi)));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index()));
  return count;
}

void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat, const at::Tensor& alpha,
                   const at::Tensor& eps, c10::string_view norm, double clip_min, double clip_max,
                   const at::Tensor& out) {
  check_pgd_step_args(x_adv, grad, x_nat, alpha, eps, out);
  const PgdNorm kind = parse_pgd_norm(norm);
  const int64_t numel = x_adv.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x_adv.size(0), per_sample = numel / n;
  const float lo = static_cast<float>(clip_min), hi = static_cast<float>(clip_max);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cuda", [&] {
    const auto* x = x_adv.const_data_ptr<scalar_t>();
    const auto* g = grad.const_data_ptr<scalar_t>();
    const auto* xn = x_nat.const_data_ptr<scalar_t>();
    auto* o = out.mutable_data_ptr<scalar_t>();
    const float* a = alpha.const_data_ptr<float>();
    const float* e = eps.const_data_ptr<float>();
    if (kind == PgdNorm::L2) {
      constexpr int kThreads = 256;
      const auto [n_chunks, chunk_len] = l2_chunks(n, per_sample, kThreads * 4, 4 * sm_count(x_adv));
      at::Tensor part = at::empty({2, n, n_chunks}, x_adv.options().dtype(at::kDouble));
      double* gpart = part.mutable_data_ptr<double>();
      double* dpart = gpart + n * n_chunks;
      const int64_t grid = n * n_chunks;
      pgd_l2_grad_sq_kernel<scalar_t, kThreads><<<grid, kThreads, 0, stream>>>(g, gpart, per_sample, chunk_len, n_chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pgd_l2_delta_sq_kernel<scalar_t, kThreads><<<grid, kThreads, 0, stream>>>(x, g, xn, a, gpart, dpart, per_sample,
                                                                              chunk_len, n_chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pgd_l2_write_kernel<scalar_t, kThreads><<<grid, kThreads, 0, stream>>>(x, g, xn, a, e, gpart, dpart, o,
                                                                           per_sample, chunk_len, n_chunks, lo, hi);
    } else {
      constexpr int kVec = 16 / sizeof(scalar_t);
      constexpr int kThreads = 256;
      const bool vectorised = per_sample % kVec == 0 && aligned16(x) && aligned16(g) && aligned16(xn) && aligned16(o);
      const int64_t work = vectorised ? numel / kVec : numel;
      // Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
      const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 8);
      if (vectorised) {
        pgd_step_linf_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(x, g, xn, a, e, o, numel, per_sample, lo, hi);
      } else {
        pgd_step_linf_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(x, g, xn, a, e, o, numel, per_sample, lo, hi);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) { m.impl("pgd_step_ext", &pgd_step_cuda); }

}  // namespace fastprune
