// A cache of large, page-aligned blocks for XLA:CPU's per-execution buffers (leukax/cpu_memory.py).
//
// XLA:CPU allocates each execution's temporary buffer (1.3 GB for a MobileNetV2 + GRU training step at batch
// 16) with posix_memalign on a worker thread; glibc serves it with a fresh mmap and munmaps it at the end of the
// step, so every step faults all its pages back in (≈318,000 minor faults, 1–1.4 s of system time per 2.3 s
// step on a 2-core EPYC). This file keeps such blocks instead: `install` rewrites the GOT entries of
// posix_memalign and free in ONE shared object (jaxlib's libjax_common.so) so that
//   - posix_memalign(size ≥ min_bytes, alignment ≤ page) returns a block from a reserved address range: a free
//     cached block whose capacity is in [size, 2·size] (best fit), else a new one carved from the range;
//   - free(p) returns p to the cache when p lies in the range, else calls glibc's free.
// Nothing else in the process is touched: other libraries keep glibc's malloc and free, and pointers that
// XLA got from glibc before `install` are still freed by glibc (they are outside the range).
// When the cached free bytes would exceed cap_bytes, the free blocks are given back to the kernel
// (madvise(MADV_DONTNEED)) and forgotten; their address space is not reused (the range is 1 TiB of PROT_NONE,
// MAP_NORESERVE reservation; carving stops, and glibc takes over, if it runs out).
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

using PosixMemalignFn = int (*)(void**, size_t, size_t);
using FreeFn = void (*)(void*);

PosixMemalignFn g_real_memalign = nullptr;
FreeFn g_real_free = nullptr;

constexpr size_t kReserve = size_t{1} << 40;  // 1 TiB of address space
constexpr size_t kGranule = size_t{2} << 20;  // blocks are multiples of 2 MiB
std::atomic<uintptr_t> g_lo{0}, g_hi{0};       // the reserved range [lo, hi)
size_t g_min_bytes = size_t{16} << 20;
size_t g_page = 4096;  // sysconf(_SC_PAGESIZE), read once by install
size_t g_cap_bytes = size_t{8} << 30;

struct Block {
  char* p;
  size_t cap;
  bool live;
};

std::mutex g_mu;
std::vector<Block>* g_blocks = nullptr;  // every block still known (live or free)
size_t g_next = 0;                       // bump offset into the range
uint64_t g_hits = 0, g_misses = 0, g_releases = 0, g_fallbacks = 0;
size_t g_free_bytes = 0, g_live_bytes = 0;

inline bool in_range(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return a >= g_lo.load(std::memory_order_relaxed) && a < g_hi.load(std::memory_order_relaxed);
}

void* cache_alloc(size_t size) {
  std::lock_guard<std::mutex> lk(g_mu);
  Block* best = nullptr;
  for (Block& b : *g_blocks)
    if (!b.live && b.cap >= size && b.cap <= 2 * size && (best == nullptr || b.cap < best->cap)) best = &b;
  if (best != nullptr) {
    best->live = true;
    g_free_bytes -= best->cap;
    g_live_bytes += best->cap;
    ++g_hits;
    return best->p;
  }
  const size_t cap = (size + kGranule - 1) / kGranule * kGranule;
  if (g_free_bytes + cap > g_cap_bytes) {  // give the free blocks back to the kernel and forget them
    std::vector<Block> keep;
    for (Block& b : *g_blocks) {
      if (b.live) {
        keep.push_back(b);
      } else {
        madvise(b.p, b.cap, MADV_DONTNEED);
        mprotect(b.p, b.cap, PROT_NONE);
        ++g_releases;
      }
    }
    g_blocks->swap(keep);
    g_free_bytes = 0;
  }
  if (g_next + cap > kReserve) return nullptr;
  char* p = reinterpret_cast<char*>(g_lo.load()) + g_next;
  if (mprotect(p, cap, PROT_READ | PROT_WRITE) != 0) return nullptr;
  g_next += cap;
  g_blocks->push_back({p, cap, true});
  g_live_bytes += cap;
  ++g_misses;
  return p;
}

void cache_free(void* p) {
  std::lock_guard<std::mutex> lk(g_mu);
  for (Block& b : *g_blocks)
    if (b.p == p && b.live) {
      b.live = false;
      g_live_bytes -= b.cap;
      g_free_bytes += b.cap;
      return;
    }
}

int hooked_posix_memalign(void** out, size_t alignment, size_t size) {
  if (size >= g_min_bytes && alignment <= g_page) {
    if (void* p = cache_alloc(size)) {
      *out = p;
      return 0;
    }
    std::lock_guard<std::mutex> lk(g_mu);
    ++g_fallbacks;
  }
  return g_real_memalign(out, alignment, size);
}

void hooked_free(void* p) {
  if (p != nullptr && in_range(p)) return cache_free(p);
  g_real_free(p);
}

struct PatchRequest {
  const char* lib_substring;
  int patched;
};

// Rewrites the GOT slots (JUMP_SLOT and GLOB_DAT relocations) of posix_memalign and free in objects whose path
// contains lib_substring.
int patch_object(struct dl_phdr_info* info, size_t, void* data) {
  auto* req = static_cast<PatchRequest*>(data);
  if (info->dlpi_name == nullptr || std::strstr(info->dlpi_name, req->lib_substring) == nullptr) return 0;
  const ElfW(Addr) base = info->dlpi_addr;
  const ElfW(Dyn)* dyn = nullptr;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_DYNAMIC)
      dyn = reinterpret_cast<const ElfW(Dyn)*>(base + info->dlpi_phdr[i].p_vaddr);
  if (dyn == nullptr) return 0;
  auto addr = [base](ElfW(Addr) a) { return a < base ? a + base : a; };  // glibc relocates most d_ptr in place
  const ElfW(Sym)* symtab = nullptr;
  const char* strtab = nullptr;
  const ElfW(Rela)*jmprel = nullptr, *rela = nullptr;
  size_t jmprel_size = 0, rela_size = 0;
  for (const ElfW(Dyn)* d = dyn; d->d_tag != DT_NULL; ++d) {
    switch (d->d_tag) {
      case DT_SYMTAB: symtab = reinterpret_cast<const ElfW(Sym)*>(addr(d->d_un.d_ptr)); break;
      case DT_STRTAB: strtab = reinterpret_cast<const char*>(addr(d->d_un.d_ptr)); break;
      case DT_JMPREL: jmprel = reinterpret_cast<const ElfW(Rela)*>(addr(d->d_un.d_ptr)); break;
      case DT_PLTRELSZ: jmprel_size = d->d_un.d_val; break;
      case DT_RELA: rela = reinterpret_cast<const ElfW(Rela)*>(addr(d->d_un.d_ptr)); break;
      case DT_RELASZ: rela_size = d->d_un.d_val; break;
      default: break;
    }
  }
  if (symtab == nullptr || strtab == nullptr) return 0;
  auto patch_table = [&](const ElfW(Rela)* table, size_t bytes) {
    if (table == nullptr) return;
    for (size_t i = 0; i < bytes / sizeof(ElfW(Rela)); ++i) {
      const auto type = ELF64_R_TYPE(table[i].r_info);
      if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT) continue;
      const char* name = strtab + symtab[ELF64_R_SYM(table[i].r_info)].st_name;
      void* target = nullptr;
      if (std::strcmp(name, "posix_memalign") == 0) target = reinterpret_cast<void*>(&hooked_posix_memalign);
      else if (std::strcmp(name, "free") == 0) target = reinterpret_cast<void*>(&hooked_free);
      if (target == nullptr) continue;
      auto* slot = reinterpret_cast<void**>(base + table[i].r_offset);
      auto* pg = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(slot) & ~static_cast<uintptr_t>(g_page - 1));
      if (mprotect(pg, g_page, PROT_READ | PROT_WRITE) != 0) continue;
      __atomic_store_n(slot, target, __ATOMIC_SEQ_CST);
      ++req->patched;
    }
  };
  patch_table(jmprel, jmprel_size);
  patch_table(rela, rela_size);
  return 0;
}

}  // namespace

extern "C" {

// Reserves the range and patches the objects whose path contains lib_substring. Returns the number of GOT
// slots rewritten (0: nothing found; the caller treats that as "not installed"), or -1 if the range could not
// be reserved. Call once per process.
int leukax_block_cache_install(const char* lib_substring, uint64_t min_bytes, uint64_t cap_bytes) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_blocks != nullptr) return -2;  // already installed
  g_real_memalign = reinterpret_cast<PosixMemalignFn>(dlsym(RTLD_DEFAULT, "posix_memalign"));
  g_real_free = reinterpret_cast<FreeFn>(dlsym(RTLD_DEFAULT, "free"));
  if (g_real_memalign == nullptr || g_real_free == nullptr) return -1;
  void* lo = mmap(nullptr, kReserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (lo == MAP_FAILED) return -1;
  g_blocks = new std::vector<Block>();
  g_min_bytes = min_bytes;
  g_cap_bytes = cap_bytes;
  g_page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  g_lo.store(reinterpret_cast<uintptr_t>(lo));
  g_hi.store(reinterpret_cast<uintptr_t>(lo) + kReserve);
  PatchRequest req{lib_substring, 0};
  dl_iterate_phdr(&patch_object, &req);
  return req.patched;
}

// hits, misses (new blocks), releases, fallbacks to glibc, cached free bytes, live bytes.
void leukax_block_cache_stats(uint64_t* out) {
  std::lock_guard<std::mutex> lk(g_mu);
  out[0] = g_hits;
  out[1] = g_misses;
  out[2] = g_releases;
  out[3] = g_fallbacks;
  out[4] = g_free_bytes;
  out[5] = g_live_bytes;
}

}  // extern "C"
