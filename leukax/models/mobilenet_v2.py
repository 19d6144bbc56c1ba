"""MobileNetV2 (Sandler et al. 2018) equal to `keras.applications.MobileNetV2(include_top=False)`.

Submodule names are the Keras layer names (`Conv1`, `bn_Conv1`, `expanded_conv_depthwise`,
`block_1_expand`, ..., `Conv_1`, `Conv_1_bn`), so legacy Keras `.h5` weights load by name
(`leukax.weights.keras_h5.load_into`). Weightless Keras layers (`block_1_pad`, ReLUs, adds) are
plain functions here.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from leukax.models.layers import BatchNorm, DepthwiseConv2D, PointwiseConv2D, relu6
from leukax.models.registry import BackboneSpec

# (expansion, filters, stride) for block_0 ... block_16, as in keras.applications.
BLOCKS = ((1, 16, 1),
          (6, 24, 2), (6, 24, 1),
          (6, 32, 2), (6, 32, 1), (6, 32, 1),
          (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
          (6, 96, 1), (6, 96, 1), (6, 96, 1),
          (6, 160, 2), (6, 160, 1), (6, 160, 1),
          (6, 320, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Keras' `_make_divisible`: rounds v to a multiple of divisor, never down by more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def correct_pad(size_hw: tuple[int, int], kernel: int = 3) -> list[tuple[int, int]]:
    """Keras' `imagenet_utils.correct_pad`: ((lo, hi), (lo, hi)) zero padding before a stride-2 conv."""
    return [(kernel // 2 - (1 - s % 2), kernel // 2) for s in size_hw]


class MobileNetV2(nn.Module):
    """MobileNetV2 without top. Returns (feature_map B×h×w×1280, {"pre_logits": B×1280})."""
    alpha: float = 1.0
    depthwise_impl: str = "auto"
    pointwise_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        bn = functools.partial(BatchNorm, use_running_average=not train, momentum=0.999,
                               epsilon=1e-3, dtype=self.dtype, use_fast_variance=False)
        pw = functools.partial(PointwiseConv2D, use_bias=False, impl=self.pointwise_impl,
                               dtype=self.dtype)
        if self.dtype is not None:
            x_bhwc = x_bhwc.astype(self.dtype)
        x = nn.Conv(make_divisible(32 * self.alpha), (3, 3), strides=(2, 2), padding="SAME",
                    use_bias=False, dtype=self.dtype, name="Conv1")(x_bhwc)
        x = relu6(bn(name="bn_Conv1")(x))
        for block_id, (expansion, filters, stride) in enumerate(BLOCKS):
            inputs = x
            in_ch = x.shape[-1]
            out_ch = make_divisible(int(filters * self.alpha))
            prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
            if block_id:
                x = pw(expansion * in_ch, name=f"{prefix}expand")(x)
                x = relu6(bn(name=f"{prefix}expand_BN")(x))
            # Keras' {prefix}pad (correct_pad) before the VALID stride-2 depthwise, as the conv's own padding.
            pad = "SAME" if stride == 1 else correct_pad(x.shape[1:3])
            x = DepthwiseConv2D((3, 3), (stride, stride), pad,
                                impl=self.depthwise_impl, dtype=self.dtype,
                                name=f"{prefix}depthwise")(x)
            x = relu6(bn(name=f"{prefix}depthwise_BN")(x))
            x = pw(out_ch, name=f"{prefix}project")(x)
            x = bn(name=f"{prefix}project_BN")(x)
            if in_ch == out_ch and stride == 1:
                x = inputs + x  # {prefix}add
        last_ch = make_divisible(1280 * self.alpha) if self.alpha > 1.0 else 1280
        x = pw(last_ch, name="Conv_1")(x)
        fm = relu6(bn(name="Conv_1_bn")(x))
        return fm, {"pre_logits": jnp.mean(fm.astype(jnp.float32), axis=(1, 2))}


SPECS = {
    "mobilenet_v2": BackboneSpec(
        name="mobilenet_v2", make=MobileNetV2, input_size=224, normalization="tf",
        keras_app="MobileNetV2",
        notes="alpha=1.0 by default; offline ImageNet weights: coral QAT dequantized, BN folded."),
}
