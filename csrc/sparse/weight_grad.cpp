// The gradient of a sparse convolution w.r.t. its CSR values only (the sparsity pattern is frozen,
// as in a pruned model's finetune): for the non-zero e at output channel oc, column (ic, r, s),
//   g[e] = sum over n, y, x of grad_y[n][oc][y][x] * x[n][ic][y S + r - pad][x S' + s - pad'],
// a product sampled at the non-zeros: nnz x N x H' x W' multiply-adds, the forward's work, where
// the masked dense layer computes the whole dense weight gradient.
#include <torch/library.h>

#include "sparse_common.h"

namespace fastprune {
namespace sparse_cpu {
namespace {

// Maps at least this wide are read in NCHW (long rows); narrower ones are transposed batch-innermost.
constexpr int64_t kWideMap = 16;

// sum over j in [0, len) of g[j] * src[j]: one contiguous dot, built for AVX2 and baseline.
FASTPRUNE_CPU_CLONES float dot(const float* __restrict__ g, const float* __restrict__ src, int64_t len) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) sum += g[j] * src[j];
  return sum;
}

float dot_strided(const float* g, const float* src, int64_t len, int64_t stride) {
  float sum = 0.f;
  for (int64_t j = 0; j < len; ++j) sum += g[j] * src[j * stride];
  return sum;
}

at::Tensor sparse_conv2d_weight_grad_cpu(const at::Tensor& x_in, const at::Tensor& grad_in, const at::Tensor& row_ptr,
                                         const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t stride_h,
                                         int64_t stride_w, int64_t pad_h, int64_t pad_w) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat, "sparse_conv2d_weight_grad: x must be float32 4D");
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.scalar_type() == at::kFloat,
              "sparse_conv2d_weight_grad: grad must be float32 4D");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kInt && row_ptr.is_contiguous() &&
                  col_idx.dim() == 1 && col_idx.scalar_type() == at::kInt && col_idx.is_contiguous(),
              "sparse_conv2d_weight_grad: row_ptr and col_idx must be contiguous int32");
  const int64_t oc_count = row_ptr.size(0) - 1;
  const int64_t n = x_in.size(0), h = x_in.size(2), w = x_in.size(3), ho = grad_in.size(2), wo = grad_in.size(3);
  TORCH_CHECK(grad_in.size(0) == n && grad_in.size(1) == oc_count && ho == (h + 2 * pad_h - kh) / stride_h + 1 &&
                  wo == (w + 2 * pad_w - kw) / stride_w + 1,
              "sparse_conv2d_weight_grad: grad must have the convolution output's shape");
  at::Tensor out = at::empty({col_idx.size(0)}, x_in.options());
  const int32_t* rp = row_ptr.const_data_ptr<int32_t>();
  const int32_t* cols = col_idx.const_data_ptr<int32_t>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t ksize = kh * kw;
  const bool batch_innermost = x_in.permute({1, 2, 3, 0}).is_contiguous();
  if (w >= kWideMap && !batch_innermost) {
    // Wide maps, NCHW: rows are long enough to vectorise, and no transposing copy is needed.
    // Tasks are output channels; an image's gradient plane stays in L1 across the channel's non-zeros.
    const at::Tensor x = x_in.contiguous(), gy = grad_in.contiguous();
    const int64_t c = x.size(1);
    const float* xs = x.const_data_ptr<float>();
    const float* gs = gy.const_data_ptr<float>();
    at::parallel_for(0, oc_count, 1, [=](int64_t begin, int64_t end) {
      for (int64_t oc = begin; oc < end; ++oc) {
        const int32_t e0 = rp[oc], e1 = rp[oc + 1];
        std::vector<double> acc(e1 - e0, 0.0);
        for (int64_t ni = 0; ni < n; ++ni) {
          const float* g = gs + (ni * oc_count + oc) * ho * wo;
          for (int32_t e = e0; e < e1; ++e) {
            const int64_t ic = cols[e] / ksize, rs = cols[e] % ksize;
            const int64_t dy = rs / kw - pad_h, dx = rs % kw - pad_w;
            int64_t y0, y1, x0, x1;
            tap_range(stride_h, dy, h, ho, y0, y1);
            tap_range(stride_w, dx, w, wo, x0, x1);
            const float* plane = xs + (ni * c + ic) * h * w;
            float sum = 0.f;
            for (int64_t y = y0; y < y1 && x0 < x1; ++y) {
              const float* src = plane + (y * stride_h + dy) * w + x0 * stride_w + dx;
              const float* grow = g + y * wo + x0;
              sum += stride_w == 1 ? dot(grow, src, x1 - x0) : dot_strided(grow, src, x1 - x0, stride_w);
            }
            acc[e - e0] += sum;
          }
        }
        for (int32_t e = e0; e < e1; ++e) op[e] = static_cast<float>(acc[e - e0]);
      }
    });
    return out;
  }
  // Small maps: batch innermost, (C, H, W, N) and (OC, H', W', N), so that for stride 1 a non-zero's
  // terms on one output row are one contiguous dot of (columns reached) x N floats, however small the
  // map. A view when the forward ran batch-innermost, one (small) transposing copy otherwise.
  const at::Tensor x = x_in.permute({1, 2, 3, 0}).contiguous();
  const at::Tensor gy = grad_in.permute({1, 2, 3, 0}).contiguous();
  const float* xs = x.const_data_ptr<float>();
  const float* gs = gy.const_data_ptr<float>();
  at::parallel_for(0, oc_count, 1, [=](int64_t begin, int64_t end) {
    for (int64_t oc = begin; oc < end; ++oc) {
      for (int32_t e = rp[oc]; e < rp[oc + 1]; ++e) {
        const int64_t ic = cols[e] / ksize, rs = cols[e] % ksize;
        const int64_t dy = rs / kw - pad_h, dx = rs % kw - pad_w;
        int64_t y0, y1, x0, x1;
        tap_range(stride_h, dy, h, ho, y0, y1);
        tap_range(stride_w, dx, w, wo, x0, x1);
        double sum = 0.0;  // up to N H' W' terms: a double across rows keeps the sum accurate
        for (int64_t y = y0; y < y1 && x0 < x1; ++y) {
          const float* g = gs + ((oc * ho + y) * wo + x0) * n;
          const float* src = xs + ((ic * h + y * stride_h + dy) * w + x0 * stride_w + dx) * n;
          if (stride_w == 1) {
            sum += dot(g, src, (x1 - x0) * n);
          } else {
            for (int64_t j = 0; j < x1 - x0; ++j) sum += dot(g + j * n, src + j * stride_w * n, n);
          }
        }
        op[e] = static_cast<float>(sum);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace sparse_cpu

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("sparse_conv2d_weight_grad_ext", &sparse_cpu::sparse_conv2d_weight_grad_cpu);
}

}  // namespace fastprune
