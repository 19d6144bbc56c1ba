"""The shared TFDS builder: encoded image bytes + label + filename + group, written as array_record.

Written shard by shard with TFDS's own `ShardBasedBuilder` (each shard a few hundred MB of encoded images,
streamed from the files to disk), not through `GeneratorBasedBuilder`'s shuffler: that one keeps a split's
serialized examples in a 1 GB memory buffer and spills beyond it through `tf.io.gfile`, which needs TensorFlow
(measured: a 16,000-image C-NMC-layout folder failed with `No module named 'tensorflow'`). The examples keep the
order that shuffler gave them (sorted by TFDS's hash of the file name, salted with the split name), so datasets
built before are read back in the same order.

Needs no TensorFlow: features are `Tensor(shape=(), dtype=object)` bytes, `Text`, `Scalar`, `ClassLabel` and a
float `Tensor`, the file format is array_record and examples are read back with `builder.as_data_source(split)`.
Every image is decoded once while preparing, so an unreadable file stops the build with its name and reason
(never dropped), the original height/width are recorded, and a hash of the decoded pixels puts byte- or
pixel-identical duplicates (e.g. ALL-IDB1 Im108_0.jpg = Im093_0.jpg) into one `group` together with every
image of the same subject (C-NMC): groups are the connected components of "same subject" or "same pixels".
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from leukax.data import imageio
from leukax.data.splits import combine_groups

log = logging.getLogger("leukax.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif")


class DatasetError(ValueError):
    """A dataset folder that cannot be built: empty, unknown class, unreadable files, bad names."""


class ManualDownloadError(FileNotFoundError):
    """The data must be downloaded by hand; the message says what, from where and where to put it."""


def default_data_dir() -> pathlib.Path:
    """Returns $LEUKAX_DATA_DIR or ~/.cache/leukax/tfds: where prepared datasets are written."""
    return pathlib.Path(os.environ.get("LEUKAX_DATA_DIR", "~/.cache/leukax/tfds")).expanduser()


def default_manual_dir(data_dir=None) -> pathlib.Path:
    """Returns $LEUKAX_MANUAL_DIR or <data_dir>/manual: the root holding one folder per manual dataset."""
    env = os.environ.get("LEUKAX_MANUAL_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path(data_dir or default_data_dir()) / "manual"


@dataclasses.dataclass
class Record:
    """One image file to be written: its path, integer label and the optional extras."""
    path: pathlib.Path
    label: int
    filename: str  # unique key; relative path (composites prefix the source dataset)
    subject: str = ""
    source: str = ""
    xyc: np.ndarray | None = None


def is_image(path: pathlib.Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
    """Returns every image file under `folder` (recursive), sorted."""
    return sorted(p for p in folder.rglob("*") if is_image(p))


def pixel_hash(image_hw3: np.ndarray) -> str:
    """Returns a sha1 of the decoded pixels and shape: equal for byte- or pixel-identical images."""
    h = hashlib.sha1(str(image_hw3.shape).encode())
    h.update(np.ascontiguousarray(image_hw3).tobytes())
    return h.hexdigest()


def leakage_groups(subjects: list[str], hashes: list[str]) -> np.ndarray:
    """Returns int64 N ids of the groups no split may cut: connected components of equal non-empty subject
    or equal pixel hash, numbered 0.. in order of first appearance (`leukax.data.splits.combine_groups`;
    identical items alone: `leukax.data.splits.duplicate_groups`)."""

    def keys(values):  # an empty value joins nothing: give it a key of its own
        return [v if v else f"\0{i}" for i, v in enumerate(values)]

    return combine_groups(keys(subjects), keys(hashes))


def class_counts(labels, class_names) -> dict[str, int]:
    """Returns {class name: number of examples}, every class listed (zero included)."""
    c = collections.Counter(int(x) for x in labels)
    return {name: c.get(i, 0) for i, name in enumerate(class_names)}


SHARD_BYTES = 256 << 20  # encoded image bytes per array_record shard (a shard is written as one stream)


def shuffled_order(keys: list[str], salt: str = "train") -> list[int]:
    """Returns the indices of `keys` in the order TFDS's generator writer stores them (ascending salted hash of
    the key, `tensorflow_datasets.core.hashing.Hasher`): a deterministic shuffle that interleaves classes and
    folders, the order every leukax dataset has had."""
    from tensorflow_datasets.core import hashing
    hasher = hashing.Hasher(salt)
    return sorted(range(len(keys)), key=lambda i: hasher.hash_key(keys[i]))


def shard_bounds(sizes: list[int], max_bytes: int | None = None) -> list[tuple[int, int]]:
    """Returns [(start, stop)) ranges over consecutive items so that each range's total size is at most
    `max_bytes` (default SHARD_BYTES; an item larger than that gets a range of its own); at least one range."""
    max_bytes = SHARD_BYTES if max_bytes is None else max_bytes
    bounds, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > max_bytes:
            bounds.append((start, i))
            start, total = i, 0
        total += n
    bounds.append((start, len(sizes)))
    return bounds


class LeukaxBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
    """Base: subclasses set CLASS_NAMES (or override `class_names`) and implement `_records()`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    CLASS_NAMES: tuple[str, ...] = ()
    # False: an unreadable file stops the build (curated datasets: nothing is dropped silently). True (a user's
    # own folder): each unreadable file is named in a warning on stderr and the others are kept.
    SKIP_UNREADABLE = False
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""
    # tfds derives checksum-file paths from `code_path`, which for a builder inside a package needs the
    # optional `importlib_resources`; these builders download nothing, so there is no checksum file.
    code_path = None

    def __init__(self, *, data_dir=None, manual_dir=None, max_pixels: int | None = None, **kwargs):
        data_dir = pathlib.Path(data_dir) if data_dir else default_data_dir()
        self._manual_root = pathlib.Path(manual_dir) if manual_dir else default_manual_dir(data_dir)
        self._max_pixels = max_pixels
        super().__init__(data_dir=str(data_dir), file_format="array_record", **kwargs)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.CLASS_NAMES)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded file bytes
                "label": tfds.features.ClassLabel(names=list(self.class_names)),
                "filename": tfds.features.Text(),
                "group": tfds.features.Scalar(dtype=np.int64),
                "height": tfds.features.Scalar(dtype=np.int32),
                "width": tfds.features.Scalar(dtype=np.int32),
                "subject": tfds.features.Text(),
                "source": tfds.features.Text(),
                "xyc": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),  # ALL-IDB1 blast centroids
            }),
        )

    def _records(self) -> list[Record]:
        raise NotImplementedError

    def _check_kept(self, records: list[Record]) -> None:
        """Called when SKIP_UNREADABLE dropped files: raises DatasetError if what is left cannot be used."""
        if not records:
            raise DatasetError(f"{self.name}: no readable images left")

    def _shard_iterators_per_split(self, dl_manager):
        """{"train": one example generator per shard}: images are read from their files as each shard is
        written, so the build holds one example at a time (and the keys, hashes and sizes of all)."""
        del dl_manager
        items = self._items()
        items = [items[i] for i in shuffled_order([r.filename for r, _, _ in items])]
        sizes = [r.path.stat().st_size for r, _, _ in items]
        return {"train": [functools.partial(self._generate_examples, items[a:b]) for a, b in shard_bounds(sizes)]}

    def _items(self) -> list[tuple[Record, int, tuple[int, int]]]:
        """Returns (record, leakage group, (height, width)) of every readable image, each decoded once."""
        records = self._records()
        if not records:
            raise DatasetError(f"{self.name}: no images found")
        names = [r.filename for r in records]
        if len(set(names)) != len(names):
            dup = sorted(n for n, k in collections.Counter(names).items() if k > 1)
            raise DatasetError(f"{self.name}: duplicate file names {dup[:10]}")
        hashes, sizes, errors, kept = [], [], [], []
        for r in records:
            try:
                img = imageio.read_image(r.path, max_pixels=self._max_pixels)
            except imageio.ImageReadError as e:
                errors.append(str(e))
                continue
            hashes.append(pixel_hash(img))
            sizes.append(img.shape[:2])
            kept.append(r)
        if errors and not self.SKIP_UNREADABLE:
            raise DatasetError(f"{self.name}: {len(errors)} unreadable image file(s) (nothing is skipped; "
                               "remove or fix them):\n  " + "\n  ".join(errors[:20]))
        if errors:
            for e in errors:
                log.warning("%s: skipping unreadable image %s", self.name, e)
            records = kept
            self._check_kept(records)
        groups = leakage_groups([r.subject for r in records], hashes)
        n_dup = len(hashes) - len(set(hashes))
        counts = class_counts([r.label for r in records], self.class_names)
        log.info("%s: read %d images, per class %s; %d pixel-identical duplicate(s); %d groups",
                 self.name, len(records), counts, n_dup, groups.max() + 1)
        return list(zip(records, groups, sizes))

    def _generate_examples(self, items):
        for r, group, (h, w) in items:
            xyc = np.zeros((0, 2), np.float32) if r.xyc is None else np.asarray(r.xyc, np.float32)
            yield r.filename, {
                "image": r.path.read_bytes(), "label": int(r.label), "filename": r.filename,
                "group": int(group), "height": int(h), "width": int(w), "subject": r.subject,
                "source": r.source, "xyc": xyc.reshape(-1, 2),
            }
