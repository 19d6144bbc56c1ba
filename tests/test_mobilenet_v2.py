"""MobileNetV2 equals keras.applications.MobileNetV2 (random weights, legacy .h5 round trip)."""
import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from leukax.models import mobilenet_v2
from leukax.models.mobilenet_v2 import MobileNetV2, correct_pad, make_divisible
from leukax.weights import keras_h5

SIZE = 64


def randomize_bn(model, rng):
    """Random BN gamma/beta/moving stats so that inference BN is not the identity."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            ws = layer.get_weights()
            new = [rng.uniform(0.5, 1.5, w.shape) if n in ("gamma", "moving_variance")
                   else rng.normal(0.0, 0.1, w.shape)
                   for w, n in zip(ws, ("gamma", "beta", "moving_mean", "moving_variance")[-len(ws):])]
            layer.set_weights(new)


@pytest.fixture(scope="module")
def keras_and_h5(tmp_path_factory):
    model = keras.applications.MobileNetV2(include_top=False, weights=None,
                                           input_shape=(SIZE, SIZE, 3))
    rng = np.random.default_rng(0)
    randomize_bn(model, rng)
    path = tmp_path_factory.mktemp("mnv2") / "mnv2_keras3_legacy.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    x = rng.uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
    return model, path, x


@pytest.fixture(scope="module")
def variables(keras_and_h5):
    _, path, x = keras_and_h5
    shapes = jax.eval_shape(MobileNetV2().init, jax.random.key(0), x[:1])
    return keras_h5.load_into(shapes, path)


def test_helpers_match_keras():
    assert [make_divisible(32 * a) for a in (0.35, 0.5, 1.0, 1.4)] == [16, 16, 32, 48]
    assert correct_pad((224, 224)) == [(0, 1), (0, 1)]
    assert correct_pad((7, 7)) == [(1, 1), (1, 1)]


def test_spec_registered():
    spec = mobilenet_v2.SPECS["mobilenet_v2"]
    assert isinstance(spec.make(), MobileNetV2) and spec.name == "mobilenet_v2"
    assert (spec.input_size, spec.normalization, spec.keras_app) == (224, "tf", "MobileNetV2")


def test_variable_names_equal_keras_layers(keras_and_h5, variables):
    model, _, _ = keras_and_h5
    keras_weighted = {l.name for l in model.layers if l.weights}
    assert set(variables["params"]) == keras_weighted
    assert "block_1_pad" not in variables["params"]
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
    assert n_params == model.count_params() == 2257984


@pytest.mark.parametrize("impl", ["shift", "lax"])
def test_inference_equals_keras(keras_and_h5, variables, impl):
    model, _, x = keras_and_h5
    ref = np.asarray(model(x, training=False))
    fm, out = jax.jit(MobileNetV2(depthwise_impl=impl).apply)(variables, x)
    assert fm.shape == ref.shape == (4, 2, 2, 1280)
    assert np.abs(np.asarray(fm) - ref).max() <= 1e-4
    np.testing.assert_allclose(out["pre_logits"], ref.mean(axis=(1, 2)), atol=1e-4)


def test_pointwise_conv_impl_equal(keras_and_h5, variables):
    _, _, x = keras_and_h5
    a, _ = jax.jit(MobileNetV2(pointwise_impl="dot").apply)(variables, x)
    b, _ = jax.jit(MobileNetV2(pointwise_impl="conv").apply)(variables, x)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4


def test_train_mode_equals_keras(keras_and_h5, variables):
    """BN batch statistics: features and the updated moving means equal Keras' training=True."""
    model, _, x = keras_and_h5
    ref = np.asarray(model(x, training=True))  # Keras also updates its moving stats here
    fn = jax.jit(lambda v, x: MobileNetV2().apply(v, x, train=True, mutable=["batch_stats"]))
    (fm, _), updated = fn(variables, x)
    # Train-mode BN over few samples per channel (4x2x2 at the end) amplifies float noise.
    assert np.abs(np.asarray(fm) - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())
    for name in ("bn_Conv1", "block_8_expand_BN", "Conv_1_bn"):
        keras_mean = np.asarray(model.get_layer(name).moving_mean)
        np.testing.assert_allclose(updated["batch_stats"][name]["mean"], keras_mean, atol=1e-5)
