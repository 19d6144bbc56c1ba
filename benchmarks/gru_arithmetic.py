"""How close the compiled head-mode trainer runs to the machine's matrix throughput on `--config=akter2024`'s
hybrids (issue 22): seconds per epoch, the epoch's FLOPs counted from the GRU head's shapes, GFLOP/s, and the
same against a plain float32 matmul of the input projection's width on the same device.

  python benchmarks/gru_arithmetic.py                      (writes results/benchmarks/gru_arithmetic.{json,md})
  python benchmarks/gru_arithmetic.py --hybrids=mobilenet_v2 --items=1664

Workload per hybrid (Akter et al. 2024, Table 2 units; the maps the networks give at 224 px): MobileNetV2
7×7×1280 → GRU 512, InceptionV3 5×5×2048 → GRU 512, EfficientNet-Lite2 (for B3) 7×7×1280 → GRU 256; then
Dense(128) → Dense(8). `--items` training items (1664 = 208 cells × 8 stored copies: one paper split of a
260-cell set), 48 validation items, M = `--members`, batch 32, SGD momentum, random features (the time does not
depend on their values). One epoch = (time of a 3-epoch fit − time of a 1-epoch fit) / 2: compilation and the
first epoch's warm-up cancel.

FLOPs per item and member (2 per multiply-add, T positions, C channels, U units): input projection
2·T·C·3U, recurrence 2·T·U·3U; training counts the input projection twice (forward, weight gradient: the
features are constants, so their gradient is never formed) and the recurrence three times (forward, state and
weight gradients). The dense layers and the validation pass are left out (< 1 %).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.common import field
from leukax import records
from leukax.models.heads import GRUHead
from leukax.train import compiled

REPO = pathlib.Path(__file__).resolve().parents[1]
HYBRIDS = {  # name: (positions T, channels C, GRU units U)
    "mobilenet_v2": (49, 1280, 512),
    "inception_v3": (25, 2048, 512),
    "efficientnet_lite2": (49, 1280, 256),
}
MATMUL = (16384, 1280, 7680)  # the reference matmul rows × C × N: MobileNetV2's channels, N = 5 members × 3·512


@dataclasses.dataclass
class Config:
    hybrids: str = field(",".join(HYBRIDS), f"Comma-separated, of {sorted(HYBRIDS)}.")
    items: int = field(1664, "Training items per epoch (1664: one paper split of a 260-cell set, 8 stored copies).")
    members: int = field(5, "Deep-ensemble members M.")
    out_dir: str = field(str(REPO / "results" / "benchmarks"), "Where gru_arithmetic.{json,md} go.")


def train_flops_per_item(t: int, c: int, u: int) -> float:
    return 2 * (2 * t * c * 3 * u) + 3 * (2 * t * u * 3 * u)


def matmul_gflops(reps: int = 3) -> float:
    """float32 rows×c @ c×n (`MATMUL`) on the default device, GFLOP/s (the reference rate)."""
    rows, c, n = MATMUL
    a, b = jnp.ones((rows, c), jnp.float32), jnp.ones((c, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        f(a, b).block_until_ready()
    return 2 * rows * c * n * reps / (time.perf_counter() - t0) / 1e9


def epoch_seconds(t: int, c: int, u: int, cfg: Config) -> float:
    rng = np.random.default_rng(0)
    x_tr = rng.normal(size=(cfg.items, t, c)).astype(np.float32)
    x_va = rng.normal(size=(48, t, c)).astype(np.float32)
    y_tr, y_va = rng.integers(0, 8, cfg.items), rng.integers(0, 8, 48)
    head = GRUHead(8, units=u, hidden=128, dropout=0.1)
    hp = compiled.default_hparams(learning_rate=0.01, momentum=0.9, weight_decay=0.0, dropout=0.1, input_dropout=0.0)
    wall = {}
    for epochs in (1, 3):
        rcp = compiled.Recipe(num_members=cfg.members, num_epochs=epochs, batch_size=32, patience=epochs,
                              optimizer="sgd", schedule="constant", label_smoothing=0.0)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled.fit(rcp, head, 8, x_tr, y_tr, x_va, y_va, hp, seed=0).params)
        wall[epochs] = time.perf_counter() - t0
    return (wall[3] - wall[1]) / 2


def run(cfg: Config) -> dict:
    names = [h.strip() for h in cfg.hybrids.split(",") if h.strip()]
    unknown = sorted(set(names) - set(HYBRIDS))
    if unknown:
        raise ValueError(f"benchmarks/gru_arithmetic.py: unknown hybrids {unknown}; known: {sorted(HYBRIDS)}")
    out = dict(config=dataclasses.asdict(cfg), environment=common.environment(), load_average_start=os.getloadavg(),
               command=common.command_line("benchmarks/gru_arithmetic.py", cfg))
    t0 = time.perf_counter()
    out["matmul_gflops"] = matmul_gflops()
    rows = []
    for name in names:
        t, c, u = HYBRIDS[name]
        s = epoch_seconds(t, c, u, cfg)
        tflop = train_flops_per_item(t, c, u) * cfg.items * cfg.members / 1e12
        gflops = tflop * 1e3 / s
        rows.append(dict(hybrid=name, positions=t, channels=c, units=u, epoch_s=s, epoch_tflop=tflop,
                         gflops=gflops, of_matmul=gflops / out["matmul_gflops"]))
    out.update(rows=rows, wall_s=time.perf_counter() - t0, load_average_end=os.getloadavg(),
               peak_rss_mb=common.peak_rss_mb())
    folder = pathlib.Path(cfg.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    records.write_json(folder / "gru_arithmetic.json", out)
    (folder / "gru_arithmetic.md").write_text(markdown(out))
    print(markdown(out))
    return out


def markdown(o: dict) -> str:
    e, c = o["environment"], o["config"]
    load = lambda k: tuple(round(x, 1) for x in o[k])  # noqa: E731
    lines = ["# The akter2024 hybrids' GRU heads against the machine's matmul rate\n",
             f"Command: `{o['command']}`  \nCommit: `{e['commit']}`; device: {e['device']} ({e['cpu_count']} cores); "
             f"load average {load('load_average_start')} at start, {load('load_average_end')} at the end; "
             f"wall {o['wall_s']:.0f} s, peak RSS {o['peak_rss_mb'] / 1024:.2f} GB.\n",
             f"Reference: float32 {MATMUL[0]}×{MATMUL[1]} @ {MATMUL[1]}×{MATMUL[2]} matmul, "
             f"**{o['matmul_gflops']:.0f} GFLOP/s**. Epoch: "
             f"{c['items']} training items, M = {c['members']}, batch 32 (FLOPs counted as in the script's docstring).\n",
             "| hybrid | map → GRU | s / epoch | TFLOP / epoch | GFLOP/s | of the matmul rate |", "|---|---|---|---|---|---|"]
    for r in o["rows"]:
        lines.append(f"| {r['hybrid']} | {r['positions']}×{r['channels']} → {r['units']} | {r['epoch_s']:.1f} | "
                     f"{r['epoch_tflop']:.2f} | {r['gflops']:.0f} | {100 * r['of_matmul']:.0f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.main(Config, run, compilation_cache=False)  # compile time cancels, but keep runs independent
