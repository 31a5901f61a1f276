// A caching allocator for large host (CPU) tensors.
//
// glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free, so a
// training step that allocates the same large activations every step page-faults (and zeroes) all of them again:
// on the benchmark sheet at 65,536 columns with activation checkpointing ~4-5 s of kernel time per 8 s step.
// `train.keep_host_memory` (runtime.keep_host_memory) avoids that by serving everything from one heap, but that heap
// fragments (+50 % peak memory). This allocator keeps each freed block of >= min_bytes whole, in free lists by size
// (rounded up to 2 MiB), and serves a request with the smallest cached block of at least its size and at most 1.25
// times it. A request that no cached block fits gets a new block, but first the cache gives back blocks (largest
// first) until the tensors alive plus the cache plus the new block stay within the most that was ever alive at once:
// the process holds no more than it would without the cache (up to the rounding), and since a training loop
// repeats its sizes step after step, nearly every request after the first step is served from the cache.
//
// Installed with c10::SetCPUAllocator; smaller requests go to the allocator it replaced. Blocks allocated before
// it was installed keep their own deleter. It is never destroyed (tensors may be freed during interpreter exit).
#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t ROUND = size_t(2) << 20;  // sizes rounded up to 2 MiB (one transparent huge page)
constexpr uint8_t PRIORITY = 1;             // above the default CPU allocator's 0

struct HostCache final : public c10::Allocator {
  c10::Allocator* base = nullptr;  // the allocator it replaced: small blocks
  size_t min_bytes = size_t(1) << 20;
  bool enabled = false;
  std::mutex mu;
  std::unordered_map<void*, size_t> live;     // block -> its rounded size
  std::multimap<size_t, void*> free_blocks;   // rounded size -> cached block
  size_t cached = 0, live_bytes = 0, max_live = 0;
  int64_t hits = 0, misses = 0, released = 0;

  static void release(void* p);

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes || !enabled) return base->allocate(n);
    size_t size = (n + ROUND - 1) / ROUND * ROUND;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> guard(mu);
      // the cached block that fits best: the exact size, else the smallest one up to 1.25 times the size
      auto it = free_blocks.lower_bound(size);
      if (it != free_blocks.end() && it->first <= size + size / 4) {
        p = it->second;
        size = it->first;
        free_blocks.erase(it);
        cached -= size;
        ++hits;
      } else {  // a new block: first give back cached ones (largest first) so that live + cached stays within the
                // most ever alive at once (what the process would hold without the cache)
        ++misses;
        while (live_bytes + cached + size > max_live && !free_blocks.empty()) {
          auto last = std::prev(free_blocks.end());
          std::free(last->second);
          cached -= last->first;
          free_blocks.erase(last);
          ++released;
        }
      }
    }
    if (p == nullptr && posix_memalign(&p, 64, size) != 0) p = nullptr;
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "host_cache: could not allocate ", size, " bytes");
    {
      std::lock_guard<std::mutex> guard(mu);
      live.emplace(p, size);
      live_bytes += size;
      max_live = std::max(max_live, live_bytes);
    }
    return {p, p, &HostCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &HostCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void drop_cached() {  // caller holds mu
    for (auto& kv : free_blocks) std::free(kv.second);
    free_blocks.clear();
    cached = 0;
  }
};

HostCache& cache() {
  static HostCache* instance = new HostCache();  // leaked on purpose: outlives every tensor
  return *instance;
}

void HostCache::release(void* p) {
  HostCache& c = cache();
  std::lock_guard<std::mutex> guard(c.mu);
  auto it = c.live.find(p);
  if (it == c.live.end()) {  // cannot happen: only blocks of this allocator carry this deleter
    std::free(p);
    return;
  }
  const size_t size = it->second;
  c.live.erase(it);
  c.live_bytes -= size;
  if (!c.enabled) {
    std::free(p);
    return;
  }
  c.free_blocks.emplace(size, p);
  c.cached += size;
}

}  // namespace

// Install the cache for CPU tensors of >= min_bytes (again: change min_bytes); returns whether it is the CPU
// allocator now (False if another allocator was installed with a higher priority).
bool host_cache_enable(int64_t min_bytes) {
  TORCH_CHECK(min_bytes >= 0, "min_bytes must be >= 0");
  HostCache& c = cache();
  {
    std::lock_guard<std::mutex> guard(c.mu);
    if (c.base == nullptr) c.base = c10::GetCPUAllocator();
    c.min_bytes = static_cast<size_t>(min_bytes);
    c.enabled = true;
  }
  if (c10::GetCPUAllocator() != &c) c10::SetCPUAllocator(&c, PRIORITY);
  return c10::GetCPUAllocator() == &c;
}

// Stop caching: free every cached block; new requests go to the replaced allocator, blocks still alive are freed
// when their tensors are.
void host_cache_disable() {
  HostCache& c = cache();
  std::lock_guard<std::mutex> guard(c.mu);
  c.enabled = false;
  c.drop_cached();
}

// {hits, misses, released, cached bytes, live bytes} of the large-block cache
std::vector<int64_t> host_cache_stats() {
  HostCache& c = cache();
  std::lock_guard<std::mutex> guard(c.mu);
  return {c.hits, c.misses, c.released, static_cast<int64_t>(c.cached), static_cast<int64_t>(c.live_bytes)};
}
