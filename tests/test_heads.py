import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leukax.models import classifier, heads


class TinyBackbone(nn.Module):
    """A 2-layer conv net honouring the backbone contract (Conv → BN → relu, stride 2)."""

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False, name="conv")(x_bhwc)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name="bn")(x)
        fm = nn.relu(x)
        return fm, {"pre_logits": fm.mean(axis=(1, 2))}


FM = jax.random.normal(jax.random.key(0), (3, 2, 3, 16))


@pytest.mark.parametrize("head,dim", [(heads.GRUHead(2, units=8, hidden=6), 6),
                                      (heads.DenseHead(3, features=10), 10),
                                      (heads.LinearHead(4), 16),
                                      (heads.GRUPoolHead(3, units=8, hidden=6), 6)])
def test_head_shapes(head, dim):
    v = head.init(jax.random.key(1), FM)
    logits, out = head.apply(v, FM)
    assert logits.shape == (3, head.num_classes) and logits.dtype == jnp.float32
    assert out["pre_logits"].shape == (3, dim)


def test_gru_head_reads_positions_row_major_and_uses_final_state():
    head = heads.GRUHead(2, units=5, hidden=4)
    v = head.init(jax.random.key(2), FM)
    gru = nn.RNN(nn.GRUCell(5, name="gru"), return_carry=True)
    seq = FM.reshape(3, 6, 16)                        # row-major H·W steps
    state, outs = gru.apply({"params": {"cell": v["params"]["gru"]}}, seq)
    np.testing.assert_allclose(state, outs[:, -1], atol=1e-6)
    hid = nn.relu(state @ v["params"]["dense"]["kernel"] + v["params"]["dense"]["bias"])
    _, out = head.apply(v, FM)
    np.testing.assert_allclose(out["pre_logits"], hid, atol=1e-5)
    # Order matters: transposing H and W changes the result.
    _, out_t = head.apply(v, FM.transpose(0, 2, 1, 3))
    assert not np.allclose(out_t["pre_logits"], hid, atol=1e-4)


def test_gru_backward_pass_equals_autodiff_of_flax_gru_cell():
    """gru_sequence's hand-written BPTT: gradients of every weight, the input and the dropout mask equal
    autodiff of flax's GRUCell run over the same sequence with the same recurrent mask."""
    b, t, c, u = 3, 6, 5, 4
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, t, c)), jnp.float32)
    mask = jnp.asarray((rng.random((b, u)) > 0.3) / 0.7, jnp.float32)
    w_bu = jnp.asarray(rng.normal(size=(b, u)), jnp.float32)
    cell = nn.GRUCell(u)
    p = cell.init(jax.random.key(3), jnp.zeros((b, u)), x[:, 0])["params"]
    p = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape), jnp.float32), p)  # nonzero biases

    def reference(p, x, mask):  # autodiff through flax's cell; the mask scales h_{t-1} in the recurrent matmuls
        def step(h, x_t):
            hh = h * mask
            r = jax.nn.sigmoid(x_t @ p["ir"]["kernel"] + p["ir"]["bias"] + hh @ p["hr"]["kernel"])
            z = jax.nn.sigmoid(x_t @ p["iz"]["kernel"] + p["iz"]["bias"] + hh @ p["hz"]["kernel"])
            n = jnp.tanh(x_t @ p["in"]["kernel"] + p["in"]["bias"] + r * (hh @ p["hn"]["kernel"] + p["hn"]["bias"]))
            return (1 - z) * n + z * h, None
        return jax.lax.scan(step, jnp.zeros((b, u)), x.swapaxes(0, 1))[0]

    def ours(p, x, mask):
        k_i = jnp.stack([p[n]["kernel"] for n in ("ir", "iz", "in")], 1)
        b_i = jnp.stack([p[n]["bias"] for n in ("ir", "iz", "in")])
        k_h = jnp.stack([p[n]["kernel"] for n in ("hr", "hz", "hn")], 1)
        return heads.gru_sequence(x, k_i, b_i, k_h, p["hn"]["bias"], mask)

    ones = jnp.ones((b, u))
    # without a mask the reference is exactly flax's cell
    flax_state = jax.lax.scan(lambda h, x_t: (cell.apply({"params": p}, h, x_t)[0],) * 2, jnp.zeros((b, u)),
                              x.swapaxes(0, 1))[0]
    np.testing.assert_allclose(ours(p, x, ones), flax_state, atol=1e-6)
    np.testing.assert_allclose(reference(p, x, ones), flax_state, atol=1e-6)
    loss = lambda f: (lambda p, x, m: jnp.sum(f(p, x, m) * w_bu))  # noqa: E731
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(p, x, mask)
    g_ref = jax.grad(loss(reference), argnums=(0, 1, 2))(p, x, mask)
    for a, r in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        assert a.shape == r.shape and float(jnp.abs(r).max()) > 0
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    # numpy params (a loaded bundle) vmapped inside jit, as leukax.predict runs them
    head = heads.GRUHead(2, units=u, hidden=4)
    v = jax.tree.map(np.asarray, jax.vmap(lambda k: head.init(k, x[:, :, None, :])["params"])(
        jax.random.split(jax.random.key(4), 2)))
    out = jax.jit(lambda x: jax.vmap(lambda p: head.apply({"params": p}, x)[0])(v))(x[:, :, None, :])
    assert out.shape == (2, b, 2) and np.all(np.isfinite(out))
    # vmapped over members (the compiled trainer's axis) as well
    pm = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), p)
    g_m = jax.vmap(jax.grad(loss(ours)), (0, None, None))(pm, x, mask)
    g_r = jax.vmap(jax.grad(loss(reference)), (0, None, None))(pm, x, mask)
    for a, r in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_paper_gru_heads_table():
    """Akter et al. Table 2 lives once, in leukax.train.recipe (the GRU width and dropout per backbone included)."""
    from leukax.train.recipe import PAPER_TABLE2
    assert {k: (v["units"], v["dropout"]) for k, v in PAPER_TABLE2.items()} == {
        "inception_v3": (512, 0.4), "mobilenet_v2": (512, 0.1), "efficientnet_b3": (256, 0.1)}
    assert [PAPER_TABLE2[k]["optimizer"] for k in ("inception_v3", "mobilenet_v2", "efficientnet_b3")] == [
        "sgd", "sgd", "rmsprop"]


@pytest.mark.parametrize("head", [heads.GRUHead(2, units=8, hidden=32), heads.DenseHead(2, features=64),
                                  heads.GRUPoolHead(2, units=8, hidden=32)])
def test_traced_dropout_rate_no_retrace(head):
    v = head.init(jax.random.key(3), FM)
    traces = []

    @jax.jit
    def f(v, rate, rng):
        traces.append(1)
        return head.apply(v, FM, train=True, dropout_rate=rate, rngs={"dropout": rng})[0]

    rng = jax.random.key(4)
    eval_logits = head.apply(v, FM)[0]
    l0 = f(v, jnp.float32(0.0), rng)
    l5 = f(v, jnp.float32(0.5), rng)
    l9 = f(v, jnp.float32(0.9), rng)
    assert len(traces) == 1
    np.testing.assert_allclose(l0, eval_logits, atol=1e-5)          # rate 0 → identity
    assert not np.allclose(l5, eval_logits, atol=1e-3)
    assert not np.allclose(l5, l9, atol=1e-3)
    # The head's own default rate is used when no override is given, and eval mode ignores dropout.
    lt = head.apply(v, FM, train=True, rngs={"dropout": rng})[0]
    assert not np.allclose(lt, eval_logits, atol=1e-3)


def test_dropout_keeps_expectation():
    x = jnp.ones((20000,))
    y = heads.dropout(x, jnp.float32(0.25), jax.random.key(5), train=True)
    assert abs(float((y == 0).mean()) - 0.25) < 0.02
    np.testing.assert_allclose(float(y.max()), 1 / 0.75, rtol=1e-6)
    np.testing.assert_allclose(float(y.mean()), 1.0, atol=0.03)
    assert float(jnp.abs(heads.dropout(x, 1.0, jax.random.key(6), True)).max()) == 0.0


def test_classifier_call_features_classify_and_counts():
    model = classifier.Classifier(TinyBackbone(), heads.DenseHead(3, features=12))
    x = jax.random.normal(jax.random.key(7), (2, 8, 8, 3))
    v = model.init(jax.random.key(8), x)
    assert set(v["params"]) == {"backbone", "head"}
    logits, out = model.apply(v, x)
    assert logits.shape == (2, 3)
    assert out["feature_map"].shape == (2, 4, 4, 8)
    assert out["backbone_pre_logits"].shape == (2, 8) and out["pre_logits"].shape == (2, 12)
    fm, bb = model.apply(v, x, method=classifier.Classifier.features)
    np.testing.assert_allclose(fm, out["feature_map"], atol=1e-6)
    logits2, _ = model.apply(v, fm, method=classifier.Classifier.classify)
    np.testing.assert_allclose(logits2, logits, atol=1e-6)
    # train mode updates batch_stats and uses the dropout rng
    (_, _), upd = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(9)}, mutable=["batch_stats"])
    assert not np.allclose(upd["batch_stats"]["backbone"]["bn"]["mean"], 0.0)
    c = classifier.count_params(v)
    assert c["backbone"] == 3 * 3 * 3 * 8 + 2 * 8
    assert c["head"] == 8 * 12 + 12 + 12 * 3 + 3
    assert c["non_trainable"] == 2 * 8
    assert c["total"] == c["trainable"] + c["non_trainable"] == c["backbone"] + c["head"] + 16


def test_gru_reads_the_centre_last_when_asked():
    """order="center_last" permutes positions (farthest from the centre first, the centre cell last) and a
    flattened square map B×T×C is read like the B×H×W×C map it came from."""
    from leukax.models.heads import GRUHead, sequence_order
    order = sequence_order(3, 3, "center_last")
    assert sorted(order.tolist()) == list(range(9)) and order[-1] == 4 and set(order[:4].tolist()) == {0, 2, 6, 8}
    np.testing.assert_array_equal(sequence_order(2, 3, "raster"), np.arange(6))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 5))
    for order_name in ("raster", "center_last"):
        head = GRUHead(2, units=4, hidden=4, order=order_name)
        v = head.init(jax.random.PRNGKey(1), x)
        np.testing.assert_allclose(head.apply(v, x)[0], head.apply(v, x.reshape(2, 9, 5))[0], atol=1e-6)
    raster, centre = GRUHead(2, units=4, hidden=4), GRUHead(2, units=4, hidden=4, order="center_last")
    v = raster.init(jax.random.PRNGKey(1), x)
    assert not np.allclose(raster.apply(v, x)[0], centre.apply(v, x)[0])  # same weights, another reading order
    seq = x.reshape(2, 9, 5)[:, order]  # reading order by hand: the raster head on the permuted positions
    np.testing.assert_allclose(centre.apply(v, x)[0], raster.apply(v, seq[:, :, None, :])[0], atol=1e-6)


def test_gru_pool_head_with_its_gru_rows_zeroed_is_the_dense_head_on_pooled_features():
    """GRUPoolHead's dense layer reads [h_T ; mean_t x_t]: with the U rows that read h_T set to zero, its
    logits equal DenseHead(features=hidden)'s whose kernel is the remaining C rows (the dense head on the
    same pooled features is a special case); with them nonzero, the GRU changes the logits."""
    units, hidden, k = 5, 7, 3
    pool_head = heads.GRUPoolHead(k, units=units, hidden=hidden, dropout=0.0)
    v = pool_head.init(jax.random.key(11), FM)["params"]
    assert v["dense"]["kernel"].shape == (units + FM.shape[-1], hidden)
    v["logits"]["bias"] = jnp.asarray(np.random.default_rng(0).normal(size=k), jnp.float32)  # a nonzero bias too
    dense = {"dense": {"kernel": v["dense"]["kernel"][units:], "bias": v["dense"]["bias"] + 0.1},
             "logits": v["logits"]}
    zeroed = {**v, "dense": {"kernel": v["dense"]["kernel"].at[:units].set(0.0), "bias": dense["dense"]["bias"]}}
    want, want_aux = heads.DenseHead(k, features=hidden, dropout=0.0).apply({"params": dense}, FM)
    got, got_aux = pool_head.apply({"params": zeroed}, FM)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got_aux["pre_logits"], want_aux["pre_logits"], atol=1e-5)
    full = {**v, "dense": {"kernel": v["dense"]["kernel"], "bias": dense["dense"]["bias"]}}
    assert not np.allclose(pool_head.apply({"params": full}, FM)[0], want, atol=1e-3)
    # the same on a flattened B×T×C map, the form the compiled trainer feeds
    got_flat = pool_head.apply({"params": zeroed}, FM.reshape(3, 6, 16))[0]
    np.testing.assert_allclose(got_flat, want, atol=1e-5)


def test_make_head_knows_gru_pool():
    from leukax.train import recipe
    assert isinstance(heads.make_head("gru_pool", 2, units=4), heads.GRUPoolHead)
    assert "gru_pool" in recipe.HEAD_KINDS and isinstance(recipe.make_model("gru_pool", 2, 4, 4), heads.GRUPoolHead)
