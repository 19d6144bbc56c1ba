"""EfficientNet B0–B7 equal Keras (random weights, random BN statistics); Lite structure and drop-connect."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras_reference as kr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from leukax.models import efficientnet as en  # noqa: E402

SIZE = 32
TOL = 1e-4
# B0 (no scaling) and B2 (width 1.1, depth 1.2: both roundings) always; the rest with LEUKAX_ALL_BACKBONES=1.


@functools.lru_cache(maxsize=None)
def keras_model(variant: str):
    """Returns (Keras EfficientNetB* no-top at SIZE px with random weights, {layer: {weight: array}})."""
    import keras
    with kr.numpy_initializers():
        model = getattr(keras.applications, f"EfficientNet{variant.upper()}")(
            include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    kdict = kr.randomize(model, seed=sorted(en.B_VARIANTS).index(variant), skip=(keras.layers.Normalization,))
    norm = next(l for l in model.layers if isinstance(l, keras.layers.Normalization))
    norm.adapt_mean.assign(np.asarray(en.IMAGENET_MEAN_RGB, np.float32))  # what the flax module hard-codes
    norm.adapt_variance.assign(np.asarray(en.IMAGENET_STD_RGB, np.float32) ** 2)
    norm.finalize_state()
    return model, kdict


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("variant", list(en.B_VARIANTS))
def test_b_variant_equals_keras_inference(variant, images):
    model, kdict = keras_model(variant)
    want, _ = kr.keras_forward(model, images, training=False)
    module = en.efficientnet(variant)
    variables = kr.flax_variables(module, kdict, images)
    got, out = jax.jit(module.apply)(variables, images)
    assert got.shape == want.shape
    assert np.abs(np.asarray(got) - want).max() <= TOL, (variant, np.abs(want).max())
    np.testing.assert_allclose(out["pre_logits"], want.mean(axis=(1, 2)), atol=TOL)


def test_b0_train_mode_equals_keras():
    """Train mode: batch statistics used and moving averages updated as Keras (drop-connect off in both).

    Batch 8: with 2 images the last BN layers normalise over 2 values (1×1 maps), which amplifies
    float rounding far past the tolerance.
    """
    import keras
    images = np.random.default_rng(1).uniform(0, 255, (8, SIZE, SIZE, 3)).astype(np.float32)
    model, kdict = keras_model("b0")
    rates = {l.name: l.rate for l in model.layers if isinstance(l, keras.layers.Dropout)}
    for name in rates:
        model.get_layer(name).rate = 0.0
    try:
        want, new_stats = kr.keras_forward(model, images, training=True)
    finally:
        for name, rate in rates.items():
            model.get_layer(name).rate = rate
    module = en.efficientnet("b0", drop_connect_rate=0.0)
    variables = kr.flax_variables(module, kdict, images)
    (got, _), mutated = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images)
    assert np.abs(np.asarray(got) - want).max() <= TOL, np.abs(want).max()
    for name, stats in mutated["batch_stats"].items():
        np.testing.assert_allclose(stats["mean"], new_stats[f"{name}/moving_mean"], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(stats["var"], new_stats[f"{name}/moving_variance"], rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_drop_connect_train_only(images):
    """Drop-connect draws from the "dropout" rng in train mode only (Keras' per-sample residual Dropout)."""
    module = en.efficientnet("b0")
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), images))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32) + (
        1.0 if s.shape and s.shape[-1] == s.size and s.size > 1 else 0.0), shapes)  # vectors ~1 (BN var/scale)
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])

    train_fn = jax.jit(lambda key: module.apply(variables, images, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": key})[0][0])
    infer_fn = jax.jit(lambda key: module.apply(variables, images, rngs={"dropout": key})[0])
    t1, t1b, t2 = train_fn(jax.random.key(1)), train_fn(jax.random.key(1)), train_fn(jax.random.key(2))
    np.testing.assert_array_equal(t1, t1b)
    assert np.abs(np.asarray(t1) - np.asarray(t2)).max() > 1e-3
    np.testing.assert_array_equal(infer_fn(jax.random.key(1)), infer_fn(jax.random.key(2)))
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda: module.apply(variables, images, train=True, mutable=["batch_stats"]))


@pytest.mark.parametrize("variant,blocks,width_last", [
    ("lite0", 16, 320), ("lite1", 21, 320), ("lite2", 21, 352), ("lite3", 24, 384), ("lite4", 30, 448)])
def test_lite_structure(variant, blocks, width_last):
    """Lite: no SE, stem 32 and head 1280 fixed, first/last stage repeats fixed (Lite0/2 match the .npz)."""
    module = en.efficientnet(variant)
    x = jnp.zeros((1, 64, 64, 3))
    (fmap, out), shapes = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), x))
    params = shapes["params"]
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
    assert params["top_conv"]["kernel"].shape[-1] == 1280
    assert not any("se_" in k for k in params)
    assert sum(k.endswith("_project_conv") for k in params) == blocks
    assert params["top_conv"]["kernel"].shape[-2] == width_last
    assert fmap.shape == (1, 2, 2, 1280) and out["pre_logits"].shape == (1, 1280)


def test_specs_registered():
    for v, (_, _, size, _) in en.B_VARIANTS.items():
        spec = en.SPECS[f"efficientnet_{v}"]
        assert spec.input_size == size and spec.normalization == "raw"
    for v, (_, _, size) in en.LITE_VARIANTS.items():
        spec = en.SPECS[f"efficientnet_{v}"]
        assert spec.input_size == size and spec.normalization == "lite"
    module = en.SPECS["efficientnet_b3"].make(depthwise_impl="lax")
    assert module.depthwise_impl == "lax" and module.width == 1.2
