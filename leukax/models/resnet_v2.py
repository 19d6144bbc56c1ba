"""ResNet50V2 (He et al. 2016, pre-activation) equal to `keras.applications.ResNet50V2(include_top=False)`.

Submodule names are the Keras layer names (`conv1_conv`, `conv2_block1_preact_bn`, `conv2_block1_0_conv`,
..., `post_bn`), so legacy Keras `.h5` weights load by name (`leukax.weights.keras_h5.load_into`).
Weightless Keras layers (paddings, ReLUs, the 1×1 stride-s max pool of identity shortcuts, adds) are
plain functions here. BatchNorm: momentum 0.99, epsilon 1.001e-5 (Keras' values), two-pass batch variance like Keras (`jnp.var`).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from leukax.models.layers import PointwiseConv2D
from leukax.models.registry import BackboneSpec

# (stack name, bottleneck filters, blocks, stride of the stack's last block), as in keras.applications.
STACKS_50 = (("conv2", 64, 3, 2), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 1))


def _pad(x, p: int):
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def _max_pool(x, k: int, s: int):
    return nn.max_pool(x, (k, k), strides=(s, s), padding="VALID")


class ResNetV2(nn.Module):
    """Pre-activation ResNet without top. Returns (feature_map B×h×w×2048, {"pre_logits": B×2048})."""
    stacks: tuple = STACKS_50
    pointwise_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.99,
                               epsilon=1.001e-5, use_fast_variance=False, dtype=self.dtype)
        conv = functools.partial(nn.Conv, padding="VALID", dtype=self.dtype)
        pw = functools.partial(PointwiseConv2D, impl=self.pointwise_impl, dtype=self.dtype)
        if self.dtype is not None:
            x_bhwc = x_bhwc.astype(self.dtype)
        x = conv(64, (7, 7), strides=(2, 2), use_bias=True, name="conv1_conv")(_pad(x_bhwc, 3))
        x = _max_pool(_pad(x, 1), 3, 2)
        for stack, filters, blocks, stride1 in self.stacks:
            for i in range(1, blocks + 1):
                name = f"{stack}_block{i}"
                stride = stride1 if i == blocks else 1
                preact = nn.relu(bn(name=f"{name}_preact_bn")(x))
                if i == 1:
                    shortcut = pw(4 * filters, use_bias=True, name=f"{name}_0_conv")(preact)
                else:
                    shortcut = _max_pool(x, 1, stride) if stride > 1 else x
                y = pw(filters, use_bias=False, name=f"{name}_1_conv")(preact)
                y = nn.relu(bn(name=f"{name}_1_bn")(y))
                y = conv(filters, (3, 3), strides=(stride, stride), use_bias=False, name=f"{name}_2_conv")(_pad(y, 1))
                y = nn.relu(bn(name=f"{name}_2_bn")(y))
                y = pw(4 * filters, use_bias=True, name=f"{name}_3_conv")(y)
                x = shortcut + y
        fm_bhwc = nn.relu(bn(name="post_bn")(x))
        return fm_bhwc, {"pre_logits": jnp.mean(fm_bhwc.astype(jnp.float32), axis=(1, 2))}


SPECS: dict[str, BackboneSpec] = {
    "resnet50_v2": BackboneSpec(
        name="resnet50_v2", make=ResNetV2, input_size=224, normalization="tf", keras_app="ResNet50V2",
        notes="pre-activation; include_top=False ends at post_relu (2048 ch)"),
}
