// CPU kernels of fastprune::pgd_step_ext (the `cpp` backend). Arithmetic is in opmath (float32 for
// half, bfloat16 and float; float64 for double), in the same order as fastprune/reference/pgd.py, so
// float32 Linf results match the reference bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "pgd_common.h"

namespace fastprune {
namespace {

// Grain of the parallel loops: ~64 KiB of float32 per task keeps threads busy without overhead.
constexpr int64_t kGrain = 16384;

// The Linf update of elements [begin, end) of one sample. Built twice, for AVX2 and for baseline
// x86-64, and picked at load time by the CPU (GCC function multi-versioning), so the wheel still runs
// on CPUs without AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPRUNE_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTPRUNE_CPU_CLONES
#endif

template <typename scalar_t, typename acc_t>
FASTPRUNE_CPU_CLONES void linf_span(const scalar_t* x, const scalar_t* g, const scalar_t* xn, scalar_t* out,
                                    int64_t begin, int64_t end, acc_t a, acc_t e, acc_t lo, acc_t hi) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    const acc_t gj = static_cast<acc_t>(g[j]);
    // Branch-free sign: random gradients would mispredict a branch half the time.
    const acc_t sign = static_cast<acc_t>(gj > acc_t(0)) - static_cast<acc_t>(gj < acc_t(0));
    const acc_t xnj = static_cast<acc_t>(xn[j]);
    acc_t y = static_cast<acc_t>(x[j]) + a * sign;
    y = std::min(std::max(y, xnj - e), xnj + e);
    y = std::min(std::max(y, lo), hi);
    out[j] = static_cast<scalar_t>(y);
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void linf_step(const scalar_t* x, const scalar_t* g, const scalar_t* xn, const float* alpha, const float* eps,
               scalar_t* out, int64_t numel, int64_t per_sample, acc_t lo, acc_t hi) {
  at::parallel_for(0, numel, kGrain, [=](int64_t begin, int64_t end) {
    // Walk the range sample by sample so alpha/eps are constants of each vectorised span.
    for (int64_t i = begin; i < end;) {
      const int64_t sample = i / per_sample;
      const int64_t stop = std::min(end, (sample + 1) * per_sample);
      linf_span<scalar_t, acc_t>(x, g, xn, out, i, stop, alpha[sample], eps[sample], lo, hi);
      i = stop;
    }
  });
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void l2_step(const scalar_t* x, const scalar_t* g, const scalar_t* xn, const float* alpha, const float* eps,
             scalar_t* out, int64_t n, int64_t per_sample, acc_t lo, acc_t hi) {
  // One sample per task: two reductions (|grad| and |delta| after the step), then the write.
  // Sums are accumulated in double so the result does not depend on the thread split.
  at::parallel_for(0, n, 1, [=](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t off = s * per_sample;
      double gsq = 0.0;
      for (int64_t j = 0; j < per_sample; ++j) {
        const double gj = static_cast<acc_t>(g[off + j]);
        gsq += gj * gj;
      }
      const acc_t scale = alpha[s] / std::max(static_cast<acc_t>(std::sqrt(gsq)), acc_t(1e-12));
      double dsq = 0.0;
      for (int64_t j = 0; j < per_sample; ++j) {
        const acc_t xnj = static_cast<acc_t>(xn[off + j]);
        const double d = (static_cast<acc_t>(x[off + j]) + scale * static_cast<acc_t>(g[off + j])) - xnj;
        dsq += d * d;
      }
      const acc_t factor = std::min(acc_t(1), eps[s] / std::max(static_cast<acc_t>(std::sqrt(dsq)), acc_t(1e-12)));
      for (int64_t j = 0; j < per_sample; ++j) {
        const acc_t xnj = static_cast<acc_t>(xn[off + j]);
        const acc_t d = (static_cast<acc_t>(x[off + j]) + scale * static_cast<acc_t>(g[off + j])) - xnj;
        const acc_t y = std::min(std::max(xnj + d * factor, lo), hi);
        out[off + j] = static_cast<scalar_t>(y);
      }
    }
  });
}

void pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat, const at::Tensor& alpha,
                  const at::Tensor& eps, c10::string_view norm, double clip_min, double clip_max,
                  const at::Tensor& out) {
  check_pgd_step_args(x_adv, grad, x_nat, alpha, eps, out);
  const PgdNorm kind = parse_pgd_norm(norm);
  const int64_t numel = x_adv.numel();
  if (numel == 0) return;
  const int64_t n = x_adv.size(0);
  const int64_t per_sample = numel / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t lo = static_cast<acc_t>(clip_min), hi = static_cast<acc_t>(clip_max);
    const auto* x = x_adv.const_data_ptr<scalar_t>();
    const auto* g = grad.const_data_ptr<scalar_t>();
    const auto* xn = x_nat.const_data_ptr<scalar_t>();
    auto* o = out.mutable_data_ptr<scalar_t>();
    const float* a = alpha.const_data_ptr<float>();
    const float* e = eps.const_data_ptr<float>();
    if (kind == PgdNorm::Linf) {
      linf_step<scalar_t>(x, g, xn, a, e, o, numel, per_sample, lo, hi);
    } else {
      l2_step<scalar_t>(x, g, xn, a, e, o, n, per_sample, lo, hi);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) { m.impl("pgd_step_ext", &pgd_step_cpu); }

}  // namespace fastprune
