"""leukax.fusion: combination rules on hand-made arrays and the Himel et al. meta-classifier."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from leukax import fusion, metrics

# 3 hybrids × 2 examples × 3 classes
P_HNK = jnp.array([
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]],
    [[0.5, 0.4, 0.1], [0.1, 0.2, 0.7]],
    [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
])


def test_sum_and_mean_rule():
    s = fusion.sum_rule(P_HNK)
    np.testing.assert_allclose(s, P_HNK.sum(0) / 3, atol=1e-6)  # rows already sum to 3
    np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(s.argmax(-1), fusion.mean_rule(P_HNK).argmax(-1))
    np.testing.assert_array_equal(s.argmax(-1), [1, 2])  # 1.5 vs 1.2 ; 1.4 vs 1.0
    # members not yet averaged: H×M×N×K reduces to the ensemble mean first
    p_hmnk = jnp.stack([P_HNK, P_HNK[::-1]], axis=1)
    np.testing.assert_allclose(fusion.sum_rule(p_hmnk), fusion.sum_rule((P_HNK + P_HNK[::-1]) / 2), atol=1e-6)
    with pytest.raises(ValueError, match="fusion.py"):
        fusion.sum_rule(P_HNK[0])


def test_max_product_weighted_rules():
    m = fusion.max_rule(P_HNK)
    np.testing.assert_allclose(m[0], np.array([0.6, 0.8, 0.1]) / 1.5, atol=1e-6)
    prod = fusion.product_rule(P_HNK)
    ref = np.prod(np.asarray(P_HNK), 0)
    np.testing.assert_allclose(prod, ref / ref.sum(-1, keepdims=True), atol=1e-6)
    # a zero from one hybrid vetoes that class, even where the others are confident
    p_zero = P_HNK.at[2, 0].set(jnp.array([0.0, 0.9, 0.1]))
    p_zero = p_zero.at[0, 0].set(jnp.array([0.98, 0.01, 0.01])).at[1, 0].set(jnp.array([0.98, 0.01, 0.01]))
    out = fusion.product_rule(p_zero)
    assert float(out[0, 0]) < 1e-6 and bool(jnp.all(jnp.isfinite(out)))
    assert int(fusion.sum_rule(p_zero)[0].argmax()) == 0  # the sum rule is not vetoed
    # every class vetoed by some hybrid: still finite and normalised
    all_zero = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(fusion.product_rule(all_zero), [[0.5, 0.5]], atol=1e-6)
    # weights: (1, 0, 0) picks hybrid 0; equal weights = mean rule
    np.testing.assert_allclose(fusion.weighted_rule(P_HNK, [1.0, 0.0, 0.0]), P_HNK[0], atol=1e-6)
    np.testing.assert_allclose(fusion.weighted_rule(P_HNK, [2.0, 2.0, 2.0]), fusion.mean_rule(P_HNK), atol=1e-6)
    np.testing.assert_allclose(fusion.fuse("weighted", P_HNK, [1, 3, 0]),
                               (P_HNK[0] + 3 * P_HNK[1]) / 4, atol=1e-6)
    with pytest.raises(ValueError, match="fusion.py"):
        fusion.weighted_rule(P_HNK, [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fusion.fuse("median", P_HNK)


def test_concat_features():
    a, b = jnp.ones((4, 1024)), jnp.zeros((4, 1024))
    c = fusion.concat_features(a, b)
    assert c.shape == (4, 2048)
    np.testing.assert_array_equal(c[:, :1024], 1.0)
    with pytest.raises(ValueError, match="different numbers of examples"):
        fusion.concat_features(a, jnp.ones((3, 8)))


def test_meta_classifier_shapes_and_param_count():
    d, k = 2048, 3
    model = fusion.MetaClassifier(num_classes=k)
    variables = model.init(jax.random.key(0), jnp.zeros((2, d)))
    params = variables["params"]
    assert list(params) == ["dense_0", "dense_1", "dense_2", "logits"]
    assert params["dense_0"]["kernel"].shape == (d, 1000)
    assert params["dense_1"]["kernel"].shape == (1000, 100)
    assert params["dense_2"]["kernel"].shape == (100, 10)
    assert params["logits"]["kernel"].shape == (10, k)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n_params == (d * 1000 + 1000) + (1000 * 100 + 100) + (100 * 10 + 10) + (10 * k + k)
    logits, out = model.apply(variables, jnp.ones((5, d)))
    assert logits.shape == (5, k) and out["pre_logits"].shape == (5, 10)
    # dropout override may be traced; train=True with rate 0 needs no rng
    model.apply(variables, jnp.ones((5, d)), train=True)
    f = jax.jit(lambda r: model.apply(variables, jnp.ones((5, d)), train=True, dropout_rate=r,
                                      rngs={"dropout": jax.random.key(1)})[0])
    assert f(0.5).shape == (5, k)


def test_meta_classifier_fits_separable_features():
    rng = np.random.default_rng(0)
    k, n = 3, 60
    labels = np.repeat(np.arange(k), n // k)
    centers = rng.normal(size=(k, 16)) * 3
    feats_a = centers[labels] + rng.normal(size=(n, 16)) * 0.3
    feats_b = rng.normal(size=(n, 8))  # an uninformative second branch
    x = fusion.concat_features(jnp.asarray(feats_a, jnp.float32), jnp.asarray(feats_b, jnp.float32))
    y = jnp.asarray(labels)
    model = fusion.MetaClassifier(num_classes=k)
    params = model.init(jax.random.key(0), x[:1])["params"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in range(60):
        params, opt_state, loss = step(params, opt_state)
    logits, _ = model.apply({"params": params}, x)
    assert float(jnp.mean(logits.argmax(-1) == y)) == 1.0
    assert float(loss) < 0.2


def test_meta_classifier_trains_through_compiled_on_flat_features():
    """The feature-fusion path: flat N×D features, one view (`views=False`), the paper's Adam without dropout;
    two members learn held-out separable data, and prediction gives M×N×K probabilities."""
    from leukax.train import compiled
    rng = np.random.default_rng(1)
    k = 3
    centers = rng.normal(size=(k, 12)) * 3
    y_tr, y_va = np.repeat(np.arange(k), 20), np.repeat(np.arange(k), 10)
    x_tr, x_va = (centers[y] + rng.normal(size=(len(y), 12)) * 0.3 for y in (y_tr, y_va))
    meta = fusion.MetaClassifier(num_classes=k)
    rcp = compiled.Recipe(num_members=2, num_epochs=40, batch_size=20, patience=40, optimizer="adam",
                          schedule="constant", label_smoothing=0.0, val_views=0)
    hp = compiled.default_hparams(learning_rate=1e-2, weight_decay=0.0, dropout=0.0, input_dropout=0.0)
    res = compiled.fit(rcp, meta, k, x_tr, y_tr, x_va, y_va, hp, seed=0, views=False)
    probs_mnk = np.asarray(compiled.make_predict(meta)(res.params, jnp.asarray(x_va, jnp.float32)[None]))
    assert probs_mnk.shape == (2, 30, k)
    np.testing.assert_allclose(probs_mnk.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.mean(probs_mnk.argmax(-1) == y_va, -1) == 1.0)
    assert not np.allclose(probs_mnk[0], probs_mnk[1])  # members differ (own init and data order)


# ----------------------------------------------------------------- Himel et al. Table 3 and the branch head
# Table 3 of Himel et al. 2024 (3 classes): base-model totals (trainable 1,028,099 each), the proposed
# model's two branches (trainable 1,025,024 each) and its meta-classifier (2,150,143).
PAPER_TABLE3_TOTALS = {"xception": 23_938_579, "inception_v3": 24_879_883, "resnet50_v2": 26_641_899,
                       "efficientnet_b6": 44_293_242, "efficientnet_b7": 67_686_786,
                       "mobilenet_v3_large": 6_535_531}


def test_table3_head_counts_equal_paper():
    assert fusion.branch_head_params(1000, 3) == 1_028_099
    assert fusion.branch_head_params(1000, 3, with_output=False) == 1_025_024
    assert fusion.meta_classifier_params(2 * 1024, 3) == 2_150_143
    meta = fusion.MetaClassifier(num_classes=3)
    v = jax.eval_shape(meta.init, jax.random.key(0), jnp.zeros((1, 2048)))
    assert sum(x.size for x in jax.tree_util.tree_leaves(v)) == 2_150_143
    head = fusion.BranchHead(num_classes=3)  # on 1000 ImageNet outputs (a 1×1 map of 1000 channels)
    v = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 1, 1, 1000)))
    assert sum(x.size for x in jax.tree_util.tree_leaves(v)) == 1_028_099


def _backbone_total_channels(name):
    from leukax.models import registry
    m = registry.get_spec(name).make()
    x = jnp.zeros((1, 75, 75, 3))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    fm = jax.eval_shape(lambda v_: m.apply(v_, x)[0], v)
    return sum(a.size for a in jax.tree_util.tree_leaves(v)), fm.shape[-1]


def test_table3_totals_equal_paper():
    from leukax.imagenet_top import keras_constant_params
    names = list(PAPER_TABLE3_TOTALS)
    tc = {n: _backbone_total_channels(n) for n in names}
    totals = {n: t + keras_constant_params(n) for n, (t, _) in tc.items()}
    rows = fusion.table3_rows(totals, {n: c for n, (_, c) in tc.items()}, ("efficientnet_b7", "mobilenet_v3_large"),
                              3, branch_input="imagenet_logits")
    by = {r["model"]: r for r in rows}
    for n in names:
        assert by[n]["total"] == PAPER_TABLE3_TOTALS[n] and by[n]["trainable"] == 1_028_099
    b1, b2 = by["proposed [branch 1: efficientnet_b7]"], by["proposed [branch 2: mobilenet_v3_large]"]
    assert (b1["total"], b1["trainable"]) == (67_683_711, 1_025_024)
    assert (b2["total"], b2["trainable"]) == (6_532_456, 1_025_024)
    assert by["proposed [meta-classifier]"]["total"] == 2_150_143
    pooled = {r["model"]: r for r in fusion.table3_rows(totals, {n: c for n, (_, c) in tc.items()}, (), 3, "pooled")}
    assert pooled["xception"]["trainable"] == fusion.branch_head_params(2048, 3)


def test_branch_head_positions():
    from leukax.models.heads import DenseHead
    from leukax.imagenet_top import make_top
    fm = jax.random.normal(jax.random.key(0), (2, 3, 3, 960))
    pooled = fusion.BranchHead(num_classes=3)
    v = pooled.init(jax.random.key(1), fm)
    dense = DenseHead(num_classes=3)  # same parameters and outputs as leukax's DenseHead
    np.testing.assert_allclose(pooled.apply(v, fm)[0], dense.apply(v, fm)[0], atol=1e-5)
    top = fusion.BranchHead(num_classes=3, imagenet_hidden=1280)  # MobileNetV3Large's Conv_2/Logits top
    vt = top.init(jax.random.key(1), fm)
    assert set(vt["params"]) == {"imagenet_top", "dense", "logits"}
    assert vt["params"]["imagenet_top"]["Conv_2"]["kernel"].shape == (960, 1280)
    # the head reads the softmax of the ImageNet logits
    logits_1000 = make_top("mobilenet_v3_large").apply({"params": vt["params"]["imagenet_top"]}, fm)
    head_only = {"params": {k: vt["params"][k] for k in ("dense", "logits")}}
    ref = DenseHead(num_classes=3).apply(head_only, jax.nn.softmax(logits_1000)[:, None, None, :])[0]
    np.testing.assert_allclose(top.apply(vt, fm)[0], ref, atol=1e-5)


def test_lite_imagenet_top_loads(shared_dir):
    from leukax import imagenet_top
    v = imagenet_top.load_imagenet_top("efficientnet_lite0", 1280, "imagenet", shared_dir / "weights")
    z = np.load(shared_dir / "weights" / "efficientnet_lite0.npz")
    np.testing.assert_array_equal(v["params"]["predictions"]["kernel"], z["_fc.weight"].T)
    with pytest.raises(FileNotFoundError, match="mobilenet_v2"):
        imagenet_top.load_imagenet_top("mobilenet_v2", 1280, "imagenet", shared_dir / "weights")
    p = imagenet_top.top_outputs("efficientnet_lite0", v, np.ones((3, 1280), np.float32))
    assert p.shape == (3, 1000)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------ validation-fitted fusion
def test_simplex_grid_is_every_step_multiple_plus_the_sum_rule():
    g = fusion.simplex_grid(3, 0.05)
    assert g.shape == (231 + 1, 3)  # C(20 + 2, 2) points, then 1/H
    np.testing.assert_allclose(g.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(g[:-1] * 20, np.round(g[:-1] * 20), atol=1e-4)
    assert len({tuple(r) for r in np.round(g[:-1] * 20).astype(int)}) == 231
    np.testing.assert_allclose(g[-1], 1 / 3)
    with pytest.raises(ValueError, match="fusion.py"):
        fusion.simplex_grid(3, 0.3)


def _hybrids(seed=0, n=200, k=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    good = np.eye(k)[y] * 0.6 + 0.4 / k
    return y, np.stack([good, np.full((n, k), 1 / k), rng.dirichlet(np.ones(k), n)]).astype(np.float32)


def test_fit_weights_is_the_grid_minimum_of_validation_nll():
    y, p_hnk = _hybrids()
    w = fusion.fit_weights(p_hnk, y)
    np.testing.assert_allclose(w, [1, 0, 0])  # only the first hybrid knows the labels
    grid = fusion.simplex_grid(3)
    brute = [float(metrics.nll(jnp.asarray(y), fusion.weighted_rule(p_hnk, g))) for g in grid]
    assert float(metrics.nll(jnp.asarray(y), fusion.weighted_rule(p_hnk, w))) == pytest.approx(min(brute), abs=1e-6)


def test_choose_rule_keeps_the_sum_rule_on_ties_and_fits_when_it_pays():
    y, p_hnk = _hybrids()
    same = np.stack([p_hnk[0]] * 3)
    np.testing.assert_allclose(fusion.fit_weights(same, y), 1 / 3)  # every weighting ties: the sum rule's
    c = fusion.choose_rule(same, y)
    assert c["rule"] == "sum" and np.allclose(c["weights"], 1 / 3)
    c = fusion.choose_rule(p_hnk, y)
    assert c["rule"] == "fitted" and np.allclose(c["weights"], [1, 0, 0])
    assert c["val_nll_fitted_crossfit"] < c["val_nll_sum"]


def test_choose_rule_cross_fits_so_a_fit_to_noise_does_not_win():
    # Three uninformative hybrids on 30 cells: weights fitted on all of validation beat the sum rule there (they saw
    # the labels), but scored on held-out pieces they do not, and the sum rule is kept.
    rng = np.random.default_rng(14)
    y = rng.integers(0, 2, 30)
    p_hnk = rng.dirichlet(np.ones(2), (3, 30)).astype(np.float32)
    w = fusion.fit_weights(p_hnk, y)
    in_sample = fusion.grid_nll(p_hnk, jnp.asarray(y), jnp.asarray(np.stack([w, np.full(3, 1 / 3, np.float32)])))
    assert in_sample[0] < in_sample[1] - 0.01
    assert fusion.choose_rule(p_hnk, y)["rule"] == "sum"
