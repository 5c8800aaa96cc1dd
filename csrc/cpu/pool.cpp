// guidance_kernels._cpu: a cache of large, page-aligned CPU blocks for the tensors the CPU path
// creates every step (dX of a backward: 50 MB at n = 256, p = 50,176). A fresh block that large
// comes from mmap, and the first write to each page faults (zeroing it in the kernel): measured
// ~40 ms of the 420 ms loss fwd+bwd of bench/cpu_targets.py on the 2-core VM. A tensor from
// pooled_empty hands its block back here when it dies; the next request of the same size class
// gets it with its pages already mapped. At most `limit` bytes are kept (least recently released
// first out); limit 0 keeps nothing. Python side: backends/cpu_pages.py; tests: tests/test_cpu_pages.py.
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <list>
#include <mutex>

#include "cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gk_cpu {
namespace {

constexpr size_t kGranule = size_t{2} << 20;  // 2 MiB: the size classes and the alignment (a huge page)

struct Block {
  void* ptr;
  size_t bytes;
};

struct Pool {
  std::mutex mu;
  std::list<Block> blocks;  // front: most recently released
  size_t cached = 0, limit = 0, hits = 0, misses = 0;
};

// never destroyed: a tensor freed during interpreter shutdown still hands its block back safely
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void* raw_alloc(size_t bytes) {
  void* p = nullptr;
#if defined(_WIN32)
  p = _aligned_malloc(bytes, kGranule);
#else
  if (posix_memalign(&p, kGranule, bytes) != 0) p = nullptr;
#endif
  TORCH_CHECK(p != nullptr, "guidance_kernels._cpu.pooled_empty: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: a refusal changes nothing
#endif
  return p;
}

void raw_free(void* p) {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

void release(void* ptr, size_t bytes) {
  std::vector<void*> drop;
  {
    Pool& s = pool();
    std::lock_guard<std::mutex> g(s.mu);
    if (bytes > s.limit) {
      drop.push_back(ptr);
    } else {
      while (s.cached + bytes > s.limit) {
        drop.push_back(s.blocks.back().ptr);
        s.cached -= s.blocks.back().bytes;
        s.blocks.pop_back();
      }
      s.blocks.push_front({ptr, bytes});
      s.cached += bytes;
    }
  }
  for (void* p : drop) raw_free(p);  // outside the lock
}

void* acquire(size_t bytes) {
  {
    Pool& s = pool();
    std::lock_guard<std::mutex> g(s.mu);
    for (auto it = s.blocks.begin(); it != s.blocks.end(); ++it)
      if (it->bytes == bytes) {
        void* p = it->ptr;
        s.cached -= bytes;
        s.blocks.erase(it);
        ++s.hits;
        return p;
      }
    ++s.misses;
  }
  return raw_alloc(bytes);
}

}  // namespace

at::Tensor pooled_empty(const std::vector<int64_t>& sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t d : sizes) {
    TORCH_CHECK(d >= 0, "guidance_kernels._cpu.pooled_empty: negative size in ", c10::IntArrayRef(sizes));
    numel *= d;
  }
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  const size_t bytes = std::max<size_t>(1, (nbytes + kGranule - 1) / kGranule) * kGranule;
  void* p = acquire(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { release(q, bytes); }, at::TensorOptions().dtype(dtype));
}

void pool_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "guidance_kernels._cpu.pool_set_limit: limit must be >= 0, got ", bytes);
  std::vector<void*> drop;
  {
    Pool& s = pool();
    std::lock_guard<std::mutex> g(s.mu);
    s.limit = static_cast<size_t>(bytes);
    while (s.cached > s.limit) {
      drop.push_back(s.blocks.back().ptr);
      s.cached -= s.blocks.back().bytes;
      s.blocks.pop_back();
    }
  }
  for (void* p : drop) raw_free(p);
}

void pool_trim() {
  std::list<Block> drop;
  {
    Pool& s = pool();
    std::lock_guard<std::mutex> g(s.mu);
    drop.swap(s.blocks);
    s.cached = 0;
  }
  for (const Block& b : drop) raw_free(b.ptr);
}

std::vector<int64_t> pool_stats() {
  Pool& s = pool();
  std::lock_guard<std::mutex> g(s.mu);
  return {static_cast<int64_t>(s.cached), static_cast<int64_t>(s.blocks.size()), static_cast<int64_t>(s.limit),
          static_cast<int64_t>(s.hits), static_cast<int64_t>(s.misses)};
}

}  // namespace gk_cpu
