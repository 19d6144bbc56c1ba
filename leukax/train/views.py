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

import os

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
                         progress: bool = True, desc: str = "features", image_fn=None,
                         part: tuple[int, int] = (0, 1), barrier=None) -> "FeatureFile":
    """Returns the frozen feature maps of every view of every image of `source`, V×N×h·w×C in `dtype` (16-bit),
    as the `FeatureFile` at `path` (a `.npy` file), computed if it does not exist.

    bfloat16 (the default) keeps float32's range: raw feature maps of some networks are too small for float16
    (random-init EfficientNet-Lite0's pooled features all flushed to 0) or, unbounded by ReLU6, could exceed
    its 65504; its 8-bit mantissa (relative error ≤ 2⁻⁹) is far below what the views and members vary by.

    Streaming: a grain pipeline (`leukax.data.pipeline.epoch_dataset`, `num_threads` readers, in dataset
    order) decodes and resizes `batch_size` images at a time; their V views go through the backbone in V
    calls of `batch_size` (one compiled shape; the last batch padded) and are written with `os.pwrite` into
    ``path.partial`` (a sparse `.npy` of the full size; nothing of it is mapped, so memory is one batch of
    images and views, whatever N). `image_fn(uint8 B×S×S×3) -> B×S×S×3`, if given, runs on every batch before
    its views are made (e.g. Akter et al.'s smoothing). Resumable: after every batch a progress file records
    how many images are done; a killed extraction restarts there. The finished file is renamed to `path`
    (readers never see a partial one).

    Divided over processes: with part=(p, P) process p extracts the p-th of P contiguous ranges of images into
    the same file, which must be on a folder every process sees (a shared filesystem); `barrier()` (e.g.
    `jax.distributed`'s, `leukax.runtime.await_all_processes`) is called by every process at the same three points:
    after process 0 created the file, after every range is written, after process 0 renamed it."""
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
    pid, count = part
    if count > 1 and barrier is None:
        raise ValueError("leukax/train/views.py: stream_view_features over several processes needs a barrier")
    wait = barrier or (lambda: None)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    state = path.with_name(path.name + (".progress.json" if count == 1 else f".progress.{pid}of{count}.json"))
    n, v = len(source), num_views(views, num_affine)
    fm = jax.eval_shape(lambda x: _forward(backbone, variables, x, normalization, "feature_map"),
                        jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.uint8))
    shape = (v, n, fm.shape[1] * fm.shape[2], fm.shape[3])
    dt, stored = _dtype(dtype), _stored(dtype)
    lo, hi = (int(b[0]), int(b[-1]) + 1) if len(b := np.array_split(np.arange(n), count)[pid]) else (n, n)
    if pid == 0 and _npy_header(partial)[:2] != (shape, stored):  # a new partial file: no progress is valid
        _remove_progress(path)
        np.lib.format.open_memmap(partial, "w+", stored, shape).flush()  # the header and a sparse file
    wait()
    header = _npy_header(partial)
    if header[:2] != (shape, stored):
        raise FileNotFoundError(f"leukax/train/views.py: process {pid} of {count} does not see {partial} that "
                                "process 0 created: the feature folder must be shared by every process")
    done = lo
    if state.exists():
        saved = json.loads(state.read_text())
        if tuple(saved["shape"]) == shape and saved["dtype"] == dt.name and lo <= int(saved["done"]) <= hi:
            done = int(saved["done"])
    if count > 1 and progress:
        print(f"{desc}: images {lo}–{hi} of {n} (process {pid} of {count})", flush=True)
    bar = tqdm(total=hi - lo, initial=done - lo, desc=desc, unit="img", file=sys.stderr,
               disable=not progress or done == hi)
    if done < hi:
        offset = header[2]
        row = shape[2] * shape[3] * stored.itemsize  # bytes of one [view, image]
        batches = pipeline.epoch_dataset(source, image_size, batch_size, indices=np.arange(done, hi), shuffle=False,
                                         num_threads=num_threads, max_pixels=max_pixels)
        with open(partial, "r+b", buffering=0) as f:
            for batch in batches:
                idx_b, images_b = batch["index"], batch["image"]
                if image_fn is not None:
                    images_b = np.asarray(image_fn(images_b))
                b = len(idx_b)
                pad = (np.concatenate([images_b, np.repeat(images_b[-1:], batch_size - b, 0)]) if b < batch_size
                       else images_b)
                views_vb = make_views(pad, views, num_affine, seed,
                                      np.concatenate([idx_b, np.repeat(idx_b[-1:], batch_size - b)]))
                for k in range(v):
                    out = np.asarray(_forward(backbone, variables, views_vb[k], normalization, "feature_map"))[:b]
                    data = np.ascontiguousarray(out.reshape(b, shape[2], shape[3]).astype(dt).view(stored))
                    _write_at(f.fileno(), data.view(np.uint8).reshape(-1), offset + (k * n + int(idx_b[0])) * row)
                done = int(idx_b[0]) + b
                state.write_text(json.dumps({"done": done, "shape": list(shape), "dtype": dt.name}))
                bar.update(b)
    bar.close()
    wait()
    if pid == 0:
        os.replace(partial, path)
        _remove_progress(path)
    wait()
    return FeatureFile(path, dtype)


def _npy_header(path) -> tuple:
    """(shape, dtype, byte offset of the data) of the `.npy` file at `path`; (None, None, None) if there is none."""
    try:
        with open(path, "rb") as f:
            shape, _, stored = _read_header(f)
            return tuple(shape), stored, f.tell()
    except (OSError, ValueError):
        return None, None, None


def _remove_progress(path) -> None:
    """Removes the progress files of the extraction into `path` (every process's)."""
    for old in path.parent.glob(path.name + ".progress*.json"):
        old.unlink()


def _read_header(f) -> tuple:
    """(shape, fortran_order, dtype) of the `.npy` file open at its start; leaves `f` at the array data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def _write_at(fd: int, buf_u8: np.ndarray, pos: int) -> None:
    """Writes all of `buf_u8` at byte `pos` of file `fd` (`os.pwrite` may write less than asked)."""
    view = memoryview(buf_u8)
    while len(view):
        written = os.pwrite(fd, view, pos)
        view, pos = view[written:], pos + written


def _dtype(dtype) -> np.dtype:
    """np.dtype of a name or type, bfloat16 included (ml_dtypes, a dependency of jax)."""
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def _read_into(fd: int, buf_u8: np.ndarray, pos: int) -> None:
    """Fills the contiguous uint8 array `buf_u8` from file offset `pos` (os.preadv, no intermediate copy)."""
    mv, got = memoryview(buf_u8), 0
    while got < len(mv):
        k = os.preadv(fd, [mv[got:]], pos + got)
        if k <= 0:
            raise OSError(f"leukax/train/views.py: short read at offset {pos + got}")
        got += k


def _in_range(index, size: int, what: str) -> np.ndarray:
    """Returns int64 `index` with negative entries counted from the end; IndexError if any is out of range."""
    index = np.where(index < 0, index + size, index).astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= size):
        raise IndexError(f"leukax/train/views.py: {what} index out of range for {size} {what}s")
    return index


def _stored(dtype) -> np.dtype:
    """What the .npy file holds: bfloat16 as its raw 16 bits (uint16; .npy has no bfloat16), else the dtype."""
    return np.dtype(np.uint16) if _dtype(dtype).name == "bfloat16" else _dtype(dtype)


class FeatureFile:
    """V×N×T×C features in a `.npy` file, read a few images at a time: `f[key]` (e.g. `f[:, idx]`, or sampled
    (view, image, position) rows `f[v_r, n_r, t_r]`) reads what it indexes with `os.preadv` straight into a new
    array, so the process's resident memory holds what was taken, never the file. (Through a memory map, even a
    short-lived one, every touched page and the kernel's fault-around pages count as resident: measured on a
    2 GB file of 2,000 images, fit_transform's 50,000 sampled rows raised the peak by 1.7 GB.)
    `np.asarray(f)` reads it all."""

    def __init__(self, path, dtype=None):
        self.path = path
        with open(path, "rb") as f:
            shape, fortran, stored = _read_header(f)
            self._offset = f.tell()
        self.shape, self.dtype = tuple(shape), _dtype(dtype) if dtype is not None else stored
        if fortran or stored != _stored(self.dtype):
            raise ValueError(f"leukax/train/views.py: {path} holds {'Fortran-order ' if fortran else ''}{stored}, "
                             f"not {self.dtype}")
        self._row = int(np.prod(self.shape[2:], dtype=np.int64)) * self.dtype.itemsize  # bytes of one [v, n]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def take(self, indices) -> np.ndarray:
        """Returns V×k×T×C for images `indices` (an array or a slice)."""
        return self[:, indices]

    def __getitem__(self, key) -> np.ndarray:
        """A copy of `array[key]` for `f[:, images]` (images: an int array or a slice) and for sampled rows
        `f[v_r, n_r, t_r]` (three int arrays); any other key is read through a short-lived memory map."""
        if isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None):
            images = np.arange(self.shape[1])[key[1]] if isinstance(key[1], slice) else np.asarray(key[1])
            if images.ndim == 1 and images.dtype.kind in "iu":
                return self._read_images(images)
        if (isinstance(key, tuple) and len(key) == 3 and self.ndim == 4
                and all(isinstance(k, np.ndarray) and k.dtype.kind in "iu" for k in key)):
            return self._read_rows(*np.broadcast_arrays(*key))
        mm = np.load(self.path, mmap_mode="r")
        try:
            return np.array(mm[key]).view(self.dtype)
        finally:
            del mm

    def _read_images(self, images) -> np.ndarray:
        v, n = self.shape[:2]
        images = _in_range(images, n, "image")
        out = np.empty((v, len(images)) + self.shape[2:], self.dtype)
        if not len(images):
            return out
        flat = out.reshape(v, len(images), -1).view(np.uint8).reshape(v, len(images), self._row)
        # runs of consecutive images: one read per view and run
        breaks = np.flatnonzero(np.diff(images) != 1) + 1
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(images)]
        with open(self.path, "rb", buffering=0) as f:
            for k in range(v):
                for a, b in zip(starts, ends):
                    pos = self._offset + (k * n + int(images[a])) * self._row
                    _read_into(f.fileno(), flat[k, a:b].reshape(-1), pos)
        return out

    def _read_rows(self, v_r, n_r, t_r) -> np.ndarray:
        v, n, t, c = self.shape
        v_r, n_r, t_r = (_in_range(i, d, what)
                         for i, d, what in ((v_r, v, "view"), (n_r, n, "image"), (t_r, t, "position")))
        item = c * self.dtype.itemsize
        pos = self._offset + ((v_r.ravel() * n + n_r.ravel()) * t + t_r.ravel()) * item
        out = np.empty((pos.size, c), self.dtype)
        raw = out.view(np.uint8).reshape(pos.size, item)
        with open(self.path, "rb", buffering=0) as f:
            for i in np.argsort(pos, kind="stable"):  # in file order
                _read_into(f.fileno(), raw[i], int(pos[i]))
        return out.reshape(v_r.shape + (c,))

    def __array__(self, dtype=None, copy=None):
        out = self.take(slice(None))
        return out if dtype is None else out.astype(dtype)
