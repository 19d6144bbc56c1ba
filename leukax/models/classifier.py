"""A backbone followed by a head, plus the parameter counts of the papers' tables."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np


class Classifier(nn.Module):
    """``backbone`` (feature map B×H×W×C) then ``head`` (logits B×K). Submodules are named backbone / head.

    ``__call__`` returns ``(logits_bk, {"feature_map", "backbone_pre_logits", "pre_logits"})``.
    `features` and `classify` split the two halves (Grad-CAM, head-only training on cached features).
    """
    backbone: nn.Module
    head: nn.Module

    def features(self, x_bhwc, train: bool = False):
        """Returns (feature_map B×H×W×C, backbone's out dict with "pre_logits" B×C)."""
        return self.backbone(x_bhwc, train=train)

    def classify(self, feature_map_bhwc, train: bool = False, dropout_rate=None):
        """Returns (logits B×K, {"pre_logits": B×D}) from a feature map."""
        return self.head(feature_map_bhwc, train=train, dropout_rate=dropout_rate)

    def __call__(self, x_bhwc, train: bool = False, dropout_rate=None):
        fm_bhwc, bb_out = self.features(x_bhwc, train=train)
        logits_bk, head_out = self.classify(fm_bhwc, train=train, dropout_rate=dropout_rate)
        return logits_bk, {"feature_map": fm_bhwc, "backbone_pre_logits": bb_out["pre_logits"],
                           "pre_logits": head_out["pre_logits"]}


def _size(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def count_params(variables: dict) -> dict[str, int]:
    """Returns Keras-style counts: {"total", "trainable", "non_trainable", "<top-level params name>": n, ...}.

    trainable = the ``params`` collection; non_trainable = everything else (BatchNorm ``batch_stats``).
    Per-submodule entries (e.g. "backbone", "head") count that submodule's trainable params.
    """
    params = variables.get("params", {})
    trainable = _size(params)
    non_trainable = _size({k: v for k, v in variables.items() if k != "params"})
    counts = {"total": trainable + non_trainable, "trainable": trainable, "non_trainable": non_trainable}
    for name, sub in params.items():
        if name in ("backbone", "head"):
            counts[name] = _size(sub)
    return counts
