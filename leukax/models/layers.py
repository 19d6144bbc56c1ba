"""Layers shared by the backbones.

`DepthwiseConv2D` has three numerically equal implementations:
- ``"lax"``: `lax.conv_general_dilated` with ``feature_group_count=C`` (fast on GPU/TPU);
- ``"shift"``: a sum of ``kh*kw`` strided slices times per-channel weights. XLA:CPU's grouped
  convolution is ~10x slower than this, forward and backward. Its custom VJP keeps only the input and
  computes the kernel gradient's kh*kw sums in one variadic reduce (see `_depthwise_taps_bwd`).
- ``"native"``: opt-in C++ handlers through the XLA FFI (`leukax.native.depthwise`, built with g++ when first
  used), forward, input gradient and kernel gradient on CPU; "ffi" is its old name.
``impl="auto"`` is pure JAX/XLA on every machine: "shift" on the CPU backend, "lax" elsewhere. It never
depends on a compiler or an environment variable; "native" is only ever chosen explicitly.

`PointwiseConv2D` (1×1 conv) is a channel matmul ("dot") on CPU: on XLA:CPU its backward is
~3x faster than the 1×1 convolution's ("conv", used on other backends); forward about equal.

`BatchNorm` is `flax.linen.BatchNorm` (same variables and update) with a fused custom-VJP backward in
training mode; `relu6` has TF's gradient (no tie-splitting). Both were measured on XLA:CPU
(benchmarks/ab_mobilenetv2_gru.py) and are numerically equal to what they replace in the forward pass.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]


def relu6(x):
    """min(max(x, 0), 6) with TF's Relu6Grad: d/dx = 1 on 0 < x < 6, else 0 (`jax.nn.relu6`'s custom JVP).

    `jnp.clip`'s autodiff splits ties and costs compares, selects and a divide per element in the backward pass.
    """
    return jax.nn.relu6(x)


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """Returns (lo, hi) padding of TensorFlow 'SAME' for one spatial dim (extra pixel goes to hi)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _explicit_padding(x_bhwc, kernel_hw, strides, padding) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return [(0, 0), (0, 0)]
        if padding.upper() == "SAME":
            return [tf_same_padding(x_bhwc.shape[1 + i], kernel_hw[i], strides[i]) for i in range(2)]
        raise ValueError(f"unknown padding {padding!r}")
    return [tuple(p) for p in padding]


def depthwise_conv_lax(x_bhwc, kernel_hw1c, strides=(1, 1), padding: Padding = "SAME"):
    """Depthwise conv via grouped `lax.conv_general_dilated`. Returns B×Ho×Wo×C."""
    pads = _explicit_padding(x_bhwc, kernel_hw1c.shape[:2], strides, padding)
    return lax.conv_general_dilated(
        x_bhwc, kernel_hw1c.astype(x_bhwc.dtype), window_strides=tuple(strides), padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x_bhwc.shape[-1])


def _taps(kh, kw, sh, sw, ho, wo, b, c):
    """(i, j, start, limit, strides) of the kh*kw strided windows of a padded B×Hp×Wp×C input."""
    return [(i, j, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_taps(x_bhwc, kernel_hw1c, strides, pads):
    """y[b,h,w,c] = Σ_ij xpad[b, h·sh+i, w·sw+j, c] · k[i,j,0,c], xpad = x zero-padded by pads ((lo, hi), (lo, hi))."""
    return _depthwise_taps_fwd(x_bhwc, kernel_hw1c, strides, pads)[0]


def _pad_hw(x_bhwc, pads):
    return jnp.pad(x_bhwc, ((0, 0), *pads, (0, 0)))


def _depthwise_taps_fwd(x_bhwc, kernel_hw1c, strides, pads):
    kh, kw = kernel_hw1c.shape[:2]
    sh, sw = strides
    xpad_bhwc = _pad_hw(x_bhwc, pads)
    b, hp, wp, c = xpad_bhwc.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    k = kernel_hw1c.astype(x_bhwc.dtype)
    out = None
    for i, j, lo, hi, st in _taps(kh, kw, sh, sw, ho, wo, b, c):
        term = lax.slice(xpad_bhwc, lo, hi, st) * k[i, j, 0]
        out = term if out is None else out + term
    # Residuals are the unpadded input and the kernel only: with plain autodiff XLA keeps all kh*kw strided
    # slices alive for the kernel gradient (kh*kw copies of the input) and materialises the padded input.
    return out, (x_bhwc, kernel_hw1c)


def _depthwise_taps_bwd(strides, pads, res, g_bhwc):
    """dx = Σ_ij pad_ij(g · k_ij) (each tap's window scattered back with interior padding sh−1, sw−1 and cropped
    to the unpadded input by negative edge padding); dk[i,j,0,c] = Σ_bhw xpad[b, h·sh+i, w·sw+j, c] · g[b,h,w,c]
    (all taps in one variadic reduce over b, h)."""
    x_bhwc, kernel_hw1c = res
    kh, kw = kernel_hw1c.shape[:2]
    sh, sw = strides
    (plo_h, phi_h), (plo_w, phi_w) = pads
    xpad_bhwc = _pad_hw(x_bhwc, pads)
    b, hp, wp, c = xpad_bhwc.shape
    ho, wo = g_bhwc.shape[1:3]
    k = kernel_hw1c.astype(g_bhwc.dtype)
    zero = jnp.zeros((), g_bhwc.dtype)
    dx = None
    prods = []
    for i, j, lo, hi, st in _taps(kh, kw, sh, sw, ho, wo, b, c):
        cfg = ((0, 0, 0), (i - plo_h, hp - hi[1] - phi_h, sh - 1), (j - plo_w, wp - hi[2] - phi_w, sw - 1), (0, 0, 0))
        term = lax.pad(g_bhwc * k[i, j, 0], zero, cfg)
        dx = term if dx is None else dx + term
        prods.append((lax.slice(xpad_bhwc, lo, hi, st) * g_bhwc).astype(jnp.float32))
    # All kh*kw sums in ONE variadic reduce (one pass over x and g, slices fused in): separate sums go to
    # XLA:CPU's YNNPACK reductions, which cannot fuse the slices and materialise kh*kw copies (~8x slower).
    zeros = [jnp.zeros((), jnp.float32)] * len(prods)
    sums_wc = lax.reduce(prods, zeros, lambda a, b_: [u + v for u, v in zip(a, b_)], (0, 1))
    dk_hw1c = jnp.stack([jnp.sum(s_wc, axis=0) for s_wc in sums_wc]).reshape(kh, kw, 1, c)
    dk_hw1c = dk_hw1c.astype(kernel_hw1c.dtype)
    return dx.astype(x_bhwc.dtype), dk_hw1c


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def depthwise_conv_shift(x_bhwc, kernel_hw1c, strides=(1, 1), padding: Padding = "SAME"):
    """Depthwise conv as a sum of kh*kw strided slices × per-channel weights. Returns B×Ho×Wo×C.

    Custom VJP (`_depthwise_taps`): the backward pass keeps only the input, neither its padded copy nor
    the kh*kw slices.
    """
    pads = _explicit_padding(x_bhwc, kernel_hw1c.shape[:2], strides, padding)
    return _depthwise_taps(x_bhwc, kernel_hw1c, tuple(strides), tuple(tuple(p) for p in pads))


DEPTHWISE_IMPLS = ("shift", "lax", "native")
_ALIASES = {"ffi": "native"}


def resolve_depthwise_impl(impl: str) -> str:
    """Maps "auto" to "shift" on the CPU backend and "lax" elsewhere, "ffi" to "native"; other names of
    `DEPTHWISE_IMPLS` are returned as they are."""
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "lax"
    impl = _ALIASES.get(impl, impl)
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise impl must be auto|shift|lax|native, got {impl!r}")
    return impl


def depthwise_conv(x_bhwc, kernel_hw1c, strides=(1, 1), padding: Padding = "SAME", impl: str = "auto"):
    """Depthwise conv by the implementation `resolve_depthwise_impl(impl)` names. Returns B×Ho×Wo×C.

    "native" imports `leukax.native.depthwise` (only then) and raises RuntimeError when its library cannot be
    built or loaded; it runs "lax" on other backends and "shift" where its handlers cannot (not float32,
    negative pads)."""
    name = resolve_depthwise_impl(impl)
    if name == "native":
        from leukax.native import depthwise as native_depthwise
        pads = _explicit_padding(x_bhwc, kernel_hw1c.shape[:2], strides, padding)
        if jax.default_backend() != "cpu":
            name = "lax"
        elif native_depthwise.supports(x_bhwc, pads):
            return native_depthwise.depthwise_conv(x_bhwc, kernel_hw1c, strides, pads)
        else:
            name = "shift"
    return (depthwise_conv_shift if name == "shift" else depthwise_conv_lax)(x_bhwc, kernel_hw1c, strides, padding)


class DepthwiseConv2D(nn.Module):
    """Depthwise 2-D convolution (depth multiplier 1). Kernel param: kh×kw×1×C (Flax grouped layout).

    Keras stores depthwise kernels as kh×kw×C×1; loaders transpose the last two axes.
    """
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = "SAME"
    use_bias: bool = False
    impl: str = "auto"
    kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x_bhwc):
        c = x_bhwc.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, 1, c), jnp.float32)
        if self.dtype is not None:
            x_bhwc = x_bhwc.astype(self.dtype)
        y = depthwise_conv(x_bhwc, kernel, tuple(self.strides), self.padding, self.impl)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(y.dtype)
        return y


def resolve_pointwise_impl(impl: str) -> str:
    """Maps "auto" to "dot" on CPU and "conv" on other backends."""
    if impl == "auto":
        return "dot" if jax.default_backend() == "cpu" else "conv"
    if impl not in ("dot", "conv"):
        raise ValueError(f"pointwise impl must be auto|dot|conv, got {impl!r}")
    return impl


class PointwiseConv2D(nn.Module):
    """1×1 stride-1 convolution. Kernel param: 1×1×Cin×Cout (Keras/Flax layout), optional bias.

    impl "dot" contracts the channel axis with `lax.dot_general` (a plain matmul on XLA:CPU);
    "conv" uses `lax.conv_general_dilated`. Both return B×H×W×Cout and are numerically equal.
    """
    features: int
    use_bias: bool = False
    impl: str = "auto"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x_bhwc):
        cin = x_bhwc.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (1, 1, cin, self.features), jnp.float32)
        if self.dtype is not None:
            x_bhwc = x_bhwc.astype(self.dtype)
        k = kernel.astype(x_bhwc.dtype)
        if resolve_pointwise_impl(self.impl) == "dot":
            # A 2-D (B·H·W)×Cin @ Cin×Cout matmul: autodiff then emits 2-D dots for dx and dk (= x2dᵀ g2d)
            # that XLA:CPU hands to its matmul library, where the 4-D form's dk needed transposes and a slow dot.
            y = (x_bhwc.reshape(-1, cin) @ k[0, 0]).reshape(*x_bhwc.shape[:-1], self.features)
        else:
            y = lax.conv_general_dilated(x_bhwc, k, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(y.dtype)
        return y


def _bn_stats(x_nc, fast_variance: bool):
    """Per-channel mean and biased variance of N×C: two-pass E[(x−μ)²], or one-pass E[x²]−μ² clamped at 0."""
    mean_c = jnp.mean(x_nc, axis=0)
    if fast_variance:
        return mean_c, jnp.maximum(jnp.mean(jnp.square(x_nc), axis=0) - jnp.square(mean_c), 0.0)
    return mean_c, jnp.mean(jnp.square(x_nc - mean_c), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x_nc, scale_c, bias_c, epsilon: float, fast_variance: bool = False):
    """Training-mode batch norm of N×C (float32) → (y N×C, batch mean C, biased batch var C), with

        y = (x − μ)·γ/√(σ² + ε) + β.

    Custom VJP (x̂ = (x − μ)/√(σ² + ε), sums over N): dβ = Σg, dγ = Σ g·x̂ and
        dx = γ/√(σ²+ε)·(g − Σg/N − x̂·Σ(g·x̂)/N) + ḡ_μ/N + 2 ḡ_σ²·(x − μ)/N
    (ḡ_μ, ḡ_σ² the cotangents of the returned statistics), i.e. one a·g + b + c·x pass per element and
    two per-channel reductions, instead of autodiff's chain through the mean and variance.
    """
    return _bn_fwd(x_nc, scale_c, bias_c, epsilon, fast_variance)[0]


def _bn_fwd(x_nc, scale_c, bias_c, epsilon, fast_variance):
    mean_c, var_c = _bn_stats(x_nc, fast_variance)
    inv_c = lax.rsqrt(var_c + epsilon)
    y_nc = (x_nc - mean_c) * (inv_c * scale_c) + bias_c
    return (y_nc, mean_c, var_c), (x_nc, mean_c, inv_c, scale_c)


def _bn_bwd(epsilon, fast_variance, res, cts):
    del epsilon, fast_variance
    x_nc, mean_c, inv_c, scale_c = res
    g_nc, g_mean_c, g_var_c = cts
    n = x_nc.shape[0]
    xc_nc = x_nc - mean_c
    sum_g_c = jnp.sum(g_nc, axis=0)
    sum_gx_c = jnp.sum(g_nc * xc_nc, axis=0) * inv_c          # Σ g·x̂
    a_c = scale_c * inv_c
    b_c = (g_mean_c - a_c * sum_g_c) / n
    c_c = (2.0 * g_var_c - a_c * inv_c * sum_gx_c) / n
    dx_nc = a_c * g_nc + b_c + c_c * xc_nc
    return dx_nc, sum_gx_c, sum_g_c


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nn.Module):
    """Drop-in for `flax.linen.BatchNorm` over the last axis (same variables: params scale/bias, batch_stats
    mean/var; same running-average update x̄ ← m·x̄ + (1−m)·batch, not at init), whose training-mode
    normalisation is `batch_norm_train` (fused backward). Statistics and normalisation in float32; output
    in ``dtype`` (default: float32, as Flax's promotion of a float input with float32 params).
    """
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: jnp.dtype | None = None
    use_bias: bool = True
    use_scale: bool = True
    use_fast_variance: bool = True

    @nn.compact
    def __call__(self, x_bhwc, use_running_average: bool | None = None):
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        c = x_bhwc.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale_c = self.param("scale", nn.initializers.ones, (c,), jnp.float32) if self.use_scale \
            else jnp.ones((c,), jnp.float32)
        bias_c = self.param("bias", nn.initializers.zeros, (c,), jnp.float32) if self.use_bias \
            else jnp.zeros((c,), jnp.float32)
        out_dtype = self.dtype or jnp.result_type(x_bhwc.dtype, jnp.float32)
        x_nc = x_bhwc.reshape(-1, c).astype(jnp.float32)
        if use_ra:
            y_nc = (x_nc - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale_c) + bias_c
        else:
            y_nc, mean_c, var_c = batch_norm_train(x_nc, scale_c, bias_c, self.epsilon, self.use_fast_variance)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean_c
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var_c
        return y_nc.reshape(x_bhwc.shape).astype(out_dtype)
