"""A block cache for XLA:CPU's per-execution buffers, so that a training step does not fault its memory in anew.

XLA:CPU allocates each execution's temporary buffer (1.30 GB for a MobileNetV2 + GRU training step at batch 16,
224 px) with `posix_memalign` on a thread-pool worker. Glibc serves a worker thread from a per-thread arena,
whose heaps cannot exceed 64 MiB, so it falls back to `mmap` and `munmap`s the buffer when the step ends: every
step faults 1.3 GB of fresh zeroed pages back in (317,876 minor faults per step, `getrusage`), 1.0–1.4 s of
system time in a 2.3 s step on a 2-core AVX2 EPYC. Glibc's own knobs do not fix it: `M_MMAP_MAX = 0` is
ignored for blocks larger than a thread arena's heap, and `M_ARENA_MAX = 1` (every thread on the `brk` heap)
removes the faults but the alignment slack fragments the heap, which grew by a whole buffer every ten or so steps
(2.2 → 6.2 GB in 40 steps).

`install()` compiles `leukax/csrc/block_cache.cc` (g++, at first use; `leukax.native_build`) and rewrites the
`posix_memalign` and `free` entries of jaxlib's ``libjax_common.so`` only: requests of at least ``min_mb``
(16 MiB) get page-aligned blocks from a reserved address range, which `free` puts back into a cache; the next
request of a similar size (capacity within [size, 2·size]) reuses the same, already-faulted pages. Every
other allocation, and every other library, keeps glibc. When the cached free blocks would exceed ``cap_gb``
(default: a quarter of physical memory), they are returned to the kernel.

`leukax/__init__.py` installs it at import unless ``LEUKAX_MALLOC=system`` (or the compiler is missing, or the
process is not Linux/x86-64/glibc; then nothing changes and `status()` says why). Measured effect:
results/benchmarks/README.md.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

MIN_MB = 16
_state: dict = {"installed": False, "reason": "not installed", "slots": 0, "lib": None}


def _default_cap_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 / 2**30
    except (ValueError, OSError):
        return 4.0


def install(min_mb: int = MIN_MB, cap_gb: float | None = None, cxx: str | None = None) -> bool:
    """Builds, loads and installs the block cache into jaxlib (once per process). Returns whether it is on."""
    if _state["installed"]:
        return True
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        _state["reason"] = f"not Linux x86-64 ({sys.platform}, {platform.machine()})"
        return False
    try:
        from jax._src.lib import xla_client  # noqa: F401  (loads libjax_common.so, whose GOT is patched)

        from leukax import native_build
        so = native_build.build(native_build.CSRC / "block_cache.cc", cxx or os.environ.get("CXX", "g++"),
                                libs=("-ldl",))
        lib = ctypes.CDLL(str(so))
        lib.leukax_block_cache_install.restype = ctypes.c_int
        lib.leukax_block_cache_install.argtypes = (ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64)
        cap = cap_gb if cap_gb is not None else float(os.environ.get("LEUKAX_BLOCK_CACHE_GB", _default_cap_gb()))
        slots = lib.leukax_block_cache_install(b"libjax_common", min_mb << 20, int(cap * 2**30))
    except Exception as e:  # noqa: BLE001  (any failure: leave glibc as it is)
        _state["reason"] = f"{type(e).__name__}: {e}"
        log.warning("leukax block cache not installed (XLA:CPU buffers stay on glibc): %s", _state["reason"])
        return False
    if slots <= 0:
        _state["reason"] = f"install returned {slots} (no posix_memalign/free slots in libjax_common)"
        log.warning("leukax block cache not installed: %s", _state["reason"])
        return False
    _state.update(installed=True, reason="", slots=slots, lib=lib, min_mb=min_mb, cap_gb=round(cap, 2))
    return True


def stats() -> dict:
    """Counters of the installed cache: hits (reused blocks), misses (new blocks), releases (blocks returned to
    the kernel), fallbacks (requests glibc served), free_bytes and live_bytes. {} when not installed."""
    if not _state["installed"]:
        return {}
    out = (ctypes.c_uint64 * 6)()
    _state["lib"].leukax_block_cache_stats(out)
    return dict(zip(("hits", "misses", "releases", "fallbacks", "free_bytes", "live_bytes"), map(int, out)))


def status() -> dict:
    """{"installed", "reason", "env"} (+ min_mb, cap_gb and `stats()` when installed), for provenance records."""
    out = {k: v for k, v in _state.items() if k != "lib"}
    out["env"] = os.environ.get("LEUKAX_MALLOC", "")
    out.update(stats())
    return out


def configure_from_env() -> None:
    """What `import leukax` runs: `install()` unless LEUKAX_MALLOC=system."""
    mode = os.environ.get("LEUKAX_MALLOC", "cache").strip().lower()
    if mode == "system":
        _state["reason"] = "LEUKAX_MALLOC=system"
        return
    if mode not in ("cache", ""):
        raise ValueError(f"LEUKAX_MALLOC must be 'cache' or 'system', got {mode!r}")
    install()
