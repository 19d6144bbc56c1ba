"""Weight files that must be refused: a wrong hash, a truncated `.h5`, a shape mismatch, a pickle in a `.pth`
or an `.npz`, truncated archives. Each gives one WeightsError naming the file and the reason (no exception
chain), and the caller's variables are left exactly as they were (nothing partially loaded)."""
import copy
import hashlib
import os
import pickle
import zipfile

import flax.linen as nn
import jax
import numpy as np
import pytest

from leukax.weights import keras_h5, registry, torch_state
from leukax.weights.errors import WeightsError


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        x = nn.BatchNorm(use_running_average=True, name="stem_bn")(x)
        return nn.Conv(2, (1, 1), name="head_conv")(x)


def tiny():
    """Returns (variables as numpy, a different set of values with the same structure as an h5 dict)."""
    v = jax.tree.map(np.asarray, Tiny().init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32)))
    rng = np.random.default_rng(1)
    other = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), v)
    return v, keras_h5.to_h5_dict(other)


def one_clean_error(excinfo, path, *reason_parts):
    """The error is a WeightsError naming `path`, with every reason part, and no chained exception."""
    e = excinfo.value
    assert type(e) is WeightsError
    assert e.path == str(path) and str(e).startswith(f"{path}: ")
    for part in reason_parts:
        assert part in e.reason, (part, e.reason)
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


def assert_untouched(before, after):
    """Same structure, same values, and the very same leaf objects (not copies written back)."""
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_shape_mismatch_refused_and_nothing_loaded(tmp_path):
    variables, layers = tiny()
    snapshot = copy.deepcopy(variables)
    layers["head_conv"]["kernel"] = np.zeros((1, 1, 4, 3), np.float32)  # flax has 1×1×4×2
    path = tmp_path / "mismatch.h5"
    keras_h5.write_h5(path, layers)
    with pytest.raises(WeightsError) as e:
        keras_h5.load_into(variables, path)
    one_clean_error(e, path, "shape mismatches", "head_conv/kernel: file (1, 1, 4, 3)")
    # stem and stem_bn in the file were loadable and differ from `variables`: none of them got in
    assert_untouched(snapshot, variables)
    assert not np.array_equal(layers["stem"]["kernel"], variables["params"]["stem"]["kernel"])


def test_truncated_h5_refused(tmp_path):
    variables, layers = tiny()
    snapshot = copy.deepcopy(variables)
    path = tmp_path / "cut.h5"
    keras_h5.write_h5(path, layers)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as e:
        keras_h5.load_into(variables, path)
    one_clean_error(e, path, "truncated or corrupt")
    assert_untouched(snapshot, variables)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(WeightsError) as e:
        keras_h5.read_h5(tmp_path / "text.h5")
    one_clean_error(e, tmp_path / "text.h5", "unreadable HDF5")


def test_wrong_hash_refused(tmp_path, monkeypatch):
    payload = b"weights" * 100
    spec = registry.WeightSpec("t_file", "mobilenet_v2", None, "t_file.bin", hashlib.sha256(payload).hexdigest(),
                               "sha256", "keras-h5", "tf", 224)
    monkeypatch.setitem(registry.WEIGHTS, "t_file", spec)
    monkeypatch.setenv("LEUKAX_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "t_file.bin"
    path.write_bytes(payload[:-1] + b"X")
    with pytest.raises(WeightsError) as e:
        registry.get_weights("t_file", weights_dir=tmp_path, offline=True)
    one_clean_error(e, path, "wrong hash", spec.hash)


class Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_in_npz_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    evil = np.empty(1, object)
    evil[0] = Evil(marker)
    np.savez(path, **{"stem.weight": np.zeros((2, 2), np.float32), "payload": evil})
    with pytest.raises(WeightsError) as e:
        torch_state.read_state_dict(path)
    one_clean_error(e, path, "refused", "'payload'", "pickled object array")
    assert not marker.exists()
    bare = tmp_path / "bare.npz"  # a plain pickle renamed .npz
    bare.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(WeightsError) as e:
        torch_state.read_state_dict(bare)
    one_clean_error(e, bare, "refused", "pickled data")
    assert not marker.exists()


def test_pickle_in_pth_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(marker), protocol=2))
        z.writestr("archive/version", "3\n")
    with pytest.raises(WeightsError) as e:
        torch_state.read_state_dict(path)
    one_clean_error(e, path, "refused", "refusing to load global", "system")
    assert not marker.exists()


def test_truncated_archives_refused(tmp_path):
    np.savez(tmp_path / "ok.npz", a=np.arange(1000, dtype=np.float32))
    data = (tmp_path / "ok.npz").read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as e:
        torch_state.read_state_dict(cut)
    one_clean_error(e, cut, "truncated or corrupt")
    pth = tmp_path / "cut.pth"
    with zipfile.ZipFile(pth, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2)[:-3])  # pickle cut short
    with pytest.raises(WeightsError) as e:
        torch_state.read_state_dict(pth)
    one_clean_error(e, pth, "truncated or corrupt")


def test_pretrained_refuses_a_corrupt_file_instead_of_falling_back(tmp_path, monkeypatch):
    """A wrong-hash MobileNetV2 file in the weights folder stops `pretrained` with the refusal; it must not
    quietly fall back to another file or to the embedded copy."""
    from leukax.pretrained import pretrained
    monkeypatch.setenv("LEUKAX_CACHE_DIR", str(tmp_path / "cache"))
    spec = registry.WEIGHTS["mobilenet_v2_coral"]
    bad = tmp_path / spec.filename
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(WeightsError) as e:
        pretrained("mobilenet_v2", weights="imagenet", weights_dir=tmp_path, offline=True)
    one_clean_error(e, bad, "wrong hash", spec.hash)


def test_wrong_variant_npz_through_pretrained_names_the_file(tmp_path):
    """A state dict that does not fit the backbone (wrong variant or missing keys) is one WeightsError naming
    the file, from `pretrained` too."""
    from leukax.pretrained import pretrained
    from leukax.weights.errors import WeightsError
    bad = tmp_path / "not_lite0.npz"
    np.savez(bad, **{"stem.conv.weight": np.zeros((32, 3, 3, 3), np.float32)})
    with pytest.raises(WeightsError) as err:
        pretrained("efficientnet_lite0", weights=str(bad))
    assert str(bad) in str(err.value) and "efficientnet_lite0" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
