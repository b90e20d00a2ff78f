// fastprune::sparse_linear_ext on the CPU: y = x W^T + b with W in CSR, one AXPY over the batch per
// non-zero weight (the columns of x, made rows of x^T, are contiguous).
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

// Global average pooling, flatten, then the sparse linear: x (N, C, H, W) whose channel planes each
// hold (H, W, N) contiguously (the sparse convs' batch-innermost output; planes any distance apart)
// -> (N, out_features). A network's classifier head (ResNet's avgpool + fc) in one call of a few
// kilobytes of code: in the network, after megabytes of generated conv code have passed through the
// caches, the three PyTorch ops' own code came from memory at each call (ResNet-18's head on 16
// images, Zen 4: 0.38 ms in the network against 0.07 alone; bench/NOTES.md, session 20). The pooled
// (C, N) rows are exactly the x^T the linear reads, so nothing is transposed on the way.
at::Tensor pooled_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "pooled_linear: x must be float32 (N, C, H, W), got ",
              x.dim(), " dimensions of ", x.scalar_type());
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(h > 0 && w > 0, "pooled_linear: x must have a non-empty map, got ", h, " x ", w);
  TORCH_CHECK((n == 1 || x.stride(0) == 1) && (w == 1 || x.stride(3) == n) && (h == 1 || x.stride(2) == w * n),
              "pooled_linear: each channel of x must be one contiguous (H, W, N) plane, got strides ", x.strides());
  const int64_t out_features = row_ptr.size(0) - 1;
  check_csr(row_ptr, col_idx, values, out_features);
  const int32_t* rp = row_ptr.const_data_ptr<int32_t>();
  const int32_t* cp = col_idx.const_data_ptr<int32_t>();
  // Checked with plain loops: ATen's ops here would bring their own code back from memory.
  TORCH_CHECK(rp[0] == 0 && rp[out_features] <= col_idx.size(0), "pooled_linear: row_ptr must start at 0 and end within col_idx");
  for (int64_t o = 0; o < out_features; ++o) TORCH_CHECK(rp[o] <= rp[o + 1], "pooled_linear: row_ptr must not decrease");
  for (int64_t e = 0; e < rp[out_features]; ++e)
    TORCH_CHECK(cp[e] >= 0 && cp[e] < c, "pooled_linear: col_idx holds ", cp[e], ", outside [0, ", c, ") for ", c, " channels");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->numel() == out_features && bias->scalar_type() == at::kFloat &&
                                    bias->is_contiguous()),
              "pooled_linear: bias must be a contiguous float32 (", out_features, ",) tensor");
  std::vector<float> pooled(static_cast<size_t>(c * n));  // x^T of the linear
  const float* xp = x.const_data_ptr<float>();
  float* pp = pooled.data();
  const int64_t positions = h * w, plane = x.stride(1);
  const float scale = 1.f / static_cast<float>(positions);
  // Channels over the threads where a joined batch makes them worth it; a micro-batch's run inline.
  at::parallel_for(0, c, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, positions * n)), [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      float* acc = pp + ch * n;
      const float* src = xp + ch * plane;
      std::copy(src, src + n, acc);
      for (int64_t q = 1; q < positions; ++q) axpy(acc, src + q * n, 1.f, n);
      for (int64_t i = 0; i < n; ++i) acc[i] *= scale;
    }
  });
  const float* vals = values.const_data_ptr<float>();
  const float* bp = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  std::vector<float> yt(static_cast<size_t>(out_features * n));
  float* ytp = yt.data();
  const int64_t row_work = (rp[out_features] / std::max<int64_t>(1, out_features) + 1) * n;
  at::parallel_for(0, out_features, std::max<int64_t>(1, 65536 / row_work), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      float* acc = ytp + o * n;
      std::fill(acc, acc + n, bp ? bp[o] : 0.f);
      for (int32_t e = rp[o]; e < rp[o + 1]; ++e) axpy(acc, pp + static_cast<int64_t>(cp[e]) * n, vals[e], n);
    }
  });
  at::Tensor out = at::empty({n, out_features}, x.options());
  float* op = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t o = 0; o < out_features; ++o) op[i * out_features + o] = yt[static_cast<size_t>(o * n + i)];
  return out;
}

}  // namespace sparse_cpu

TORCH_LIBRARY_IMPL(fastprune, CPU, m) { m.impl("sparse_linear_ext", &sparse_cpu::sparse_linear_cpu); }

}  // namespace fastprune
