// fastprune::sparse_conv2d_ext on the CPU (the `cpp` backend of fastprune::sparse_conv2d): direct
// sparse convolution, work proportional to the number of non-zero weights. Checks the arguments,
// picks the algorithm when asked to (algo 0, by shape), allocates the output in the layout the op
// promises and runs one of padded.cpp, direct.cpp, batch_innermost.cpp, tiled.cpp, generated.cpp.
#include <torch/library.h>

#include "sparse_common.h"

namespace fastprune {
namespace sparse_cpu {

void check_csr(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values, int64_t rows) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) == rows + 1 && row_ptr.scalar_type() == at::kInt &&
                  row_ptr.is_contiguous(),
              "sparse: row_ptr must be a contiguous int32 (rows + 1,) tensor");
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.scalar_type() == at::kInt && col_idx.is_contiguous(),
              "sparse: col_idx must be contiguous int32");
  TORCH_CHECK(values.dim() == 1 && values.size(0) == col_idx.size(0) && values.scalar_type() == at::kFloat &&
                  values.is_contiguous(),
              "sparse: values must be contiguous float32 with col_idx's length");
}

at::Tensor residual_batch_innermost_view(const at::Tensor& r, const at::Tensor& out_chwn) {
  TORCH_CHECK(r.dim() == 4 && r.size(0) == out_chwn.size(3) && r.size(1) == out_chwn.size(0) &&
                  r.size(2) == out_chwn.size(1) && r.size(3) == out_chwn.size(2) && r.scalar_type() == at::kFloat,
              "sparse_conv2d: residual must be float32 of the output's shape");
  return r.permute({1, 2, 3, 0});
}

at::Tensor residual_batch_innermost(const std::optional<at::Tensor>& residual, const at::Tensor& out_chwn, bool pool) {
  if (!residual.has_value()) return at::Tensor();
  TORCH_CHECK(!pool, "sparse_conv2d: the residual epilogue does not pool");
  return residual_batch_innermost_view(*residual, out_chwn).contiguous();
}

namespace {

// Feature maps at least this wide take the direct algorithm when it is chosen by shape (long enough
// rows to vectorise).
constexpr int64_t kDirectMinWidth = 16;

// The convolution; with the pooling epilogue and pool_index given, also the pooling's window
// positions (uint8, the output's sizes and strides) for its backward pass.
at::Tensor run_conv(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                    const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t kh, int64_t kw,
                    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t algo, int64_t epilogue,
                    const std::optional<at::Tensor>& residual, at::Tensor* pool_index) {
  TORCH_CHECK(algo >= 0 && algo <= 6,
              "sparse_conv2d: algo must be 0 (auto), 1 (padded), 2 (direct), 3 (batch innermost), 4 (tiled), 5 "
              "(generated) or 6 (generated, output planes padded: for SparseModel's inference path)");
  TORCH_CHECK(epilogue >= 0 && epilogue <= 3,
              "sparse_conv2d: epilogue must be 0 (none), 1 (relu), 2 (relu + pool) or 3 (add residual + relu)");
  TORCH_CHECK((epilogue == 3) == residual.has_value() && (epilogue != 3 || algo >= 3),
              "sparse_conv2d: the residual epilogue (3) needs a residual and the batch-innermost (3), tiled (4) or "
              "generated (5) algorithm");
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "sparse_conv2d: x must be float32 (N, C, H, W)");
  TORCH_CHECK(kh >= 1 && kw >= 1 && stride_h >= 1 && stride_w >= 1 && pad_h >= 0 && pad_w >= 0,
              "sparse_conv2d: bad geometry");
  const int64_t oc_count = row_ptr.size(0) - 1;
  check_csr(row_ptr, col_idx, values, oc_count);
  TORCH_CHECK(x.size(2) + 2 * pad_h >= kh && x.size(3) + 2 * pad_w >= kw,
              "sparse_conv2d: the kernel is larger than the padded input");
  const bool relu = epilogue >= 1, pool = epilogue == 2;
  ConvArgs args{row_ptr.const_data_ptr<int32_t>(), col_idx.const_data_ptr<int32_t>(),
                values.const_data_ptr<float>(), bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
                oc_count, kh, kw, stride_h, stride_w, pad_h, pad_w, relu, pool};
  args.pool_index = pool_index;
  args.cols_tensor = &col_idx;
  args.vals_tensor = &values;
  if (algo >= 3) {
    // Each returns a (N, OC, H', W') view of its (OC, H', W', N) output; the index gets the same view.
    at::Tensor out = algo == 3   ? conv_batch_innermost(x, args, residual)
                     : algo == 4 ? conv_tiled(x, args, residual)
                                 : conv_generated(x, args, residual, algo == 6);
    if (pool_index != nullptr && pool_index->defined()) {
      *pool_index = pool_index->as_strided(out.sizes(), out.strides());
    } else if (pool_index != nullptr) {  // an empty output: nothing was allocated
      *pool_index = at::empty_strided(out.sizes(), out.strides(), out.options().dtype(at::kByte));
    }
    return out;
  }
  // channels_last in, channels_last out (so that pooling and BatchNorm around the layer stay on
  // their fast path); any other layout is read through its strides and gives a contiguous output.
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const int64_t n = x.size(0), w = x.size(3);
  const int64_t ho = (x.size(2) + 2 * pad_h - kh) / stride_h + 1, wo = (w + 2 * pad_w - kw) / stride_w + 1;
  const bool direct_ok = !channels_last && x.is_contiguous() && stride_h == stride_w && stride_h <= 2;
  TORCH_CHECK(algo != 2 || direct_ok, "sparse_conv2d: the direct algorithm needs stride 1 or 2 and a contiguous input");
  const bool direct = algo == 2 || (algo == 0 && direct_ok && w >= kDirectMinWidth);
  TORCH_CHECK(epilogue != 2 || direct || stride_h == stride_w,
              "sparse_conv2d: the pooling epilogue needs the direct algorithm or equal strides");
  const int64_t oh = pool ? ho / 2 : ho, ow = pool ? wo / 2 : wo;
  at::Tensor out = channels_last ? pooled_empty({n, oc_count, oh, ow}, {oh * ow * oc_count, 1, ow * oc_count, oc_count},
                                                x.options())
                                 : pooled_empty({n, oc_count, oh, ow}, x.options());
  if (pool_index != nullptr) *pool_index = at::empty_like(out, out.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  if (direct) {
    conv_direct(x, args, out);
  } else {
    conv_padded(x, args, out);
  }
  return out;
}

// ReLU then 2x2 max pooling fused, with the pooling's window positions for the backward pass.
std::tuple<at::Tensor, at::Tensor> sparse_conv2d_pool_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                                                          const at::Tensor& col_idx, const at::Tensor& values,
                                                          const std::optional<at::Tensor>& bias, int64_t kh,
                                                          int64_t kw, int64_t stride_h, int64_t stride_w,
                                                          int64_t pad_h, int64_t pad_w, int64_t algo) {
  at::Tensor index;
  at::Tensor out = run_conv(x, row_ptr, col_idx, values, bias, kh, kw, stride_h, stride_w, pad_h, pad_w, algo, 2,
                            std::nullopt, &index);
  return {out, index};
}

}  // namespace

// The op's CPU kernel; also called without the dispatcher by fastprune._C.sparse_conv2d_cpu (fastprune.cpp).
at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t kh, int64_t kw,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t algo,
                             int64_t epilogue, const std::optional<at::Tensor>& residual) {
  return run_conv(x, row_ptr, col_idx, values, bias, kh, kw, stride_h, stride_w, pad_h, pad_w, algo, epilogue,
                  residual, nullptr);
}

}  // namespace sparse_cpu

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("sparse_conv2d_ext", &sparse_cpu::sparse_conv2d_cpu);
  m.impl("sparse_conv2d_pool_ext", &sparse_cpu::sparse_conv2d_pool_cpu);
}

}  // namespace fastprune
