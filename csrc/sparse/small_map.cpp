// Batch 1 on a small map (at most kSmallMapMaxPositions positions, stride 1, "same" padding), inside
// the tiled algorithm (algo 4, and the generated one, which runs it at batch 1).
//
// A whole channel plane is one to four AVX-512 vectors (16 positions each), and a 3 x 3 tap (r, s)
// is a shift of the flattened plane by d = (r - pad_h) * W + (s - pad_w) positions, zero where the
// tap reads padding. The shift is linear, so an output channel is
//     out = bias + sum over taps t of shift_t( sum over its non-zeros of tap t: w * plane(ic) ):
// each non-zero is one fused multiply-add per vector on the input plane itself (no staging, no
// im2col rows: a 512-channel 4 x 4 input is 32 KiB, in L1), and each tap one permutation
// (vpermt2ps over two neighbouring vectors) and a masked add per vector and output channel. The
// tiled grid path spends two vectors a non-zero on a 4 x 4 map (rows of 6 with their padding), after
// staging the input; the im2col path first writes nine copies of the input.
//
// The non-zeros are grouped by tap, with their values, once per weight (cached like the tiled
// offsets, tiled.cpp).
//
// The same grouping serves batch 1 on rows of 16 or 32 floats (3 x 3, stride 1, padding 1: ResNet's
// 32 x 32 and 16 x 16 layers), the row-shift path (run_rows below): a row tap is an address into a
// thread's staged band of whole rows, a column tap a lane shift of the finished sums. ResNet-18 at
// 95%, batch 1, Zen 4, 2 threads, the same plan interleaved in one process: 1.070 -> 0.975 ms (90%
// 2.29 -> 2.02, 99% 1.336 -> 1.186; bench/NOTES.md, session 21).
#include "sparse_common.h"

#include <c10/util/intrusive_ptr.h>

#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

namespace fastprune {
namespace sparse_cpu {

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxVectors = kSmallMapMaxPositions / kLanes;

// An output channel's non-zeros grouped by tap: for (oc, t), entries [runs[oc * K + t], runs[oc *
// K + t + 1]), each its input channel and value side by side: one 8-byte load a non-zero. (At 90% a
// 512-channel 4 x 4 layer's entries are 1.9 MB, streamed from L3 at every call; with the value read
// through an index into the CSR arrays instead, that layer took 92 us rather than 80: Zen 4, 2 threads.)
struct TapEntry {
  int32_t ic;
  float w;
};

struct TapGroups {
  std::vector<int32_t> row_ptr;  // the CSR row pointers it was built for (checked on every use)
  std::vector<int32_t> runs;
  std::vector<TapEntry> entries;
};

std::shared_ptr<const TapGroups> build_tap_groups(const ConvArgs& a) {
  const int64_t K = a.kh * a.kw, oc_count = a.oc_count, nnz = a.rp[oc_count];
  auto g = std::make_shared<TapGroups>();
  g->row_ptr.assign(a.rp, a.rp + oc_count + 1);
  g->runs.assign(oc_count * K + 1, 0);
  g->entries.resize(nnz);
  for (int64_t oc = 0; oc < oc_count; ++oc) {  // a counting sort of each row by tap
    int32_t* count = g->runs.data() + oc * K + 1;
    for (int64_t e = a.rp[oc]; e < a.rp[oc + 1]; ++e) ++count[a.cols[e] % K];
  }
  for (int64_t i = 1; i <= oc_count * K; ++i) g->runs[i] += g->runs[i - 1];
  std::vector<int32_t> next(g->runs.begin(), g->runs.end() - 1);
  for (int64_t oc = 0; oc < oc_count; ++oc)
    for (int64_t e = a.rp[oc]; e < a.rp[oc + 1]; ++e)
      g->entries[next[oc * K + a.cols[e] % K]++] = TapEntry{a.cols[e] / static_cast<int32_t>(K), a.vals[e]};
  return g;
}

struct TapGroupsEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> cols, vals;
  std::shared_ptr<const TapGroups> groups;
};

// Per (col_idx tensor and version, values tensor and version, kernel size), with weak references to
// both tensors (a new tensor at a freed one's address never matches) and the row pointers compared;
// at most kMaxCachedEntries non-zeros in all (then the cache starts over). Without the tensors (a
// caller that passes raw arrays) the groups are built for the call.
std::shared_ptr<const TapGroups> tap_groups(const ConvArgs& a) {
  const int64_t oc_count = a.oc_count, nnz = a.rp[oc_count];
  if (a.cols_tensor == nullptr || !a.cols_tensor->defined() || a.vals_tensor == nullptr || !a.vals_tensor->defined())
    return build_tap_groups(a);
  auto matches = [&](const TapGroups& g) {
    return static_cast<int64_t>(g.row_ptr.size()) == oc_count + 1 &&
           std::memcmp(g.row_ptr.data(), a.rp, (oc_count + 1) * sizeof(int32_t)) == 0;
  };
  using Key = std::tuple<const c10::TensorImpl*, int64_t, const c10::TensorImpl*, int64_t, int64_t, int64_t>;
  constexpr int64_t kMaxCachedEntries = int64_t{32} << 20;
  static std::mutex mutex;
  static std::map<Key, TapGroupsEntry> cache;
  static int64_t cached = 0;
  const c10::TensorImpl* cols = a.cols_tensor->unsafeGetTensorImpl();
  const c10::TensorImpl* vals = a.vals_tensor->unsafeGetTensorImpl();
  const Key key{cols, static_cast<int64_t>(cols->version_counter().current_version()),
                vals, static_cast<int64_t>(vals->version_counter().current_version()), a.kh, a.kw};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) {
      const auto cols_alive = found->second.cols.lock();
      const auto vals_alive = found->second.vals.lock();
      if (cols_alive.get() == cols && vals_alive.get() == vals && matches(*found->second.groups))
        return found->second.groups;
      cached -= static_cast<int64_t>(found->second.groups->entries.size());
      cache.erase(found);
    }
  }
  auto groups = build_tap_groups(a);
  std::lock_guard<std::mutex> lock(mutex);
  if (cached + nnz > kMaxCachedEntries) cache.clear(), cached = 0;
  if (nnz <= kMaxCachedEntries) {
    cache.insert_or_assign(key, TapGroupsEntry{c10::weak_intrusive_ptr<c10::TensorImpl>(a.cols_tensor->getIntrusivePtr()),
                                               c10::weak_intrusive_ptr<c10::TensorImpl>(a.vals_tensor->getIntrusivePtr()),
                                               groups});
    cached += nnz;
  }
  return groups;
}

// What every output channel of one call shares: per tap, the shift (index vector lane + rem, from
// source vectors v + lo and v + lo + 1) and, per output vector, which lanes the tap reaches.
struct Shifts {
  int64_t K = 0, positions = 0;
  std::vector<int32_t> rem, lo;
  std::vector<uint16_t> reach;  // [t * kMaxVectors + v]
};

Shifts make_shifts(const ConvArgs& a, int64_t h, int64_t w) {
  Shifts sh;
  sh.K = a.kh * a.kw;
  sh.positions = h * w;
  sh.rem.resize(sh.K);
  sh.lo.resize(sh.K);
  sh.reach.assign(sh.K * kMaxVectors, 0);
  for (int64_t r = 0; r < a.kh; ++r)
    for (int64_t s = 0; s < a.kw; ++s) {
      const int64_t t = r * a.kw + s, d = (r - a.pad_h) * w + (s - a.pad_w);
      const int64_t lo = d >= 0 ? d / kLanes : -((-d + kLanes - 1) / kLanes);  // floor(d / 16)
      sh.lo[t] = static_cast<int32_t>(lo);
      sh.rem[t] = static_cast<int32_t>(d - lo * kLanes);
      for (int64_t p = 0; p < sh.positions; ++p) {
        const int64_t iy = p / w + r - a.pad_h, ix = p % w + s - a.pad_w;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w)
          sh.reach[t * kMaxVectors + p / kLanes] |= static_cast<uint16_t>(1u << (p % kLanes));
      }
    }
  return sh;
}

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPRUNE_SMALL_MAP 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace {

// Output channels [oc0, oc1) of a map of V vectors (V * 16 >= positions > (V - 1) * 16).
template <int V>
void run_channels(const float* x, int64_t sc, const ConvArgs& a, const TapGroups& g, const Shifts& sh,
                  int64_t oc0, int64_t oc1, float* op, const float* rsp) {
  // Independent sums a tap keeps (four chains of fused multiply-adds in flight in all).
  constexpr int C = V >= 4 ? 1 : 4 / V;
  const int64_t K = sh.K, P = sh.positions;
  const __mmask16 last = static_cast<__mmask16>(P - (V - 1) * kLanes >= kLanes ? 0xFFFF
                                                : (1u << (P - (V - 1) * kLanes)) - 1);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 zero = _mm512_setzero_ps();
  const TapEntry* entries = g.entries.data();
  for (int64_t oc = oc0; oc < oc1; ++oc) {
    __m512 out[V];
    for (int v = 0; v < V; ++v) out[v] = _mm512_set1_ps(a.bias ? a.bias[oc] : 0.f);
    for (int64_t t = 0; t < K; ++t) {
      const int64_t j0 = g.runs[oc * K + t], j1 = g.runs[oc * K + t + 1];
      if (j0 == j1) continue;
      __m512 s[C][V];
      for (int c = 0; c < C; ++c)
        for (int v = 0; v < V; ++v) s[c][v] = zero;
      int64_t j = j0;
      for (; j + C <= j1; j += C)
        for (int c = 0; c < C; ++c) {
          const TapEntry e = entries[j + c];
          const __m512 wv = _mm512_set1_ps(e.w);
          const float* plane = x + e.ic * sc;
          for (int v = 0; v < V - 1; ++v) s[c][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(plane + v * kLanes), s[c][v]);
          s[c][V - 1] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(last, plane + (V - 1) * kLanes), s[c][V - 1]);
        }
      for (; j < j1; ++j) {
        const TapEntry e = entries[j];
        const __m512 wv = _mm512_set1_ps(e.w);
        const float* plane = x + e.ic * sc;
        for (int v = 0; v < V - 1; ++v) s[0][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(plane + v * kLanes), s[0][v]);
        s[0][V - 1] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(last, plane + (V - 1) * kLanes), s[0][V - 1]);
      }
      for (int c = 1; c < C; ++c)
        for (int v = 0; v < V; ++v) s[0][v] = _mm512_add_ps(s[0][v], s[c][v]);
      // The tap's shift: output lane l of vector v is lane l + rem of the pair (v + lo, v + lo + 1).
      const __m512i idx = _mm512_add_epi32(iota, _mm512_set1_epi32(sh.rem[t]));
      const int lo = sh.lo[t];
      for (int v = 0; v < V; ++v) {
        const __mmask16 reach = sh.reach[t * kMaxVectors + v];
        if (reach == 0) continue;
        const int i0 = v + lo, i1 = v + lo + 1;
        const __m512 first = i0 >= 0 && i0 < V ? s[0][i0] : zero, second = i1 >= 0 && i1 < V ? s[0][i1] : zero;
        out[v] = _mm512_mask_add_ps(out[v], reach, out[v], _mm512_permutex2var_ps(first, idx, second));
      }
    }
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? last : static_cast<__mmask16>(0xFFFF);
      __m512 y = out[v];
      if (rsp != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, rsp + oc * P + v * kLanes));
      // (Masked with every lane: _mm512_max_ps's undefined pass-through trips GCC 12's -Wmaybe-uninitialized.)
      if (a.relu) y = _mm512_mask_max_ps(y, static_cast<__mmask16>(0xFFFF), y, zero);
      _mm512_mask_storeu_ps(op + oc * P + v * kLanes, m, y);
    }
  }
}

// Batch 1, a 3 x 3 "same" conv on rows of VR vectors (16 or 32 floats): output rows [y0, y0 + R) of
// output channels [oc0, oc1), from `staged` (a thread's band: channel ic's row y - r0 + 1 at
// staged + ic * sp + (y - r0 + 1) * W, zero rows past the image's edges). A row tap is an address
// (rows are whole vectors, so every load is aligned); a column tap is a lane shift of the finished
// sums: the non-zeros of column tap s accumulate unshifted into acc[s], and the output takes acc[0]
// shifted right by a lane, acc[1], and acc[2] shifted left, with zeros shifted in (the padding).
// (The tiled grid's loads sit a float apart per column tap: most cross a cache line, two load slots
// each, and its tiles wait on their loads.)
template <int R, int VR>
void run_rows(const float* staged, int64_t sp, int64_t r0, int64_t y0, int64_t rows, const ConvArgs& a,
              const TapGroups& g, int64_t oc0, int64_t oc1, int64_t h, float* op, const float* rsp) {
  constexpr int64_t W = VR * kLanes;
  const TapEntry* entries = g.entries.data();
  const __m512i zero_i = _mm512_setzero_si512();
  for (int64_t oc = oc0; oc < oc1; ++oc) {
    __m512 acc[3][R][VR];
#pragma GCC unroll 3
    for (int s = 0; s < 3; ++s)
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
        for (int j = 0; j < VR; ++j) acc[s][i][j] = _mm512_setzero_ps();
#pragma GCC unroll 3
    for (int s = 0; s < 3; ++s)
      for (int64_t r = 0; r < 3; ++r) {
        const int64_t t = r * 3 + s;
        const float* rows_at = staged + (y0 - r0 + r) * W;
        for (int64_t e = g.runs[oc * 9 + t], e1 = g.runs[oc * 9 + t + 1]; e < e1; ++e) {
          const __m512 wv = _mm512_set1_ps(entries[e].w);
          const float* in = rows_at + entries[e].ic * sp;
#pragma GCC unroll 8
          for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
            for (int j = 0; j < VR; ++j)
              acc[s][i][j] = _mm512_fmadd_ps(wv, _mm512_load_ps(in + i * W + j * kLanes), acc[s][i][j]);
        }
      }
    const __m512 bias = _mm512_set1_ps(a.bias ? a.bias[oc] : 0.f), zero = _mm512_setzero_ps();
    for (int i = 0; i < R && i < rows; ++i) {
      __m512i left[VR], right[VR];  // acc[0] and acc[2] as integers, for the lane shifts
#pragma GCC unroll 2
      for (int j = 0; j < VR; ++j) left[j] = _mm512_castps_si512(acc[0][i][j]), right[j] = _mm512_castps_si512(acc[2][i][j]);
#pragma GCC unroll 2
      for (int j = 0; j < VR; ++j) {
        // lane l: acc[0] at column l - 1 (the vector before's last lane, or zero), acc[2] at l + 1
        // (Masked with every lane: the unmasked form's undefined pass-through trips GCC 12's
        // -Wmaybe-uninitialized.)
        const __m512i from_left = _mm512_mask_alignr_epi32(zero_i, 0xFFFF, left[j], j > 0 ? left[j - 1] : zero_i, 15);
        const __m512i from_right =
            _mm512_mask_alignr_epi32(zero_i, 0xFFFF, j + 1 < VR ? right[j + 1] : zero_i, right[j], 1);
        __m512 y = _mm512_add_ps(_mm512_add_ps(bias, acc[1][i][j]),
                                 _mm512_add_ps(_mm512_castsi512_ps(from_left), _mm512_castsi512_ps(from_right)));
        const int64_t at = (oc * h + y0 + i) * W + j * kLanes;
        if (rsp != nullptr) y = _mm512_add_ps(y, _mm512_loadu_ps(rsp + at));
        if (a.relu) y = _mm512_mask_max_ps(y, static_cast<__mmask16>(0xFFFF), y, zero);
        _mm512_storeu_ps(op + at, y);
      }
    }
  }
}

}  // namespace
#pragma GCC pop_options
#endif

bool small_map_batch1_applicable(const at::Tensor& x, const ConvArgs& a) {
#ifdef FASTPRUNE_SMALL_MAP
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  const char* forced = std::getenv("FASTPRUNE_TILED_ISA");  // a narrower ISA asked for: not this path
  if (!supported || forced != nullptr || x.dim() != 4 || x.size(0) != 1 || a.pool) return false;
  const int64_t h = x.size(2), w = x.size(3);
  return a.stride_h == 1 && a.stride_w == 1 && a.kh == 2 * a.pad_h + 1 && a.kw == 2 * a.pad_w + 1 &&
         h * w >= 1 && h * w <= kSmallMapMaxPositions && (w == 1 || x.stride(3) == 1) &&
         (h == 1 || x.stride(2) == w) && x.size(1) >= 1;
#else
  (void)x;
  (void)a;
  return false;
#endif
}

void conv_small_map_batch1(const at::Tensor& x, const ConvArgs& a, float* op, const float* rsp) {
#ifdef FASTPRUNE_SMALL_MAP
  const int64_t h = x.size(2), w = x.size(3), oc_count = a.oc_count;
  const std::shared_ptr<const TapGroups> groups = tap_groups(a);
  const Shifts sh = make_shifts(a, h, w);
  const int64_t V = (sh.positions + kLanes - 1) / kLanes;
  const float* xp = x.const_data_ptr<float>();
  const int64_t sc = x.size(1) > 1 ? x.stride(1) : 0;
  // Output channels split into ranges of equal cost: a non-zero's multiply-adds, and per channel its
  // taps' shift-adds (counted as K non-zeros).
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), oc_count));
  run_parts(parts, [&](int64_t p) {
    const int64_t oc0 = channel_split(a.rp, oc_count, sh.K, p, parts);
    const int64_t oc1 = channel_split(a.rp, oc_count, sh.K, p + 1, parts);
    if (oc0 >= oc1) return;
    switch (V) {
      case 1: run_channels<1>(xp, sc, a, *groups, sh, oc0, oc1, op, rsp); break;
      case 2: run_channels<2>(xp, sc, a, *groups, sh, oc0, oc1, op, rsp); break;
      case 3: run_channels<3>(xp, sc, a, *groups, sh, oc0, oc1, op, rsp); break;
      default: run_channels<4>(xp, sc, a, *groups, sh, oc0, oc1, op, rsp); break;
    }
  });
#else
  (void)x, (void)a, (void)op, (void)rsp;
  TORCH_CHECK(false, "sparse_conv2d: internal error, the small-map path is not built here");
#endif
}

bool row_shift_batch1_applicable(const at::Tensor& x, const ConvArgs& a) {
#ifdef FASTPRUNE_SMALL_MAP
  static const bool supported = __builtin_cpu_supports("avx512f");
  const char* forced = std::getenv("FASTPRUNE_TILED_ISA");  // a narrower ISA asked for: not this path
  if (!supported || forced != nullptr || x.dim() != 4 || x.size(0) != 1 || a.pool || x.size(1) < 1) return false;
  const int64_t h = x.size(2), w = x.size(3);
  return a.stride_h == 1 && a.stride_w == 1 && a.kh == 3 && a.kw == 3 && a.pad_h == 1 && a.pad_w == 1 &&
         (w == 16 || w == 32) && h >= 1 && x.stride(3) == 1 && x.stride(2) == w;
#else
  (void)x;
  (void)a;
  return false;
#endif
}

void conv_row_shift_batch1(const at::Tensor& x, const ConvArgs& a, float* op, const float* rsp) {
#ifdef FASTPRUNE_SMALL_MAP
  const int64_t c = x.size(1), h = x.size(2), w = x.size(3), oc_count = a.oc_count;
  const std::shared_ptr<const TapGroups> groups = tap_groups(a);
  const float* xp = x.const_data_ptr<float>();
  const int64_t sc = x.stride(1);
  // Tiles of R rows: 24 accumulators (three column taps of R rows of w / 16 vectors).
  const int64_t R = w == 16 ? 8 : 4;
  // Bands of rows, one a thread, each computing every output channel of its band (as the tiled
  // algorithm's batch 1): a layer reads, but for a halo row each side, the rows its thread wrote.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (h + R - 1) / R));
  const int64_t band_max = (h + parts - 1) / parts;
  // A channel's staged rows: its band's, a halo row each side (zeros past the image), and R - 1 more
  // that a last partial tile reads for rows it does not store.
  const int64_t sp = (band_max + 2 + R) * w;
  run_parts(parts, [&](int64_t p) {
    const int64_t r0 = h * p / parts, r1 = h * (p + 1) / parts;
    if (r0 >= r1) return;
    at::Tensor fallback;
    float* staged = staging_memory(c * sp, fallback, x.options());
    const int64_t y_lo = std::max<int64_t>(r0 - 1, 0), y_hi = std::min(r1 + 1, h);  // image rows read
    for (int64_t ic = 0; ic < c; ++ic) {
      float* dst = staged + ic * sp;  // staged row k holds image row r0 - 1 + k
      const int64_t before = y_lo - (r0 - 1), copied = y_hi - y_lo;
      std::fill_n(dst, before * w, 0.f);
      std::memcpy(dst + before * w, xp + ic * sc + y_lo * w, copied * w * sizeof(float));
      std::fill_n(dst + (before + copied) * w, sp - (before + copied) * w, 0.f);
    }
    for (int64_t y0 = r0; y0 < r1; y0 += R) {
      const int64_t rows = std::min(R, r1 - y0);
      if (w == 16)
        run_rows<8, 1>(staged, sp, r0, y0, rows, a, *groups, 0, oc_count, h, op, rsp);
      else
        run_rows<4, 2>(staged, sp, r0, y0, rows, a, *groups, 0, oc_count, h, op, rsp);
    }
  });
#else
  (void)x, (void)a, (void)op, (void)rsp;
  TORCH_CHECK(false, "sparse_conv2d: internal error, the row-shift path is not built here");
#endif
}

}  // namespace sparse_cpu
}  // namespace fastprune
