"""MobileNetV3 Large/Small equal Keras (include_top=False) with random weights and random BN statistics."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import functools  # noqa: E402

import jax  # noqa: E402
import keras_reference as kr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from leukax.models import mobilenet_v3 as mv3  # noqa: E402

SIZE = 32
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def keras_model(kind: str):
    """Returns (Keras MobileNetV3{kind} no-top at SIZE px with random weights, {layer: {weight: array}})."""
    import keras
    with kr.numpy_initializers():
        model = getattr(keras.applications, f"MobileNetV3{kind}")(
            include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    return model, kr.randomize(model, seed=len(kind))


@pytest.mark.parametrize("kind", ["Large", "Small"])
def test_equals_keras_inference(kind):
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    model, kdict = keras_model(kind)
    want, _ = kr.keras_forward(model, images, training=False)
    module = mv3.SPECS[f"mobilenet_v3_{kind.lower()}"].make()
    variables = kr.flax_variables(module, {mv3.keras_name_to_flax(k): v for k, v in kdict.items()}, images)
    got, out = jax.jit(module.apply)(variables, images)
    assert got.shape == want.shape == (2, 1, 1, 960 if kind == "Large" else 576)
    assert np.abs(np.asarray(got) - want).max() <= TOL, np.abs(want).max()
    np.testing.assert_allclose(out["pre_logits"], want.mean(axis=(1, 2)), atol=TOL)


def test_large_train_mode_equals_keras():
    """Train mode: batch statistics and moving-average updates (momentum 0.999) as Keras."""
    images = np.random.default_rng(1).uniform(0, 255, (8, SIZE, SIZE, 3)).astype(np.float32)
    model, kdict = keras_model("Large")
    want, new_stats = kr.keras_forward(model, images, training=True)
    module = mv3.mobilenet_v3_large()
    variables = kr.flax_variables(module, kdict, images)
    (got, _), mutated = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images)
    assert np.abs(np.asarray(got) - want).max() <= TOL, np.abs(want).max()
    for name, stats in mutated["batch_stats"].items():
        np.testing.assert_allclose(stats["mean"], new_stats[f"{name}/moving_mean"], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(stats["var"], new_stats[f"{name}/moving_variance"], rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_keras_name_to_flax():
    assert mv3.keras_name_to_flax("expanded_conv_3_squeeze_excite_conv_1") == "expanded_conv_3_squeeze_excite_conv_1"
    assert mv3.keras_name_to_flax("expanded_conv/depthwise") == "expanded_conv__depthwise"
    assert mv3.make_divisible(16 * 4) == 64 and mv3.make_divisible(80 * 2.3) == 184
