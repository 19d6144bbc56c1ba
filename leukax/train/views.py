"""Augmentation that reaches head mode: frozen-backbone features of several *views* of every image.

A frozen backbone sees each image once in head mode, so image augmentation never reaches the head. Here the
features of V views per image are computed once and cached, V×N×h×w×C; the head-mode trainer
(`leukax.train.compiled`) draws a different view per image, epoch and member, and predictions average the
softmax over the views (test-time augmentation, TTA).

Views:
- ``dihedral``: the 8 symmetries of the square (4 rotations by 90°, each with and without a horizontal flip).
  A single segmented cell has no preferred orientation, so these are exact label-preserving transforms
  without interpolation or border filling. View 0 is the identity.
- ``affine``: ``num_affine`` extra draws of Akter et al.'s affine augmentation (`augment_paper1`), image i's
  view v with its own key ``fold_in(fold_in(key(seed), v), i)``: the same draw whatever batch it comes in.

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


def num_views(views: str = "dihedral", num_affine: int = 0) -> int:
    """V of `make_views`."""
    if views not in ("none", "dihedral"):
        raise ValueError(f"leukax/train/views.py: views must be none|dihedral, got {views!r}")
    return (1 if views == "none" else NUM_DIHEDRAL) + num_affine


def make_views(images_nhwc: np.ndarray, views: str = "dihedral", num_affine: int = 0, seed: int = 0,
               indices=None) -> np.ndarray:
    """Returns V×N×H×W×C uint8 views: "none" (V = 1, the images), "dihedral" (V = 8), plus `num_affine` draws of
    the first paper's affine augmentation (V += num_affine). `indices` (default 0..N−1): the images' indices
    in the dataset, which key their affine draws."""
    num_views(views, num_affine)
    out = [images_nhwc] if views == "none" else [dihedral(images_nhwc, k) for k in range(NUM_DIHEDRAL)]
    if num_affine:
        import jax

        from leukax import augment
        idx = np.arange(len(images_nhwc)) if indices is None else np.asarray(indices)
        one = jax.jit(jax.vmap(lambda k, im: augment.augment_paper1(k, im[None])[0]))
        key = jax.random.PRNGKey(seed)
        for v in range(num_affine):  # every image draws its own affine parameters
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, v), i))(idx)  # noqa: B023
            out.append(np.asarray(one(keys, images_nhwc)))
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


def stream_view_features(backbone, variables, source, image_size: int, normalization, path, *,
                         views: str = "dihedral", num_affine: int = 0, seed: int = 0, batch_size: int = 32,
                         dtype="bfloat16", num_threads: int = 2, max_pixels: int | None = None,
                         progress: bool = True, desc: str = "features", image_fn=None) -> "FeatureFile":
    """Returns the frozen feature maps of every view of every image of `source`, V×N×h·w×C in `dtype` (16-bit),
    as the `FeatureFile` at `path` (a `.npy` file), computed if it does not exist.

    bfloat16 (the default) keeps float32's range: raw feature maps of some networks are too small for float16
    (random-init EfficientNet-Lite0's pooled features all flushed to 0) or, unbounded by ReLU6, could exceed
    its 65504; its 8-bit mantissa (relative error ≤ 2⁻⁹) is far below what the views and members vary by.

    Streaming: a grain pipeline (`leukax.data.pipeline.epoch_dataset`, `num_threads` readers, in dataset
    order) decodes and resizes `batch_size` images at a time; their V views go through the backbone in V
    calls of `batch_size` (one compiled shape; the last batch padded) and are written into
    ``path.partial`` (a `.npy` memory-mapped for each batch only). `image_fn(uint8 B×S×S×3) -> B×S×S×3`, if given, runs on
    every batch before its views are made (e.g. Akter et al.'s smoothing). Memory: one batch of images and views, whatever N.
    Resumable: after every batch ``path.progress.json`` records how many images are done; a killed extraction
    restarts there. The finished file is renamed to `path` (readers never see a partial one)."""
    import json
    import os
    import pathlib
    import sys

    import jax
    from tqdm import tqdm

    from leukax.data import pipeline
    from leukax.train.features import _forward

    path = pathlib.Path(path)
    if path.exists():
        return FeatureFile(path, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial, state = path.with_name(path.name + ".partial"), path.with_name(path.name + ".progress.json")
    n, v = len(source), num_views(views, num_affine)
    fm = jax.eval_shape(lambda x: _forward(backbone, variables, x, normalization, "feature_map"),
                        jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.uint8))
    shape = (v, n, fm.shape[1] * fm.shape[2], fm.shape[3])
    dt, stored, done = _dtype(dtype), _stored(dtype), 0
    if partial.exists() and state.exists():
        saved = json.loads(state.read_text())
        if tuple(saved["shape"]) == shape and saved["dtype"] == dt.name:
            done = int(saved["done"])
    if not done:  # the .npy header and a sparse file of the full size
        header = np.lib.format.open_memmap(partial, "w+", stored, shape)
        del header
    bar = tqdm(total=n, initial=done, desc=desc, unit="img", file=sys.stderr, disable=not progress or done == n)
    if done < n:
        batches = pipeline.epoch_dataset(source, image_size, batch_size, indices=np.arange(done, n), shuffle=False,
                                         num_threads=num_threads, max_pixels=max_pixels)
        for batch in batches:
            idx_b, images_b = batch["index"], batch["image"]
            if image_fn is not None:
                images_b = np.asarray(image_fn(images_b))
            b = len(idx_b)
            pad = np.concatenate([images_b, np.repeat(images_b[-1:], batch_size - b, 0)]) if b < batch_size else images_b
            views_vb = make_views(pad, views, num_affine, seed, np.concatenate([idx_b, np.repeat(idx_b[-1:], batch_size - b)]))
            # A memory map opened per batch and closed again: pages of one kept open stay resident once written,
            # so the process would grow by the size of the file (1 GB per 1,000 images for MobileNetV2).
            mm = np.load(partial, mmap_mode="r+")
            for k in range(v):
                out = np.asarray(_forward(backbone, variables, views_vb[k], normalization, "feature_map"))[:b]
                mm[k, idx_b[0]: idx_b[0] + b] = out.reshape(b, shape[2], shape[3]).astype(dt).view(stored)
            mm.flush()
            del mm
            done = int(idx_b[0]) + b
            state.write_text(json.dumps({"done": done, "shape": list(shape), "dtype": dt.name}))
            bar.update(b)
    bar.close()
    os.replace(partial, path)
    state.unlink(missing_ok=True)
    return FeatureFile(path, dtype)


def _dtype(dtype) -> np.dtype:
    """np.dtype of a name or type, bfloat16 included (ml_dtypes, a dependency of jax)."""
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def _stored(dtype) -> np.dtype:
    """What the .npy file holds: bfloat16 as its raw 16 bits (uint16; .npy has no bfloat16), else the dtype."""
    return np.dtype(np.uint16) if _dtype(dtype).name == "bfloat16" else _dtype(dtype)


class FeatureFile:
    """V×N×T×C features in a `.npy` file, read a few images at a time: `f[key]` (e.g. `f[:, idx]`, or sampled
    (view, image, position) rows `f[v_r, n_r, t_r]`) maps the file, copies what it indexes and unmaps it again, so the process's resident memory holds what was taken, not the
    file (pages of a long-lived memory map count as resident once touched). `np.asarray(f)` reads it all."""

    def __init__(self, path, dtype=None):
        self.path = path
        mm = np.load(path, mmap_mode="r")
        self.shape, self.dtype = mm.shape, _dtype(dtype) if dtype is not None else mm.dtype
        if mm.dtype != _stored(self.dtype):
            raise ValueError(f"leukax/train/views.py: {path} holds {mm.dtype}, not {self.dtype}")
        del mm

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def take(self, indices) -> np.ndarray:
        """Returns V×k×T×C for images `indices` (an array or a slice)."""
        return self[:, indices]

    def __getitem__(self, key) -> np.ndarray:
        """A copy of `array[key]` (e.g. `f[:, split.train]`), read through a short-lived memory map."""
        mm = np.load(self.path, mmap_mode="r")
        if isinstance(key, tuple) and sum(isinstance(k, np.ndarray) for k in key) > 1:
            # scattered rows (fit_transform's sample): without this the kernel's read-ahead around every row
            # makes nearly the whole file resident (measured: 1.8 GB of a 2.0 GB file for 50,000 rows; 0.5 GB with)
            import mmap
            mm._mmap.madvise(mmap.MADV_RANDOM)
        try:
            return np.array(mm[key]).view(self.dtype)
        finally:
            del mm

    def __array__(self, dtype=None, copy=None):
        out = self.take(slice(None))
        return out if dtype is None else out.astype(dtype)
