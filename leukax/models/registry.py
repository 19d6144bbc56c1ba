"""One table of every backbone: how to build it, its input size and its input normalisation.

Each model file defines ``SPECS: dict[str, BackboneSpec]``; this module merges them.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn

# Model files that contribute SPECS, in the order they are listed by `names()`.
_MODEL_FILES = ("mobilenet_v2", "inception_v3", "efficientnet", "mobilenet_v3", "resnet_v2", "xception")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    make: keyword arguments -> flax Module whose ``__call__(x_bhwc, train=False)`` returns
      ``(feature_map_bhwc, {"pre_logits": B×C, ...})``.
    input_size: the native square input size in pixels.
    normalization: a name understood by `leukax.preprocess.normalize` ("tf", "lite", "torch", "raw", "unit").
    keras_app: the `keras.applications` constructor name this network equals, if any.
    """
    name: str
    make: Callable[..., nn.Module]
    input_size: int
    normalization: str
    keras_app: str | None = None
    notes: str = ""


def _all_specs() -> dict[str, BackboneSpec]:
    specs: dict[str, BackboneSpec] = {}
    for mod in _MODEL_FILES:
        specs.update(importlib.import_module(f"leukax.models.{mod}").SPECS)
    return specs


def names() -> list[str]:
    """Returns every registered backbone name."""
    return list(_all_specs())


def get_spec(name: str) -> BackboneSpec:
    specs = _all_specs()
    if name not in specs:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(specs)}")
    return specs[name]


def get_backbone(name: str, **kwargs: Any) -> tuple[nn.Module, BackboneSpec]:
    """Returns (flax module, spec) for a registered backbone name."""
    spec = get_spec(name)
    return spec.make(**kwargs), spec
