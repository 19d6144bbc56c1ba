"""Deep-ensemble trainer (purejaxrl style): M members with a leading member axis on every state leaf.

Each member has its own init seed, dropout keys, data order (a permutation per epoch) and augmentation
draws. Two modes:
- "finetune": `model` is a `Classifier`; inputs are uint8 images, augmented then normalised in the step;
- "head": `model` is any head module; inputs are cached frozen-backbone features (see `features.py`).

The run's state is an `EnsembleState` (a `flax.struct.dataclass`, saved and restored whole by Orbax). The
module-level functions are pure: `init`, `train_epoch`, `evaluate`, `predict`, `record_history`,
`early_stopping_update`. `fit` only sequences them, with logging, a progress bar, a finiteness check and
checkpoints. `make_train` binds a config, a model and data into a `Train` of those functions.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from leukax import metrics
from leukax.train import checkpoint as ckpt_lib
from leukax.train import members as mb
from leukax.train.members import AXES, TRACES, Members, resolve_axis  # noqa: F401  (public)
from leukax.train.optim import get_optimizer, set_hyperparams

log = logging.getLogger(__name__)
HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one ensemble run. `monitor`: "val_loss" (lower is better) or "val_acc".

    momentum: sgd / rmsprop momentum, adam's b1; None keeps the Keras default (sgd 0, rmsprop 0, adam b1 0.9).
    """
    num_members: int = 3
    mode: str = "finetune"
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


@dataclasses.dataclass(frozen=True)
class Spec:
    """What stays fixed during a run: config, model, augmentation; validated on construction."""
    config: TrainConfig
    model: Any
    augment_fn: Callable | None = None

    def __post_init__(self):
        cfg = self.config
        if cfg.mode not in ("finetune", "head"):
            raise ValueError(f"leukax/train/ensemble.py: mode must be finetune|head, got {cfg.mode!r}")
        if cfg.mode == "head" and self.augment_fn is not None:
            raise ValueError("leukax/train/ensemble.py: augment_fn needs images; head mode trains on features")
        if cfg.monitor not in ("val_loss", "val_acc"):
            raise ValueError(f"leukax/train/ensemble.py: monitor must be val_loss|val_acc, got {cfg.monitor!r}")
        resolve_axis(cfg.ensemble_axis, cfg.mode)

    @property
    def axis(self) -> str:
        return resolve_axis(self.config.ensemble_axis, self.config.mode)

    @property
    def normalization(self) -> str | None:
        return self.config.normalization if self.config.mode == "finetune" else None

    @property
    def tx(self):
        return get_optimizer(self.config.optimizer)


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


# ---------------------------------------------------------------- pure functions of the run
def init(spec: Spec, x_example, pretrained: dict | None = None) -> EnsembleState:
    """Returns the epoch-0 state. Keys: fold_in(PRNGKey(seed), 0 | 1 | 2) → inits | data orders | dropout.

    pretrained: {"params", "batch_stats"} copied into every member's "backbone" (the heads stay random).
    """
    cfg, tx, num = spec.config, spec.tx, spec.config.num_members
    root = jax.random.PRNGKey(cfg.seed)
    init_keys = jax.random.split(jax.random.fold_in(root, 0), num)
    per_member = []
    for m in range(num):
        variables = dict(mb.init_variables(spec.model, init_keys[m], jnp.asarray(x_example[:1]), spec.normalization))
        params, bstats = variables["params"], variables.get("batch_stats", {})
        if pretrained is not None:
            params = {**params, "backbone": pretrained["params"]}
            if pretrained.get("batch_stats"):
                bstats = {**bstats, "backbone": pretrained["batch_stats"]}
        opt_state = set_hyperparams(tx.init(params), learning_rate=cfg.learning_rate, momentum=cfg.momentum)
        per_member.append((params, bstats, opt_state))
    params, bstats, opt_state = mb.stack(per_member)
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
    perm_mn = np.asarray(mb.permutations(data_key, epoch, n))
    active = np.asarray(members.active)
    run_m = np.flatnonzero(active) if axis == "sequential" else np.arange(num)
    mets = []
    per_member = mb.unstack(members, num) if axis == "sequential" else None
    for s in range(n // batch):
        idx_mb = perm_mn[:, s * batch:(s + 1) * batch]
        if per_member is None:
            members, met = mb.STEP[axis](members, jnp.asarray(idx_mb), (x, y, dropout), static)
        else:  # a stopped member's step would leave it unchanged: skip it
            out = {}
            for m in run_m:
                per_member[m], out[m] = mb.STEP[axis](per_member[m], jnp.asarray(idx_mb[m]), (x, y, dropout), static)
            met = {k: jnp.stack([out[m][k] for m in run_m]) for k in ("loss", "acc")} if len(run_m) else None
        if met is not None:
            mets.append(met)
    if per_member is not None:
        members = mb.stack(per_member)
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
    x = jnp.asarray(x)
    n = x.shape[0]
    bs = min(spec.config.eval_batch_size, n)
    per_member = mb.unstack((params, bstats), spec.config.num_members) if spec.axis == "sequential" else None
    out = []
    for s in range(0, n, bs):
        xb = x[s:s + bs]
        if xb.shape[0] < bs:  # pad the last batch by repeating its last row (fixed shapes)
            xb = jnp.concatenate([xb, jnp.repeat(xb[-1:], bs - xb.shape[0], 0)], 0)
        if per_member is None:
            p = mb.PROBS[spec.axis](params, bstats, (xb,), static)
        else:
            p = jnp.stack([mb.PROBS[spec.axis](*pv, (xb,), static) for pv in per_member])
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
    """Returns the state after an epoch whose trained members (`state.members`) scored score_m (higher is better).

    improved_m = active_m ∧ score_m > best_score_m: best params/score/epoch ← this epoch's;
    bad_m = 0 if improved_m else bad_m + active_m; active_m ← active_m ∧ bad_m < patience; epoch += 1.
    """
    members = state.members
    active = members.active
    score_m = jnp.asarray(score_m, jnp.float32)
    improved = active & (score_m > state.best_score)
    bad = jnp.where(improved, 0, state.bad_epochs + active.astype(jnp.int32))
    still = active if patience is None else active & (bad < patience)
    return state.replace(
        members=members.replace(active=still),
        best_params=mb.select(improved, members.params, state.best_params),
        best_batch_stats=mb.select(improved, members.batch_stats, state.best_batch_stats),
        best_score=jnp.where(improved, score_m, state.best_score),
        best_epoch=jnp.where(improved, state.epoch, state.best_epoch),
        bad_epochs=bad.astype(jnp.int32), epoch=state.epoch + 1)


def check_finite(members: Members, loss_m: np.ndarray, epoch: int) -> None:
    """Raises NonFiniteError naming the epoch (1-based) and members whose loss or parameters are nan/inf."""
    active = np.asarray(members.active)
    ok_m = np.asarray(mb.finite_m((members.params, members.batch_stats, members.opt_state)))
    bad = [m for m in range(len(active)) if active[m] and not (np.isfinite(loss_m[m]) and ok_m[m])]
    if bad:
        what = ", ".join(f"member {m} (loss {loss_m[m]}, parameters {'finite' if ok_m[m] else 'non-finite'})"
                         for m in bad)
        raise NonFiniteError(f"leukax/train/ensemble.py: epoch {epoch + 1}: non-finite training in {what}; "
                             f"stopped before saving this epoch, so the last checkpoint (epoch {epoch}) is "
                             f"intact. Lower the learning rate or check the inputs for nan/inf.")


def history(state: EnsembleState) -> dict[str, np.ndarray]:
    """Returns {"train_loss", "train_acc", "val_loss", "val_acc"}: M×epochs_done float32 (nan after a stop)."""
    e = int(state.epoch)
    return {k: np.asarray(v)[:, :e] for k, v in state.history.items()}


def member_variables(state: EnsembleState, m: int, use_best: bool = True) -> dict[str, Any]:
    """Returns member m's flax variables {"params", "batch_stats"?} (e.g. for Grad-CAM or export)."""
    params = state.best_params if use_best else state.members.params
    bstats = state.best_batch_stats if use_best else state.members.batch_stats
    out = {"params": jax.tree.map(lambda v: v[m], params)}
    if bstats:
        out["batch_stats"] = jax.tree.map(lambda v: v[m], bstats)
    return out


# ---------------------------------------------------------------- the loop (I/O lives here)
def fit(spec: Spec, train_data, val_data=None, state: EnsembleState | None = None, checkpoint_dir=None,
        until_epoch: int | None = None, pretrained: dict | None = None) -> EnsembleState:
    """Trains until `until_epoch` (default config.num_epochs) or until every member stopped early.

    With `checkpoint_dir`: resumes from its newest readable checkpoint and saves after every finite epoch.
    A nan/inf loss or parameter raises NonFiniteError before anything of that epoch is saved.
    """
    cfg = spec.config
    x, y = jnp.asarray(train_data[0]), jnp.asarray(train_data[1], jnp.int32)
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

    train_data / val_data: (x, y). finetune mode: x = uint8 images N×S×S×3 (normalised in the step by
    `config.normalization`); head mode: x = cached features of any shape N×..., normalisation None.
    augment_fn(key, x_b...) -> x_b: per-member augmentation (finetune mode only).
    pretrained: {"params": ..., "batch_stats": ...} copied into every member's "backbone" submodule.
    fit(state=None, checkpoint_dir=None, until_epoch=None); evaluate(state, data, use_best=False);
    predict(state, x, use_best=True); history(state).
    """
    spec = Spec(config, model, augment_fn)
    data = (jnp.asarray(train_data[0]), jnp.asarray(train_data[1], jnp.int32))

    def run(state=None, checkpoint_dir=None, until_epoch=None):
        return fit(spec, data, val_data, state, checkpoint_dir, until_epoch, pretrained)

    return Train(init_state=lambda: init(spec, data[0], pretrained), fit=run,
                 evaluate=functools.partial(evaluate, spec), predict=functools.partial(predict, spec),
                 history=history, axis=spec.axis)
