"""Layers shared by the backbones.

`DepthwiseConv2D` has two numerically equal implementations:
- ``"lax"``: `lax.conv_general_dilated` with ``feature_group_count=C`` (fast on GPU/TPU);
- ``"shift"``: a sum of ``kh*kw`` strided slices times per-channel weights. XLA:CPU's grouped
  convolution is ~10x slower than this, forward and backward.
``impl="auto"`` picks "shift" on the CPU backend and "lax" elsewhere.

`PointwiseConv2D` (1×1 conv) is a channel matmul ("dot") on CPU: on XLA:CPU its backward is
~3x faster than the 1×1 convolution's ("conv", used on other backends); forward about equal.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]


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


def depthwise_conv_shift(x_bhwc, kernel_hw1c, strides=(1, 1), padding: Padding = "SAME"):
    """Depthwise conv as a sum of kh*kw strided slices × per-channel weights. Returns B×Ho×Wo×C."""
    kh, kw = kernel_hw1c.shape[:2]
    sh, sw = strides
    (plo_h, phi_h), (plo_w, phi_w) = _explicit_padding(x_bhwc, (kh, kw), strides, padding)
    x = jnp.pad(x_bhwc, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
    b, hp, wp, c = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    k = kernel_hw1c.astype(x.dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                            (1, sh, sw, 1))
            term = tap * k[i, j, 0]
            out = term if out is None else out + term
    return out


def resolve_depthwise_impl(impl: str) -> str:
    """Maps "auto" to "shift" on CPU and "lax" on other backends."""
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "lax"
    if impl not in ("shift", "lax"):
        raise ValueError(f"depthwise impl must be auto|shift|lax, got {impl!r}")
    return impl


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
        fn = depthwise_conv_shift if resolve_depthwise_impl(self.impl) == "shift" else depthwise_conv_lax
        y = fn(x_bhwc, kernel, tuple(self.strides), self.padding)
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
            y = lax.dot_general(x_bhwc, k[0, 0], (((3,), (0,)), ((), ())))
        else:
            y = lax.conv_general_dilated(x_bhwc, k, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(y.dtype)
        return y
