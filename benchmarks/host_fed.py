"""Head-mode training with the reduced features on the device against fed from host memory (issue 19, item 2).

  python benchmarks/host_fed.py                 (writes results/benchmarks/host_fed.{json,md})
  python benchmarks/host_fed.py --num_images=200 --epochs=1 --out_dir=/tmp/host_fed   (a quick look)

Synthetic reduced features of MobileNetV2's shape (V = 8 views × N images × 49 positions × 256 PCA channels,
float16; the validation part a quarter of N) train the default GRU(128) ensemble (M = 3, batch 32) for a fixed
number of epochs (patience above it), once device-resident (`compiled.fit(residency="device")`) and once fed
from host memory (`residency="host"`: each step's batch and each validation chunk fetched by the compiled
program through `jax.pure_callback`). Each mode runs twice: the first call includes compilation, the second is
the steady state. Reported: wall times, member-images per second of the second call, and the largest
difference between the two modes' trained parameters and histories (they should be equal). On the CPU backend
host and device memory are the same, so this measures the fallback's overhead, not a memory saving; on a GPU
the fallback is what lets features larger than its memory train at all.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import numpy as np

from experiments import common
from experiments.common import field
from leukax import records
from leukax.train import compiled, recipe


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = field("results/benchmarks", "Where host_fed.json and host_fed.md go.")
    num_images: int = field(1000, "Training images N (validation: N / 4).")
    epochs: int = field(3, "Epochs (no early stop).")
    members: int = field(3, "Ensemble members M.")
    seed: int = field(0, "Seed of the synthetic features.")


def _features(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(8, n, 49, 256)).astype(np.float16)
    x[..., :2] += np.eye(2, dtype=np.float16)[y][None, :, None, :]
    return x, y


def run(cfg: Config) -> dict:
    env = common.environment()
    x, y = _features(cfg.num_images, cfg.seed)
    xv, yv = _features(cfg.num_images // 4, cfg.seed + 1)
    head = recipe.make_model("gru", 2)
    rcp = compiled.Recipe(num_members=cfg.members, num_epochs=cfg.epochs, patience=cfg.epochs + 1)
    hp = compiled.default_hparams()
    rows, results = {}, {}
    for mode in ("device", "host"):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            res = jax.block_until_ready(compiled.fit(rcp, head, 2, x, y, xv, yv, hp, residency=mode))
            times.append(time.perf_counter() - t0)
        results[mode] = res
        steps = cfg.num_images // rcp.batch_size
        rows[mode] = dict(first_call_s=round(times[0], 2), second_call_s=round(times[1], 2),
                          train_member_images_per_s=round(cfg.members * cfg.epochs * steps * rcp.batch_size / times[1], 1))
    diff_params = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                      for a, b in zip(jax.tree.leaves(results["device"].params), jax.tree.leaves(results["host"].params)))
    diff_hist = max(float(np.nanmax(np.abs(np.asarray(results["device"].history[k]) - np.asarray(results["host"].history[k]))))
                    for k in results["device"].history)
    out = dict(command=common.command_line("benchmarks/host_fed.py", cfg), environment=env,
               peak_rss_mb=common.peak_rss_mb(), config=dataclasses.asdict(cfg),
               features=dict(train_shape=list(x.shape), val_shape=list(xv.shape), dtype="float16",
                             train_bytes=int(x.nbytes), val_bytes=int(xv.nbytes)),
               modes=rows, max_abs_difference=dict(params=diff_params, history=diff_hist),
               host_over_device_steady_state=round(rows["host"]["second_call_s"] / rows["device"]["second_call_s"], 2))
    folder = pathlib.Path(cfg.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    records.write_json(folder / "host_fed.json", out)
    md = ["# Head mode: features on the device vs fed from host memory\n",
          f"`{out['command']}` — commit {env['commit']}, {env['device_kind'] or env['device']} ({env['backend']}, {env.get('cpu_count', '?')} CPU cores), "
          f"peak RSS {out['peak_rss_mb']:.0f} MB. Synthetic float16 features {x.shape} (train) and {xv.shape} (val), "
          f"GRU(128), M = {cfg.members}, {cfg.epochs} epochs.\n",
          "| features | first call (with compile) | second call | member-images/s (second) |", "|---|---|---|---|"]
    md += [f"| {m} | {r['first_call_s']} s | {r['second_call_s']} s | {r['train_member_images_per_s']} |"
           for m, r in rows.items()]
    md += ["", f"Host-fed / device-resident steady-state time: {out['host_over_device_steady_state']}×. Largest difference "
           f"between the two modes: params {diff_params:.1e}, histories {diff_hist:.1e}.", ""]
    (folder / "host_fed.md").write_text("\n".join(md))
    print("\n".join(md))
    return out


if __name__ == "__main__":
    common.main(Config, run, compilation_cache=False)
