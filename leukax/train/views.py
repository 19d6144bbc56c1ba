"""Augmentation that reaches head mode: frozen-backbone features of several *views* of every image.

A frozen backbone sees each image once in head mode, so image augmentation never reaches the head. Here the
features of V views per image are computed once and cached, V×N×h×w×C; the head-mode trainer
(`leukax.train.compiled`) draws a different view per image, epoch and member, and predictions average the
softmax over the views (test-time augmentation, TTA).

Views:
- ``dihedral``: the 8 symmetries of the square (4 rotations by 90°, each with and without a horizontal flip).
  A single segmented cell has no preferred orientation, so these are exact label-preserving transforms
  without interpolation or border filling. View 0 is the identity.
- ``affine``: ``num_affine`` extra draws of Akter et al.'s affine augmentation (`augment_paper1`), each image
  with its own key ``fold_in(key, view)``.

Leakage: a view is a function of one image only (and of a fixed key), so making views of every image is the
same as making them after the split; the experiments slice ``views_vn...[:, split.train]`` for training, and
a test image's views are only ever used to predict that test image.
"""
from __future__ import annotations

import numpy as np

NUM_DIHEDRAL = 8


def dihedral(images_nhwc: np.ndarray, k: int) -> np.ndarray:
    """Returns view k ∈ [0, 8) of N×H×W×C images: rot90 by (k mod 4)·90°, then a horizontal flip if k ≥ 4."""
    if not 0 <= k < NUM_DIHEDRAL:
        raise ValueError(f"leukax/train/views.py: dihedral view must be in [0, 8), got {k}")
    out = np.rot90(images_nhwc, k % 4, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if k >= 4 else out)


def make_views(images_nhwc: np.ndarray, views: str = "dihedral", num_affine: int = 0, seed: int = 0) -> np.ndarray:
    """Returns V×N×H×W×C uint8 views: "none" (V = 1, the images), "dihedral" (V = 8), plus `num_affine` draws of
    the first paper's affine augmentation (V += num_affine)."""
    if views not in ("none", "dihedral"):
        raise ValueError(f"leukax/train/views.py: views must be none|dihedral, got {views!r}")
    out = [images_nhwc] if views == "none" else [dihedral(images_nhwc, k) for k in range(NUM_DIHEDRAL)]
    if num_affine:
        import jax

        from leukax import augment
        key = jax.random.PRNGKey(seed)
        for v in range(num_affine):  # every image draws its own affine parameters
            out.append(np.asarray(augment.augment_paper1(jax.random.fold_in(key, v), images_nhwc)))
    return np.stack(out)


def view_features(backbone, variables, images_nhwc, normalization, views: str = "dihedral", num_affine: int = 0,
                  seed: int = 0, cache_dir=None, cache_tag: str = "views", batch_size: int = 32) -> np.ndarray:
    """Returns frozen feature maps of every view, V×N×h·w×C float32 (positions flattened row-major: the GRU's
    sequence), computed once (cached in memory and under `cache_dir`, see `leukax.train.features`)."""
    from leukax.train.features import cached_features
    views_vnhwc = make_views(np.asarray(images_nhwc), views, num_affine, seed)
    v, n = views_vnhwc.shape[:2]
    flat = views_vnhwc.reshape((v * n,) + views_vnhwc.shape[2:])
    fm = cached_features(backbone, variables, flat, normalization, batch_size=batch_size, cache_dir=cache_dir,
                         cache_tag=f"{cache_tag}_{views}{num_affine}")
    return fm.reshape(v, n, -1, fm.shape[-1])
