"""InceptionV3 equals keras.applications.InceptionV3 (random weights at 75 px; shared 2015 weights at 299)."""
import hashlib
import json
import re

import jax
import keras
import numpy as np
import pytest
from PIL import Image

from leukax.models import inception_v3
from leukax.models.inception_v3 import InceptionV3
from leukax.weights import keras_h5

SIZE = 75  # Keras' minimum
SHARED_H5 = "inception_v3_no_top.tf2015_fid_maxpool_mixed10.h5"


def fresh_process_names(model) -> dict:
    """Maps this model's auto-names to those of a first-built model (conv2d_95 -> conv2d_1, ...)."""
    out = {}
    for base in ("conv2d", "batch_normalization"):
        layers = [l.name for l in model.layers if re.fullmatch(rf"{base}(_\d+)?", l.name)]
        idx = [int(n.rsplit("_", 1)[1]) if n != base else 0 for n in layers]
        out.update({n: inception_v3.keras_name(base, i - min(idx)) for n, i in zip(layers, idx)})
    return out


def tf2015_keras(input_shape):
    """Keras InceptionV3 with mixed10's branch pool a 3x3/1 max pool (shared README recipe)."""
    base = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=input_shape)
    last = [l for l in base.layers if isinstance(l, keras.layers.AveragePooling2D)][-1].name
    return keras.models.clone_model(base, clone_function=lambda l: keras.layers.MaxPooling2D(
        (3, 3), strides=1, padding="same", name=l.name) if l.name == last
        else l.__class__.from_config(l.get_config()))


@pytest.fixture(scope="module")
def keras_and_h5(tmp_path_factory):
    model = keras.applications.InceptionV3(include_top=False, weights=None,
                                           input_shape=(SIZE, SIZE, 3))
    rng = np.random.default_rng(0)
    layers = {}
    names = fresh_process_names(model)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            beta, mean, var = (w for w in layer.get_weights())
            layer.set_weights([rng.normal(0, 0.1, beta.shape), rng.normal(0, 0.1, mean.shape),
                               rng.uniform(0.5, 1.5, var.shape)])
        if layer.weights:
            short = ("beta", "moving_mean", "moving_variance") if isinstance(
                layer, keras.layers.BatchNormalization) else ("kernel",)
            layers[names[layer.name]] = dict(zip(short, (np.asarray(w) for w in layer.weights)))
    path = tmp_path_factory.mktemp("inc") / "inception_v3_legacy.h5"
    keras_h5.write_h5(path, layers, [names.get(l.name, l.name) for l in model.layers])
    x = rng.uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)
    return model, path, x


def test_specs():
    assert inception_v3.SPECS["inception_v3"].make().mixed10_pool == "avg"
    assert inception_v3.SPECS["inception_v3_tf2015"].make().mixed10_pool == "max"
    assert inception_v3.SPECS["inception_v3"].input_size == 299


def test_inference_and_train_equal_keras(keras_and_h5):
    model, path, x = keras_and_h5
    shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0), x[:1])
    assert len(shapes["params"]) == 188
    variables = keras_h5.load_into(shapes, path)
    fm, out = jax.jit(InceptionV3().apply)(variables, x)
    ref = np.asarray(model(x, training=False))
    assert fm.shape == ref.shape == (8, 1, 1, 2048)
    assert np.abs(np.asarray(fm) - ref).max() <= 1e-4
    ref_t = np.asarray(model(x, training=True))
    (fm_t, _), _ = jax.jit(lambda v, x: InceptionV3().apply(v, x, train=True,
                                                            mutable=["batch_stats"]))(variables, x)
    # Train-mode BN over only 8 samples per channel at 1x1 in mixed9/10 amplifies float noise.
    diff = np.abs(np.asarray(fm_t) - ref_t).max()
    print(f"inception_v3 train-mode max abs diff {diff:.2e}")
    assert diff <= 1e-2


def test_shared_tf2015_weights_equal_keras(shared_dir, cnmc_sample_dir):
    """Offline 2015 weights: leukax (by name) vs Keras max-pool clone (by topology) on a real image."""
    wdir = shared_dir / "weights"
    path = wdir / SHARED_H5
    manifest = json.loads((wdir / "manifest.json").read_text())["files"][SHARED_H5]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["sha256"]
    img_path = sorted((cnmc_sample_dir / "images").glob("*.png"))[0]
    img = Image.open(img_path).convert("RGB").resize((299, 299), Image.BICUBIC)
    x = (np.asarray(img, np.float32)[None] / 127.5 - 1.0)

    model = InceptionV3(mixed10_pool="max")
    variables = keras_h5.load_into(jax.eval_shape(model.init, jax.random.key(0), x), path)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
    assert n == 21802784
    _, out = jax.jit(model.apply)(variables, x)

    kmodel = tf2015_keras((299, 299, 3))
    kmodel.load_weights(str(path))  # by topology
    ref = np.asarray(kmodel(x, training=False)).mean(axis=(1, 2))
    feats = np.asarray(out["pre_logits"])
    cos = float((feats * ref).sum() / np.linalg.norm(feats) / np.linalg.norm(ref))
    print(f"inception_v3_tf2015 shared weights: max|diff|={np.abs(feats - ref).max():.2e} "
          f"max|f|={np.abs(ref).max():.2f} cos={cos:.7f}")
    assert np.abs(feats - ref).max() <= 1e-4 and cos > 0.999999
