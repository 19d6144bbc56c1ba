"""Legacy Keras .h5 reader/loader, the shared MobileNetV2 weights and the embedded float16 copy."""
import hashlib
import json

import h5py
import jax
import keras
import numpy as np
import pytest
from PIL import Image

from leukax.models.mobilenet_v2 import MobileNetV2
from leukax.pretrained import load_embedded_mobilenet_v2
from leukax.weights import embedded, keras_h5

MNV2_H5 = "mobilenet_v2_1.0_224_no_top.coral_qat_dequant.h5"




def tiny_variables():
    import flax.linen as nn

    from leukax.models.layers import DepthwiseConv2D

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(4, (3, 3), name="stem")(x)
            x = nn.BatchNorm(use_running_average=not train, name="stem_bn")(x)
            return DepthwiseConv2D((3, 3), name="dw_depthwise")(x)

    return Net, Net().init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))


def test_roundtrip_write_read_load(tmp_path):
    net, variables = tiny_variables()
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda v: rng.normal(size=v.shape).astype(np.float32), variables)
    layers = keras_h5.to_h5_dict(variables)
    assert layers["dw_depthwise"]["depthwise_kernel"].shape == (3, 3, 4, 1)
    assert set(layers["stem_bn"]) == {"gamma", "beta", "moving_mean", "moving_variance"}
    path = tmp_path / "tiny.h5"
    keras_h5.write_h5(path, layers, ["input_layer", "stem", "stem_bn", "relu", "dw_depthwise"])
    with h5py.File(path) as f:
        assert f["stem"].attrs["weight_names"][0] == b"stem/kernel:0"
        assert "stem/kernel:0" in f["stem"]
    back = keras_h5.read_h5(path)
    assert list(back) == ["stem", "stem_bn", "dw_depthwise"]  # weightless layers left out
    zeros = jax.tree.map(np.zeros_like, variables)
    loaded = keras_h5.load_into(zeros, path)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    # Under a prefix, as in Classifier(backbone=..., head=...).
    wrapped = {c: {"backbone": t} for c, t in zeros.items()}
    loaded = keras_h5.load_into(wrapped, back, prefix=("backbone",))
    np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["stem_bn"]["var"],
                                  variables["batch_stats"]["stem_bn"]["var"])


def test_load_errors_name_file_and_layers(tmp_path):
    _, variables = tiny_variables()
    layers = keras_h5.to_h5_dict(jax.tree.map(np.asarray, variables))
    path = tmp_path / "bad.h5"
    bad = dict(layers)
    bad.pop("stem_bn")
    bad["extra_dense"] = {"kernel": np.zeros((2, 2), np.float32)}
    bad["stem"] = {"kernel": np.zeros((3, 3, 3, 5), np.float32)}
    keras_h5.write_h5(path, bad)
    with pytest.raises(ValueError) as e:
        keras_h5.load_into(variables, path)
    msg = str(e.value)
    assert str(path) in msg and "extra_dense" in msg and "params/stem_bn/scale" in msg
    assert "batch_stats/stem_bn/mean" in msg and "stem/kernel: file (3, 3, 3, 5)" in msg
    with h5py.File(tmp_path / "new.weights.h5", "w") as f:
        f.create_group("layers")
    with pytest.raises(ValueError, match="no 'layer_names'"):
        keras_h5.read_h5(tmp_path / "new.weights.h5")


@pytest.fixture(scope="module")
def mnv2_shared(shared_dir, cnmc_sample_dir):
    path = shared_dir / "weights" / MNV2_H5
    img_path = sorted((cnmc_sample_dir / "images").glob("*.png"))[0]
    img = Image.open(img_path).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = np.asarray(img, np.float32)[None] / 127.5 - 1.0
    return path, x


@pytest.fixture(scope="module")
def mnv2_apply():
    return jax.jit(MobileNetV2().apply)


def test_shared_mobilenet_v2_file(shared_dir, mnv2_shared, mnv2_apply):
    """sha256 and structure; leukax features equal Keras' own loader on a real image."""
    path, x = mnv2_shared
    manifest = json.loads((shared_dir / "weights" / "manifest.json").read_text())["files"][MNV2_H5]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["sha256"]
    layers = keras_h5.read_h5(path)
    assert len(layers) == 104
    assert sum(v.size for w in layers.values() for v in w.values()) == 2257984
    variables = keras_h5.load_into(
        jax.eval_shape(MobileNetV2().init, jax.random.key(0), x), path)
    fm, out = mnv2_apply(variables, x)
    kmodel = keras.applications.MobileNetV2(include_top=False, weights=str(path), alpha=1.0,
                                            input_shape=(224, 224, 3))
    ref = np.asarray(kmodel(x, training=False))
    diff = np.abs(np.asarray(fm) - ref).max()
    print(f"mobilenet_v2 shared weights: max|diff| fm={diff:.2e} (max|fm|={np.abs(ref).max():.2f})")
    assert fm.shape == (1, 7, 7, 1280) and diff <= 1e-4


def test_embedded_f16_matches_full_precision(mnv2_shared, mnv2_apply):
    path, x = mnv2_shared
    assert embedded.MOBILENET_V2_NPZ.stat().st_size < 5e6
    assert (embedded.EMBEDDED_DIR / "NOTICE").is_file()
    v16 = load_embedded_mobilenet_v2()
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(v16))
    v32 = keras_h5.load_into(jax.tree.map(np.zeros_like, v16), path)
    f16 = np.asarray(mnv2_apply(v16, x)[1]["pre_logits"])[0]
    f32 = np.asarray(mnv2_apply(v32, x)[1]["pre_logits"])[0]
    cos = float(f16 @ f32 / np.linalg.norm(f16) / np.linalg.norm(f32))
    rel = float(np.abs(f16 - f32).max() / np.abs(f32).max())
    print(f"embedded f16 vs f32 MobileNetV2 features: cosine={cos:.6f} max rel diff={rel:.2e}")
    assert cos > 0.9999 and rel < 1e-2
