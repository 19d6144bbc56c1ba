import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leukax.models import layers


@pytest.mark.parametrize("k,s,padding", [(3, 1, "SAME"), (3, 2, "SAME"), (5, 2, "SAME"), (3, 2, "VALID"),
                                         (3, 2, ((0, 1), (0, 1)))])
def test_shift_depthwise_equals_lax(k, s, padding):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 11, 12, 5))
    w = jax.random.normal(kk, (k, k, 1, 5))
    a = layers.depthwise_conv_lax(x, w, (s, s), padding)
    b = layers.depthwise_conv_shift(x, w, (s, s), padding)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-5)
    ga = jax.grad(lambda x, w: (layers.depthwise_conv_lax(x, w, (s, s), padding) ** 2).sum(), (0, 1))(x, w)
    gb = jax.grad(lambda x, w: (layers.depthwise_conv_shift(x, w, (s, s), padding) ** 2).sum(), (0, 1))(x, w)
    for u, v in zip(ga, gb):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)


def test_tf_same_padding_matches_tf_rule():
    assert layers.tf_same_padding(224, 3, 2) == (0, 1)
    assert layers.tf_same_padding(225, 3, 2) == (1, 1)
    assert layers.tf_same_padding(7, 1, 1) == (0, 0)


def test_module_impls_agree():
    x = jnp.ones((1, 8, 8, 3)) * jnp.arange(3)
    m_shift = layers.DepthwiseConv2D((3, 3), (2, 2), impl="shift", use_bias=True)
    m_lax = layers.DepthwiseConv2D((3, 3), (2, 2), impl="lax", use_bias=True)
    v = m_shift.init(jax.random.key(1), x)
    assert v["params"]["kernel"].shape == (3, 3, 1, 3)
    np.testing.assert_allclose(m_shift.apply(v, x), m_lax.apply(v, x), atol=1e-5)
