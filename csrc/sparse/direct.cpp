// The direct algorithm (algo 2): NCHW planes, no re-layout. Tasks are (image, output channel); each
// output plane is accumulated in L1 by row-wise AXPYs over the rows and columns a non-zero weight
// reaches, and the image's input planes stay in L2 across output channels. Best on wide feature
// maps and batch 1, where the padded algorithm's copy of the input costs as much as the work.
#include "epilogue.h"
#include "sparse_common.h"

namespace fastprune {
namespace sparse_cpu {
namespace {

// One output plane: acc (ho x wo) += every non-zero e in [e0, e1) of this output channel applied to
// the image's input planes, for stride S in both directions. The whole loop nest is multi-versioned
// so the short row AXPYs inline (a call per row costs as much as the row itself); S is a template
// parameter so the stride-1 rows stay contiguous and vectorise. (Fusing four non-zeros per pass
// over their common rectangle, as the padded algorithm does, was measured no faster here: the rows
// are too short.)
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

}  // namespace

void conv_direct(const at::Tensor& x, const ConvArgs& a, at::Tensor& out) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = (h + 2 * a.pad_h - a.kh) / a.stride_h + 1, wo = (w + 2 * a.pad_w - a.kw) / a.stride_w + 1;
  const int64_t ksize = a.kh * a.kw, oc_count = a.oc_count, plane_out = out.size(2) * out.size(3);
  const float* src = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  uint8_t* ip = pool_index_like(a, out);
  at::parallel_for(0, n * oc_count, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> acc(ho * wo);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ni = task / oc_count, oc = task % oc_count;
      std::fill(acc.begin(), acc.end(), a.bias ? a.bias[oc] : 0.f);
      const float* image = src + ni * c * h * w;
      if (a.stride_h == 1) {
        direct_plane<1>(acc.data(), image, a.cols, a.vals, a.rp[oc], a.rp[oc + 1], h, w, ho, wo, a.kw, ksize, a.pad_h,
                        a.pad_w);
      } else {
        direct_plane<2>(acc.data(), image, a.cols, a.vals, a.rp[oc], a.rp[oc + 1], h, w, ho, wo, a.kw, ksize, a.pad_h,
                        a.pad_w);
      }
      float* dst = op + (ni * oc_count + oc) * plane_out;
      if (a.pool) {
        for (int64_t y = 0; y < ho / 2; ++y) {
          const int64_t at_out = (ni * oc_count + oc) * plane_out + y * (wo / 2);
          store_pooled_row(op + at_out, 1, acc.data() + 2 * y * wo, acc.data() + (2 * y + 1) * wo, 1, wo / 2, 1,
                           ip ? ip + at_out : nullptr);
        }
      } else {
        store_row(dst, 1, acc.data(), 1, ho * wo, 1, a.relu, nullptr);
      }
    }
  });
}

}  // namespace sparse_cpu
}  // namespace fastprune
