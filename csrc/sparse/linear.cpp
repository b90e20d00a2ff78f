// fastprune::sparse_linear_ext on the CPU: y = x W^T + b with W in CSR, one AXPY over the batch per
// non-zero weight (the columns of x, made rows of x^T, are contiguous).
#include <torch/library.h>

#include "sparse_common.h"

namespace fastprune {
namespace sparse_cpu {

namespace {

at::Tensor sparse_linear_cpu(const at::Tensor& x_in, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "sparse_linear: x must be float32 (N, in)");
  const int64_t out_features = row_ptr.size(0) - 1;
  check_csr(row_ptr, col_idx, values, out_features);
  const int64_t n = x_in.size(0);
  // Columns of x are rows of x^T: one contiguous AXPY over the batch per non-zero weight.
  const at::Tensor xt = x_in.t().contiguous();
  at::Tensor yt = at::empty({out_features, n}, x_in.options());
  const int32_t* rp = row_ptr.const_data_ptr<int32_t>();
  const int32_t* cp = col_idx.const_data_ptr<int32_t>();
  const float* vals = values.const_data_ptr<float>();
  const float* xp = xt.const_data_ptr<float>();
  const float* bp = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* yp = yt.mutable_data_ptr<float>();
  at::parallel_for(0, out_features, 1, [=](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      float* acc = yp + o * n;
      std::fill(acc, acc + n, bp ? bp[o] : 0.f);
      auto src = [&](int32_t e) { return xp + static_cast<int64_t>(cp[e]) * n; };
      int32_t e = rp[o];
      for (; e + 4 <= rp[o + 1]; e += 4)
        axpy4(acc, src(e), src(e + 1), src(e + 2), src(e + 3), vals[e], vals[e + 1], vals[e + 2], vals[e + 3], n);
      for (; e < rp[o + 1]; ++e) axpy(acc, src(e), vals[e], n);
    }
  });
  return yt.t().contiguous();
}

}  // namespace
}  // namespace sparse_cpu

TORCH_LIBRARY_IMPL(fastprune, CPU, m) { m.impl("sparse_linear_ext", &sparse_cpu::sparse_linear_cpu); }

}  // namespace fastprune
