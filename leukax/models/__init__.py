"""Flax backbones and heads. See `leukax.models.registry` for names, input sizes and normalisation.

`pretrained(name, weights="imagenet")` builds a backbone (or a `Classifier` with a head) and loads weights.
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

log = logging.getLogger(__name__)


def _keras_h5_into(backbone: str, variables: dict, path_or_dict, prefix: tuple[str, ...]) -> dict:
    from leukax.models import xception
    from leukax.weights import keras_h5

    if backbone == "xception":
        return xception.load_keras_weights(variables, path_or_dict, prefix)
    h5 = keras_h5.read_h5(path_or_dict) if isinstance(path_or_dict, (str, os.PathLike)) else path_or_dict
    # Keras 2 files number auto-named layers from 1 (conv2d_1...), Keras 3 from none (conv2d, conv2d_1...).
    return keras_h5.load_into(variables, xception.rename_auto_layers(h5), prefix=prefix)


def _lite_into(backbone: str, variables: dict, path, prefix: tuple[str, ...]) -> dict:
    import jax
    from leukax.weights import torch_state

    lite = torch_state.efficientnet_lite_variables(torch_state.read_state_dict(path), backbone.split("_")[-1])
    out = {k: dict(v) for k, v in variables.items()}
    for col, tree in lite.items():
        dst = out.setdefault(col, {})
        for p in prefix[:-1]:
            dst[p] = dict(dst[p])
            dst = dst[p]
        target = dst[prefix[-1]] if prefix else dst
        if jax.tree_util.tree_structure(target) != jax.tree_util.tree_structure(tree) or any(
                a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(tree))):
            raise ValueError(f"leukax/models/__init__.py: {path}: the {col} converted for {backbone} do not match "
                             "the module's variables (structure or shapes)")
        if prefix:
            dst[prefix[-1]] = tree
        else:
            out[col] = tree
    return out


def _load_file(backbone: str, variables: dict, path: pathlib.Path, fmt: str | None, prefix) -> dict:
    fmt = fmt or {".h5": "keras-h5", ".npz": "npz", ".pth": "torch-pth"}.get(path.suffix)
    if fmt == "keras-h5":
        return _keras_h5_into(backbone, variables, path, prefix)
    if fmt in ("npz", "torch-pth") and backbone.startswith("efficientnet_lite"):
        return _lite_into(backbone, variables, path, prefix)
    raise ValueError(f"leukax/models/__init__.py: cannot load {path} (format {fmt}) into {backbone!r}")


def pretrained(name: str, weights: Any = "imagenet", num_classes: int | None = None, head: Any = None,
               weights_dir=None, offline: bool | None = None, allow_unverified: bool = False,
               seed: int = 0, init_size: int = 96, **kw):
    """Returns ``(module, variables, spec)``: backbone ``name`` (or ``Classifier(backbone, head)``) with weights.

    weights: "imagenet" (registry files in order: official keras file if found or downloadable, then the
      offline alternatives, for mobilenet_v2 finally the embedded float16 copy), "embedded" (mobilenet_v2
      only: the float16 copy shipped in the package), a file path (.h5 / .npz / .pth), or None (random init).
    head: a head Module, or "gru" | "dense" | "linear" (needs num_classes); num_classes alone means "linear".
    kw: backbone constructor kwargs (e.g. depthwise_impl, dtype). Weights that need a variant of the
      network (InceptionV3 tf2015: mixed10_pool="max") set it themselves.
    """
    import jax
    import jax.numpy as jnp

    from leukax.models import classifier, heads, registry as model_registry
    from leukax.weights import registry as weights_registry

    spec = model_registry.get_spec(name)
    if head is None and num_classes is not None:
        head = "linear"
    if isinstance(head, str):
        if num_classes is None:
            raise ValueError("leukax/models/__init__.py: a head given by name needs num_classes")
        head = heads.make_head(head, num_classes)
    prefix = ("backbone",) if head is not None else ()

    chosen, path, fmt, errors = None, None, None, []
    if weights == "imagenet":
        for cand in weights_registry.imagenet_candidates(name):
            try:
                path = weights_registry.get_weights(cand.name, weights_dir, offline, allow_unverified=allow_unverified)
            except weights_registry.WeightsError as e:
                errors.append(str(e))
                continue
            chosen, fmt = cand, cand.format
            kw = {**dict(cand.loader_kw), **kw}
            break
    elif weights == "embedded":
        if name != "mobilenet_v2":
            raise ValueError(f"leukax/models/__init__.py: weights='embedded' exists only for mobilenet_v2, not {name!r}")
    elif weights is not None:
        path = pathlib.Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"leukax/models/__init__.py: weights file {path} not found")

    if weights == "imagenet" and path is None and name != "mobilenet_v2":
        raise FileNotFoundError(f"leukax/models/__init__.py: no ImageNet weights for {name!r} could be found or "
                                "downloaded:\n  " + "\n  ".join(errors or ["no weights registered for it"]))
    backbone = spec.make(**kw)
    module = backbone if head is None else classifier.Classifier(backbone, head)
    x = jnp.zeros((1, init_size, init_size, 3), jnp.float32)
    variables = jax.jit(module.init)(jax.random.key(seed), x)

    if path is not None:
        variables = _load_file(name, variables, path, fmt, prefix)
        log.info("pretrained %s: loaded %s (%s)", name, path, chosen.name if chosen else "given path")
    elif weights in ("imagenet", "embedded"):      # mobilenet_v2's shipped copy (last resort for "imagenet")
        try:
            from leukax.weights import embedded
        except ImportError as e:  # pragma: no cover - the package ships it
            raise FileNotFoundError("leukax/models/__init__.py: no MobileNetV2 ImageNet weights found and no "
                                    "embedded copy (leukax.weights.embedded):\n  " + "\n  ".join(errors)) from e
        variables = embedded.load_embedded_mobilenet_v2(variables, prefix=prefix)
        if weights == "imagenet":
            log.warning("pretrained mobilenet_v2: no weights file found; using the embedded float16 copy")
    return module, variables, spec
