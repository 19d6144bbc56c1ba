"""Deep-ensemble uncertainty and selective prediction (refer uncertain cases to a hematologist).

Deep ensemble (Lakshminarayanan et al. 2017, as used by Akter et al. 2024): M members trained from different
seeds give class probabilities p_m(y|x). The ensemble's prediction is the predictive mean
    p*(y|x) = (1/M) Σ_m p_m(y|x)
and its spread the per-class predictive variance of the Gaussian-mixture view of the ensemble (Akter et al.
2024, Sec. 3.7, after Lakshminarayanan et al. 2017), with both of its terms:
    σ²_c(x) = (1/M) Σ_m σ²_m(x)  +  [ (1/M) Σ_m p_m(x)² − p*(x)² ]
              └ aleatoric: members' own variance ┘  └ epistemic: variance of the members' means (divisor M) ┘
For a classifier a member's prediction of class y is a Bernoulli with mean p_m(y|x), so its own variance is
σ²_m(y|x) = p_m(y|x)(1 − p_m(y|x)); the total is then p*(1 − p*) (the mixture's Bernoulli variance). Both
parts are returned separately (`aleatoric_variance`, `epistemic_variance`). Information-theoretic measures use natural logs
(nats): predictive entropy H[p*], expected entropy E_m H[p_m] (aleatoric), and mutual information
MI = H[p*] − E_m H[p_m] (BALD, epistemic), which is ≥ 0 and 0 when all members agree.

Selective prediction: an example is *retained* when its uncertainty u ≤ t and *referred* to an expert when
u > t. Thresholds are fitted on validation data and applied unchanged to test data.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _entropy(probs_xk):
    """Returns Σ_k −p log p over the last axis (0 log 0 = 0), in nats."""
    return -jnp.sum(jnp.where(probs_xk > 0, probs_xk * jnp.log(jnp.where(probs_xk > 0, probs_xk, 1.0)), 0.0), -1)


@jax.jit
def ensemble_mean(probs_mnk):
    """Returns the deep-ensemble predictive mean p* = (1/M) Σ_m p_m, N×K."""
    return jnp.mean(probs_mnk, 0)


@jax.jit
def aleatoric_variance(probs_mnk):
    """Returns (1/M) Σ_m p_m (1 − p_m) per class, N×K: the mean of the members' Bernoulli variances."""
    return jnp.mean(probs_mnk * (1.0 - probs_mnk), 0)


@jax.jit
def epistemic_variance(probs_mnk):
    """Returns (1/M) Σ_m p_m² − p*² = (1/M) Σ_m (p_m − p*)² per class, N×K: the variance of the members' means."""
    return jnp.mean((probs_mnk - jnp.mean(probs_mnk, 0)) ** 2, 0)


@jax.jit
def ensemble_variance(probs_mnk):
    """Returns the deep-ensemble predictive variance of Akter et al. (both terms), N×K:
    (1/M) Σ_m p_m(1 − p_m) + [(1/M) Σ_m p_m² − p*²]."""
    return aleatoric_variance(probs_mnk) + epistemic_variance(probs_mnk)


@jax.jit
def predictive_entropy(probs_nk):
    """Returns H[p] per example, N (nats). Pass the ensemble mean for the total uncertainty."""
    return _entropy(probs_nk)


@jax.jit
def expected_entropy(probs_mnk):
    """Returns E_m H[p_m] per example, N (nats; aleatoric part)."""
    return jnp.mean(_entropy(probs_mnk), 0)


@jax.jit
def mutual_information(probs_mnk):
    """Returns BALD MI = H[p*] − E_m H[p_m] per example, N (nats; epistemic part, clipped at 0)."""
    return jnp.maximum(_entropy(jnp.mean(probs_mnk, 0)) - jnp.mean(_entropy(probs_mnk), 0), 0.0)


@jax.jit
def disagreement(probs_mnk):
    """Returns the fraction of members whose argmax differs from the ensemble-mean argmax, N."""
    ens_n = jnp.argmax(jnp.mean(probs_mnk, 0), -1)
    return jnp.mean(jnp.argmax(probs_mnk, -1) != ens_n[None], 0)


@jax.jit
def deep_ensemble(probs_mnk):
    """Returns dict of the ensemble prediction and every per-example uncertainty.

    mean N×K, variance N×K (both terms), variance_aleatoric N×K, variance_epistemic N×K, pred N, confidence N
    (max of mean), variance_pred N (variance of the predicted class), total_variance N (Σ_k variance), predictive_entropy N, expected_entropy N, mutual_information N,
    disagreement N.
    """
    mean_nk = ensemble_mean(probs_mnk)
    alea_nk, epi_nk = aleatoric_variance(probs_mnk), epistemic_variance(probs_mnk)
    var_nk = alea_nk + epi_nk
    pred_n = jnp.argmax(mean_nk, -1)
    return dict(
        mean=mean_nk, variance=var_nk, variance_aleatoric=alea_nk, variance_epistemic=epi_nk, pred=pred_n, confidence=jnp.max(mean_nk, -1),
        variance_pred=jnp.take_along_axis(var_nk, pred_n[:, None], -1)[:, 0], total_variance=var_nk.sum(-1),
        predictive_entropy=predictive_entropy(mean_nk), expected_entropy=expected_entropy(probs_mnk),
        mutual_information=mutual_information(probs_mnk), disagreement=disagreement(probs_mnk))


# ----------------------------------------------------------------------------------------- selective prediction


@jax.jit
def risk_coverage(uncertainty_n, correct_n):
    """Returns (coverage_n, risk_n): retaining the i most certain examples, i = 1..N, ascending uncertainty.

    Tied uncertainties cannot be ordered, so the errors of a tie group are spread evenly over its positions
    (the expectation over random tie-breaking).
    """
    n = uncertainty_n.shape[0]
    order = jnp.argsort(uncertainty_n)
    u_s = uncertainty_n[order]
    err_s = 1.0 - correct_n[order].astype(jnp.float32)
    cum = jnp.concatenate([jnp.zeros(1), jnp.cumsum(err_s)])
    start = jnp.searchsorted(u_s, u_s, side="left")
    end = jnp.searchsorted(u_s, u_s, side="right")
    pos = jnp.arange(1, n + 1)
    errs = cum[start] + (pos - start) * (cum[end] - cum[start]) / (end - start)
    return pos / n, errs / pos


@jax.jit
def aurc(uncertainty_n, correct_n):
    """Returns the scalar area under the risk-coverage curve, (1/N) Σ_i risk(i) (Geifman et al. 2019)."""
    return jnp.mean(risk_coverage(uncertainty_n, correct_n)[1])


@jax.jit
def aurc_optimal(correct_n):
    """Returns the smallest AURC reachable with these errors: all correct examples ranked first.

    (1/N) Σ_{i>N_c} (i − N_c)/i; for large N it tends to r + (1 − r) ln(1 − r), r the error rate.
    """
    n = correct_n.shape[0]
    n_correct = jnp.sum(correct_n)
    i = jnp.arange(1, n + 1)
    return jnp.mean(jnp.maximum(i - n_correct, 0) / i)


@jax.jit
def e_aurc(uncertainty_n, correct_n):
    """Returns the scalar excess AURC = AURC − AURC_optimal (0 for a perfect ranking)."""
    return aurc(uncertainty_n, correct_n) - aurc_optimal(correct_n)


def accuracy_coverage_curve(uncertainty_n, correct_n):
    """Returns numpy (thresholds_t, coverage_t, accuracy_t) at every distinct uncertainty t (ascending):
    coverage = fraction with u ≤ t, accuracy = accuracy on those retained."""
    u = np.asarray(uncertainty_n, np.float64)
    c = np.asarray(correct_n, np.float64)
    order = np.argsort(u, kind="stable")
    u_s, c_s = u[order], c[order]
    thresholds = np.unique(u_s)
    end = np.searchsorted(u_s, thresholds, side="right")
    cum = np.cumsum(c_s)
    return thresholds, end / len(u), cum[end - 1] / end


def fit_referral_threshold(uncertainty_val, correct_val, target: str = "accuracy", value: float = 0.99) -> float:
    """Returns the uncertainty threshold t (refer if u > t) chosen on validation data.

    target="accuracy": the largest t (most retained) whose retained accuracy is ≥ value; −inf (refer
      everything) when no threshold reaches it.
    target="coverage": the smallest t retaining at least a fraction `value` (refer at most 1 − value).
    """
    thresholds, coverage, acc = accuracy_coverage_curve(uncertainty_val, correct_val)
    if len(thresholds) == 0:
        raise ValueError("leukax/uncertainty.py: fit_referral_threshold needs at least one validation example")
    if target == "accuracy":
        ok = np.nonzero(acc >= value)[0]
        return float(thresholds[ok[-1]]) if len(ok) else float("-inf")
    if target == "coverage":
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"leukax/uncertainty.py: coverage target {value} is not in [0, 1]")
        return float(thresholds[np.nonzero(coverage >= value)[0][0]])
    raise ValueError(f"leukax/uncertainty.py: target must be 'accuracy' or 'coverage', got {target!r}")


def refer(uncertainty_n, threshold: float):
    """Returns a boolean N mask, True = refer to an expert (uncertainty above the threshold)."""
    return jnp.asarray(uncertainty_n) > threshold


def referral_report(uncertainty_n, correct_n, threshold: float) -> dict:
    """Returns JSON-ready dict: threshold (None if ±inf), n, n_referred, n_retained, coverage,
    accuracy_retained, accuracy_referred, accuracy_all (None where a set is empty)."""
    referred = np.asarray(refer(uncertainty_n, threshold))
    correct = np.asarray(correct_n, bool)
    n = len(correct)

    def acc(mask):
        return float(correct[mask].mean()) if mask.any() else None

    return dict(threshold=float(threshold) if np.isfinite(threshold) else None, n=n,
                n_referred=int(referred.sum()), n_retained=int(n - referred.sum()),
                coverage=float((~referred).mean()) if n else None, accuracy_retained=acc(~referred),
                accuracy_referred=acc(referred), accuracy_all=acc(np.ones(n, bool)))


# ------------------------------------------------------------------------------ out-of-distribution score
def conformal_threshold(scores_val, alpha: float) -> float:
    """Returns the ⌈(n+1)(1−α)⌉-th smallest validation score (its maximum when n is small): an in-distribution
    cell's score exceeds it with probability ≤ α (split conformal, exchangeable scores)."""
    s = np.sort(np.asarray(scores_val, float))
    return float(s[min(len(s) - 1, int(np.ceil((len(s) + 1) * (1 - alpha))) - 1)])


def fit_mahalanobis(features_nd, labels_n, num_classes: int, shrinkage: float = 0.1) -> dict:
    """Returns {"means_kd", "precision_dd"}: class means and the shrunk shared precision of training features
    (Lee et al. 2018), for `mahalanobis_score`. Σ is the pooled within-class covariance shrunk towards
    (tr Σ / D)·I by `shrinkage`, so it is invertible with a few hundred examples in 1280 dimensions."""
    x = np.asarray(features_nd, np.float64)
    y = np.asarray(labels_n)
    means = np.stack([x[y == k].mean(0) if np.any(y == k) else np.zeros(x.shape[1]) for k in range(num_classes)])
    centred = x - means[y]
    cov = centred.T @ centred / max(len(x) - num_classes, 1)
    d = cov.shape[0]
    scale = max(np.trace(cov) / d, 1e-12)  # > 0 even when every feature is constant
    cov = (1 - shrinkage) * cov + shrinkage * scale * np.eye(d)
    return {"means_kd": jnp.asarray(means, jnp.float32), "precision_dd": jnp.asarray(np.linalg.inv(cov), jnp.float32)}


@jax.jit
def mahalanobis_score(model: dict, features_nd):
    """Returns N: min_k (x − μ_k)ᵀ Σ⁻¹ (x − μ_k), the squared distance to the nearest class mean (large = far
    from every class seen in training: out of distribution)."""
    diff_nkd = features_nd[:, None, :] - model["means_kd"][None]
    return jnp.min(jnp.einsum("nkd,de,nke->nk", diff_nkd, model["precision_dd"], diff_nkd), -1)
