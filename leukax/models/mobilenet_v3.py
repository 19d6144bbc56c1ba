"""MobileNetV3 Large/Small, equal to `keras.applications.MobileNetV3Large/Small(include_top=False)`.

What Keras 3.15.1's no-top model holds (and so does this module): the `rescaling` input layer
(x/127.5 - 1, include_preprocessing=True, so input is "raw" [0, 255]), the stem `conv`/`conv_bn`, the
inverted-residual stack, and the last 1×1 conv `conv_1` (960 ch Large, 576 Small) + BN + activation.
The 1280/1024-ch `conv_2` exists only with include_top=True and is not part of the backbone.
Hard-swish = x·relu6(x+3)/6; squeeze-excite gates with hard-sigmoid relu6(x+3)/6. BN eps 1e-3, momentum 0.999.

Keras 3 layer names have no "/" (`expanded_conv_depthwise`, `expanded_conv_3_squeeze_excite_conv_1`), so
submodule names equal them; `keras_name_to_flax(name)` is the (identity-with-"/"→"__") mapping a loader
should use, which also accepts Keras-2 style names such as `expanded_conv/depthwise`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from leukax.models.layers import DepthwiseConv2D
from leukax.models.registry import BackboneSpec

# (expansion, filters, kernel, stride, squeeze-excite, hard-swish) per block, as Keras' stack_fn.
LARGE_BLOCKS = (
    (1, 16, 3, 1, False, False), (4, 24, 3, 2, False, False), (3, 24, 3, 1, False, False),
    (3, 40, 5, 2, True, False), (3, 40, 5, 1, True, False), (3, 40, 5, 1, True, False),
    (6, 80, 3, 2, False, True), (2.5, 80, 3, 1, False, True), (2.3, 80, 3, 1, False, True),
    (2.3, 80, 3, 1, False, True), (6, 112, 3, 1, True, True), (6, 112, 3, 1, True, True),
    (6, 160, 5, 2, True, True), (6, 160, 5, 1, True, True), (6, 160, 5, 1, True, True),
)
SMALL_BLOCKS = (
    (1, 16, 3, 2, True, False), (72.0 / 16, 24, 3, 2, False, False), (88.0 / 24, 24, 3, 1, False, False),
    (4, 40, 5, 2, True, True), (6, 40, 5, 1, True, True), (6, 40, 5, 1, True, True),
    (3, 48, 5, 1, True, True), (3, 48, 5, 1, True, True), (6, 96, 5, 2, True, True),
    (6, 96, 5, 1, True, True), (6, 96, 5, 1, True, True),
)
SE_RATIO = 0.25


def keras_name_to_flax(name: str) -> str:
    """Returns the Flax submodule name for a Keras layer name ("/" → "__"; Keras 3 names are unchanged)."""
    return name.replace("/", "__")


def make_divisible(v: float, divisor: int = 8) -> int:
    """Keras `_depth`: rounds to a multiple of 8, never more than 10% down."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def hard_sigmoid(x):
    return jnp.minimum(jax.nn.relu(x + 3.0), 6.0) * (1.0 / 6.0)


def hard_swish(x):
    return x * hard_sigmoid(x)


class MobileNetV3(nn.Module):
    """MobileNetV3 backbone. `__call__` returns (feature_map B×h×w×C, {"pre_logits": B×C})."""
    blocks: tuple = LARGE_BLOCKS
    alpha: float = 1.0
    include_preprocessing: bool = True
    depthwise_impl: str = "auto"
    dtype: Any = None

    def _conv(self, features, kernel, strides=1, use_bias=False, name=None):
        return nn.Conv(features, (kernel, kernel), (strides, strides), padding="SAME", use_bias=use_bias,
                       dtype=self.dtype, name=name)

    def _bn(self, train, name):
        return nn.BatchNorm(use_running_average=not train, momentum=0.999, epsilon=1e-3, dtype=self.dtype,
                            name=name)

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        x = x_bhwc if self.dtype is None else x_bhwc.astype(self.dtype)
        if self.include_preprocessing:  # Keras `rescaling` layer.
            x = x / 127.5 - 1.0
        x = hard_swish(self._bn(train, "conv_bn")(self._conv(16, 3, 2, name="conv")(x)))
        for block_id, (expansion, filters, kernel, stride, se, hswish) in enumerate(self.blocks):
            act = hard_swish if hswish else jax.nn.relu
            filters = make_divisible(filters * self.alpha)
            shortcut, in_ch = x, x.shape[-1]
            prefix = f"expanded_conv_{block_id}_" if block_id else "expanded_conv_"
            mid = make_divisible(in_ch * expansion)
            if block_id:
                x = act(self._bn(train, f"{prefix}expand_bn")(self._conv(mid, 1, name=f"{prefix}expand")(x)))
            x = DepthwiseConv2D((kernel, kernel), (stride, stride), "SAME", use_bias=False,
                                impl=self.depthwise_impl, dtype=self.dtype, name=f"{prefix}depthwise")(x)
            x = act(self._bn(train, f"{prefix}depthwise_bn")(x))
            if se:
                s = jnp.mean(x, axis=(1, 2), keepdims=True)
                s = self._conv(make_divisible(mid * SE_RATIO), 1, use_bias=True,
                               name=f"{prefix}squeeze_excite_conv")(s)
                s = self._conv(mid, 1, use_bias=True, name=f"{prefix}squeeze_excite_conv_1")(jax.nn.relu(s))
                x = x * hard_sigmoid(s)
            x = self._bn(train, f"{prefix}project_bn")(self._conv(filters, 1, name=f"{prefix}project")(x))
            if stride == 1 and in_ch == filters:
                x = shortcut + x
        x = self._conv(make_divisible(x.shape[-1] * 6), 1, name="conv_1")(x)
        fmap = hard_swish(self._bn(train, "conv_1_bn")(x))
        return fmap, {"pre_logits": jnp.mean(fmap, axis=(1, 2))}


def mobilenet_v3_large(**kw) -> MobileNetV3:
    """Returns MobileNetV3Large (no top, 960-ch feature map)."""
    return MobileNetV3(blocks=LARGE_BLOCKS, **kw)


def mobilenet_v3_small(**kw) -> MobileNetV3:
    """Returns MobileNetV3Small (no top, 576-ch feature map)."""
    return MobileNetV3(blocks=SMALL_BLOCKS, **kw)


SPECS: dict[str, BackboneSpec] = {
    "mobilenet_v3_large": BackboneSpec(
        name="mobilenet_v3_large", make=mobilenet_v3_large, input_size=224, normalization="raw",
        keras_app="MobileNetV3Large", notes="include_top=False: ends at conv_1 (960 ch); rescaling inside"),
    "mobilenet_v3_small": BackboneSpec(
        name="mobilenet_v3_small", make=mobilenet_v3_small, input_size=224, normalization="raw",
        keras_app="MobileNetV3Small", notes="include_top=False: ends at conv_1 (576 ch); rescaling inside"),
}
