"""grain input pipelines: seeded per-epoch shuffle -> decode -> resize -> batch -> (per-member augmentation).

The source is a TFDS data source (`builder.as_data_source(split)`: records with encoded image bytes) or an
in-memory `leukax.data.Dataset` (already decoded). `indices` (e.g. a fold from `leukax.data.splits`) pick the
examples. The order of epoch e for ensemble member m is grain's index shuffle seeded with
(seed, member, epoch): reproducible, different per member and per epoch, every example exactly once.
Decoding runs in `num_threads` grain reader threads (PIL releases the GIL; 2 suits a 2-core machine);
augmentation is a batched JAX function `augment(key, images_bhwc_float) -> images` applied after
batching with key = fold_in(fold_in(fold_in(key(seed), member), epoch), step), so each member draws its own.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from leukax.data import imageio
from leukax.data.arrays import Dataset

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


class ArraySource:
    """Wraps a `leukax.data.Dataset` as a random-access source of {"image": uint8 S×S×3, "label", ...}."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.labels)

    def __getitem__(self, i: int) -> dict:
        d = self.dataset
        return {"image": d.images[i], "label": d.labels[i], "group": d.groups[i]}


def epoch_seed(seed: int, member: int, epoch: int) -> int:
    """Returns a 32-bit shuffle seed mixing (seed, member, epoch) with numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(seed), int(member), int(epoch)]).generate_state(1)[0])


def epoch_order(n_or_indices, seed: int = 0, member: int = 0, epoch: int = 0, shuffle: bool = True
                ) -> np.ndarray:
    """Returns int64 indices in the order epoch `epoch` of member `member` visits them."""
    idx = np.arange(n_or_indices) if np.ndim(n_or_indices) == 0 else np.asarray(n_or_indices, np.int64)
    ds = grain.MapDataset.source(idx)
    if shuffle:
        ds = ds.shuffle(seed=epoch_seed(seed, member, epoch))
    return np.asarray([ds[i] for i in range(len(ds))], np.int64)


def load_example(source, index: int, image_size: int, max_pixels: int | None = None) -> dict:
    """Returns {"image": uint8 S×S×3, "label": int32, "group": int64, "index": int64} for source[index]."""
    rec = source[int(index)]
    img = rec["image"]
    if isinstance(img, (bytes, bytearray)):
        name = rec.get("filename", f"example {index}")
        name = name.decode("utf-8") if isinstance(name, bytes) else name
        img = imageio.decode_image(img, name=name, max_pixels=max_pixels)
    img = imageio.resize_image(np.asarray(img, np.uint8), image_size)
    return {"image": img, "label": np.int32(rec["label"]), "group": np.int64(rec.get("group", -1)),
            "index": np.int64(index)}


def epoch_dataset(source, image_size: int, batch_size: int, *, epoch: int = 0, seed: int = 0, member: int = 0,
                  indices: Sequence[int] | None = None, shuffle: bool = True, drop_remainder: bool = False,
                  num_threads: int = 2, prefetch: int = 64, max_pixels: int | None = None) -> grain.IterDataset:
    """Returns a grain IterDataset of one epoch of batches {"image": uint8 B×S×S×3, "label": int32 B,
    "group": int64 B, "index": int64 B}; the last batch is smaller unless drop_remainder."""
    if isinstance(source, Dataset):
        source = ArraySource(source)
    if not hasattr(source, "__getitem__"):
        raise TypeError(f"leukax/data/pipeline.py: source must be random-access, got {type(source).__name__}")
    idx = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    if len(idx) == 0:
        raise ValueError("leukax/data/pipeline.py: no examples (empty indices)")
    ds = grain.MapDataset.source(idx)
    if shuffle:
        ds = ds.shuffle(seed=epoch_seed(seed, member, epoch))
    ds = ds.map(lambda i: load_example(source, i, image_size, max_pixels))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder)


def batches(source, image_size: int, batch_size: int, *, epoch: int = 0, seed: int = 0, member: int = 0,
            augment: AugmentFn | None = None, **kwargs) -> Iterator[dict]:
    """Yields the batches of `epoch_dataset` (same keyword arguments). With `augment`, "image" is
    augment(key_step, float32 images) for member-specific keys (see the module docstring)."""
    ds = epoch_dataset(source, image_size, batch_size, epoch=epoch, seed=seed, member=member, **kwargs)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), member), epoch)
    for step, batch in enumerate(ds):
        if augment is not None:
            batch["image"] = augment(jax.random.fold_in(key, step), batch["image"].astype(np.float32))
        yield batch


def member_augment(augment_fn: Callable, **config) -> AugmentFn:
    """Returns jit(augment_fn(key, images, **config)), e.g. member_augment(augment.augment_paper1)."""
    return jax.jit(lambda key, images: augment_fn(key, images, **config))
