// The tiled algorithm (algo 4): output-stationary, register-blocked. The other algorithms add one
// non-zero at a time into an accumulator row in L1 (a load and a store of the accumulator for every
// few multiply-adds); here a tile of the output (a few rows of a few positions of a batch block, up
// to 24 AVX-512 registers) stays in registers while all of an output channel's non-zeros stream
// past it, each non-zero one broadcast and one fused multiply-add per register with its input as
// the memory operand (tiled_kernel.h). The pattern is specialised per call: each non-zero's input
// offset in the staged input is computed once, so the inner loop has no index arithmetic and no
// bounds checks.
//
// Staging: the input is copied, per batch block of nb images, zero-padded and split into S x S
// phases for stride S (as the padded algorithm does), batch innermost: staged[phase * C + ic][i][j][0:nb].
// A stride-S convolution is then a stride-1 one over the phases, and the nb images of a position
// are contiguous, so a run of T output positions reads T * nb contiguous floats. Tiles are chosen
// per call by a cost model of the micro-kernel (below); work runs tile-major, all output channels of
// a tile while its input window is in cache, one contiguous range of equal modelled cost per thread.
// The output is laid out (OC, H', W', N) like the batch-innermost algorithm's (for N = 1 that is
// NCHW), with its ReLU / pooling / residual epilogues.
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>

#include <c10/util/intrusive_ptr.h>

#include "epilogue.h"
#include "sparse_common.h"

namespace fastprune {
namespace sparse_cpu {

// Where a tile's finished sums go when the output can take them straight from the registers: vector j
// of run r to dst + r * run_stride + (j / per_position) * step + (j % per_position) * lanes, with
// the fused epilogue (the ReLU; or the ReLU of the sum with the residual, read at dst's offsets).
// With `pool`, ReLU then 2x2 max pooling instead (tiled_kernel.h's store_pooled_tile): dst is then the
// pooled output, run_stride its row stride, and runs pair up.
struct TileOutput {
  float* dst;
  int64_t run_stride, step, per_position;
  const float* residual;
  bool relu;
  bool pool = false;
};

// How many non-zeros ahead the micro-kernel prefetches the input rows of (tiled_kernel.h).
constexpr int kPrefetchAhead = 4;

// How many independent sets of accumulators (chains) a tile of `vectors` registers splits an output
// channel's non-zeros over: a fused multiply-add waits 4 cycles for its accumulator's previous one,
// so a tile of fewer than 8 vectors (two FMAs a cycle) would wait on that latency; K chains, each
// taking every K-th non-zero and summed at the end, hide it (at most 4, within max_acc registers).
constexpr int tile_chains(int vectors, int max_acc) {
  int k = vectors >= 8 ? 1 : (8 + vectors - 1) / vectors;
  if (k > 4) k = 4;
  while (k > 1 && k * vectors > max_acc) --k;
  return k;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPRUNE_X86_ISAS 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace isa_avx512 {
#define FASTPRUNE_LANES 16
#define FASTPRUNE_MAX_ACC 24
#include "tiled_kernel.h"
#undef FASTPRUNE_LANES
#undef FASTPRUNE_MAX_ACC
}  // namespace isa_avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define FASTPRUNE_LANES 8
#define FASTPRUNE_MAX_ACC 12
#include "tiled_kernel.h"
#undef FASTPRUNE_LANES
#undef FASTPRUNE_MAX_ACC
}  // namespace isa_avx2
#pragma GCC pop_options
#endif
namespace isa_base {  // SSE2 on x86-64; whatever 128-bit vectors the compiler has elsewhere
#define FASTPRUNE_LANES 4
#define FASTPRUNE_MAX_ACC 12
#include "tiled_kernel.h"
#undef FASTPRUNE_LANES
#undef FASTPRUNE_MAX_ACC
}  // namespace isa_base

namespace {

using TileFn = isa_base::TileFn;

struct Isa {
  int64_t lanes, max_acc;
  TileFn (*kernel_for)(int, int);
};

// The widest instruction set this CPU runs. FASTPRUNE_TILED_ISA=avx2|base picks a narrower one (the
// tests run every variant on one machine).
Isa pick_isa() {
  const char* forced = std::getenv("FASTPRUNE_TILED_ISA");
  const bool want_base = forced != nullptr && std::strcmp(forced, "base") == 0;
  const bool want_avx2 = forced != nullptr && std::strcmp(forced, "avx2") == 0;
#ifdef FASTPRUNE_X86_ISAS
  if (!want_base && !want_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return {16, 24, &isa_avx512::kernel_for};
  if (!want_base && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {8, 12, &isa_avx2::kernel_for};
#else
  (void)want_base;
  (void)want_avx2;
#endif
  return {4, 12, &isa_base::kernel_for};
}

// A tile: `rows` output rows of `cols` positions each (one run of cols * nb floats per row), or, when
// `merged`, whole rows of the phase grid (gw positions, the columns past the output computed and
// dropped) as one run: better where a row holds less than a vector or two (batch 1, small maps).
struct TileShape {
  int64_t rows, cols;
  bool merged;
};

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The micro-kernel's cost per non-zero, in cycles, over the whole output for a tile shape: a tile of
// V vectors costs the most of V / 2 (two FMAs a cycle), 4 / K (the FMA latency, spread over the
// kernel's K chains of accumulators) and (V + 2) / 2 (two loads a cycle: V input vectors, the
// weight's offset and value), plus 1 for the loop; edge tiles counted as they are. The cheapest
// shape wins. (A 2 x 2 map at batch 1: one vector of both rows, 2.5, rather than a vector a row, 3.)
double cycles_per_nonzero(int64_t vectors, int64_t max_acc) {
  const double fma = 0.5 * vectors;
  const double latency = 4.0 / tile_chains(static_cast<int>(vectors), static_cast<int>(max_acc));
  const double loads = 0.5 * (vectors + 2);  // the input vectors, the offset and the weight: two loads a cycle
  return std::max({fma, latency, loads}) + 1.0;
}

// The vectors of a tile of k rows of c positions (or k whole merged rows).
int64_t tile_vectors(const TileShape& t, int64_t k, int64_t c, int64_t gw, int64_t nb, int64_t lanes) {
  return t.merged ? cdiv(k * gw * nb, lanes) : k * cdiv(c * nb, lanes);
}

double tile_cost(const TileShape& t, int64_t rows_out, int64_t cols_out, int64_t gw, int64_t nb, int64_t lanes,
                 int64_t max_acc) {
  auto one = [&](int64_t k, int64_t c) { return cycles_per_nonzero(tile_vectors(t, k, c, gw, nb, lanes), max_acc); };
  const int64_t full_r = rows_out / t.rows, edge_r = rows_out % t.rows;
  const int64_t full_c = t.merged ? 1 : cols_out / t.cols, edge_c = t.merged ? 0 : cols_out % t.cols;
  const int64_t cw = t.merged ? cols_out : t.cols;
  double cost = full_r * (full_c * one(t.rows, cw) + (edge_c ? one(t.rows, edge_c) : 0.0));
  if (edge_r) cost += full_c * one(edge_r, cw) + (edge_c ? one(edge_r, edge_c) : 0.0);
  return cost;
}

TileShape search_tile(int64_t rows_out, int64_t cols_out, int64_t gw, int64_t nb, const Isa& isa, bool pool) {
  const int64_t step = pool ? 2 : 1;  // pooling needs whole row pairs and column pairs in a tile
  TileShape best{step, step, false};
  double best_cost = -1;
  auto consider = [&](const TileShape& t) {
    const double c = tile_cost(t, rows_out, cols_out, gw, nb, isa.lanes, isa.max_acc);
    if (best_cost < 0 || c < best_cost) best = t, best_cost = c;
  };
  for (int64_t cols = step; cols <= cols_out; cols += step) {
    const int64_t vr = cdiv(cols * nb, isa.lanes);
    if (vr * step > isa.max_acc) break;
    for (int64_t rows = step; rows * vr <= isa.max_acc && rows <= std::max(rows_out, step); rows += step)
      consider({rows, cols, false});
  }
  for (int64_t rows = step; rows <= std::max(rows_out, step) && cdiv(rows * gw * nb, isa.lanes) <= isa.max_acc;
       rows += step)
    consider({rows, gw, true});
  return best;
}

// search_tile, remembered per thread: the search weighs hundreds of shapes (at batch 1, where a layer
// takes tens of microseconds, 4% of ResNet-18's time at 95%, Zen 4), and a network asks again for
// the same few geometries at every call.
TileShape choose_tile(int64_t rows_out, int64_t cols_out, int64_t gw, int64_t nb, const Isa& isa, bool pool) {
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool>;
  thread_local std::map<Key, TileShape> known;
  const Key key{rows_out, cols_out, gw, nb, isa.lanes, isa.max_acc, pool};
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  if (known.size() >= 256) known.clear();  // (geometries of many networks: start over)
  return known.emplace(key, search_tile(rows_out, cols_out, gw, nb, isa, pool)).first->second;
}

// The batch block nb: the largest of 16, 32 and 64 images whose tiles' input window over all the
// staged channels stays within kWindowBytes (L2: a tile's output channels reread it), wasting at most
// an eighth of the work on a partial last block, and whose 2 x 2 tile (pooling's smallest) fits in the
// accumulator registers; at most 16 images otherwise. Measured (bench/NOTES.md, session 10): 64 on
// ResNet-18's 64-channel 32 x 32 layers, 32 on its 128-channel 16 x 16 ones, 16 on the rest (the
// session-8 measurement, before the larger blocks staged a position's images in one run, had 16
// everywhere). FASTPRUNE_TILED_BATCH_BLOCK=k forces min(k, N) (the tests run every block size).
constexpr int64_t kWindowBytes = 512 * 1024;

int64_t batch_block(int64_t n, const Isa& isa, int64_t S, int64_t c, int64_t kh, int64_t kw, int64_t rows_out,
                    int64_t cols_out, int64_t gw, bool pool) {
  const int64_t most = isa.max_acc * isa.lanes / 4, smallest = std::max<int64_t>(1, std::min({n, int64_t{16}, most}));
  if (n <= smallest) return smallest;
  if (const char* forced = std::getenv("FASTPRUNE_TILED_BATCH_BLOCK"); forced != nullptr && std::atoi(forced) > 0)
    return std::min<int64_t>({n, most, std::atoi(forced)});
  for (int64_t nb = 64; nb > smallest; nb /= 2) {
    if (nb > std::min(n, most) || cdiv(n, nb) * nb * 8 > n * 9 || nb % isa.lanes != 0) continue;
    const TileShape t = choose_tile(rows_out, cols_out, gw, nb, isa, pool);
    const int64_t phases = std::min(S, kh) * std::min(S, kw);
    const int64_t window = phases * c * (t.rows + (kh - 1) / S) * ((t.merged ? gw : t.cols) + (kw - 1) / S) * nb * 4;
    if (window <= kWindowBytes) return nb;
  }
  return smallest;
}

// The tiled algorithm's work split into contiguous ranges of items (batch block, tile, output channel),
// item g = (block * tiles + tile) * oc_count + oc, one range per thread: part p is
// [start[p], start[p + 1]).
struct WorkSplit {
  std::vector<int64_t> start;
  int64_t parts() const { return static_cast<int64_t>(start.size()) - 1; }
};

// Ranges of equal estimated cost: an item costs its output channel's non-zeros times its tile's
// cycles per non-zero (the micro-kernel's model above) plus a store per tile vector and a fixed call
// cost. The prefix sums of the non-zeros are the CSR row pointers, so a range's end is found by a
// walk over the (block, tile) segments and a binary search over the output channels of one: no work
// per item (at batch 1 a layer is tens of microseconds).
WorkSplit split_work(const TileShape& t, int64_t rows_out, int64_t cols_out, int64_t gw, int64_t nb, const Isa& isa,
                     int64_t blocks, const int32_t* rp, int64_t oc_count, int64_t parts) {
  const int64_t row_tiles = cdiv(rows_out, t.rows), col_tiles = t.merged ? 1 : cdiv(cols_out, t.cols);
  const int64_t tiles = row_tiles * col_tiles;
  std::vector<double> per_nz(tiles), per_oc(tiles);  // a tile's cost per non-zero and per output channel
  double segment_cost = 0;  // one batch block's tiles over all output channels
  const double nnz = static_cast<double>(rp[oc_count] - rp[0]);
  for (int64_t tl = 0; tl < tiles; ++tl) {
    const int64_t y0 = (tl / col_tiles) * t.rows, x0 = t.merged ? 0 : (tl % col_tiles) * t.cols;
    const int64_t v = tile_vectors(t, std::min(t.rows, rows_out - y0), t.merged ? cols_out : std::min(t.cols, cols_out - x0),
                                   gw, nb, isa.lanes);
    per_nz[tl] = cycles_per_nonzero(v, isa.max_acc);
    per_oc[tl] = static_cast<double>(v) + 16.0;
    segment_cost += per_nz[tl] * nnz + per_oc[tl] * static_cast<double>(oc_count);
  }
  const int64_t items = blocks * tiles * oc_count;
  parts = std::max<int64_t>(1, std::min(parts, items));
  WorkSplit split;
  split.start.assign(parts + 1, items);
  split.start[0] = 0;
  const double total = segment_cost * static_cast<double>(blocks);
  const int64_t segments = blocks * tiles;
  int64_t segment = 0;
  double before = 0;  // the cost of the segments before `segment`
  for (int64_t p = 1; p < parts; ++p) {
    const double target = total * static_cast<double>(p) / static_cast<double>(parts);
    for (;;) {
      const int64_t tl = segment % tiles;
      const double cost = per_nz[tl] * nnz + per_oc[tl] * static_cast<double>(oc_count);
      if (segment + 1 >= segments || before + cost > target) break;
      before += cost, ++segment;
    }
    const int64_t tl = segment % tiles;
    int64_t lo = 0, hi = oc_count;  // the first output channel at which the cost reaches the target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      const double cost = per_nz[tl] * static_cast<double>(rp[mid] - rp[0]) + per_oc[tl] * static_cast<double>(mid);
      if (before + cost < target) lo = mid + 1; else hi = mid;
    }
    split.start[p] = std::max(split.start[p - 1], segment * oc_count + lo);
  }
  return split;
}

// Below this much work (floats staged), a loop runs on the calling thread: an OpenMP region costs
// several microseconds, as much as a batch-1 layer's staging.
constexpr int64_t kMinTaskFloats = 32 * 1024;

// The sums a task keeps for the epilogue where the kernel cannot store the output itself (pooling,
// whole-row runs, a partial batch block): its chunk of output channels keeps them within L2.
constexpr int64_t kSumsFloats = 16 * 1024;

}  // namespace

// The input in batch blocks of nb images, each zero-padded and split into stride phases, batch
// innermost: block b at staged + b * block_len holds
// [(phase * C + ic) * plane + (i * gw + j) * nb + k] = x[b nb + k][ic][S i + a - pad_h][S j + b - pad_w]
// (phase = a * S + b), zero outside the image and for the padding images of a partial last block.
// Phases no tap reads (a >= kh or b >= kw: a 1x1 kernel with stride 2 reads one of four) are skipped.
// One input channel a task, read once in memory order: each position's N values, when the batch is
// innermost, go to all blocks at once (reading the blocks one at a time costs several times more);
// otherwise image by image, row by row (a gather across images touches a page per value).
// One image (batch 1), rows [i0, i1) of every phase grid, every channel: the layout stage_blocks writes
// with batch blocks of 1 (phase (pa, pb) of channel ci at ((pa * S + pb) * c + ci) * plane, plane = gh *
// gw), phases no tap reads left alone; rows from i_read_end on are zeros, as outside the image. Rows
// and columns are walked with the stride, no division per element (the per-element path of
// stage_blocks took 45% of a 1x1 stride-2 layer at batch 1).
static void stage_image_rows(const at::Tensor& x, int64_t S, int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                             int64_t gh, int64_t gw, int64_t i0, int64_t i1, int64_t i_read_end,
                             float* __restrict__ staged) {
  const int64_t c = x.size(1), h = x.size(2), w = x.size(3), plane = gh * gw;
  const float* src = x.const_data_ptr<float>();
  const int64_t sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  for (int64_t pa = 0; pa < std::min(S, kh); ++pa)
    for (int64_t pb = 0; pb < std::min(S, kw); ++pb) {
      // Grid columns j with 0 <= j * S + pb - pad_w < w.
      const int64_t j_lo = std::min(gw, cdiv(std::max<int64_t>(pad_w - pb, 0), S));
      const int64_t j_hi = std::max(j_lo, std::min(gw, cdiv(std::max<int64_t>(w + pad_w - pb, 0), S)));
      const int64_t x_lo = j_lo * S + pb - pad_w;
      for (int64_t ci = 0; ci < c; ++ci) {
        float* p = staged + ((pa * S + pb) * c + ci) * plane;
        for (int64_t i = i0; i < i1; ++i) {
          float* row = p + i * gw;
          const int64_t y = i * S + pa - pad_h;
          if (y < 0 || y >= h || i >= i_read_end) {
            std::fill_n(row, gw, 0.f);
            continue;
          }
          const float* in = src + ci * sc + y * sh + x_lo * sw;
          std::fill_n(row, j_lo, 0.f);
          if (S == 1 && sw == 1) {
            std::copy_n(in, j_hi - j_lo, row + j_lo);
          } else {
            for (int64_t j = j_lo; j < j_hi; ++j) row[j] = in[(j - j_lo) * S * sw];
          }
          std::fill_n(row + j_hi, gw - j_hi, 0.f);
        }
      }
    }
}

void stage_blocks(const at::Tensor& x, int64_t nb, int64_t S, int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                  int64_t gh, int64_t gw, int64_t block_len, float* staged) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), plane = gh * gw * nb;
  const int64_t blocks = (n + nb - 1) / nb;
  const float* src = x.const_data_ptr<float>();
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  // Channels per task: at least kMinTaskFloats of staged data, so a small staging runs inline.
  const int64_t grain = std::max<int64_t>(1, kMinTaskFloats / (S * S * plane * blocks));
  at::parallel_for(0, c, grain, [=](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      for (int64_t bb = 0; bb < blocks; ++bb) {
        float* block = staged + bb * block_len;
        if (S == 1 && (bb + 1) * nb <= n) {  // only the border: the copy below writes the interior
          float* p = block + ci * plane;
          std::fill_n(p, pad_h * gw * nb, 0.f);
          std::fill_n(p + (pad_h + h) * gw * nb, (gh - pad_h - h) * gw * nb, 0.f);
          for (int64_t y = 0; y < h; ++y) {
            float* row = p + (y + pad_h) * gw * nb;
            std::fill_n(row, pad_w * nb, 0.f);
            std::fill_n(row + (pad_w + w) * nb, (gw - pad_w - w) * nb, 0.f);
          }
        } else {
          for (int64_t ph = 0; ph < S * S; ++ph)
            if (ph / S < kh && ph % S < kw) std::fill_n(block + (ph * c + ci) * plane, plane, 0.f);
        }
      }
      if (sn != 1) {  // NCHW or channels_last: image by image, rows in order
        for (int64_t k = 0; k < n; ++k) {
          float* block = staged + (k / nb) * block_len + ci * plane + k % nb;
          for (int64_t y = 0; y < h; ++y) {
            const int64_t yp = y + pad_h, pa = yp % S, i = yp / S;
            const float* row = src + k * sn + ci * sc + y * sh;
            if (pa >= kh) continue;  // a phase no tap reads (a 1x1 kernel's, stride 2)
            for (int64_t xx = 0; xx < w; ++xx) {
              const int64_t xp = xx + pad_w, pb = xp % S;
              if (pb < kw) block[(pa * S + pb) * c * plane + (i * gw + xp / S) * nb] = row[xx * sw];
            }
          }
        }
        continue;
      }
      // The batch innermost (the previous layer's output). The phase and the phase grid's position of
      // each row and column are counted along, not divided out (two divisions a position cost as much
      // as the copy). One block of a contiguous row: the row is one run in the staged plane too.
      const bool whole_rows = S == 1 && blocks == 1 && sw == n;
      int64_t pa = pad_h % S, i = pad_h / S;
      for (int64_t y = 0; y < h; ++y) {
        if (whole_rows) {
          std::memcpy(staged + ci * plane + (i * gw + pad_w) * nb, src + ci * sc + y * sh, w * n * sizeof(float));
        } else if (pa < kh) {  // else a phase no tap reads
          int64_t pb = pad_w % S, j = pad_w / S;
          for (int64_t xx = 0; xx < w; ++xx) {
            if (pb < kw) {
              float* d = staged + ((pa * S + pb) * c + ci) * plane + (i * gw + j) * nb;
              const float* s = src + ci * sc + y * sh + xx * sw;
              for (int64_t bb = 0; bb < blocks; ++bb, d += block_len, s += nb) {
                const int64_t nbv = std::min(nb, n - bb * nb);
#pragma omp simd
                for (int64_t k = 0; k < nbv; ++k) d[k] = s[k];  // a vector copy, inlined
              }
            }
            if (++pb == S) pb = 0, ++j;
          }
        }
        if (++pa == S) pa = 0, ++i;
      }
    }
  });
}

// The staged input's memory, kept per calling thread between calls: a fresh buffer of this size
// costs a page fault every 4 KiB on each call (as long as the copy itself on a 32 x 32 map at batch
// 64). Grown as needed, never beyond kWorkspaceMaxFloats (larger stagings get a buffer of their own).
constexpr int64_t kWorkspaceMaxFloats = int64_t{64} << 20;  // 256 MiB

struct Workspace {
  float* data = nullptr;
  int64_t floats = 0;
  ~Workspace() { std::free(data); }
};

float* staging_memory(int64_t floats, at::Tensor& fallback, const at::TensorOptions& options) {
  thread_local Workspace ws;
  if (floats > kWorkspaceMaxFloats) {
    fallback = at::empty({floats}, options);
    return fallback.mutable_data_ptr<float>();
  }
  if (ws.floats < floats) {
    std::free(ws.data);
    const int64_t bytes = (floats * static_cast<int64_t>(sizeof(float)) + 63) / 64 * 64;
    ws.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(ws.data != nullptr, "sparse_conv2d: out of memory for the tiled algorithm's staging");
    ws.floats = floats;
  }
  return ws.data;
}

namespace {

// The pattern, specialised for a geometry: each non-zero's offset in a staged block (phase
// (r % S, s % S) of channel ic, shifted by (r / S, s / S)), from a table per weight column (C kh kw
// entries, fewer than the non-zeros) so that no per-non-zero work divides.
// kPrefetchAhead zero entries follow the last one: the micro-kernel reads the offset of the non-zero
// that many ahead to prefetch its input (tiled_kernel.h).
std::vector<int32_t> compute_offsets(const ConvArgs& a, int64_t c, int64_t S, int64_t gw, int64_t nb, int64_t plane,
                                     int64_t nnz) {
  const int64_t kh = a.kh, kw = a.kw, ksize = kh * kw;
  std::vector<int32_t> column_offset(c * ksize), offs(nnz + kPrefetchAhead, 0);
  std::vector<int64_t> tap_offset(ksize);  // column (ic, r, s) is at ic * plane + tap_offset[r * kw + s]
  for (int64_t r = 0; r < kh; ++r)
    for (int64_t s = 0; s < kw; ++s)
      tap_offset[r * kw + s] = ((r % S) * S + s % S) * c * plane + ((r / S) * gw + s / S) * nb;
  for (int64_t ic = 0; ic < c; ++ic)  // no division per entry
    for (int64_t t = 0; t < ksize; ++t) column_offset[ic * ksize + t] = static_cast<int32_t>(ic * plane + tap_offset[t]);
  at::parallel_for(0, nnz, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) offs[e] = column_offset[a.cols[e]];
  });
  return offs;
}

// The offsets of the weights seen, per (col_idx tensor, its version, geometry): at batch 1 building
// them is a tenth of a large layer's time, and a model runs the same weights on the same shapes
// call after call. An entry holds a weak reference to its col_idx tensor, so a new tensor at a freed
// one's address never matches; at most kOffsetsCacheInts entries in all (then the cache starts over).
constexpr int64_t kOffsetsCacheInts = int64_t{64} << 20;  // 256 MiB

struct OffsetsEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> cols;
  std::shared_ptr<const std::vector<int32_t>> offs;
};

std::shared_ptr<const std::vector<int32_t>> pattern_offsets(const ConvArgs& a, int64_t c, int64_t S, int64_t gw,
                                                            int64_t nb, int64_t plane, int64_t nnz) {
  // Offsets are int32: a staged block past that is refused rather than wrapped.
  TORCH_CHECK(S * S * c * plane < INT32_MAX, "sparse_conv2d: the tiled algorithm's staged block is too large");
  if (a.cols_tensor == nullptr || !a.cols_tensor->defined()) {
    return std::make_shared<const std::vector<int32_t>>(compute_offsets(a, c, S, gw, nb, plane, nnz));
  }
  using Key = std::tuple<const c10::TensorImpl*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                         int64_t>;
  static std::mutex mutex;
  static std::map<Key, OffsetsEntry> cache;
  static int64_t cached_ints = 0;
  const c10::TensorImpl* impl = a.cols_tensor->unsafeGetTensorImpl();
  const Key key{impl, static_cast<int64_t>(impl->version_counter().current_version()), c, S, gw, nb, plane, a.kh,
                a.kw};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) {
      const auto alive = found->second.cols.lock();
      if (alive.get() == impl && found->second.offs->size() == static_cast<size_t>(nnz + kPrefetchAhead))
        return found->second.offs;
      cached_ints -= static_cast<int64_t>(found->second.offs->size());
      cache.erase(found);
    }
  }
  auto offs = std::make_shared<const std::vector<int32_t>>(compute_offsets(a, c, S, gw, nb, plane, nnz));
  std::lock_guard<std::mutex> lock(mutex);
  if (cached_ints + nnz > kOffsetsCacheInts) cache.clear(), cached_ints = 0;
  if (nnz <= kOffsetsCacheInts) {
    cache.insert_or_assign(key, OffsetsEntry{c10::weak_intrusive_ptr<c10::TensorImpl>(a.cols_tensor->getIntrusivePtr()), offs});
    cached_ints += nnz;
  }
  return offs;
}

}  // namespace

// Where a batch-1 layer runs on im2col rows (below): at most 4 AVX-512 vectors of output positions (an
// 8 x 8 map) and rows of at most 384 KiB, which each thread builds and keeps in its L2 (1 MiB on Zen 4
// and 5). Measured on Zen 4, 2 threads, ResNet-18 at 90%: 512 -> 512 4 x 4 198 -> 145 us, 256 -> 512
// stride 2 134 -> 74, 128 -> 256 stride 2 to 8 x 8 (295 KiB of rows) 94 -> 85; 256 -> 256 8 x 8 (590
// KiB) 121 -> 136, so it stays on the grid.
constexpr int64_t kIm2colMaxPositions = 64;
constexpr int64_t kIm2colMaxFloats = 96 * 1024;

// Batch 1 splits the map into bands of rows, one a thread, where each band has at least this many rows
// (pooling: row pairs); fewer, the threads split a tile's output channels instead. Zen 4, 2 threads,
// ResNet-18 at 90%: 64 -> 64 32 x 32 98.9 -> 95.3 us in bands, 64 -> 128 stride 2 to 16 x 16 88.5 ->
// 76.7, 256 -> 256 8 x 8 122.5 -> 167.2 (two bands of 4 rows: 3 vectors a non-zero where one tile of
// 8 rows and half the channels takes 5 for twice the outputs).
constexpr int64_t kMinBandRows = 8;

// One image's im2col rows: row col = (ic * kh + r) * kw + s holds the input under tap (r, s) of
// channel ic for each output position in order (zero where the tap reads padding), so that the CSR
// column index of a weight names its row. positions = ho * wo floats a row.
// Loops, not memset / memcpy calls: the runs are a few floats (a 4 x 4 map's rows), shorter than a call.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-distribute-patterns")))
#endif
static void stage_im2col(const at::Tensor& x, int64_t kh, int64_t kw, int64_t S, int64_t pad_h, int64_t pad_w,
                         int64_t ho, int64_t wo, float* __restrict__ rows) {
  const int64_t c = x.size(1), h = x.size(2), w = x.size(3), positions = ho * wo;
  const float* src = x.const_data_ptr<float>();
  const int64_t sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  for (int64_t s = 0; s < kw; ++s) {
    // The output columns whose tap s reads inside the image: s - pad_w + ox * S in [0, w).
    const int64_t ox_lo = std::min(wo, cdiv(std::max<int64_t>(pad_w - s, 0), S));
    const int64_t ox_hi = std::max(ox_lo, std::min(wo, cdiv(std::max<int64_t>(w + pad_w - s, 0), S)));
    const int64_t x_lo = ox_lo * S + s - pad_w;
    for (int64_t ic = 0; ic < c; ++ic)
      for (int64_t r = 0; r < kh; ++r) {
        float* row = rows + ((ic * kh + r) * kw + s) * positions;
        for (int64_t oy = 0; oy < ho; ++oy) {
          const int64_t y = oy * S + r - pad_h;
          float* out = row + oy * wo;
          if (y < 0 || y >= h) {
            for (int64_t ox = 0; ox < wo; ++ox) out[ox] = 0.f;
            continue;
          }
          const float* in = src + ic * sc + y * sh + x_lo * sw;
          for (int64_t ox = 0; ox < ox_lo; ++ox) out[ox] = 0.f;
          if (S == 1 && sw == 1) {
            for (int64_t ox = ox_lo; ox < ox_hi; ++ox) out[ox] = in[ox - ox_lo];
          } else {
            for (int64_t ox = ox_lo; ox < ox_hi; ++ox) out[ox] = in[(ox - ox_lo) * S * sw];
          }
          for (int64_t ox = ox_hi; ox < wo; ++ox) out[ox] = 0.f;
        }
      }
  }
}

// Batch 1 on a small map that the small-map path (small_map.cpp) does not take (stride 2, other
// padding, AVX2; positions a whole number of vectors, at most kIm2colMaxPositions; no
// pooling): each thread builds the image's im2col rows in its own memory and runs a range of output
// channels of equal non-zero count, each non-zero one fused multiply-add per vector on an aligned row.
// On the padded grid (the tile path) a 4 x 4 map's tile is 4 rows of 6: two vectors a non-zero for 16
// outputs, over two or three cache lines; here one vector on one line.
static void conv_im2col_batch1(const at::Tensor& x, const ConvArgs& a, const Isa& isa, int64_t ho, int64_t wo,
                               float* op, const float* rsp) {
  const int64_t c = x.size(1), positions = ho * wo, vr = positions / isa.lanes, oc_count = a.oc_count;
  const int64_t rows_floats = c * a.kh * a.kw * positions;
  const TileFn kernel = isa.kernel_for(1, static_cast<int>(vr));
  TORCH_CHECK(kernel != nullptr, "sparse_conv2d: internal error, no micro-kernel for im2col rows");
  // Offsets col * positions: the tiled layout's formula with one phase, kw columns a grid row and
  // `positions` floats a position (cached with the pattern like the tiled offsets).
  const int64_t nnz = a.rp[oc_count];
  const std::shared_ptr<const std::vector<int32_t>> offs =
      pattern_offsets(a, c, 1, a.kw, positions, a.kh * a.kw * positions, nnz);
  const int32_t* offp = offs->data();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), oc_count));
  auto run_part = [&](int64_t p) {
    // Output channels [oc0, oc1): the part's share of the non-zeros plus one output channel's worth
    // of stores each.
    const int64_t oc0 = channel_split(a.rp, oc_count, vr, p, parts), oc1 = channel_split(a.rp, oc_count, vr, p + 1, parts);
    if (oc0 >= oc1) return;
    at::Tensor fallback;
    float* rows = staging_memory(rows_floats, fallback, x.options());
    stage_im2col(x, a.kh, a.kw, a.stride_h, a.pad_h, a.pad_w, ho, wo, rows);
    alignas(64) float unused_sums[4 * 16];
    for (int64_t oc = oc0; oc < oc1; ++oc) {
      const TileOutput to_out{op + oc * positions, 0, isa.lanes, 1, rsp ? rsp + oc * positions : nullptr, a.relu};
      kernel(rows, 0, offp, a.vals, a.rp[oc], a.rp[oc + 1], a.bias ? a.bias[oc] : 0.f, unused_sums, 0, &to_out);
    }
  };
  run_parts(parts, run_part);
}

at::Tensor conv_tiled(const at::Tensor& x, const ConvArgs& a, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(a.stride_h == a.stride_w, "sparse_conv2d: the tiled algorithm needs equal strides");
  const int64_t S = a.stride_h, kh = a.kh, kw = a.kw, oc_count = a.oc_count;
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t hp = h + 2 * a.pad_h, wp = w + 2 * a.pad_w;
  const int64_t ho = (hp - kh) / S + 1, wo = (wp - kw) / S + 1;
  const bool pool = a.pool, relu = a.relu;
  const int64_t oh = pool ? ho / 2 : ho, ow = pool ? wo / 2 : wo;
  at::Tensor out = pooled_empty({oc_count, oh, ow, n}, x.options());
  const at::Tensor res = residual_batch_innermost(residual, out, pool);
  if (out.numel() == 0) return out.permute({3, 0, 1, 2});
  const Isa isa = pick_isa();
  const int64_t im2col_floats = c * kh * kw * ho * wo;
  // Rows worth building: a 1x1 kernel's are its strided input; others, at least one non-zero per two
  // floats of rows (below, the build costs more than the grid loses: Zen 4, ResNet-18 at 99%, 512 ->
  // 512 4 x 4 69 us on im2col rows against 55 on the grid; at 95% 99 against 125).
  const bool enough = kh * kw == 1 || 2 * a.rp[oc_count] >= im2col_floats;
  // Batch 1, 3 x 3 on rows of 16 or 32 floats: row taps as addresses, column taps as lane shifts
  // (small_map.cpp).
  if (n == 1 && row_shift_batch1_applicable(x, a)) {
    conv_row_shift_batch1(x, a, out.mutable_data_ptr<float>(), res.defined() ? res.const_data_ptr<float>() : nullptr);
    return out.permute({3, 0, 1, 2});
  }
  // Batch 1, stride 1, "same" padding, at most 64 positions: whole planes shifted per tap (small_map.cpp).
  // Zen 4, 2 threads, ResNet-18 at 99%: 512 -> 512 4 x 4 54 -> 20 us, 256 -> 256 8 x 8 50 -> 23; at 90%
  // 145 (im2col rows, session 14) -> 80 and 122 (the grid, session 14) -> 98.
  if (n == 1 && small_map_batch1_applicable(x, a)) {
    conv_small_map_batch1(x, a, out.mutable_data_ptr<float>(), res.defined() ? res.const_data_ptr<float>() : nullptr);
    return out.permute({3, 0, 1, 2});
  }
  if (n == 1 && !pool && (ho * wo) % isa.lanes == 0 && ho * wo <= kIm2colMaxPositions &&
      im2col_floats <= kIm2colMaxFloats && enough) {
    conv_im2col_batch1(x, a, isa, ho, wo, out.mutable_data_ptr<float>(), res.defined() ? res.const_data_ptr<float>() : nullptr);
    return out.permute({3, 0, 1, 2});
  }
  const int64_t rows_out = pool ? 2 * oh : ho, cols_out = pool ? 2 * ow : wo;  // pooling drops an odd edge
  const int64_t gh = cdiv(hp, S), gw = cdiv(wp, S);
  const int64_t nb = batch_block(n, isa, S, c, kh, kw, rows_out, cols_out, gw, pool), blocks = cdiv(n, nb);
  const int64_t plane = gh * gw * nb;
  // Reads past the last plane's end: a run's last vector (lanes) and the shifts of the last taps.
  const int64_t tail = (kw / S + 2) * nb + 2 * isa.lanes;
  const int64_t block_len = S * S * c * plane + tail;

  const int64_t nnz = a.rp[oc_count];
  const std::shared_ptr<const std::vector<int32_t>> offs =
      pattern_offsets(a, c, S, gw, nb, plane, nnz);
  const TileShape tile = choose_tile(rows_out, cols_out, gw, nb, isa, pool);
  TORCH_CHECK((tile.merged ? isa.kernel_for(1, cdiv(tile.rows * gw * nb, isa.lanes))
                           : isa.kernel_for(tile.rows, cdiv(tile.cols * nb, isa.lanes))) != nullptr,
              "sparse_conv2d: internal error, no micro-kernel for the tiled algorithm's tile");
  const int64_t row_tiles = cdiv(rows_out, tile.rows), col_tiles = tile.merged ? 1 : cdiv(cols_out, tile.cols);
  const int64_t tiles = row_tiles * col_tiles;
  const int64_t tile_floats = tile.merged ? cdiv(tile.rows * gw * nb, isa.lanes) * isa.lanes
                                          : tile.rows * cdiv(tile.cols * nb, isa.lanes) * isa.lanes;
  // The sums a thread keeps at once where the epilogue copies them: a chunk of output channels (L2).
  const int64_t oc_per_chunk = std::max<int64_t>(1, std::min(oc_count, kSumsFloats / tile_floats));

  at::Tensor staged_fallback;
  float* sp = staging_memory(blocks * block_len, staged_fallback, x.options());
  if (n != 1) {  // batch 1 stages inside the kernels' parallel region (below)
    stage_blocks(x, nb, S, kh, kw, a.pad_h, a.pad_w, gh, gw, block_len, sp);
    for (int64_t bb = 0; bb < blocks; ++bb) std::fill_n(sp + bb * block_len + S * S * c * plane, tail, 0.f);
  }
  float* op = out.mutable_data_ptr<float>();
  uint8_t* ip = pool_index_like(a, out);
  const float* rsp = res.defined() ? res.const_data_ptr<float>() : nullptr;
  const int32_t* offp = offs->data();

  // One output tile (batch block bb, output rows [y0, y0 + kk), kk <= tile.rows, column tile ct) for
  // output channels [oc0, oc1), on the staged input sp, sums in `sums`.
  auto run_rows = [&, op, ip, rsp, offp](const float* sp, int64_t bb, int64_t y0, int64_t kk, int64_t ct, int64_t oc0,
                                         int64_t oc1, float* sums) {
    const int64_t b0 = bb * nb, nbv = std::min(nb, n - b0);
    const int64_t x0 = tile.merged ? 0 : ct * tile.cols;
    const int64_t tt = tile.merged ? cols_out : std::min(tile.cols, cols_out - x0);
    const float* base = sp + bb * block_len + (y0 * gw + x0) * nb;
    const int64_t vr = tile.merged ? cdiv(kk * gw * nb, isa.lanes) : cdiv(tt * nb, isa.lanes);
    const int64_t pitch = tile.merged ? gw * nb : vr * isa.lanes;
    const TileFn kernel = tile.merged ? isa.kernel_for(1, vr) : isa.kernel_for(kk, vr);
    // Whole vectors of one position each (a full batch block), or, for one image, of a row's
    // consecutive positions (the tile's run a whole number of vectors): the kernel writes the
    // output from the registers; otherwise the epilogue below copies the sums.
    const bool whole_positions = nbv == nb && nb % isa.lanes == 0;
    const bool whole_rows = n == 1 && (tt * nb) % isa.lanes == 0;
    // Pooling from the registers: whole positions of 1, 2 or 4 vectors (the kernel's variants), row
    // and column pairs (pooling tiles have even sides), no window positions wanted (inference).
    const int64_t out_step = whole_positions ? n : isa.lanes, per_position = whole_positions ? nb / isa.lanes : 1;
    const bool pool_out = pool && ip == nullptr && !tile.merged && whole_positions && kk % 2 == 0 && tt % 2 == 0 &&
                          (per_position == 1 || per_position == 2 || per_position == 4);
    const bool direct_out = !tile.merged && ((!pool && (whole_positions || whole_rows)) || pool_out);
    for (int64_t oc = oc0; oc < oc1; ++oc) {
      const int64_t at_out = pool_out ? ((oc * oh + y0 / 2) * ow + x0 / 2) * n + b0 : ((oc * oh + y0) * ow + x0) * n + b0;
      const TileOutput to_out{op + at_out, ow * n, out_step, per_position, rsp ? rsp + at_out : nullptr, relu, pool_out};
      kernel(base, gw * nb, offp, a.vals, a.rp[oc], a.rp[oc + 1], a.bias ? a.bias[oc] : 0.f,
             sums + (oc - oc0) * tile_floats, pitch, direct_out ? &to_out : nullptr);
    }
    if (direct_out) return;
    for (int64_t oc = oc0; oc < oc1; ++oc) {  // the epilogue, from the finished sums
      const float* acc = sums + (oc - oc0) * tile_floats;
      if (pool) {
        for (int64_t i = 0; i < kk; i += 2) {
          const int64_t at_out = ((oc * oh + (y0 + i) / 2) * ow + x0 / 2) * n + b0;
          store_pooled_row(op + at_out, n, acc + i * pitch, acc + (i + 1) * pitch, nb, tt / 2, nbv,
                           ip ? ip + at_out : nullptr);
        }
        continue;
      }
      for (int64_t i = 0; i < kk; ++i) {
        const int64_t at_out = ((oc * oh + y0 + i) * ow + x0) * n + b0;
        store_row(op + at_out, n, acc + i * pitch, nb, tt, nbv, relu, rsp ? rsp + at_out : nullptr);
      }
    }
  };

  // The work, items (batch block, tile, output channel) in that order (tile-major: a tile's input
  // window is reread by its output channels while in cache), split into one contiguous range per
  // thread of equal estimated cost: an item costs its non-zeros times its tile's cycles per non-zero
  // plus its tile's stores. (Equal numbers of tasks left the thread with the narrower edge tiles
  // waiting at the barrier: 13% of a 256 -> 256 8 x 8 layer at batch 16.)
  const WorkSplit split = split_work(tile, rows_out, cols_out, gw, nb, isa, blocks, a.rp, oc_count,
                                     std::min<int64_t>(at::get_num_threads(), blocks * tiles * oc_count));
  // Tile tl of the grid of tiles.
  auto run_tile = [&](const float* sp, int64_t bb, int64_t tl, int64_t oc0, int64_t oc1, float* sums) {
    const int64_t y0 = (tl / col_tiles) * tile.rows;
    run_rows(sp, bb, y0, std::min(tile.rows, rows_out - y0), tl % col_tiles, oc0, oc1, sums);
  };
  // Items [split.start[begin], split.start[end]) on the staged input sp, sums in `sums`.
  auto run_items = [&](const float* sp, int64_t begin, int64_t end, float* sums) {
    for (int64_t g = split.start[begin], g1 = split.start[end]; g < g1;) {
      const int64_t segment = g / oc_count, oc = g % oc_count;
      const int64_t oc_end = std::min({oc_count, oc + (g1 - g), oc + oc_per_chunk});
      run_tile(sp, segment / tiles, segment % tiles, oc, oc_end, sums);
      g += oc_end - oc;
    }
  };
  // Uninitialised: the kernel writes every sum it keeps before the epilogue reads it.
  const int64_t sums_floats = oc_per_chunk * tile_floats + isa.lanes;
  if (n != 1) {
    at::parallel_for(0, split.parts(), 1, [&](int64_t begin, int64_t end) {
      const std::unique_ptr<float[]> sums(new float[sums_floats]);
      run_items(sp, begin, end, sums.get());
    });
    return out.permute({3, 0, 1, 2});
  }
  // Batch 1: each thread stages, into its own memory, the grid rows its own tiles read, and runs them.
  // A staging shared by the threads (split by channel in a region of its own, the kernels then by rows)
  // had each core write lines the other had read in the previous call and read lines the other had just
  // written: on this VM, whose vCPUs pass cache lines slowly, 38 us a thread to stage 150 KB that one
  // thread alone stages in 4. The rows near a boundary are staged by both threads (a halo of kh - 1).
  const int64_t parts = split.parts();
  // Stages, into `own`, the grid rows that output rows [r0, r1) read, and zeros past them to the end
  // of the kernels' reach (a merged tile's last vector reads up to a vector past its rows: lanes whose
  // sums are never stored). Zeros, not the image's next rows: those rows are the other thread's band,
  // and reading them moved cache lines between the cores for nothing (ResNet-18 at 95%, batch 1,
  // Zen 4, 2 threads: 1260 -> 1250 and 1268 -> 1264 us, 1860 -> 1828 while the two vCPUs sat on
  // different CCDs; bench/NOTES.md, session 19).
  auto stage_rows_for = [&](int64_t r0, int64_t r1, float* own) {
    stage_image_rows(x, S, kh, kw, a.pad_h, a.pad_w, gh, gw, r0, std::min(gh, r1 + (kh - 1) / S + 1 + cdiv(isa.lanes, gw)),
                     r1 + (kh - 1) / S, own);
    std::fill_n(own + S * S * c * plane, tail, 0.f);
  };
  // Where every thread gets a row of output (pooled rows: a pair), the threads split the map into bands
  // of rows, each computing every output channel of its band: a layer then reads, but for a halo, the
  // rows the same thread wrote in the layer before (a split by cost cuts inside a tile, and the thread
  // that computes half a tile's channels reads rows the other wrote).
  const int64_t row_unit = pool ? 2 : 1, units = rows_out / row_unit;
  if (parts > 1 && units >= kMinBandRows * parts) {
    run_parts(parts, [&](int64_t p) {
      const int64_t r0 = units * p / parts * row_unit, r1 = units * (p + 1) / parts * row_unit;
      at::Tensor own_fallback;
      float* own = staging_memory(block_len, own_fallback, x.options());
      stage_rows_for(r0, r1, own);
      // The band in tiles of equal height, at most the tile's (pooling: even heights).
      const int64_t band_tiles = cdiv(r1 - r0, tile.rows);
      const int64_t tr = std::min(tile.rows, cdiv(cdiv(r1 - r0, band_tiles), row_unit) * row_unit);
      const std::unique_ptr<float[]> sums(new float[sums_floats]);
      for (int64_t y0 = r0; y0 < r1; y0 += tr)
        for (int64_t ct = 0; ct < col_tiles; ++ct)
          for (int64_t oc = 0; oc < oc_count; oc += oc_per_chunk)
            run_rows(own, 0, y0, std::min(tr, r1 - y0), ct, oc, std::min(oc_count, oc + oc_per_chunk), sums.get());
    });
    return out.permute({3, 0, 1, 2});
  }
  // Otherwise the split by cost: each part stages the rows of its tiles, from its first tile's first.
  run_parts(parts, [&](int64_t p) {
    at::Tensor own_fallback;
    float* own = parts == 1 ? sp : staging_memory(block_len, own_fallback, x.options());
    const int64_t first = split.start[p] / oc_count % tiles, last = (split.start[p + 1] - 1) / oc_count % tiles;
    stage_rows_for((first / col_tiles) * tile.rows, std::min(rows_out, (last / col_tiles + 1) * tile.rows), own);
    const std::unique_ptr<float[]> sums(new float[sums_floats]);
    run_items(own, p, p + 1, sums.get());
  });
  return out.permute({3, 0, 1, 2});
}

}  // namespace sparse_cpu
}  // namespace fastprune
