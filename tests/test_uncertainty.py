"""leukax.uncertainty on hand-computed cases."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from leukax import uncertainty as unc


def test_identical_members_have_zero_epistemic_uncertainty():
    p_nk = jnp.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    probs_mnk = jnp.stack([p_nk] * 4)
    out = unc.deep_ensemble(probs_mnk)
    np.testing.assert_allclose(out["mean"], p_nk, atol=1e-7)
    np.testing.assert_allclose(out["variance_epistemic"], 0.0, atol=1e-12)
    # only the aleatoric (Bernoulli) term is left: p(1 − p) per class
    np.testing.assert_allclose(out["variance"], p_nk * (1 - p_nk), atol=1e-6)
    np.testing.assert_allclose(out["mutual_information"], 0.0, atol=1e-6)
    np.testing.assert_allclose(out["disagreement"], 0.0)
    # entropy of the uniform row is ln 3, and expected entropy equals predictive entropy
    assert float(out["predictive_entropy"][1]) == pytest.approx(np.log(3), abs=1e-6)
    np.testing.assert_allclose(out["expected_entropy"], out["predictive_entropy"], atol=1e-6)


def test_disjoint_one_hot_members():
    # 3 members, each certain of a different class: mean uniform, E[H] = 0, MI = H = ln 3
    probs_mnk = jnp.eye(3)[:, None, :]
    out = unc.deep_ensemble(probs_mnk)
    assert float(out["predictive_entropy"][0]) == pytest.approx(np.log(3), abs=1e-6)
    assert float(out["expected_entropy"][0]) == pytest.approx(0.0, abs=1e-7)
    assert float(out["mutual_information"][0]) == pytest.approx(np.log(3), abs=1e-6)
    # one-hot members have no aleatoric variance; the epistemic term per class: values {1,0,0} around 1/3
    # -> (1/3)(4/9 + 1/9 + 1/9) = 2/9, so the total is 2/9 too
    np.testing.assert_allclose(out["variance_aleatoric"][0], [0.0] * 3, atol=1e-7)
    np.testing.assert_allclose(out["variance"][0], [2 / 9] * 3, atol=1e-6)
    # argmax of the tied mean is class 0; members 1 and 2 disagree
    assert float(out["disagreement"][0]) == pytest.approx(2 / 3)


def test_variance_is_akter_two_term_formula_by_hand():
    # Two members, one example, two classes: p_1 = (0.9, 0.1), p_2 = (0.5, 0.5).
    # Aleatoric: (1/2)[0.9·0.1 + 0.5·0.5] = (0.09 + 0.25)/2 = 0.17 for both classes.
    # Epistemic: (1/2)(0.9² + 0.5²) − 0.7² = (0.81 + 0.25)/2 − 0.49 = 0.04 (class 1: (0.01+0.25)/2 − 0.09 = 0.04).
    probs_mnk = jnp.array([[[0.9, 0.1]], [[0.5, 0.5]]])
    out = unc.deep_ensemble(probs_mnk)
    np.testing.assert_allclose(out["variance_aleatoric"][0], [0.17, 0.17], atol=1e-6)
    np.testing.assert_allclose(out["variance_epistemic"][0], [0.04, 0.04], atol=1e-6)
    np.testing.assert_allclose(unc.ensemble_variance(probs_mnk)[0], [0.21, 0.21], atol=1e-6)
    # the total equals the mixture's own Bernoulli variance p*(1 − p*) = 0.7·0.3
    np.testing.assert_allclose(out["variance"][0], [0.21, 0.21], atol=1e-6)
    assert float(out["variance_pred"][0]) == pytest.approx(0.21, abs=1e-6)


def test_aurc_perfect_ranking_is_optimum():
    rng = np.random.default_rng(1)
    correct = rng.random(400) < 0.8
    u_perfect = np.where(correct, rng.random(400), 1 + rng.random(400))  # every error less certain
    a = float(unc.aurc(jnp.asarray(u_perfect), jnp.asarray(correct)))
    n, nc = len(correct), correct.sum()
    exact = np.mean([max(i - nc, 0) / i for i in range(1, n + 1)])
    assert a == pytest.approx(exact, abs=1e-6)
    assert float(unc.e_aurc(jnp.asarray(u_perfect), jnp.asarray(correct))) == pytest.approx(0.0, abs=1e-6)
    r = 1 - correct.mean()
    assert a == pytest.approx(r + (1 - r) * np.log(1 - r), abs=5e-3)  # continuous limit
    # the reversed ranking is worse; a constant score gives the plain error rate everywhere
    assert float(unc.aurc(jnp.asarray(-u_perfect), jnp.asarray(correct))) > a + 0.1
    assert float(unc.aurc(jnp.zeros(400), jnp.asarray(correct))) == pytest.approx(r, abs=1e-6)


def test_risk_coverage_ties_by_hand():
    # uncertainties [0, 1, 1], correct [1, 1, 0]: risks 0, (0 + 0.5)/2, 1/3
    cov, risk = unc.risk_coverage(jnp.array([0.0, 1.0, 1.0]), jnp.array([True, True, False]))
    np.testing.assert_allclose(cov, [1 / 3, 2 / 3, 1.0], atol=1e-6)
    np.testing.assert_allclose(risk, [0.0, 0.25, 1 / 3], atol=1e-6)


def test_accuracy_coverage_curve_and_referral_thresholds():
    u = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.9, 0.95])
    correct = np.array([1, 1, 1, 1, 1, 0, 0, 1], bool)
    t, cov, acc = unc.accuracy_coverage_curve(u, correct)
    np.testing.assert_allclose(t, [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.95])
    np.testing.assert_allclose(cov, [1 / 8, 2 / 8, 3 / 8, 4 / 8, 6 / 8, 7 / 8, 1.0])
    np.testing.assert_allclose(acc, [1, 1, 1, 1, 5 / 6, 5 / 7, 6 / 8])
    # 100% accuracy -> keep u <= 0.4; 80% -> 0.5 is the last threshold with acc >= .8
    assert unc.fit_referral_threshold(u, correct, "accuracy", 1.0) == pytest.approx(0.4)
    assert unc.fit_referral_threshold(u, correct, "accuracy", 0.8) == pytest.approx(0.5)
    assert unc.fit_referral_threshold(u, ~correct, "accuracy", 0.9) == float("-inf")  # never reached
    # keep at least 70% -> 0.5 (75%); at least 50% -> 0.4
    assert unc.fit_referral_threshold(u, correct, "coverage", 0.7) == pytest.approx(0.5)
    assert unc.fit_referral_threshold(u, correct, "coverage", 0.5) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="uncertainty.py"):
        unc.fit_referral_threshold(u, correct, "f1", 0.5)
    mask = unc.refer(u, 0.4)
    np.testing.assert_array_equal(mask, u > 0.4)
    rep = unc.referral_report(u, correct, 0.4)
    json.dumps(rep, allow_nan=False)
    assert rep == dict(threshold=0.4, n=8, n_referred=4, n_retained=4, coverage=0.5, accuracy_retained=1.0,
                       accuracy_referred=0.5, accuracy_all=0.75)
    assert unc.referral_report(u, correct, float("-inf"))["accuracy_retained"] is None
