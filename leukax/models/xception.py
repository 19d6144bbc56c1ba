"""Xception (Chollet 2017) equal to `keras.applications.Xception(include_top=False)`.

Submodule names are the Keras layer names (`block1_conv1`, `block2_sepconv1`, `block2_sepconv1_bn`, ...).
Keras leaves the four residual 1×1 convs and their BatchNorms unnamed; here they carry the names a
fresh Keras 3 process gives them: `conv2d`, `conv2d_1`, `conv2d_2`, `conv2d_3` and `batch_normalization`
... `batch_normalization_3` (Keras 2 files call them `conv2d_1`..`conv2d_4`; `rename_auto_layers` maps
auto-named layers by their order).

One Flax `SeparableConv2D` per Keras `SeparableConv2D` layer, params:
  Keras `depthwise_kernel` kh×kw×C×1 -> params[layer]["kernel"] kh×kw×1×C (as `DepthwiseConv2D`);
  Keras `pointwise_kernel` 1×1×C×O -> params[layer]["pointwise_kernel"] 1×1×C×O (same layout).
`leukax.weights.keras_h5.load_into` maps the first; `leukax.pretrained.load_xception_keras_weights` adds
the second.
"""
from __future__ import annotations

import functools
import re
from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from leukax.models.layers import PointwiseConv2D, depthwise_conv
from leukax.models.registry import BackboneSpec


class SeparableConv2D(nn.Module):
    """Keras SeparableConv2D (depth multiplier 1, stride 1, 'same', no bias). Returns B×H×W×features."""
    features: int
    kernel_size: tuple[int, int] = (3, 3)
    depthwise_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x_bhwc):
        c = x_bhwc.shape[-1]
        dw = self.param("kernel", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                        (*self.kernel_size, 1, c), jnp.float32)
        pw = self.param("pointwise_kernel", nn.initializers.lecun_normal(), (1, 1, c, self.features), jnp.float32)
        if self.dtype is not None:
            x_bhwc = x_bhwc.astype(self.dtype)
        y = depthwise_conv(x_bhwc, dw, (1, 1), "SAME", self.depthwise_impl)
        return lax.dot_general(y, pw[0, 0].astype(y.dtype), (((3,), (0,)), ((), ())))


def _pool(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")


class Xception(nn.Module):
    """Xception without top. Returns (feature_map B×h×w×2048, {"pre_logits": B×2048})."""
    depthwise_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.99, epsilon=1e-3,
                               use_fast_variance=False, dtype=self.dtype)
        sep = functools.partial(SeparableConv2D, depthwise_impl=self.depthwise_impl, dtype=self.dtype)
        relu = nn.relu
        n_res = iter(range(4))

        def residual(x, features):          # 1×1 stride-2 'same' conv == subsample then 1×1 conv
            i = next(n_res)
            sfx = f"_{i}" if i else ""
            r = PointwiseConv2D(features, use_bias=False, dtype=self.dtype, name=f"conv2d{sfx}")(x[:, ::2, ::2])
            return bn(name=f"batch_normalization{sfx}")(r)

        if self.dtype is not None:
            x_bhwc = x_bhwc.astype(self.dtype)
        x = nn.Conv(32, (3, 3), strides=(2, 2), padding="VALID", use_bias=False, dtype=self.dtype,
                    name="block1_conv1")(x_bhwc)
        x = relu(bn(name="block1_conv1_bn")(x))
        x = nn.Conv(64, (3, 3), padding="VALID", use_bias=False, dtype=self.dtype, name="block1_conv2")(x)
        x = relu(bn(name="block1_conv2_bn")(x))

        for block, features in ((2, 128), (3, 256), (4, 728)):        # entry flow
            res = residual(x, features)
            y = x if block == 2 else relu(x)
            y = bn(name=f"block{block}_sepconv1_bn")(sep(features, name=f"block{block}_sepconv1")(y))
            y = bn(name=f"block{block}_sepconv2_bn")(sep(features, name=f"block{block}_sepconv2")(relu(y)))
            x = _pool(y) + res

        for block in range(5, 13):                                     # middle flow
            y = x
            for j in (1, 2, 3):
                y = bn(name=f"block{block}_sepconv{j}_bn")(sep(728, name=f"block{block}_sepconv{j}")(relu(y)))
            x = y + x

        res = residual(x, 1024)                                        # exit flow
        y = bn(name="block13_sepconv1_bn")(sep(728, name="block13_sepconv1")(relu(x)))
        y = bn(name="block13_sepconv2_bn")(sep(1024, name="block13_sepconv2")(relu(y)))
        x = _pool(y) + res
        x = relu(bn(name="block14_sepconv1_bn")(sep(1536, name="block14_sepconv1")(x)))
        fm_bhwc = relu(bn(name="block14_sepconv2_bn")(sep(2048, name="block14_sepconv2")(x)))
        return fm_bhwc, {"pre_logits": jnp.mean(fm_bhwc.astype(jnp.float32), axis=(1, 2))}


_AUTO = re.compile(r"^(conv2d|batch_normalization)(?:_(\d+))?$")


def rename_auto_layers(h5: Mapping) -> dict:
    """Returns the {layer: weights} dict with Keras auto-named conv2d*/batch_normalization* layers renamed,
    in the order of their numeric suffix, to conv2d, conv2d_1, ... (the names used here)."""
    out = {k: v for k, v in h5.items() if not _AUTO.match(k)}
    for prefix in ("conv2d", "batch_normalization"):
        auto = [k for k in h5 if (m := _AUTO.match(k)) and m.group(1) == prefix]
        auto.sort(key=lambda k: int(_AUTO.match(k).group(2) or 0))
        for i, k in enumerate(auto):
            out[f"{prefix}_{i}" if i else prefix] = h5[k]
    return out


SPECS: dict[str, BackboneSpec] = {
    "xception": BackboneSpec(
        name="xception", make=Xception, input_size=299, normalization="tf", keras_app="Xception",
        notes="min input 71 px; include_top=False ends at block14_sepconv2_act (2048 ch); "
              "load Keras weights with leukax.pretrained.load_xception_keras_weights (pointwise kernels)"),
}
