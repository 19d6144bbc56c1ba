"""Finetune-mode deep-ensemble trainer (purejaxrl style): M members, backbone + head trained end to end on
images, with a leading member axis on every state leaf. (Heads on cached frozen features train in
`leukax.train.compiled`, head mode.)

Each member has its own init seed, dropout keys, data order (a permutation per epoch) and augmentation
draws. `model` is a `Classifier` (or any module with the head contract); inputs are uint8 images, augmented then
normalised (`config.normalization`) inside the jitted step. Images are an in-memory array or an `ImageStream`:
decoded from the TFDS source by grain threads while the previous step runs, so a dataset of any size trains in
the memory of a few batches; both give the same state bit for bit (tests/test_finetune.py).

The run's state is an `EnsembleState` (a `flax.struct.dataclass`, saved and restored whole by Orbax). The
module-level functions are pure: `init`, `train_epoch`, `evaluate`, `predict`, `record_history`,
`early_stopping_update`. `fit` only sequences them, with logging, a progress bar, a finiteness check and
checkpoints. `make_train` binds a config, a model and data into a `Train` of those functions.

Member axis: `member_train_step` is one member's optimizer step, `member_probs` one member's softmax; they are
mapped over M members with "vmap" (jax.vmap), "map" (lax.map) or "sequential" (a Python loop over members
calling the jitted per-member function). The jitted functions take the model, optimizer, augmentation and
normalisation as one static tuple, so equal configs share one compilation. Optimizer and early stopping are
`leukax.train.optim`'s, the same as the compiled trainer's.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax

from leukax import metrics
from leukax.preprocess import normalize
from leukax.train import checkpoint as ckpt_lib
from leukax.train import optim

log = logging.getLogger(__name__)
HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")

# Member-axis choice per backend, from results/benchmarks/ensemble_axis.md (2 quiet CPU cores): finetune
# MobileNetV2-0.35 at 96 px, M=3: lax.map 1.61, sequential 1.29, vmap 1.16 ensemble steps/s (the tiny test net
# favours sequential, but real backbones are what finetune trains). GPU backends default to vmap (not yet
# measured here).
AUTO_AXIS = {"cpu": "map"}
AXES = ("vmap", "map", "sequential")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one ensemble run. `monitor`: "val_loss" (lower is better) or "val_acc".

    optimizer / learning_rate / momentum: `optim.make` (momentum: sgd's and rmsprop's, None = Keras's 0;
    Adam's b1 stays 0.9). normalization: `leukax.preprocess.normalize` of the inputs inside the step.
    """
    num_members: int = 3
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float | None = None
    dropout_rate: float | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    num_epochs: int = 10
    patience: int | None = None
    monitor: str = "val_loss"
    seed: int = 0
    ensemble_axis: str = "auto"
    normalization: str | None = "raw"
    progress: bool = False


def resolve_axis(axis: str) -> str:
    """Maps "auto" to the measured fastest strategy for this backend."""
    if axis == "auto":
        return AUTO_AXIS.get(jax.default_backend(), "vmap")
    if axis not in AXES:
        raise ValueError(f"leukax/train/finetune.py: ensemble_axis must be auto|{'|'.join(AXES)}, got {axis!r}")
    return axis


@functools.cache
def _optimizer(name: str, learning_rate: float, momentum: float | None) -> optax.GradientTransformation:
    """One transformation object per (name, lr, momentum): jit keys its cache on it (a static argument)."""
    return optim.make(name, learning_rate, momentum=momentum)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What stays fixed during a run: config, model, augmentation; validated on construction."""
    config: TrainConfig
    model: Any
    augment_fn: Callable | None = None

    def __post_init__(self):
        cfg = self.config
        if cfg.monitor not in ("val_loss", "val_acc"):
            raise ValueError(f"leukax/train/finetune.py: monitor must be val_loss|val_acc, got {cfg.monitor!r}")
        if cfg.optimizer not in optim.OPTIMIZERS:
            raise ValueError(f"leukax/train/finetune.py: optimizer must be one of {optim.OPTIMIZERS}, "
                             f"got {cfg.optimizer!r}")
        resolve_axis(cfg.ensemble_axis)

    @property
    def axis(self) -> str:
        return resolve_axis(self.config.ensemble_axis)

    @property
    def normalization(self) -> str | None:
        return self.config.normalization

    @property
    def tx(self):
        return _optimizer(self.config.optimizer, float(self.config.learning_rate),
                          None if self.config.momentum is None else float(self.config.momentum))


@struct.dataclass
class Members:
    """The training state of M members; every leaf has a leading member axis M.

    params / batch_stats: flax variables; opt_state: optax state; key: M×2 PRNG keys for dropout and
    augmentation; active: M bool, False once early stopping stopped the member.
    """
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    key: jax.Array
    active: jax.Array


@struct.dataclass
class EnsembleState:
    """Everything a run needs to continue exactly; every array but `epoch` has a leading member axis M.

    best_params / best_batch_stats: each member's variables at its best epoch by `config.monitor`;
    best_score: M (val_acc, or minus val_loss; -inf before the first epoch); best_epoch: M (0-based, -1 none);
    bad_epochs: M epochs since the best; data_key: M×2 keys of the per-epoch data order; epoch: epochs done;
    history: {"train_loss", "train_acc", "val_loss", "val_acc"} each M×num_epochs float32 (nan: not run).
    """
    members: Members
    best_params: dict
    best_batch_stats: dict
    best_score: jax.Array
    best_epoch: jax.Array
    bad_epochs: jax.Array
    data_key: jax.Array
    epoch: jax.Array
    history: dict


class NonFiniteError(FloatingPointError):
    """A member's training loss or parameters became nan or inf; nothing of that epoch was saved."""


# ---------------------------------------------------------------- one member, and the member axis
def apply_model(model, params, batch_stats, x, train: bool, dropout_rate, rng):
    """Returns (logits_bk, batch_stats after the call)."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    kw = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
    rngs = {"dropout": rng} if rng is not None else None
    if train and batch_stats:
        (logits, _), new = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"], **kw)
        return logits, new["batch_stats"]
    logits, _ = model.apply(variables, x, train=train, rngs=rngs, **kw)
    return logits, batch_stats


def member_train_step(member: Members, idx_b, shared_args, static):
    """One member's step on examples idx_b: loss = mean_b CE(softmax(f(aug(x_b))), y_b), then the optimizer.

    shared_args = (data_x, data_y, dropout_rate); static = (model, tx, augment_fn, normalization).
    A member with active == False is returned unchanged. Returns (new member, {"loss", "acc"}).
    """
    data_x, data_y, dropout_rate = shared_args
    return member_batch_step(member, (jnp.take(data_x, idx_b, axis=0), jnp.take(data_y, idx_b, axis=0)),
                             (dropout_rate,), static)


def member_batch_step(member: Members, batch_b, shared_args, static):
    """`member_train_step` on a batch already gathered: batch_b = (uint8 images B×S×S×3, int32 labels B), as
    an `ImageStream` delivers them; shared_args = (dropout_rate,)."""
    (dropout_rate,) = shared_args
    x, y = batch_b
    model, tx, augment_fn, normalization = static
    key, aug_key, drop_key = jax.random.split(member.key, 3)
    if augment_fn is not None:
        x = augment_fn(aug_key, x)
    x = normalize(x, normalization)

    def loss_fn(params):
        logits, bs = apply_model(model, params, member.batch_stats, x, True, dropout_rate, drop_key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
        return loss, (logits, bs)

    (loss, (logits, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(member.params)
    updates, opt_state = tx.update(grads, member.opt_state, member.params)
    new = member.replace(params=optax.apply_updates(member.params, updates), batch_stats=bs,
                         opt_state=opt_state, key=key)
    new = jax.tree.map(lambda a, b: jnp.where(member.active, a, b), new, member)  # stopped: frozen
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return new, {"loss": loss, "acc": acc}


def member_probs(params, batch_stats, shared_args, static):
    """Returns softmax probabilities B×K of one member."""
    (x,) = shared_args
    model, normalization = static
    logits, _ = apply_model(model, params, batch_stats, normalize(x, normalization), False, None, None)
    return jax.nn.softmax(logits.astype(jnp.float32), -1)


def _over_members(fn, axis: str):
    """fn(a, b, shared, static) with member axes on a and b -> the same over all members."""
    if axis == "vmap":
        return lambda a, b, sa, st: jax.vmap(lambda u, v: fn(u, v, sa, st))(a, b)
    if axis == "map":
        return lambda a, b, sa, st: lax.map(lambda uv: fn(uv[0], uv[1], sa, st), (a, b))
    return fn  # "sequential": the per-member function, looped over in Python


_jit = functools.partial(jax.jit, static_argnums=3)
train_step = _jit(member_train_step, donate_argnums=0)
# STEP[axis](members, idx_mb, shared, static): looked up at call time, so a test may wrap an entry.
STEP = {a: _jit(_over_members(member_train_step, a), donate_argnums=0) for a in ("vmap", "map")}
STEP["sequential"] = train_step
# STEP_STREAM[axis](members, (x_mb, y_mb), (dropout,), static): the same step on batches streamed from disk.
STEP_STREAM = {a: _jit(_over_members(member_batch_step, a), donate_argnums=0) for a in ("vmap", "map")}
STEP_STREAM["sequential"] = _jit(member_batch_step, donate_argnums=0)
PROBS = {a: _jit(_over_members(member_probs, a)) for a in AXES}


@functools.partial(jax.jit, static_argnums=(0, 3))
def init_variables(model, key, x, normalization):
    """Returns model.init's variables for one member (dropout stream seeded by the same key)."""
    return model.init({"params": key, "dropout": key}, normalize(x, normalization), train=False)


@functools.partial(jax.jit, static_argnums=1)
def unstack(tree, num: int):
    """Returns the list of `num` per-member trees of a member-stacked tree."""
    return [jax.tree.map(lambda v: v[m], tree) for m in range(num)]


@jax.jit
def stack(trees):
    """Returns one member-stacked tree from a list of per-member trees."""
    return jax.tree.map(lambda *v: jnp.stack(v), *trees)


@jax.jit
def select(mask_m, new, old):
    """Per member: `new` where mask_m else `old` (leaves have a leading member axis)."""
    return jax.tree.map(lambda a, b: jnp.where(mask_m.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


@functools.partial(jax.jit, static_argnums=2)
def permutations(data_keys, epoch, n: int):
    """Returns M×n: member m's order of the n training examples in `epoch` (from its own data key)."""
    return jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, epoch), n))(data_keys)


@jax.jit
def finite_m(tree):
    """Returns M bool: True where every floating leaf of member m is finite."""
    flags = [jnp.all(jnp.isfinite(v).reshape(v.shape[0], -1), 1) for v in jax.tree.leaves(tree)
             if jnp.issubdtype(v.dtype, jnp.floating)]
    return jnp.all(jnp.stack(flags), 0) if flags else None


# ---------------------------------------------------------------- images streamed from a source
@dataclasses.dataclass(frozen=True)
class ImageStream:
    """The images of `indices` of a random-access source (a TFDS data source of encoded images, as
    `leukax.data.load_index` returns), decoded and resized to `image_size` when a batch needs them: grain reads
    them with `num_threads` threads and a prefetch buffer (`leukax.data.pipeline.epoch_dataset`), so training
    never holds more than a few batches of pixels. `image_fn(uint8 B×S×S×3) -> uint8` (e.g. smoothing) runs on
    every batch. Pass it as the x of `make_train`'s (x, y); y stays an in-memory label array."""
    source: Any
    indices: np.ndarray
    image_size: int
    image_fn: Callable | None = None
    num_threads: int = 2
    prefetch: int = 16

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple:
        return (len(self.indices), self.image_size, self.image_size, 3)

    def batches(self, positions, batch_size: int) -> Iterator[np.ndarray]:
        """Yields uint8 images of self.indices[positions], in that order, `batch_size` at a time."""
        from leukax.data import pipeline
        ds = pipeline.epoch_dataset(self.source, self.image_size, batch_size, shuffle=False,
                                    indices=np.asarray(self.indices)[np.asarray(positions)],
                                    num_threads=self.num_threads, prefetch=self.prefetch)
        for b in ds:
            yield b["image"] if self.image_fn is None else np.asarray(self.image_fn(b["image"]), np.uint8)

    def first(self) -> np.ndarray:
        """Returns the first image as a 1×S×S×3 batch (for initialising a model)."""
        return next(self.batches([0], 1))


def _stream_epoch_batches(stream: ImageStream, perm_mn: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """Yields M×B×S×S×3 uint8 per step: member m's batch s is stream[perm_mn[m, s·B:(s+1)·B]]; one grain pass
    over all members' orders, so decoding overlaps the previous step."""
    num, n = perm_mn.shape
    steps = n // batch
    flat = perm_mn[:, :steps * batch].reshape(num, steps, batch).transpose(1, 0, 2).reshape(-1)
    for x in stream.batches(flat, num * batch):
        yield x.reshape((num, batch) + x.shape[1:])


# ---------------------------------------------------------------- pure functions of the run
def init(spec: Spec, x_example, pretrained: dict | None = None) -> EnsembleState:
    """Returns the epoch-0 state. Keys: fold_in(PRNGKey(seed), 0 | 1 | 2) → inits | data orders | dropout.

    pretrained: {"params", "batch_stats"} copied into every member's "backbone" (the heads stay random).
    """
    cfg, tx, num = spec.config, spec.tx, spec.config.num_members
    x_example = x_example.first() if isinstance(x_example, ImageStream) else x_example
    root = jax.random.PRNGKey(cfg.seed)
    init_keys = jax.random.split(jax.random.fold_in(root, 0), num)
    per_member = []
    for m in range(num):
        variables = dict(init_variables(spec.model, init_keys[m], jnp.asarray(x_example[:1]), spec.normalization))
        params, bstats = variables["params"], variables.get("batch_stats", {})
        if pretrained is not None:
            params = {**params, "backbone": pretrained["params"]}
            if pretrained.get("batch_stats"):
                bstats = {**bstats, "backbone": pretrained["batch_stats"]}
        per_member.append((params, bstats, tx.init(params)))
    params, bstats, opt_state = stack(per_member)
    members = Members(params=params, batch_stats=bstats, opt_state=opt_state,
                      key=jax.random.split(jax.random.fold_in(root, 2), num), active=jnp.ones((num,), bool))
    nan_me = jnp.full((num, cfg.num_epochs), jnp.nan, jnp.float32)
    return EnsembleState(
        members=members, best_params=jax.tree.map(jnp.copy, params), best_batch_stats=jax.tree.map(jnp.copy, bstats),
        best_score=jnp.full((num,), -jnp.inf, jnp.float32), best_epoch=jnp.full((num,), -1, jnp.int32),
        bad_epochs=jnp.zeros((num,), jnp.int32), data_key=jax.random.split(jax.random.fold_in(root, 1), num),
        epoch=jnp.zeros((), jnp.int32), history={k: nan_me for k in HISTORY_KEYS})


def train_epoch(spec: Spec, members: Members, data_key, epoch: int, data) -> tuple[Members, np.ndarray, np.ndarray]:
    """One pass over data = (x, y int32) in each member's own order (full batches only: one compilation).

    Returns (members, loss_m, acc_m): the epoch-mean training loss and accuracy; nan for stopped members.
    """
    cfg, axis = spec.config, spec.axis
    x, y = data
    n, num = x.shape[0], cfg.num_members
    batch = min(cfg.batch_size, n)
    dropout = None if cfg.dropout_rate is None else jnp.float32(cfg.dropout_rate)
    static = (spec.model, spec.tx, spec.augment_fn, spec.normalization)
    perm_mn = np.asarray(permutations(data_key, epoch, n))
    active = np.asarray(members.active)
    run_m = np.flatnonzero(active) if axis == "sequential" else np.arange(num)
    mets = []
    per_member = unstack(members, num) if axis == "sequential" else None
    streamed = isinstance(x, ImageStream)
    images = _stream_epoch_batches(x, perm_mn, batch) if streamed else None
    y_np = np.asarray(y) if streamed else None
    for s in range(n // batch):
        idx_mb = perm_mn[:, s * batch:(s + 1) * batch]
        if streamed:  # the same step on the members' batches read from disk: (images, labels), (dropout,)
            step, shared = STEP_STREAM[axis], (dropout,)
            arg_mb = (jnp.asarray(next(images)), jnp.asarray(y_np[idx_mb], jnp.int32))
            arg_m = lambda m: (arg_mb[0][m], arg_mb[1][m])  # noqa: E731
        else:
            step, shared, arg_mb = STEP[axis], (x, y, dropout), jnp.asarray(idx_mb)
            arg_m = lambda m: arg_mb[m]  # noqa: E731
        if per_member is None:
            members, met = step(members, arg_mb, shared, static)
        else:  # a stopped member's step would leave it unchanged: skip it
            out = {}
            for m in run_m:
                per_member[m], out[m] = step(per_member[m], arg_m(m), shared, static)
            met = {k: jnp.stack([out[m][k] for m in run_m]) for k in ("loss", "acc")} if len(run_m) else None
        if met is not None:
            mets.append(met)
    if per_member is not None:
        members = stack(per_member)
    loss_m, acc_m = np.full(num, np.nan, np.float32), np.full(num, np.nan, np.float32)
    if mets and len(run_m):
        loss_m[run_m] = np.mean(np.stack([np.asarray(v["loss"]) for v in mets]), 0)
        acc_m[run_m] = np.mean(np.stack([np.asarray(v["acc"]) for v in mets]), 0)
    loss_m[~active], acc_m[~active] = np.nan, np.nan
    return members, loss_m, acc_m


def predict(spec: Spec, state: EnsembleState, x, use_best: bool = True) -> np.ndarray:
    """Returns probs_mnk (members × examples × classes) float32 for inputs x (images or features)."""
    params = state.best_params if use_best else state.members.params
    bstats = state.best_batch_stats if use_best else state.members.batch_stats
    static = (spec.model, spec.normalization)
    streamed = isinstance(x, ImageStream)
    x = x if streamed else jnp.asarray(x)
    n = len(x)
    bs = min(spec.config.eval_batch_size, n)
    per_member = unstack((params, bstats), spec.config.num_members) if spec.axis == "sequential" else None
    out = []
    images = x.batches(np.arange(n), bs) if streamed else None
    for s in range(0, n, bs):
        xb = jnp.asarray(next(images)) if streamed else x[s:s + bs]
        if xb.shape[0] < bs:  # pad the last batch by repeating its last row (fixed shapes)
            xb = jnp.concatenate([xb, jnp.repeat(xb[-1:], bs - xb.shape[0], 0)], 0)
        if per_member is None:
            p = PROBS[spec.axis](params, bstats, (xb,), static)
        else:
            p = jnp.stack([PROBS[spec.axis](*pv, (xb,), static) for pv in per_member])
        out.append(np.asarray(p)[:, : min(bs, n - s)])
    return np.concatenate(out, 1)


def evaluate(spec: Spec, state: EnsembleState, data, use_best: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns (nll_m, acc_m) of every member on data = (x, y): `leukax.metrics.nll` and accuracy."""
    nll_m, acc_m = _nll_acc_m(jnp.asarray(data[1], jnp.int32), predict(spec, state, data[0], use_best=use_best))
    return np.asarray(nll_m), np.asarray(acc_m)


@jax.jit
def _nll_acc_m(y_n, probs_mnk):
    return jax.vmap(metrics.nll, (None, 0))(y_n, probs_mnk), jnp.mean(jnp.argmax(probs_mnk, -1) == y_n, -1)


def record_history(state: EnsembleState, epoch: int, values: dict[str, np.ndarray]) -> EnsembleState:
    """Returns state with history[k][:, epoch] = values[k] (M each) for the keys given."""
    return state.replace(history=_set_column(state.history, epoch, values))


@jax.jit
def _set_column(history, epoch, values):
    return {k: v.at[:, epoch].set(jnp.asarray(values[k], jnp.float32)) if k in values else v
            for k, v in history.items()}


@functools.partial(jax.jit, static_argnames="patience")
def early_stopping_update(state: EnsembleState, score_m, patience: int | None) -> EnsembleState:
    """Returns the state after an epoch whose trained members (`state.members`) scored score_m (higher is better):
    `optim.early_stopping` per member; improved members' params become their best; epoch += 1."""
    members = state.members
    improved, best_score, bad, still = optim.early_stopping(jnp.asarray(score_m, jnp.float32), state.best_score,
                                                            state.bad_epochs, members.active, patience)
    return state.replace(
        members=members.replace(active=still),
        best_params=select(improved, members.params, state.best_params),
        best_batch_stats=select(improved, members.batch_stats, state.best_batch_stats),
        best_score=best_score, best_epoch=jnp.where(improved, state.epoch, state.best_epoch),
        bad_epochs=bad, epoch=state.epoch + 1)


def check_finite(members: Members, loss_m: np.ndarray, epoch: int) -> None:
    """Raises NonFiniteError naming the epoch (1-based) and members whose loss or parameters are nan/inf."""
    active = np.asarray(members.active)
    ok_m = np.asarray(finite_m((members.params, members.batch_stats, members.opt_state)))
    bad = [m for m in range(len(active)) if active[m] and not (np.isfinite(loss_m[m]) and ok_m[m])]
    if bad:
        what = ", ".join(f"member {m} (loss {loss_m[m]}, parameters {'finite' if ok_m[m] else 'non-finite'})"
                         for m in bad)
        raise NonFiniteError(f"leukax/train/finetune.py: epoch {epoch + 1}: non-finite training in {what}; "
                             f"stopped before saving this epoch, so the last checkpoint (epoch {epoch}) is "
                             f"intact. Lower the learning rate or check the inputs for nan/inf.")


def history(state: EnsembleState) -> dict[str, np.ndarray]:
    """Returns {"train_loss", "train_acc", "val_loss", "val_acc"}: M×epochs_done float32 (nan after a stop)."""
    e = int(state.epoch)
    return {k: np.asarray(v)[:, :e] for k, v in state.history.items()}


# ---------------------------------------------------------------- the loop (I/O lives here)
def fit(spec: Spec, train_data, val_data=None, state: EnsembleState | None = None, checkpoint_dir=None,
        until_epoch: int | None = None, pretrained: dict | None = None) -> EnsembleState:
    """Trains until `until_epoch` (default config.num_epochs) or until every member stopped early.

    With `checkpoint_dir`: resumes from its newest readable checkpoint and saves after every finite epoch.
    A nan/inf loss or parameter raises NonFiniteError before anything of that epoch is saved.
    """
    cfg = spec.config
    x, y = _as_data(train_data)
    state = init(spec, x, pretrained) if state is None else state
    mngr = ckpt_lib.manager(checkpoint_dir) if checkpoint_dir is not None else None
    if mngr is not None:
        restored, step = ckpt_lib.restore_latest(mngr, state)
        if restored is not None:
            state = restored
            log.info("resumed from %s at epoch %d", checkpoint_dir, step)
    end = cfg.num_epochs if until_epoch is None else min(until_epoch, cfg.num_epochs)
    bar = _progress_bar(cfg, end, int(state.epoch))
    try:
        for epoch in range(int(state.epoch), end):
            active = np.asarray(state.members.active)
            if not active.any():
                break
            members, loss_m, acc_m = train_epoch(spec, state.members, state.data_key, epoch, (x, y))
            check_finite(members, loss_m, epoch)
            state = state.replace(members=members)  # the old members' buffers were donated to the step
            values = {"train_loss": loss_m, "train_acc": acc_m}
            if val_data is not None:
                nll_m, vacc_m = evaluate(spec, state, val_data)
                values.update(val_loss=np.where(active, nll_m, np.nan), val_acc=np.where(active, vacc_m, np.nan))
                score_m = vacc_m if cfg.monitor == "val_acc" else -nll_m
            else:  # no validation split: the latest params are the best
                score_m = np.full(cfg.num_members, float(epoch))
            state = early_stopping_update(record_history(state, epoch, values), score_m, cfg.patience)
            _log_epoch(epoch, end, values, np.asarray(state.members.active), bar)
            if mngr is not None:
                ckpt_lib.save(mngr, epoch + 1, state)
    finally:
        if bar is not None:
            bar.close()
        if mngr is not None:
            mngr.close()
    return state


def _as_data(data):
    """(x, y) with y int32 on the device and x on the device, or left as an `ImageStream`."""
    x, y = data
    return (x if isinstance(x, ImageStream) else jnp.asarray(x)), jnp.asarray(y, jnp.int32)


def _progress_bar(cfg: TrainConfig, end: int, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=end, initial=start, desc="ensemble", unit="epoch")


def _log_epoch(epoch: int, end: int, values: dict, still_m: np.ndarray, bar) -> None:
    v = {k: values.get(k, np.full(len(still_m), np.nan)) for k in HISTORY_KEYS}
    log.info("epoch %d/%d %s", epoch + 1, end, " ".join(
        f"m{m}:loss={v['train_loss'][m]:.4f},acc={v['train_acc'][m]:.3f},val_loss={v['val_loss'][m]:.4f},"
        f"val_acc={v['val_acc'][m]:.3f}{'' if still_m[m] else '(stopped)'}" for m in range(len(still_m))))
    if bar is not None:
        with np.errstate(all="ignore"):
            bar.set_postfix(loss=float(np.nanmean(v["train_loss"])), val_acc=float(np.nanmean(v["val_acc"])))
        bar.update(1)


class Train(NamedTuple):
    """The module functions bound to one config, model and data set (`make_train`); `fit` does I/O."""
    init_state: Callable[[], EnsembleState]
    fit: Callable[..., EnsembleState]
    evaluate: Callable[..., tuple[np.ndarray, np.ndarray]]
    predict: Callable[..., np.ndarray]
    history: Callable[[EnsembleState], dict]
    axis: str


def make_train(config: TrainConfig, model, train_data, val_data=None, *, augment_fn=None,
               pretrained: dict | None = None) -> Train:
    """Returns a `Train` for `model` on in-memory data.

    train_data / val_data: (x, y), x = uint8 images N×S×S×3 (normalised in the step by `config.normalization`;
    None leaves any input as it is) or an `ImageStream` (read from disk batch by batch; same results). augment_fn(key, x_b...) -> x_b: per-member augmentation.
    pretrained: {"params": ..., "batch_stats": ...} copied into every member's "backbone" submodule.
    fit(state=None, checkpoint_dir=None, until_epoch=None); evaluate(state, data, use_best=False);
    predict(state, x, use_best=True); history(state).
    """
    spec = Spec(config, model, augment_fn)
    data = _as_data(train_data)

    def run(state=None, checkpoint_dir=None, until_epoch=None):
        return fit(spec, data, val_data, state, checkpoint_dir, until_epoch, pretrained)

    return Train(init_state=lambda: init(spec, data[0], pretrained), fit=run,
                 evaluate=functools.partial(evaluate, spec), predict=functools.partial(predict, spec),
                 history=history, axis=spec.axis)
