// CPU kernels of the Gaussian Gram matrix (the `cpp` backend of fastprune::gaussian_gram): the
// m x m x d work is one BLAS GEMM each way (at::mm on oneDNN/MKL), everything else is fused into
// single parallel passes over the m x m matrices.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "hsic_common.h"

namespace fastprune {
namespace {

at::Tensor centred_float(const at::Tensor& x, const at::Tensor& mean) { return x.to(at::kFloat) - mean; }

at::Tensor gaussian_gram_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, bool apply_exp) {
  check_gram_args(x, mean, scale);
  const int64_t m = x.size(0);
  const at::Tensor xc = centred_float(x, mean);
  const at::Tensor gram = at::mm(xc, xc.t()).contiguous();
  at::Tensor out = at::empty({m, m}, x.options().dtype(at::kFloat));
  const float* g = gram.const_data_ptr<float>();
  float* k = out.mutable_data_ptr<float>();
  const float s = scale.item<float>();  // a CPU tensor: no device round trip
  at::parallel_for(0, m, 16, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float sq_i = g[i * m + i];
      for (int64_t j = 0; j < m; ++j) {
        // The diagonal is exactly zero distance; off it, clamp the rounding below zero away.
        const float dist = i == j ? 0.f : std::max(sq_i + g[j * m + j] - 2.f * g[i * m + j], 0.f);
        k[i * m + j] = apply_exp ? std::exp(-s * dist) : dist;
      }
    }
  });
  return out;
}

at::Tensor gaussian_gram_backward_cpu(const at::Tensor& grad, const at::Tensor& k, const at::Tensor& x,
                                      const at::Tensor& mean, const at::Tensor& scale) {
  check_gram_args(x, mean, scale);
  check_gram_backward_args(grad, k, x);
  const int64_t m = x.size(0);
  at::Tensor s_mat = at::empty({m, m}, k.options());
  at::Tensor s_rows = at::empty({m, 1}, k.options());
  const float* g = grad.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  float* sp = s_mat.mutable_data_ptr<float>();
  float* rp = s_rows.mutable_data_ptr<float>();
  at::parallel_for(0, m, 16, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float row = 0.f;
      for (int64_t j = 0; j < m; ++j) {
        const float v = (g[i * m + j] + g[j * m + i]) * kp[i * m + j];
        sp[i * m + j] = v;
        row += v;
      }
      rp[i] = row;
    }
  });
  const at::Tensor xc = centred_float(x, mean);
  // dX = 2 scale (S xc - diag(S 1) xc): the GEMM writes S xc, then one fused pass.
  at::Tensor dx = at::mm(s_mat, xc);
  dx.sub_(s_rows * xc).mul_(2.0 * scale.item<float>());
  return dx.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("gaussian_gram_ext", &gaussian_gram_cpu);
  m.impl("gaussian_gram_backward_ext", &gaussian_gram_backward_cpu);
}

}  // namespace fastprune
