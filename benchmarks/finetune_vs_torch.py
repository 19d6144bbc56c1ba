"""Finetune-mode CPU throughput per backbone, leukax/JAX against torchvision, in one process, interleaved.

Each backbone gets a global-average-pool + Dense(2) head in both frameworks (torchvision's classifier replaced
by one Linear layer). Training = one SGD-with-momentum step (forward, backward, update, BatchNorm in
train mode); inference = forward with the running statistics. Random weights, random images.

  python benchmarks/finetune_vs_torch.py --cores=1 --out=results/benchmarks/finetune_vs_torch.json
  python benchmarks/finetune_vs_torch.py --cores=2 --out=results/benchmarks/finetune_vs_torch_2cores.json

Backbones and sizes: mobilenet_v2 224, inception_v3 299, efficientnet_b0 224 (torchvision has all three);
efficientnet_lite2 has no torchvision twin and is timed for JAX only. See `interleave.py` for the method.
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

SIZES = {"mobilenet_v2": 224, "inception_v3": 299, "efficientnet_b0": 224, "efficientnet_lite2": 224}
TORCHVISION = {"mobilenet_v2": "mobilenet_v2", "inception_v3": "inception_v3", "efficientnet_b0": "efficientnet_b0"}


@dataclasses.dataclass
class Config:
    backbones: tuple = field(("mobilenet_v2", "inception_v3", "efficientnet_b0"), "Backbones to time.")
    batch: int = field(16, "Batch size.")
    repeats: int = field(5, "Timed rounds (each framework once per round).")
    warmup: int = field(2, "Untimed steps first (compile).")
    modes: tuple = field(("train", "infer"), "train and/or infer.")
    cores: int = field(1, "Pin the process to this many CPUs, torch threads = this (0: no pinning, torch default).")
    torch: bool = field(True, "Also time the torchvision twin.")
    out: str = field("", "Write JSON here and markdown beside it ('' = print only).")


def jax_steps(name: str, size: int, batch: int):
    """Returns {"train": fn, "infer": fn} for leukax backbone `name` + linear head."""
    import jax.numpy as jnp
    import numpy as np

    from leukax.models.classifier import Classifier
    from leukax.models.heads import LinearHead
    from leukax.models.registry import get_backbone

    backbone, _ = get_backbone(name)
    model = Classifier(backbone, LinearHead(num_classes=2))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 2, batch).astype(np.int32))
    steps = interleave.flax_steps(model, x, y)
    return {"train": steps["train"], "infer": steps["infer"]}


def torch_steps(name: str, size: int, batch: int):
    """Returns {"train": fn, "infer": fn} for the torchvision twin of `name` with a Linear(·, 2) head."""
    import numpy as np
    import torch
    import torchvision

    torch.manual_seed(0)
    if name == "inception_v3":
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        model.fc = torch.nn.Linear(model.fc.in_features, 2)
    else:
        model = getattr(torchvision.models, TORCHVISION[name])(weights=None)
        model.classifier = torch.nn.Linear(model.classifier[-1].in_features, 2)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, batch).astype(np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

    return {"train": train, "infer": infer}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Finetune-mode CPU throughput per backbone: leukax/JAX against torchvision (same process)", "",
             f"- **Command:** `{result['command']}`",
             f"- **Commit:** `{result['git_commit']}`; full record (every step time) in the JSON beside this file.",
             f"- **Device:** {m['cpu_model']} ({m.get('isa', '?')}), {m['cpu_count']} CPUs on the machine, this run on CPUs "
             f"{m['cpus_used']}; load average {result['load_before']} before, {m['loadavg']} after (1/5/15 min; "
             "the machine is shared). "
             f"jax {result['versions'].get('jax')}, torch {result['versions'].get('torch')} "
             f"({result['versions'].get('torch_threads')} threads), torchvision {result['versions'].get('torchvision')}; "
             f"{interleave.memory_note(m)}.",
             f"- **Method:** batch {result['batch']}, random weights and images, GAP + Dense(2) head in both; "
             f"{result['warmup']} warm-up steps, then {result['repeats']} rounds alternating the two frameworks; "
             "img/s as median (min–max) over rounds; ratio = median over rounds of torch's step time / JAX's "
             "(> 1: JAX faster).", "",
             "| backbone | px | mode | leukax/JAX img/s | PyTorch img/s | JAX / PyTorch |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = interleave.fmt(r["torch"]) if r.get("torch") else "—"
        ratio = f"**{r['ratio']:.2f}×**" if r.get("ratio") else "—"
        lines.append(f"| {r['backbone']} | {r['size']} | {r['mode']} | {interleave.fmt(r['jax'])} | {t} | {ratio} |")
    return "\n".join(lines) + "\n"


def run(cfg: Config) -> dict:
    load_before = [round(x, 2) for x in os.getloadavg()]
    interleave.pin(cfg.cores)
    import jax
    versions = {"jax": jax.__version__}
    if cfg.torch:
        import torch
        import torchvision
        if cfg.cores:
            torch.set_num_threads(cfg.cores)
        versions.update(torch=torch.__version__, torchvision=torchvision.__version__,
                        torch_threads=torch.get_num_threads())
    rows = []
    for name in cfg.backbones:
        size = SIZES.get(name, 224)
        js = jax_steps(name, size, cfg.batch)
        ts = torch_steps(name, size, cfg.batch) if cfg.torch and name in TORCHVISION else None
        for mode in cfg.modes:
            steps = {"jax": js[mode], **({"torch": ts[mode]} if ts else {})}
            s = interleave.summarize(interleave.interleaved(steps, cfg.repeats, cfg.warmup), cfg.batch, "jax", "torch")
            rows.append({"backbone": name, "size": size, "mode": mode, **s})
            print(name, mode, {k: (round(v["img_per_s"], 2) if isinstance(v, dict) else round(v, 3))
                               for k, v in s.items()}, flush=True)
    result = {"benchmark": "finetune_vs_torch", "command": common.command_line("benchmarks/finetune_vs_torch.py", cfg),
              "git_commit": common.git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "batch": cfg.batch, "repeats": cfg.repeats, "warmup": cfg.warmup, "versions": versions,
              "load_before": load_before, "machine": interleave.machine(), "rows": rows}
    md = markdown(result)
    print(md)
    if cfg.out:
        interleave.write(result, cfg.out, md)
    return result


if __name__ == "__main__":
    common.main(Config, run)
