"""leukax.models.layers.BatchNorm (fused-backward batch norm) against flax.linen.BatchNorm, and the
pointwise "dot" convolution against the 1×1 convolution, values and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from leukax.models import layers


@pytest.mark.parametrize("fast_variance", [False, True])
@pytest.mark.parametrize("use_scale", [True, False])
def test_batchnorm_equals_flax(fast_variance, use_scale):
    x = jax.random.normal(jax.random.key(0), (3, 4, 5, 6)) * 2.0 + 0.5
    kw = dict(momentum=0.9, epsilon=1e-3, use_fast_variance=fast_variance, use_scale=use_scale)
    ref, ours = nn.BatchNorm(**kw), layers.BatchNorm(**kw)
    v_ref = ref.init(jax.random.key(1), x, use_running_average=False)
    v_ours = ours.init(jax.random.key(1), x, use_running_average=False)
    assert jax.tree.structure(v_ref) == jax.tree.structure(v_ours)
    params = jax.tree.map(lambda t: t + 0.3 * jax.random.normal(jax.random.key(2), t.shape), v_ref["params"])
    stats = jax.tree.map(lambda t: t + 0.1, v_ref["batch_stats"])

    def loss(module, p, x, train):
        y, upd = module.apply({"params": p, "batch_stats": stats}, x, use_running_average=not train,
                              mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * y), (y, upd)

    for train in (True, False):
        (l_r, (y_r, u_r)), g_r = jax.value_and_grad(loss, (1, 2), has_aux=True)(ref, params, x, train)
        (l_o, (y_o, u_o)), g_o = jax.value_and_grad(loss, (1, 2), has_aux=True)(ours, params, x, train)
        np.testing.assert_allclose(y_o, y_r, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves((u_o, g_o)), jax.tree.leaves((u_r, g_r))):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("fast_variance", [False, True])
def test_batch_norm_train_vjp_matches_finite_differences(fast_variance):
    """Cotangents of y and of the returned mean and variance (custom VJP) against numerical derivatives."""
    jax.config.update("jax_enable_x64", True)
    try:
        x = jax.random.normal(jax.random.key(0), (10, 3), jnp.float64) * 2 + 1
        scale = jnp.array([1.5, -0.5, 2.0], jnp.float64)
        bias = jnp.array([0.1, 0.2, 0.3], jnp.float64)
        check_grads(lambda x, s, b: layers.batch_norm_train(x, s, b, 1e-3, fast_variance), (x, scale, bias),
                    order=1, modes=["rev"])
    finally:
        jax.config.update("jax_enable_x64", False)


def test_pointwise_dot_equals_conv():
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 3))
    dot, conv = layers.PointwiseConv2D(7, impl="dot", use_bias=True), layers.PointwiseConv2D(7, impl="conv", use_bias=True)
    v = dot.init(jax.random.key(1), x)
    v = jax.tree.map(lambda t: t + 0.1, v)
    loss = lambda m, v, x: jnp.sum(jnp.sin(m.apply(v, x)))
    np.testing.assert_allclose(dot.apply(v, x), conv.apply(v, x), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.grad(loss, (1, 2))(dot, v, x)), jax.tree.leaves(jax.grad(loss, (1, 2))(conv, v, x))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
