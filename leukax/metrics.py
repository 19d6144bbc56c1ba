"""Classification metrics as jit-able functions of integer labels and class probabilities.

Conventions (all equal to scikit-learn 1.9 on the same inputs):
  * `labels_n` int N, `probs_nk` float N×K (rows sum to 1), predictions are `argmax(probs_nk, -1)`.
  * Zero division (a class never predicted / never present): precision, recall, F1 and specificity are 0,
    as `sklearn.metrics.precision_recall_fscore_support(..., zero_division=0)`.
  * ROC AUC is the Mann-Whitney statistic with ties counted 1/2, which equals sklearn's trapezoidal
    `roc_auc_score`. It is NaN when a class has no positives or no negatives (sklearn raises).
  * Average precision is sklearn's step-wise `average_precision_score` (sum over distinct thresholds of
    ΔRecall · Precision); NaN when there are no positives (sklearn warns and returns 0).
  * NLL clips probabilities to [eps, 1] with eps the float epsilon of the probs dtype (as sklearn `log_loss`).
  * Brier score, multi-class: mean_n Σ_k (p_nk − onehot_nk)², Brier's (1950) original definition and
    sklearn's `brier_score_loss(labels=...)`. For K = 2 it is halved by default, which equals the binary
    mean_n (p_n,pos − y_n)² (sklearn `scale_by_half="auto"`).
  * ECE: equal-width confidence bins (lo, hi] on the max probability (a confidence of exactly 0 goes in the
    first bin), ECE = Σ_b (n_b / N) |acc_b − conf_b|.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _div(num, den):
    """num / den with 0 where den == 0 (sklearn zero_division=0)."""
    den = jnp.asarray(den)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_matrix(labels_n, preds_n, num_classes: int):
    """Returns K×K int32 counts, rows = true class, columns = predicted class (sklearn layout)."""
    idx = labels_n.astype(jnp.int32) * num_classes + preds_n.astype(jnp.int32)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[idx].add(1)
    return counts.reshape(num_classes, num_classes)


@jax.jit
def accuracy(labels_n, probs_nk):
    """Returns the scalar fraction of argmax predictions equal to the label."""
    return jnp.mean(jnp.argmax(probs_nk, -1) == labels_n)


@jax.jit
def per_class(labels_n, probs_nk):
    """Returns dict of K-vectors: precision, recall (sensitivity), f1, specificity, support; and macro means.

    Every class is treated one-vs-rest; zero division gives 0.
    """
    k = probs_nk.shape[-1]
    cm_kk = confusion_matrix(labels_n, jnp.argmax(probs_nk, -1), k).astype(jnp.float32)
    tp_k = jnp.diag(cm_kk)
    support_k = cm_kk.sum(1)
    predicted_k = cm_kk.sum(0)
    n = cm_kk.sum()
    fp_k = predicted_k - tp_k
    tn_k = n - support_k - fp_k
    precision_k = _div(tp_k, predicted_k)
    recall_k = _div(tp_k, support_k)
    f1_k = _div(2 * tp_k, support_k + predicted_k)
    specificity_k = _div(tn_k, tn_k + fp_k)
    out = dict(precision=precision_k, recall=recall_k, f1=f1_k, specificity=specificity_k,
               support=support_k)
    out.update({f"macro_{name}": jnp.mean(v) for name, v in list(out.items()) if name != "support"})
    return out


@functools.partial(jax.jit, static_argnames=("pos_label",))
def binary(labels_n, probs_nk, pos_label: int = 1):
    """Returns dict of scalars for class `pos_label` vs rest: accuracy, precision, recall (sensitivity), f1,
    specificity, and tp/fp/tn/fn counts."""
    pred_pos = jnp.argmax(probs_nk, -1) == pos_label
    true_pos = labels_n == pos_label
    tp = jnp.sum(pred_pos & true_pos).astype(jnp.float32)
    fp = jnp.sum(pred_pos & ~true_pos).astype(jnp.float32)
    fn = jnp.sum(~pred_pos & true_pos).astype(jnp.float32)
    tn = jnp.sum(~pred_pos & ~true_pos).astype(jnp.float32)
    return dict(accuracy=accuracy(labels_n, probs_nk), precision=_div(tp, tp + fp), recall=_div(tp, tp + fn),
                f1=_div(2 * tp, 2 * tp + fp + fn), specificity=_div(tn, tn + fp), tp=tp, fp=fp, tn=tn, fn=fn)


def _ge_counts(scores_n, mask_n):
    """For each example i returns (#masked examples with score >= s_i) and (#examples with score >= s_i)."""
    n = scores_n.shape[0]
    sorted_all = jnp.sort(scores_n)
    sorted_masked = jnp.sort(jnp.where(mask_n, scores_n, -jnp.inf))
    n_ge = n - jnp.searchsorted(sorted_all, scores_n, side="left")
    masked_ge = n - jnp.searchsorted(sorted_masked, scores_n, side="left")
    return masked_ge, n_ge


@jax.jit
def roc_auc_binary(is_pos_n, scores_n):
    """Returns the scalar ROC AUC (Mann-Whitney, ties 1/2) of `scores_n` for boolean targets; NaN if one-class."""
    is_pos_n = is_pos_n.astype(bool)
    sorted_s = jnp.sort(scores_n)
    # Average 1-based rank of each score among all scores (ties share the mean rank).
    lo = jnp.searchsorted(sorted_s, scores_n, side="left")
    hi = jnp.searchsorted(sorted_s, scores_n, side="right")
    rank_n = (lo + hi + 1) / 2.0
    n_pos = jnp.sum(is_pos_n).astype(jnp.float32)  # float: n_pos · n_neg overflows int32 past ~46k
    n_neg = is_pos_n.shape[0] - n_pos
    u = jnp.sum(jnp.where(is_pos_n, rank_n, 0.0)) - n_pos * (n_pos + 1) / 2.0
    return jnp.where((n_pos > 0) & (n_neg > 0), u / jnp.maximum(n_pos * n_neg, 1), jnp.nan)


@jax.jit
def average_precision_binary(is_pos_n, scores_n):
    """Returns the scalar average precision (PR AUC, sklearn step rule); NaN without positives.

    AP = Σ_t ΔTP(t)/P · precision(t) over distinct thresholds t = (1/P) Σ_{positives i} precision(s_i),
    with precision(s) = #pos(score ≥ s) / #(score ≥ s); tied scores share one threshold.
    """
    is_pos_n = is_pos_n.astype(bool)
    pos_ge, n_ge = _ge_counts(scores_n, is_pos_n)
    precision_n = pos_ge / n_ge
    n_pos = jnp.sum(is_pos_n)
    ap = jnp.sum(jnp.where(is_pos_n, precision_n, 0.0)) / jnp.maximum(n_pos, 1)
    return jnp.where(n_pos > 0, ap, jnp.nan)


@jax.jit
def roc_auc_ovr(labels_n, probs_nk):
    """Returns (per-class one-vs-rest ROC AUC K-vector, macro mean over classes)."""
    k = probs_nk.shape[-1]
    auc_k = jax.vmap(lambda c: roc_auc_binary(labels_n == c, probs_nk[:, c]))(jnp.arange(k))
    return auc_k, jnp.mean(auc_k)


@jax.jit
def average_precision_ovr(labels_n, probs_nk):
    """Returns (per-class one-vs-rest average precision K-vector, macro mean over classes)."""
    k = probs_nk.shape[-1]
    ap_k = jax.vmap(lambda c: average_precision_binary(labels_n == c, probs_nk[:, c]))(jnp.arange(k))
    return ap_k, jnp.mean(ap_k)


@jax.jit
def nll(labels_n, probs_nk):
    """Returns the scalar mean negative log-likelihood of the labels (probabilities clipped at dtype eps)."""
    eps = jnp.finfo(probs_nk.dtype).eps
    p_n = jnp.take_along_axis(probs_nk, labels_n[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return -jnp.mean(jnp.log(jnp.clip(p_n, eps, 1.0)))


@functools.partial(jax.jit, static_argnames=("scale_by_half",))
def brier(labels_n, probs_nk, scale_by_half: bool | None = None):
    """Returns the scalar mean_n Σ_k (p_nk − onehot_nk)²; halved when K = 2 unless scale_by_half=False."""
    k = probs_nk.shape[-1]
    half = (k == 2) if scale_by_half is None else scale_by_half
    sq = jnp.mean(jnp.sum((probs_nk - jax.nn.one_hot(labels_n, k)) ** 2, -1))
    return sq / 2 if half else sq


@functools.partial(jax.jit, static_argnames=("num_bins",))
def _confidence_bins(conf_n, num_bins: int):
    """Returns (edges B+1, bin index N) of equal-width confidence bins: bin b holds (edges[b], edges[b+1]];
    confidence 0 goes to bin 0."""
    edges = jnp.linspace(0.0, 1.0, num_bins + 1)
    return edges, jnp.clip(jnp.searchsorted(edges, conf_n, side="left") - 1, 0, num_bins - 1)


def reliability_bins(labels_n, probs_nk, num_bins: int = 15):
    """Returns dict: edges (B+1), count_b, accuracy_b and confidence_b (mean max-probability; 0 if empty)."""
    conf_n = jnp.max(probs_nk, -1)
    correct_n = (jnp.argmax(probs_nk, -1) == labels_n).astype(jnp.float32)
    edges, bin_n = _confidence_bins(conf_n, num_bins)
    count_b = jax.ops.segment_sum(jnp.ones_like(conf_n), bin_n, num_bins)
    acc_b = _div(jax.ops.segment_sum(correct_n, bin_n, num_bins), count_b)
    conf_b = _div(jax.ops.segment_sum(conf_n, bin_n, num_bins), count_b)
    return dict(edges=edges, count=count_b, accuracy=acc_b, confidence=conf_b)


@functools.partial(jax.jit, static_argnames=("num_bins",))
def ece(labels_n, probs_nk, num_bins: int = 15):
    """Returns the scalar expected calibration error over `num_bins` equal-width confidence bins."""
    b = reliability_bins(labels_n, probs_nk, num_bins)
    return jnp.sum(b["count"] * jnp.abs(b["accuracy"] - b["confidence"])) / labels_n.shape[0]


@functools.partial(jax.jit, static_argnames=("n", "draws", "num_bins"))
def ece_null(key, conf_n, n: int, draws: int = 2000, num_bins: int = 15):
    """Returns `draws` ECEs of a perfectly calibrated model on sets of n: the null distribution of binned ECE.

    Each draw takes n top-class confidences c_i from `conf_n` (with replacement) and makes the prediction
    correct with probability c_i, so E[accuracy | c] = c exactly; its ECE (the estimator of `ece`) is then
    pure estimation noise. Binned ECE is biased upwards, roughly like sqrt(num_bins / n): compare a measured
    ECE with this distribution at the same n before reading it as miscalibration."""
    def one(k):
        k_pick, k_ok = jax.random.split(k)
        c = jax.random.choice(k_pick, conf_n, (n,))
        ok = (jax.random.uniform(k_ok, (n,)) < c).astype(jnp.float32)
        _, b = _confidence_bins(c, num_bins)
        gap = jax.ops.segment_sum(ok - c, b, num_bins)  # count_b · (accuracy_b − confidence_b)
        return jnp.sum(jnp.abs(gap)) / n

    return jax.vmap(one)(jax.random.split(key, draws))


def _py(x):
    """Numpy / jax arrays to (nested lists of) Python floats; NaN becomes None so json.dumps stays strict."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        v = float(a)
        return None if np.isnan(v) else v
    return [_py(v) for v in a]


def classification_report(labels_n, probs_nk, class_names, pos_label: int | None = None,
                          num_bins: int = 15) -> dict:
    """Returns a JSON-serialisable dict with every metric above.

    Keys: n, accuracy, nll, brier, ece, macro_{precision,recall,f1,specificity,roc_auc,average_precision},
    per_class {name: {precision, recall, f1, specificity, support, roc_auc, average_precision}},
    confusion_matrix (rows true), class_names, reliability {edges, count, accuracy, confidence}; and, when
    `pos_label` is given (or K = 2, then pos_label defaults to 1), binary {accuracy, precision, recall,
    f1, specificity, tp, fp, tn, fn, roc_auc, average_precision, pos_label, pos_name}. NaN is None.
    """
    labels_n = jnp.asarray(labels_n, jnp.int32)
    probs_nk = jnp.asarray(probs_nk, jnp.float32)
    k = probs_nk.shape[-1]
    class_names = list(class_names)
    if len(class_names) != k:
        raise ValueError(f"leukax/metrics.py: {len(class_names)} class names for {k} probability columns")
    pc = per_class(labels_n, probs_nk)
    auc_k, auc_macro = roc_auc_ovr(labels_n, probs_nk)
    ap_k, ap_macro = average_precision_ovr(labels_n, probs_nk)
    rel = reliability_bins(labels_n, probs_nk, num_bins)
    report = dict(
        n=int(labels_n.shape[0]), class_names=class_names,
        accuracy=_py(accuracy(labels_n, probs_nk)), nll=_py(nll(labels_n, probs_nk)),
        brier=_py(brier(labels_n, probs_nk)), ece=_py(ece(labels_n, probs_nk, num_bins)),
        macro_precision=_py(pc["macro_precision"]), macro_recall=_py(pc["macro_recall"]),
        macro_f1=_py(pc["macro_f1"]), macro_specificity=_py(pc["macro_specificity"]),
        macro_roc_auc=_py(auc_macro), macro_average_precision=_py(ap_macro),
        confusion_matrix=np.asarray(confusion_matrix(labels_n, jnp.argmax(probs_nk, -1), k)).tolist(),
        per_class={name: dict(precision=_py(pc["precision"][c]), recall=_py(pc["recall"][c]),
                              f1=_py(pc["f1"][c]), specificity=_py(pc["specificity"][c]),
                              support=int(pc["support"][c]), roc_auc=_py(auc_k[c]),
                              average_precision=_py(ap_k[c]))
                   for c, name in enumerate(class_names)},
        reliability={key: _py(v) for key, v in rel.items()},
    )
    if pos_label is None and k == 2:
        pos_label = 1
    if pos_label is not None:
        b = {key: _py(v) for key, v in binary(labels_n, probs_nk, pos_label).items()}
        b.update(roc_auc=_py(auc_k[pos_label]), average_precision=_py(ap_k[pos_label]),
                 pos_label=int(pos_label), pos_name=class_names[pos_label])
        report["binary"] = b
    return report
