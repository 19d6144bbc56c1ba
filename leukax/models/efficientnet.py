"""EfficientNet B0–B7 (equal to `keras.applications.EfficientNetB*`) and EfficientNet-Lite0–4.

One generic module, `EfficientNet`, covers both families:
- B*: swish, squeeze-excite, width/depth scaling of every stage, stem and head; the Keras graph's
  input layers (`rescaling` x/255 then `normalization` with the ImageNet mean/std) are reproduced, so the
  module takes "raw" [0, 255] input like Keras.
- Lite*: no squeeze-excite, ReLU6, stem 32 / head 1280 and the first/last stage's repeats fixed for all
  sizes; input is already "lite"-normalised, (x - 127) / 128.

Padding is TF-SAME everywhere (Keras' `correct_pad` + "valid" equals TF-SAME for odd kernels).
Submodule names equal the Keras layer names (`stem_conv`, `block1a_dwconv`, `block2b_se_reduce`, `top_bn`).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from leukax.models.layers import BatchNorm, DepthwiseConv2D, relu6
from leukax.models.registry import BackboneSpec

# (kernel, repeats, filters_in, filters_out, expand_ratio, strides) per stage, as Keras DEFAULT_BLOCKS_ARGS.
BLOCKS_ARGS = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
SE_RATIO = 0.25
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

# Keras initialisers: conv VarianceScaling(2, fan_out, truncated normal); dense (1/3, fan_out, uniform).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def round_filters(filters: float, width: float, divisor: int = 8) -> int:
    """Returns the channel count scaled by `width`, rounded to a multiple of `divisor` (Keras rule)."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def stage_repeats(depth: float, lite: bool) -> list[int]:
    """Returns the number of blocks per stage; Lite keeps the first and last stage at one block."""
    last = len(BLOCKS_ARGS) - 1
    return [r if lite and i in (0, last) else round_repeats(r, depth) for i, (_, r, *_) in enumerate(BLOCKS_ARGS)]


def block_names(depth: float, lite: bool) -> list[str]:
    """Returns the Keras block prefixes in order: ["block1a_", "block2a_", "block2b_", ...]."""
    return [f"block{i + 1}{chr(j + 97)}_" for i, n in enumerate(stage_repeats(depth, lite)) for j in range(n)]


class EfficientNet(nn.Module):
    """EfficientNet backbone. `__call__` returns (feature_map B×h×w×C, {"pre_logits": B×C[, "logits"]}).

    lite=False: Keras EfficientNetB*, input "raw" [0, 255]. lite=True: EfficientNet-Lite, input "lite".
    num_classes > 0 adds the ImageNet-style classifier (`predictions`, Keras name) on the pooled features;
    its logits are out["logits"].
    """
    width: float = 1.0
    depth: float = 1.0
    lite: bool = False
    drop_connect_rate: float = 0.2
    include_rescaling: bool = True  # B* only: the Keras rescaling + normalization input layers.
    num_classes: int = 0
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    depthwise_impl: str = "auto"
    dtype: Any = None

    def _conv(self, features, kernel, strides=1, name=None, use_bias=False):
        return nn.Conv(features, (kernel, kernel), (strides, strides), padding="SAME", use_bias=use_bias,
                       kernel_init=conv_init, dtype=self.dtype, name=name)

    def _bn(self, train, name):
        return BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            epsilon=self.bn_epsilon, dtype=self.dtype, name=name)

    def _block(self, x, train, name, drop_rate, kernel, filters_in, filters_out, expand_ratio, strides):
        """One MBConv block (Keras `efficientnet.block`). Returns B×h'×w'×filters_out."""
        act = relu6 if self.lite else nn.swish
        inputs = x
        filters = x.shape[-1] * expand_ratio
        if expand_ratio != 1:
            x = self._conv(filters, 1, name=f"{name}expand_conv")(x)
            x = act(self._bn(train, f"{name}expand_bn")(x))
        x = DepthwiseConv2D((kernel, kernel), (strides, strides), "SAME", use_bias=False,
                            impl=self.depthwise_impl, kernel_init=conv_init, dtype=self.dtype,
                            name=f"{name}dwconv")(x)
        x = act(self._bn(train, f"{name}bn")(x))
        if not self.lite:
            filters_se = max(1, int(filters_in * SE_RATIO))
            se = jnp.mean(x, axis=(1, 2), keepdims=True)
            se = nn.swish(self._conv(filters_se, 1, name=f"{name}se_reduce", use_bias=True)(se))
            se = nn.sigmoid(self._conv(filters, 1, name=f"{name}se_expand", use_bias=True)(se))
            x = x * se
        x = self._conv(filters_out, 1, name=f"{name}project_conv")(x)
        x = self._bn(train, f"{name}project_bn")(x)
        if strides == 1 and filters_in == filters_out:
            if train and drop_rate > 0:
                keep = 1.0 - drop_rate
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
                x = jnp.where(mask, x / keep, jnp.zeros_like(x))
            x = x + inputs
        return x

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        act = relu6 if self.lite else nn.swish
        x = x_bhwc if self.dtype is None else x_bhwc.astype(self.dtype)
        if not self.lite and self.include_rescaling:  # Keras `rescaling` + `normalization` layers.
            mean = jnp.asarray(IMAGENET_MEAN_RGB, x.dtype)
            std = jnp.asarray(IMAGENET_STD_RGB, x.dtype)
            x = (x / 255.0 - mean) / std
        stem = 32 if self.lite else round_filters(32, self.width)
        x = self._conv(stem, 3, 2, name="stem_conv")(x)
        x = act(self._bn(train, "stem_bn")(x))

        total = float(sum(stage_repeats(self.depth, self.lite)))
        b = 0
        for i, (kernel, _, f_in, f_out, expand, strides) in enumerate(BLOCKS_ARGS):
            f_in, f_out = round_filters(f_in, self.width), round_filters(f_out, self.width)
            for j in range(stage_repeats(self.depth, self.lite)[i]):
                x = self._block(x, train, f"block{i + 1}{chr(j + 97)}_", self.drop_connect_rate * b / total,
                                kernel, f_in if j == 0 else f_out, f_out, expand, strides if j == 0 else 1)
                b += 1

        head = 1280 if self.lite else round_filters(1280, self.width)
        x = self._conv(head, 1, name="top_conv")(x)
        fmap = act(self._bn(train, "top_bn")(x))
        out = {"pre_logits": jnp.mean(fmap, axis=(1, 2))}
        if self.num_classes:
            out["logits"] = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                                     name="predictions")(out["pre_logits"])
        return fmap, out


# name: (width, depth, input size, classifier dropout as in Keras; unused by the backbone).
B_VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3), "b4": (1.4, 1.8, 380, 0.4), "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5), "b7": (2.0, 3.1, 600, 0.5),
}
LITE_VARIANTS = {
    "lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280), "lite4": (1.4, 1.8, 300),
}


def efficientnet(variant: str, **kw) -> EfficientNet:
    """Returns the EfficientNet module for "b0".."b7" or "lite0".."lite4"; kw override module fields."""
    if variant in B_VARIANTS:
        w, d, _, _ = B_VARIANTS[variant]
        return EfficientNet(width=w, depth=d, lite=False, **kw)
    if variant in LITE_VARIANTS:
        w, d, _ = LITE_VARIANTS[variant]
        return EfficientNet(width=w, depth=d, lite=True, **kw)
    raise ValueError(f"leukax/models/efficientnet.py: unknown variant {variant!r}; "
                     f"known: {', '.join([*B_VARIANTS, *LITE_VARIANTS])}")


SPECS: dict[str, BackboneSpec] = {}
for _v, (_w, _d, _size, _) in B_VARIANTS.items():
    SPECS[f"efficientnet_{_v}"] = BackboneSpec(
        name=f"efficientnet_{_v}", make=functools.partial(efficientnet, _v), input_size=_size,
        normalization="raw", keras_app=f"EfficientNet{_v.upper()}",
        notes=f"width {_w}, depth {_d}; Keras rescaling+normalization (ImageNet mean/std) inside the module")
for _v, (_w, _d, _size) in LITE_VARIANTS.items():
    SPECS[f"efficientnet_{_v}"] = BackboneSpec(
        name=f"efficientnet_{_v}", make=functools.partial(efficientnet, _v), input_size=_size,
        normalization="lite", keras_app=None,
        notes=f"width {_w}, depth {_d}; no SE, ReLU6, stem 32/head 1280 fixed; torch weights via "
              "leukax.pretrained.efficientnet_lite_variables")
del _v, _w, _d, _size
