"""Torch state dicts without torch: hand-written `.pth` zips read back, malicious pickles refused."""
import collections
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from leukax.pretrained import efficientnet_lite_variables
from leukax.weights import torch_state
from leukax.weights.errors import WeightsError


class _Storage:
    def __init__(self, array):
        self.array = array


def _fake_torch(monkeypatch):
    """Installs stand-in `torch` / `torch._utils` modules so `pickle` writes the globals torch writes."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("writer-side stand-in; never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage", "HalfStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch, utils


class _Tensor:
    """Pickles like a torch tensor: _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
    utils = None

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (self.utils._rebuild_tensor_v2, self.args)


def write_pth(path, tensors, monkeypatch):
    """Writes {key: (storage array, offset, size, stride)} as a torch zip `.pth` (archive/data.pkl + data/N)."""
    torch, utils = _fake_torch(monkeypatch)
    _Tensor.utils = utils
    storages, obj = {}, collections.OrderedDict()
    for key, (storage, offset, size, stride) in tensors.items():
        sid = id(storage)
        storages.setdefault(sid, (str(len(storages)), storage))
        obj[key] = _Tensor(_Storage(storage), offset, size, stride)
        obj[key].args[0].sid = sid
    types_ = {np.dtype(np.float32): torch.FloatStorage, np.dtype(np.int64): torch.LongStorage,
              np.dtype(np.float16): torch.HalfStorage}

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                name, arr = storages[o.sid]
                return ("storage", types_[arr.dtype], name, "cpu", arr.size)
            return None

    import io
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for name, arr in storages.values():
            z.writestr(f"archive/data/{name}", arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def test_pth_roundtrip_with_views(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    w = rng.normal(size=12).astype(np.float32)
    counter = np.array([7], np.int64)
    half = rng.normal(size=6).astype(np.float16)
    path = tmp_path / "m.pth"
    write_pth(path, {
        "conv.weight": (w, 0, (3, 4), (4, 1)),
        "conv.weight_t": (w, 0, (4, 3), (1, 4)),      # transposed view of the same storage
        "tail": (w, 8, (2, 2), (2, 1)),               # offset into a shared storage
        "bn.num_batches_tracked": (counter, 0, (), ()),
        "h": (half, 0, (2, 3), (3, 1)),
    }, monkeypatch)
    monkeypatch.delitem(sys.modules, "torch")  # the reader must not need torch
    monkeypatch.delitem(sys.modules, "torch._utils")
    sd = torch_state.read_state_dict(path)
    assert list(sd) == ["conv.weight", "conv.weight_t", "tail", "bn.num_batches_tracked", "h"]
    np.testing.assert_array_equal(sd["conv.weight"], w.reshape(3, 4))
    np.testing.assert_array_equal(sd["conv.weight_t"], w.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["tail"], w[8:].reshape(2, 2))
    assert sd["bn.num_batches_tracked"].shape == () and sd["bn.num_batches_tracked"] == 7
    assert sd["h"].dtype == np.float16
    np.testing.assert_array_equal(sd["h"], half.reshape(2, 3))


MALICIOUS = {
    "os.system": b"cos\nsystem\n(S'touch {marker}'\ntR.",
    "builtins.eval": b"c__builtin__\neval\n(S'open(\"{marker}\", \"w\").close()'\ntR.",
    "builtins.exec (protocol 2 name)": b"\x80\x02cbuiltins\nexec\n(S'open(\"{marker}\", \"w\").close()'\ntR.",
    "subprocess.call": b"csubprocess\ncall\n((S'touch'\nS'{marker}'\nltR.",
    "posix.system": b"cposix\nsystem\n(S'touch {marker}'\ntR.",
}


@pytest.mark.parametrize("kind", list(MALICIOUS))
def test_malicious_pth_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", MALICIOUS[kind].replace(b"{marker}", str(marker).encode()))
        z.writestr("archive/version", "3\n")
    with pytest.raises(WeightsError, match=r"evil\.pth: refused: refusing to load global"):
        torch_state.read_state_dict(path)
    assert not marker.exists()


def test_malicious_global_inside_a_valid_state_dict(tmp_path, monkeypatch):
    """A refused global deep inside an otherwise valid dict still stops the whole load."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "mixed.pth"
    write_pth(path, {"a": (np.zeros(2, np.float32), 0, (2,), (1,))}, monkeypatch)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    payload = pickle.dumps(collections.OrderedDict(b=Evil()), protocol=2)
    files["archive/data.pkl"] = payload
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    with pytest.raises(WeightsError, match="mixed.pth: refused: .*system"):
        torch_state.read_state_dict(path)
    assert not marker.exists()


def test_not_a_zip_and_npz(tmp_path):
    legacy = tmp_path / "old.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="old.pth: not a zip-format torch file"):
        torch_state.read_state_dict(legacy)
    arrays = {"x.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64)}
    np.savez(tmp_path / "sd.npz", **arrays)
    sd = torch_state.read_state_dict(tmp_path / "sd.npz")
    assert list(sd) == ["x.weight", "n"]
    np.testing.assert_array_equal(sd["x.weight"], arrays["x.weight"])


# ImageNet indices: 282 tiger cat, 285 Egyptian cat, 967 espresso. Numbers from shared/weights/README.md.
LITE_PHOTOS = {
    "lite0": (224, {"chelsea": {285: 0.39, 282: 0.33}, "coffee": {967: 0.94}}),
    "lite2": (260, {"chelsea": {285: 0.60}, "coffee": {967: 0.90}}),
}


def _center_crop_resize(img_hwc: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    h, w = img_hwc.shape[:2]
    s = min(h, w)
    img = img_hwc[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), np.float32)


@pytest.mark.parametrize("variant", list(LITE_PHOTOS))
def test_shared_lite_weights_classify_photos(variant, shared_dir):
    """The shared ImageNet EfficientNet-Lite weights, mapped onto our module, reproduce the manifest's numbers."""
    import hashlib
    import json

    import jax

    from leukax.models import efficientnet as en

    skimage_data = pytest.importorskip("skimage.data")
    path = shared_dir / "weights" / f"efficientnet_{variant}.npz"
    manifest = json.loads((shared_dir / "weights" / "manifest.json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["files"][path.name]["sha256"]
    sd = torch_state.read_state_dict(path)
    variables = efficientnet_lite_variables(sd, variant, include_top=True)
    size, expected = LITE_PHOTOS[variant]
    photos = {"chelsea": skimage_data.chelsea(), "coffee": skimage_data.coffee()}
    x = np.stack([_center_crop_resize(photos[k], size) for k in expected])
    x = (x - 127.0) / 128.0  # "lite" normalisation
    module = en.efficientnet(variant, num_classes=1000)
    fmap, out = jax.jit(module.apply)(variables, x)
    assert fmap.shape == (2, size // 32 + (size % 32 > 0), size // 32 + (size % 32 > 0), 1280)
    probs = np.asarray(jax.nn.softmax(out["logits"]))
    for i, (photo, classes) in enumerate(expected.items()):
        assert int(np.argmax(probs[i])) == next(iter(classes)), photo
        for cls, p in classes.items():
            assert abs(probs[i, cls] - p) < 0.01, (variant, photo, cls, probs[i, cls])
    with pytest.raises(ValueError, match="state dict lacks|keys not mapped"):
        efficientnet_lite_variables(sd, "lite1" if variant == "lite0" else "lite0")
