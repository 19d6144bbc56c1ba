"""One member's pure functions and the ensemble-axis strategies that map them over M members.

`member_train_step` is one member's optimizer step; `member_probs` one member's softmax. The ensemble maps
them over a leading member axis with "vmap" (jax.vmap), "map" (lax.map) or "sequential" (a Python loop over
members calling the jitted per-member function). The jitted functions live at module level and take the
model, optimizer, augmentation and normalisation as one static tuple, so equal models and optimizers share
one compilation (a Bayesian-optimisation trial that changes only learning rate, momentum or dropout
recompiles nothing: those are optimizer state and a traced scalar).
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from leukax.preprocess import normalize

# Counts traces of the member functions (incremented at trace time only); tests use it to prove
# that changing learning rate / momentum / dropout between trials does not recompile.
TRACES: collections.Counter = collections.Counter()

# Ensemble-axis choice per (backend, mode), from results/benchmarks/ensemble_axis.md (2 quiet CPU cores):
# finetune MobileNetV2-0.35 at 96 px, M=3: lax.map 1.61, sequential 1.29, vmap 1.16 ensemble steps/s (the tiny
# test net favours sequential, but real backbones are what finetune trains); head mode: vmap 77.6, map 55.7,
# sequential 49.9. GPU backends default to vmap (not yet measured here).
AUTO_AXIS = {("cpu", "finetune"): "map", ("cpu", "head"): "vmap"}
AXES = ("vmap", "map", "sequential")


@struct.dataclass
class Members:
    """The training state of M members; every leaf has a leading member axis M.

    params / batch_stats: flax variables; opt_state: optax state with injected hyper-parameters; key: M×2
    PRNG keys for dropout and augmentation; active: M bool, False once early stopping stopped the member.
    """
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    key: jax.Array
    active: jax.Array


def resolve_axis(axis: str, mode: str) -> str:
    """Maps "auto" to the measured fastest strategy for this backend and mode."""
    if axis == "auto":
        return AUTO_AXIS.get((jax.default_backend(), mode), "vmap")
    if axis not in AXES:
        raise ValueError(f"leukax/train/members.py: ensemble_axis must be auto|{'|'.join(AXES)}, got {axis!r}")
    return axis


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
    TRACES["train_step"] += 1
    data_x, data_y, dropout_rate = shared_args
    model, tx, augment_fn, normalization = static
    key, aug_key, drop_key = jax.random.split(member.key, 3)
    x, y = jnp.take(data_x, idx_b, axis=0), jnp.take(data_y, idx_b, axis=0)
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
    TRACES["probs"] += 1
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
