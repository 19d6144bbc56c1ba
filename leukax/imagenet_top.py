"""The 1000-way ImageNet classifier ("top") of each backbone, as `keras.applications(include_top=True)` has it.

Himel et al. 2024 (Table 3) put each branch's Dense(1024) on the backbone's ImageNet output: every base
model's total is the Keras model *with* top plus 1,028,099 = 1000·1024 + 1024 + 1024·3 + 3. leukax's
backbones end without top, so this module adds it back:

- kind "dense" (Xception, InceptionV3, ResNet50V2/101V2, EfficientNetB*, MobileNetV2, EfficientNet-Lite):
  GAP → Dense(1000) named `predictions` (Keras) — C·1000 + 1000 parameters;
- kind "mobilenet_v3" (MobileNetV3Large/Small): GAP → 1×1 conv `Conv_2` (1280 or 1024 channels, bias) →
  hard-swish → (dropout 0.2, inactive at test) → 1×1 conv `Logits` (1000) —
  C·H + H + H·1000 + 1000 parameters with H = 1280 (Large) or 1024 (Small).

Keras' classifier ends in softmax (`classifier_activation="softmax"`), so the paper's Dense(1024) most
likely read the 1000 ImageNet class *probabilities*; `top_outputs(..., activation="softmax")` gives those.

Offline weights for a top exist here only for EfficientNet-Lite0/2 (the `_fc` of their `.npz`);
`load_imagenet_top` raises FileNotFoundError for every other backbone unless `weights=None` (random top).
"""
from __future__ import annotations

import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from leukax.models.mobilenet_v3 import hard_swish

# Keras' top width after GAP for MobileNetV3 ("last_point_ch").
_MNV3_HIDDEN = {"mobilenet_v3_large": 1280, "mobilenet_v3_small": 1024}
_LITE_NPZ = {"efficientnet_lite0": "efficientnet_lite0.npz", "efficientnet_lite2": "efficientnet_lite2.npz"}


def top_kind(backbone: str) -> str:
    """Returns "mobilenet_v3" for MobileNetV3 backbones, else "dense"."""
    return "mobilenet_v3" if backbone.startswith("mobilenet_v3") else "dense"


def top_hidden(backbone: str) -> int:
    """Returns the width of MobileNetV3's Conv_2 (0 for a plain Dense top)."""
    return _MNV3_HIDDEN.get(backbone, 0)


def keras_constant_params(backbone: str) -> int:
    """Returns weights Keras counts that leukax keeps as constants: EfficientNetB*'s `normalization` layer
    (ImageNet mean 3 + variance 3 + count 1 = 7 non-trainable). 0 for every other backbone."""
    return 7 if backbone.startswith("efficientnet_b") else 0


def keras_top_params(backbone: str, channels: int, num_classes: int = 1000) -> int:
    """Returns the number of parameters Keras' include_top adds on a C-channel feature map."""
    h = top_hidden(backbone)
    if h:
        return channels * h + h + h * num_classes + num_classes
    return channels * num_classes + num_classes


class ImageNetTop(nn.Module):
    """Feature map B×h×w×C → ImageNet logits B×1000 (Keras layer names `predictions` or `Conv_2`/`Logits`)."""
    hidden: int = 0          # 0: GAP → Dense; >0: MobileNetV3's GAP → Conv_2(hidden) → hard-swish → Logits
    num_classes: int = 1000
    dtype: Any = None

    @nn.compact
    def __call__(self, feature_map_bhwc):
        pooled_bc = jnp.mean(feature_map_bhwc.astype(jnp.float32), axis=(1, 2))
        if self.hidden:
            h_bd = hard_swish(nn.Dense(self.hidden, dtype=self.dtype, name="Conv_2")(pooled_bc))
            return nn.Dense(self.num_classes, dtype=self.dtype, name="Logits")(h_bd).astype(jnp.float32)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(pooled_bc).astype(jnp.float32)


def make_top(backbone: str) -> ImageNetTop:
    """Returns the ImageNetTop module of `backbone`."""
    return ImageNetTop(hidden=top_hidden(backbone))


def load_imagenet_top(backbone: str, channels: int, weights: str | None = "imagenet", weights_dir=None,
                      seed: int = 0) -> dict:
    """Returns {"params": ...} of `make_top(backbone)` on C = `channels`.

    weights=None: random init (tests). "imagenet": the `_fc` of EfficientNet-Lite's `.npz` found in
    `weights_dir`, $LEUKAX_WEIGHTS_DIR or the cache; every other backbone raises FileNotFoundError
    (leukax's registry holds only no-top files for them)."""
    top = make_top(backbone)
    if weights is None:
        return jax.jit(top.init)(jax.random.key(seed), jnp.zeros((1, 1, 1, channels)))
    if backbone not in _LITE_NPZ:
        raise FileNotFoundError(f"leukax/imagenet_top.py: no ImageNet classifier (include_top) weights for "
                                f"{backbone!r} are available offline (only EfficientNet-Lite0/2 ship theirs); "
                                "use --branch_input=pooled or --weights=none")
    from leukax.weights import registry
    dirs = registry.search_dirs(weights_dir)
    path = next((d / _LITE_NPZ[backbone] for d in dirs if (d / _LITE_NPZ[backbone]).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"leukax/imagenet_top.py: {_LITE_NPZ[backbone]} not found in "
                                f"{[str(d) for d in dirs]}")
    with np.load(pathlib.Path(path), allow_pickle=False) as z:
        w_kc, b_k = np.asarray(z["_fc.weight"], np.float32), np.asarray(z["_fc.bias"], np.float32)
    if w_kc.shape[1] != channels:
        raise ValueError(f"leukax/imagenet_top.py: {path} classifier reads {w_kc.shape[1]} channels, not {channels}")
    return {"params": {"predictions": {"kernel": jnp.asarray(w_kc.T), "bias": jnp.asarray(b_k)}}}


@jax.jit
def _softmax(logits_nk):
    return jax.nn.softmax(logits_nk, -1)


def top_outputs(backbone: str, top_variables: dict, pooled_nc, activation: str = "softmax",
                batch_size: int = 256) -> np.ndarray:
    """Returns N×1000 float32: the top applied to pooled features N×C (a 1×1 map), then softmax or "none"."""
    top = make_top(backbone)
    fn = jax.jit(lambda v, x: top.apply(v, x[:, None, None, :]))
    pooled_nc = np.asarray(pooled_nc, np.float32)
    out = np.concatenate([np.asarray(fn(top_variables, pooled_nc[s:s + batch_size]))
                          for s in range(0, len(pooled_nc), batch_size)], 0)
    if activation == "softmax":
        return np.asarray(_softmax(out))
    if activation != "none":
        raise ValueError(f"leukax/imagenet_top.py: activation must be softmax | none, got {activation!r}")
    return out
