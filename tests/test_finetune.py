"""Finetune-mode deep-ensemble trainer (any model, here also heads on features for speed), the optimizer factory and
the early-stopping rule: per-member differences, early stopping, checkpoint/resume, determinism, momentum semantics. Real images come from the sample embedded in the package (no ../shared needed)."""
import dataclasses
import csv

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from leukax.models.classifier import Classifier
from leukax.models.heads import DenseHead, GRUHead
from leukax.models.layers import DepthwiseConv2D
from leukax.train import finetune, optim
from leukax.train.features import cached_features

SIZE = 32


class TinyNet(nn.Module):
    """A real backbone following the contract: conv → BN → depthwise → BN → 1×1 conv. Returns (fm, out)."""
    width: int = 8
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name=name)
        x = nn.relu(bn("bn1")(nn.Conv(self.width, (3, 3), (2, 2), use_bias=False, name="Conv1")(x_bhwc)))
        x = DepthwiseConv2D((3, 3), (2, 2), impl=self.depthwise_impl, name="dw")(x)
        x = nn.relu(bn("dw_bn")(x))
        fm = nn.Conv(2 * self.width, (1, 1), name="project")(x)
        return fm, {"pre_logits": jnp.mean(fm, (1, 2))}


@pytest.fixture(scope="module")
def cnmc(cnmc_sample_dir):
    """C-NMC 2019 sample at 32 px: (x_train uint8 40×32×32×3, y_train, x_val 20×…, y_val)."""
    root = cnmc_sample_dir
    rows = list(csv.DictReader(open(root / "labels.csv")))
    x = np.stack([np.asarray(Image.open(root / "images" / r["filename"]).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
                  for r in rows])
    y = np.array([int(r["label"]) for r in rows], np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:40], y[:40], x[40:], y[40:]


def flip_augment(key, x_bhwc):
    """Random horizontal flip per image (a real, cheap augmentation)."""
    flip = jax.random.bernoulli(key, 0.5, (x_bhwc.shape[0], 1, 1, 1))
    return jnp.where(flip, x_bhwc[:, :, ::-1], x_bhwc)


def finetune_cfg(**kw):
    base = dict(num_members=3, optimizer="adam", learning_rate=3e-3, dropout_rate=0.2,
                batch_size=16, eval_batch_size=32, num_epochs=4, seed=1, normalization="unit",
                ensemble_axis="sequential")
    return finetune.TrainConfig(**{**base, **kw})


MODEL = Classifier(TinyNet(), GRUHead(num_classes=2, units=8, hidden=8))


def tree_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v, equal_nan=True)), a, b)))


def test_finetune_checkpoint_resume_equals_straight(cnmc, tmp_path):
    x, y, xv, yv = cnmc
    cfg = finetune_cfg()
    straight = finetune.make_train(cfg, MODEL, (x, y), (xv, yv), augment_fn=flip_augment).fit()
    first = finetune.make_train(cfg, MODEL, (x, y), (xv, yv), augment_fn=flip_augment)
    half = first.fit(checkpoint_dir=tmp_path / "ckpt", until_epoch=2)
    assert int(half.epoch) == 2
    second = finetune.make_train(cfg, MODEL, (x, y), (xv, yv), augment_fn=flip_augment)
    resumed = second.fit(checkpoint_dir=tmp_path / "ckpt")  # starts from the epoch-2 checkpoint
    assert int(resumed.epoch) == 4
    assert isinstance(resumed, finetune.EnsembleState)  # Orbax restored the dataclass itself
    assert tree_equal(straight, resumed)  # members, best, scores, keys, history: all of it, bit for bit

    # Members differ (own init, data order, dropout and augmentation draws) and BN statistics moved.
    k = straight.members.params["head"]["logits"]["kernel"]
    assert not np.allclose(k[0], k[1]) and not np.allclose(k[1], k[2])
    bb = straight.members.params["backbone"]["Conv1"]["kernel"]
    assert not np.allclose(bb[0], bb[1])
    init = first.init_state()
    assert not np.allclose(straight.members.batch_stats["backbone"]["bn1"]["mean"],
                           init.members.batch_stats["backbone"]["bn1"]["mean"])
    # History: M×epochs of finite losses; predictions are M×N×K probabilities.
    hist = second.history(resumed)
    assert hist["train_loss"].shape == (3, 4) and np.isfinite(hist["val_loss"]).all()
    probs_mnk = second.predict(resumed, xv)
    assert probs_mnk.shape == (3, 20, 2)
    np.testing.assert_allclose(probs_mnk.sum(-1), 1.0, atol=1e-5)
    # evaluate(best) reproduces the recorded best score of each member (monitor = val_loss).
    val_loss_m, _ = second.evaluate(resumed, (xv, yv), use_best=True)
    np.testing.assert_allclose(-val_loss_m, np.asarray(resumed.best_score), rtol=1e-5)


def test_same_seed_is_deterministic(cnmc):
    x, y, xv, yv = cnmc
    cfg = finetune_cfg(num_epochs=1, ensemble_axis="vmap")
    a = finetune.make_train(cfg, MODEL, (x, y), (xv, yv)).fit()
    b = finetune.make_train(cfg, MODEL, (x, y), (xv, yv)).fit()
    assert tree_equal(a, b)
    other_seed = finetune.make_train(finetune_cfg(num_epochs=1, ensemble_axis="vmap", seed=2),
                                     MODEL, (x, y), (xv, yv)).fit()
    assert not tree_equal(a.members.params, other_seed.members.params)


@pytest.fixture(scope="module")
def features(cnmc):
    """Frozen TinyNet feature maps (8×8×16 at 32 px) of the train and val images."""
    x, y, xv, yv = cnmc
    net = TinyNet()
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    f = cached_features(net, variables, np.concatenate([x, xv]), normalization="unit", batch_size=32)
    return f[:40], y, f[40:], yv


def test_early_stopping_on_features(features, tmp_path):
    f, y, fv, yv = features
    assert f.shape == (40, 8, 8, 16)
    head = GRUHead(num_classes=2, units=8, hidden=8)
    cfg = finetune.TrainConfig(num_members=3, optimizer="sgd", learning_rate=0.3, momentum=0.9,
                               dropout_rate=0.1, batch_size=20, num_epochs=12, patience=2, seed=0,
                               ensemble_axis="vmap", normalization=None)
    tr = finetune.make_train(cfg, head, (f, y), (fv, yv))
    state = tr.fit(checkpoint_dir=tmp_path / "head")
    stopped = ~np.asarray(state.members.active)
    assert stopped.any(), "lr 0.3 with momentum 0.9 and patience 2 should stop some member early"
    hist = tr.history(state)
    for m in np.flatnonzero(stopped):
        last = int(np.flatnonzero(np.isfinite(hist["val_loss"][m]))[-1])
        assert last == int(state.best_epoch[m]) + cfg.patience  # ran `patience` epochs past its best
        assert np.isnan(hist["train_loss"][m, last + 1:]).all()
    # A stopped member's params stopped changing: compare with a run cut at its stop epoch.
    m = int(np.flatnonzero(stopped)[0])
    stop = int(state.best_epoch[m]) + cfg.patience + 1
    cut = tr.fit(until_epoch=stop)  # a fresh run (no checkpoint dir) cut at the stop epoch
    assert tree_equal(jax.tree.map(lambda v: v[m], cut.members.params),
                      jax.tree.map(lambda v: v[m], state.members.params))
    assert tr.predict(state, fv).shape == (3, 20, 2)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizer_factory_descends_and_weight_decay_zero_adds_nothing(name):
    p, g = {"w": jnp.full(3, 10.0)}, {"w": jnp.array([1.0, -2.0, 3.0])}  # λ·p = 5 flips the second sign

    def update(tx):
        return np.asarray(tx.update(g, tx.init(p), p)[0]["w"])

    bare = update(optim.make(name, 0.5, momentum=0.8))
    assert np.all(np.sign(bare) == -np.sign(g["w"]))  # first step goes against the gradient
    np.testing.assert_array_equal(update(optim.make(name, 0.5, momentum=0.8, weight_decay=jnp.float32(0.0))), bare)
    assert not np.allclose(update(optim.make(name, 0.5, momentum=0.8, weight_decay=0.5)), bare)


def test_early_stopping_rule_by_hand():
    """`optim.early_stopping` on M-vectors: m0 improves, m1 has its 2nd bad epoch (stops), m2 was stopped;
    patience None never stops."""
    args = (jnp.array([0.6, 0.8, 5.0]), jnp.array([0.5, 0.9, 0.1]), jnp.array([1, 1, 3]), jnp.array([True, True, False]))
    improved, best, bad, active = optim.early_stopping(*args, patience=2)
    np.testing.assert_array_equal(improved, [True, False, False])
    np.testing.assert_array_equal(best, np.float32([0.6, 0.9, 0.1]))
    np.testing.assert_array_equal(bad, [0, 2, 3])
    np.testing.assert_array_equal(active, [True, False, False])
    np.testing.assert_array_equal(optim.early_stopping(*args, patience=None)[3], [True, True, False])
    # the same rule on one member's scalars under vmap (the compiled trainer's use)
    vm = jax.vmap(lambda *a: optim.early_stopping(*a, patience=2))(*args)
    for u, v in zip(vm, (improved, best, bad, active)):
        np.testing.assert_array_equal(u, v)


def test_early_stopping_update_by_hand():
    """Three members, patience 2: m0 improves, m1 has its 2nd bad epoch (stops), m2 was already stopped."""
    cfg = finetune.TrainConfig(num_members=3, num_epochs=5, normalization=None)
    state = finetune.init(finetune.Spec(cfg, DenseHead(num_classes=2, features=4)), np.zeros((1, 2, 2, 3)))
    state = state.replace(best_score=jnp.array([0.5, 0.9, 0.1]), best_epoch=jnp.array([0, 1, 0]),
                          bad_epochs=jnp.array([1, 1, 3]), epoch=jnp.asarray(3, jnp.int32),
                          members=state.members.replace(active=jnp.array([True, True, False])))
    trained = state.members.replace(params=jax.tree.map(lambda v: v + 1.0, state.members.params))
    new = finetune.early_stopping_update(state.replace(members=trained), jnp.array([0.6, 0.8, 5.0]), patience=2)
    np.testing.assert_array_equal(new.best_score, np.float32([0.6, 0.9, 0.1]))
    np.testing.assert_array_equal(new.best_epoch, [3, 1, 0])
    np.testing.assert_array_equal(new.bad_epochs, [0, 2, 3])
    np.testing.assert_array_equal(new.members.active, [True, False, False])
    assert int(new.epoch) == 4
    for b, old, t in zip(jax.tree.leaves(new.best_params), jax.tree.leaves(state.best_params),
                         jax.tree.leaves(trained.params)):
        np.testing.assert_array_equal(b[0], t[0])  # improved: best ← this epoch's params
        np.testing.assert_array_equal(b[1:], old[1:])  # not improved / stopped: best kept


def test_sgd_momentum_zero_is_plain_sgd():
    """momentum 0 and momentum None (Keras's SGD default) both give w ← w − lr·∇f(w) at every step."""
    w0 = jnp.array([1.0, -2.0, 3.0])

    def grad(w):  # ∇ Σ (w² + w)
        return 2 * w + 1

    def run(momentum):
        tx = optim.make("sgd", 0.1, momentum=momentum)
        s, w = tx.init(w0), w0
        for _ in range(3):
            upd, s = tx.update(grad(w), s, w)
            w = optax.apply_updates(w, upd)
        return np.asarray(w)

    plain = w0
    for _ in range(3):
        plain = plain - 0.1 * grad(plain)
    np.testing.assert_allclose(run(0.0), plain, rtol=1e-6)
    np.testing.assert_allclose(run(None), plain, rtol=1e-6)
    assert not np.allclose(run(0.9), plain, atol=1e-3)  # momentum really acts when asked for


@pytest.mark.parametrize("optimizer,momentum,plain", [("sgd", 0.0, True), ("sgd", None, True), ("sgd", 0.7, False)])
def test_config_momentum_reaches_the_optimizer(optimizer, momentum, plain):
    """TrainConfig's optimizer and momentum are the Spec's transformation: two SGD updates equal
    p − lr·(g1 + g2) exactly when there is no momentum; equal configs share one transformation object."""
    cfg = finetune.TrainConfig(num_members=2, optimizer=optimizer, learning_rate=0.1, momentum=momentum)
    tx = finetune.Spec(cfg, DenseHead(num_classes=2, features=4)).tx
    assert finetune.Spec(cfg, DenseHead(num_classes=2, features=4)).tx is tx  # jit's static key: no recompiles
    p = {"w": jnp.ones(2)}
    s = tx.init(p)
    for g in ({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([0.5, 0.5])}):
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
    assert np.allclose(p["w"], 1 - 0.1 * np.array([1.5, 2.5]), rtol=1e-6) == plain


def test_experiment_sgd_momentum_zero_reaches_the_state():
    """`experiments.hybrid_gru` with --optimizer=sgd --momentum=0: the compiled trainer's members train with plain
    SGD (two updates equal p − lr·(g1 + g2), which momentum would not give)."""
    import optax
    from experiments import hybrid_gru
    from leukax.train import compiled
    cfg = hybrid_gru.Config(optimizer="sgd", momentum=0.0, members=2, weight_decay=0.0)
    rcp, hp, _, _ = hybrid_gru.split_hparams(cfg, "mobilenet_v2", None, None, None, None, 2, None)
    assert rcp.optimizer == "sgd" and hp["momentum"] == 0.0
    tx = compiled._optimizer(dataclasses.replace(rcp, schedule="constant"), hp, 1)
    p = {"w": jnp.ones(2)}
    s = tx.init(p)
    for g in ({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([0.5, 0.5])}):
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p["w"], 1 - hp["learning_rate"] * np.array([1.5, 2.5]), rtol=1e-6)


def test_feature_cache_on_disk(cnmc, tmp_path):
    x = cnmc[0][:8]
    net = TinyNet()
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    a = cached_features(net, variables, x, "unit", batch_size=4, cache_dir=tmp_path, cache_tag="tiny")
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    np.save(files[0], np.asarray(a) + 1)  # a hit must read the file, not recompute
    b = cached_features(net, variables, x, "unit", batch_size=4, cache_dir=tmp_path, cache_tag="tiny")
    np.testing.assert_array_equal(b, np.asarray(a) + 1)
    c = cached_features(net, variables, x[:4], "unit", batch_size=4, cache_dir=tmp_path, cache_tag="tiny")
    assert len(list(tmp_path.glob("*.npy"))) == 2 and c.shape[0] == 4


def test_member_axes_agree(features):
    """vmap, lax.map and the sequential loop train the same members (to float tolerance)."""
    f, y, fv, yv = features
    head = DenseHead(num_classes=2, features=16)
    runs = {}
    for axis in finetune.AXES:
        cfg = finetune.TrainConfig(num_members=3, optimizer="rmsprop", learning_rate=1e-3,
                                   momentum=0.5, dropout_rate=0.3, batch_size=20, num_epochs=2,
                                   ensemble_axis=axis, normalization=None)
        tr = finetune.make_train(cfg, head, (f, y), (fv, yv))
        runs[axis] = tr.fit()
        assert tr.predict(runs[axis], fv).shape == (3, 20, 2)
    for axis in ("map", "sequential"):
        for u, v in zip(jax.tree.leaves(runs["vmap"].members), jax.tree.leaves(runs[axis].members)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_checkpoint_resume_on_features_equals_straight(features, tmp_path):
    """A GRU on features: 4 epochs straight == 2 epochs + checkpoint + resume + 2 epochs; members differ."""
    f, y, fv, yv = features
    head = GRUHead(num_classes=2, units=8, hidden=8)
    cfg = finetune.TrainConfig(num_members=3, optimizer="rmsprop", learning_rate=1e-3,
                               dropout_rate=0.1, batch_size=20, num_epochs=4, seed=3, normalization=None)
    straight = finetune.make_train(cfg, head, (f, y), (fv, yv)).fit()
    finetune.make_train(cfg, head, (f, y), (fv, yv)).fit(checkpoint_dir=tmp_path / "c", until_epoch=2)
    resumed = finetune.make_train(cfg, head, (f, y), (fv, yv)).fit(checkpoint_dir=tmp_path / "c")
    assert int(resumed.epoch) == 4
    assert tree_equal(straight, resumed)
    kernel = np.asarray(jax.tree.leaves(resumed.members.params)[0])
    assert not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])


@pytest.mark.parametrize("axis", ["sequential", "map"])
def test_streamed_images_train_exactly_as_in_memory(axis, tmp_path):
    """Finetuning reads its images from the TFDS source batch by batch (`ImageStream`, grain threads) and ends
    in the same state, history and predictions as the same images held in memory."""
    from leukax.data import load_arrays, load_index
    ds = load_index("cnmc2019", data_dir=tmp_path)
    mem = load_arrays("cnmc2019", SIZE, data_dir=tmp_path)
    y = np.asarray(ds.labels, np.int32)
    np.testing.assert_array_equal(mem.labels, y)
    tr, va = np.arange(36), np.arange(36, 60)
    stream = lambda idx: finetune.ImageStream(ds.source, idx, SIZE, num_threads=2)  # noqa: E731
    cfg = finetune_cfg(num_epochs=2, ensemble_axis=axis, batch_size=12, eval_batch_size=16)
    a = finetune.make_train(cfg, MODEL, (mem.images[tr], y[tr]), (mem.images[va], y[va]), augment_fn=flip_augment)
    b = finetune.make_train(cfg, MODEL, (stream(tr), y[tr]), (stream(va), y[va]), augment_fn=flip_augment)
    sa, sb = a.fit(), b.fit()
    assert tree_equal(sa.best_params, sb.best_params) and tree_equal(sa.history, sb.history)
    assert np.isfinite(np.asarray(sa.history["val_loss"])).all()
    np.testing.assert_array_equal(a.predict(sa, mem.images[va]), b.predict(sb, stream(va)))
    assert stream(va).first().shape == (1, SIZE, SIZE, 3)
