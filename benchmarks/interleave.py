"""Shared by the framework-comparison benchmarks: pinning, interleaved timing, machine record, tables.

Both frameworks run in ONE process and their steps alternate (jax, torch, jax, torch, ...), so a change
in the machine's load hits both; each figure is the median over repeats, with min and max, and the
ratio is the median of the per-round ratios. On a shared machine `cores=1` (process pinned to one core,
torch on one thread) is the steady comparison: with 2 threads each, PyTorch's OpenMP barriers stall
whenever another job takes a core, so its speed swings with the load far more than XLA's.
"""
from __future__ import annotations

import os
import pathlib
import platform
import statistics
import time

from leukax import records


def pin(cores: int) -> list[int]:
    """Pins this process to its first `cores` allowed CPUs (0: leave as is). Returns the CPUs in use.

    Call before importing jax/torch so that their thread pools start on these CPUs only."""
    allowed = sorted(os.sched_getaffinity(0))
    if cores:
        os.sched_setaffinity(0, allowed[:cores])
    return sorted(os.sched_getaffinity(0))


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vector_isa() -> str:
    """The widest x86 vector extensions the CPU reports ("avx512f+avx512_bf16", "avx2", ...), or the machine name.

    Ratios to PyTorch move with it: the same "AMD EPYC" name covered an AVX-512 machine (PyTorch on its
    AVX512 kernels) and an AVX2-only one in this project's tables."""
    from leukax.native.build import cpu_flags
    line = cpu_flags()
    if not line.startswith("flags"):
        return platform.machine()
    flags = set(line.split(":", 1)[1].split())
    wide = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return "+".join(wide) if wide else ("avx2" if "avx2" in flags else "sse")


def machine() -> dict:
    """CPU model, vector ISA, CPU counts, 1/5/15-min load average now, platform, the allocator this process
    runs with (`leukax.runtime.allocator`: both frameworks share it) and its peak resident memory so far (GB)."""
    import resource

    from leukax import runtime
    return {"cpu_model": cpu_model(), "isa": vector_isa(), "cpu_count": os.cpu_count(),
            "cpus_used": sorted(os.sched_getaffinity(0)),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
            "malloc": runtime.allocator(),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def allocator_note(a: dict) -> str:
    """'jemalloc (MALLOC_CONF=...)', 'glibc', ...: the allocator and the settings it ran with."""
    env = [f"{k}={a[k]}" for k in ("MALLOC_CONF", "TCMALLOC_RELEASE_RATE", "GLIBC_TUNABLES") if a.get(k)]
    return a.get("name", "?") + (f" ({', '.join(env)})" if env else " (default settings)")


def memory_note(m: dict) -> str:
    """One phrase for a table's device line: the allocator of the process and the peak RSS of the whole run."""
    return (f"malloc: {allocator_note(m.get('malloc', {}))} for both frameworks (one process); "
            f"peak RSS of the process {m.get('peak_rss_gb', '?')} GB")


def interleaved(steps: dict, repeats: int, warmup: int) -> dict:
    """steps: name -> zero-argument callable that runs one step and waits for it.

    Runs each `warmup` times (compile), then `repeats` rounds calling each once per round.
    Returns name -> {"step_s": [...], "minflt": [...], "warmup_s": seconds}; minflt = the process's minor
    page faults during that step (`getrusage`, all threads)."""
    import resource

    def minflt():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    out = {}
    for name, fn in steps.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        out[name] = {"step_s": [], "minflt": [], "warmup_s": time.perf_counter() - t0}
    for _ in range(repeats):
        for name, fn in steps.items():
            f0, t0 = minflt(), time.perf_counter()
            fn()
            out[name]["step_s"].append(time.perf_counter() - t0)
            out[name]["minflt"].append(minflt() - f0)
    return out


def summarize(times: dict, batch: int, ref: str | None = None, other: str | None = None) -> dict:
    """Adds img/s (median, min, max) and the median minor faults per step per entry and, with ref/other,
    `ratio` = median over rounds of
    other's step time / ref's step time (ref's speed relative to other's: >1 means ref is faster)."""
    res = {}
    for name, t in times.items():
        s = t["step_s"]
        res[name] = {"img_per_s": batch / statistics.median(s), "img_per_s_min": batch / max(s),
                     "img_per_s_max": batch / min(s), "median_step_s": statistics.median(s),
                     "minflt_per_step": statistics.median(t["minflt"]) if t.get("minflt") else None, **t}
    if ref and other and ref in times and other in times:
        res["ratio"] = statistics.median(o / r for r, o in zip(times[ref]["step_s"], times[other]["step_s"]))
    return res


def write(result: dict, json_path: str, markdown: str) -> None:
    """Writes result as JSON at json_path and `markdown` beside it (same stem, .md)."""
    path = pathlib.Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records.write_json(path, result)
    path.with_suffix(".md").write_text(markdown)
    print(f"wrote {path} and {path.with_suffix('.md')}")


def fmt(s: dict) -> str:
    """'median (min–max)' img/s."""
    return f"{s['img_per_s']:.2f} ({s['img_per_s_min']:.2f}–{s['img_per_s_max']:.2f})"


def flax_steps(model, x, y) -> dict:
    """Returns {"train", "infer", "hlo"} for a flax `Classifier` with BatchNorm on inputs x / labels y: one SGD
    (momentum 0.9) step with the batch statistics updated, one inference pass (each blocks until done), and
    hlo("train" | "infer") -> the optimised HLO text of that step. jax is imported here, after the caller pinned
    cores and set XLA_FLAGS."""
    import jax
    import optax

    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    tx = optax.sgd(1e-3, momentum=0.9)

    def train_step(params, stats, opt_state, x, y, key):
        def loss_fn(p):
            (logits, _), upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                           rngs={"dropout": key}, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

    train_jit = jax.jit(train_step, donate_argnums=(0, 1, 2))
    infer_jit = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x)[0])
    st = {"p": variables["params"], "s": variables["batch_stats"], "key": jax.random.key(1)}
    st["o"] = tx.init(st["p"])

    def train():
        st["key"], k = jax.random.split(st["key"])
        st["p"], st["s"], st["o"], loss = train_jit(st["p"], st["s"], st["o"], x, y, k)
        loss.block_until_ready()

    def infer():
        infer_jit(st["p"], st["s"], x).block_until_ready()

    def hlo(mode):
        if mode == "train":
            return train_jit.lower(st["p"], st["s"], st["o"], x, y, st["key"]).compile().as_text()
        return infer_jit.lower(st["p"], st["s"], x).compile().as_text()

    return {"train": train, "infer": infer, "hlo": hlo}
