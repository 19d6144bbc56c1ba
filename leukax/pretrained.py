"""Backbones with weights: the one layer that knows both `leukax.models` and `leukax.weights`.

`leukax.models` builds networks and never reads a file; `leukax.weights` reads files (legacy Keras `.h5`,
torch state dicts, the embedded `.npz`, the registry of official files) and never builds a network. This
module joins them: `pretrained(name, weights=...)` builds backbone `name` (or a `Classifier` with a head),
finds its weights file through the registry and maps the file's arrays onto the Flax variables with the
model-specific mappings kept here:
- Keras `.h5` → any Keras-named backbone (`keras_h5.load_into`), Xception's separable pointwise kernels
  (`load_xception_keras_weights`), Keras 2 auto-named layers renumbered (`xception.rename_auto_layers`);
- torch EfficientNet-Lite state dicts (lukemelas keys) → `EfficientNet(lite=True)`
  (`efficientnet_lite_variables`);
- the float16 MobileNetV2 copy shipped in the package → `MobileNetV2` (`load_embedded_mobilenet_v2`).
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from leukax.models import classifier, heads, xception
from leukax.models import efficientnet as en
from leukax.models import registry as model_registry
from leukax.models.mobilenet_v2 import MobileNetV2
from leukax.weights import embedded, keras_h5
from leukax.weights import registry as weights_registry
from leukax.weights import torch_state
from leukax.weights.errors import WeightsError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ the entry point
def pretrained(name: str, weights: Any = "imagenet", **kwargs):
    """Returns ``(module, variables, spec)``: backbone ``name`` (or ``Classifier(backbone, head)``) with weights;
    the arguments of `pretrained_with_source`."""
    return pretrained_with_source(name, weights, **kwargs)[:3]


def pretrained_with_source(name: str, weights: Any = "imagenet", num_classes: int | None = None, head: Any = None,
                           weights_dir=None, offline: bool | None = None, allow_unverified: bool = False,
                           seed: int = 0, init_size: int = 96, cpu_kernels: str = "xla", **kw):
    """Returns ``(module, variables, spec, source)``: `pretrained`'s result and what its weights came from,
    ``source = {"file": path or None, "candidate": the registry's WeightSpec or None, "embedded": bool}``
    (all None/False for random init).

    weights: "imagenet" (registry files in order: official keras file if found or downloadable, then the
      offline alternatives, for mobilenet_v2 finally the embedded float16 copy), "embedded" (mobilenet_v2
      only: the float16 copy shipped in the package), a file path (.h5 / .npz / .pth), or None (random init).
    head: a head Module, or "gru" | "dense" | "linear" (needs num_classes); num_classes alone means "linear".
    cpu_kernels: "xla" (the default graph, pure JAX/XLA) or "native": a backbone with depthwise convolutions
      gets ``depthwise_impl="native"`` (`leukax.native`, opt-in C++ kernels for CPU finetuning).
    kw: backbone constructor kwargs (e.g. depthwise_impl, dtype). Weights that need a variant of the
      network (InceptionV3 tf2015: mixed10_pool="max") set it themselves.
    """
    spec = model_registry.get_spec(name)
    if head is None and num_classes is not None:
        head = "linear"
    if isinstance(head, str):
        if num_classes is None:
            raise ValueError("leukax/pretrained.py: a head given by name needs num_classes")
        head = heads.make_head(head, num_classes)
    prefix = ("backbone",) if head is not None else ()

    chosen, path, fmt, errors = None, None, None, []
    if weights == "imagenet":
        for cand in weights_registry.imagenet_candidates(name):
            try:
                path = weights_registry.get_weights(cand.name, weights_dir, offline, allow_unverified=allow_unverified)
            except WeightsError as e:
                if e.reason.startswith("wrong hash"):  # found but corrupt: refuse, never fall back silently
                    raise
                errors.append(str(e))
                continue
            chosen, fmt = cand, cand.format
            kw = {**dict(cand.loader_kw), **kw}
            break
    elif weights == "embedded":
        if name != "mobilenet_v2":
            raise ValueError(f"leukax/pretrained.py: weights='embedded' exists only for mobilenet_v2, not {name!r}")
    elif weights is not None:
        path = pathlib.Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"leukax/pretrained.py: weights file {path} not found")

    if weights == "imagenet" and path is None and name != "mobilenet_v2":
        raise FileNotFoundError(f"leukax/pretrained.py: no ImageNet weights for {name!r} could be found or "
                                "downloaded:\n  " + "\n  ".join(errors or ["no weights registered for it"]))
    if cpu_kernels not in ("xla", "native"):
        raise ValueError(f"leukax/pretrained.py: cpu_kernels must be 'xla' or 'native', got {cpu_kernels!r}")
    backbone = spec.make(**kw)
    if cpu_kernels == "native" and hasattr(backbone, "depthwise_impl"):
        backbone = backbone.clone(depthwise_impl="native")
    module = backbone if head is None else classifier.Classifier(backbone, head)
    x = jnp.zeros((1, init_size, init_size, 3), jnp.float32)
    variables = jax.jit(module.init)(jax.random.key(seed), x)

    embedded = path is None and weights in ("imagenet", "embedded")
    if path is not None:
        variables = _load_file(name, variables, path, fmt, prefix)
        log.info("pretrained %s: loaded %s (%s)", name, path, chosen.name if chosen else "given path")
    elif embedded:      # mobilenet_v2's shipped copy (last resort for "imagenet")
        variables = load_embedded_mobilenet_v2(variables, prefix=prefix)
        if weights == "imagenet":
            log.warning("pretrained mobilenet_v2: no weights file found; using the embedded float16 copy")
    return module, variables, spec, {"file": path, "candidate": chosen, "embedded": embedded}


# ---------------------------------------------------------------------------------- file → variables
def _keras_h5_into(backbone: str, variables: dict, path_or_dict, prefix: tuple[str, ...]) -> dict:
    if backbone == "xception":
        return load_xception_keras_weights(variables, path_or_dict, prefix)
    h5 = keras_h5.read_h5(path_or_dict) if isinstance(path_or_dict, (str, os.PathLike)) else path_or_dict
    # Keras 2 files number auto-named layers from 1 (conv2d_1...), Keras 3 from none (conv2d, conv2d_1...).
    return keras_h5.load_into(variables, xception.rename_auto_layers(h5), prefix=prefix)


def _lite_into(backbone: str, variables: dict, path, prefix: tuple[str, ...]) -> dict:
    lite = efficientnet_lite_variables(torch_state.read_state_dict(path), backbone.split("_")[-1])
    out = {k: dict(v) for k, v in variables.items()}
    for col, tree in lite.items():
        dst = out.setdefault(col, {})
        for p in prefix[:-1]:
            dst[p] = dict(dst[p])
            dst = dst[p]
        target = dst[prefix[-1]] if prefix else dst
        if jax.tree_util.tree_structure(target) != jax.tree_util.tree_structure(tree) or any(
                a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(tree))):
            raise ValueError(f"leukax/pretrained.py: {path}: the {col} converted for {backbone} do not match "
                             "the module's variables (structure or shapes)")
        if prefix:
            dst[prefix[-1]] = tree
        else:
            out[col] = tree
    return out


def _load_file(backbone: str, variables: dict, path: pathlib.Path, fmt: str | None, prefix) -> dict:
    fmt = fmt or {".h5": "keras-h5", ".npz": "npz", ".pth": "torch-pth"}.get(path.suffix)
    try:
        if fmt == "keras-h5":
            return _keras_h5_into(backbone, variables, path, prefix)
        if fmt in ("npz", "torch-pth") and backbone.startswith("efficientnet_lite"):
            return _lite_into(backbone, variables, path, prefix)
    except (WeightsError, ValueError, KeyError) as e:  # one refusal that names the file, nothing loaded
        reason = e.reason if isinstance(e, WeightsError) else str(e)
        raise WeightsError(path, f"cannot load into {backbone!r}: {reason}") from None
    raise ValueError(f"leukax/pretrained.py: cannot load {path} (format {fmt}) into {backbone!r}")


def load_xception_keras_weights(variables: Mapping, path_or_dict, prefix: tuple[str, ...] = ()) -> dict:
    """Returns `variables` with Keras Xception weights (legacy .h5 path or {layer: {weight: array}}) put in.

    Uses `keras_h5.load_into` (strict) for everything but the separable convs' `pointwise_kernel`s, which
    are set here (shape checked).
    """
    h5 = path_or_dict if isinstance(path_or_dict, Mapping) else keras_h5.read_h5(path_or_dict)
    h5 = xception.rename_auto_layers(h5)
    pointwise = {layer: w["pointwise_kernel"] for layer, w in h5.items() if "pointwise_kernel" in w}
    h5 = {layer: {k: v for k, v in w.items() if k != "pointwise_kernel"} for layer, w in h5.items()}
    params = dict(variables["params"])
    sub = params
    for p in prefix:
        sub[p] = dict(sub[p])
        sub = sub[p]
    wanted = {layer for layer, leaves in sub.items() if "pointwise_kernel" in leaves}
    if wanted != set(pointwise):
        raise ValueError(f"leukax/pretrained.py (xception): separable layers differ: missing in file "
                         f"{sorted(wanted - set(pointwise))}, unexpected {sorted(set(pointwise) - wanted)}")
    targets = {}
    for layer in wanted:
        sub[layer] = {k: v for k, v in sub[layer].items() if k != "pointwise_kernel"}
        targets[layer] = variables["params"]
        for p in prefix:
            targets[layer] = targets[layer][p]
        targets[layer] = targets[layer][layer]["pointwise_kernel"]
    out = keras_h5.load_into({**variables, "params": params}, h5, prefix=prefix)
    dst = out["params"]
    for p in prefix:
        dst = dst[p]
    for layer, value in pointwise.items():
        if tuple(value.shape) != tuple(targets[layer].shape):
            raise ValueError(f"leukax/pretrained.py (xception): {layer}/pointwise_kernel: file {value.shape} vs "
                             f"flax {targets[layer].shape}")
        dst[layer] = {**dst[layer], "pointwise_kernel": np.asarray(value, dtype=targets[layer].dtype)}
    return out


def load_embedded_mobilenet_v2(variables=None, prefix: tuple[str, ...] = ()) -> dict:
    """Returns float32 MobileNetV2 (alpha 1.0) variables {"params", "batch_stats"} with the embedded
    ImageNet weights (`leukax.weights.embedded`), or `variables` (e.g. a Classifier's, with
    prefix=("backbone",)) filled with them."""
    if variables is None:
        variables = jax.eval_shape(MobileNetV2().init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
    return keras_h5.load_into(variables, embedded.read_npz(), prefix=prefix)


def _conv_oihw(w: np.ndarray) -> np.ndarray:
    """Torch conv (O,I,kh,kw) → Flax HWIO; depthwise (C,1,kh,kw) → kh×kw×1×C."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def efficientnet_lite_variables(state_dict: dict[str, np.ndarray], variant: str,
                                include_top: bool = False) -> dict:
    """Returns {"params", "batch_stats"} for `efficientnet(variant)` ("lite0".."lite4") from lukemelas keys.

    include_top: also map `_fc` to the `predictions` Dense (build the module with num_classes=1000).
    Raises ValueError naming unused or missing keys.
    """
    if variant not in en.LITE_VARIANTS:
        raise WeightsError(None, f"efficientnet_lite_variables: {variant!r} is not one of {list(en.LITE_VARIANTS)}")
    _, depth, _ = en.LITE_VARIANTS[variant]
    names = en.block_names(depth, lite=True)
    params: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    used: set[str] = set()

    def take(key):
        if key not in state_dict:
            raise WeightsError(None, f"efficientnet_lite_variables({variant}): state dict lacks {key!r}")
        used.add(key)
        return np.asarray(state_dict[key], np.float32)

    def conv(src, dst):
        params[dst] = {"kernel": _conv_oihw(take(f"{src}.weight"))}

    def bn(src, dst):
        params[dst] = {"scale": take(f"{src}.weight"), "bias": take(f"{src}.bias")}
        stats[dst] = {"mean": take(f"{src}.running_mean"), "var": take(f"{src}.running_var")}
        used.add(f"{src}.num_batches_tracked")

    conv("_conv_stem", "stem_conv")
    bn("_bn0", "stem_bn")
    for i, name in enumerate(names):
        src = f"_blocks.{i}."
        if f"{src}_expand_conv.weight" in state_dict:
            conv(f"{src}_expand_conv", f"{name}expand_conv")
            bn(f"{src}_bn0", f"{name}expand_bn")
        conv(f"{src}_depthwise_conv", f"{name}dwconv")
        bn(f"{src}_bn1", f"{name}bn")
        conv(f"{src}_project_conv", f"{name}project_conv")
        bn(f"{src}_bn2", f"{name}project_bn")
    conv("_conv_head", "top_conv")
    bn("_bn1", "top_bn")
    if include_top:
        params["predictions"] = {"kernel": np.ascontiguousarray(take("_fc.weight").T), "bias": take("_fc.bias")}
    else:
        used |= {"_fc.weight", "_fc.bias"}
    unused = [k for k in state_dict if k not in used]
    if unused:
        raise WeightsError(None, f"efficientnet_lite_variables({variant}): {len(unused)} keys not mapped (wrong "
                         f"variant?): {', '.join(unused[:10])}")
    return {"params": params, "batch_stats": stats}
