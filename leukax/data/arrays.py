"""A dataset from its TFDS source: `load_arrays` (a small set as resized uint8 arrays in memory) or `load_index`
(labels, groups and names only, with the random-access source that a grain pipeline streams images from)."""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import tempfile

import numpy as np

from leukax.data.builders import class_counts, get_builder

log = logging.getLogger("leukax.data")
CACHE_FORMAT = 1


@dataclasses.dataclass
class Dataset:
    """A dataset in memory. images: uint8 N×S×S×3; labels: int32 N; groups: int64 N (subject or duplicate
    group: split by these); heights/widths: int32 N original sizes; filenames, subjects, sources: N strings."""
    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    filenames: list[str]
    class_names: tuple[str, ...]
    heights: np.ndarray
    widths: np.ndarray
    subjects: list[str]
    sources: list[str]
    name: str = ""
    source: object = None  # `load_index`: the random-access TFDS source (records with encoded image bytes)
    fingerprint: str = ""  # `load_index`: sha1 of every record's file name, label and image bytes

    @property
    def counts(self) -> dict[str, int]:
        """Returns {class name: number of images}."""
        return class_counts(self.labels, self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "Dataset":
        """Returns the examples at `indices` (e.g. one fold from leukax.data.splits)."""
        idx = np.asarray(indices, np.int64)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return dataclasses.replace(
            self, images=self.images[idx], labels=self.labels[idx], groups=self.groups[idx],
            filenames=pick(self.filenames), heights=self.heights[idx], widths=self.widths[idx],
            subjects=pick(self.subjects), sources=pick(self.sources))


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_arrays(name: str, image_size: int, split: str = "train", data_dir=None, manual_dir=None,
                max_pixels: int | None = None, cache: bool = True, **builder_kwargs) -> Dataset:
    """Returns the dataset `name` ("cnmc2019", "all_idb", "image_folder" with root=..., ...) as a Dataset of
    uint8 N×S×S×3 images, resized with `imageio.resize_image` (whole image squashed to S×S, PIL bicubic).

    The prepared TFDS dataset is built on first use (see leukax.data.builders); images are decoded and resized
    by the grain pipeline (`leukax.data.pipeline.epoch_dataset`, unshuffled). With cache=True the resized
    arrays are kept as <builder data dir>/arrays_<split>_<S>px.npz, which lives and dies with the prepared
    data (a rebuilt dataset has a new directory)."""
    builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir, max_pixels=max_pixels,
                          **builder_kwargs)
    class_names = tuple(builder.info.features["label"].names)
    source = builder.as_data_source(split)
    n = len(source)
    cache_path = pathlib.Path(builder.data_dir) / (
        f"arrays_{re.sub(r'[^A-Za-z0-9_.-]+', '_', split)}_{int(image_size)}px.npz")
    ds = _read_cache(cache_path, n, class_names) if cache else None
    if ds is None:
        from leukax.data.pipeline import epoch_dataset  # decoded and resized by grain threads, in order
        images = np.zeros((n, image_size, image_size, 3), np.uint8)
        if n:
            for batch in epoch_dataset(source, image_size, 64, shuffle=False, max_pixels=max_pixels):
                images[batch["index"]] = batch["image"]
        meta = {k: [] for k in ("labels", "groups", "heights", "widths", "filenames", "subjects", "sources")}
        for i in range(n):
            ex = source[i]
            for key, field in (("labels", "label"), ("groups", "group"), ("heights", "height"),
                               ("widths", "width")):
                meta[key].append(int(ex[field]))
            for key, field in (("filenames", "filename"), ("subjects", "subject"), ("sources", "source")):
                meta[key].append(_text(ex[field]))
        ds = Dataset(images=images, labels=np.asarray(meta["labels"], np.int32),
                     groups=np.asarray(meta["groups"], np.int64), filenames=meta["filenames"],
                     class_names=class_names, heights=np.asarray(meta["heights"], np.int32),
                     widths=np.asarray(meta["widths"], np.int32), subjects=meta["subjects"],
                     sources=meta["sources"])
        if cache:
            _write_cache(cache_path, ds)
    ds.name = name
    log.info("%s[%s]: %d images at %dpx, per class %s", name, split, len(ds), image_size, ds.counts)
    return ds


def load_index(name: str, split: str = "train", data_dir=None, manual_dir=None, max_pixels: int | None = None,
               **builder_kwargs) -> Dataset:
    """Returns the dataset `name` WITHOUT its pixels: labels, groups, names and sizes of every example, the
    TFDS data source to stream the images from (`Dataset.source`, e.g. into `leukax.data.pipeline`), and a
    fingerprint of the content (for cache keys). `images` is None. Memory: the metadata only; one pass over the
    records, no image is decoded."""
    import hashlib
    builder = get_builder(name, data_dir=data_dir, manual_dir=manual_dir, max_pixels=max_pixels, **builder_kwargs)
    class_names = tuple(builder.info.features["label"].names)
    source = builder.as_data_source(split)
    meta = {k: [] for k in ("labels", "groups", "heights", "widths", "filenames", "subjects", "sources")}
    h = hashlib.sha1()
    for i in range(len(source)):
        ex = source[i]
        for key, field in (("labels", "label"), ("groups", "group"), ("heights", "height"), ("widths", "width")):
            meta[key].append(int(ex[field]))
        for key, field in (("filenames", "filename"), ("subjects", "subject"), ("sources", "source")):
            meta[key].append(_text(ex[field]))
        h.update(f"{meta['filenames'][-1]}|{meta['labels'][-1]}|{len(ex['image'])}|".encode())
        h.update(ex["image"])
    return Dataset(images=None, labels=np.asarray(meta["labels"], np.int32),
                   groups=np.asarray(meta["groups"], np.int64), filenames=meta["filenames"], class_names=class_names,
                   heights=np.asarray(meta["heights"], np.int32), widths=np.asarray(meta["widths"], np.int32),
                   subjects=meta["subjects"], sources=meta["sources"], name=name, source=source,
                   fingerprint=h.hexdigest())


def _write_cache(path: pathlib.Path, ds: Dataset) -> None:
    arrays = {f.name: getattr(ds, f.name) for f in dataclasses.fields(ds) if f.name not in ("name", "source", "fingerprint")}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    arrays["format"] = np.asarray(CACHE_FORMAT)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: readers never see a half-written file
    except OSError as e:  # a read-only data dir only costs the cache
        log.warning("could not write array cache %s: %s", path, e)


def _read_cache(path: pathlib.Path, n: int, class_names) -> Dataset | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != CACHE_FORMAT or len(z["labels"]) != n or \
                    tuple(z["class_names"].tolist()) != class_names:
                return None
            ds = Dataset(**{k: z[k] for k in ("images", "labels", "groups", "heights", "widths")},
                         filenames=z["filenames"].tolist(), class_names=class_names,
                         subjects=z["subjects"].tolist(), sources=z["sources"].tolist())
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable array cache %s: %s", path, e)
        return None
    log.info("read cached arrays %s", path)
    return ds
