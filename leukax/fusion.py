"""Score-level fusion (Akter et al. 2024) and feature-level fusion (Himel et al. 2024).

Score level: H hybrid models (e.g. InceptionV3-GRU, EfficientNetB3-GRU, MobileNetV2-GRU), each a deep
ensemble, give ensemble-mean probabilities `probs_hnk`. The papers' *sum rule* adds them and takes the argmax;
the other classic combination rules (Kittler et al. 1998) are here for comparison. Every rule returns N×K
probabilities normalised to sum to 1 over classes, so argmax, metrics and uncertainty all apply. A 4-d input
H×M×N×K (members not yet averaged) is first reduced to the deep-ensemble mean over M.

Feature level: the second stage of Himel et al. concatenates the frozen Dense(1024) features of the
EfficientNetB7 and MobileNetV3Large branches (`concat_features`) and trains `MetaClassifier` on them.
`BranchHead` is the first stage's head, on pooled features or (the paper's position) on the backbone's
ImageNet classifier; `table3_rows` counts parameters the way the paper's Table 3 does.
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


def simplex_grid(num_hybrids: int, step: float = 0.05):
    """Returns G×H numpy weights: every point of the probability simplex whose coordinates are multiples of
    `step` (1/step must be an integer), plus the equal weights 1/H (the sum rule) as the last row."""
    import itertools
    import numpy as np
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9 or num_hybrids < 1:
        raise ValueError(f"leukax/fusion.py: step {step} must divide 1 and H >= 1 (got H = {num_hybrids})")
    pts = [c for c in itertools.product(range(n + 1), repeat=num_hybrids - 1) if sum(c) <= n]
    grid = np.asarray([list(c) + [n - sum(c)] for c in pts], np.float64) / n
    return np.concatenate([grid, np.full((1, num_hybrids), 1 / num_hybrids)]).astype(np.float32)


@jax.jit
def grid_nll(probs_hnk, labels_n, weights_gh):
    """Returns G: the NLL of `weighted_rule(probs_hnk, w_g)` for every weight row w_g (one vectorised pass)."""
    probs_hnk = _hnk(probs_hnk)
    fused_gnk = _normalise(jnp.einsum("gh,hnk->gnk", weights_gh.astype(probs_hnk.dtype), probs_hnk))
    p_gn = jnp.take_along_axis(fused_gnk, labels_n.astype(jnp.int32)[None, :, None], -1)[..., 0]
    return -jnp.mean(jnp.log(jnp.clip(p_gn, jnp.finfo(p_gn.dtype).tiny)), -1)


TIE_NLL = 1e-6  # validation NLLs closer than this are a tie, and a tie keeps the sum rule


def fit_weights(probs_val_hnk, labels_val_n, step: float = 0.05):
    """Returns H weights on the simplex (multiples of `step`, or 1/H) minimising the validation NLL of the
    weighted rule Σ_h w_h p_h: the validation-fitted alternative to the paper's fixed sum rule. Within
    `TIE_NLL` of the minimum the sum rule's 1/H is kept."""
    import numpy as np
    probs = _hnk(probs_val_hnk)
    grid = simplex_grid(probs.shape[0], step)
    nll_g = np.asarray(grid_nll(probs, jnp.asarray(labels_val_n), jnp.asarray(grid)))
    return grid[-1] if nll_g[-1] <= nll_g.min() + TIE_NLL else grid[int(np.argmin(nll_g))]


def choose_rule(probs_val_hnk, labels_val_n, step: float = 0.05, folds: int = 2) -> dict:
    """Chooses between the sum rule and validation-fitted weights on validation data without rewarding the fit
    for seeing its own labels: the validation part is cut into `folds` interleaved, label-stratified pieces;
    weights fitted on the others are scored on each piece (cross-fitting), and the sum rule on the same
    pieces. Returns {"rule": "sum" | "fitted", "weights": H weights to apply (fitted on the whole validation
    part, or 1/H), "fitted_weights", "val_nll_sum", "val_nll_fitted_crossfit"}."""
    import numpy as np
    probs = np.asarray(_hnk(probs_val_hnk), np.float32)
    y = np.asarray(labels_val_n)
    h = probs.shape[0]
    order = np.argsort(y, kind="stable")
    piece = np.empty(len(y), int)
    piece[order] = np.arange(len(y)) % folds
    equal = np.full(h, 1 / h, np.float32)
    nll_sum = nll_fit = 0.0
    for f in range(folds):
        fit, held = piece != f, piece == f
        if not held.any() or not fit.any():
            continue
        w = fit_weights(probs[:, fit], y[fit], step)
        scored = np.asarray(grid_nll(probs[:, held], jnp.asarray(y[held]), jnp.asarray(np.stack([w, equal]))))
        nll_fit += float(scored[0]) * held.sum() / len(y)
        nll_sum += float(scored[1]) * held.sum() / len(y)
    fitted = fit_weights(probs, y, step)
    rule = "fitted" if nll_fit < nll_sum - TIE_NLL else "sum"
    return dict(rule=rule, weights=(fitted if rule == "fitted" else equal).tolist(), fitted_weights=fitted.tolist(),
                val_nll_sum=float(nll_sum), val_nll_fitted_crossfit=float(nll_fit))


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

    Follows the head contract: ``__call__(features_bd, train=False, dropout_rate=None, ...)`` returns
    ``(logits_bk, {"pre_logits": B×10})`` (softmax by the caller). The paper uses no dropout (default 0);
    a nonzero rate (attribute or traced override) drops the 10-d layer's output, rng stream "dropout".
    ``input_dropout_rate`` / ``recurrent_dropout_rate`` (the trainer passes every head its traced rates) are
    accepted and ignored.
    """
    num_classes: int
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, features_bd, train: bool = False, dropout_rate=None, input_dropout_rate=None,
                 recurrent_dropout_rate=None):
        del input_dropout_rate, recurrent_dropout_rate
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


# ------------------------------------------------------------------------- Himel et al. branches, Table 3


class BranchHead(nn.Module):
    """Himel et al.'s stage-1 head on a backbone's feature map, in either position.

    imagenet_hidden < 0 (branch_input "pooled", leukax's default): GAP → Dense(1024, relu) → dropout →
    Dense(K) — the same parameters as `leukax.models.heads.DenseHead`.
    imagenet_hidden ≥ 0 (branch_input "imagenet_logits", the paper's position, Table 3): the backbone's
    ImageNet classifier (`leukax.imagenet_top.ImageNetTop(hidden=imagenet_hidden)`, submodule
    "imagenet_top", frozen by the caller) → softmax → Dense(1024, relu) → dropout → Dense(K).
    Returns ``(logits_bk, {"pre_logits": B×1024})`` (the feature the second stage fuses).
    """
    num_classes: int
    features: int = 1024
    dropout: float = 0.3
    imagenet_hidden: int = -1
    dtype: Any = None

    @nn.compact
    def __call__(self, feature_map_bhwc, train: bool = False, dropout_rate=None):
        from leukax.imagenet_top import ImageNetTop
        if self.imagenet_hidden >= 0:
            x_bd = jax.nn.softmax(ImageNetTop(hidden=self.imagenet_hidden, name="imagenet_top")(feature_map_bhwc))
        else:
            x_bd = jnp.mean(feature_map_bhwc.astype(jnp.float32), axis=(1, 2))
        hid_bd = nn.relu(nn.Dense(self.features, dtype=self.dtype, name="dense")(x_bd))
        rate = self.dropout if dropout_rate is None else dropout_rate
        h = _dropout(hid_bd, rate, self.make_rng("dropout") if train else None, train)
        logits_bk = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(h)
        return logits_bk.astype(jnp.float32), {"pre_logits": hid_bd}


def branch_head_params(in_features: int, num_classes: int, features: int = 1024, with_output: bool = True) -> int:
    """Returns Dense(in→features) + Dense(features→K) parameters; with_output=False drops the second
    (the branch inside the fused model, whose last Dense is discarded). Himel et al. Table 3:
    branch_head_params(1000, 3) = 1,028,099 and branch_head_params(1000, 3, with_output=False) = 1,025,024."""
    return in_features * features + features + (features * num_classes + num_classes if with_output else 0)


def meta_classifier_params(in_features: int, num_classes: int) -> int:
    """Returns MetaClassifier parameters on D inputs: D·1000+1000 + 1000·100+100 + 100·10+10 + 10·K+K
    (Himel et al. Table 3: D = 2·1024, K = 3 gives 2,150,143)."""
    return in_features * 1000 + 1000 + 1000 * 100 + 100 + 100 * 10 + 10 + 10 * num_classes + num_classes


def table3_rows(backbone_totals: dict, backbone_channels: dict, branches: tuple, num_classes: int,
                branch_input: str = "imagenet_logits", features: int = 1024, base_models=None) -> list[dict]:
    """Returns Himel et al. Table 3's parameter rows as the paper counts them (Keras totals, BatchNorm
    moving statistics included as non-trainable; each backbone frozen, only the head trainable).

    backbone_totals: {name: all variables of the no-top backbone}; backbone_channels: {name: C};
    base_models: the names given a base-model row (default: every key of backbone_totals).
    Per base model: total = backbone [+ ImageNet top] + branch head, trainable = branch head. Per branch of
    the proposed model (output Dense dropped): trainable = Dense(features) alone. Meta-classifier: all.
    """
    from leukax.imagenet_top import keras_top_params

    def top(name):
        return keras_top_params(name, backbone_channels[name]) if branch_input == "imagenet_logits" else 0

    def head_in(name):
        return 1000 if branch_input == "imagenet_logits" else backbone_channels[name]

    rows = []
    for name in (backbone_totals if base_models is None else base_models):
        head = branch_head_params(head_in(name), num_classes, features)
        frozen = backbone_totals[name] + top(name)
        rows.append(dict(model=name, total=frozen + head, trainable=head, non_trainable=frozen))
    for i, name in enumerate(branches, 1):
        head = branch_head_params(head_in(name), num_classes, features, with_output=False)
        frozen = backbone_totals[name] + top(name)
        rows.append(dict(model=f"proposed [branch {i}: {name}]", total=frozen + head, trainable=head,
                         non_trainable=frozen))
    meta = meta_classifier_params(features * len(branches), num_classes)
    rows.append(dict(model="proposed [meta-classifier]", total=meta, trainable=meta, non_trainable=0))
    return rows
