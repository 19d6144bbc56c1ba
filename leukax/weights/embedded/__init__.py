"""ImageNet MobileNetV2 weights shipped inside the package (float16, 2.4 MB; see NOTICE).

The shared `mobilenet_v2_1.0_224_no_top.coral_qat_dequant.h5` (google-coral QAT int8 model,
dequantized, BatchNorm folded) stored as float16 `.npz` with keys `<keras layer>/<keras weight>`.
Loaded into a network by `leukax.pretrained.load_embedded_mobilenet_v2`.
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
