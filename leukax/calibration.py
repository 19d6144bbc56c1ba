"""Temperature scaling (Guo et al. 2017) of probabilities, fitted on validation data.

Given predicted probabilities p (an ensemble mean, or a fused system's), the calibrated prediction is

    p_T = softmax(log p / T),       T* = argmin_T  −(1/N) Σ_n log p_T(y_n | x_n)   on the validation part.

T > 1 softens over-confident predictions, T < 1 sharpens under-confident ones; the argmax (accuracy) never
changes. The 1-D convex minimisation over log T is solved by a dense grid (jit-able, no starting point to
choose) refined by golden-section search on the bracketing cell.

With `prior_scale` σ > 0 the fit is the MAP estimate under a Gaussian prior log T ~ N(0, σ²):

    T* = argmin_T  −(1/N) Σ_n log p_T(y_n | x_n)  +  (log T)² / (2 σ² N)

On a small validation part that the model classifies without an error the NLL keeps falling as T → 0, and the
maximum-likelihood T runs to the grid's edge (0.05), which makes the test predictions near-certain; the prior
keeps T finite there and fades as N grows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from leukax import metrics

LOG_T_RANGE = (-3.0, 4.0)   # T in [0.05, 55]
# σ of the prior that the programs (hybrid_gru's --temperature_prior, the quickstart) fit with: on the development
# suite's three sets it is the setting under which the fused GRU's pooled ECE after scaling is inside the band of
# a calibrated model on all three (PBC 0.036, C-NMC 0.096, AML-LMU 0.095, against 0.019 / 0.124 / 0.207 by maximum
# likelihood, AML-LMU outside), results/dev_suite/three_backbones/README.md. `fit_temperature` itself defaults to
# maximum likelihood (Guo et al.'s method).
PRIOR_SCALE = 0.5


@jax.jit
def apply_temperature(probs_nk, temperature):
    """Returns softmax(log p / T), N×K (p clipped at the float tiny so log is finite)."""
    logp = jnp.log(jnp.clip(probs_nk, jnp.finfo(jnp.float32).tiny, 1.0))
    return jax.nn.softmax(logp / temperature, -1)


def _objective(log_t, labels_n, probs_nk, prior_scale):
    nll = metrics.nll(labels_n, apply_temperature(probs_nk, jnp.exp(log_t)))
    penalty = log_t ** 2 / (2 * jnp.maximum(prior_scale, 1e-6) ** 2 * labels_n.shape[0])
    return nll + jnp.where(prior_scale > 0, penalty, 0.0)


@functools.partial(jax.jit, static_argnames=("num_grid", "refine_steps"))
def fit_temperature(labels_n, probs_nk, prior_scale=0.0, num_grid: int = 141, refine_steps: int = 30):
    """Returns the scalar T minimising the validation NLL of `apply_temperature(probs_nk, T)` (with
    prior_scale σ > 0: plus the Gaussian prior's (log T)² / (2σ²N), the MAP estimate)."""
    lo, hi = LOG_T_RANGE
    _nll_at = functools.partial(_objective, prior_scale=prior_scale)  # the penalised NLL at log T
    grid = jnp.linspace(lo, hi, num_grid)
    nll_g = jax.vmap(lambda lt: _nll_at(lt, labels_n, probs_nk))(grid)
    i = jnp.argmin(nll_g)
    step = (hi - lo) / (num_grid - 1)
    a, b = grid[i] - step, grid[i] + step
    ratio = (jnp.sqrt(5.0) - 1) / 2

    def golden(_, ab):
        a, b = ab
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        left = _nll_at(c, labels_n, probs_nk) < _nll_at(d, labels_n, probs_nk)
        return jnp.where(left, a, c), jnp.where(left, d, b)

    a, b = jax.lax.fori_loop(0, refine_steps, golden, (a, b))
    return jnp.exp(jnp.clip((a + b) / 2, lo, hi))
