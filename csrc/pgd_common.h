// Argument checks shared by the CPU and CUDA pgd_step kernels. The Python op layer validates with
// friendly messages first; these guard the native ops against direct misuse.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>

namespace fastprune {

enum class PgdNorm { Linf, L2 };

inline PgdNorm parse_pgd_norm(c10::string_view norm) {
  if (norm == "linf") return PgdNorm::Linf;
  if (norm == "l2") return PgdNorm::L2;
  TORCH_CHECK(false, "pgd_step: norm must be 'linf' or 'l2', got '", std::string(norm), "'");
}

// The kernels treat every tensor as a flat array whose first `per_sample` elements belong to sample
// 0, and so on: they must be dense, batch-outermost, and share one memory layout (contiguous or
// channels_last both qualify).
inline void check_pgd_step_args(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                                const at::Tensor& alpha, const at::Tensor& eps, const at::Tensor& out) {
  TORCH_CHECK(x_adv.dim() >= 1, "pgd_step: x_adv needs a batch dimension");
  const int64_t n = x_adv.size(0);
  for (const at::Tensor* t : {&grad, &x_nat, &out}) {
    TORCH_CHECK(t->sizes() == x_adv.sizes(), "pgd_step: grad, x_nat and out must have x_adv's shape");
    TORCH_CHECK(t->strides() == x_adv.strides(), "pgd_step: grad, x_nat and out must share x_adv's layout");
    TORCH_CHECK(t->scalar_type() == x_adv.scalar_type(), "pgd_step: grad, x_nat and out must have x_adv's dtype");
    TORCH_CHECK(t->device() == x_adv.device(), "pgd_step: all tensors must be on x_adv's device");
  }
  TORCH_CHECK(x_adv.is_non_overlapping_and_dense(), "pgd_step: x_adv must be dense");
  TORCH_CHECK(n <= 1 || x_adv.stride(0) == x_adv.numel() / n, "pgd_step: the batch dimension must be outermost");
  for (const at::Tensor* t : {&alpha, &eps}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "pgd_step: alpha and eps must have shape (N,)");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "pgd_step: alpha and eps must be contiguous float32");
    TORCH_CHECK(t->device() == x_adv.device(), "pgd_step: alpha and eps must be on x_adv's device");
  }
}

// How the GPU L2 step cuts each sample into chunks (the rule of l2_chunks in fastprune/kernels/pgd.py):
// enough (chunk, sample) blocks to reach `target_blocks`, each chunk a whole number of `block`
// elements, at most kL2MaxChunks chunks per sample, none empty. Returns {n_chunks, chunk_len}.
constexpr int64_t kL2MaxChunks = 64;

inline std::pair<int, int64_t> l2_chunks(int64_t n, int64_t per_sample, int64_t block, int64_t target_blocks) {
  const auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t blocks = cdiv(per_sample, block);
  const int64_t n_chunks = std::max<int64_t>(1, std::min({cdiv(target_blocks, std::max<int64_t>(n, 1)), blocks, kL2MaxChunks}));
  const int64_t chunk_len = cdiv(blocks, n_chunks) * block;
  return {static_cast<int>(cdiv(per_sample, chunk_len)), chunk_len};
}

}  // namespace fastprune
