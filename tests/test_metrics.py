"""leukax.metrics against scikit-learn on random inputs (binary and 3-class, with tied scores)."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from leukax import metrics


def _random_case(seed, k, n=60, ties=True):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels] * rng.uniform(0, 1, (n, 1))
    if ties:  # quantise so many scores tie exactly
        logits = np.round(logits * 2) / 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = probs.astype(np.float32)
    probs = probs / probs.sum(1, keepdims=True)  # rows sum to 1 in float32 as sklearn checks
    return labels, probs


CASES = [(seed, k, ties) for seed in range(4) for k in (2, 3) for ties in (True, False)]


@pytest.mark.parametrize("seed,k,ties", CASES)
def test_threshold_metrics_match_sklearn(seed, k, ties):
    labels, probs = _random_case(seed, k, ties=ties)
    preds = probs.argmax(1)
    y, p = jnp.asarray(labels), jnp.asarray(probs)
    np.testing.assert_array_equal(metrics.confusion_matrix(y, jnp.asarray(preds), k),
                                  skm.confusion_matrix(labels, preds, labels=range(k)))
    assert float(metrics.accuracy(y, p)) == pytest.approx(skm.accuracy_score(labels, preds))
    pc = metrics.per_class(y, p)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(labels, preds, labels=range(k), zero_division=0)
    np.testing.assert_allclose(pc["precision"], prec, atol=1e-6)
    np.testing.assert_allclose(pc["recall"], rec, atol=1e-6)
    np.testing.assert_allclose(pc["f1"], f1, atol=1e-6)
    np.testing.assert_array_equal(pc["support"], sup)
    assert float(pc["macro_f1"]) == pytest.approx(
        skm.f1_score(labels, preds, average="macro", labels=range(k), zero_division=0), abs=1e-6)
    # specificity of class c = recall of "not c"
    spec = [skm.recall_score(labels != c, preds != c, zero_division=0) for c in range(k)]
    np.testing.assert_allclose(pc["specificity"], spec, atol=1e-6)
    # macro = unweighted mean over classes (sklearn average="macro"), not support-weighted
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score)):
        ref = fn(labels, preds, average="macro", labels=range(k), zero_division=0)
        assert float(pc[f"macro_{name}"]) == pytest.approx(ref, abs=1e-6), name
    assert float(pc["macro_specificity"]) == pytest.approx(np.mean(spec), abs=1e-6)
    rep = metrics.classification_report(labels, probs, [f"c{c}" for c in range(k)])
    assert rep["macro_precision"] == pytest.approx(
        skm.precision_score(labels, preds, average="macro", labels=range(k), zero_division=0), abs=1e-6)
    assert rep["macro_recall"] == pytest.approx(
        skm.recall_score(labels, preds, average="macro", labels=range(k), zero_division=0), abs=1e-6)
    assert rep["macro_specificity"] == pytest.approx(np.mean(spec), abs=1e-6)
    for pos in range(k):
        b = metrics.binary(y, p, pos_label=pos)
        yb, pb = labels == pos, preds == pos
        assert float(b["precision"]) == pytest.approx(skm.precision_score(yb, pb, zero_division=0), abs=1e-6)
        assert float(b["recall"]) == pytest.approx(skm.recall_score(yb, pb, zero_division=0), abs=1e-6)
        assert float(b["f1"]) == pytest.approx(skm.f1_score(yb, pb, zero_division=0), abs=1e-6)
        assert float(b["specificity"]) == pytest.approx(skm.recall_score(~yb, ~pb, zero_division=0), abs=1e-6)


@pytest.mark.parametrize("seed,k,ties", CASES)
def test_ranking_and_probabilistic_metrics_match_sklearn(seed, k, ties):
    labels, probs = _random_case(seed, k, ties=ties)
    y, p = jnp.asarray(labels), jnp.asarray(probs)
    auc_k, auc_macro = metrics.roc_auc_ovr(y, p)
    ap_k, ap_macro = metrics.average_precision_ovr(y, p)
    for c in range(k):
        assert float(auc_k[c]) == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]), abs=1e-6)
        assert float(ap_k[c]) == pytest.approx(skm.average_precision_score(labels == c, probs[:, c]), abs=1e-6)
    if k == 2:
        assert float(auc_k[1]) == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]), abs=1e-6)
    else:
        assert float(auc_macro) == pytest.approx(
            skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-6)
    onehot = np.eye(k)[labels]
    assert float(ap_macro) == pytest.approx(skm.average_precision_score(onehot, probs, average="macro"), abs=1e-6)
    assert float(metrics.nll(y, p)) == pytest.approx(skm.log_loss(labels, probs, labels=range(k)), rel=1e-5)
    assert float(metrics.brier(y, p)) == pytest.approx(
        skm.brier_score_loss(labels, probs, labels=list(range(k))), rel=1e-5)
    if k == 2:  # binary definition mean (p_pos - y)^2
        assert float(metrics.brier(y, p)) == pytest.approx(skm.brier_score_loss(labels, probs[:, 1]), rel=1e-5)


def test_auc_ap_hand_cases_and_degenerate():
    # all scores tied -> AUC 0.5, AP = prevalence
    y = jnp.array([1, 0, 1, 0, 0])
    s = jnp.full(5, 0.3)
    assert float(metrics.roc_auc_binary(y, s)) == 0.5
    assert float(metrics.average_precision_binary(y, s)) == pytest.approx(0.4)
    # perfect ranking
    assert float(metrics.roc_auc_binary(y, jnp.array([0.9, 0.1, 0.8, 0.2, 0.3]))) == 1.0
    # no positives -> NaN (sklearn raises for AUC)
    assert np.isnan(float(metrics.roc_auc_binary(jnp.zeros(4, bool), jnp.arange(4.0))))
    assert np.isnan(float(metrics.average_precision_binary(jnp.zeros(4, bool), jnp.arange(4.0))))


def test_zero_division_class_never_predicted():
    labels = jnp.array([0, 0, 1, 2])
    probs = jnp.array([[.9, .1, 0], [.8, .2, 0], [.6, .4, 0], [.3, .2, .5]])
    pc = metrics.per_class(labels, probs)  # class 1 is present but never predicted
    assert float(pc["precision"][1]) == 0.0 and float(pc["recall"][1]) == 0.0 and float(pc["f1"][1]) == 0.0
    assert float(pc["precision"][0]) == pytest.approx(2 / 3) and float(pc["specificity"][2]) == 1.0


def test_ece_and_reliability_bins_by_hand():
    # confidences 0.95 (correct), 0.95 (wrong), 0.55 (correct) in 10 bins
    labels = jnp.array([0, 1, 1])
    probs = jnp.array([[.95, .05], [.95, .05], [.45, .55]])
    b = metrics.reliability_bins(labels, probs, num_bins=10)
    assert float(b["count"][9]) == 2 and float(b["count"][5]) == 1 and float(b["count"].sum()) == 3
    assert float(b["accuracy"][9]) == pytest.approx(0.5)
    assert float(b["confidence"][5]) == pytest.approx(0.55)
    expected = (2 / 3) * abs(0.5 - 0.95) + (1 / 3) * abs(1 - 0.55)
    assert float(metrics.ece(labels, probs, num_bins=10)) == pytest.approx(expected, abs=1e-6)
    # numpy reference on random data: bins (lo, hi]
    labels_r, probs_r = _random_case(7, 3, n=200, ties=False)
    conf, correct = probs_r.max(1), probs_r.argmax(1) == labels_r
    edges = np.linspace(0, 1, 16)
    ref = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ref += m.mean() * abs(correct[m].mean() - conf[m].mean())
    assert float(metrics.ece(jnp.asarray(labels_r), jnp.asarray(probs_r))) == pytest.approx(ref, abs=1e-5)


def test_classification_report_is_json_and_consistent():
    labels, probs = _random_case(3, 3)
    names = ["ALL", "AML", "healthy"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = metrics.classification_report(labels, probs, names)
    json.dumps(rep, allow_nan=False)
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
    assert set(rep["per_class"]) == set(names)
    assert sum(v["support"] for v in rep["per_class"].values()) == rep["n"] == len(labels)
    assert "binary" not in rep
    rep2 = metrics.classification_report(labels[:10] % 2, probs[:10, :2] / probs[:10, :2].sum(1, keepdims=True),
                                         ["healthy", "ALL"])
    assert rep2["binary"]["pos_name"] == "ALL"
    json.dumps(rep2, allow_nan=False)
    with pytest.raises(ValueError, match="metrics.py"):
        metrics.classification_report(labels, probs, names[:2])


def test_auc_ap_large_n_precision():
    rng = np.random.default_rng(0)
    n = 100_000
    y = rng.random(n) < 0.5
    s = np.round(rng.random(n) + 0.3 * y, 3).astype(np.float32)  # many ties
    assert float(metrics.roc_auc_binary(jnp.asarray(y), jnp.asarray(s))) == pytest.approx(
        skm.roc_auc_score(y, s), abs=1e-6)
    assert float(metrics.average_precision_binary(jnp.asarray(y), jnp.asarray(s))) == pytest.approx(
        skm.average_precision_score(y, s), abs=1e-6)


def test_ece_null_is_the_ece_of_a_calibrated_model():
    """ece_null: with every confidence equal to c, a draw's ECE is |mean(correct) − c| (one bin), so its mean
    over draws is E|Binomial(n, c)/n − c|, computed exactly here; and the null shrinks as n grows."""
    from scipy import stats
    c, n = 0.8, 64
    null = np.asarray(metrics.ece_null(jax.random.PRNGKey(0), jnp.full((10,), c), n, draws=4000))
    k = np.arange(n + 1)
    exact = np.sum(stats.binom.pmf(k, n, c) * np.abs(k / n - c))
    assert null.mean() == pytest.approx(exact, rel=0.05)
    conf = jnp.asarray(np.random.default_rng(0).uniform(0.4, 1.0, 500), jnp.float32)
    small = float(np.mean(metrics.ece_null(jax.random.PRNGKey(1), conf, 64)))
    large = float(np.mean(metrics.ece_null(jax.random.PRNGKey(1), conf, 1024)))
    assert large < small / 2  # ~ sqrt(bins / n): 4× fewer noise per 16× more cells
    # two bins (confidences 0.55 and 0.95, half each, n = 8): the gaps add per bin, E = Σ_bins E|k − c·m| / n
    n, cs = 8, (0.55, 0.95)
    exact = 0.0
    for m0 in range(n + 1):
        e_abs = sum(np.sum(stats.binom.pmf(np.arange(m + 1), m, c) * np.abs(np.arange(m + 1) - c * m))
                    for m, c in ((m0, cs[0]), (n - m0, cs[1])))
        exact += stats.binom.pmf(m0, n, 0.5) * e_abs / n
    null = np.asarray(metrics.ece_null(jax.random.PRNGKey(2), jnp.asarray(cs), n, draws=20000))
    assert null.mean() == pytest.approx(exact, rel=0.03)
