"""Batched Bayesian optimisation (`bayes.run_batched`, the one BO loop): batches of the requested size, a JSON log
after every batch, resume without repeating trials, constant liars that spread a batch, and the RECIPE_SPACE →
compiled hyper-parameters mapping. (Killed mid-search: tests/test_train_faults.py.)"""
import itertools
import json

import numpy as np

from leukax.train import bayes, compiled

SPACE = {"units": (4, 16, int), "optimizer": ("sgd", "rmsprop"), "log10_lr": (-4.0, -1.0), "momentum": (0.0, 0.99)}


def target(p):
    """Deterministic, with its optimum at lr 1e-2, momentum 0.8, 10 units, sgd."""
    return (-(p["log10_lr"] + 2.0) ** 2 - (p["momentum"] - 0.8) ** 2 - 0.01 * (p["units"] - 10) ** 2
            + (0.1 if p["optimizer"] == "sgd" else 0.0))


def recording(calls):
    def objective_batch(params_list):
        calls.append(list(params_list))
        return [(target(p), {"units_seen": p["units"]}) for p in params_list]
    return objective_batch


def test_batches_logged_then_resumed(tmp_path):
    path, calls = tmp_path / "bo.json", []
    out = bayes.run_batched(recording(calls), SPACE, 5, path, batch=2, init_points=2, seed=0)
    assert [len(c) for c in calls] == [2, 2, 1]  # one objective call per batch; the last batch cut at n_trials
    saved = json.loads(path.read_text())
    assert saved["trials"] == out["trials"] and [t["trial"] for t in saved["trials"]] == list(range(5))
    assert [t["batch"] for t in saved["trials"]] == [0, 0, 1, 1, 2]
    for t, p in zip(saved["trials"], itertools.chain(*calls)):
        assert t["params"] == p and t["target"] == target(p) and t["info"] == {"units_seen": p["units"]}
        assert 4 <= p["units"] <= 16 and isinstance(p["units"], int) and p["optimizer"] in ("sgd", "rmsprop")
        assert -4.0 <= p["log10_lr"] <= -1.0 and 0.0 <= p["momentum"] <= 0.99 and t["seconds"] >= 0
    assert saved["best"] == max(saved["trials"], key=lambda t: t["target"]) == out["best"]

    more = []
    resumed = bayes.run_batched(recording(more), SPACE, 7, path, batch=2, init_points=2, seed=0)
    assert [len(c) for c in more] == [2]  # the 5 logged trials are not run again
    assert resumed["trials"][:5] == saved["trials"] and [t["trial"] for t in resumed["trials"][5:]] == [5, 6]
    assert len(json.loads(path.read_text())["trials"]) == 7


def test_constant_liars_spread_a_batch(tmp_path):
    """After 4 random trials, one batch of 4 GP suggestions: each later one sees the earlier as lies, so no two
    coincide (measured: without the lies this seed's GP suggests the same point 4 times, distance 0)."""
    calls = []
    bayes.run_batched(recording(calls), SPACE, 8, tmp_path / "bo.json", batch=4, init_points=4, seed=0)
    gp_batch = calls[1]
    scale = {"units": 12.0, "log10_lr": 3.0, "momentum": 0.99}
    for a, b in itertools.combinations(gp_batch, 2):
        dist = max(abs(a[k] - b[k]) / s for k, s in scale.items()) + (a["optimizer"] != b["optimizer"])
        assert dist > 0.01, (a, b)


def test_recipe_hparams_map_a_trial_to_the_compiled_trainer():
    p = {"units": 256, "optimizer": "rmsprop", "log10_lr": -3.0, "momentum": 0.5, "dropout": 0.2,
         "input_dropout": 0.1, "log10_weight_decay": -4.0}
    hp = bayes.recipe_hparams(p)
    assert compiled.TRACED_OPTIMIZERS[hp["optimizer_index"]] == "rmsprop"
    np.testing.assert_allclose([hp["learning_rate"], hp["weight_decay"]], [1e-3, 1e-4])
    assert (hp["momentum"], hp["dropout"], hp["input_dropout"]) == (0.5, 0.2, 0.1)
    assert set(bayes.RECIPE_SPACE["optimizer"]) == set(compiled.TRACED_OPTIMIZERS)
    compiled.stack_trials([hp])  # every key is one the compiled trainer takes
