// Argument checks shared by the CPU and CUDA Gaussian Gram kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastprune {

inline void check_gram_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2, "gaussian_gram: x must be (m, d)");
  TORCH_CHECK(x.stride(1) == 1, "gaussian_gram: x rows must be contiguous");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gaussian_gram: x must be floating point");
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == x.size(1) && mean.is_contiguous() &&
                  mean.scalar_type() == at::kFloat,
              "gaussian_gram: mean must be a contiguous float32 (d,) tensor");
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat, "gaussian_gram: scale must be a float32 scalar");
  TORCH_CHECK(mean.device() == x.device() && scale.device() == x.device(), "gaussian_gram: tensors on different devices");
}

inline void check_gram_backward_args(const at::Tensor& grad, const at::Tensor& k, const at::Tensor& x) {
  const int64_t m = x.size(0);
  for (const at::Tensor* t : {&grad, &k}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == m && t->size(1) == m && t->is_contiguous() &&
                    t->scalar_type() == at::kFloat,
                "gaussian_gram_backward: grad and k must be contiguous float32 (m, m)");
    TORCH_CHECK(t->device() == x.device(), "gaussian_gram_backward: tensors on different devices");
  }
}

}  // namespace fastprune
