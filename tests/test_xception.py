import jax
import numpy as np
import pytest

from leukax.models import xception
from leukax.pretrained import load_xception_keras_weights

from keras_copy import keras_weights_dict, randomize_keras

SIZE = 71


@pytest.fixture(scope="module")
def pair():
    keras = pytest.importorskip("keras")
    km = keras.applications.Xception(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    randomize_keras(km, seed=3)
    module = xception.SPECS["xception"].make()
    x = np.random.default_rng(4).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    v = jax.jit(module.init)(jax.random.key(0), x[:1])
    v = load_xception_keras_weights(v, keras_weights_dict(km))
    return km, module, v, x


def test_rename_auto_layers_keras2_and_shifted_names():
    h5 = {"block1_conv1": 0, "conv2d_7": 1, "conv2d_5": 2, "batch_normalization_1": 3, "batch_normalization_2": 4,
          "conv2d_10": 5, "conv2d_6": 6, "batch_normalization_3": 7, "batch_normalization_4": 8}
    out = xception.rename_auto_layers(h5)
    assert out == {"block1_conv1": 0, "conv2d": 2, "conv2d_1": 6, "conv2d_2": 1, "conv2d_3": 5,
                   "batch_normalization": 3, "batch_normalization_1": 4, "batch_normalization_2": 7,
                   "batch_normalization_3": 8}


def test_inference_equals_keras(pair):
    km, module, v, x = pair
    sep = v["params"]["block2_sepconv1"]
    assert sep["kernel"].shape == (3, 3, 1, 64) and sep["pointwise_kernel"].shape == (1, 1, 64, 128)
    np.testing.assert_array_equal(sep["pointwise_kernel"], np.asarray(km.get_layer("block2_sepconv1").pointwise_kernel))
    fm, out = jax.jit(module.apply)(v, x)
    ref = np.asarray(km(x, training=False))
    assert fm.shape == ref.shape == (2, 3, 3, 2048)
    np.testing.assert_allclose(fm, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["pre_logits"], ref.mean(axis=(1, 2)), atol=1e-4, rtol=1e-4)


def test_train_mode_equals_keras(pair):
    km, module, v, x = pair
    (fm, _), upd = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    ref = np.asarray(km(x, training=True))
    np.testing.assert_allclose(fm, ref, atol=3e-4, rtol=1e-4)
    kd = xception.rename_auto_layers(keras_weights_dict(km))
    for layer in ("block1_conv1_bn", "batch_normalization_2", "block14_sepconv2_bn"):
        np.testing.assert_allclose(upd["batch_stats"][layer]["mean"], kd[layer]["moving_mean"], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(upd["batch_stats"][layer]["var"], kd[layer]["moving_variance"], atol=1e-4, rtol=1e-4)
