"""ImageNet MobileNetV2 weights shipped inside the package (float16, 2.4 MB; see NOTICE).

The shared `mobilenet_v2_1.0_224_no_top.coral_qat_dequant.h5` (google-coral QAT int8 model,
dequantized, BatchNorm folded) stored as float16 `.npz` with keys `<keras layer>/<keras weight>`.
"""
from __future__ import annotations

import pathlib

import numpy as np

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent
MOBILENET_V2_NPZ = EMBEDDED_DIR / "mobilenet_v2_1.0_224_no_top.f16.npz"


def read_npz(path: str | pathlib.Path = MOBILENET_V2_NPZ) -> dict[str, dict[str, np.ndarray]]:
    """Returns {keras layer: {keras weight name: float32 array}} from a `layer/weight` .npz."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            layer, _, weight = key.rpartition("/")
            if not layer:
                raise ValueError(f"{path}: key {key!r} is not '<layer>/<weight>'")
            out.setdefault(layer, {})[weight] = z[key].astype(np.float32)
    return out


def load_embedded_mobilenet_v2(variables=None, prefix: tuple[str, ...] = ()) -> dict:
    """Returns float32 MobileNetV2 (alpha 1.0) variables {"params", "batch_stats"} with the embedded
    ImageNet weights, or `variables` (e.g. a Classifier's, with prefix=("backbone",)) filled with them."""
    import jax

    from leukax.models.mobilenet_v2 import MobileNetV2
    from leukax.weights import keras_h5

    if variables is None:
        variables = jax.eval_shape(MobileNetV2().init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
    return keras_h5.load_into(variables, read_npz(), prefix=prefix)
