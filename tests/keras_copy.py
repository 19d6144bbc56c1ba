"""Test helper: a Keras model's weights as the {layer: {weight: array}} dict that keras_h5.load_into takes."""
import numpy as np


def randomize_keras(model, seed: int = 0) -> None:
    """Gives every weight random values (BN: gamma/beta ~ N, mean ~ N·0.5, var ~ U(0.5, 1.5))."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        short = w.path.split("/")[-1]
        shape = tuple(w.shape)
        if short == "moving_variance":
            v = rng.uniform(0.5, 1.5, shape)
        elif short in ("gamma",):
            v = rng.uniform(0.5, 1.5, shape)
        elif short in ("beta", "moving_mean", "bias"):
            v = rng.normal(0, 0.5, shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if short != "depthwise_kernel" else int(np.prod(shape[:2]))
            v = rng.normal(0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
        w.assign(v.astype(np.float32))


def keras_weights_dict(model) -> dict:
    """Returns {layer name: {short weight name: np.ndarray}} for layers with weights."""
    return {layer.name: {w.path.split("/")[-1]: np.asarray(w) for w in layer.weights}
            for layer in model.layers if layer.weights}
