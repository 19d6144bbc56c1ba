"""Where the MobileNetV2 + GRU training (or inference) step spends its time on XLA:CPU.

Runs the step of `cpu_mobilenetv2_gru.py` under `jax.profiler.trace`, reads the XLA:CPU thunk events back
(`jax.profiler.ProfileData`) and sums their durations by fused kernel and by the op name of the JAX code that
produced it (from the compiled HLO's metadata: layer kind, forward or backward).

  taskset -c 0 python benchmarks/profile_mobilenetv2_gru.py --mode=train --top=25
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from experiments import common  # noqa: E402
from experiments.common import field  # noqa: E402


@dataclasses.dataclass
class Config:
    mode: str = field("train", "train or infer.", choices=("train", "infer"))
    batch: int = field(16, "Batch size.")
    size: int = field(224, "Image size.")
    steps: int = field(2, "Profiled steps (after one warm-up).")
    top: int = field(25, "Rows of the per-kernel table.")


def kernel_times(trace_dir: str) -> collections.Counter:
    """Thunk name -> total ns over the XLA:CPU worker threads of the trace in trace_dir."""
    from jax.profiler import ProfileData
    pd = ProfileData.from_file(glob.glob(trace_dir + "/**/*.xplane.pb", recursive=True)[0])
    out = collections.Counter()
    for plane in pd.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if "Execute" not in ev.name and "Await" not in ev.name and not ev.name.startswith("end:"):
                    out[ev.name] += ev.duration_ns
    return out


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> op_name metadata (the JAX source path, e.g. .../block_3_depthwise/reduce)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text)}


def layer_kind(op: str) -> str:
    d = "backward" if "transpose(" in op else "forward"
    for key, kind in (("/head/", "GRU head"), ("_BN", "BatchNorm"), ("bn_", "BatchNorm"), ("_bn", "BatchNorm"),
                      ("depthwise", "depthwise"), ("relu6", "ReLU6"), ("select_n", "ReLU6 mask (+fused)"),
                      ("expand/", "1×1 conv"), ("project/", "1×1 conv"), ("Conv_1/", "1×1 conv"), ("Conv1/", "stem conv")):
        if key in op:
            return f"{d} {kind}"
    return f"{d} other"


def run(cfg: Config) -> dict:
    import jax

    import cpu_mobilenetv2_gru as gru
    args = gru.Config(batch=cfg.batch, size=cfg.size)
    _, fns = gru.bench_jax(args, (cfg.mode,))
    fn = fns[cfg.mode]
    fn()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(cfg.steps):
                fn()
        ns = kernel_times(d)
    hlo = fns["hlo"](cfg.mode)
    names = op_names(hlo)
    total = sum(ns.values())
    by_kind = collections.Counter()
    by_kernel = collections.Counter()
    for name, t in ns.items():
        op = names.get(name, "")
        by_kind[layer_kind(op)] += t
        short = re.sub(r"block_\d+_|expanded_conv_", "", op.replace("Classifier.features/backbone/", ""))
        by_kernel[(re.sub(r"\.\d+$", "", name), short[-60:])] += t
    print(f"thunk time per step: {total / cfg.steps / 1e6:.1f} ms")
    for k, t in by_kind.most_common():
        print(f"{t / cfg.steps / 1e6:9.1f} ms {100 * t / total:5.1f} %  {k}")
    print()
    for (k, op), t in by_kernel.most_common(cfg.top):
        print(f"{t / cfg.steps / 1e6:9.1f} ms {100 * t / total:5.1f} %  {k:28s} {op}")
    return {"by_kind": dict(by_kind), "total_ns": total}


if __name__ == "__main__":
    common.main(Config, run)
