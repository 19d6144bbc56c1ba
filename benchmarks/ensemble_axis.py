"""Ensemble-axis strategies (vmap / lax.map / sequential) of the finetune-mode deep-ensemble train step: steps/s.

One "step" = one optimizer step of every member (M members, batch B each; backbone + GRU head, BN in train mode),
measured through `leukax.train.finetune.make_train(...).fit` over whole epochs (so per-epoch overhead is
included), after a warm-up epoch that compiles. Finetune only: head mode has one trainer, the compiled one
(`leukax.train.compiled`, member axis `Recipe(member_axis="vmap" | "map")` inside one program), timed in
benchmarks/head_mode.py; the head-mode rows of the committed results/benchmarks/ensemble_axis.* were measured
with the per-step head-mode trainer that issue 18 removed, and stay as history.

  python benchmarks/ensemble_axis.py --backbone=tiny --size=64 --members=3,5
  python benchmarks/ensemble_axis.py --backbone=mobilenet_v2 --size=96 --alpha=0.35

Writes results/benchmarks/ensemble_axis.{json,md} (command, commit, device, numbers).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.common import field
from leukax import records
from leukax.models.classifier import Classifier
from leukax.models.heads import GRUHead
from leukax.models.layers import DepthwiseConv2D
from leukax.train import finetune

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    backbone: str = field("tiny", "tiny (the test backbone, wider) | a registered backbone name.")
    alpha: float = field(0.35, "MobileNetV2 width multiplier.")
    size: int = field(64, "Image size in pixels.")
    members: tuple = field((3, 5), "Ensemble sizes M to time.")
    axes: tuple = field(tuple(finetune.AXES), "Ensemble-axis strategies to time.")
    batch: int = field(16, "Batch size per member.")
    n: int = field(64, "Training images (epoch = n // batch steps).")
    epochs: int = field(2, "Timed epochs after the warm-up epoch.")
    units: int = field(64, "GRU units of the head.")
    note: str = field("", "Machine conditions to record, e.g. 'no other job running'.")
    out: str = field(str(REPO / "results" / "benchmarks" / "ensemble_axis"), "Output path without suffix.")


class TinyNet(nn.Module):
    """conv3×3/2 → BN → depthwise3×3/2 → BN → conv1×1 (the test backbone, wider). Returns (fm, out)."""
    width: int = 16

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name=name)
        x = nn.relu(bn("bn1")(nn.Conv(self.width, (3, 3), (2, 2), use_bias=False, name="Conv1")(x_bhwc)))
        x = nn.relu(bn("dw_bn")(DepthwiseConv2D((3, 3), (2, 2), name="dw")(x)))
        fm = nn.Conv(4 * self.width, (1, 1), name="project")(x)
        return fm, {"pre_logits": jnp.mean(fm, (1, 2))}


def backbone(name: str, alpha: float):
    if name == "tiny":
        return TinyNet(), "unit"
    from leukax.models.registry import get_backbone
    module, spec = get_backbone(name, alpha=alpha) if name == "mobilenet_v2" else get_backbone(name)
    return module, spec.normalization


def steps_per_second(cfg, model, data, epochs: int) -> tuple[float, float]:
    """Returns (ensemble steps per second, warm-up seconds incl. compile)."""
    tr = finetune.make_train(cfg, model, data)
    state = tr.init_state()
    t0 = time.perf_counter()
    state = tr.fit(state, until_epoch=1)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = tr.fit(state, until_epoch=1 + epochs)
    jax.block_until_ready(state.members.params)
    steps = epochs * (data[0].shape[0] // cfg.batch_size)
    return steps / (time.perf_counter() - t0), warm


def run(args: Config) -> dict:
    """Times every (mode, M, axis); writes <out>.json (runs of other backbones/sizes kept) and <out>.md."""
    net, norm = backbone(args.backbone, args.alpha)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8)  # timing only: content irrelevant
    y = (np.arange(args.n) % 2).astype(np.int32)
    head = GRUHead(num_classes=2, units=args.units, hidden=64)
    model, data = Classifier(net, head), (x, y)
    rows = []
    for m in args.members:
        for axis in args.axes:
            cfg = finetune.TrainConfig(num_members=m, optimizer="adam", batch_size=args.batch,
                                       num_epochs=1 + args.epochs, dropout_rate=0.2, normalization=norm,
                                       ensemble_axis=axis)
            sps, warm = steps_per_second(cfg, model, data, args.epochs)
            rows.append({"mode": "finetune", "members": m, "axis": axis, "steps_per_s": round(sps, 3),
                         "member_steps_per_s": round(sps * m, 3), "warmup_s": round(warm, 2)})
            print(json.dumps(rows[-1]), flush=True)

    env = common.environment()
    meta = {"command": common.command_line("benchmarks/ensemble_axis.py", args), "commit": env["commit"],
            "backend": env["backend"], "device": env["device_kind"], "cpu": env["cpu"],
            "cpu_count": env["cpu_count"], "jax": env["jax"], "backbone": args.backbone,
            "size": args.size, "batch": args.batch, "n": args.n, "timed_epochs": args.epochs,
            "head": f"GRUHead(units={args.units}, hidden=64)",
            "note": args.note}
    best = {}
    for m in args.members:
        cand = [r for r in rows if r["members"] == m]
        best[f"finetune/M={m}"] = max(cand, key=lambda r: r["steps_per_s"])["axis"]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One run per (backbone, size, backend) is kept; other runs already in the file stay.
    runs = json.loads(out.with_suffix(".json").read_text())["runs"] if out.with_suffix(".json").exists() else []
    key = lambda r: (r["meta"]["backbone"], r["meta"]["size"], r["meta"]["backend"])
    new = {"meta": meta, "rows": rows, "fastest": best}
    runs = [r for r in runs if key(r) != key(new)] + [new]
    records.write_json(out.with_suffix(".json"), {"runs": runs})
    lines = ["# Ensemble-axis strategies of the deep-ensemble train step", "",
             "One ensemble step = one optimizer step of every member (batch per member below), timed over whole "
             "epochs after a warm-up epoch (per-epoch overhead included). Content of the images is random: "
             "timing only.", ""]
    for run in runs:
        mt = run["meta"]
        lines += [f"## {mt['backbone']} at {mt['size']} px ({mt['backend']}, {mt['device']}, {mt['cpu_count']} cores)", "",
                  f"`{mt['command']}` at commit {mt['commit']}; jax {mt['jax']}; batch {mt['batch']} per member, "
                  f"{mt['head']}.", "", f"**{mt['note']}**" if mt.get("note") else "", "",
                  "| mode | M | axis | ensemble steps/s | member steps/s | warm-up s (compile) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['members']} | {r['axis']} | {r['steps_per_s']} | {r['member_steps_per_s']} | "
                  f"{r['warmup_s']} |" for r in run["rows"]]
        lines += ["", "Fastest: " + ", ".join(f"{k}: {v}" for k, v in run["fastest"].items()), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return new


if __name__ == "__main__":
    common.main(Config, run, compilation_cache=False)  # compile time is measured
