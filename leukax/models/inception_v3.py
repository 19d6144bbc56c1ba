"""InceptionV3 (Szegedy et al. 2016) equal to `keras.applications.InceptionV3(include_top=False)`.

Submodule names are the auto-names of the first InceptionV3 built in a fresh Keras process:
the i-th conv+BN pair (creation order) is `conv2d_{i}` / `batch_normalization_{i}` (no suffix
for i=0), 94 pairs in all, so the legacy `.h5` files load by name. BatchNorm has no scale
(Keras `scale=False`), momentum 0.99, epsilon 1e-3.

`mixed10_pool="max"` swaps mixed10's branch-pool average pool for a 3×3/1 max pool: the
TensorFlow 2015 graph (the FID network) behind the offline weights needs it.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from leukax.models.layers import BatchNorm, PointwiseConv2D
from leukax.models.registry import BackboneSpec


def keras_name(base: str, i: int) -> str:
    """Keras auto-name of the i-th layer of a kind: conv2d, conv2d_1, ..."""
    return base if i == 0 else f"{base}_{i}"


class InceptionV3(nn.Module):
    """InceptionV3 without top. Returns (feature_map B×h×w×2048, {"pre_logits": B×2048})."""
    mixed10_pool: str = "avg"
    pointwise_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x_bhwc, train: bool = False):
        if self.mixed10_pool not in ("avg", "max"):
            raise ValueError(f"mixed10_pool must be 'avg' or 'max', got {self.mixed10_pool!r}")
        counter = iter(range(94))

        def conv_bn(x, filters, kh, kw, strides=(1, 1), padding="SAME"):
            i = next(counter)
            if (kh, kw) == (1, 1) and strides == (1, 1):
                conv = PointwiseConv2D(filters, impl=self.pointwise_impl, dtype=self.dtype,
                                       name=keras_name("conv2d", i))
            else:
                conv = nn.Conv(filters, (kh, kw), strides, padding, use_bias=False, dtype=self.dtype,
                               name=keras_name("conv2d", i))
            x = conv(x)
            x = BatchNorm(use_running_average=not train, use_scale=False, momentum=0.99,
                             epsilon=1e-3, dtype=self.dtype, use_fast_variance=False,
                             name=keras_name("batch_normalization", i))(x)
            return nn.relu(x)

        avg_same = functools.partial(nn.avg_pool, window_shape=(3, 3), strides=(1, 1),
                                     padding="SAME", count_include_pad=False)
        max_valid = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2))
        cat = functools.partial(jnp.concatenate, axis=-1)
        x = x_bhwc.astype(self.dtype) if self.dtype is not None else x_bhwc

        x = conv_bn(x, 32, 3, 3, (2, 2), "VALID")
        x = conv_bn(x, 32, 3, 3, padding="VALID")
        x = conv_bn(x, 64, 3, 3)
        x = max_valid(x)
        x = conv_bn(x, 80, 1, 1, padding="VALID")
        x = conv_bn(x, 192, 3, 3, padding="VALID")
        x = max_valid(x)

        for pool_filters in (32, 64, 64):  # mixed0, mixed1, mixed2
            b1 = conv_bn(x, 64, 1, 1)
            b5 = conv_bn(conv_bn(x, 48, 1, 1), 64, 5, 5)
            b3 = conv_bn(conv_bn(conv_bn(x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
            bp = conv_bn(avg_same(x), pool_filters, 1, 1)
            x = cat([b1, b5, b3, bp])

        b3 = conv_bn(x, 384, 3, 3, (2, 2), "VALID")  # mixed3
        bd = conv_bn(conv_bn(conv_bn(x, 64, 1, 1), 96, 3, 3), 96, 3, 3, (2, 2), "VALID")
        x = cat([b3, bd, max_valid(x)])

        for c in (128, 160, 160, 192):  # mixed4 ... mixed7
            b1 = conv_bn(x, 192, 1, 1)
            b7 = conv_bn(conv_bn(conv_bn(x, c, 1, 1), c, 1, 7), 192, 7, 1)
            bd = conv_bn(x, c, 1, 1)
            bd = conv_bn(conv_bn(conv_bn(bd, c, 7, 1), c, 1, 7), c, 7, 1)
            bd = conv_bn(bd, 192, 1, 7)
            bp = conv_bn(avg_same(x), 192, 1, 1)
            x = cat([b1, b7, bd, bp])

        b3 = conv_bn(conv_bn(x, 192, 1, 1), 320, 3, 3, (2, 2), "VALID")  # mixed8
        b7 = conv_bn(conv_bn(conv_bn(x, 192, 1, 1), 192, 1, 7), 192, 7, 1)
        b7 = conv_bn(b7, 192, 3, 3, (2, 2), "VALID")
        x = cat([b3, b7, max_valid(x)])

        for i in range(2):  # mixed9, mixed10
            b1 = conv_bn(x, 320, 1, 1)
            b3 = conv_bn(x, 384, 1, 1)
            b3 = cat([conv_bn(b3, 384, 1, 3), conv_bn(b3, 384, 3, 1)])
            bd = conv_bn(conv_bn(x, 448, 1, 1), 384, 3, 3)
            bd = cat([conv_bn(bd, 384, 1, 3), conv_bn(bd, 384, 3, 1)])
            if i == 1 and self.mixed10_pool == "max":
                pooled = nn.max_pool(x, (3, 3), (1, 1), "SAME")
            else:
                pooled = avg_same(x)
            bp = conv_bn(pooled, 192, 1, 1)
            x = cat([b1, b3, bd, bp])
        return x, {"pre_logits": jnp.mean(x.astype(jnp.float32), axis=(1, 2))}


SPECS = {
    "inception_v3": BackboneSpec(
        name="inception_v3", make=InceptionV3, input_size=299, normalization="tf",
        keras_app="InceptionV3", notes="equal to keras.applications.InceptionV3; min input 75 px."),
    "inception_v3_tf2015": BackboneSpec(
        name="inception_v3_tf2015", make=functools.partial(InceptionV3, mixed10_pool="max"),
        input_size=299, normalization="tf", keras_app="InceptionV3",
        notes="mixed10 branch pool is a 3x3/1 max pool (TF 2015 graph; offline FID-network weights)."),
}
