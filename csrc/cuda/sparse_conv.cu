// CUDA kernels of the sparse convolution and linear layers (the `cuda` backend of
// fastprune::sparse_conv2d / sparse_linear), the same plan as kernels/sparse_conv.py: one thread per
// output position, a block per (run of positions, output channel), every thread of a block walking
// the same output channel's non-zero weights (a uniform loop; the gathers along the width coalesce).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

namespace fastprune {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void sparse_conv2d_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ row_ptr,
                                     const int32_t* __restrict__ cols, const float* __restrict__ vals,
                                     const float* __restrict__ bias, scalar_t* __restrict__ out, int64_t c, int64_t h,
                                     int64_t w, int64_t oc_count, int64_t ho, int64_t wo, int64_t total, int64_t kw,
                                     int64_t ksize, int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool relu) {
  const int64_t p = blockIdx.x * (int64_t)kThreads + threadIdx.x;
  const int64_t oc = blockIdx.y;
  if (p >= total) return;
  const int64_t n = p / (ho * wo), rem = p % (ho * wo), y = rem / wo, xo = rem % wo;
  float acc = bias != nullptr ? bias[oc] : 0.f;
  const scalar_t* image = x + n * c * h * w;
  for (int32_t e = row_ptr[oc]; e < row_ptr[oc + 1]; ++e) {
    const int64_t col = cols[e], ic = col / ksize, rs = col % ksize;
    const int64_t iy = y * sh + rs / kw - ph, ix = xo * sw + rs % kw - pw;
    if (iy >= 0 && iy < h && ix >= 0 && ix < w) acc += vals[e] * static_cast<float>(image[(ic * h + iy) * w + ix]);
  }
  out[((n * oc_count + oc) * ho + y) * wo + xo] = static_cast<scalar_t>(relu ? fmaxf(acc, 0.f) : acc);
}

template <typename scalar_t>
__global__ void sparse_linear_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ row_ptr,
                                     const int32_t* __restrict__ cols, const float* __restrict__ vals,
                                     const float* __restrict__ bias, scalar_t* __restrict__ out, int64_t batch,
                                     int64_t in_features, int64_t out_features) {
  const int64_t b = blockIdx.x * (int64_t)kThreads + threadIdx.x;
  const int64_t o = blockIdx.y;
  if (b >= batch) return;
  float acc = bias != nullptr ? bias[o] : 0.f;
  for (int32_t e = row_ptr[o]; e < row_ptr[o + 1]; ++e) acc += vals[e] * static_cast<float>(x[b * in_features + cols[e]]);
  out[b * out_features + o] = static_cast<scalar_t>(acc);
}

void check_csr_cuda(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt && values.scalar_type() == at::kFloat,
              "sparse: CSR must be int32 row_ptr/col_idx and float32 values");
  TORCH_CHECK(row_ptr.is_contiguous() && col_idx.is_contiguous() && values.is_contiguous(), "sparse: CSR must be contiguous");
  TORCH_CHECK(row_ptr.device() == x.device() && col_idx.device() == x.device() && values.device() == x.device(),
              "sparse: CSR and input on different devices");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "sparse: bias must be contiguous float32");
}

at::Tensor sparse_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                              const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t kh, int64_t kw,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t algo,
                              int64_t epilogue, const std::optional<at::Tensor>& residual) {
  // The pooling and residual epilogues are the CPU algorithms'; the op layer applies them after this kernel.
  TORCH_CHECK((epilogue == 0 || epilogue == 1) && !residual.has_value(),
              "sparse_conv2d (CUDA): epilogue must be 0 or 1, without a residual");
  TORCH_CHECK(x_in.dim() == 4, "sparse_conv2d: x must be (N, C, H, W)");
  check_csr_cuda(x_in, row_ptr, col_idx, values, bias);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), oc = row_ptr.size(0) - 1;
  const int64_t ho = (h + 2 * pad_h - kh) / stride_h + 1, wo = (w + 2 * pad_w - kw) / stride_w + 1;
  at::Tensor out = at::empty({n, oc, ho, wo}, x.options());
  const int64_t total = n * ho * wo;
  if (out.numel() == 0) return out;
  const dim3 grid((total + kThreads - 1) / kThreads, oc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_conv2d_cuda", [&] {
    sparse_conv2d_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), row_ptr.const_data_ptr<int32_t>(), col_idx.const_data_ptr<int32_t>(),
        values.const_data_ptr<float>(), bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), c, h, w, oc, ho, wo, total, kw, kh * kw, stride_h, stride_w, pad_h, pad_w,
        epilogue == 1);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sparse_linear_cuda(const at::Tensor& x_in, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                              const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2, "sparse_linear: x must be (N, in)");
  check_csr_cuda(x_in, row_ptr, col_idx, values, bias);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0), fin = x.size(1), fout = row_ptr.size(0) - 1;
  at::Tensor out = at::empty({batch, fout}, x.options());
  if (out.numel() == 0) return out;
  const dim3 grid((batch + kThreads - 1) / kThreads, fout);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_linear_cuda", [&] {
    sparse_linear_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), row_ptr.const_data_ptr<int32_t>(), col_idx.const_data_ptr<int32_t>(),
        values.const_data_ptr<float>(), bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), batch, fin, fout);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("sparse_conv2d_ext", &sparse_conv2d_cuda);
  m.impl("sparse_linear_ext", &sparse_linear_cuda);
}

}  // namespace fastprune
