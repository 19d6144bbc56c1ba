"""Head mode: the compiled trainer (leukax.train.compiled, the whole early-stopped run of M members as one
program) over 5 folds, and batched BO.

  python benchmarks/head_mode.py                                   (writes results/benchmarks/head_mode.{json,md})

Workload of issue 8: MobileNetV2 feature maps 7×7×1280 (random values: the time does not depend on them), a
GRU(512) head, M = 5 members, 260 images split 5-fold with 20 % validation (156 train / 52 val / 52 test per
fold), batch `--batch` (16), `--epochs` epochs per fold without early stopping (patience = epochs). Compile time
is reported apart. BO: `--bo_trials` trials suggested `--bo_batch` at a time by bayes_opt over the whole
RECIPE_SPACE (units searched, optimizer traced: one program per GRU width), `--bo_members` per trial, on one
fold, as `experiments.hybrid_gru --hparams=bo` does.

The per-step head-mode trainer this was once compared with (`leukax.train.ensemble`, mode "head") is gone
(issue 18: one trainer per mode); the committed tables in results/benchmarks/head_mode*.md keep that comparison
as history, with the commit that measured it.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import jax
import numpy as np

from experiments import common
from experiments.common import field
from leukax.models.heads import GRUHead
from leukax import records
from leukax.train import bayes, compiled

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    images: int = field(260, "Images in the set (5 folds).")
    units: int = field(512, "GRU units.")
    members: int = field(5, "Deep-ensemble members M.")
    epochs: int = field(20, "Epochs per fold (no early stopping).")
    feature_dim: int = field(0, "Channels fed to the GRU (0 = the 1280 of MobileNetV2; 256 = leukax's PCA recipe).")
    views: int = field(1, "Cached views per image (8 = leukax's recipe: a different view per member and epoch, TTA at "
                          "validation).")
    batch: int = field(16, "Batch size (16: the issue's workload; 32: leukax's recipe).")
    bo_trials: int = field(30, "BO trials (0 = skip BO).")
    bo_batch: int = field(6, "BO trials suggested together.")
    bo_members: int = field(1, "Members per BO trial (experiments.hybrid_gru --bo_members).")
    out_dir: str = field(str(REPO / "results" / "benchmarks"), "Where head_mode.{json,md} go.")


def run(cfg: Config) -> dict:
    rng = np.random.default_rng(0)
    c = cfg.feature_dim or 1280
    n_tr, n_va = int(cfg.images * 0.6), int(cfg.images * 0.2)
    x_tr = rng.normal(size=(cfg.views, n_tr, 49, c)).astype(np.float32)
    x_va = rng.normal(size=(cfg.views, n_va, 49, c)).astype(np.float32)
    y_tr, y_va = rng.integers(0, 2, n_tr), rng.integers(0, 2, n_va)
    head = GRUHead(2, units=cfg.units, hidden=128, dropout=0.1)
    rcp = compiled.Recipe(num_members=cfg.members, num_epochs=cfg.epochs, batch_size=cfg.batch, patience=cfg.epochs,
                          val_views=min(cfg.views, 2))
    hp = compiled.default_hparams()
    out = dict(config=dataclasses.asdict(cfg), environment=common.environment(),
               load_average=os.getloadavg(), command=common.command_line("benchmarks/head_mode.py", cfg))

    t0 = time.perf_counter()
    jax.block_until_ready(compiled.fit(rcp, head, 2, x_tr, y_tr, x_va, y_va, hp, seed=99).params)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for fold in range(5):
        jax.block_until_ready(compiled.fit(rcp, head, 2, x_tr, y_tr, x_va, y_va, hp, seed=fold).params)
    five = time.perf_counter() - t0
    out["compiled"] = dict(five_folds_s=five, per_epoch_s=five / (5 * cfg.epochs),
                           compile_s=max(first - five / 5, 0.0))


    if cfg.bo_trials:
        # As experiments.hybrid_gru --hparams=bo: the whole RECIPE_SPACE (units too), the optimizer traced, one
        # program per GRU width, `bo_members` members per trial, trials one per call (bo_vector = 1).
        rcp_bo = dataclasses.replace(rcp, optimizer="traced", num_members=cfg.bo_members)

        def objective_batch(params_list):
            out = []
            for p in params_list:
                head_u = GRUHead(2, units=int(p["units"]), hidden=128, dropout=0.1)
                res = compiled.fit(rcp_bo, head_u, 2, x_tr, y_tr, x_va, y_va, [bayes.recipe_hparams(p)])
                out.append((-float(np.asarray(res.history["val_loss"])[0, :, -1].mean()), {}))
            return out

        t0 = time.perf_counter()
        log = pathlib.Path(cfg.out_dir) / "head_mode_bo_log.json"
        log.unlink(missing_ok=True)
        trials = bayes.run_batched(objective_batch, bayes.RECIPE_SPACE, cfg.bo_trials, log, batch=cfg.bo_batch,
                                   init_points=cfg.bo_batch)["trials"]
        log.unlink(missing_ok=True)
        out["bo"] = dict(trials=cfg.bo_trials, batch=cfg.bo_batch, total_s=time.perf_counter() - t0,
                         units=[t["params"]["units"] for t in trials],
                         note=f"{cfg.bo_trials} trials of M={cfg.bo_members} GRU heads (units searched in "
                              f"{bayes.RECIPE_SPACE['units']}, optimizer traced), {cfg.epochs} epochs each without early "
                              "stopping, one fold")
    pathlib.Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    records.write_json(pathlib.Path(cfg.out_dir) / "head_mode.json", out)
    (pathlib.Path(cfg.out_dir) / "head_mode.md").write_text(markdown(out))
    print(markdown(out))
    return out


def markdown(o: dict) -> str:
    c, e = o["compiled"], o["environment"]
    lines = ["# Head mode: the compiled trainer\n",
             f"Command: `{o['command']}`  \nCommit: `{e['commit']}`; device: {e['device']} ({e['cpu_count']} cores); "
             f"load average at start {tuple(round(x, 1) for x in o['load_average'])}.\n",
             "| what | compiled trainer |", "|---|---|",
             f"| seconds per epoch (M={o['config']['members']}, all members) | {c['per_epoch_s']:.2f} |",
             f"| 5 folds × {o['config']['epochs']} epochs | {c['five_folds_s']:.0f} s (measured) + {c['compile_s']:.0f} s "
             "compile |"]
    if "bo" in o:
        lines.append(f"| BO, {o['bo']['trials']} trials suggested {o['bo']['batch']} at a time | {o['bo']['total_s']:.0f} s |")
        lines.append(f"\nBO: {o['bo']['note']}; units of the trials: {o['bo']['units']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.main(Config, run, compilation_cache=False)  # compile time is measured
