"""Datasets: image decoding (`imageio`), TFDS builders (`builders`), in-memory arrays (`load_arrays`) or an index that streams (`load_index`), grain
pipelines (`pipeline`), splits (`splits`). Heavy imports (tensorflow_datasets, grain) happen on first use."""
import importlib

_LAZY = {
    "load_arrays": "leukax.data.arrays", "load_index": "leukax.data.arrays", "Dataset": "leukax.data.arrays",
    "read_image": "leukax.data.imageio", "decode_image": "leukax.data.imageio",
    "ImageReadError": "leukax.data.imageio", "resize_image": "leukax.data.imageio",
    "get_builder": "leukax.data.builders", "DatasetError": "leukax.data.builders",
    "ManualDownloadError": "leukax.data.builders",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leukax.data' has no attribute {name!r}")
