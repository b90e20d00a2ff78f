// Reused memory for the CPU sparse kernels' outputs and scratch. At batch 64 a layer's output is
// megabytes (16.8 MB for a 64-channel 32 x 32 map), and a fresh allocation that large is mapped
// anew by the C library: its first write then faults on every 4 KiB page (four thousand faults,
// 2-4 ms, as long as the layer's arithmetic at 99% sparsity; how often depends on the order earlier
// blocks were freed, so a network's time also swung by 1.5-2x between runs). Blocks of at least
// kPoolMinBytes therefore come from here: a block whose tensor dies goes back to a free list, at most
// kPoolMaxBytes kept (the oldest freed first beyond that).
// A request takes the most recently returned block large enough (up to kMostWaste times its size),
// not one of its exact size: within a network pass each size is asked for again only a pass later,
// when its blocks' lines have long left the caches, while the block a tensor gave back a layer ago
// (the input the last layer read, perhaps larger) still has lines in L2 / L3, and an output written
// into cold memory first reads every line for ownership. ResNet-18 at 90%, batch 64, micro-batches
// of 16 on Zen 4, alternating processes on one plan: 45.5 -> 44.1 ms (median of five), 95% 32.9 ->
// 31.4, VGG16 at 90% 23.9 -> 22.8 (bench/NOTES.md, session 18).
#include "sparse_common.h"

#include <cstdlib>
#include <list>
#include <thread>
#include <mutex>
#include <utility>

namespace fastprune {
namespace sparse_cpu {
namespace {

// (512 KiB: ResNet-18's 512 x 4 x 4 activations of 16 images; a batch-1 activation stays below it)
constexpr size_t kPoolMinBytes = size_t{512} << 10;
constexpr size_t kPoolMaxBytes = size_t{1} << 30;
constexpr size_t kMostWaste = 8;  // a block serves requests down to an eighth of its size
constexpr size_t kGranule = size_t{64} << 10;  // sizes rounded up to 64 KiB, so near sizes share blocks

// A free block, with the thread that gave it back: a thread is given its own blocks first, whose lines
// its cache may still hold, rather than lines the other core wrote (concurrent micro-batches, one
// network a thread: ResNet-18 at 90-95%, batch 64, Zen 4, 51.2-51.4 -> 47.4-47.7 ms and 37.8 -> 33.8;
// bench/NOTES.md, session 15).
struct FreeBlock {
  size_t bytes;
  void* block;
  std::thread::id owner;
};

struct Pool {
  std::mutex mutex;
  std::list<FreeBlock> free_blocks;  // most recently returned first
  size_t cached = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may die during interpreter shutdown
  return *p;
}

void give_back(void* block, size_t bytes) {
  Pool& p = pool();
  std::list<FreeBlock> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    p.free_blocks.push_front({bytes, block, std::this_thread::get_id()});
    p.cached += bytes;
    while (p.cached > kPoolMaxBytes) {
      p.cached -= p.free_blocks.back().bytes;
      evicted.splice(evicted.begin(), p.free_blocks, std::prev(p.free_blocks.end()));
    }
  }
  for (const FreeBlock& f : evicted) std::free(f.block);
}

// A block of at least `bytes` (at most kMostWaste times as large), and its size: the most recently
// returned such block of this thread, else of any thread, else a new one.
std::pair<void*, size_t> take(size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    const std::thread::id me = std::this_thread::get_id();
    for (const bool own_only : {true, false})  // this thread's own blocks first, then any
      for (auto it = p.free_blocks.begin(); it != p.free_blocks.end(); ++it) {
        if (it->bytes < bytes || it->bytes > bytes * kMostWaste || (own_only && it->owner != me)) continue;
        const std::pair<void*, size_t> block{it->block, it->bytes};
        p.cached -= it->bytes;
        p.free_blocks.erase(it);
        return block;
      }
  }
  void* block = std::aligned_alloc(64, bytes);
  TORCH_CHECK(block != nullptr, "sparse_conv2d: out of memory (", bytes, " bytes)");
  return {block, bytes};
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "pooled_empty: CPU tensors only");
  int64_t extent = 1;  // elements from the first to one past the last
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) return at::empty_strided(sizes, strides, options);
    extent += (sizes[d] - 1) * strides[d];
  }
  const size_t nbytes = static_cast<size_t>(extent) * options.dtype().itemsize();
  if (nbytes < kPoolMinBytes) return at::empty_strided(sizes, strides, options);
  const size_t bytes = (nbytes + kGranule - 1) / kGranule * kGranule;
  const std::pair<void*, size_t> block = take(bytes);  // (memory, its size: perhaps more than asked)
  return at::from_blob(block.first, sizes, strides, [held = block.second](void* ptr) { give_back(ptr, held); },
                       options);
}

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  std::vector<int64_t> strides(sizes.size(), 1);
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d)
    strides[d] = strides[d + 1] * std::max<int64_t>(sizes[d + 1], 1);
  return pooled_empty(sizes, strides, options);
}

int64_t release_pooled_memory() {
  Pool& p = pool();
  std::list<FreeBlock> all;
  int64_t released = 0;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    all.swap(p.free_blocks);
    released = static_cast<int64_t>(p.cached);
    p.cached = 0;
  }
  for (const FreeBlock& f : all) std::free(f.block);
  return released;
}

}  // namespace sparse_cpu
}  // namespace fastprune
