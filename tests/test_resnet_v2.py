import jax
import numpy as np
import pytest

from leukax.models import resnet_v2
from leukax.weights import keras_h5

from keras_copy import keras_weights_dict, randomize_keras

SIZE = 64


@pytest.fixture(scope="module")
def pair():
    keras = pytest.importorskip("keras")
    km = keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    randomize_keras(km, seed=1)
    spec = resnet_v2.SPECS["resnet50_v2"]
    module = spec.make()
    x = np.random.default_rng(2).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    v = jax.jit(module.init)(jax.random.key(0), x[:1])
    v = keras_h5.load_into(v, keras_weights_dict(km))
    return km, module, v, x


def test_spec():
    spec = resnet_v2.SPECS["resnet50_v2"]
    assert spec.input_size == 224 and spec.normalization == "tf" and spec.keras_app == "ResNet50V2"


def test_inference_equals_keras(pair):
    km, module, v, x = pair
    fm, out = jax.jit(module.apply)(v, x)
    ref = np.asarray(km(x, training=False))
    assert fm.shape == ref.shape == (2, 2, 2, 2048)
    np.testing.assert_allclose(fm, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["pre_logits"], ref.mean(axis=(1, 2)), atol=1e-4, rtol=1e-4)


def test_train_mode_equals_keras(pair):
    km, module, v, x = pair
    (fm, _), upd = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    ref = np.asarray(km(x, training=True))   # also updates Keras' moving statistics
    # 50 batch-statistics BNs (the last over 2·2·2 values) amplify float rounding: max diff 2.1e-4 of |ref| <= 4.6.
    np.testing.assert_allclose(fm, ref, atol=3e-4, rtol=1e-4)
    kd = keras_weights_dict(km)
    for layer in ("conv2_block1_preact_bn", "conv4_block3_2_bn", "post_bn"):
        np.testing.assert_allclose(upd["batch_stats"][layer]["mean"], kd[layer]["moving_mean"], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(upd["batch_stats"][layer]["var"], kd[layer]["moving_variance"], atol=1e-4, rtol=1e-4)
