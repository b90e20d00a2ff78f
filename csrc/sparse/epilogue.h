// The epilogue every CPU sparse-convolution algorithm shares: how a task's accumulator rows become
// output, with the fused ReLU, residual sum + ReLU, or ReLU then 2x2 max pooling, written while the
// accumulator is still in L1. An accumulator row holds `len` output positions of `nb` floats each,
// acc_step floats apart (nb = acc_step = 1 for the NCHW algorithms; the batch block for the
// batch-innermost ones, whose accumulators may hold padding images past nb); position x goes to
// dst[x * dst_step : x * dst_step + nb] (dst_step: the output's stride between positions).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastprune {
namespace sparse_cpu {

// dst <- acc, relu(acc) or relu(acc + residual); residual has dst's offsets (or is nullptr).
inline void store_row(float* dst, int64_t dst_step, const float* acc, int64_t acc_step, int64_t len, int64_t nb,
                      bool relu, const float* residual) {
  if (nb == 1 && dst_step == 1 && acc_step == 1 && residual == nullptr) {  // the contiguous case: one vectorised pass
    if (relu) {
      for (int64_t j = 0; j < len; ++j) dst[j] = std::max(acc[j], 0.f);
    } else {
      std::copy(acc, acc + len, dst);
    }
    return;
  }
  for (int64_t x = 0; x < len; ++x) {
    float* d = dst + x * dst_step;
    const float* a = acc + x * acc_step;
    if (residual != nullptr) {
      const float* r = residual + x * dst_step;
      for (int64_t j = 0; j < nb; ++j) d[j] = std::max(a[j] + r[j], 0.f);
    } else if (relu) {
      for (int64_t j = 0; j < nb; ++j) d[j] = std::max(a[j], 0.f);
    } else {
      std::copy(a, a + nb, d);
    }
  }
}

// ReLU then 2x2 max pooling of two consecutive accumulator rows a and b into pw outputs:
// max(0, max of the four). An odd last position of the rows is dropped, as nn.MaxPool2d does.
// With `index` (dst's offsets, or nullptr) each output's window position is kept too, for the
// backward pass: 0..3 = 2 dy + dx, the first maximum in that order (PyTorch's tie rule).
inline void store_pooled_row(float* dst, int64_t dst_step, const float* a, const float* b, int64_t acc_step,
                             int64_t pw, int64_t nb, uint8_t* index = nullptr) {
  for (int64_t px = 0; px < pw; ++px) {
    float* d = dst + px * dst_step;
    const float *a0 = a + 2 * px * acc_step, *a1 = a0 + acc_step, *b0 = b + 2 * px * acc_step, *b1 = b0 + acc_step;
    if (index == nullptr) {
      for (int64_t j = 0; j < nb; ++j) d[j] = std::max(std::max(std::max(a0[j], a1[j]), std::max(b0[j], b1[j])), 0.f);
      continue;
    }
    uint8_t* k = index + px * dst_step;
    for (int64_t j = 0; j < nb; ++j) {
      float m = a0[j];
      uint8_t at = 0;
      if (a1[j] > m) m = a1[j], at = 1;
      if (b0[j] > m) m = b0[j], at = 2;
      if (b1[j] > m) m = b1[j], at = 3;
      d[j] = std::max(m, 0.f);
      k[j] = at;
    }
  }
}

}  // namespace sparse_cpu
}  // namespace fastprune
