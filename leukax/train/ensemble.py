"""Deep-ensemble trainer (purejaxrl style): M members with a leading member axis on every state leaf.

Each member has its own init seed, dropout keys, data order (a permutation per epoch) and augmentation
draws. `train_step` is one member's pure step; the ensemble step maps it over members with an
ensemble-axis strategy: "vmap" (jax.vmap), "map" (lax.map) or "sequential" (a Python loop over members
calling the jitted per-member step). Two modes:
- "finetune": `model` is a `Classifier`; inputs are uint8 images, augmented then normalised in the step;
- "head": `model` is any head module; inputs are cached frozen-backbone features (see `features.py`).
`make_train` returns a `Train` of pure functions; the ensemble state is a dict of arrays (Orbax-saveable).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from leukax import preprocess
from leukax.train import checkpoint as ckpt_lib
from leukax.train.optim import get_optimizer, set_hyperparams

log = logging.getLogger(__name__)

# Counts traces of the member functions (incremented at trace time only); tests use it to prove
# that changing learning rate / momentum / dropout between trials does not recompile.
TRACES: collections.Counter = collections.Counter()

# Ensemble-axis choice per (backend, mode), from results/benchmarks/ensemble_axis.md (2 quiet CPU cores):
# finetune MobileNetV2-0.35 at 96 px, M=3: lax.map 1.61, sequential 1.29, vmap 1.16 ensemble steps/s (the tiny
# test net favours sequential, but real backbones are what finetune trains); head mode: vmap 77.6, map 55.7,
# sequential 49.9. GPU backends default to vmap (not yet measured here).
AUTO_AXIS = {("cpu", "finetune"): "map", ("cpu", "head"): "vmap"}
AXES = ("vmap", "map", "sequential")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one ensemble run. `monitor`: "val_loss" (lower is better) or "val_acc"."""
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


def resolve_axis(axis: str, mode: str) -> str:
    """Maps "auto" to the measured fastest strategy for this backend and mode."""
    if axis == "auto":
        return AUTO_AXIS.get((jax.default_backend(), mode), "vmap")
    if axis not in AXES:
        raise ValueError(f"leukax/train/ensemble.py: ensemble_axis must be auto|{'|'.join(AXES)}, got {axis!r}")
    return axis


# ---------------------------------------------------------------- per-member pure functions
def normalize(x, name: str | None):
    """Returns float32 `x`: `leukax.preprocess.normalize(x, name)`, or just cast when name is None (features)."""
    return x.astype(jnp.float32) if name is None else preprocess.normalize(x, name)


def _apply(model, params, batch_stats, x, train: bool, dropout_rate, rng):
    """Returns (logits_bk, batch_stats after the call)."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    kw = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
    rngs = {"dropout": rng} if rng is not None else None
    if train and batch_stats:
        (logits, _), new = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"], **kw)
        return logits, new["batch_stats"]
    logits, _ = model.apply(variables, x, train=train, rngs=rngs, **kw)
    return logits, batch_stats


def member_train_step(member, idx_b, shared_args, static):
    """One member's optimizer step on examples idx_b. shared_args = (data_x, data_y, dropout_rate);
    static = (model, tx, augment_fn, normalization). Returns (new member state, {"loss", "acc"})."""
    TRACES["train_step"] += 1
    data_x, data_y, dropout_rate = shared_args
    model, tx, augment_fn, normalization = static
    key, aug_key, drop_key = jax.random.split(member["key"], 3)
    x, y = jnp.take(data_x, idx_b, axis=0), jnp.take(data_y, idx_b, axis=0)
    if augment_fn is not None:
        x = augment_fn(aug_key, x)
    x = normalize(x, normalization)

    def loss_fn(params):
        logits, bs = _apply(model, params, member["batch_stats"], x, True, dropout_rate, drop_key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
        return loss, (logits, bs)

    (loss, (logits, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(member["params"])
    updates, opt_state = tx.update(grads, member["opt_state"], member["params"])
    new = dict(member, params=optax.apply_updates(member["params"], updates), batch_stats=bs,
               opt_state=opt_state, key=key)
    new = jax.tree.map(lambda a, b: jnp.where(member["active"], a, b), new, member)  # stopped: frozen
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return new, {"loss": loss, "acc": acc}


def member_probs(params, batch_stats, shared_args, static):
    """Returns softmax probabilities B×K of one member."""
    TRACES["probs"] += 1
    (x,) = shared_args
    model, normalization = static
    logits, _ = _apply(model, params, batch_stats, normalize(x, normalization), False, None, None)
    return jax.nn.softmax(logits.astype(jnp.float32), -1)


def _over_members(fn, axis: str):
    """fn(a, b, shared, static) with member axes on a and b -> the same over all members."""
    if axis == "vmap":
        return lambda a, b, sa, st: jax.vmap(lambda u, v: fn(u, v, sa, st))(a, b)
    if axis == "map":
        return lambda a, b, sa, st: lax.map(lambda uv: fn(uv[0], uv[1], sa, st), (a, b))
    return fn  # "sequential": the per-member function, looped over in Python


# Module-level jitted functions: jit caches on the static tuple, so equal models/optimizers reuse them.
_jit = functools.partial(jax.jit, static_argnums=3)
train_step = _jit(member_train_step, donate_argnums=0)
STEP = {a: _jit(_over_members(member_train_step, a), donate_argnums=0) for a in ("vmap", "map")}
STEP["sequential"] = train_step
PROBS = {a: _jit(_over_members(member_probs, a)) for a in AXES}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _init_member(model, key, x, normalization):
    return model.init({"params": key, "dropout": key}, normalize(x, normalization), train=False)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree, num: int):
    return [jax.tree.map(lambda v: v[m], tree) for m in range(num)]


@jax.jit
def _stack(trees):
    return jax.tree.map(lambda *v: jnp.stack(v), *trees)


@jax.jit
def _select(mask_m, new, old):
    """Per member: `new` where mask_m else `old` (leaves have a leading member axis)."""
    return jax.tree.map(lambda a, b: jnp.where(mask_m.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


@functools.partial(jax.jit, static_argnums=2)
def _permutations(data_keys, epoch, n: int):
    return jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, epoch), n))(data_keys)


def _member(state, m: int):
    return jax.tree.map(lambda v: v[m], state)


# ---------------------------------------------------------------- the trainer
class Train(NamedTuple):
    """Pure functions of one ensemble run (see `make_train`)."""
    init_state: Callable[[], dict]
    fit: Callable[..., dict]
    evaluate: Callable[..., tuple[np.ndarray, np.ndarray]]
    predict: Callable[..., np.ndarray]
    history: Callable[[dict], dict]
    axis: str


def make_train(config: TrainConfig, model, train_data, val_data=None, *, augment_fn=None,
               pretrained: dict | None = None) -> Train:
    """Returns a `Train` for `model` on in-memory data.

    train_data / val_data: (x, y). finetune mode: x = uint8 images N×S×S×3 (normalised in the step by
    `config.normalization`); head mode: x = cached features of any shape N×..., normalisation None.
    augment_fn(key, x_b...) -> x_b: per-member augmentation (finetune mode only).
    pretrained: {"params": ..., "batch_stats": ...} copied into every member's "backbone" submodule
    (finetune mode; the heads keep their per-member random init).
    """
    cfg = config
    if cfg.mode not in ("finetune", "head"):
        raise ValueError(f"leukax/train/ensemble.py: mode must be finetune|head, got {cfg.mode!r}")
    if cfg.mode == "head" and augment_fn is not None:
        raise ValueError("leukax/train/ensemble.py: augment_fn needs images; head mode trains on cached features")
    axis = resolve_axis(cfg.ensemble_axis, cfg.mode)
    num = cfg.num_members
    tx = get_optimizer(cfg.optimizer)
    norm = cfg.normalization if cfg.mode == "finetune" else None
    x_tr, y_tr = jnp.asarray(train_data[0]), jnp.asarray(train_data[1], jnp.int32)
    n_tr = x_tr.shape[0]
    batch = min(cfg.batch_size, n_tr)
    steps = n_tr // batch  # the last partial batch is dropped (fixed shapes: one compilation)
    dropout = None if cfg.dropout_rate is None else jnp.float32(cfg.dropout_rate)
    static_train = (model, tx, augment_fn, norm)
    static_probs = (model, norm)
    higher_better = cfg.monitor == "val_acc"
    if cfg.monitor not in ("val_loss", "val_acc"):
        raise ValueError(f"leukax/train/ensemble.py: monitor must be val_loss|val_acc, got {cfg.monitor!r}")

    def init_state() -> dict:
        """Returns the member-stacked state: params, batch_stats, opt_state, key, active + bookkeeping."""
        root = jax.random.PRNGKey(cfg.seed)
        init_keys = jax.random.split(jax.random.fold_in(root, 0), num)
        members = []
        for m in range(num):
            variables = dict(_init_member(model, init_keys[m], x_tr[:1], norm))
            params, bstats = variables["params"], variables.get("batch_stats", {})
            if pretrained is not None:
                params = {**params, "backbone": pretrained["params"]}
                if pretrained.get("batch_stats"):
                    bstats = {**bstats, "backbone": pretrained["batch_stats"]}
            opt_state = set_hyperparams(tx.init(params), learning_rate=cfg.learning_rate, momentum=cfg.momentum)
            members.append({"params": params, "batch_stats": bstats, "opt_state": opt_state})
        train = _stack(members)
        train["key"] = jax.random.split(jax.random.fold_in(root, 2), num)
        train["active"] = jnp.ones((num,), bool)
        nan_me = jnp.full((num, cfg.num_epochs), jnp.nan, jnp.float32)
        return {
            "train": train,
            "data_key": jax.random.split(jax.random.fold_in(root, 1), num),
            "best": jax.tree.map(jnp.copy, {"params": train["params"], "batch_stats": train["batch_stats"]}),
            "best_score": jnp.full((num,), -jnp.inf, jnp.float32),
            "best_epoch": jnp.full((num,), -1, jnp.int32),
            "bad_epochs": jnp.zeros((num,), jnp.int32),
            "epoch": jnp.zeros((), jnp.int32),
            "history": {k: nan_me for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
        }

    def _batches(x, bs):
        """Yields (x_b padded to bs, valid mask_b, start) over x."""
        n = x.shape[0]
        for s in range(0, n, bs):
            xb = x[s:s + bs]
            pad = bs - xb.shape[0]
            mask = jnp.arange(bs) < xb.shape[0]
            if pad:
                xb = jnp.concatenate([xb, jnp.repeat(xb[-1:], pad, 0)], 0)
            yield xb, mask, s

    def evaluate(state: dict, data, use_best: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Returns (mean NLL_m, accuracy_m) of every member on data = (x, y)."""
        probs_mnk = predict(state, data[0], use_best=use_best)
        y = np.asarray(data[1])
        p_true_mn = np.take_along_axis(probs_mnk, y[None, :, None], -1)[..., 0]
        nll_m = -np.mean(np.log(np.maximum(p_true_mn, np.finfo(np.float32).tiny)), -1)
        return nll_m, np.mean(probs_mnk.argmax(-1) == y, -1)

    def predict(state: dict, x, use_best: bool = True) -> np.ndarray:
        """Returns probs_mnk (members × examples × classes) float32 for inputs x (images or features)."""
        src = state["best"] if use_best else state["train"]
        x = jnp.asarray(x)
        bs = min(cfg.eval_batch_size, x.shape[0])
        members = _unstack((src["params"], src["batch_stats"]), num) if axis == "sequential" else None
        out = []
        for xb, mask, s in _batches(x, bs):
            if members is None:
                p = PROBS[axis](src["params"], src["batch_stats"], (xb,), static_probs)
            else:
                p = jnp.stack([PROBS[axis](*mv, (xb,), static_probs) for mv in members])
            out.append(np.asarray(p)[:, : int(mask.sum())])
        return np.concatenate(out, 1)

    def _train_epoch(train: dict, data_key, epoch: int):
        """Returns (train state, loss_m, acc_m) after one epoch; stopped members report nan."""
        perm = np.asarray(_permutations(data_key, epoch, n_tr))
        active = np.asarray(train["active"])
        loss, acc = [], []
        if axis == "sequential":
            members = _unstack(train, num)
            for s in range(steps):
                mets = []
                for m in range(num):
                    if not active[m]:  # a stopped member's step would leave it unchanged
                        continue
                    idx = jnp.asarray(perm[m, s * batch:(s + 1) * batch])
                    members[m], met = train_step(members[m], idx, (x_tr, y_tr, dropout), static_train)
                    mets.append(met)
                loss.append(jnp.stack([mt["loss"] for mt in mets]))
                acc.append(jnp.stack([mt["acc"] for mt in mets]))
            train = _stack(members)
        else:
            for s in range(steps):
                idx = jnp.asarray(perm[:, s * batch:(s + 1) * batch])
                train, met = STEP[axis](train, idx, (x_tr, y_tr, dropout), static_train)
                loss.append(met["loss"])
                acc.append(met["acc"])
        loss_m = np.full(num, np.nan, np.float32)
        acc_m = np.full(num, np.nan, np.float32)
        if loss:
            act = np.flatnonzero(active) if axis == "sequential" else np.arange(num)
            loss_m[act] = np.mean(np.stack([np.asarray(v) for v in loss]), 0)
            acc_m[act] = np.mean(np.stack([np.asarray(v) for v in acc]), 0)
        loss_m[~active], acc_m[~active] = np.nan, np.nan
        return train, loss_m, acc_m

    def fit(state: dict | None = None, checkpoint_dir=None, until_epoch: int | None = None) -> dict:
        """Trains until `until_epoch` (default config.num_epochs) or until every member stopped early.

        With `checkpoint_dir`, resumes from its newest checkpoint and saves after every epoch.
        Returns the final state (``state["best"]`` holds each member's best params by `config.monitor`).
        """
        state = init_state() if state is None else state
        mngr = None
        if checkpoint_dir is not None:
            mngr = ckpt_lib.manager(checkpoint_dir)
            restored, step = ckpt_lib.restore_latest(mngr, state)
            if restored is not None:
                state = restored
                log.info("resumed from %s at epoch %d", checkpoint_dir, step)
        end = cfg.num_epochs if until_epoch is None else min(until_epoch, cfg.num_epochs)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=end, initial=int(state["epoch"]), desc="ensemble", unit="epoch")
        for epoch in range(int(state["epoch"]), end):
            active = np.asarray(state["train"]["active"])
            if not active.any():
                break
            train, tr_loss, tr_acc = _train_epoch(state["train"], state["data_key"], epoch)
            state = dict(state, train=train)
            hist = {k: np.array(v) for k, v in state["history"].items()}
            hist["train_loss"][:, epoch], hist["train_acc"][:, epoch] = tr_loss, tr_acc
            if val_data is not None:
                va_loss, va_acc = evaluate(state, val_data)
                va_loss[~active], va_acc[~active] = np.nan, np.nan
                hist["val_loss"][:, epoch], hist["val_acc"][:, epoch] = va_loss, va_acc
                score = va_acc if higher_better else -va_loss
            else:  # no validation split: the latest params are the best
                score = np.full(num, float(epoch))
            best_score = np.asarray(state["best_score"])
            improved = active & (score > best_score)
            bad = np.where(improved, 0, np.asarray(state["bad_epochs"]) + active)
            still = active.copy()
            if cfg.patience is not None:
                still &= bad < cfg.patience
            best_src = {"params": train["params"], "batch_stats": train["batch_stats"]}
            state.update(
                best=_select(jnp.asarray(improved), best_src, state["best"]),
                best_score=jnp.asarray(np.where(improved, score, best_score), jnp.float32),
                best_epoch=jnp.asarray(np.where(improved, epoch, np.asarray(state["best_epoch"])), jnp.int32),
                bad_epochs=jnp.asarray(bad, jnp.int32),
                epoch=jnp.asarray(epoch + 1, jnp.int32),
                history={k: jnp.asarray(v) for k, v in hist.items()},
                train=dict(train, active=jnp.asarray(still)))
            msg = " ".join(f"m{m}:loss={tr_loss[m]:.4f},acc={tr_acc[m]:.3f},val_loss={hist['val_loss'][m, epoch]:.4f},"
                           f"val_acc={hist['val_acc'][m, epoch]:.3f}{'' if still[m] else '(stopped)'}"
                           for m in range(num))
            log.info("epoch %d/%d %s", epoch + 1, end, msg)
            if bar is not None:
                bar.set_postfix(loss=float(np.nanmean(tr_loss)) if active.any() else np.nan,
                                val_acc=float(np.nanmean(hist["val_acc"][:, epoch])) if val_data is not None else np.nan)
                bar.update(1)
            if mngr is not None:
                ckpt_lib.save(mngr, epoch + 1, state)
        if bar is not None:
            bar.close()
        if mngr is not None:
            mngr.close()
        return state

    def history(state: dict) -> dict[str, np.ndarray]:
        """Returns {"train_loss", "train_acc", "val_loss", "val_acc"}: M×epochs_done float32 (nan after a stop)."""
        e = int(state["epoch"])
        return {k: np.asarray(v)[:, :e] for k, v in state["history"].items()}

    return Train(init_state, fit, evaluate, predict, history, axis)


def member_variables(state: dict, m: int, use_best: bool = True) -> dict[str, Any]:
    """Returns member m's flax variables {"params", "batch_stats"?} (e.g. for Grad-CAM or export)."""
    src = state["best"] if use_best else state["train"]
    out = {"params": _member(src["params"], m)}
    if src["batch_stats"]:
        out["batch_stats"] = _member(src["batch_stats"], m)
    return out
