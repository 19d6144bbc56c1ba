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
    assert isinstance(got, views.FeatureFile) and got.dtype.name == "bfloat16" and got.shape == want.shape == (9, 60, 1, 1280)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=4e-3, atol=1e-30)  # bfloat16: 2⁻⁹ relative
    np.testing.assert_array_equal(got.take([3, 1]), np.asarray(got)[:, [3, 1]])
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
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_extraction_divided_over_processes_writes_the_one_process_file(setup, tmp_path):
    """part=(p, 2) for p = 0, 1 (two threads standing in for two processes, a threading barrier for
    jax.distributed's): each reads only its own contiguous half of the images, a part killed midway resumes in
    its own range, and the finished file equals one process's byte for byte. A process that cannot see the
    file process 0 created (no shared folder) says so."""
    import threading
    data_dir, module, variables, spec = setup
    src = load_index("cnmc2019", data_dir=data_dir).source
    kw = dict(batch_size=16, progress=False, num_threads=1)
    want = views.stream_view_features(module, variables, src, SIZE, spec.normalization, tmp_path / "one.npy", **kw)

    def two_processes(sources, path):
        gate, errors = threading.Barrier(2, timeout=300), []

        def one(pid):
            try:
                views.stream_view_features(module, variables, sources[pid], SIZE, spec.normalization, path,
                                           part=(pid, 2), barrier=gate.wait, **kw)
            except Exception as e:  # noqa: BLE001  (reported below, the other thread released)
                errors.append(e)
                gate.abort()
        threads = [threading.Thread(target=one, args=(pid,)) for pid in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    path = tmp_path / "two.npy"
    first = [_Source(src), _Source(src, 50)]  # process 1 is killed at image 50 of its range 30–60
    assert two_processes(first, path) and not path.exists()
    assert sorted(first[0].read) == list(range(30))
    assert json.loads((tmp_path / "two.npy.progress.1of2.json").read_text())["done"] == 46
    again = [_Source(src), _Source(src)]
    assert not two_processes(again, path)
    assert not again[0].read and sorted(again[1].read) == list(range(46, 60))  # each resumed in its own range
    assert not list(tmp_path.glob("two.npy.p*"))
    assert path.read_bytes() == (tmp_path / "one.npy").read_bytes() and np.asarray(want).shape == (8, 60, 1, 1280)
    with pytest.raises(FileNotFoundError, match="shared"):
        views.stream_view_features(module, variables, src, SIZE, spec.normalization, tmp_path / "lone.npy",
                                   part=(1, 2), barrier=lambda: None, **kw)


def test_stream_key_changes_with_data_and_settings(setup):
    _, module, variables, spec = setup
    base = features.stream_key(module, variables, spec.normalization, "abc", SIZE, "dihedral", 0)
    assert base == features.stream_key(module, variables, spec.normalization, "abc", SIZE, "dihedral", 0)
    assert base != features.stream_key(module, variables, spec.normalization, "abd", SIZE, "dihedral", 0)
    assert base != features.stream_key(module, variables, spec.normalization, "abc", SIZE, "none", 0)


def test_transform_from_disk_equals_in_memory_transform(setup, tmp_path):
    """Standardisation + PCA fitted on sampled rows read from disk equal the in-memory fit on the same rows;
    the chunked 16-bit transform equals the float32 one within float16 rounding."""
    from leukax.train import recipe
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40, 5, 12)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    f = views.FeatureFile(tmp_path / "x.npy")
    train = np.array([0, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37])
    for max_rows in (50, 10_000):  # sampled rows, and all rows
        a = recipe.fit_transform(f, dim=4, max_rows=max_rows, seed=1, indices=train)
        b = recipe.fit_transform(x.astype(np.float32)[:, train], dim=4, max_rows=max_rows, seed=1)
        np.testing.assert_allclose(a.mean_c, b.mean_c, atol=1e-6)
        np.testing.assert_allclose(a.proj_cd, b.proj_cd, atol=1e-5)
    z = recipe.transform(a, f, train, chunk=5)  # chunks of 5, 5, 2 images written in place on the device
    assert z.dtype == np.float16 and z.shape == (3, 12, 5, 4)
    np.testing.assert_allclose(np.asarray(z, np.float32), a.apply(x[:, train]), rtol=2e-3, atol=2e-3)


def test_feature_file_reads_what_numpy_indexing_gives_without_mapping_the_file(tmp_path, monkeypatch):
    """`f[:, images]` and sampled rows `f[v_r, n_r, t_r]` are read with preadv into a new array (a memory map's
    touched and fault-around pages would count as resident memory): equal to indexing the array, bfloat16
    included, for unsorted, repeated, negative and run-forming indices and slices."""
    import ml_dtypes
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 17, 4, 6)).astype(ml_dtypes.bfloat16)
    np.save(tmp_path / "x.npy", x.view(np.uint16))
    f = views.FeatureFile(tmp_path / "x.npy", "bfloat16")
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("FeatureFile mapped the file"))
    for images in (np.array([5, 6, 7, 2, 2, 16, 0, 1]), np.array([-1, 3]), np.arange(17), np.array([], int)):
        got = f[:, images]
        assert got.dtype == x.dtype and got.shape == x[:, images].shape
        np.testing.assert_array_equal(got.view(np.uint16), x[:, images].view(np.uint16))
    np.testing.assert_array_equal(f[:, 3:11:2].view(np.uint16), x[:, 3:11:2].view(np.uint16))
    v_r, n_r, t_r = rng.integers(0, 3, 50), rng.integers(0, 17, 50), rng.integers(0, 4, 50)
    np.testing.assert_array_equal(f[v_r, n_r, t_r].view(np.uint16), x[v_r, n_r, t_r].view(np.uint16))
    with pytest.raises(IndexError):
        f[:, np.array([17])]
