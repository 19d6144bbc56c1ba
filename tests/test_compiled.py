"""The compiled head-mode trainer (leukax.train.compiled), views, the linear probe and temperature scaling."""
import dataclasses
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from leukax import calibration, metrics
from leukax.models.heads import GRUHead, LinearHead
from leukax.train import compiled, probe, recipe, views

K = 3


def _data(n=48, v=2, t=4, c=6, seed=0):
    """Separable toy features: class k shifts channel k (every view and position), plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    x = rng.normal(size=(v, n, t, c)).astype(np.float32)
    x[..., :K] += 1.5 * np.eye(K, dtype=np.float32)[y][None, :, None, :]
    return x, y


RECIPE = compiled.Recipe(num_members=2, num_epochs=4, batch_size=16, patience=10)


@pytest.fixture(scope="module")
def toy():
    x, y = _data()
    xv, yv = _data(24, seed=1)
    return x, y, xv, yv


def test_trains_learns_and_is_deterministic(toy):
    x, y, xv, yv = toy
    head = GRUHead(K, units=8, hidden=8, dropout=0.0)
    hp = compiled.default_hparams(learning_rate=1e-2)
    r1 = compiled.fit(RECIPE, head, K, x, y, xv, yv, hp, seed=3)
    r2 = compiled.fit(RECIPE, head, K, x, y, xv, yv, hp, seed=3)
    for a, b in zip(jax.tree.leaves(r1.params), jax.tree.leaves(r2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = np.asarray(jax.tree.leaves(r1.params)[0])
    assert not np.allclose(leaf[0], leaf[1])  # members have their own init and data order
    hist = r1.history
    assert np.asarray(hist["val_acc"]).shape == (2, 4) and np.all(np.isfinite(np.asarray(hist["val_loss"])))
    probs = np.asarray(compiled.make_predict(head)(r1.params, jnp.asarray(xv)))
    assert probs.shape == (2, 24, K) and np.mean(probs.mean(0).argmax(-1) == yv) > 0.6


def test_early_stopping_keeps_each_members_best_epoch(toy):
    x, y, xv, yv = toy
    head = LinearHead(K)
    rcp = compiled.Recipe(num_members=2, num_epochs=30, batch_size=16, patience=2, schedule="constant",
                          optimizer="sgd", label_smoothing=0.0)
    res = compiled.fit(rcp, head, K, x, y, xv, yv, compiled.default_hparams(learning_rate=5.0, momentum=0.0))
    run = int(np.asarray(res.epochs_run)[0])
    val = np.asarray(res.history["val_loss"])
    assert run < 30  # a huge learning rate stops both members early
    for m in range(2):
        done = val[m][np.isfinite(val[m])]
        assert int(res.best_epoch[m]) == int(np.argmin(done))  # best = lowest validation NLL seen
        assert len(done) - 1 - int(res.best_epoch[m]) == 2     # stopped after `patience` bad epochs



def test_progress_prints_each_epoch_run_with_its_losses_and_the_elapsed_time(toy, capsys):
    x, y, xv, yv = toy
    rcp = compiled.Recipe(num_members=2, num_epochs=30, batch_size=16, patience=2, schedule="constant",
                          optimizer="sgd", label_smoothing=0.0, progress=True)
    t0 = time.perf_counter()
    res = compiled.fit(rcp, LinearHead(K), K, x, y, xv, yv, compiled.default_hparams(learning_rate=5.0, momentum=0.0))
    jax.effects_barrier()
    wall = time.perf_counter() - t0
    lines = [ln.split() for ln in capsys.readouterr().err.splitlines() if ln.strip().startswith("epoch ")]
    run = int(np.asarray(res.epochs_run)[0])
    assert 1 < run < 30 and [ln[1] for ln in lines] == [f"{e + 1}/30:" for e in range(run)]  # one line per epoch
    hist = {k: np.asarray(res.history[k]) for k in ("train_loss", "val_loss")}
    for e, ln in enumerate(lines):
        assert float(ln[4]) == pytest.approx(np.nanmean(hist["train_loss"][:, e]), abs=1e-4)
        assert float(ln[7]) == pytest.approx(np.nanmean(hist["val_loss"][:, e]), abs=1e-4)
        assert ln[-1] == "s]" and ln[-2].startswith("[")
    seconds = [float(ln[-2][1:]) for ln in lines]
    assert seconds == sorted(seconds) and 0 <= seconds[-1] <= wall + 1  # the clock starts when fit calls the trainer


def test_fit_returns_each_members_best_epoch_params_not_the_last(toy):
    """The returned params are each member's params at its recorded best epoch: their validation NLL is the
    history's value at best_epoch (not at the last epoch run), and retraining the same seed for best_epoch + 1
    epochs (constant schedule, so the first epochs are identical) ends on the very same params."""
    x, y, xv, yv = toy
    head = LinearHead(K)
    rcp = compiled.Recipe(num_members=2, num_epochs=30, batch_size=16, patience=3, schedule="constant",
                          optimizer="sgd", label_smoothing=0.0, val_views=0)
    hp = compiled.default_hparams(learning_rate=5.0, momentum=0.0)
    res = compiled.fit(rcp, head, K, x, y, xv, yv, hp, seed=4)
    val = np.asarray(res.history["val_loss"])
    best = np.asarray(res.best_epoch)
    last = np.asarray([np.flatnonzero(np.isfinite(v))[-1] for v in val])
    assert np.all(best < last)  # validation got worse after the best epoch: last ≠ best
    probs_mnk = np.asarray(compiled.make_predict(head)(res.params, jnp.asarray(xv)))
    for m in range(2):
        nll = float(metrics.nll(jnp.asarray(yv), jnp.asarray(probs_mnk[m])))
        np.testing.assert_allclose(nll, val[m, best[m]], rtol=1e-4)
        assert abs(nll - val[m, last[m]]) > 1e-3
    for m in range(2):  # the same member, trained afresh for best_epoch + 1 epochs
        short = compiled.fit(dataclasses.replace(rcp, num_epochs=int(best[m]) + 1, patience=100), head, K, x, y,
                             xv, yv, hp, seed=4)
        for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(short.params)):
            np.testing.assert_allclose(np.asarray(a)[m], np.asarray(b)[m], rtol=1e-5, atol=1e-6)


def test_make_predict_averages_the_softmax_over_all_views():
    """make_predict(head)(params_m, x_vntc) equals the mean over all V views of each member's per-view softmax,
    written out by hand (also when V·N is not a multiple of the chunk, which pads the last chunk)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 7, 4, 6)), jnp.float32)   # V = 3 different views of N = 7 examples
    head = GRUHead(K, units=8, hidden=8, dropout=0.0)
    params_m = jax.vmap(lambda k: head.init(k, x[0])["params"])(jax.random.split(jax.random.PRNGKey(6), 2))
    want = np.stack([np.mean([np.asarray(jax.nn.softmax(head.apply({"params": jax.tree.map(lambda a: a[m], params_m)},
                                                                    x[v])[0], -1)) for v in range(3)], 0)
                     for m in range(2)])
    per_view0 = np.asarray(jax.nn.softmax(head.apply({"params": jax.tree.map(lambda a: a[0], params_m)}, x[0])[0], -1))
    assert not np.allclose(want[0], per_view0, atol=1e-3)          # the views disagree: view 0 alone is not it
    for chunk in (256, 5):
        got = np.asarray(compiled.make_predict(head, chunk)(params_m, x))
        assert got.shape == (2, 7, K)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_trials_share_one_program_and_equal_separate_runs(toy):
    x, y, xv, yv = toy
    head = GRUHead(K, units=8, hidden=8, dropout=0.0)
    hps = [compiled.default_hparams(learning_rate=1e-2), compiled.default_hparams(learning_rate=3e-3, dropout=0.1)]
    both = compiled.fit(RECIPE, head, K, x, y, xv, yv, hps, seed=1)
    alone = compiled.fit(RECIPE, head, K, x, y, xv, yv, hps[1], seed=1)
    for a, b in zip(jax.tree.leaves(compiled.trial(both, 1).params), jax.tree.leaves(alone.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    a0 = np.asarray(jax.tree.leaves(compiled.trial(both, 0).params)[0])
    assert not np.allclose(a0, np.asarray(jax.tree.leaves(alone.params)[0]))


def test_member_axis_map_equals_vmap(toy):
    x, y, xv, yv = toy
    head = GRUHead(K, units=8, hidden=8, dropout=0.0)
    hp = compiled.default_hparams(learning_rate=1e-2)
    rv = compiled.fit(RECIPE, head, K, x, y, xv, yv, hp)
    rm = compiled.fit(compiled.Recipe(**{**RECIPE.__dict__, "member_axis": "map"}), head, K, x, y, xv, yv, hp)
    for a, b in zip(jax.tree.leaves(rv.params), jax.tree.leaves(rm.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_host_fed_training_equals_device_resident(toy):
    """residency="host" (features left in host memory, each step's batch and each validation chunk fetched by the
    compiled program) trains exactly what the device-resident run trains: same best epochs, histories and params,
    for two trials at once, 16-bit features, val_views < V and an eval chunk that splits views; and predicts the
    same probabilities. The host table is emptied once the handles are gone."""
    x, y, xv, yv = toy
    x16, xv16 = np.concatenate([x, x[::-1]]).astype(np.float16), np.concatenate([xv, xv[::-1]]).astype(np.float16)
    head = GRUHead(K, units=8, hidden=8, dropout=0.0)
    rcp = dataclasses.replace(RECIPE, val_views=3, eval_chunk=10)
    hps = [compiled.default_hparams(learning_rate=1e-2), compiled.default_hparams(learning_rate=3e-3)]
    dev = compiled.fit(rcp, head, K, x16, y, xv16, yv, hps, seed=2, residency="device")
    host = compiled.fit(rcp, head, K, x16, y, xv16, yv, hps, seed=2, residency="host")
    np.testing.assert_array_equal(np.asarray(dev.best_epoch), np.asarray(host.best_epoch))
    for k in dev.history:
        np.testing.assert_allclose(np.asarray(host.history[k]), np.asarray(dev.history[k]), atol=1e-6)
    for a, b in zip(jax.tree.leaves(dev.params), jax.tree.leaves(host.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
    params = compiled.trial(dev, 0).params
    want = compiled.predict_probs(head, params, xv16, "device")
    np.testing.assert_allclose(compiled.predict_probs(head, params, xv16, "host", chunk=7), want, atol=1e-6)
    assert not compiled._HOST_ARRAYS


def test_auto_residency_keeps_what_fits_on_the_device(monkeypatch):
    """"auto" puts host arrays on the device while they take at most half its free memory, feeds them from the
    host beyond that, leaves device arrays where they are, and keeps everything on the device on a backend that
    reports no memory limit (the CPU)."""
    monkeypatch.setattr(compiled, "_device_free_bytes", lambda: None)
    assert compiled.feature_residency(10**15) == "device"
    monkeypatch.setattr(compiled, "_device_free_bytes", lambda: 1000)
    assert compiled.feature_residency(500) == "device" and compiled.feature_residency(501) == "host"
    assert compiled.feature_residency(10, "host") == "host" and compiled.feature_residency(10**9, "device") == "device"
    big = np.zeros((1, 2, 4, 16), np.float32)  # 512 bytes > 500
    assert compiled._where([big], "auto") == "host" and compiled._where([big[:, :1]], "auto") == "device"
    assert compiled._where([jnp.asarray(big)], "auto") == "device"
    with pytest.raises(ValueError, match="residency"):
        compiled.feature_residency(1, "gpu")


def test_transform_to_host_equals_transform_on_device():
    """recipe.transform(residency="host") returns, as numpy, the device array that residency="device" builds."""
    x, _ = _data(n=30, v=2, t=4, c=6)
    idx = np.array([3, 1, 7, 20, 29, 0])
    tf = recipe.fit_transform(x, 4, indices=idx)
    on_host = recipe.transform(tf, x, idx, residency="host", chunk=4)
    assert isinstance(on_host, np.ndarray) and on_host.dtype == np.float16
    np.testing.assert_array_equal(on_host, np.asarray(recipe.transform(tf, x, idx, chunk=4)))
    assert recipe.transformed_bytes(4, x, len(idx)) == on_host.nbytes


def test_traced_optimizer_trials_share_one_program_and_equal_static_optimizers(toy):
    x, y, xv, yv = toy
    head = LinearHead(K)  # the selection does not depend on the head; a linear one compiles fast
    traced = compiled.Recipe(**{**RECIPE.__dict__, "optimizer": "traced"})
    hps = [compiled.default_hparams(learning_rate=lr, momentum=0.5, optimizer_index=i)
           for i, lr in enumerate((1e-2, 3e-2, 1e-2))]
    together = compiled.fit(traced, head, K, x, y, xv, yv, hps, seed=2)
    leaves = [np.asarray(jax.tree.leaves(compiled.trial(together, t).params)[0]) for t in range(3)]
    assert not np.allclose(leaves[0], leaves[2])  # same learning rate, different optimizer
    for t, name in enumerate(compiled.TRACED_OPTIMIZERS):
        alone = compiled.fit(compiled.Recipe(**{**RECIPE.__dict__, "optimizer": name}), head, K, x, y, xv, yv,
                             hps[t], seed=2)
        for a, b in zip(jax.tree.leaves(compiled.trial(together, t).params), jax.tree.leaves(alone.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sgd_momentum_zero_is_plain_sgd():
    rcp = compiled.Recipe(optimizer="sgd", schedule="constant")
    p = {"w": jnp.ones(3)}
    g1, g2 = {"w": jnp.array([1.0, 2.0, 3.0])}, {"w": jnp.array([0.5, 0.5, 0.5])}

    def two_steps(momentum):
        tx = compiled._optimizer(rcp, compiled.default_hparams(learning_rate=0.1, momentum=momentum, weight_decay=0.0), 1)
        s, q = tx.init(p), p
        for g in (g1, g2):
            u, s = tx.update(g, s, q)
            q = optax.apply_updates(q, u)
        return np.asarray(q["w"])

    np.testing.assert_allclose(two_steps(0.0), 1 - 0.1 * np.array([1.5, 2.5, 3.5]), atol=1e-6)
    assert not np.allclose(two_steps(0.9), two_steps(0.0))


def test_views_are_per_image_so_slicing_after_the_split_is_making_them_after():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    all_v = views.make_views(images)
    idx = np.array([4, 1])
    np.testing.assert_array_equal(all_v[:, idx], views.make_views(images[idx]))
    assert all_v.shape[0] == 8 and len({all_v[k, 0].tobytes() for k in range(8)}) == 8  # 8 distinct views
    np.testing.assert_array_equal(all_v[0], images)                                   # view 0 = identity
    np.testing.assert_array_equal(views.dihedral(images, 1), np.rot90(images, 1, axes=(1, 2)))
    train, test = np.array([0, 2, 3]), np.array([1, 4])
    tr = all_v[:, train]
    for t in test:  # no view of a test image is in the training tensor
        assert not any(np.array_equal(tr[v, i], all_v[w, t]) for v in range(8) for i in range(3) for w in range(8))


def test_linear_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 12)).astype(np.float32)
    y = (x @ rng.normal(size=(12, K)) + rng.normal(size=(90, K))).argmax(1)
    p = probe.fit(x, y, K)
    xs = (x - np.asarray(p["mean"])) / np.asarray(p["std"])
    sk = LogisticRegression(C=1.0, max_iter=10000, tol=1e-10).fit(xs, y)
    np.testing.assert_allclose(np.asarray(probe.predict(p, jnp.asarray(x))), sk.predict_proba(xs), atol=5e-4)


def test_temperature_scaling_lowers_nll_of_overconfident_predictions():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, K, n)
    logits = rng.normal(size=(n, K)) + 1.0 * np.eye(K)[y]
    over = jax.nn.softmax(jnp.asarray(4.0 * logits), -1)  # 4× too sharp
    t = float(calibration.fit_temperature(jnp.asarray(y), over))
    assert 2.5 < t < 6.0
    cal = calibration.apply_temperature(over, t)
    assert float(metrics.nll(jnp.asarray(y), cal)) < 0.8 * float(metrics.nll(jnp.asarray(y), over))
    np.testing.assert_array_equal(np.asarray(cal).argmax(-1), np.asarray(over).argmax(-1))  # accuracy unchanged


def test_temperature_prior_keeps_t_finite_on_an_error_free_validation_part():
    """prior_scale σ: MAP under log T ~ N(0, σ²). Ten validation cells all classified right drive the
    maximum-likelihood T to the grid's lower edge (0.05); the prior keeps it where the penalised objective,
    evaluated by hand on a fine grid, is lowest; with many cells the prior fades and the MAP meets the MLE."""
    y = jnp.arange(10) % K
    p = jax.nn.softmax(jnp.asarray(np.eye(K)[np.asarray(y)] * 1.0), -1)  # right, unconfident (max 0.58)
    assert float(calibration.fit_temperature(y, p)) < 0.06
    t_map = float(calibration.fit_temperature(y, p, 0.5))
    grid = np.linspace(-3, 4, 70001)
    obj = [float(metrics.nll(y, calibration.apply_temperature(p, np.exp(lt)))) + lt ** 2 / (2 * 0.25 * 10)
           for lt in grid[::100]]
    assert t_map == pytest.approx(np.exp(grid[::100][int(np.argmin(obj))]), rel=0.02) and t_map > 0.2
    from experiments import common, dev_suite  # the studies pass the prior through (--temperature_prior)
    assert common.calibrate(y, p[None], y, p[None], 0.5)[0]["temperature"] == pytest.approx(t_map)
    assert dev_suite.calibration_after_scaling([(y, p, y, p)], draws=10, prior_scale=0.5)["per_split"][0][
        "temperature"] == pytest.approx(t_map)
    rng = np.random.default_rng(1)
    yb = jnp.asarray(rng.integers(0, K, 4000))
    pb = jax.nn.softmax(jnp.asarray(0.5 * (rng.normal(size=(4000, K)) + 2.0 * np.eye(K)[np.asarray(yb)])), -1)
    t_mle, t_big = float(calibration.fit_temperature(yb, pb)), float(calibration.fit_temperature(yb, pb, 0.5))
    assert t_mle < 0.8 and t_big == pytest.approx(t_mle, rel=0.03)


def test_feature_transform_uses_training_statistics_only():
    x, _ = _data(30)
    tf = recipe.fit_transform(x[:, :20], dim=4)
    z = tf.apply(x[:, :20]).reshape(-1, 4)
    cov = np.cov(z.T, bias=True)  # principal components of the training part: uncorrelated, decreasing variance
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0.0, atol=1e-3)
    assert np.all(np.diff(np.diag(cov)) <= 1e-6)
    assert not np.allclose(tf.mean_c, recipe.fit_transform(x, dim=4).mean_c)


def test_channel_constant_in_training_reads_zero_not_overflow():
    """A channel that never fires on the training images (constant there) fires on a test image: without a rule
    (x − μ)/(0 + ε) is ~1e9, inf in float16. It reads 0 (σ = ∞), with and without PCA, the other channels are
    standardised as before, and a float16 output is clipped to its range, never inf."""
    x, _ = _data(30)
    x = x * 100.0
    x[..., 5] = 0.0
    x[:, 25:, :, 5] = 3000.0  # fires on "test" images only
    for dim in (0, 4):
        tf = recipe.fit_transform(x[:, :20], dim=dim)
        out = np.asarray(recipe.transform(tf, x, np.arange(30)), np.float32)
        assert np.all(np.isfinite(out)) and np.abs(out).max() < 100
    tf = recipe.fit_transform(x[:, :20])
    assert np.isinf(tf.std_c[5]) and np.all(np.isfinite(tf.std_c[:5]))
    np.testing.assert_allclose(tf.std_c[:5], x[:, :20, :, :5].reshape(-1, 5).std(0) + 1e-6, rtol=1e-5)
    assert np.all(tf.apply(x)[..., 5] == 0)
    huge = recipe.FeatureTransform(np.zeros(6, np.float32), np.full(6, 1e-3, np.float32), None)
    assert np.all(np.isfinite(np.asarray(recipe.transform(huge, x, np.arange(30)), np.float32)))


MESH_SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh
    from leukax.models.heads import GRUHead
    from leukax.train import compiled
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    y = np.arange(32) % 3; x = rng.normal(size=(2, 32, 4, 6)).astype(np.float32)
    rcp = compiled.Recipe(num_members=8, num_epochs=2, batch_size=16, patience=5)
    head = GRUHead(3, units=8, hidden=8, dropout=0.0)
    hp = compiled.default_hparams(learning_rate=1e-2)
    mesh = Mesh(np.array(jax.devices()), ("members",))
    sharded = compiled.fit(rcp, head, 3, x, y, x, y, hp, mesh=mesh)
    single = compiled.fit(rcp, head, 3, x, y, x, y, hp)
    leaf = jax.tree.leaves(sharded.params)[0]
    print("devices", len(leaf.sharding.device_set))
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    print("equal")
""")


def test_member_axis_sharded_over_8_host_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "devices 8" in out.stdout and "equal" in out.stdout
