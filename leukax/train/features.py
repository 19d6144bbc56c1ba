"""Frozen-backbone features computed once and cached (head-mode training, Bayesian optimisation, stage 2).

The cache key hashes the backbone module (its dataclass repr), its variables, the normalisation and the
image bytes, so a different network, weights, input size or data set never hits a stale entry.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import pathlib

import jax
import numpy as np

from leukax.preprocess import normalize

log = logging.getLogger(__name__)
_MEMORY: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
_MEMORY_ENTRIES = 4


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _forward(backbone, variables, x_bhwc, normalization, output: str):
    fm_bhwc, out = backbone.apply(variables, normalize(x_bhwc, normalization), train=False)
    return fm_bhwc if output == "feature_map" else out[output]


def compute_features(backbone, variables, images, normalization: str | None, batch_size: int = 32,
                     output: str = "feature_map") -> np.ndarray:
    """Returns the backbone's `output` ("feature_map" N×h×w×C or an out key such as "pre_logits" N×C)
    for uint8 images N×S×S×3, float32, in batches of `batch_size` (the last one padded: one compile)."""
    images = np.asarray(images)
    n = images.shape[0]
    bs = min(batch_size, n)
    out = []
    for s in range(0, n, bs):
        xb = images[s:s + bs]
        k = xb.shape[0]
        if k < bs:
            xb = np.concatenate([xb, np.repeat(xb[-1:], bs - k, 0)], 0)
        out.append(np.asarray(_forward(backbone, variables, xb, normalization, output))[:k])
    return np.concatenate(out, 0).astype(np.float32)


def _network_hash(backbone, variables, *settings):
    h = hashlib.sha1()
    h.update(repr(backbone).encode())
    h.update("|".join(map(str, settings)).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h


def cache_key(backbone, variables, images, normalization: str | None, output: str = "feature_map") -> str:
    """Returns a sha1 hex digest of (backbone config, variables, normalisation, output, image bytes + shape)."""
    h = _network_hash(backbone, variables, normalization, output, np.shape(images), np.asarray(images).dtype)
    h.update(np.ascontiguousarray(np.asarray(images)).tobytes())
    return h.hexdigest()


def stream_key(backbone, variables, normalization: str | None, fingerprint: str, *settings) -> str:
    """Returns a sha1 hex digest of (backbone config, variables, normalisation, the dataset's content
    fingerprint (`leukax.data.load_index`), and the extraction `settings`: image size, views, dtype, ...)."""
    return _network_hash(backbone, variables, normalization, fingerprint, *settings).hexdigest()


def cached_features(backbone, variables, images, normalization: str | None, batch_size: int = 32,
                    output: str = "feature_map", cache_dir=None, cache_tag: str = "features") -> np.ndarray:
    """Returns `compute_features(...)`, computed once: kept in memory, and as
    ``{cache_dir}/{cache_tag}_{key}.npy`` when `cache_dir` is given (read back on a later call)."""
    key = cache_key(backbone, variables, images, normalization, output)
    path = None if cache_dir is None else pathlib.Path(cache_dir) / f"{cache_tag}_{key[:20]}.npy"
    if path is not None and path.exists():
        log.info("features from %s", path)
        return np.load(path)
    if key in _MEMORY:
        feats = _MEMORY[key]
    else:
        feats = compute_features(backbone, variables, images, normalization, batch_size, output)
        _MEMORY[key] = feats
        while len(_MEMORY) > _MEMORY_ENTRIES:
            _MEMORY.popitem(last=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # written whole, then renamed: processes sharing
        with open(tmp, "wb") as f:                               # the folder never read a half-written file
            np.save(f, feats)
        os.replace(tmp, path)
        log.info("features saved to %s", path)
    return feats
