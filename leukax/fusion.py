"""Score-level fusion (Akter et al. 2024) and feature-level fusion (Himel et al. 2024).

Score level: H hybrid models (e.g. InceptionV3-GRU, EfficientNetB3-GRU, MobileNetV2-GRU), each a deep
ensemble, give ensemble-mean probabilities `probs_hnk`. The papers' *sum rule* adds them and takes the argmax;
the other classic combination rules (Kittler et al. 1998) are here for comparison. Every rule returns N×K
probabilities normalised to sum to 1 over classes, so argmax, metrics and uncertainty all apply. A 4-d input
H×M×N×K (members not yet averaged) is first reduced to the deep-ensemble mean over M.

Feature level: the second stage of Himel et al. concatenates the frozen Dense(1024) features of the
EfficientNetB7 and MobileNetV3Large branches (`concat_features`) and trains `MetaClassifier` on them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from leukax.models.heads import dropout as _dropout


def _hnk(probs):
    probs = jnp.asarray(probs)
    if probs.ndim == 4:  # H×M×N×K -> ensemble mean per hybrid
        probs = jnp.mean(probs, 1)
    if probs.ndim != 3:
        raise ValueError(f"leukax/fusion.py: expected probabilities H×N×K (or H×M×N×K), got shape {probs.shape}")
    return probs


def _normalise(scores_nk):
    return scores_nk / jnp.sum(scores_nk, -1, keepdims=True)


def sum_rule(probs_hnk):
    """Returns N×K: Σ_h p_h normalised over classes (argmax = the papers' sum-rule decision)."""
    return _normalise(jnp.sum(_hnk(probs_hnk), 0))


def mean_rule(probs_hnk):
    """Returns N×K: (1/H) Σ_h p_h (same decision as the sum rule)."""
    return jnp.mean(_hnk(probs_hnk), 0)


def max_rule(probs_hnk):
    """Returns N×K: max_h p_h normalised over classes."""
    return _normalise(jnp.max(_hnk(probs_hnk), 0))


def product_rule(probs_hnk):
    """Returns N×K: Π_h p_h normalised, computed as softmax(Σ_h log p_h) with p clipped at the float tiny.

    A class given probability 0 by any hybrid is vetoed (gets ~0) unless every class is vetoed.
    """
    probs_hnk = _hnk(probs_hnk)
    logp_hnk = jnp.log(jnp.clip(probs_hnk, jnp.finfo(probs_hnk.dtype).tiny, 1.0))
    return jax.nn.softmax(jnp.sum(logp_hnk, 0), -1)


def weighted_rule(probs_hnk, weights_h):
    """Returns N×K: Σ_h w_h p_h / Σ_h w_h (weights ≥ 0, e.g. validation accuracies), normalised."""
    probs_hnk = _hnk(probs_hnk)
    weights_h = jnp.asarray(weights_h, probs_hnk.dtype)
    if weights_h.shape != probs_hnk.shape[:1]:
        raise ValueError(f"leukax/fusion.py: {weights_h.shape[0] if weights_h.ndim else 0} weights for "
                         f"{probs_hnk.shape[0]} hybrids")
    return _normalise(jnp.einsum("h,hnk->nk", weights_h, probs_hnk))


RULES = {"sum": sum_rule, "mean": mean_rule, "max": max_rule, "product": product_rule}


def fuse(rule: str, probs_hnk, weights_h=None):
    """Returns N×K fused probabilities by rule name: "sum" | "mean" | "max" | "product" | "weighted"."""
    if rule == "weighted":
        return weighted_rule(probs_hnk, weights_h)
    if rule not in RULES:
        raise ValueError(f"leukax/fusion.py: unknown fusion rule {rule!r}; known: {', '.join(RULES)}, weighted")
    return RULES[rule](probs_hnk)


# ------------------------------------------------------------------------------------------- feature fusion


def concat_features(*features_nd):
    """Returns N×ΣD: the branches' features side by side (Himel et al. stage two input)."""
    if not features_nd:
        raise ValueError("leukax/fusion.py: concat_features needs at least one feature array")
    arrays = [jnp.asarray(f).reshape(jnp.shape(f)[0], -1) for f in features_nd]
    sizes = {a.shape[0] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"leukax/fusion.py: feature arrays have different numbers of examples {sorted(sizes)}")
    return jnp.concatenate(arrays, axis=-1)


class MetaClassifier(nn.Module):
    """Himel et al. meta-classifier: Dense(1000, sigmoid) → Dense(100, relu) → Dense(10, sigmoid) → Dense(K).

    Follows the head contract: ``__call__(features_bd, train=False, dropout_rate=None)`` returns
    ``(logits_bk, {"pre_logits": B×10})`` (softmax by the caller). The paper uses no dropout (default 0);
    a nonzero rate (attribute or traced override) drops the 10-d layer's output, rng stream "dropout".
    """
    num_classes: int
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, features_bd, train: bool = False, dropout_rate=None):
        if features_bd.ndim != 2:
            raise ValueError(f"leukax/fusion.py: MetaClassifier expects B×D features, got {features_bd.shape}")
        x = features_bd.astype(self.dtype or jnp.float32)
        x = nn.sigmoid(nn.Dense(1000, dtype=self.dtype, name="dense_0")(x))
        x = nn.relu(nn.Dense(100, dtype=self.dtype, name="dense_1")(x))
        x = nn.sigmoid(nn.Dense(10, dtype=self.dtype, name="dense_2")(x))
        rate = self.dropout if dropout_rate is None else dropout_rate
        static_zero = isinstance(rate, (int, float)) and rate == 0
        rng = self.make_rng("dropout") if train and not static_zero else None
        h = _dropout(x, rate, rng, train)
        logits_bk = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(h)
        return logits_bk.astype(jnp.float32), {"pre_logits": x}
