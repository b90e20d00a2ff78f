// The padded algorithm (algo 1). The input is re-laid channel-major and zero-padded,
// xp[c][n * Hp * Wp + h * Wp + w], with a zero tail. For stride 1, output position
// q = n * Hp * Wp + h * Wp + w (on the padded grid) receives v * xp[ic][q + r * Wp + s] from the
// non-zero weight v at (ic, r, s): one long contiguous AXPY per non-zero over the whole batch, which
// vectorises even for 4x4 feature maps. Positions with h >= Ho or w >= Wo are computed and dropped.
// Tasks are (output channel, chunk of padded rows) with the chunk's accumulator in L1. A stride S
// splits the padded input into S x S phases (every S-th row and column from each offset), on which
// the convolution is again a stride-1 one. Reads any input layout through its strides.
#include "epilogue.h"
#include "sparse_common.h"

namespace fastprune {
namespace sparse_cpu {
namespace {

// A task covers a chunk of output positions for one output channel. Tasks run chunk-major, so all
// output channels of a chunk run while the chunk's slice of every input channel (C x chunk floats)
// sits in L2; the chunk is sized to keep that slice near kSliceBytes.
constexpr int64_t kSliceBytes = 512 * 1024;
constexpr int64_t kMaxChunkFloats = 4096, kMinChunkFloats = 256;

// Padded, channel-major copy of x, split into S x S phases for stride S (S = 1: the padded input
// itself): phase (a, b) of channel ic holds xpad[ic][n][S i + a][S j + b] on a gh x gw grid, so a
// stride-S convolution becomes a stride-1 one over S^2 C channels, each non-zero (ic, r, s) reading
// phase (r % S, s % S) shifted by (r / S, s / S). A zero tail of row_len - n * gh * gw covers the
// shifted reads past the end. Every element is written once: no separate memset pass for S = 1.
at::Tensor padded_phases(const at::Tensor& x, int64_t S, int64_t pad_h, int64_t pad_w, int64_t gh, int64_t gw,
                         int64_t row_len) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), gplane = gh * gw;
  at::Tensor xp = pooled_empty({S * S * c, row_len}, x.options());
  const float* src = x.const_data_ptr<float>();
  float* dst = xp.mutable_data_ptr<float>();
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  if (S > 1) {
    // Zero everything (borders, tail) in one fast pass, then split each input row into its S phase
    // rows, a strided gather per phase column.
    xp.zero_();
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
    return xp;
  }
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
          std::fill(line, line + pad_w, 0.f);
          if (sw == 1) {  // contiguous rows: one copy between the pads
            std::copy(s, s + w, line + pad_w);
          } else {  // channels_last: a strided gather
            for (int64_t xx = 0; xx < w; ++xx) line[pad_w + xx] = s[xx * sw];
          }
          std::fill(line + pad_w + w, line + gw, 0.f);
        }
      }
      std::fill(row + n * gplane, row + row_len, 0.f);
    }
  });
  return xp;
}

}  // namespace

void conv_padded(const at::Tensor& x, const ConvArgs& a, at::Tensor& out) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t hp = h + 2 * a.pad_h, wp = w + 2 * a.pad_w;
  const int64_t ho = (hp - a.kh) / a.stride_h + 1, wo = (wp - a.kw) / a.stride_w + 1;
  const int64_t ksize = a.kh * a.kw, kw = a.kw, oc_count = a.oc_count;
  // Unequal strides use S = 1 and the strided loop at the end.
  const int64_t S = a.stride_h == a.stride_w ? a.stride_h : 1;
  const int64_t gh = (hp + S - 1) / S, gw = (wp + S - 1) / S, gplane = gh * gw;
  const int64_t tail = ((a.kh - 1) / S) * gw + (a.kw - 1) / S + 1;
  const int64_t row_len = n * gplane + tail;
  const at::Tensor xp = padded_phases(x, S, a.pad_h, a.pad_w, gh, gw, row_len);
  // Output strides: (n, oc, y, x) -> offset, for either layout.
  const int64_t on = out.stride(0), ocs = out.stride(1), oys = out.stride(2), oxs = out.stride(3);
  float* op = out.mutable_data_ptr<float>();
  uint8_t* ip = pool_index_like(a, out);
  const float* xpp = xp.const_data_ptr<float>();
  const int32_t* rp = a.rp;
  const int32_t* ci_ = a.cols;
  const float* vals = a.vals;
  const float* bp = a.bias;
  const bool relu = a.relu, pool = a.pool;
  // Where a non-zero of weight column (ic, r, s) reads, relative to an output position: a table per
  // column, C kh kw entries (fewer than the non-zeros, so cheap to build even at batch 1).
  // Built from a per-tap table: no division per entry (at batch 1 this table costs as much as the layer).
  std::vector<int64_t> col_offset(c * ksize), tap_offset(ksize);
  for (int64_t r = 0; r < a.kh; ++r)
    for (int64_t sx = 0; sx < kw; ++sx)
      tap_offset[r * kw + sx] = ((r % S) * S + sx % S) * c * row_len + (r / S) * gw + sx / S;
  for (int64_t ic = 0; ic < c; ++ic)
    for (int64_t t = 0; t < ksize; ++t) col_offset[ic * ksize + t] = ic * row_len + tap_offset[t];
  const int64_t* cop = col_offset.data();

  if (a.stride_h == a.stride_w) {
    // Tasks: (block of whole rows of the flattened (N * gh) x gw grid, output channel), chunk-major.
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
          const float* s8[8] = {base + cop[ci_[e]],     base + cop[ci_[e + 1]], base + cop[ci_[e + 2]],
                                base + cop[ci_[e + 3]], base + cop[ci_[e + 4]], base + cop[ci_[e + 5]],
                                base + cop[ci_[e + 6]], base + cop[ci_[e + 7]]};
          axpy8(acc.data(), s8, vals + e, len);
        }
        for (; e + 4 <= rp[oc + 1]; e += 4)
          axpy4(acc.data(), base + cop[ci_[e]], base + cop[ci_[e + 1]], base + cop[ci_[e + 2]], base + cop[ci_[e + 3]],
                vals[e], vals[e + 1], vals[e + 2], vals[e + 3], len);
        for (; e < rp[oc + 1]; ++e) axpy(acc.data(), base + cop[ci_[e]], vals[e], len);
        if (pool) {
          for (int64_t r = r0; r < r1; r += gh) {
            const int64_t ni = r / gh;
            for (int64_t py = 0; py < ho / 2; ++py) {
              const float* rows = acc.data() + (r - r0 + 2 * py) * gw;
              const int64_t at_out = ni * on + oc * ocs + py * oys;
              store_pooled_row(op + at_out, oxs, rows, rows + gw, 1, wo / 2, 1, ip ? ip + at_out : nullptr);
            }
          }
          continue;
        }
        for (int64_t r = r0; r < r1; ++r) {  // keep the valid outputs of each grid row
          const int64_t ni = r / gh, y = r % gh;
          if (y >= ho) continue;
          store_row(op + ni * on + oc * ocs + y * oys, oxs, acc.data() + (r - r0) * gw, 1, wo, 1, relu, nullptr);
        }
      }
    });
    return;
  }
  // Unequal strides (S = 1 layout). Tasks: (output channel, image); an accumulator plane, one output
  // row at a time, strided reads.
  const int64_t stride_h = a.stride_h, stride_w = a.stride_w;
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
      for (int64_t y = 0; y < ho; ++y)
        store_row(op + ni * on + oc * ocs + y * oys, oxs, acc.data() + y * wo, 1, wo, 1, relu, nullptr);
    }
  });
}

}  // namespace sparse_cpu
}  // namespace fastprune
