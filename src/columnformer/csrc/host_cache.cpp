// A caching allocator for large host (CPU) tensors.
//
// glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free, so a
// training step that allocates the same large activations every step page-faults (and zeroes) all of them again:
// on the benchmark sheet at 65,536 columns with activation checkpointing ~4-5 s of kernel time per 8 s step.
// `train.keep_host_memory` (runtime.keep_host_memory) avoids that by serving everything from one heap, but that heap
// fragments (+50 % peak memory). This allocator keeps each freed block of >= min_bytes whole, in free lists by size
// (rounded up to 2 MiB), and serves a request with the smallest cached block of at least its size and at most 1.25
// times it (a hit).
//
// A request that no cached block fits gets a new block, built from the pages of cached blocks: they are moved into
// it with mremap (page-table entries change owner; nothing is copied, faulted or zeroed), whole cached blocks first
// and then the end of one larger block, which shrinks. Only what the cache cannot cover is new memory. So the tensors
// alive plus the cache never exceed the most that was ever alive at once (the process holds no more than it would
// without the cache, up to the rounding), and once a training loop has run one step, whose sizes it repeats, no
// request faults memory in again, whatever the order of its sizes.
//
// Every moved piece is a memory mapping of its own unless the kernel can merge it with its neighbour, and a piece cut
// from a larger block splits one of its mappings; a process may hold only vm.max_map_count mappings (65,530 by
// default). So every 16 misses the cache counts the process's mappings (/proc/self/maps) and, above a limit (half
// of vm.max_map_count unless set), gives back every cached block (all their mappings with them) and serves misses
// the old way until the count is below half the limit: fresh blocks, cached ones given back whole as the footprint
// rule needs.
//
// Blocks are 2 MiB aligned, so a moved piece keeps its transparent huge pages; with `huge_pages` new blocks are
// advised to them (MADV_HUGEPAGE; what glibc does for its own blocks under GLIBC_TUNABLES=glibc.malloc.hugetlb=1).
// Installed with c10::SetCPUAllocator; smaller requests go to the allocator it replaced. Blocks allocated before
// it was installed keep their own deleter. It is never destroyed (tensors may be freed during interpreter exit).
// Linux only (mremap); elsewhere host_cache_enable returns false.
#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
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
  bool enabled = false, huge_pages = false;
  std::mutex mu;
  std::unordered_map<void*, size_t> live;     // block -> its rounded size
  std::multimap<size_t, void*> free_blocks;   // rounded size -> cached block
  size_t cached = 0, live_bytes = 0, max_live = 0;
  int64_t hits = 0, misses = 0, moved_bytes = 0, fresh_bytes = 0;
  int64_t max_mappings = 32765, mappings = 0;  // the limit on the process's memory mappings, the last count
  bool compact = false;                        // serving misses without moving pages (too many mappings)

  static int64_t count_mappings() {  // lines of /proc/self/maps (-1 if unreadable)
    FILE* f = std::fopen("/proc/self/maps", "r");
    if (f == nullptr) return -1;
    int64_t lines = 0;
    char buf[4096];  // small: this runs on whichever thread allocates
    for (size_t got; (got = std::fread(buf, 1, sizeof buf, f)) > 0;)
      lines += std::count(buf, buf + got, '\n');
    std::fclose(f);
    return lines;
  }

  static void release(void* p);

  // a new anonymous mapping of `size` bytes, 2 MiB aligned; null if none
  void* map(size_t size) {
    void* raw = mmap(nullptr, size + ROUND, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t r = reinterpret_cast<uintptr_t>(raw), a = (r + ROUND - 1) / ROUND * ROUND;
    if (a > r) munmap(raw, a - r);  // trim to the alignment
    munmap(reinterpret_cast<void*>(a + size), r + ROUND - a);
    void* p = reinterpret_cast<void*>(a);
    if (huge_pages) madvise(p, size, MADV_HUGEPAGE);
    return p;
  }

  // take cached block `it` out of the free lists (caller holds mu): (pointer, its size)
  std::pair<void*, size_t> take(std::multimap<size_t, void*>::iterator it) {
    const std::pair<void*, size_t> b{it->second, it->first};
    free_blocks.erase(it);
    cached -= b.second;
    return b;
  }

  // fill new block p (size bytes) with the pages of cached blocks: whole blocks first (the largest that still fits),
  // then the end of the smallest larger one, so at most one cached block is cut per request (caller holds mu)
  void fill_from_cache(char* p, size_t size) {
    size_t done = 0;
    while (done < size && !free_blocks.empty()) {
      auto it = free_blocks.upper_bound(size - done);  // past the largest block that fits whole
      auto [donor, d] = take(it != free_blocks.begin() ? std::prev(it) : it);
      const size_t m = std::min(d, size - done);
      char* src = static_cast<char*>(donor) + d - m;
      // move the donor's last m bytes over p's part [done, done + m) (which mremap unmaps first)
      if (mremap(src, m, m, MREMAP_MAYMOVE | MREMAP_FIXED, p + done) == MAP_FAILED) {
        munmap(donor, d);  // could not move (e.g. the range spans two mappings): give the donor back
        continue;
      }
      done += m;
      moved_bytes += static_cast<int64_t>(m);
      if (d > m) {  // the donor's rest stays cached
        free_blocks.emplace(d - m, donor);
        cached += d - m;
      }
    }
    fresh_bytes += static_cast<int64_t>(size - done);
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes || !enabled) return base->allocate(n);
    size_t size = (n + ROUND - 1) / ROUND * ROUND;
    void* p = nullptr;
    std::lock_guard<std::mutex> guard(mu);
    // the cached block that fits best: the exact size, else the smallest one up to 1.25 times the size
    auto it = free_blocks.lower_bound(size);
    if (it != free_blocks.end() && it->first <= size + size / 4) {
      std::tie(p, size) = take(it);
      ++hits;
    } else {
      if (++misses % 16 == 0 && (mappings = count_mappings()) >= 0) {
        if (mappings > max_mappings && !compact) drop_cached();  // the cached blocks' mappings go at once
        compact = mappings > max_mappings || (compact && mappings > max_mappings / 2);
      }
      if (compact)  // too many mappings: give cached blocks back whole (largest first) until the new one fits the rule
        while (live_bytes + cached + size > max_live && !free_blocks.empty()) {
          auto [q, d] = take(std::prev(free_blocks.end()));
          munmap(q, d);
        }
      p = map(size);
      TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "host_cache: could not allocate ", size, " bytes");
      if (compact) fresh_bytes += static_cast<int64_t>(size);
      else fill_from_cache(static_cast<char*>(p), size);
    }
    live.emplace(p, size);
    live_bytes += size;
    max_live = std::max(max_live, live_bytes);
    return {p, p, &HostCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &HostCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void drop_cached() {  // caller holds mu
    for (auto& kv : free_blocks) munmap(kv.second, kv.first);
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
  if (it == c.live.end()) {  // a small block of the replaced allocator freed through raw_deleter (raw_allocate)
    c10::DeleterFnPtr base_free = c.base == nullptr ? nullptr : c.base->raw_deleter();
    if (base_free != nullptr) base_free(p); else std::free(p);
    return;
  }
  const size_t size = it->second;
  c.live.erase(it);
  c.live_bytes -= size;
  if (!c.enabled) {
    munmap(p, size);
    return;
  }
  c.free_blocks.emplace(size, p);
  c.cached += size;
}

}  // namespace

// Install the cache for CPU tensors of >= min_bytes (again: change the settings); huge_pages: advise new blocks to
// transparent huge pages. Returns whether it is the CPU allocator now (False if another allocator was installed
// with a higher priority).
bool host_cache_enable(int64_t min_bytes, bool huge_pages, int64_t max_mappings) {
  TORCH_CHECK(min_bytes >= 0, "min_bytes must be >= 0");
  HostCache& c = cache();
  if (max_mappings <= 0) {  // half the system's limit on memory mappings per process
    int64_t limit = 65530;
    if (FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r")) {
      long long v = 0;
      if (std::fscanf(f, "%lld", &v) == 1 && v > 0) limit = v;
      std::fclose(f);
    }
    max_mappings = limit / 2;
  }
  {
    std::lock_guard<std::mutex> guard(c.mu);
    if (c.base == nullptr) c.base = c10::GetCPUAllocator();
    c.min_bytes = static_cast<size_t>(min_bytes);
    c.huge_pages = huge_pages;
    c.max_mappings = max_mappings;
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

// {hits, misses, bytes moved from cached blocks, new bytes, cached bytes, live bytes, the process's memory mappings
// at the last count, their limit}
std::vector<int64_t> host_cache_stats() {
  HostCache& c = cache();
  std::lock_guard<std::mutex> guard(c.mu);
  return {c.hits, c.misses, c.moved_bytes, c.fresh_bytes, static_cast<int64_t>(c.cached),
          static_cast<int64_t>(c.live_bytes), c.mappings, c.max_mappings};
}

#else  // not Linux: no cache

bool host_cache_enable(int64_t, bool, int64_t) { return false; }
void host_cache_disable() {}
std::vector<int64_t> host_cache_stats() { return {0, 0, 0, 0, 0, 0, 0, 0}; }

#endif
