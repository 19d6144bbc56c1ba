"""Bayesian optimisation (bayes_opt 3.x, GP + UCB) of the first paper's head hyper-parameters.

Space (Akter et al. 2024): GRU units (integer), optimizer (categorical SGD / RMSprop), learning rate
(searched as log10), momentum, dropout. The objective trains a deep ensemble of GRU heads on cached
frozen-backbone features and returns a *validation* metric (the test split never enters). After every
trial the whole log (params, target, seconds, extra info) is written as JSON; `run` re-registers those
trials on start, so a stopped search continues at its first unfinished trial and suggests exactly what an
uninterrupted search would have (trial i's draws are seeded by (seed, i)). Only trials that change ``units`` or the
optimizer compile a new train step: learning rate and momentum are optimizer state, dropout a traced scalar.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
import warnings
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from leukax import metrics
from leukax.train import compiled, ensemble

log = logging.getLogger(__name__)

# bayes_opt 3.x bounds: (lo, hi) float, (lo, hi, int) integer, a tuple of values = categorical.
PAPER1_SPACE: dict[str, Any] = {
    "units": (64, 512, int),
    "optimizer": ("sgd", "rmsprop"),
    "log10_lr": (-5.0, -2.0),
    "momentum": (0.5, 0.99),
    "dropout": (0.0, 0.5),
}


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


def run(objective: Callable[[dict[str, Any]], tuple[float, dict[str, Any]]], space: dict[str, Any],
        n_trials: int, log_path, init_points: int = 2, seed: int = 0) -> dict[str, Any]:
    """Runs trials until `n_trials` are in the log at `log_path` (resuming it) and returns
    {"trials": [{"trial", "params", "target", "seconds", "info"}...], "best": trial}.

    objective(params) -> (target to maximise, info dict). The first `init_points` trials are random
    draws (seeded per trial index), later ones maximise the GP's upper confidence bound. A trial is in the
    log only once its objective returned (the log is replaced atomically after each), so a search killed at
    any point resumes at its first unfinished trial and never repeats a finished one.
    """
    log_path = pathlib.Path(log_path)
    trials = load_log(log_path)
    if trials:
        log.info("bayes: resumed %d trials from %s", len(trials), log_path)
    for i in range(len(trials), n_trials):
        bo = _optimizer(space, trials, seed, i)
        if i < init_points:
            rng = np.random.RandomState([seed, i])
            params = bo.space.array_to_params(bo.space.random_sample(random_state=rng))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # GP convergence warnings on a handful of points
                params = bo.suggest()
        params = _jsonable(params)
        t0 = time.perf_counter()
        target, info = objective(params)
        seconds = time.perf_counter() - t0
        trials.append({"trial": i, "params": params, "target": float(target), "seconds": seconds, "info": info})
        best = max(trials, key=lambda t: t["target"])
        log.info("bayes trial %d/%d %s target=%.4f (%.1fs) best=%.4f (trial %d)", i + 1, n_trials, params,
                 target, seconds, best["target"], best["trial"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"space": {k: repr(v) for k, v in space.items()}, "seed": seed,
                                   "trials": trials, "best": best}, indent=1))
        tmp.replace(log_path)  # atomic: a crash never leaves half a log
    return {"trials": trials, "best": max(trials, key=lambda t: t["target"]) if trials else None}


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
    """Like `run`, but asks the GP for `batch` trials at a time and evaluates them with ONE call of
    objective_batch(list of params) -> list of (target, info), so trials can train together (the compiled
    trainer's trial axis). Within a batch, later suggestions see the earlier ones as "constant liars" (their
    target set to the mean of the finished trials; Ginsbourger et al. 2010), so a batch spreads out. The log is
    written after every batch; a killed search resumes after its last finished batch.
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
        tmp.write_text(json.dumps({"space": {k: repr(v) for k, v in space.items()}, "seed": seed, "batch": batch,
                                   "trials": trials, "best": best}, indent=1))
        tmp.replace(log_path)
    return {"trials": trials, "best": max(trials, key=lambda t: t["target"]) if trials else None}


def recipe_hparams(params: dict[str, Any]) -> dict[str, float]:
    """Returns the compiled trainer's traced hyper-parameters of a RECIPE_SPACE trial (its optimizer as
    "optimizer_index" into `compiled.TRACED_OPTIMIZERS`, for Recipe(optimizer="traced"))."""
    return dict(learning_rate=10.0 ** params["log10_lr"], weight_decay=10.0 ** params.get("log10_weight_decay", -2.0),
                momentum=params.get("momentum", 0.9), dropout=params.get("dropout", 0.3),
                input_dropout=params.get("input_dropout", 0.0), recurrent_dropout=0.0,
                optimizer_index=compiled.TRACED_OPTIMIZERS.index(params.get("optimizer", "adamw")))


def paper1_config(params: dict[str, Any], base: ensemble.TrainConfig) -> ensemble.TrainConfig:
    """Returns `base` with a trial's optimizer, learning rate (10**log10_lr), momentum and dropout."""
    return dataclasses.replace(base, optimizer=params["optimizer"], learning_rate=float(10.0 ** params["log10_lr"]),
                               momentum=float(params["momentum"]), dropout_rate=float(params["dropout"]))


def paper1_objective(train_data, val_data, base: ensemble.TrainConfig, make_head: Callable[[int], Any],
                     metric: str = "val_acc") -> Callable[[dict[str, Any]], tuple[float, dict[str, Any]]]:
    """Returns objective(params) -> (target, info) that trains a head-mode deep ensemble on cached
    features and scores the member-mean probabilities (the sum rule up to 1/M) on the validation split.

    train_data / val_data: (features, labels). make_head(units) -> head module. metric: "val_acc"
    (accuracy of the member mean) or "val_nll" (target = minus `leukax.metrics.nll` of the member mean).
    """
    if base.mode != "head":
        raise ValueError("leukax/train/bayes.py: the BO objective trains heads on cached features (mode='head')")
    y_val = np.asarray(val_data[1])

    def objective(params):
        cfg = paper1_config(params, base)
        tr = ensemble.make_train(cfg, make_head(int(params["units"])), train_data, val_data)
        state = tr.fit()
        probs_mnk = tr.predict(state, val_data[0])  # each member's best params (early stopping)
        mean_nk = probs_mnk.mean(0)
        acc = float(np.mean(mean_nk.argmax(-1) == y_val))
        nll = float(metrics.nll(jnp.asarray(y_val, jnp.int32), jnp.asarray(mean_nk)))
        info = {"val_acc": acc, "val_nll": nll, "epochs": int(state.epoch),
                "member_val_acc": [float(v) for v in np.mean(probs_mnk.argmax(-1) == y_val, -1)]}
        return (acc if metric == "val_acc" else -nll), info

    return objective
