// The batch-innermost algorithm (algo 3). Activations are laid out (C, H, W, N): the batch is the
// innermost dimension, which a PyTorch tensor of shape (N, C, H, W) expresses with strides
// (1, H W N, W N, N). A non-zero (ic, r, s) adds v * x[ic][y S + r - pad][x S + s - pad][0:N] to
// out[oc][y][x][0:N]: for stride 1 a whole output row is one contiguous AXPY of W' N floats, with
// no padded positions computed (the padded algorithm computes and drops them: 2.25x the work on a
// 4x4 map) and no re-layout when the previous layer wrote this layout too. Batches above
// kMaxBatchBlock are split into blocks.
#include "epilogue.h"
#include "sparse_common.h"

namespace fastprune {
namespace sparse_cpu {
namespace {

constexpr int64_t kAccFloats = 4096;      // a task's accumulator: output rows x W' x batch block, in L1
constexpr int64_t kMaxBatchBlock = 64;

// One non-zero's reach on an output row: input offset of output column 0 (before the batch block
// offset), weight, and the output columns [x0, x1) whose input column lies inside the image.
struct RowTap {
  int64_t offset;
  float v;
  int64_t x0, x1;
};

// acc[x * nb : x * nb + nb] += sum over k taps of v * x_chwn[offset + x S N : ... + nb], x in [lo, hi).
// Eight or four taps share one pass over the accumulator; a contiguous run (stride 1, whole batch)
// is one long call.
void accumulate_taps(float* acc, const float* src, const RowTap* taps, int k, int64_t lo, int64_t hi, int64_t S,
                     int64_t n, int64_t nb) {
  if (lo >= hi) return;
  const bool contiguous = S == 1 && nb == n;
  const int64_t len = contiguous ? (hi - lo) * n : nb;
  const int64_t steps = contiguous ? 1 : hi - lo;
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t x = lo + step;
    float* a = acc + x * nb;
    const float* p[8];
    float v[8];
    for (int i = 0; i < k; ++i) p[i] = src + taps[i].offset + x * S * n, v[i] = taps[i].v;
    if (k == 8) {
      axpy8(a, p, v, len);
    } else if (k == 4) {
      axpy4(a, p[0], p[1], p[2], p[3], v[0], v[1], v[2], v[3], len);
    } else {
      for (int i = 0; i < k; ++i) axpy(a, p[i], v[i], len);
    }
  }
}

}  // namespace

at::Tensor conv_batch_innermost(const at::Tensor& x_in, const ConvArgs& a, const std::optional<at::Tensor>& residual) {
  const int64_t oc_count = a.oc_count, kh = a.kh, kw = a.kw, stride_h = a.stride_h, stride_w = a.stride_w;
  const int64_t pad_h = a.pad_h, pad_w = a.pad_w;
  const bool relu = a.relu, pool = a.pool;
  // (C, H, W, N) storage: a view when x is already in this layout, else one transposing copy.
  const at::Tensor x = x_in.permute({1, 2, 3, 0}).contiguous();
  const int64_t h = x.size(1), w = x.size(2), n = x.size(3);
  const int64_t ho = (h + 2 * pad_h - kh) / stride_h + 1, wo = (w + 2 * pad_w - kw) / stride_w + 1;
  const int64_t oh = pool ? ho / 2 : ho, ow = pool ? wo / 2 : wo;
  at::Tensor out = pooled_empty({oc_count, oh, ow, n}, x.options());
  if (out.numel() == 0) return out.permute({3, 0, 1, 2});
  const int64_t rows_out = pool ? 2 * oh : ho;  // pooling drops an odd last row
  const int64_t batch_blocks = (n + kMaxBatchBlock - 1) / kMaxBatchBlock;
  const int64_t nb_max = (n + batch_blocks - 1) / batch_blocks;
  int64_t rows = std::max<int64_t>(1, kAccFloats / (wo * nb_max));
  if (pool) rows = std::max<int64_t>(2, rows / 2 * 2);  // row pairs stay in one task
  rows = std::min(rows, rows_out);
  const int64_t row_blocks = (rows_out + rows - 1) / rows;
  const int64_t ksize = kh * kw;
  const float* src = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  uint8_t* ip = pool_index_like(a, out);
  const at::Tensor res = residual_batch_innermost(residual, out, pool);
  const float* rsp = res.defined() ? res.const_data_ptr<float>() : nullptr;
  // Tasks run (batch block, row block)-major so all output channels of a block run while its slice
  // of the input is in cache.
  at::parallel_for(0, batch_blocks * row_blocks * oc_count, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> acc(rows * wo * nb_max);
    std::vector<RowTap> taps;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t oc = task % oc_count, rb = (task / oc_count) % row_blocks, bb = task / oc_count / row_blocks;
      const int64_t b0 = bb * nb_max, nb = std::min(nb_max, n - b0);
      const int64_t y0 = rb * rows, y1 = std::min(rows_out, y0 + rows);
      std::fill(acc.begin(), acc.begin() + (y1 - y0) * wo * nb, a.bias ? a.bias[oc] : 0.f);
      for (int64_t y = y0; y < y1; ++y) {
        taps.clear();
        for (int32_t e = a.rp[oc]; e < a.rp[oc + 1]; ++e) {
          const int64_t ic = a.cols[e] / ksize, rs = a.cols[e] % ksize;
          const int64_t iy = y * stride_h + rs / kw - pad_h, dx = rs % kw - pad_w;
          if (iy < 0 || iy >= h) continue;
          RowTap t{((ic * h + iy) * w + dx) * n + b0, a.vals[e], 0, 0};
          tap_range(stride_w, dx, w, wo, t.x0, t.x1);
          if (t.x0 < t.x1) taps.push_back(t);
        }
        float* arow = acc.data() + (y - y0) * wo * nb;
        // Groups of eight, then four, then single taps: the group runs fused over the columns
        // all its taps reach, each tap alone over the rest of its own range (image edges).
        size_t i = 0;
        while (i < taps.size()) {
          const int k = taps.size() - i >= 8 ? 8 : taps.size() - i >= 4 ? 4 : 1;
          int64_t lo = taps[i].x0, hi = taps[i].x1;
          for (int j = 1; j < k; ++j) lo = std::max(lo, taps[i + j].x0), hi = std::min(hi, taps[i + j].x1);
          if (lo >= hi) lo = hi = taps[i].x0;  // no common range: all alone
          accumulate_taps(arow, src, &taps[i], k, lo, hi, stride_w, n, nb);
          for (int j = 0; j < k; ++j) {
            const RowTap& t = taps[i + j];
            accumulate_taps(arow, src, &t, 1, t.x0, std::min(lo, t.x1), stride_w, n, nb);
            accumulate_taps(arow, src, &t, 1, std::max(hi, t.x0), t.x1, stride_w, n, nb);
          }
          i += k;
        }
      }
      // Epilogue: write out[oc][y][x][b0 : b0 + nb], with ReLU, the residual, or ReLU then pooling.
      if (pool) {
        for (int64_t py = y0 / 2; py < y1 / 2; ++py) {
          const float* r0 = acc.data() + (2 * py - y0) * wo * nb;
          const int64_t at_out = (oc * oh + py) * ow * n + b0;
          store_pooled_row(op + at_out, n, r0, r0 + wo * nb, nb, ow, nb, ip ? ip + at_out : nullptr);
        }
        continue;
      }
      for (int64_t y = y0; y < y1; ++y) {
        const int64_t at_out = (oc * oh + y) * ow * n + b0;
        store_row(op + at_out, n, acc.data() + (y - y0) * wo * nb, nb, wo, nb, relu, rsp ? rsp + at_out : nullptr);
      }
    }
  });
  return out.permute({3, 0, 1, 2});
}

}  // namespace sparse_cpu
}  // namespace fastprune
