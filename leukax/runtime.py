"""Process settings that belong to programs, never to `import leukax`: the XLA:CPU flags, and the allocator record.

`apply_xla_cpu_flags()` is called by the programs' entry points (`experiments.common.main`, and so every
experiment and benchmark; `leukax.predict.run`) before their first JAX computation. XLA reads XLA_FLAGS when
a backend starts, and JAX starts its backends lazily (first computation, `jax.devices()`), so setting the
variable after `import jax` but before any computation works (tests/test_runtime.py checks it). Nothing in
the library calls it; a library user who wants the same settings calls it, or sets XLA_FLAGS, first.

The flags (`XLA_CPU_FLAGS`):
- ``--xla_cpu_enable_concurrency_optimized_scheduler=false``: XLA:CPU's concurrency-optimised scheduler
  deadlocks (every thread idle, the result never ready) on the compiled head-mode trainer once the ensemble's
  while-loop body is large enough (5 members × GRU(256), jaxlib 0.10.2; 4 members ran). `leukax.train.compiled`
  warns once per process when it runs on CPU with that scheduler on (`warn_if_deadlock_prone`).
- ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``: k×k convolutions on Eigen instead of
  YNNPACK, whose backward convolutions ran 2× slower (one 3×3 conv, 96 channels, 73², batch 8, one core:
  forward + backward 552 ms with YNNPACK, 275 ms without, PyTorch 302 ms). One core, batch 8: InceptionV3
  training 1.14 → 1.98 img/s, inference 4.52 → 6.85; EfficientNet-B0 training 8.85 → 13.56; MobileNetV2 (whose
  only k×k convolution is its stem) 19.9 → 19.0 (benchmarks/finetune_vs_torch.py). Dots stay on YNNPACK.

Overriding: a flag the user already named in XLA_FLAGS keeps the user's value (e.g.
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true``).

`allocator()` says which malloc the process runs with (read from /proc/self/maps and the environment), for
the provenance of every timing: a preloaded allocator serves the whole process, JAX and PyTorch alike.
"""
from __future__ import annotations

import itertools
import os
import pathlib
import re
import warnings

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
XLA_CPU_FLAGS = ((SCHEDULER_FLAG, "false"),
                 ("--xla_cpu_experimental_ynn_fusion_type", "-individual_convolution"))
ALLOCATOR_ENV = ("LD_PRELOAD", "MALLOC_CONF", "TCMALLOC_RELEASE_RATE", "GLIBC_TUNABLES")

_warned = {"scheduler": False}


def flag_value(flag: str, xla_flags: str) -> str | None:
    """The value `xla_flags` gives `flag` (its last occurrence; "true" for a bare flag), None if not named."""
    found = re.findall(rf"(?:^|\s){re.escape(flag)}(?:=(\S*))?(?=\s|$)", xla_flags)
    return None if not found else (found[-1] or "true")


def apply_xla_cpu_flags(environ=None) -> str:
    """Appends each of `XLA_CPU_FLAGS` that XLA_FLAGS does not name yet to XLA_FLAGS (in `environ`, default
    os.environ) and returns the new XLA_FLAGS. Call before the first JAX computation (a backend already
    started keeps the flags it started with: then this warns)."""
    environ = os.environ if environ is None else environ
    current = environ.get("XLA_FLAGS", "")
    added = [f"{flag}={value}" for flag, value in XLA_CPU_FLAGS if flag_value(flag, current) is None]
    if added:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
        from jax._src import xla_bridge
        if xla_bridge.backends_are_initialized():
            warnings.warn(f"leukax.runtime.apply_xla_cpu_flags: a JAX backend has already started, so {added} "
                          "take effect only in a new process; call it before the first JAX computation",
                          stacklevel=2)
    return environ.get("XLA_FLAGS", "")


def deadlock_prone(xla_flags: str | None = None) -> bool:
    """True when XLA_FLAGS leaves XLA:CPU's concurrency-optimised scheduler on (its default in jaxlib 0.10.2)."""
    value = flag_value(SCHEDULER_FLAG, os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags)
    return value is None or value.lower() not in ("false", "0")


def warn_if_deadlock_prone() -> bool:
    """Once per process: a UserWarning naming the flag when the default backend is CPU and the deadlock-prone
    scheduler is on. Returns whether it warned now. Called by `leukax.train.compiled.make_train`."""
    if _warned["scheduler"] or not deadlock_prone():
        return False
    import jax
    if jax.default_backend() != "cpu":
        return False
    _warned["scheduler"] = True
    warnings.warn(
        f"XLA:CPU's concurrency-optimised scheduler is on: the compiled head-mode trainer can deadlock with it "
        f"(5 members x GRU(256), jaxlib 0.10.2). Start the process with XLA_FLAGS={SCHEDULER_FLAG}=false, or "
        "call leukax.runtime.apply_xla_cpu_flags() before the first JAX computation (the experiments do).",
        UserWarning, stacklevel=3)
    return True


def allocator(maps_path: str = "/proc/self/maps") -> dict:
    """Which malloc serves this process: {"name": "jemalloc" | "tcmalloc" | "glibc", "library": the mapped
    file or None, and each of `ALLOCATOR_ENV` that is set}. A library is found in the process's memory
    maps, so a preloaded one is seen whichever way it was loaded."""
    libs = set()
    try:
        for line in pathlib.Path(maps_path).read_text().splitlines():
            path = line.split()[-1] if line.split() else ""
            if re.search(r"lib(jemalloc|tcmalloc)[^/]*\.so", path):
                libs.add(path)
    except OSError:
        pass
    name, library = "glibc", None
    for kind in ("jemalloc", "tcmalloc"):
        hits = sorted(p for p in libs if f"lib{kind}" in p)
        if hits:
            name, library = kind, hits[0]
            break
    return {"name": name, "library": library, **{k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}}


_BARRIERS = itertools.count()


def await_all_processes(timeout_s: int = 3600) -> None:
    """Blocks until every process of a `jax.distributed` run arrives here (the coordination service's barrier,
    as jax's own checkpoint serialisation uses; every process must call it the same number of times). Gloo
    gives processes only 30 s to meet at a program's first collective; processes that compile or extract
    features at different speeds arrive further apart than that. One process: returns at once."""
    import jax
    if jax.process_count() == 1:
        return
    from jax._src import distributed
    distributed.global_state.client.wait_at_barrier(f"leukax_{next(_BARRIERS)}", timeout_in_ms=timeout_s * 1000)
