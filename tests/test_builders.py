"""TFDS builders (no TensorFlow) on generated ALL-IDB/ASH/C-NMC fixtures and on the real shared images."""
import logging
import shutil
import sys

import numpy as np
import pytest

from leukax.data import arrays, builders, imageio
from leukax.data.builders import DatasetError, ManualDownloadError, get_builder

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import fixtures  # noqa: E402


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
    return fixtures.make_manual_root(tmp_path_factory.mktemp("manual"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _rows(name, data_dir, manual_dir=None, **kw):
    b = get_builder(name, data_dir=data_dir, manual_dir=manual_dir, **kw)
    src = b.as_data_source("train")
    rows = {r["filename"].decode(): r for r in (src[i] for i in range(len(src)))}
    return b, rows


def _labels(rows):
    return {k: int(r["label"]) for k, r in rows.items()}


def test_no_tensorflow_needed():
    assert "tensorflow" not in sys.modules


def test_all_idb1(manual, data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="leukax.data"):
        b, rows = _rows("all_idb1", data_dir, manual)
    assert b.info.features["label"].names == ["healthy", "ALL"]
    assert _labels(rows) == {"Im001_1.jpg": 1, "Im002_1.jpg": 1, "Im034_1.jpg": 1, "Im060_0.jpg": 0,
                             "Im093_0.jpg": 0, "Im108_0.jpg": 0}
    assert "all_idb1: read 6 images, per class {'healthy': 3, 'ALL': 3}; 1 pixel-identical" in caplog.text
    big = rows["Im001_1.jpg"]
    assert (big["height"], big["width"]) == (1944, 2592)  # a real-size smear
    assert imageio.decode_image(big["image"]).shape == (1944, 2592, 3)
    np.testing.assert_array_equal(big["xyc"], builders.read_xyc(manual / "all_idb1" / "Im001_1.xyc"))
    assert big["xyc"].shape == (2, 2) and rows["Im034_1.jpg"]["xyc"].shape == (4, 2)
    assert rows["Im060_0.jpg"]["xyc"].shape == (0, 2)  # healthy: empty .xyc
    groups = {k: int(r["group"]) for k, r in rows.items()}
    assert groups["Im108_0.jpg"] == groups["Im093_0.jpg"]
    assert len(set(groups.values())) == 5


def test_all_idb2_crops_and_duplicates(manual, data_dir):
    _, rows = _rows("all_idb2", data_dir, manual)
    assert sum(_labels(rows).values()) == 3 and len(rows) == 7
    assert {k: (int(r["height"]), int(r["width"])) for k, r in rows.items() if r["height"] < 257
            or r["width"] < 257} == {"Im003_1.tif": (190, 257), "Im131_0.tif": (257, 201)}
    assert rows["Im257_0.tif"]["group"] == rows["Im223_0.tif"]["group"]
    assert len({int(r["group"]) for r in rows.values()}) == 6


def test_ash_one_class(manual, data_dir):
    b, rows = _rows("ash_aml", data_dir, manual)
    assert b.info.features["label"].names == ["AML"]
    assert sorted(rows) == sorted(n for n, _ in fixtures.ASH_FILES)
    assert set(_labels(rows).values()) == {0}


def test_composites(manual, data_dir):
    _, rows = _rows("all_idb", data_dir, manual)
    assert len(rows) == 13 and {r["source"].decode() for r in rows.values()} == {"all_idb1", "all_idb2"}
    assert rows["all_idb1/Im001_1.jpg"]["label"] == 1 and rows["all_idb2/Im130_0.tif"]["label"] == 0
    assert rows["all_idb1/Im108_0.jpg"]["group"] == rows["all_idb1/Im093_0.jpg"]["group"]
    b, rows = _rows("all_aml_healthy", data_dir, manual)
    assert b.info.features["label"].names == ["ALL", "AML", "healthy"]
    counts = np.bincount(list(_labels(rows).values()), minlength=3)
    assert counts.tolist() == [3, 4, 4]
    assert rows["all_idb2/Im001_1.tif"]["label"] == 0 and rows["all_idb2/Im130_0.tif"]["label"] == 2
    assert all(r["label"] == 1 for k, r in rows.items() if k.startswith("ash_aml/"))


def test_cnmc_full_release_layout(manual, data_dir):
    _, rows = _rows("cnmc2019/full", data_dir, manual)
    assert len(rows) == 6
    r = rows["training_data/fold_1/hem/UID_H10_7_1_hem.bmp"]
    assert r["label"] == 0 and r["subject"] == b"H10" and r["source"] == b"fold_1"
    assert r["group"] == rows["training_data/fold_0/hem/UID_H10_1_1_hem.bmp"]["group"]  # same subject
    assert len({int(r["group"]) for r in rows.values()}) == 4


def test_build_streams_shards_past_tfds_shuffle_buffer(tmp_path, monkeypatch):
    """A dataset larger than TFDS's in-memory shuffle buffer builds without TensorFlow, shard by shard, in the
    order every leukax dataset had (TFDS's salted-hash order of the file names, pinned here: datasets built
    before this change read back the same)."""
    from tensorflow_datasets.core import shuffle
    from leukax.data.builders import base
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)  # a generator-based build would spill to tf.io.gfile
    monkeypatch.setattr(base, "SHARD_BYTES", 400_000)  # ~10 sample images per shard
    b = get_builder("cnmc2019", data_dir=tmp_path)
    src = b.as_data_source("train")
    names = [src[i]["filename"].decode() for i in range(len(src))]
    assert b.info.splits["train"].num_shards >= 5 and len(names) == 60 == len(set(names))
    assert names[:4] == ["images/UID_H14_34_2_hem.png", "images/UID_67_34_1_all.png",
                         "images/UID_H10_187_4_hem.png", "images/UID_H11_4_1_hem.png"]
    assert names[-2:] == ["images/UID_32_16_2_all.png", "images/UID_H24_23_8_hem.png"]
    assert src[0]["image"] == (builders.sample_dir() / names[0]).read_bytes()
    assert "tensorflow" not in sys.modules


def test_shard_bounds_cover_every_item_within_the_byte_limit():
    from leukax.data.builders.base import shard_bounds
    assert shard_bounds([5, 5, 5, 5], 10) == [(0, 2), (2, 4)]
    assert shard_bounds([30, 1, 1], 10) == [(0, 1), (1, 3)]  # an item over the limit gets a shard of its own
    assert shard_bounds([1], 10) == [(0, 1)]


def test_cnmc_embedded_sample_and_load_arrays(data_dir, caplog):
    assert len(list((builders.sample_dir() / "images").glob("*.png"))) == 60
    assert (builders.sample_dir() / "LICENSE").is_file()
    with caplog.at_level(logging.INFO, logger="leukax.data"):
        ds = arrays.load_arrays("cnmc2019", 32, data_dir=data_dir)
    assert "cnmc2019[train]: 60 images at 32px, per class {'hem': 30, 'all': 30}" in caplog.text
    assert ds.images.shape == (60, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and ds.counts == {"hem": 30, "all": 30}
    assert len(set(ds.subjects)) == 37
    # group <-> subject is one-to-one here (no pixel duplicates in the sample)
    assert len({(g, s) for g, s in zip(ds.groups, ds.subjects)}) == 37
    assert all((s.startswith("H")) == (lab == 0) for s, lab in zip(ds.subjects, ds.labels))
    i = ds.filenames.index("images/UID_13_10_1_all.png")
    want = imageio.resize_image(imageio.read_image(builders.sample_dir() / ds.filenames[i]), 32)
    np.testing.assert_array_equal(ds.images[i], want)
    cached = list(data_dir.rglob("arrays_train_32px.npz"))
    assert len(cached) == 1
    again = arrays.load_arrays("cnmc2019", 32, data_dir=data_dir)
    np.testing.assert_array_equal(again.images, ds.images)
    assert again.filenames == ds.filenames and again.subjects == ds.subjects
    sub = ds.subset([0, 5])
    assert sub.images.shape == (2, 32, 32, 3) and sub.filenames == [ds.filenames[0], ds.filenames[5]]


def test_pbc_real_subset(shared_dir, data_dir):
    b = get_builder("pbc", data_dir=data_dir, manual_dir=shared_dir / "data" / "pbc-subset")
    assert b.info.features["label"].names == list(builders.PBC_CLASSES)
    src = b.as_data_source("train")
    labels = np.array([src[i]["label"] for i in range(len(src))])
    assert np.bincount(labels).tolist() == [40] * 8


def test_image_folder_real_aml_lmu(shared_dir, data_dir):
    root = shared_dir / "data" / "aml-lmu-sample"
    ds = arrays.load_arrays("image_folder", 32, data_dir=data_dir, root=root, label_regex=r"^([A-Z]+)_")
    assert ds.class_names == ("EOS", "LYT", "MON", "MYO", "NGS")
    assert ds.counts == {c: 10 for c in ds.class_names}
    assert (ds.heights == 400).all() and ds.images.shape == (50, 32, 32, 3)
    with pytest.raises(DatasetError, match="unknown class"):
        get_builder("image_folder", data_dir=data_dir, root=root, label_regex=r"^([A-Z]+)_",
                    class_names=["EOS", "LYT"], prepare=False)


def test_image_folder_sorted_and_given_classes(tmp_path, data_dir):
    for cls, n in (("zeta", 2), ("alpha", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            fixtures.smooth_image(i, 40, 30).save(tmp_path / cls / f"{i}.png")
    b, rows = _rows("image_folder", data_dir, root=tmp_path)
    assert b.info.features["label"].names == ["alpha", "zeta"]
    assert _labels(rows) == {"alpha/0.png": 0, "zeta/0.png": 1, "zeta/1.png": 1}
    b2 = get_builder("image_folder", data_dir=data_dir, root=tmp_path, class_names=["zeta", "alpha"],
                     prepare=False)
    assert b2.info.features["label"].names == ["zeta", "alpha"] and b2.data_dir != b.data_dir
    with pytest.raises(DatasetError, match="no images for class"):
        get_builder("image_folder", root=tmp_path, class_names=["alpha", "zeta", "beta"], prepare=False)


def test_manual_download_error_says_what_and_where(tmp_path):
    with pytest.raises(ManualDownloadError) as e:
        get_builder("all_idb1", data_dir=tmp_path / "d", manual_dir=tmp_path / "m")
    msg = str(e.value)
    assert "https://scotti.di.unimi.it/all/" in msg and str(tmp_path / "m" / "all_idb1") in msg
    assert "ImNNN_L.jpg" in msg and "ImNNN_L.xyc" in msg
    with pytest.raises(ManualDownloadError, match="imagebank.hematology.org"):
        get_builder("ash_aml", data_dir=tmp_path / "d", manual_dir=tmp_path / "m")
    with pytest.raises(ManualDownloadError, match="10.7937/tcia.2019.dc64i46r"):
        get_builder("cnmc2019/full", data_dir=tmp_path / "d", manual_dir=tmp_path / "m")


def test_composite_names_the_missing_part(manual, tmp_path):
    shutil.copytree(manual / "all_idb2", tmp_path / "m" / "all_idb2")
    with pytest.raises(ManualDownloadError, match=r"ash_aml: no images found under .*m/ash_aml"):
        get_builder("all_aml_healthy", data_dir=tmp_path / "d", manual_dir=tmp_path / "m")


def test_bad_folders_are_clear_errors(manual, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        get_builder("image_folder", root=empty, prepare=False)
    (empty / "loose.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="belong to no class folder"):
        get_builder("image_folder", root=empty, prepare=False)
    # An unreadable file stops the build and is named, with the reason.
    ash = tmp_path / "m" / "ash_aml"
    shutil.copytree(manual / "ash_aml", ash)
    (ash / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetError, match=r"1 unreadable image file\(s\)[\s\S]*broken.jpg: "):
        get_builder("ash_aml", data_dir=tmp_path / "d", manual_dir=tmp_path / "m")
    # A wrongly named file in ALL-IDB2 is reported, not skipped.
    idb2 = tmp_path / "m2" / "all_idb2"
    shutil.copytree(manual / "all_idb2", idb2)
    shutil.copy(idb2 / "Im001_1.tif", idb2 / "copy of Im001_1.tif")
    with pytest.raises(DatasetError, match="not named ImNNN_L.tif"):
        get_builder("all_idb2", data_dir=tmp_path / "d", manual_dir=tmp_path / "m2")
    # An ALL-IDB1 image without its .xyc file.
    idb1 = tmp_path / "m3" / "all_idb1"
    shutil.copytree(manual / "all_idb1", idb1)
    (idb1 / "Im002_1.xyc").unlink()
    with pytest.raises(DatasetError, match="Im002_1.jpg has no Im002_1.xyc"):
        get_builder("all_idb1", data_dir=tmp_path / "d", manual_dir=tmp_path / "m3")


def test_leakage_groups_union():
    g = builders.leakage_groups(["a", "b", "a", "", "c"], ["h1", "h2", "h3", "h2", "h3"])
    assert g.tolist() == [0, 1, 0, 1, 0]  # 0~2 by subject, 3~1 by pixels, 4~2 by pixels
