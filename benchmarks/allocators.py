"""Which allocator for CPU training: `cpu_mobilenetv2_gru.py` once per allocator and core count (issue 18).

  python benchmarks/allocators.py --cores=2,1 --steps=7 --out=results/benchmarks/allocators.json

Each variant is one subprocess of benchmarks/cpu_mobilenetv2_gru.py (MobileNetV2 + GRU, batch 16, 224 px, JAX
and PyTorch interleaved in one process) with the allocator preloaded for the whole process (`LD_PRELOAD`), so
both frameworks run on the same one; the child records what it ran with (`leukax.runtime.allocator`, read
from /proc/self/maps). Per row: img/s of training and inference for both frameworks, the JAX / PyTorch ratios,
the process's peak RSS and the median minor page faults per training step (`getrusage`). A variant whose
library is not installed is reported as missing (`apt-get install libjemalloc2 libtcmalloc-minimal4`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interleave  # noqa: E402  (benchmarks/ is not a package)

from experiments import common  # noqa: E402
from experiments.common import field  # noqa: E402

LIB = "/usr/lib/x86_64-linux-gnu"
JEMALLOC = f"{LIB}/libjemalloc.so.2"
TCMALLOC = f"{LIB}/libtcmalloc_minimal.so.4"
RETAIN = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# name -> (environment added to the child's, --cpu_kernels)
VARIANTS = {
    "glibc": ({}, "xla"),
    "jemalloc": ({"LD_PRELOAD": JEMALLOC}, "xla"),
    "jemalloc_retain": ({"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": RETAIN}, "xla"),
    "tcmalloc": ({"LD_PRELOAD": TCMALLOC}, "xla"),
    "tcmalloc_release0": ({"LD_PRELOAD": TCMALLOC, "TCMALLOC_RELEASE_RATE": "0"}, "xla"),
    "jemalloc_retain_native": ({"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": RETAIN}, "native"),
    "glibc_native": ({}, "native"),
}
SCRUB = ("LD_PRELOAD", "MALLOC_CONF", "TCMALLOC_RELEASE_RATE", "GLIBC_TUNABLES")


@dataclasses.dataclass
class Config:
    cores: tuple = field((2, 1), "Core counts, in this order (each pins the child, torch on as many threads).")
    variants: tuple = field(tuple(VARIANTS), f"Variants to run, in this order: {', '.join(VARIANTS)}.")
    steps: int = field(7, "Timed rounds per child (cpu_mobilenetv2_gru.py --steps).")
    warmup: int = field(2, "Untimed steps per child.")
    timeout_s: int = field(900, "Seconds one child may take.")
    out: str = field("", "Write the JSON (+ .md) here after every child ('' = print only).")
    append: bool = field(False, "Keep the rows already in --out (each row records its own child command).")


def run_child(cfg: Config, name: str, cores: int, tmp: pathlib.Path) -> dict:
    extra, kernels = VARIANTS[name]
    lib = extra.get("LD_PRELOAD")
    if lib and not pathlib.Path(lib).exists():
        return {"variant": name, "cores": cores, "missing": lib}
    out = tmp / f"{name}_{cores}.json"
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(extra, PYTHONPATH=os.pathsep.join([str(common.REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, str(common.REPO / "benchmarks" / "cpu_mobilenetv2_gru.py"), f"--cores={cores}",
           f"--steps={cfg.steps}", f"--warmup={cfg.warmup}", f"--cpu_kernels={kernels}", f"--out={out}"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        return {"variant": name, "cores": cores, "error": [f"did not finish in {cfg.timeout_s} s"]}
    if proc.returncode != 0:
        return {"variant": name, "cores": cores, "error": proc.stderr.strip().splitlines()[-3:]}
    r = json.loads(out.read_text())
    m, tr, inf = r["machine"], r["modes"]["train"], r["modes"]["infer"]
    return {"variant": name, "cores": cores, "cpu_kernels": kernels, "steps": cfg.steps, "warmup": cfg.warmup,
            "env": " ".join(f"{k}={v}" for k, v in extra.items()), "allocator": m["malloc"],
            "jax_train": tr["jax"]["img_per_s"], "torch_train": tr["torch"]["img_per_s"], "train_ratio": tr["ratio"],
            "jax_infer": inf["jax"]["img_per_s"], "torch_infer": inf["torch"]["img_per_s"], "infer_ratio": inf["ratio"],
            "minflt_train": {fw: tr[fw]["minflt_per_step"] for fw in ("jax", "torch")},
            "minflt_infer": {fw: inf[fw]["minflt_per_step"] for fw in ("jax", "torch")},
            "peak_rss_gb": m["peak_rss_gb"], "load_before": r["load_before"], "load_after": m["loadavg"],
            "cpu_model": m["cpu_model"], "isa": m["isa"], "wall_s": round(time.time() - t0, 1),
            "child_command": " ".join(f"{k}={v}" for k, v in extra.items()) + " " + r["command"]}


def markdown(result: dict) -> str:
    rows = result["rows"]
    ok = [r for r in rows if "jax_train" in r]
    cpu = f"{ok[0]['cpu_model']} ({ok[0]['isa']})" if ok else "?"
    lines = ["# Allocators for CPU training and inference: MobileNetV2 + GRU, JAX and PyTorch in one process", "",
             f"- **Command:** `{result['command']}`",
             f"- **Commit:** `{result['git_commit']}`; **date:** {result['time']}; **CPU:** {cpu}, shared machine.",
             "- **Each row:** one process of `benchmarks/cpu_mobilenetv2_gru.py` (batch 16, 224 px, GRU 256; "
             "warm-up steps, then the interleaved rounds given per row) with the allocator preloaded for "
             "the whole process, so both frameworks use it; the allocator column is what the process found in "
             "/proc/self/maps. img/s = median over rounds; ratio = median of per-round PyTorch/JAX step-time "
             "ratios (> 1: JAX faster); faults = median minor page faults of the process per training step; "
             "peak RSS of the whole process (both frameworks); load = 1-min load average before → after.", ""]
    for cores in dict.fromkeys(r["cores"] for r in rows):
        lines += [f"## {cores} core{'s' if cores > 1 else ''}", "",
                  "| variant | allocator (settings) | depthwise | rounds | JAX train img/s | PyTorch train | train ratio | "
                  "JAX infer img/s | PyTorch infer | infer ratio | faults/step JAX / PyTorch (train) | peak RSS GB | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["cores"] == cores):
            if "jax_train" not in r:
                lines.append(f"| {r['variant']} | {'missing ' + r['missing'] if 'missing' in r else 'failed: ' + ' '.join(r['error'])} |"
                             + " |" * 11)
                continue
            f = r["minflt_train"]
            lines.append(
                f"| {r['variant']} | {interleave.allocator_note(r['allocator'])} | {r['cpu_kernels']} | {r.get('steps', '?')} | "
                f"{r['jax_train']:.2f} | {r['torch_train']:.2f} | **{r['train_ratio']:.2f}×** | {r['jax_infer']:.2f} | "
                f"{r['torch_infer']:.2f} | **{r['infer_ratio']:.2f}×** | {f['jax']:,.0f} / {f['torch']:,.0f} | "
                f"{r['peak_rss_gb']:.2f} | {r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} |")
        lines.append("")
    return "\n".join(lines)


def run(cfg: Config) -> dict:
    result = {"benchmark": "allocators", "git_commit": common.git_commit(),
              "command": common.command_line("benchmarks/allocators.py", cfg), "steps": cfg.steps,
              "warmup": cfg.warmup, "time": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "rows": []}
    if cfg.append and cfg.out and pathlib.Path(cfg.out).exists():
        old = json.loads(pathlib.Path(cfg.out).read_text())
        result["rows"] = old["rows"]
        result["command"] = old["command"] + " ; then " + result["command"]
    with tempfile.TemporaryDirectory() as d:
        for cores in cfg.cores:
            for name in cfg.variants:
                row = run_child(cfg, name, int(cores), pathlib.Path(d))
                result["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("child_command",)}), flush=True)
                if cfg.out:
                    interleave.write(result, cfg.out, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    common.main(Config, run, compilation_cache=False)
