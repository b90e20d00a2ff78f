// CPU kernels of the Gaussian Gram matrix (the `cpp` backend of fastprune::gaussian_gram): the
// m x m x d work is one BLAS GEMM each way (at::mm on oneDNN/MKL), everything else is fused into
// single parallel passes over the m x m matrices.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "hsic_common.h"

namespace fastprune {
namespace {

// Columns of x processed per step: the centred chunk (m x kChunk floats) stays in cache and one
// buffer serves every chunk, instead of a centred m x d copy (tens of MB, page-faulted in).
constexpr int64_t kChunk = 2048;

// Centre columns [c0, c0 + w) of x into buf (m x kChunk, row stride kChunk); returns the m x w view.
at::Tensor centred_chunk(const at::Tensor& x, const at::Tensor& mean, at::Tensor& buf, int64_t c0, int64_t w) {
  at::Tensor view = buf.narrow(1, 0, w);
  at::sub_out(view, x.narrow(1, c0, w), mean.narrow(0, c0, w));
  return view;
}

at::Tensor gaussian_gram_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, bool apply_exp) {
  check_gram_args(x, mean, scale);
  const int64_t m = x.size(0), d = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor gram = at::zeros({m, m}, fopts);
  at::Tensor buf = at::empty({m, std::min(d, kChunk)}, fopts);
  // K is symmetric: with the rows split in two halves, three block products cover the upper
  // triangle (3/4 of a full GEMM's work); the epilogue mirrors the missing block.
  const int64_t h = m / 2;
  for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
    const int64_t w = std::min(kChunk, d - c0);
    const at::Tensor xc = centred_chunk(x, mean, buf, c0, w);
    if (h == 0) {
      gram.addmm_(xc, xc.t());
      continue;
    }
    const at::Tensor top = xc.narrow(0, 0, h), bottom = xc.narrow(0, h, m - h);
    gram.narrow(0, 0, h).narrow(1, 0, h).addmm_(top, top.t());
    gram.narrow(0, 0, h).narrow(1, h, m - h).addmm_(top, bottom.t());
    gram.narrow(0, h, m - h).narrow(1, h, m - h).addmm_(bottom, bottom.t());
  }
  at::Tensor out = at::empty({m, m}, fopts);
  const float* g = gram.const_data_ptr<float>();
  float* k = out.mutable_data_ptr<float>();
  const float s = scale.item<float>();  // a CPU tensor: no device round trip
  at::parallel_for(0, m, 16, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float sq_i = g[i * m + i];
      for (int64_t j = 0; j < m; ++j) {
        // Read the upper triangle only: the lower-left block was never accumulated, and BLAS need not
        // make the diagonal blocks bit-symmetric. So K comes out exactly symmetric.
        const float dot = g[std::min(i, j) * m + std::max(i, j)];
        // The diagonal is exactly zero distance; off it, clamp the rounding below zero away.
        const float dist = i == j ? 0.f : std::max(sq_i + g[j * m + j] - 2.f * dot, 0.f);
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
  const int64_t m = x.size(0), d = x.size(1);
  const auto fopts = k.options();
  at::Tensor s_mat = at::empty({m, m}, fopts);
  std::vector<float> s_rows(m);
  const float* g = grad.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  float* sp = s_mat.mutable_data_ptr<float>();
  float* rp = s_rows.data();
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
  // dX = 2 scale (S xc - diag(S 1) xc), chunk by chunk: the GEMM writes S xc into dX's columns,
  // then one pass finishes them while the centred chunk is still in cache.
  at::Tensor dx = at::empty({m, d}, fopts);
  at::Tensor buf = at::empty({m, std::min(d, kChunk)}, fopts);
  const float two_scale = 2.f * scale.item<float>();
  for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
    const int64_t w = std::min(kChunk, d - c0);
    const at::Tensor xc = centred_chunk(x, mean, buf, c0, w);
    at::Tensor out = dx.narrow(1, c0, w);
    at::mm_out(out, s_mat, xc);
    float* op = out.mutable_data_ptr<float>();
    const float* xp = xc.const_data_ptr<float>();
    const int64_t xs = xc.stride(0);
    at::parallel_for(0, m, 8, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < w; ++j) op[i * d + j] = two_scale * (op[i * d + j] - rp[i] * xp[i * xs + j]);
      }
    });
  }
  return x.scalar_type() == at::kFloat ? dx : dx.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("gaussian_gram_ext", &gaussian_gram_cpu);
  m.impl("gaussian_gram_backward_ext", &gaussian_gram_backward_cpu);
}

}  // namespace fastprune
