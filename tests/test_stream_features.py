"""Streaming feature extraction (`views.stream_view_features`): the same features as the in-memory path, from a
grain pipeline over the TFDS source, 16-bit on disk, and resumable after a crash."""
import json

import numpy as np
import pytest

from leukax.data import load_arrays, load_index
from leukax.pretrained import pretrained
from leukax.train import features, views

SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    module, variables, spec = pretrained("mobilenet_v2", weights=None, seed=0)
    return data_dir, module, variables, spec


def test_load_index_has_the_metadata_of_load_arrays_and_no_pixels(setup):
    data_dir = setup[0]
    idx, arr = load_index("cnmc2019", data_dir=data_dir), load_arrays("cnmc2019", SIZE, data_dir=data_dir)
    assert idx.images is None and len(idx.source) == len(arr) == 60
    np.testing.assert_array_equal(idx.labels, arr.labels)
    np.testing.assert_array_equal(idx.groups, arr.groups)
    assert idx.filenames == arr.filenames and idx.class_names == arr.class_names
    assert len(idx.fingerprint) == 40 and idx.fingerprint == load_index("cnmc2019", data_dir=data_dir).fingerprint


def test_streamed_features_equal_in_memory_features(setup, tmp_path):
    data_dir, module, variables, spec = setup
    idx, arr = load_index("cnmc2019", data_dir=data_dir), load_arrays("cnmc2019", SIZE, data_dir=data_dir)
    want = views.view_features(module, variables, arr.images, spec.normalization, "dihedral", num_affine=1)
    got = views.stream_view_features(module, variables, idx.source, SIZE, spec.normalization, tmp_path / "f.npy",
                                     num_affine=1, batch_size=16, progress=False)
    assert isinstance(got, np.memmap) and got.dtype == np.float16 and got.shape == want.shape == (9, 60, 1, 1280)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    assert not (tmp_path / "f.npy.partial").exists() and not (tmp_path / "f.npy.progress.json").exists()


class _Source:
    """The TFDS source, recording what is read, and failing at example `crash_at` (a killed extraction)."""

    def __init__(self, source, crash_at=-1):
        self.source, self.crash_at, self.read = source, crash_at, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i == self.crash_at:
            raise RuntimeError("killed")
        self.read.append(i)
        return self.source[i]


def test_killed_extraction_resumes_where_it_stopped(setup, tmp_path):
    data_dir, module, variables, spec = setup
    src = load_index("cnmc2019", data_dir=data_dir).source
    path = tmp_path / "f.npy"
    kw = dict(batch_size=16, progress=False, num_threads=1)
    with pytest.raises(Exception):
        views.stream_view_features(module, variables, _Source(src, 40), SIZE, spec.normalization, path, **kw)
    assert not path.exists()
    done = json.loads((tmp_path / "f.npy.progress.json").read_text())["done"]
    assert done in (16, 32)  # whole batches before the one holding example 40
    again = _Source(src)
    got = views.stream_view_features(module, variables, again, SIZE, spec.normalization, path, **kw)
    assert min(again.read) == done  # the images already done are not read again
    want = views.stream_view_features(module, variables, src, SIZE, spec.normalization, tmp_path / "g.npy", **kw)
    np.testing.assert_array_equal(got, want)


def test_stream_key_changes_with_data_and_settings(setup):
    _, module, variables, spec = setup
    base = features.stream_key(module, variables, spec.normalization, "abc", SIZE, "dihedral", 0)
    assert base == features.stream_key(module, variables, spec.normalization, "abc", SIZE, "dihedral", 0)
    assert base != features.stream_key(module, variables, spec.normalization, "abd", SIZE, "dihedral", 0)
    assert base != features.stream_key(module, variables, spec.normalization, "abc", SIZE, "none", 0)
