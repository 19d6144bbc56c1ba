"""Optimizers of the papers, built with `optax.inject_hyperparams`.

Learning rate and momentum live in the optimizer *state* (``opt_state.hyperparams``), so a Bayesian-
optimisation trial that only changes them reuses the compiled train step. One transformation object is
cached per optimizer name: jit keys its cache on it (a static argument), so building a new one per trial
would recompile.

Momentum: the placeholder values below are the Keras defaults (SGD momentum 0, RMSprop momentum 0, Adam b1 0.9),
and `set_hyperparams(momentum=None)` keeps them, so an unset momentum never turns plain SGD into momentum SGD.
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
    The values set here are Keras's defaults; `set_hyperparams` writes the run's values into the state.
    SGD keeps a momentum trace even at momentum 0 (v = 0·v + g, the plain SGD update), so that the momentum
    stays a state value a trial can change without recompiling.
    """
    name = name.lower()
    if name == "sgd":  # Keras SGD: v = m*v - lr*g (optax trace with nesterov=False is the same update).
        return optax.inject_hyperparams(optax.sgd)(learning_rate=1e-2, momentum=0.0)
    if name == "rmsprop":  # Keras RMSprop: rho=0.9, eps=1e-7 outside the sqrt.
        return optax.inject_hyperparams(optax.rmsprop)(
            learning_rate=1e-3, decay=0.9, eps=1e-7, eps_in_sqrt=False, momentum=0.0)
    if name == "adam":  # Keras Adam: b1=0.9, b2=0.999, eps=1e-7.
        return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7)
    raise ValueError(f"leukax/train/optim.py: unknown optimizer {name!r}; known: {OPTIMIZERS}")


def set_hyperparams(opt_state, *, learning_rate: float, momentum: float | None = None):
    """Returns `opt_state` with its injected learning rate (and momentum / adam b1) replaced.

    momentum=None keeps the optimizer's Keras default (0 for sgd and rmsprop, b1 = 0.9 for adam); 0 means 0.
    Works on a single member's state or a member-stacked one (the values broadcast to the leaf shape).
    """
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.full_like(hp["learning_rate"], learning_rate)
    if momentum is not None:
        key = "momentum" if "momentum" in hp else "b1"
        hp[key] = jnp.full_like(hp[key], momentum)
    return opt_state._replace(hyperparams=hp)
