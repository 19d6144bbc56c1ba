"""How large an ECE a perfectly calibrated model would show on sets of n cells (`leukax.metrics.ece_null`),
for the temperature-scaled predictions of a hybrid_gru run: per fold and pooled over a repeat.

  python -m experiments.ece_null --predictions=results/heads/pbc_5x5/predictions_per_split.npz --model=fused_gru

Prints, for n = one fold's test size and n = all cells of a repeat, the mean and 10–90 % range of the null ECE
(confidences: every split's test predictions after its own validation-fitted temperature).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.common import field
from leukax import metrics


@dataclasses.dataclass
class Config:
    predictions: str = field("results/heads/pbc_5x5/predictions_per_split.npz", "predictions_per_split.npz of a run.")
    model: str = field("fused_gru", "<hybrid or fused>_<head>, as in the file's keys.")
    draws: int = field(2000, "Simulated sets per n.")


def run(cfg: Config) -> dict:
    d = np.load(cfg.predictions)
    y = d["labels"]
    n_splits = sum(k.endswith("_test_index") for k in d.files)
    conf, sizes = [], []
    for i in range(n_splits):
        val, test = d[f"split{i}_val_index"], d[f"split{i}_test_index"]
        _, cal_te = common.calibrate(y[val], d[f"split{i}_{cfg.model}_val"][None], y[test],
                                     d[f"split{i}_{cfg.model}_test"][None])  # the fold's own T, as hybrid_gru
        conf.append(cal_te.max(-1))
        sizes.append(len(test))
    conf = jnp.asarray(np.concatenate(conf))
    out = {}
    for name, n in (("per_fold", int(np.median(sizes))), ("pooled_repeat", len(y))):
        e = np.asarray(metrics.ece_null(jax.random.PRNGKey(0), conf, n, cfg.draws))
        out[name] = dict(n=n, mean=float(e.mean()), p10=float(np.percentile(e, 10)), p90=float(np.percentile(e, 90)))
        print(f"{name}: n={n}: null ECE {e.mean():.3f} (10–90 %: {out[name]['p10']:.3f}–{out[name]['p90']:.3f})")
    return out


if __name__ == "__main__":
    common.main(Config, lambda cfg: run(cfg) and None)
