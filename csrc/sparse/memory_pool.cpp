// Reused memory for the CPU sparse kernels' outputs and scratch. At batch 64 a layer's output is
// megabytes (16.8 MB for a 64-channel 32 x 32 map), and a fresh allocation that large is mapped
// anew by the C library: its first write then faults on every 4 KiB page (four thousand faults,
// 2-4 ms, as long as the layer's arithmetic at 99% sparsity; how often depends on the order earlier
// blocks were freed, so a network's time also swung by 1.5-2x between runs). Blocks of at least
// kPoolMinBytes therefore come from here: a block whose tensor dies goes back to a free list by its
// exact size and serves the next request of that size (a network asks for the same sizes call after
// call), at most kPoolMaxBytes kept (the oldest sizes freed first beyond that).
#include "sparse_common.h"

#include <cstdlib>
#include <list>
#include <thread>
#include <mutex>
#include <utility>

namespace fastprune {
namespace sparse_cpu {
namespace {

constexpr size_t kPoolMinBytes = size_t{1} << 20;
constexpr size_t kPoolMaxBytes = size_t{1} << 30;
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

void* take(size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    const std::thread::id me = std::this_thread::get_id();
    for (const bool own_only : {true, false})  // this thread's own blocks first, then any
      for (auto it = p.free_blocks.begin(); it != p.free_blocks.end(); ++it) {
        if (it->bytes != bytes || (own_only && it->owner != me)) continue;
        void* block = it->block;
        p.cached -= bytes;
        p.free_blocks.erase(it);
        return block;
      }
  }
  void* block = std::aligned_alloc(64, bytes);
  TORCH_CHECK(block != nullptr, "sparse_conv2d: out of memory (", bytes, " bytes)");
  return block;
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
  void* block = take(bytes);
  return at::from_blob(block, sizes, strides, [bytes](void* ptr) { give_back(ptr, bytes); }, options);
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
