"""The opt-in native depthwise convolution (leukax/native/depthwise.cc) equals the shift/lax paths: forward,
input gradient and kernel gradient, for 3×3 and 5×5, strides 1 and 2, TF 'SAME' on odd and even sizes,
explicit (asymmetric) pads, under vmap and jit(grad). "auto" never chooses it; a failed build raises."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leukax.models import layers
from leukax.native import depthwise as native_depthwise

native_conv = functools.partial(layers.depthwise_conv, impl="native")


def _data(seed, shape_bhwc, k):
    kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, shape_bhwc)
    w = jax.random.normal(kk, (k, k, 1, shape_bhwc[-1]))
    return x, w, kg


def _vjp(fn, x, w, s, padding, kg):
    y, pull = jax.vjp(lambda x, w: fn(x, w, (s, s), padding), x, w)
    g = jax.random.normal(kg, y.shape)
    return (y, *pull(g))


def test_builds():
    assert native_depthwise.available(), native_depthwise.unavailable_reason()
    assert layers.resolve_depthwise_impl("native") == "native"
    assert layers.resolve_depthwise_impl("ffi") == "native"  # the old name
    x, w, _ = _data(0, (1, 6, 6, 8), 3)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: native_conv(x, w, (1, 1), "SAME").sum(), (0, 1)))(x, w))
    for target in ("forward", "input_grad", "kernel_grad"):
        assert f"leukax_depthwise_{target}" in jaxpr


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("hw,padding", [((9, 9), "SAME"), ((10, 12), "SAME"), ((11, 8), "VALID"),
                                        ((10, 10), ((0, 1), (0, 1))), ((9, 10), ((2, 1), (1, 2))),
                                        ((6, 29), "SAME")])
def test_ffi_equals_lax(k, s, hw, padding):
    """Against the grouped lax convolution (tests/test_layers.py checks shift == lax on these cases)."""
    # C = 35: two 16-wide (or four 8-wide) channel blocks and a scalar tail of 3; width 29: several
    # register blocks of 4 columns, then the narrower and the bounds-checked ones.
    x, w, kg = _data(k * 10 + s, (2, *hw, 35), k)
    ref = _vjp(layers.depthwise_conv_lax, x, w, s, padding, kg)
    got = _vjp(native_conv, x, w, s, padding, kg)
    for name, a, b in zip(("y", "dx", "dk"), ref, got):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


def test_generic_kernel_and_stride():
    """Kernel sizes and strides without a compiled fast path (1×1, 7×7, stride 3) take the generic loops."""
    for k, s in ((1, 1), (7, 1), (3, 3)):
        x, w, kg = _data(k, (1, 10, 11, 5), k)
        for a, b in zip(_vjp(layers.depthwise_conv_lax, x, w, s, "SAME", kg),
                        _vjp(native_conv, x, w, s, "SAME", kg)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_jit_grad_and_vmap_over_members():
    """vmap over 3 members' kernels and inputs (as the ensemble trainer), under jit(grad)."""
    x, _, _ = _data(7, (3, 2, 12, 12, 16), 3)
    w = jax.random.normal(jax.random.key(8), (3, 3, 3, 1, 16))

    def loss(fn):
        def member(x, w):
            y = fn(x, w, (2, 2), "SAME")
            return jnp.sum(jnp.sin(fn(y, w, (1, 1), "SAME")))
        return lambda x, w: jnp.sum(jax.vmap(member)(x, w))

    ref = jax.jit(jax.value_and_grad(loss(layers.depthwise_conv_shift), (0, 1)))(x, w)
    got = jax.jit(jax.value_and_grad(loss(native_conv), (0, 1)))(x, w)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)


def test_vmap_shared_kernel_and_shared_input():
    """Only the input batched (kernel shared: its gradient sums over the mapped axis), and only the kernel."""
    x, w, _ = _data(9, (2, 1, 9, 9, 8), 3)
    wb = jax.random.normal(jax.random.key(10), (2, 3, 3, 1, 8))
    for in_axes, xa, wa in (((0, None), x, w), ((None, 0), x[0], wb)):
        def loss(fn, xa, wa):
            return jnp.sum(jax.vmap(lambda u, v: fn(u, v, (2, 2), "SAME") ** 2, in_axes)(xa, wa))
        ref = jax.grad(lambda a, b: loss(layers.depthwise_conv_shift, a, b), (0, 1))(xa, wa)
        got = jax.grad(lambda a, b: loss(native_conv, a, b), (0, 1))(xa, wa)
        for a, b in zip(ref, got):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)


def test_auto_is_pure_xla_and_native_only_explicit():
    """Depthwise "auto" is "shift" on CPU and "lax" elsewhere (pure XLA, no native call in the graph)."""
    assert layers.resolve_depthwise_impl("auto") == ("shift" if jax.default_backend() == "cpu" else "lax")
    x, w, _ = _data(3, (1, 6, 6, 8), 3)
    jaxpr = str(jax.make_jaxpr(lambda x, w: layers.depthwise_conv(x, w, (1, 1), "SAME"))(x, w))
    assert "leukax_depthwise" not in jaxpr
    with pytest.raises(ValueError):
        layers.resolve_depthwise_impl("nope")
    x = jnp.ones((1, 8, 8, 3)) * jnp.arange(3)
    m_ffi = layers.DepthwiseConv2D((3, 3), (2, 2), impl="native", use_bias=True)
    m_lax = layers.DepthwiseConv2D((3, 3), (2, 2), impl="lax", use_bias=True)
    v = m_ffi.init(jax.random.key(1), x)
    np.testing.assert_allclose(m_ffi.apply(v, x), m_lax.apply(v, x), atol=1e-5)


def test_broken_build_raises_and_auto_needs_no_compiler(monkeypatch, tmp_path, caplog):
    """Without a compiler the explicit native choice fails with the reason; the default graph still runs."""
    monkeypatch.setattr(native_depthwise, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_depthwise, "CXX", str(tmp_path / "no-such-g++"))
    native_depthwise.reset()
    try:
        with caplog.at_level("WARNING", logger=native_depthwise.__name__):
            assert not native_depthwise.available()
        assert "not found" in native_depthwise.unavailable_reason()
        x, w, _ = _data(11, (1, 7, 7, 4), 3)
        with pytest.raises(RuntimeError, match="not found"):
            native_conv(x, w, (1, 1), "SAME")
        with pytest.raises(RuntimeError, match="not found"):
            native_depthwise.depthwise_conv(x, w, (1, 1), ((1, 1), (1, 1)))
        np.testing.assert_allclose(layers.depthwise_conv(x, w, (1, 1), "SAME"),
                                   layers.depthwise_conv_shift(x, w, (1, 1), "SAME"), rtol=1e-6)
        assert not list(tmp_path.glob("*.so"))
    finally:
        native_depthwise.reset()


def test_ffi_fallbacks_and_refusals():
    """bfloat16 goes through the shift path under impl="native"; native depthwise_conv itself refuses it."""
    x, w, _ = _data(12, (1, 6, 6, 8), 3)
    xb = x.astype(jnp.bfloat16)
    np.testing.assert_array_equal(native_conv(xb, w.astype(jnp.bfloat16), (1, 1), "SAME"),
                                  layers.depthwise_conv_shift(xb, w.astype(jnp.bfloat16), (1, 1), "SAME"))
    with pytest.raises(ValueError):
        native_depthwise.depthwise_conv(xb, w, (1, 1), ((1, 1), (1, 1)))
    with pytest.raises(ValueError):
        native_depthwise.depthwise_conv(x, w, (1, 1), ((-1, 1), (1, 1)))


def test_failing_compiler_reports_its_error(monkeypatch, tmp_path):
    """A compiler that exists but fails (here `false`) gives a RuntimeError from build()."""
    with pytest.raises(RuntimeError, match="failed"):
        native_depthwise.build("false", cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.so"))


def test_cpu_kernels_threads_to_the_backbone():
    """pretrained(..., cpu_kernels="native") (a program's --cpu_kernels) gives depthwise backbones the native
    kernel; "xla" (the default) leaves the pure-XLA graph; backbones without depthwise convolutions ignore it."""
    from experiments import common
    from leukax.pretrained import pretrained
    module, variables, _ = pretrained("mobilenet_v2", weights=None, cpu_kernels="native", init_size=32)
    assert module.depthwise_impl == "native"
    x = jnp.zeros((1, 32, 32, 3))
    assert "leukax_depthwise_forward" in str(jax.make_jaxpr(module.apply)(variables, x))
    module, variables, _, record = common.load_backbone("mobilenet_v2", "none", None)
    assert module.depthwise_impl == "auto" and record["cpu_kernels"] == "xla"
    assert "leukax_depthwise" not in str(jax.make_jaxpr(module.apply)(variables, x))
    assert not hasattr(pretrained("resnet50_v2", weights=None, cpu_kernels="native", init_size=32)[0], "depthwise_impl")
    with pytest.raises(ValueError, match="cpu_kernels"):
        pretrained("mobilenet_v2", weights=None, cpu_kernels="fast")
