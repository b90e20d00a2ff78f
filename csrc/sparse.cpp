// CPU kernels of the sparse convolution and linear layers (the `cpp` backend of
// fastprune::sparse_conv2d / sparse_linear): direct sparse convolution, work proportional to the
// number of non-zero weights. Three algorithms (sparsify times them and keeps the fastest):
//
// Padded (algo 1): the input is re-laid channel-major and zero-padded,
// xp[c][n * Hp * Wp + h * Wp + w], with a zero tail. For stride 1, output position
// q = n * Hp * Wp + h * Wp + w (on the padded grid) receives v * xp[ic][q + r * Wp + s] from the
// non-zero weight v at (ic, r, s): one long contiguous AXPY per non-zero over the whole batch, which
// vectorises even for 4x4 feature maps. Positions with h >= Ho or w >= Wo are computed and dropped.
// Tasks are (output channel, chunk of padded rows) with the chunk's accumulator in L1. A stride S
// splits the padded input into S x S phases (every S-th row and column from each offset), on which
// the convolution is again a stride-1 one.
// Direct (algo 2): NCHW planes, row-wise AXPYs, no re-layout (wide maps, batch 1).
// Batch innermost (algo 3): activations (C, H, W, N); see sparse_conv2d_batch_innermost.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPRUNE_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTPRUNE_CPU_CLONES
#endif

namespace fastprune {
namespace {

// A task covers a chunk of output positions for one output channel. Tasks run chunk-major, so all
// output channels of a chunk run while the chunk's slice of every input channel (C x chunk floats)
// sits in L2; the chunk is sized to keep that slice near kSliceBytes.
constexpr int64_t kSliceBytes = 512 * 1024;
constexpr int64_t kMaxChunkFloats = 4096, kMinChunkFloats = 256;
// Feature maps at least this wide take the direct path (long enough rows to vectorise).
constexpr int64_t kDirectMinWidth = 16;

// acc[0:len] += v * src[0:len]: the whole inner loop of a non-zero. Built for AVX2 and baseline.
FASTPRUNE_CPU_CLONES void axpy(float* __restrict__ acc, const float* __restrict__ src, float v, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) acc[j] += v * src[j];
}

// acc[0:len] += sum of four AXPYs in one pass: the accumulator is loaded and stored once per four
// multiply-adds (an AXPY loads and stores it for each), and four input streams stay few enough for
// the hardware prefetchers.
FASTPRUNE_CPU_CLONES void axpy4(float* __restrict__ acc, const float* __restrict__ s0, const float* __restrict__ s1,
                                const float* __restrict__ s2, const float* __restrict__ s3, float v0, float v1,
                                float v2, float v3, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) acc[j] += v0 * s0[j] + v1 * s1[j] + v2 * s2[j] + v3 * s3[j];
}

FASTPRUNE_CPU_CLONES void axpy8(float* __restrict__ acc, const float* const* __restrict__ s, const float* v,
                                int64_t len) {
  const float* __restrict__ s0 = s[0]; const float* __restrict__ s1 = s[1];
  const float* __restrict__ s2 = s[2]; const float* __restrict__ s3 = s[3];
  const float* __restrict__ s4 = s[4]; const float* __restrict__ s5 = s[5];
  const float* __restrict__ s6 = s[6]; const float* __restrict__ s7 = s[7];
  const float v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3], v4 = v[4], v5 = v[5], v6 = v[6], v7 = v[7];
#pragma omp simd
  for (int64_t j = 0; j < len; ++j)
    acc[j] += (v0 * s0[j] + v1 * s1[j] + v2 * s2[j] + v3 * s3[j]) + (v4 * s4[j] + v5 * s5[j] + v6 * s6[j] + v7 * s7[j]);
}

FASTPRUNE_CPU_CLONES void axpy_strided(float* __restrict__ acc, const float* __restrict__ src, float v, int64_t len,
                                       int64_t stride) {
  for (int64_t j = 0; j < len; ++j) acc[j] += v * src[j * stride];
}

// The output rows (or columns) [lo, hi) whose input position i * S + d lies inside [0, size)
// (floor division: d can reach past the last input row when the padding is wide).
inline void tap_range(int64_t S, int64_t d, int64_t size, int64_t out, int64_t& lo, int64_t& hi) {
  lo = d >= 0 ? 0 : (-d + S - 1) / S;
  hi = size - 1 - d < 0 ? 0 : std::min<int64_t>(out, (size - 1 - d) / S + 1);
}

// One output plane of the direct algorithm: acc (ho x wo) += every non-zero e in [e0, e1) of this
// output channel applied to the image's input planes, for stride S in both directions. The whole
// loop nest is multi-versioned so the short row AXPYs inline (a call per row costs as much as the
// row itself); S is a template parameter so the stride-1 rows stay contiguous and vectorise.
// (Fusing four non-zeros per pass over their common rectangle, as the padded algorithm does, was
// measured no faster here: the rows are too short.)
template <int S>
FASTPRUNE_CPU_CLONES void direct_plane(float* __restrict__ acc, const float* __restrict__ image,
                                       const int32_t* cols, const float* vals, int64_t e0, int64_t e1, int64_t h,
                                       int64_t w, int64_t ho, int64_t wo, int64_t kw, int64_t ksize, int64_t pad_h,
                                       int64_t pad_w) {
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t col = cols[e], ic = col / ksize, rs = col % ksize;
    const int64_t dy = rs / kw - pad_h, dx = rs % kw - pad_w;  // input offset of this tap
    // Output rows/columns whose input position y * S + dy (x * S + dx) lies inside the image.
    int64_t y0, y1, x0, x1;
    tap_range(S, dy, h, ho, y0, y1);
    tap_range(S, dx, w, wo, x0, x1);
    const float v = vals[e];
    const float* plane = image + ic * h * w;
    for (int64_t y = y0; y < y1; ++y) {
      float* a = acc + y * wo;
      const float* src = plane + (y * S + dy) * w + dx;
#pragma omp simd
      for (int64_t j = x0; j < x1; ++j) a[j] += v * src[j * S];
    }
  }
}

// The batch-innermost algorithm (algo 3). Activations are laid out (C, H, W, N): the batch is the
// innermost dimension, which a PyTorch tensor of shape (N, C, H, W) expresses with strides
// (1, H W N, W N, N). A non-zero (ic, r, s) adds v * x[ic][y S + r - pad][x S + s - pad][0:N] to
// out[oc][y][x][0:N]: for stride 1 a whole output row is one contiguous AXPY of W' N floats, with
// no padded positions computed (the padded algorithm computes and drops them: 2.25x the work on a
// 4x4 map) and no re-layout when the previous layer wrote this layout too. Batches above
// kMaxBatchBlock are split into blocks.
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

at::Tensor sparse_conv2d_batch_innermost(const at::Tensor& x_in, const int32_t* rp, const int32_t* cols,
                                         const float* vals, const float* bp, int64_t oc_count, int64_t kh, int64_t kw,
                                         int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, bool relu,
                                         bool pool, const std::optional<at::Tensor>& residual) {
  // (C, H, W, N) storage: a view when x is already in this layout, else one transposing copy.
  const at::Tensor x = x_in.permute({1, 2, 3, 0}).contiguous();
  const int64_t c = x.size(0), h = x.size(1), w = x.size(2), n = x.size(3);
  const int64_t ho = (h + 2 * pad_h - kh) / stride_h + 1, wo = (w + 2 * pad_w - kw) / stride_w + 1;
  const int64_t oh = pool ? ho / 2 : ho, ow = pool ? wo / 2 : wo;
  at::Tensor out = at::empty({oc_count, oh, ow, n}, x.options());
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
  // The residual (a ResNet block's shortcut) in the output's (OC, H', W', N) layout: a view when the
  // previous layers ran batch-innermost too.
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(!pool && residual->dim() == 4 && residual->size(0) == n && residual->size(1) == oc_count &&
                    residual->size(2) == oh && residual->size(3) == ow && residual->scalar_type() == at::kFloat,
                "sparse_conv2d: residual must be float32 of the output's shape");
    res = residual->permute({1, 2, 3, 0}).contiguous();
  }
  const float* rsp = residual.has_value() ? res.const_data_ptr<float>() : nullptr;
  // Tasks run (batch block, row block)-major so all output channels of a block run while its slice
  // of the input is in cache.
  at::parallel_for(0, batch_blocks * row_blocks * oc_count, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> acc(rows * wo * nb_max);
    std::vector<RowTap> taps;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t oc = task % oc_count, rb = (task / oc_count) % row_blocks, bb = task / oc_count / row_blocks;
      const int64_t b0 = bb * nb_max, nb = std::min(nb_max, n - b0);
      const int64_t y0 = rb * rows, y1 = std::min(rows_out, y0 + rows);
      std::fill(acc.begin(), acc.begin() + (y1 - y0) * wo * nb, bp ? bp[oc] : 0.f);
      for (int64_t y = y0; y < y1; ++y) {
        taps.clear();
        for (int32_t e = rp[oc]; e < rp[oc + 1]; ++e) {
          const int64_t ic = cols[e] / ksize, rs = cols[e] % ksize;
          const int64_t iy = y * stride_h + rs / kw - pad_h, dx = rs % kw - pad_w;
          if (iy < 0 || iy >= h) continue;
          RowTap t{((ic * h + iy) * w + dx) * n + b0, vals[e], 0, 0};
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
      // Epilogue: write out[oc][y][x][b0 : b0 + nb], with ReLU, or ReLU then 2x2 max pooling.
      if (pool) {
        for (int64_t py = y0 / 2; py < y1 / 2; ++py) {
          const float* r0 = acc.data() + (2 * py - y0) * wo * nb;
          const float* r1 = r0 + wo * nb;
          for (int64_t px = 0; px < ow; ++px) {
            float* dst = op + ((oc * oh + py) * ow + px) * n + b0;
            const float *a = r0 + 2 * px * nb, *b = a + nb, *c0 = r1 + 2 * px * nb, *d = c0 + nb;
            for (int64_t j = 0; j < nb; ++j)
              dst[j] = std::max(std::max(std::max(a[j], b[j]), std::max(c0[j], d[j])), 0.f);
          }
        }
        continue;
      }
      for (int64_t y = y0; y < y1; ++y) {
        for (int64_t xx = 0; xx < wo; ++xx) {
          const float* a = acc.data() + ((y - y0) * wo + xx) * nb;
          const int64_t at_out = ((oc * oh + y) * ow + xx) * n + b0;
          float* dst = op + at_out;
          if (rsp) {
            const float* r = rsp + at_out;
            for (int64_t j = 0; j < nb; ++j) dst[j] = std::max(a[j] + r[j], 0.f);
          } else if (relu) {
            for (int64_t j = 0; j < nb; ++j) dst[j] = std::max(a[j], 0.f);
          } else {
            std::copy(a, a + nb, dst);
          }
        }
      }
    }
  });
  return out.permute({3, 0, 1, 2});
}

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

at::Tensor sparse_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t kh, int64_t kw,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t algo,
                             int64_t epilogue, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(algo >= 0 && algo <= 3,
              "sparse_conv2d: algo must be 0 (auto), 1 (padded), 2 (direct) or 3 (batch innermost)");
  TORCH_CHECK(epilogue >= 0 && epilogue <= 3,
              "sparse_conv2d: epilogue must be 0 (none), 1 (relu), 2 (relu + pool) or 3 (add residual + relu)");
  TORCH_CHECK((epilogue == 3) == residual.has_value() && (epilogue != 3 || algo == 3),
              "sparse_conv2d: the residual epilogue (3) needs a residual and the batch-innermost algorithm (3)");
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat, "sparse_conv2d: x must be float32 (N, C, H, W)");
  TORCH_CHECK(kh >= 1 && kw >= 1 && stride_h >= 1 && stride_w >= 1 && pad_h >= 0 && pad_w >= 0,
              "sparse_conv2d: bad geometry");
  const int64_t oc_count = row_ptr.size(0) - 1;
  check_csr(row_ptr, col_idx, values, oc_count);
  TORCH_CHECK(x_in.size(2) + 2 * pad_h >= kh && x_in.size(3) + 2 * pad_w >= kw,
              "sparse_conv2d: the kernel is larger than the padded input");
  if (algo == 3)
    return sparse_conv2d_batch_innermost(x_in, row_ptr.const_data_ptr<int32_t>(), col_idx.const_data_ptr<int32_t>(),
                                         values.const_data_ptr<float>(),
                                         bias.has_value() ? bias->const_data_ptr<float>() : nullptr, oc_count, kh, kw,
                                         stride_h, stride_w, pad_h, pad_w, epilogue >= 1, epilogue == 2, residual);
  // channels_last in, channels_last out (so that pooling and BatchNorm around the layer stay on
  // their fast path); any other layout is read through its strides and gives a contiguous output.
  const bool channels_last = x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  const at::Tensor& x = x_in;
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t hp = h + 2 * pad_h, wp = w + 2 * pad_w;
  const int64_t ho = (hp - kh) / stride_h + 1, wo = (wp - kw) / stride_w + 1;
  const bool direct_ok = !channels_last && x.is_contiguous() && stride_h == stride_w && stride_h <= 2;
  TORCH_CHECK(algo != 2 || direct_ok, "sparse_conv2d: the direct algorithm needs stride 1 or 2 and a contiguous input");
  const bool direct = algo == 2 || (algo == 0 && direct_ok && w >= kDirectMinWidth);
  TORCH_CHECK(epilogue != 2 || direct || stride_h == stride_w,
              "sparse_conv2d: the pooling epilogue needs the direct algorithm or equal strides");
  const bool relu = epilogue >= 1, pool = epilogue == 2;
  at::Tensor out = at::empty({n, oc_count, pool ? ho / 2 : ho, pool ? wo / 2 : wo},
                             x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const int32_t* rp = row_ptr.const_data_ptr<int32_t>();
  const int32_t* ci_ = col_idx.const_data_ptr<int32_t>();
  const float* vals = values.const_data_ptr<float>();
  const float* bp = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  const int64_t ksize = kh * kw;

  if (direct) {
    // Wide feature maps: no re-layout. Tasks are (image, output channel); each output plane is
    // accumulated in L1 by row-wise AXPYs over the rows and columns a non-zero weight reaches,
    // and the image's input planes stay in L2 across output channels.
    const float* src = x.const_data_ptr<float>();
    at::parallel_for(0, n * oc_count, 1, [=](int64_t begin, int64_t end) {
      std::vector<float> acc(ho * wo);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t ni = task / oc_count, oc = task % oc_count;
        std::fill(acc.begin(), acc.end(), bp ? bp[oc] : 0.f);
        const float* image = src + ni * c * h * w;
        if (stride_h == 1) {
          direct_plane<1>(acc.data(), image, ci_, vals, rp[oc], rp[oc + 1], h, w, ho, wo, kw, ksize, pad_h, pad_w);
        } else {
          direct_plane<2>(acc.data(), image, ci_, vals, rp[oc], rp[oc + 1], h, w, ho, wo, kw, ksize, pad_h, pad_w);
        }
        float* dst = op + (ni * oc_count + oc) * out.size(2) * out.size(3);
        if (pool) {  // ReLU then 2x2 max pooling while the plane is in L1: max(0, max of four)
          const int64_t pho = ho / 2, pwo = wo / 2;
          for (int64_t y = 0; y < pho; ++y) {
            const float* r0 = acc.data() + 2 * y * wo;
            const float* r1 = r0 + wo;
            for (int64_t xx = 0; xx < pwo; ++xx)
              dst[y * pwo + xx] = std::max(std::max(std::max(r0[2 * xx], r0[2 * xx + 1]),
                                                    std::max(r1[2 * xx], r1[2 * xx + 1])), 0.f);
          }
        } else if (relu) {
          for (int64_t j = 0; j < ho * wo; ++j) dst[j] = std::max(acc[j], 0.f);
        } else {
          std::copy(acc.begin(), acc.end(), dst);
        }
      }
    });
    return out;
  }

  // Padded, channel-major copy of the input, split into S x S phases for stride S (S = 1: the
  // padded input itself): phase (a, b) of channel ic holds xpad[ic][n][S i + a][S j + b] on an
  // Hq x Wq grid, so a stride-S convolution becomes a stride-1 one over S^2 C channels, each
  // non-zero (ic, r, s) reading phase (r % S, s % S) shifted by (r / S, s / S). A zero tail covers
  // the shifted reads past the end. Every element is written once: no separate memset pass.
  // Unequal strides use S = 1 and the strided loop at the end.
  const int64_t S = stride_h == stride_w ? stride_h : 1;
  const int64_t gh = (hp + S - 1) / S, gw = (wp + S - 1) / S, gplane = gh * gw;
  const int64_t tail = ((kh - 1) / S) * gw + (kw - 1) / S + 1;
  const int64_t row_len = n * gplane + tail;
  at::Tensor xp = at::empty({S * S * c, row_len}, x.options());
  if (S > 1) {
    // Phases: zero everything (borders, tail) in one fast pass, then split each input row into its
    // S phase rows, a strided gather per phase column.
    xp.zero_();
    const float* src = x.const_data_ptr<float>();
    float* dst = xp.mutable_data_ptr<float>();
    const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
    at::parallel_for(0, c * n, 1, [=](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t ci = t / n, ni = t % n;
        for (int64_t y = 0; y < h; ++y) {
          const int64_t yp = y + pad_h, pa = yp % S, i = yp / S;
          const float* s = src + ni * sn + ci * sc + y * sh;
          for (int64_t pb = 0; pb < S; ++pb) {
            // grid columns j whose input column S j + pb - pad_w lies in [0, w)
            const int64_t j0 = pad_w - pb <= 0 ? 0 : (pad_w - pb + S - 1) / S;
            const int64_t last = w - 1 + pad_w - pb;
            const int64_t j1 = last < 0 ? 0 : std::min<int64_t>(gw, last / S + 1);
            float* line = dst + ((pa * S + pb) * c + ci) * row_len + ni * gplane + i * gw;
            const float* first = s + (S * j0 + pb - pad_w) * sw;
            for (int64_t j = 0; j < j1 - j0; ++j) line[j0 + j] = first[j * S * sw];
          }
        }
      }
    });
  } else {
    const float* src = x.const_data_ptr<float>();
    float* dst = xp.mutable_data_ptr<float>();
    const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
    at::parallel_for(0, c, 1, [=](int64_t begin, int64_t end) {
      for (int64_t ci = begin; ci < end; ++ci) {
        float* row = dst + ci * row_len;
        for (int64_t ni = 0; ni < n; ++ni) {
          for (int64_t i = 0; i < gh; ++i) {
            float* line = row + ni * gplane + i * gw;
            const int64_t y = i - pad_h;  // input row of this padded row
            if (y < 0 || y >= h) {
              std::fill(line, line + gw, 0.f);
              continue;
            }
            const float* s = src + ni * sn + ci * sc + y * sh;
            if (sw == 1) {  // contiguous rows: one copy between the pads
              std::fill(line, line + pad_w, 0.f);
              std::copy(s, s + w, line + pad_w);
              std::fill(line + pad_w + w, line + gw, 0.f);
            } else {  // channels_last: a strided gather
              std::fill(line, line + pad_w, 0.f);
              for (int64_t xx = 0; xx < w; ++xx) line[pad_w + xx] = s[xx * sw];
              std::fill(line + pad_w + w, line + gw, 0.f);
            }
          }
        }
        std::fill(row + n * gplane, row + row_len, 0.f);
      }
    });
  }
  // Output strides: (n, oc, y, x) -> offset, for either layout.
  const int64_t on = out.stride(0), ocs = out.stride(1), oys = out.stride(2), oxs = out.stride(3);
  const float* xpp = xp.const_data_ptr<float>();
  // Where a non-zero of weight column (ic, r, s) reads, relative to an output position: a table per
  // column, C kh kw entries (fewer than the non-zeros, so cheap to build even at batch 1).
  std::vector<int64_t> col_offset(c * ksize);
  for (int64_t col = 0; col < c * ksize; ++col) {
    const int64_t ic = col / ksize, r = (col % ksize) / kw, sx = (col % ksize) % kw;
    col_offset[col] = ((r % S) * S + sx % S) * c * row_len + ic * row_len + (r / S) * gw + sx / S;
  }
  const int64_t* cop = col_offset.data();

  if (stride_h == stride_w) {
    // Tasks: (block of whole rows of the flattened (N * Hq) x Wq grid, output channel), chunk-major.
    const int64_t rows_total = n * gh;
    const int64_t chunk_floats = std::clamp<int64_t>(kSliceBytes / (S * S * c * static_cast<int64_t>(sizeof(float))),
                                                     kMinChunkFloats, kMaxChunkFloats);
    // With the pooling epilogue a chunk holds whole images, so that row pairs never straddle two.
    const int64_t rows_per_chunk = pool ? std::max<int64_t>(gh, chunk_floats / gw / gh * gh)
                                        : std::max<int64_t>(1, chunk_floats / gw);
    const int64_t chunks = (rows_total + rows_per_chunk - 1) / rows_per_chunk;
    at::parallel_for(0, oc_count * chunks, 1, [=](int64_t begin, int64_t end) {
      std::vector<float> acc(rows_per_chunk * gw);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t oc = task % oc_count, r0 = (task / oc_count) * rows_per_chunk;
        const int64_t r1 = std::min(rows_total, r0 + rows_per_chunk);
        const int64_t q0 = r0 * gw, len = (r1 - r0) * gw;
        std::fill(acc.begin(), acc.begin() + len, bp ? bp[oc] : 0.f);
        const float* base = xpp + q0;
        int32_t e = rp[oc];
        for (; e + 8 <= rp[oc + 1]; e += 8) {  // eight, then four non-zeros per pass over the accumulator
          const float* s8[8] = {base + cop[ci_[e]],     base + cop[ci_[e + 1]], base + cop[ci_[e + 2]], base + cop[ci_[e + 3]],
                                base + cop[ci_[e + 4]], base + cop[ci_[e + 5]], base + cop[ci_[e + 6]], base + cop[ci_[e + 7]]};
          axpy8(acc.data(), s8, vals + e, len);
        }
        for (; e + 4 <= rp[oc + 1]; e += 4)
          axpy4(acc.data(), base + cop[ci_[e]], base + cop[ci_[e + 1]], base + cop[ci_[e + 2]], base + cop[ci_[e + 3]], vals[e],
                vals[e + 1], vals[e + 2], vals[e + 3], len);
        for (; e < rp[oc + 1]; ++e) axpy(acc.data(), base + cop[ci_[e]], vals[e], len);
        if (pool) {  // ReLU then 2x2 max pooling while the chunk is in L1: max(0, max of four)
          const int64_t pho = ho / 2, pwo = wo / 2;
          for (int64_t r = r0; r < r1; r += gh) {
            const int64_t ni = r / gh;
            for (int64_t py = 0; py < pho; ++py) {
              const float* a = acc.data() + (r - r0 + 2 * py) * gw;
              const float* b = a + gw;
              float* dst = op + ni * on + oc * ocs + py * oys;
              for (int64_t px = 0; px < pwo; ++px)
                dst[px * oxs] = std::max(std::max(std::max(a[2 * px], a[2 * px + 1]),
                                                  std::max(b[2 * px], b[2 * px + 1])), 0.f);
            }
          }
          continue;
        }
        for (int64_t r = r0; r < r1; ++r) {  // keep the valid outputs of each grid row
          const int64_t ni = r / gh, y = r % gh;
          if (y >= ho) continue;
          const float* a = acc.data() + (r - r0) * gw;
          float* dst = op + ni * on + oc * ocs + y * oys;
          if (relu) {
            for (int64_t xx = 0; xx < wo; ++xx) dst[xx * oxs] = std::max(a[xx], 0.f);
          } else if (oxs == 1) {
            std::copy(a, a + wo, dst);
          } else {  // channels_last: a strided scatter
            for (int64_t xx = 0; xx < wo; ++xx) dst[xx * oxs] = a[xx];
          }
        }
      }
    });
  } else {
    // Unequal strides (S = 1 layout). Tasks: (output channel, image); an accumulator plane, one
    // output row at a time, strided reads.
    at::parallel_for(0, oc_count * n, 1, [=](int64_t begin, int64_t end) {
      std::vector<float> acc(ho * wo);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t oc = task / n, ni = task % n;
        std::fill(acc.begin(), acc.end(), bp ? bp[oc] : 0.f);
        for (int32_t e = rp[oc]; e < rp[oc + 1]; ++e) {
          const float* src = xpp + cop[ci_[e]] + ni * gplane;
          for (int64_t y = 0; y < ho; ++y)
            axpy_strided(acc.data() + y * wo, src + y * stride_h * gw, vals[e], wo, stride_w);
        }
        float* dst = op + ni * on + oc * ocs;
        for (int64_t y = 0; y < ho; ++y)
          for (int64_t xx = 0; xx < wo; ++xx)
            dst[y * oys + xx * oxs] = relu ? std::max(acc[y * wo + xx], 0.f) : acc[y * wo + xx];
      }
    });
  }
  return out;
}

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

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("sparse_conv2d_ext", &sparse_conv2d_cpu);
  m.impl("sparse_linear_ext", &sparse_linear_cpu);
}

}  // namespace fastprune
