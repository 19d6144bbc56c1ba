"""grain pipelines: deterministic per-member/per-epoch order, every example once, shapes, augmentation keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leukax import augment
from leukax.data import arrays, imageio, pipeline
from leukax.data.builders import get_builder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    b = get_builder("cnmc2019", data_dir=tmp_path_factory.mktemp("tfds"))
    return b.as_data_source("train")


def test_epoch_order_seeded():
    base = pipeline.epoch_order(50, seed=3, member=0, epoch=0)
    assert sorted(base.tolist()) == list(range(50))
    np.testing.assert_array_equal(base, pipeline.epoch_order(50, seed=3, member=0, epoch=0))
    for other in (dict(seed=4, member=0, epoch=0), dict(seed=3, member=1, epoch=0),
                  dict(seed=3, member=0, epoch=1)):
        assert not np.array_equal(base, pipeline.epoch_order(50, **other)), other
    np.testing.assert_array_equal(pipeline.epoch_order(5, shuffle=False), np.arange(5))
    sub = np.array([7, 3, 11, 40])
    assert sorted(pipeline.epoch_order(sub, seed=1).tolist()) == sorted(sub.tolist())


def test_tfds_source_epoch(source):
    subset = np.arange(0, 60, 3)  # 20 examples, e.g. one fold
    got = list(pipeline.batches(source, 32, 8, indices=subset, seed=5, member=2, epoch=1))
    assert [b["image"].shape for b in got] == [(8, 32, 32, 3), (8, 32, 32, 3), (4, 32, 32, 3)]
    assert got[0]["image"].dtype == np.uint8 and got[0]["label"].dtype == np.int32
    seen = np.concatenate([b["index"] for b in got])
    np.testing.assert_array_equal(seen, pipeline.epoch_order(subset, seed=5, member=2, epoch=1))
    assert sorted(seen.tolist()) == subset.tolist()  # every example exactly once
    i = int(seen[0])
    rec = source[i]
    want = imageio.resize_image(imageio.decode_image(rec["image"]), 32)
    np.testing.assert_array_equal(got[0]["image"][0], want)
    assert got[0]["label"][0] == rec["label"] and got[0]["group"][0] == rec["group"]
    again = list(pipeline.batches(source, 32, 8, indices=subset, seed=5, member=2, epoch=1))
    for a, b in zip(got, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    dropped = list(pipeline.batches(source, 32, 8, indices=subset, drop_remainder=True, num_threads=0))
    assert [len(b["label"]) for b in dropped] == [8, 8]


@pytest.fixture(scope="module")
def small_dataset():
    rng = np.random.default_rng(0)
    n = 12
    return arrays.Dataset(images=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                          labels=np.arange(n, dtype=np.int32) % 2, groups=np.arange(n), filenames=[""] * n,
                          class_names=("a", "b"), heights=np.full(n, 16, np.int32),
                          widths=np.full(n, 16, np.int32), subjects=[""] * n, sources=[""] * n)


def test_array_source_and_member_augmentation(small_dataset):
    def add_noise(key, images):  # a trivial augmentation: keeps the test about the keys
        return images + jax.random.uniform(key, (images.shape[0], 1, 1, 1))

    def run(member, epoch=0):
        return list(pipeline.batches(small_dataset, 16, 4, seed=0, member=member, epoch=epoch,
                                     augment=add_noise))

    m0, m0b, m1 = run(0), run(0), run(1)
    assert all(b["image"].dtype == jnp.float32 and b["image"].shape == (4, 16, 16, 3) for b in m0)
    for a, b in zip(m0, m0b):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["index"], b["index"])
    assert not np.array_equal(np.concatenate([b["index"] for b in m0]),
                              np.concatenate([b["index"] for b in m1]))
    # The noise is the augmentation's: image - original pixels is one constant per image, and it differs
    # between members for the same example.
    orig = small_dataset.images.astype(np.float32)
    noise = {int(i): float(np.asarray(img)[0, 0, 0] - orig[i][0, 0, 0])
             for b in m0 for i, img in zip(b["index"], b["image"])}
    noise1 = {int(i): float(np.asarray(img)[0, 0, 0] - orig[i][0, 0, 0])
              for b in m1 for i, img in zip(b["index"], b["image"])}
    assert all(0.0 <= v < 1.0 for v in noise.values()) and noise != noise1


def test_paper2_augmentation_permutes_pixels(small_dataset):
    aug = pipeline.member_augment(augment.augment_paper2)
    out = list(pipeline.batches(small_dataset, 16, 6, seed=1, member=0, augment=aug))
    seen = set()
    for b in out:
        imgs = np.asarray(b["image"])
        for img, i in zip(imgs, b["index"]):
            src = small_dataset.images[i].astype(np.float32)
            # which of the 8 dihedral transforms this is (as the set of arrays equal to it; random pixels)
            match = [(k, fl) for fl, f in enumerate((src, src[:, ::-1], src[::-1], src[::-1, ::-1]))
                     for k in range(4) if np.array_equal(img, np.rot90(f, k))]
            assert match
            seen.add(tuple(match))
    assert len(seen) >= 4  # random transforms, not the identity (or one fixed transform) every time
