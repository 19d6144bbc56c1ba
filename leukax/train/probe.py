"""The linear probe: multinomial logistic regression on globally pooled frozen features (the "backbone without
the GRU" baseline of Akter et al. 2024, Table 8), with scikit-learn's objective and default C = 1:

    min_{W,b}  C · Σ_n −log softmax(x_n W + b)_{y_n}  +  ½ ‖W‖²        (b not penalised)

solved to convergence by L-BFGS (optax) in one jit. With V views per image every view is a training row, and
prediction averages the softmax over views (TTA), exactly as for the heads. Features are standardised
with statistics of the training rows only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def pool(x_vntc):
    """Returns V×N×C: the global average over positions (T) of V×N×T×C features (V×N×C passes through)."""
    if np.ndim(x_vntc) == 3:
        return jnp.asarray(x_vntc, jnp.float32)
    # `chunk` images at a time: XLA:CPU materialises a float32 copy of a 16-bit input before reducing it
    n, chunk = np.shape(x_vntc)[1], 256
    return jnp.concatenate([_mean_positions(x_vntc[:, s: s + chunk]) for s in range(0, n, chunk)], 1)


@jax.jit
def _mean_positions(x_vktc):
    return jnp.mean(x_vktc, axis=2, dtype=jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit(x_nc, y_n, c: float, num_classes: int, max_iter: int):
    d = x_nc.shape[1]

    def objective(wb):
        logits = x_nc @ wb["w"] + wb["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_n).sum()
        return c * ce + 0.5 * jnp.sum(wb["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)
    init = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}

    def step(carry):
        wb, state = carry
        value, grad = value_and_grad(wb, state=state)
        updates, state = opt.update(grad, state, wb, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(wb, updates), state

    def cond(carry):
        _, state = carry
        it = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (it == 0) | ((it < max_iter) & (optax.tree_utils.tree_norm(grad) > 1e-4 * c * x_nc.shape[0] ** 0.5))

    wb, _ = jax.lax.while_loop(cond, step, (init, opt.init(init)))
    return wb


def fit(train_x, train_y, num_classes: int, c: float = 1.0, max_iter: int = 500) -> dict:
    """Returns the probe {"mean", "std", "w", "b"} fitted on train_x (V×N×T×C, V×N×C or N×C) and labels N."""
    x = pool(train_x if np.ndim(train_x) >= 3 else np.asarray(train_x)[None])
    v, n, d = x.shape
    x_rows = x.reshape(v * n, d)
    mean, std = x_rows.mean(0), x_rows.std(0) + 1e-6
    y_rows = jnp.tile(jnp.asarray(train_y, jnp.int32), v)
    wb = _fit((x_rows - mean) / std, y_rows, float(c), num_classes, max_iter)
    return dict(mean=mean, std=std, **wb)


@jax.jit
def predict(probe: dict, x_vntc):
    """Returns N×K probabilities: the softmax averaged over views."""
    x = pool(x_vntc if x_vntc.ndim >= 3 else x_vntc[None])
    logits = ((x - probe["mean"]) / probe["std"]) @ probe["w"] + probe["b"]
    return jnp.mean(jax.nn.softmax(logits, -1), 0)
