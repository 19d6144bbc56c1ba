"""The one optimizer factory and the one early-stopping rule of leukax's trainers (`compiled` for head mode,
`finetune` for backbone + head), both pure and usable on traced values.

Optimizers (`make`): hyper-parameters may be Python floats or traced arrays (the compiled trainer traces them
per trial, so a Bayesian-optimisation trial never recompiles); the learning rate may be a schedule
``count -> lr``. Keras defaults where the papers used Keras:

    adamw     decoupled weight decay:  p ← p − lr·(Adam(g) + λ·p)                  (b1 0.9, b2 0.999, eps 1e-8)
    adam      coupled L2:  g ← g + λ·p, then Keras Adam (b1 0.9, b2 0.999, eps 1e-7)
    sgd       coupled L2, then Keras SGD: v ← μ·v + g, p ← p − lr·v               (μ = 0: plain SGD)
    rmsprop   coupled L2, then Keras RMSprop (ρ 0.9, eps 1e-7 outside the sqrt, momentum μ)

``momentum`` μ is SGD's and RMSprop's (None = Keras's default 0); Adam's b1 stays 0.9. A weight decay that is
the Python number 0 adds no term at all (so the update is bit-for-bit the optimizer's own).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")


def make(name: str, learning_rate: float | Callable, *, weight_decay=0.0, momentum=None) -> optax.GradientTransformation:
    """Returns the optax transformation of optimizer `name` (see the module docstring for the updates)."""
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    mu = 0.0 if momentum is None else momentum
    if name == "adam":
        tx = optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-7)
    elif name == "sgd":
        tx = optax.sgd(learning_rate, momentum=mu)
    elif name == "rmsprop":
        tx = optax.rmsprop(learning_rate, decay=0.9, eps=1e-7, eps_in_sqrt=False, momentum=mu)
    else:
        raise ValueError(f"leukax/train/optim.py: unknown optimizer {name!r}; known: {OPTIMIZERS}")
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return tx
    return optax.chain(optax.add_decayed_weights(weight_decay), tx)


def select(txs: list, index) -> optax.GradientTransformation:
    """Runs every transformation of `txs` and applies the updates of txs[index] (index traced). The others' states
    advance too but never touch the parameters, so the result equals running txs[index] alone; their cost is a
    few elementwise passes over the parameters per step."""
    def init(params):
        return tuple(tx.init(params) for tx in txs)

    def update(grads, state, params=None):
        outs = [tx.update(grads, s, params) for tx, s in zip(txs, state)]
        updates = jax.tree.map(lambda *us: jnp.select([index == i for i in range(len(us))], us), *[u for u, _ in outs])
        return updates, tuple(s for _, s in outs)

    return optax.GradientTransformation(init, update)


def early_stopping(score, best_score, bad_epochs, active, patience):
    """One epoch of early stopping, elementwise (a member's scalars under vmap, or M-vectors on the host):

        improved = active ∧ score > best_score
        best_score ← score where improved;  bad_epochs ← 0 if improved else bad_epochs + active
        active ← active ∧ bad_epochs < patience        (patience None: never stops)

    `score` is higher-is-better (−NLL or accuracy). Returns (improved, best_score, bad_epochs, active).
    """
    improved = active & (score > best_score)
    bad = jnp.where(improved, 0, bad_epochs + active.astype(jnp.int32)).astype(jnp.int32)
    still = active if patience is None else active & (bad < patience)
    return improved, jnp.where(improved, score, best_score), bad, still
