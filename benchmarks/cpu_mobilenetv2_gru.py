"""CPU throughput of MobileNetV2 + GRU head (Akter et al. hybrid CNN-GRU), leukax/JAX vs PyTorch.

Measures images/s of one SGD training step (forward, backward, update; BN in train mode; dropout)
and of inference (BN running stats), at 224 px, batch 16, 2 classes, GRU units 256.

  python benchmarks/cpu_mobilenetv2_gru.py --cores=1 --out=results/benchmarks/cpu_mobilenetv2_gru.json
  python benchmarks/cpu_mobilenetv2_gru.py --cores=2 --out=results/benchmarks/cpu_mobilenetv2_gru_2cores.json

Both frameworks are built first, then their steps alternate in one process (`interleave.py`): img/s as
median (min–max) over `--steps` rounds, ratio = median of the per-round ratios. `--cores=1` pins the process
to one CPU with torch on one thread (steady on a shared machine); `--cores=2` is the 2-thread comparison.
`--xla_flags` is appended to XLA_FLAGS before the first JAX computation (XLA reads it when the backend starts).
The allocator is the process's (README, performance): preload one for both frameworks, e.g.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \
    python benchmarks/cpu_mobilenetv2_gru.py --cores=2

The record names it (`leukax.runtime.allocator`), with peak RSS and minor page faults per step.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interleave  # noqa: E402  (benchmarks/ is not a package)

from experiments import common  # noqa: E402
from experiments.common import field  # noqa: E402


@dataclasses.dataclass
class Config:
    steps: int = field(5, "Timed rounds (each framework once per round).")
    warmup: int = field(2, "Untimed steps (compile) first.")
    batch: int = field(16, "Batch size.")
    size: int = field(224, "Image size in pixels.")
    units: int = field(256, "GRU units.")
    hidden: int = field(128, "Dense layer after the GRU.")
    frameworks: tuple = field(("jax", "torch"), "Frameworks to time.")
    modes: tuple = field(("train", "infer"), "What to time: train step and/or inference.")
    cpu_kernels: str = field("xla", "Depthwise convolutions: xla (pure JAX, the default graph) or native "
                             "(leukax.native's C++ kernel, built with g++).", choices=("xla", "native"))
    pointwise_impl: str = field("auto", "leukax PointwiseConv2D impl.")
    xla_flags: str = field("", "Appended to XLA_FLAGS before the first JAX computation.")
    threads: int = field(0, "torch threads (0: = cores, or torch's default when cores is 0).")
    cores: int = field(1, "Pin the process to this many CPUs (0: no pinning).")
    out: str = field("", "Write the JSON result here ('' = print only).")


def bench_jax(args, modes):
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from leukax.models.classifier import Classifier
    from leukax.models.heads import GRUHead
    from leukax.models.mobilenet_v2 import MobileNetV2

    depthwise_impl = "native" if args.cpu_kernels == "native" else "auto"
    model = Classifier(MobileNetV2(depthwise_impl=depthwise_impl,
                                   pointwise_impl=args.pointwise_impl),
                       GRUHead(num_classes=2, units=args.units, hidden=args.hidden, dropout=0.3))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 2, args.batch).astype(np.int32))
    out = {"framework": "jax", "jax": jax.__version__, "device": str(jax.devices()[0]),
           "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "cpu_kernels": args.cpu_kernels, "depthwise_impl": depthwise_impl, "pointwise_impl": args.pointwise_impl}
    return out, interleave.flax_steps(model, x, y)  # hlo() feeds profile_mobilenetv2_gru.py


def torch_model(units, hidden):
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, s, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout, eps=1e-3, momentum=0.001)]
        return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, expansion):
            super().__init__()
            mid = cin * expansion
            layers = [conv_bn(cin, mid, 1, 1)] if expansion != 1 else []
            layers += [conv_bn(mid, mid, 3, stride, groups=mid), conv_bn(mid, cout, 1, 1, act=False)]
            self.body = nn.Sequential(*layers)
            self.res = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.res else self.body(x)

    from leukax.models.mobilenet_v2 import BLOCKS

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [conv_bn(3, 32, 3, 2)], 32
            for expansion, cout, stride in BLOCKS:
                layers.append(Block(cin, cout, stride, expansion))
                cin = cout
            layers.append(conv_bn(cin, 1280, 1, 1))
            self.backbone = nn.Sequential(*layers)
            self.gru = nn.GRU(1280, units, batch_first=True)
            self.dense = nn.Linear(units, hidden)
            self.drop = nn.Dropout(0.3)
            self.logits = nn.Linear(hidden, 2)

        def forward(self, x):
            fm = self.backbone(x)
            seq = fm.flatten(2).transpose(1, 2)  # B×HW×C
            _, h = self.gru(seq)
            return self.logits(self.drop(torch.relu(self.dense(h[-1]))))

    return Net()


def bench_torch(args, modes):
    import numpy as np
    import torch

    if args.threads or args.cores:
        torch.set_num_threads(args.threads or args.cores)
    torch.manual_seed(0)
    model = torch_model(args.units, args.hidden)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (args.batch, 3, args.size, args.size)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, args.batch).astype(np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

    out = {"framework": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "device": "cpu"}
    return out, {"train": train, "infer": infer}


def markdown(result: dict) -> str:
    m = result["machine"]
    env = {r["framework"]: r for r in result["results"]}
    lines = ["# MobileNetV2 + GRU on CPU: leukax/JAX against PyTorch (same process, interleaved)", "",
             f"- **Command:** `{result['command']}`",
             f"- **Commit:** `{result['git_commit']}`; every step time is in the JSON beside this file.",
             f"- **Device:** {m['cpu_model']} ({m.get('isa', '?')}), {m['cpu_count']} CPUs on the machine, this run on CPUs {m['cpus_used']}; "
             f"load average {result['load_before']} before, {m['loadavg']} after (1/5/15 min; shared machine). "
             f"jax {env.get('jax', {}).get('jax')}, torch {env.get('torch', {}).get('torch')} "
             f"({env.get('torch', {}).get('threads')} threads); {interleave.memory_note(m)}.",
             f"- **Workload:** MobileNetV2 (alpha 1.0) + GRU head ({result['gru_units']} units, dense 128, 2 classes), "
             f"{result['size']} px, batch {result['batch']}, random weights; training = one SGD-momentum step "
             "(BN in train mode, dropout), inference = BN running statistics. The PyTorch network is the same "
             "architecture written in the script.",
             f"- **Method:** {result['warmup']} warm-up steps, then {result['steps']} rounds alternating the "
             "frameworks; img/s median (min–max); ratio = median of per-round torch/JAX step-time ratios (> 1: JAX faster).",
             "", "| mode | leukax/JAX img/s | PyTorch img/s | JAX / PyTorch | minor faults per step, JAX / PyTorch |",
             "|---|---|---|---|---|"]
    for mode, r in result["modes"].items():
        t = interleave.fmt(r["torch"]) if "torch" in r else "—"
        ratio = f"**{r['ratio']:.2f}×**" if "ratio" in r else "—"
        faults = " / ".join(f"{r[fw]['minflt_per_step']:,.0f}" if fw in r and r[fw].get("minflt_per_step") is not None
                            else "—" for fw in ("jax", "torch"))
        lines.append(f"| {mode} | {interleave.fmt(r['jax'])} | {t} | {ratio} | {faults} |")
    return "\n".join(lines) + "\n"


def run(args: Config) -> dict:
    """Times both frameworks interleaved; writes `args.out` (+ .md) when given; returns the result."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    interleave.pin(args.cores)
    built = {fw: (bench_jax if fw == "jax" else bench_torch)(args, args.modes) for fw in args.frameworks}
    result = {"benchmark": "cpu_mobilenetv2_gru", "batch": args.batch, "size": args.size,
              "gru_units": args.units, "steps": args.steps, "warmup": args.warmup,
              "git_commit": common.git_commit(),
              "command": common.command_line("benchmarks/cpu_mobilenetv2_gru.py", args),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": load_before,
              "results": [info for info, _ in built.values()], "modes": {}}
    for mode in args.modes:
        times = interleave.interleaved({fw: fns[mode] for fw, (_, fns) in built.items()}, args.steps, args.warmup)
        result["modes"][mode] = interleave.summarize(times, args.batch, "jax", "torch")
        print(mode, {k: ((round(v["img_per_s"], 2), v["minflt_per_step"]) if isinstance(v, dict) else round(v, 3))
                     for k, v in result["modes"][mode].items()}, flush=True)
    result["machine"] = interleave.machine()
    md = markdown(result)
    print(md)
    if args.out:
        interleave.write(result, args.out, md)
    return result


if __name__ == "__main__":
    common.main(Config, run)
