"""Optimizers of the papers, built with `optax.inject_hyperparams`.

Learning rate and momentum live in the optimizer *state* (``opt_state.hyperparams``), so a Bayesian-
optimisation trial that only changes them reuses the compiled train step. One transformation object is
cached per optimizer name: jit keys its cache on it (a static argument), so building a new one per trial
would recompile.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "rmsprop", "adam")


@functools.cache
def get_optimizer(name: str) -> optax.GradientTransformation:
    """Returns the (cached) optax transformation for "sgd" | "rmsprop" | "adam" (Keras defaults).

    Hyper-parameters in its state: "learning_rate" always; "momentum" for sgd and rmsprop; adam's "b1".
    Placeholder values are set here; `set_hyperparams` writes the real ones into the state.
    """
    name = name.lower()
    if name == "sgd":  # Keras SGD: v = m*v - lr*g (optax trace with nesterov=False is the same update).
        return optax.inject_hyperparams(optax.sgd)(learning_rate=1e-2, momentum=0.9)
    if name == "rmsprop":  # Keras RMSprop: rho=0.9, eps=1e-7 outside the sqrt.
        return optax.inject_hyperparams(optax.rmsprop)(
            learning_rate=1e-3, decay=0.9, eps=1e-7, eps_in_sqrt=False, momentum=0.0)
    if name == "adam":  # Keras Adam: b1=0.9, b2=0.999, eps=1e-7.
        return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7)
    raise ValueError(f"leukax/train/optim.py: unknown optimizer {name!r}; known: {OPTIMIZERS}")


def set_hyperparams(opt_state, *, learning_rate: float, momentum: float | None = None):
    """Returns `opt_state` with its injected learning rate (and momentum / adam b1) replaced.

    Works on a single member's state or a member-stacked one (the values broadcast to the leaf shape).
    """
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.full_like(hp["learning_rate"], learning_rate)
    if momentum is not None:
        key = "momentum" if "momentum" in hp else "b1"
        hp[key] = jnp.full_like(hp[key], momentum)
    return opt_state._replace(hyperparams=hp)
