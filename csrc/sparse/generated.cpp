// The generated algorithm (algo 5): machine code written per layer for its non-zero pattern, for
// batches of whole vectors on AVX-512 x86-64; the tiled algorithm (tiled.cpp) runs whatever else it
// is asked to (a batch that is not a multiple of 16, another CPU). Pooling (ReLU, then 2x2 max): at
// inference each band of two output rows is written to a thread's scratch rows and pooled from there
// while in cache (epilogue.h's store_pooled_row, as the others store it), the full-size output never
// written; when the backward pass asks for the window positions, over the whole conv output after it.
//
// Why: the tiled micro-kernel keeps one output channel's tile of positions in registers, so each
// non-zero reads its tile's input window afresh: about 0.85 lines from L2 per multiply-add at 90%
// sparsity, which caps it near 110-130 GFLOP/s a core. Here a kernel holds 24 output channels at one
// position (16 images: one vector each, zmm0..zmm23) and walks the input channels of a chunk once:
// each input vector with a non-zero among the 24 channels is loaded once and multiplied into every
// channel that has one there, the register named in the instruction (which only code written for
// the pattern can do). At 90% that is 0.38 loads a multiply-add (bench/NOTES.md, session 12:
// 150-166 GFLOP/s a core in a standalone prototype; 1.1-1.3x the tiled algorithm on ResNet-18's
// 64- and 128-channel layers in the network on Zen 5, slower there on the 512-channel ones: see
// kMaxGeneratedNonzeros).
//
// A kernel (group g of 24 output channels, chunk ch of input channels) runs `count` slots: consecutive
// output positions of a row, or one position of consecutive batch blocks (see blocks a call below):
//   void kernel(const float* in, float* partial, const float* weights, const float* residual,
//               const float* bias, float* out, int64_t count, uint64_t taps, int64_t in_step,
//               int64_t out_step)
// in:      the input at the first position's window: the input tensor itself where it is batch innermost
//          (each position's 16 images one vector; the next position S columns on), else a staged copy
//          (tiled.cpp's stage_blocks: batch blocks of 16, a zero border, stride phases);
// partial: the row's partial sums between chunks, 24 vectors a position in a row (read unless chunk
//          0, written unless the last chunk): the output's channels lie a power of two apart at
//          batch 16-64, and 24 lines that far apart would share one L1 set (12 ways);
// weights: the chunk's non-zeros in the order the code uses them (one stream, read by broadcasts);
// bias + the group's first channel, read by chunk 0; residual and out: the output (OC, H', W', N) at
//          (the group's first channel, the row's first position, the block's first image), read and
//          written by the last chunk (bias, + residual, ReLU as the layer's epilogue says).
// in_step, out_step: bytes from one slot's input window, and output (and residual), to the next's;
//          the partial sums of consecutive slots lie 24 vectors apart.
// taps:    bit r * kw + s set where tap (r, s) reads inside the input at these positions: the code
//          is laid out tap by tap, and a tap whose window is all padding (a border row or column;
//          on a 4x4 map 31% of a 3x3 conv's multiply-adds) is jumped over, its multiply-adds with
//          the staged zeros never run. The driver cuts each row into runs of equal masks (at most
//          the left edge, the middle, the right edge).
// The output (OC, H', W', N): on SparseModel's inference path (algo 6) its channel planes lie one
// vector further apart than their size (channel_plane), so that the next generated layer reads it in
// place without its planes sharing cache sets; no staged copy between two generated layers.
// The code loops over the slots itself, moving in, partial, residual and out on by a slot each time:
// the call's cost and the first fetch of the chunk's code (from L2 or L3: a layer's code is far larger
// than L1i) are spread over the run.
// Blocks a call: on maps at most kBlockLoopWidth wide read in place, a call runs one position over
// all the batch blocks of the call instead of a run of positions over one block. A 2x2 or 4x4 map's
// rows cut into runs of one or two positions (each edge reads other taps), so a chunk's code was
// fetched for a position or two of 16 images; over 64 images it serves four times as many.
// Work: (the call's batch blocks, band of output rows, group) items in one contiguous range per thread;
// a thread's items of one (blocks, band) run chunk by chunk, each chunk over all their groups, row by
// row (a chunk's input window stays in L1/L2 while every group's code runs over the band's slots; a
// band is about 16 slots, a group's partial sums over it 24 KB). The next kernel's code and weights are
// prefetched while one runs (NextKernelPrefetch): instruction fetch otherwise stalls on each of its
// lines. With several blocks over
// several threads, each thread stages its own blocks into its own memory.
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <array>
#include <vector>

#include <c10/util/intrusive_ptr.h>

#include "epilogue.h"
#include "sparse_common.h"
#include "x86_emitter.h"

namespace fastprune {
namespace sparse_cpu {
namespace {

constexpr int64_t kLanes = 16;        // floats an AVX-512 vector: the batch block
constexpr int kGroup = 24;            // output channels a kernel keeps, zmm0..zmm23
constexpr int kFirstInputReg = 24;    // the input loads take zmm24..zmm30 in turn
constexpr int kInputRegs = 7;
constexpr int kZeroReg = 31;          // zero, for the ReLU
// Inputs of at most this many channels are read in place even with planes a multiple of 4 KiB apart:
// a tap of every channel then fits the ways of one L1 set (8) (a network's first conv, RGB).
constexpr int64_t kFewChannels = 4;
constexpr int64_t kBandPositions = 16;  // slots (positions x blocks a call) an item runs each chunk over
constexpr int64_t kBlockLoopWidth = 4;  // maps at most this wide run a position over all blocks a call
// Input channels a chunk: enough for about this many multiply-adds a call (the partial sums' 24
// loads and stores between chunks cost what a few dozen of them do), at least 8, at most all.
constexpr double kChunkMultiplyAdds = 640;
// Layers with more non-zeros run the tiled algorithm: a bound on the code's size (about 11 bytes a
// non-zero, 4.4 MB here) and on the time to write it (about 80 ns a non-zero), not a verdict on speed.
// Whether a large layer's code pays depends on the core: it does not stay in L2, and on Zen 5 the
// instruction fetch from L3 made ResNet-18's 512-channel layers 0.85-0.9x of the tiled algorithm in
// the network, while on Zen 4 (half the FMA rate, a 32 KiB L1d) they ran 1.25-1.55x faster generated
// (bench/NOTES.md, sessions 12 and 13); the tuner times both.
constexpr int64_t kMaxGeneratedNonzeros = 400000;
constexpr int64_t kProgramCacheBytes = int64_t{512} << 20;  // code and weights kept, in all

using Kernel = void (*)(const float*, float*, const float*, const float*, const float*, float*, int64_t, uint64_t,
                        int64_t, int64_t);

// One layer's generated code for one geometry: kernel k = g * chunks + ch (group g, chunk ch) at
// code->at(entry[k]) up to entry[k + 1], with its weights from weights[weight_at[k]] up to
// weight_at[k + 1] (each vector holds one entry past the last kernel).
struct Program {
  std::unique_ptr<x86::ExecutableCode> code;
  int64_t groups = 0, chunks = 0, bytes = 0;
  std::vector<size_t> entry;
  std::vector<int64_t> weight_at;
  std::vector<float> weights;
  Kernel kernel(int64_t g, int64_t ch) const {
    return reinterpret_cast<Kernel>(const_cast<uint8_t*>(code->at(entry[g * chunks + ch])));
  }
};

// The next kernel's code and weights brought into L2 while the current one runs, a share before each
// of its calls: both come from memory in the network (a layer's code and weights pass through the
// caches once a micro-batch, behind every other layer's), and instruction fetch stalls on them. All
// lines at once before the first call filled the core's miss buffers with the code's 100-odd lines
// for a while, stalling the kernel's own input loads behind them; spread over the calls, with the
// weights too (in network order the next kernel's weights lie elsewhere: the hardware prefetcher does
// not follow), a ResNet-18 512 -> 512 4 x 4 layer whose code and weights come from memory ran 1.15 ms
// against 1.32, 1.07 with them in cache (bench/NOTES.md, session 20).
class NextKernelPrefetch {
 public:
  // Kernel k's lines, spread over `calls` calls of the current one.
  void start(const Program& prog, int64_t k, int64_t calls) {
    code_ = reinterpret_cast<const char*>(prog.code->at(prog.entry[k]));
    code_end_ = reinterpret_cast<const char*>(prog.code->at(prog.entry[k + 1]));
    weights_ = reinterpret_cast<const char*>(prog.weights.data() + prog.weight_at[k]);
    weights_end_ = reinterpret_cast<const char*>(prog.weights.data() + prog.weight_at[k + 1]);
    code_lines_ = ((code_end_ - code_) / 64 + calls) / calls;
    weight_lines_ = ((weights_end_ - weights_) / 64 + calls) / calls;
  }
  void stop() { code_ = code_end_, weights_ = weights_end_; }
  // Before a call: the next share.
  void some() {
    for (int64_t i = 0; i < code_lines_ && code_ < code_end_; ++i, code_ += 64) __builtin_prefetch(code_, 0, 2);
    for (int64_t i = 0; i < weight_lines_ && weights_ < weights_end_; ++i, weights_ += 64)
      __builtin_prefetch(weights_, 0, 2);
  }

 private:
  const char *code_ = nullptr, *code_end_ = nullptr, *weights_ = nullptr, *weights_end_ = nullptr;
  int64_t code_lines_ = 0, weight_lines_ = 0;
};

// Consecutive output positions of a row whose taps reach the input alike: one call of a kernel.
struct ColumnRun {
  int64_t x0, count;
  uint64_t mask;
};

// What the code depends on besides the weights: the staged input's geometry (channel plane and row
// in floats, stride phases), the output channel stride in floats, the epilogue.
struct Geometry {
  int64_t c, S, kh, kw, gw, plane, ocs, wo, n;
  bool relu, residual, bias;
  // Direct: the code reads the input tensor itself (batch innermost), channel plane, row and
  // position sc, sh, sw floats apart, no staged copy (see conv_generated); pad_h, pad_w place the taps.
  bool direct;
  int64_t sc, sh, sw, pad_h, pad_w;
};

int64_t chunk_channels(const ConvArgs& a, int64_t c) {
  const int64_t nnz = a.rp[a.oc_count] - a.rp[0];
  const double density = static_cast<double>(nnz) / static_cast<double>(a.oc_count * c * a.kh * a.kw);
  const double per_channel = std::min<double>(kGroup, static_cast<double>(a.oc_count)) * density * a.kh * a.kw;
  const int64_t want = std::min(c, std::max<int64_t>(8, per_channel > 0 ? static_cast<int64_t>(kChunkMultiplyAdds / per_channel) + 1 : c));
  const int64_t chunks = (c + want - 1) / want;
  return (c + chunks - 1) / chunks;  // equal chunks (a last one of a few channels would be all overhead)
}

std::shared_ptr<const Program> generate(const ConvArgs& a, const Geometry& geo) {
  const int64_t ksize = geo.kh * geo.kw, cb = chunk_channels(a, geo.c);
  auto prog = std::make_shared<Program>();
  prog->groups = (a.oc_count + kGroup - 1) / kGroup;
  prog->chunks = (geo.c + cb - 1) / cb;
  // Where tap (r, s) of input channel 0 lies from the position's window, and the next channel's.
  std::vector<int64_t> tap_offset(ksize);
  for (int64_t r = 0; r < geo.kh; ++r)
    for (int64_t s = 0; s < geo.kw; ++s)
      tap_offset[r * geo.kw + s] =
          geo.direct ? (r - geo.pad_h) * geo.sh + (s - geo.pad_w) * geo.sw  // may point before the window
                     // staged: as tiled.cpp's compute_offsets, phase, then shift
                     : ((r % geo.S) * geo.S + s % geo.S) * geo.c * geo.plane + ((r / geo.S) * geo.gw + s / geo.S) * kLanes;
  const int64_t channel_floats = geo.direct ? geo.sc : geo.plane;
  x86::Emitter e;
  struct Entry {
    int32_t col;
    int k;
    float v;
  };
  // The pattern becomes addresses in the code: any column or row pointer out of range is refused here
  // (the other algorithms only read out of bounds with it; this one would bake the address in).
  const int64_t nnz = a.cols_tensor != nullptr && a.cols_tensor->defined() ? a.cols_tensor->numel() : a.rp[a.oc_count];
  TORCH_CHECK(a.rp[0] == 0 && a.rp[a.oc_count] <= nnz, "sparse_conv2d: row_ptr must start at 0 and end within col_idx");
  for (int64_t oc = 0; oc < a.oc_count; ++oc)
    TORCH_CHECK(a.rp[oc] <= a.rp[oc + 1], "sparse_conv2d: row_ptr must not decrease");
  for (int64_t i = 0; i < a.rp[a.oc_count]; ++i)
    TORCH_CHECK(a.cols[i] >= 0 && a.cols[i] < geo.c * ksize, "sparse_conv2d: col_idx holds ", a.cols[i],
                ", outside [0, ", geo.c * ksize, ") for ", geo.c, " input channels");
  std::vector<Entry> entries;
  for (int64_t g = 0; g < prog->groups; ++g) {
    const int64_t oc0 = g * kGroup;
    const int kg = static_cast<int>(std::min<int64_t>(kGroup, a.oc_count - oc0));
    entries.clear();
    for (int k = 0; k < kg; ++k)
      for (int64_t i = a.rp[oc0 + k]; i < a.rp[oc0 + k + 1]; ++i) entries.push_back({a.cols[i], k, a.vals[i]});
    std::sort(entries.begin(), entries.end(),
              [](const Entry& x, const Entry& y) { return x.col != y.col ? x.col < y.col : x.k < y.k; });
    size_t i = 0;
    int next_reg = 0;
    std::vector<Entry> chunk;
    for (int64_t ch = 0; ch < prog->chunks; ++ch) {
      prog->entry.push_back(e.code.size());
      prog->weight_at.push_back(static_cast<int64_t>(prog->weights.size()));
      const bool first = ch == 0, last = ch + 1 == prog->chunks;
      // The chunk's non-zeros tap by tap (then input channel, then output channel): a section a tap,
      // skipped at the positions where that tap reads only padding (mask bit clear).
      const int64_t col_end = std::min(geo.c, (ch + 1) * cb) * ksize;  // the chunk's weight columns
      chunk.clear();
      for (; i < entries.size() && entries[i].col < col_end; ++i) chunk.push_back(entries[i]);
      std::stable_sort(chunk.begin(), chunk.end(),
                       [ksize](const Entry& x, const Entry& y) { return x.col % ksize < y.col % ksize; });
      e.mov_eax_stack(8);   // the count of positions
      e.mov_r10_stack(16);  // the taps that reach inside the input
      e.mov_r11_rdx();      // the chunk's weights
      // A loop over the positions: the call's cost and the code's first fetch spread over them.
      const size_t loop = e.code.size();
      for (int k = 0; k < kg; ++k) {
        if (!first) {
          e.load(k, x86::rsi, k * kLanes * 4);
        } else if (geo.bias) {
          e.broadcast(k, x86::r8, k * 4);
        } else {
          e.zero(k);
        }
      }
      const int64_t w0 = static_cast<int64_t>(prog->weights.size());
      for (size_t j = 0; j < chunk.size();) {
        const int64_t t = chunk[j].col % ksize;
        const size_t skip = t < 64 ? e.jump_unless_r10_bit(static_cast<int>(t)) : 0;
        int64_t w_base = static_cast<int64_t>(prog->weights.size()) - w0;  // the weight rdx points at
        e.lea_rdx_r11(static_cast<int32_t>(w_base * 4));
        while (j < chunk.size() && chunk[j].col % ksize == t) {
          const int32_t col = chunk[j].col;
          const int reg = kFirstInputReg + next_reg;
          next_reg = (next_reg + 1) % kInputRegs;
          e.load(reg, x86::rdi, ((col / ksize) * channel_floats + tap_offset[t]) * 4);
          for (; j < chunk.size() && chunk[j].col == col; ++j) {
            int64_t w = static_cast<int64_t>(prog->weights.size()) - w0 - w_base;
            if (w * 4 > 508) {  // past a one-byte displacement (x4): move the pointer on
              e.add_imm(x86::rdx, 512);
              w_base += 128, w -= 128;
            }
            e.fma_broadcast(chunk[j].k, reg, x86::rdx, w * 4);
            prog->weights.push_back(chunk[j].v);
          }
        }
        if (t < 64) e.patch_jump(skip);
      }
      if (last && (geo.relu || geo.residual)) e.zero(kZeroReg);
      for (int k = 0; k < kg; ++k) {
        if (!last) {
          e.store(k, x86::rsi, k * kLanes * 4);
          continue;
        }
        if (geo.residual) e.add_mem(k, k, x86::rcx, k * geo.ocs * 4);
        if (geo.relu || geo.residual) e.max(k, kZeroReg, k);  // max(0, v), NaN kept
        e.store(k, x86::r9, k * geo.ocs * 4);
      }
      // The next slot: its input window, partial sums, residual and output (each section sets the
      // weight pointer afresh).
      e.add_stack(x86::rdi, 24);  // in_step
      e.add_imm(x86::rsi, static_cast<int32_t>(kGroup * kLanes * 4));
      e.add_stack(x86::rcx, 32);  // out_step
      e.add_stack(x86::r9, 32);
      e.dec_eax_jnz(loop);
      e.vzeroupper();
      e.ret();
    }
  }
  prog->entry.push_back(e.code.size());  // the end of the last kernel
  prog->weight_at.push_back(static_cast<int64_t>(prog->weights.size()));
  prog->code = std::make_unique<x86::ExecutableCode>(e.code);
  if (!prog->code->ok()) return nullptr;
  prog->bytes = static_cast<int64_t>(e.code.size() + prog->weights.size() * sizeof(float));
  return prog;
}

// The programs made, per (col_idx and values tensors and their versions, geometry): weak references
// to both tensors, so that a new tensor at a freed one's address never matches, and new values (a
// training step) make a new program. At most kProgramCacheBytes in all (then the cache starts over).
struct CacheEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> cols, vals;
  std::shared_ptr<const Program> program;
};

std::shared_ptr<const Program> program_for(const ConvArgs& a, const Geometry& geo) {
  if (a.cols_tensor == nullptr || a.vals_tensor == nullptr || !a.cols_tensor->defined() ||
      !a.vals_tensor->defined())
    return generate(a, geo);
  // (cols, its version, values, its version, every field of the geometry)
  using Key = std::tuple<const c10::TensorImpl*, int64_t, const c10::TensorImpl*, int64_t, std::array<int64_t, 15>>;
  static std::mutex mutex;
  static std::map<Key, CacheEntry> cache;
  static int64_t cached_bytes = 0;
  const c10::TensorImpl* ci = a.cols_tensor->unsafeGetTensorImpl();
  const c10::TensorImpl* vi = a.vals_tensor->unsafeGetTensorImpl();
  const Key key{ci, static_cast<int64_t>(ci->version_counter().current_version()), vi,
                static_cast<int64_t>(vi->version_counter().current_version()),
                std::array<int64_t, 15>{geo.c, geo.S, geo.kh, geo.kw, geo.gw, geo.plane, geo.ocs, geo.wo, geo.n,
                                     (geo.relu ? 1 : 0) | (geo.residual ? 2 : 0) | (geo.bias ? 4 : 0) | (geo.direct ? 8 : 0),
                                     geo.sc, geo.sh, geo.sw, geo.pad_h, geo.pad_w}};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) {
      if (found->second.cols.lock().get() == ci && found->second.vals.lock().get() == vi) return found->second.program;
      cached_bytes -= found->second.program->bytes;
      cache.erase(found);
    }
  }
  std::shared_ptr<const Program> prog = generate(a, geo);
  if (prog == nullptr) return nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (cached_bytes + prog->bytes > kProgramCacheBytes) cache.clear(), cached_bytes = 0;
  cache.insert_or_assign(key, CacheEntry{c10::weak_intrusive_ptr<c10::TensorImpl>(a.cols_tensor->getIntrusivePtr()),
                                         c10::weak_intrusive_ptr<c10::TensorImpl>(a.vals_tensor->getIntrusivePtr()),
                                         prog});
  cached_bytes += prog->bytes;
  return prog;
}

bool cpu_has_avx512f() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

}  // namespace

bool generated_supported() {
  static const bool ok = [] {
    if (!cpu_has_avx512f()) return false;
    x86::Emitter e;
    e.ret();
    return x86::ExecutableCode(e.code).ok();
  }();
  return ok;
}

bool generated_applicable(int64_t n, bool pool, int64_t stride_h, int64_t stride_w, int64_t nnz) {
  (void)pool;  // pooled layers too: the pooling runs over the conv's output (conv_generated)
  return generated_supported() && stride_h == stride_w && n > 0 && n % kLanes == 0 && nnz <= kMaxGeneratedNonzeros;
}

namespace {

// Floats from one output channel's plane to the next: a plane of `floats`, padded by one line when
// asked. Planes a multiple of 4 KiB apart (16x16 and 8x8 maps of batch 16: 16 and 4 KiB) put the
// same position of every channel in one L1 set, and in one L2 set from 64 KiB on, and the next
// layer's code reads a chunk's channels at one position together: read in place, such an input ran
// ResNet-18's 3x3 layers 1.2-2.4x slower than from a staged copy (bench/NOTES.md, session 15).
int64_t channel_plane(int64_t floats, bool pad_planes) { return pad_planes ? floats + kLanes : floats; }

// The residual (N, OC, H', W') as the code reads it: (OC, H', W', N) with the output's strides (out_chwn),
// itself when it has them (the usual case: an earlier generated layer's output), else a copy.
at::Tensor residual_like(const std::optional<at::Tensor>& residual, const at::Tensor& out_chwn) {
  if (!residual.has_value()) return at::Tensor();
  const at::Tensor r = residual_batch_innermost_view(*residual, out_chwn);
  if (r.strides() == out_chwn.strides()) return r;
  at::Tensor copy = at::empty_strided(out_chwn.sizes(), out_chwn.strides(), out_chwn.options());
  copy.copy_(r);
  return copy;
}

// ReLU, then 2x2 stride-2 max pooling of x (OC, H, W, N) (each plane contiguous) into (OC, H / 2,
// W / 2, N) (planes padded when asked: channel_plane), odd edges dropped, by the epilogue every
// algorithm shares (epilogue.h), with the window positions where the backward pass asks for them
// (a.pool_index).
at::Tensor pool_chwn(const at::Tensor& x, const ConvArgs& a, bool pad_planes) {
  const int64_t oc_count = x.size(0), h = x.size(1), w = x.size(2), n = x.size(3), oh = h / 2, ow = w / 2;
  const int64_t in_plane = x.stride(0), out_plane = channel_plane(oh * ow * n, pad_planes);
  at::Tensor out = pooled_empty({oc_count, oh, ow, n}, {out_plane, ow * n, n, 1}, x.options());
  uint8_t* index = pool_index_like(a, out);
  const float* src = x.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, oc_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t oc = begin; oc < end; ++oc)
      for (int64_t py = 0; py < oh; ++py) {
        const int64_t at = oc * out_plane + py * ow * n;
        const float* row = src + oc * in_plane + 2 * py * w * n;
        store_pooled_row(dst + at, n, row, row + w * n, n, ow, n, index ? index + at : nullptr);
      }
  });
  return out;
}

}  // namespace

at::Tensor conv_generated(const at::Tensor& x, const ConvArgs& a, const std::optional<at::Tensor>& residual,
                          bool pad_planes) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (!generated_applicable(n, a.pool, a.stride_h, a.stride_w, a.rp[a.oc_count] - a.rp[0]))
    return conv_tiled(x, a, residual);
  // Pooled layers: without window positions to keep (inference), each band of two output rows is
  // pooled as soon as it is computed, from a thread's scratch rows still in cache (fuse_pool); with
  // them (the backward pass asks), the conv with ReLU, then the pooling over its output.
  const bool fuse_pool = a.pool && a.pool_index == nullptr;
  if (a.pool && !fuse_pool) {
    ConvArgs conv = a;
    conv.pool = false, conv.relu = true, conv.pool_index = nullptr;
    // a (N, OC, H', W') view of (OC, H', W', N), its planes padded: the pooling reads them in place
    const at::Tensor full = conv_generated(x, conv, residual, pad_planes);
    return pool_chwn(full.permute({1, 2, 3, 0}), a, pad_planes).permute({3, 0, 1, 2});
  }
  const int64_t S = a.stride_h, kh = a.kh, kw = a.kw, oc_count = a.oc_count;
  const int64_t hp = h + 2 * a.pad_h, wp = w + 2 * a.pad_w;
  const int64_t ho = (hp - kh) / S + 1, wo = (wp - kw) / S + 1;
  const int64_t gh = (hp + S - 1) / S, gw = (wp + S - 1) / S, nb = kLanes, plane = gh * gw * nb;
  const int64_t sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  // The input read in place where it is batch innermost, unless its planes are a multiple of 4 KiB apart
  // with more than kFewChannels channels (channel_plane: a chunk's channels at one position would share a
  // cache set) or a tap past the 64th (which the code never skips) could read the padding; else staged,
  // zeros around. In place, a tap that would read padding is one the code jumps over, so every load
  // lies inside the image.
  const bool direct = x.stride(0) == 1 && kh * kw <= 64 && ((sc * 4) % 4096 != 0 || c <= kFewChannels) &&
                      (c * sc + kh * sh + kw * sw) * 4 < INT32_MAX;
  const int64_t blocks = n / nb;
  // Batch blocks a kernel call runs at one position (see "Blocks a call" above): all of them on narrow
  // maps read in place, else one (the call then runs a run of positions).
  const int64_t bpc = direct && blocks > 1 && wo <= kBlockLoopWidth ? blocks : 1;
  // Rows computed (an odd last row is one the pooling drops) and the rows an item runs over (about
  // kBandPositions slots, no more rows than there are): an even number when pooling, so that a band is
  // pooled on its own.
  const int64_t rows = fuse_pool ? ho / 2 * 2 : ho;
  const int64_t band_rows = fuse_pool ? std::min(rows, std::max<int64_t>(2, kBandPositions / bpc / wo / 2 * 2))
                                      : std::min(rows, std::max<int64_t>(1, kBandPositions / bpc / wo));
  const int64_t oh = fuse_pool ? ho / 2 : ho, ow = fuse_pool ? wo / 2 : wo;  // the output's map
  const int64_t ocs = channel_plane(oh * ow * n, pad_planes);  // the output's channel stride
  // Where the code writes: the output, or when pooling a thread's scratch rows (a group's 24 channels
  // over a band of each of the call's batch blocks, one after the other; planes padded as
  // channel_plane's), then pooled into the output.
  const int64_t scratch_block = band_rows * wo * kLanes;  // a channel's band of one block, when pooling
  const int64_t code_ocs = fuse_pool ? bpc * scratch_block + kLanes : ocs, code_n = fuse_pool ? kLanes : n;
  // Displacements are 32-bit: larger layers (a staged block or an output over 2 GB) take the tiled path.
  if (S * S * c * plane * 4 >= INT32_MAX || code_ocs * 4 * kGroup >= INT32_MAX) return conv_tiled(x, a, residual);
  const Geometry geo{c, S, kh, kw, gw, plane, code_ocs, wo, code_n, a.relu, residual.has_value(), a.bias != nullptr,
                     direct, direct ? sc : 0, direct ? sh : 0, direct ? sw : 0, a.pad_h, a.pad_w};
  const std::shared_ptr<const Program> prog = program_for(a, geo);
  if (prog == nullptr) return conv_tiled(x, a, residual);  // no executable memory here

  at::Tensor out = pooled_empty({oc_count, oh, ow, n}, {ocs, ow * n, n, 1}, x.options());
  const at::Tensor res = residual_like(residual, out);
  if (out.numel() == 0) return out.permute({3, 0, 1, 2});
  const int64_t tail = (kw / S + 2) * nb + 2 * kLanes;
  const int64_t block_len = S * S * c * plane + tail;
  float* op = out.mutable_data_ptr<float>();
  const float* x_data = x.const_data_ptr<float>();
  const float* rsp = res.defined() ? res.const_data_ptr<float>() : nullptr;
  // Which taps of a position read inside the input (bit r * kw + s; taps from the 64th on always run):
  // the rest read only the staged zero border, and the code skips them. Rows differ at the top and
  // bottom, columns at the left and right edge, where a row is cut into runs of equal masks.
  const auto tap_bits = [&](int64_t pos, int64_t pad, int64_t size, bool rows) {
    uint64_t bits = 0;
    for (int64_t r = 0; r < kh; ++r)
      for (int64_t q = 0; q < kw; ++q) {
        const int64_t at = pos * S + (rows ? r : q) - pad;
        if (r * kw + q < 64 && at >= 0 && at < size) bits |= uint64_t{1} << (r * kw + q);
      }
    return bits;
  };
  std::vector<uint64_t> row_mask(ho);
  for (int64_t y = 0; y < ho; ++y) row_mask[y] = tap_bits(y, a.pad_h, h, true);
  std::vector<ColumnRun> runs;
  for (int64_t x = 0; x < wo; ++x) {
    const uint64_t bits = tap_bits(x, a.pad_w, w, false);
    if (runs.empty() || runs.back().mask != bits) runs.push_back({x, 0, bits});
    ++runs.back().count;
  }
  const int64_t bands = (rows + band_rows - 1) / band_rows;
  const int64_t items = blocks / bpc * bands * prog->groups;  // (the call's blocks, band, group)
  const int64_t band_floats = band_rows * wo * bpc * kGroup * kLanes;  // one group's partial sums over a band
  // A call's steps from slot to slot (in bytes): the next block (16 images on, in the scratch rows the
  // next block's band) or the next position.
  const int64_t in_step = (bpc > 1 ? nb : direct ? S * sw : kLanes) * 4;
  const int64_t out_step = (bpc > 1 ? (fuse_pool ? scratch_block : nb) : code_n) * 4;
  // Items [begin, end) on the staged blocks from block0 on at `staged`.
  auto run_items = [&](int64_t begin, int64_t end, const float* staged, int64_t block0) {
    // A thread's items of one (batch block, band) run chunk by chunk, each chunk over all their groups:
    // the chunk's input window is read from L1 / L2 by every group in turn. Group by group (each over
    // all chunks), a 512-channel 4x4 layer's staged block (1.2 MB for 16 images) streamed from L3 once
    // a group. The partial sums are then kept for all the groups at once.
    const int64_t most_groups = std::min(prog->groups, end - begin);
    const std::unique_ptr<float[]> partial_memory(new float[most_groups * band_floats + kLanes]);
    // 64-byte aligned: a vector's store then touches one line
    float* partial = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(partial_memory.get()) + 63) & ~uintptr_t{63});
    const std::unique_ptr<float[]> scratch_memory(fuse_pool ? new float[most_groups * kGroup * code_ocs + kLanes] : nullptr);
    float* scratch = fuse_pool ? reinterpret_cast<float*>(
                                     (reinterpret_cast<uintptr_t>(scratch_memory.get()) + 63) & ~uintptr_t{63})
                               : nullptr;
    for (int64_t item = begin; item < end;) {
      const int64_t g0 = item % prog->groups, band = (item / prog->groups) % bands;
      const int64_t bb = item / (prog->groups * bands) * bpc;  // the call's first block
      const int64_t g1 = std::min(prog->groups, g0 + (end - item));
      const int64_t y0 = band * band_rows, y1 = std::min(rows, y0 + band_rows);
      const float* in_block = direct ? x_data + bb * nb : staged + (bb - block0) * block_len;
      int64_t calls = 0;  // a kernel's calls over the band
      for (const ColumnRun& run : runs) calls += bpc > 1 ? run.count : 1;
      calls *= y1 - y0;
      NextKernelPrefetch prefetch;
      for (int64_t ch = 0; ch < prog->chunks; ++ch)
        for (int64_t g = g0; g < g1; ++g) {
          const Kernel kernel = prog->kernel(g, ch);
          if (g + 1 < g1 || ch + 1 < prog->chunks)  // the kernel after this one in this loop
            prefetch.start(*prog, g + 1 < g1 ? (g + 1) * prog->chunks + ch : g0 * prog->chunks + ch + 1, calls);
          else
            prefetch.stop();
          const int64_t oc0 = g * kGroup;
          const float* bias = a.bias ? a.bias + oc0 : nullptr;
          const float* weights = prog->weights.data() + prog->weight_at[g * prog->chunks + ch];
          float* group_partial = partial + (g - g0) * band_floats;
          // (pooling: the group's scratch channels from row y0 on, the call's first block: code_n = 16)
          float* group_out = fuse_pool ? scratch + (g - g0) * kGroup * code_ocs - y0 * wo * kLanes
                                       : op + oc0 * ocs + bb * nb;
          for (int64_t y = y0; y < y1; ++y) {  // a run of a row's positions, or a position's blocks, a call
            for (const ColumnRun& run : runs) {
              for (int64_t x0 = run.x0; x0 < run.x0 + run.count; x0 += bpc > 1 ? 1 : run.count) {
                const int64_t at = (y * wo + x0) * code_n;
                const float* window = direct ? in_block + y * S * sh + x0 * S * sw : in_block + y * gw * nb + x0 * nb;
                prefetch.some();
                kernel(window, group_partial + ((y - y0) * wo + x0) * bpc * kGroup * kLanes, weights,
                       rsp ? rsp + oc0 * ocs + bb * nb + (y * wo + x0) * n : nullptr, bias, group_out + at,
                       bpc > 1 ? bpc : run.count, row_mask[y] & run.mask, in_step, out_step);
              }
            }
          }
        }
      for (int64_t g = g0; fuse_pool && g < g1; ++g)  // the band's rows, in cache, pooled (ReLU applied)
        for (int64_t oc = g * kGroup; oc < std::min(oc_count, (g + 1) * kGroup); ++oc)
          for (int64_t b = 0; b < bpc; ++b)
            for (int64_t y = y0; y < y1; y += 2) {
              const float* row = scratch + ((g - g0) * kGroup + oc - g * kGroup) * code_ocs + b * scratch_block +
                                 (y - y0) * wo * kLanes;
              store_pooled_row(op + oc * ocs + y / 2 * ow * n + (bb + b) * nb, n, row, row + wo * kLanes, kLanes, ow,
                               kLanes);
            }
      item += g1 - g0;
    }
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  const int64_t items_per_block = bands * prog->groups;
  if (direct) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { run_items(begin, end, nullptr, 0); });
    return out.permute({3, 0, 1, 2});
  }
  if (threads <= 1 || blocks < 2) {
    at::Tensor staged_fallback;
    float* sp = staging_memory(blocks * block_len, staged_fallback, x.options());
    stage_blocks(x, nb, S, kh, kw, a.pad_h, a.pad_w, gh, gw, block_len, sp);
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { run_items(begin, end, sp, 0); });
    return out.permute({3, 0, 1, 2});
  }
  // Several batch blocks over several threads: each thread stages, into its own memory, the blocks its
  // items read (a block cut between two threads is staged by both), and runs them. A shared staging
  // (by channel, over all blocks) had each thread read lines the other wrote; here a thread's blocks
  // are the images whose activations it wrote in the layer before, so a micro-batch split over the
  // threads by blocks passes no data between the cores.
  run_parts(threads, [&](int64_t p) {
    const int64_t begin = items * p / threads, end = items * (p + 1) / threads;
    if (begin >= end) return;
    const int64_t first = begin / items_per_block, last = (end - 1) / items_per_block;
    at::Tensor own_fallback;
    float* own = staging_memory((last - first + 1) * block_len, own_fallback, x.options());
    for (int64_t bb = first; bb <= last; ++bb)  // (at::parallel_for inside a parallel region runs inline)
      stage_blocks(x.narrow(0, bb * nb, nb), nb, S, kh, kw, a.pad_h, a.pad_w, gh, gw, block_len,
                   own + (bb - first) * block_len);
    run_items(begin, end, own, first);
  });
  return out.permute({3, 0, 1, 2});
}

}  // namespace sparse_cpu
}  // namespace fastprune
