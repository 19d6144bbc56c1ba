"""Bayesian optimisation around the head-mode ensemble trainer: no recompiles for lr/momentum/dropout,
JSON log after every trial, resume continues the log."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leukax.models.heads import GRUHead
from leukax.train import bayes, ensemble
from leukax.train.features import cached_features
from test_ensemble import SIZE, TinyNet, cnmc  # noqa: F401  (cnmc is a fixture)

BASE = ensemble.TrainConfig(num_members=2, mode="head", batch_size=20, num_epochs=2, patience=5,
                            ensemble_axis="vmap", seed=0)
SPACE = {"units": (6, 7, int), "optimizer": ("sgd", "rmsprop"), "log10_lr": (-3.0, -1.0),
         "momentum": (0.5, 0.95), "dropout": (0.0, 0.5)}


def make_head(units):
    return GRUHead(num_classes=2, units=units, hidden=8)


@pytest.fixture(scope="module")
def objective(cnmc):  # noqa: F811
    x, y, xv, yv = cnmc
    net = TinyNet()
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    f = cached_features(net, variables, np.concatenate([x, xv]), normalization="unit", batch_size=32)
    return bayes.paper1_objective((f[:40], y), (f[40:], yv), BASE, make_head)


def test_only_units_or_optimizer_recompile(objective):
    p = {"units": 6, "optimizer": "sgd", "log10_lr": -2.0, "momentum": 0.9, "dropout": 0.1}
    target, info = objective(p)
    assert 0.0 <= target <= 1.0 and info["epochs"] == 2 and len(info["member_val_acc"]) == 2
    before = dict(ensemble.TRACES)
    objective({**p, "log10_lr": -1.5, "momentum": 0.6, "dropout": 0.4})  # state / traced scalars only
    assert dict(ensemble.TRACES) == before
    objective({**p, "units": 7})  # new head shape: one new train-step trace
    assert ensemble.TRACES["train_step"] == before["train_step"] + 1
    objective({**p, "units": 7, "optimizer": "rmsprop"})  # new optimizer: one more
    assert ensemble.TRACES["train_step"] == before["train_step"] + 2


def test_three_trials_then_resume_a_fourth(objective, tmp_path):
    path = tmp_path / "bo.json"
    out = bayes.run(objective, SPACE, n_trials=3, log_path=path, init_points=2, seed=0)
    saved = json.loads(path.read_text())
    assert len(saved["trials"]) == 3 and saved["trials"] == out["trials"]
    for t in saved["trials"]:
        assert 6 <= t["params"]["units"] <= 7 and isinstance(t["params"]["units"], int)
        assert t["params"]["optimizer"] in ("sgd", "rmsprop")
        assert -3.0 <= t["params"]["log10_lr"] <= -1.0 and t["seconds"] > 0
        assert t["target"] == t["info"]["val_acc"]
    assert saved["best"]["target"] == max(t["target"] for t in saved["trials"])
    resumed = bayes.run(objective, SPACE, n_trials=4, log_path=path, init_points=2, seed=0)
    assert len(resumed["trials"]) == 4 and resumed["trials"][:3] == saved["trials"]
    assert resumed["trials"][3]["trial"] == 3
    assert len(json.loads(path.read_text())["trials"]) == 4
