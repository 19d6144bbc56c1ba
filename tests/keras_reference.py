"""Helpers for Flax-vs-Keras equality tests: random Keras weights, one jitted Keras call, flax variables.

Keras-on-JAX runs initialisers and eager layers op by op, compiling each op shape (minutes for a big net on
2 busy cores), so models are built with numpy zero/one initialisers, every weight is then set from numpy,
and the Keras forward pass is one `jax.jit` of `stateless_call`.
"""
import contextlib
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from leukax.weights import keras_h5  # noqa: E402


@contextlib.contextmanager
def numpy_initializers():
    """Within the block Keras' VarianceScaling/Zeros/Ones initialisers return numpy zeros/ones.

    Every weight is overwritten by `randomize` right after the build; this only skips compiling one
    random/fill op per weight shape (most of the build time of a Keras-on-JAX application model).
    """
    from keras.src.initializers import constant_initializers as ci
    from keras.src.initializers import random_initializers as ri

    def fill(value):
        return lambda self, shape, dtype=None: np.full(shape, value, dtype=dtype or "float32")

    patched = {(ri.VarianceScaling, "__call__"): fill(0.0), (ci.Zeros, "__call__"): fill(0.0),
               (ci.Ones, "__call__"): fill(1.0)}
    old = {k: k[0].__dict__[k[1]] for k in patched}
    for (cls, attr), fn in patched.items():
        setattr(cls, attr, fn)
    try:
        yield
    finally:
        for (cls, attr), fn in old.items():
            setattr(cls, attr, fn)


def randomize(model, seed: int, skip=()) -> dict:
    """Sets every weight of a Keras model from numpy (He-normal kernels, random BN moving stats).

    Returns {layer name: {weight name: array}} for `keras_h5.load_into`, without the `skip` layer types.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        ws = {}
        for w in layer.weights:
            name = w.path.split("/")[-1]
            shape = tuple(w.shape)
            if name == "kernel":
                v = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
            elif name == "depthwise_kernel":
                v = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:2])), shape)
            elif name in ("gamma", "moving_variance"):
                v = rng.uniform(0.5, 1.5, shape)
            elif name in ("beta", "moving_mean", "bias"):
                v = rng.normal(0.0, 0.2, shape)
            else:
                continue
            v = v.astype(np.float32)
            w.assign(v)
            ws[name] = v
        if ws and not isinstance(layer, skip):
            out[layer.name] = ws
    return out


def keras_forward(model, x, training: bool):
    """Returns (output array, {non-trainable variable path: new value}) of one jitted Keras call."""
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    fn = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=training))
    y, new_ntv = fn(tv, ntv, x)
    return np.asarray(y), {v.path: np.asarray(n) for v, n in zip(model.non_trainable_variables, new_ntv)}


def flax_variables(module, keras_dict, x):
    """Returns the module's variables filled from {layer: {weight: array}} (shapes from `eval_shape`)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    return keras_h5.load_into(shapes, keras_dict)
