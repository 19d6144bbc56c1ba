"""Bayesian optimisation (bayes_opt 3.x, GP + UCB) of the head-mode recipe, batched for the compiled trainer.

`run_batched` asks the GP for a batch of trials at a time and evaluates them with one call, so the trials can
train together on the compiled trainer's trial axis (`leukax.train.compiled`: only the GRU width changes the
compiled program). The objective returns a *validation* metric (the test split never enters). After every
batch the whole log (params, target, seconds, extra info) is written atomically as JSON; a stopped search
re-registers the logged trials and continues after its last finished batch, suggesting exactly what an
uninterrupted search would have (the draws of the batch starting at trial i are seeded by (seed, i)).
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
import warnings
from typing import Any, Callable

import numpy as np

from leukax import records
from leukax.train import compiled

log = logging.getLogger(__name__)

# bayes_opt 3.x bounds: (lo, hi) float, (lo, hi, int) integer, a tuple of values = categorical.


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


def load_log(path) -> list[dict[str, Any]]:
    """Returns the trials saved at `path` ([] when the file does not exist)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return json.loads(path.read_text())["trials"]


def _optimizer(space: dict[str, Any], trials: list[dict[str, Any]], seed: int, i: int):
    from bayes_opt import BayesianOptimization  # here, not at import: it imports scikit-learn, which sets KMP_* variables
    """Returns a GP optimizer over `space` that knows `trials`, seeded by (seed, i) only: trial i's suggestion
    depends on the finished trials and nothing else, so a resumed search suggests what an uninterrupted one would."""
    with warnings.catch_warnings():  # bayes_opt warns that non-float parameters are "experimental"
        warnings.simplefilter("ignore")
        bo = BayesianOptimization(f=None, pbounds=space, random_state=np.random.RandomState([seed, i]),
                                  verbose=0, allow_duplicate_points=True)
    for t in trials:
        bo.register(params=t["params"], target=t["target"])
    return bo


# The compiled head-mode recipe's space (leukax.train.compiled). It contains every point of Akter et al.'s
# Table 2 (units 256/512, SGD or RMSprop, learning rates 1e-2 and 1e-4, momentum 0.3/0.5/0.9, dropout 0.1/0.4).
# Only units change the compiled program; the optimizer (Recipe(optimizer="traced")) and the rest are traced per
# trial. 1024 units were searched before and dropped: such a trial costs ~3.3× a 512-unit one in FLOPs (~27× a
# 128-unit one), and on PBC neither 1024-unit trial of the first batch beat a 256-unit one
# (results/benchmarks/bo_pbc_mobilenet_v2_first_batch_log.json).
RECIPE_SPACE: dict[str, Any] = {
    "units": (128, 256, 512),
    "optimizer": compiled.TRACED_OPTIMIZERS,  # ("adamw", "sgd", "rmsprop")
    "log10_lr": (-5.0, -1.5),
    "momentum": (0.0, 0.99),
    "dropout": (0.0, 0.6),
    "input_dropout": (0.0, 0.5),
    "log10_weight_decay": (-5.0, -1.0),
}


def run_batched(objective_batch: Callable[[list[dict[str, Any]]], list[tuple[float, dict[str, Any]]]],
                space: dict[str, Any], n_trials: int, log_path, batch: int = 6, init_points: int = 6,
                seed: int = 0) -> dict[str, Any]:
    """Runs trials until `n_trials` are in the log at `log_path` (resuming it) and returns
    {"trials": [{"trial", "params", "target", "seconds", "info", "batch"}...], "best": trial}.

    Asks the GP for `batch` trials at a time and evaluates them with ONE call of objective_batch(list of params)
    -> list of (target to maximise, info), so trials can train together (the compiled trainer's trial axis).
    The first `init_points` trials are random draws; later ones maximise the GP's upper confidence bound, and
    within a batch later suggestions see the earlier ones as "constant liars" (their target set to the mean of
    the finished trials; Ginsbourger et al. 2010), so a batch spreads out. The log is replaced atomically after
    every batch; a killed search resumes after its last finished batch and never repeats a logged trial.
    """
    log_path = pathlib.Path(log_path)
    trials = load_log(log_path)
    while len(trials) < n_trials:
        i0 = len(trials)
        bo = _optimizer(space, trials, seed, i0)
        lie = float(np.mean([t["target"] for t in trials])) if trials else 0.0
        suggestions = []
        for i in range(i0, min(i0 + batch, n_trials)):
            if i < init_points or not trials:
                params = bo.space.array_to_params(bo.space.random_sample(random_state=np.random.RandomState([seed, i])))
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    params = bo.suggest()
                bo.register(params=params, target=lie)
            suggestions.append(_jsonable(params))
        t0 = time.perf_counter()
        results = objective_batch(suggestions)
        seconds = (time.perf_counter() - t0) / len(suggestions)
        for j, (params, (target, info)) in enumerate(zip(suggestions, results)):
            trials.append({"trial": i0 + j, "params": params, "target": float(target), "seconds": seconds,
                           "info": info, "batch": i0 // batch})
        best = max(trials, key=lambda t: t["target"])
        log.info("bayes batch of %d (trials %d-%d) best=%.4f (trial %d)", len(suggestions), i0 + 1, len(trials),
                 best["target"], best["trial"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text(records.dumps_json({"space": {k: repr(v) for k, v in space.items()}, "seed": seed,
                                           "batch": batch, "trials": trials, "best": best}))
        tmp.replace(log_path)
    return {"trials": trials, "best": max(trials, key=lambda t: t["target"]) if trials else None}


def recipe_hparams(params: dict[str, Any]) -> dict[str, float]:
    """Returns the compiled trainer's traced hyper-parameters of a RECIPE_SPACE trial (its optimizer as
    "optimizer_index" into `compiled.TRACED_OPTIMIZERS`, for Recipe(optimizer="traced"))."""
    return dict(learning_rate=10.0 ** params["log10_lr"], weight_decay=10.0 ** params.get("log10_weight_decay", -2.0),
                momentum=params.get("momentum", 0.9), dropout=params.get("dropout", 0.3),
                input_dropout=params.get("input_dropout", 0.0), recurrent_dropout=0.0,
                optimizer_index=compiled.TRACED_OPTIMIZERS.index(params.get("optimizer", "adamw")))
