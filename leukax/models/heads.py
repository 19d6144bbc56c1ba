"""Classification heads that read a backbone's feature map.

- `GRUHead` (Akter et al. 2024): the B×H×W×C feature map read as a sequence of H·W steps (row-major)
  by a GRU; its final state goes through Dense(hidden, relu) → dropout → Dense(num_classes).
- `DenseHead` (Himel et al. 2024): global-average-pool → Dense(1024, relu) → Dropout(0.3) →
  Dense(num_classes). Its 1024-d relu output is the feature the second stage fuses.
- `LinearHead`: global-average-pool → Dense(num_classes) (the no-GRU baseline).

Every head: ``__call__(feature_map_bhwc, train=False, dropout_rate=None)`` returns
``(logits_bk, {"pre_logits": B×D})``; softmax is applied by callers. ``dropout_rate`` overrides the
head's own rate and may be a traced scalar, so a hyper-parameter search can change it without recompiling.
Dropout draws from the rng stream ``"dropout"`` (needed whenever ``train=True``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Akter et al. 2024, Table of Bayesian-optimised GRU heads: backbone -> (GRU units, dropout rate).
PAPER_GRU_HEADS: dict[str, dict[str, float]] = {
    "inception_v3": {"units": 512, "dropout": 0.4},
    "mobilenet_v2": {"units": 512, "dropout": 0.1},
    "efficientnet_b3": {"units": 256, "dropout": 0.1},
}


def dropout(x, rate, rng, train: bool):
    """Inverted dropout whose ``rate`` may be a traced scalar. Returns an array shaped like ``x``.

    ``rate == 0`` (or ``train=False``) returns ``x`` unchanged; ``rate == 1`` returns zeros.
    """
    if not train:
        return x
    if isinstance(rate, (int, float)) and rate == 0:
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.uniform(rng, x.shape) < keep   # keep == 1 keeps every unit (uniform is in [0, 1))
    scale = jnp.where(keep > 0, 1.0 / jnp.maximum(keep, 1e-12), 0.0).astype(x.dtype)
    return jnp.where(mask, x * scale, jnp.zeros_like(x))


def _rate(default: float, override: Any) -> Any:
    return default if override is None else override


class GRUHead(nn.Module):
    """GRU over the H·W feature-map positions, then two dense layers. Returns (logits B×K, {"pre_logits": B×hidden})."""
    num_classes: int
    units: int = 512
    dropout: float = 0.4
    hidden: int = 128
    dtype: Any = None

    @nn.compact
    def __call__(self, feature_map_bhwc, train: bool = False, dropout_rate=None):
        b, h, w, c = feature_map_bhwc.shape
        seq_btc = feature_map_bhwc.reshape(b, h * w, c).astype(self.dtype or jnp.float32)
        state_bu, _ = nn.RNN(nn.GRUCell(self.units, dtype=self.dtype, name="gru"), return_carry=True)(seq_btc)
        hid_bd = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="dense")(state_bu))
        rate = _rate(self.dropout, dropout_rate)
        x = dropout(hid_bd, rate, self.make_rng("dropout") if train else None, train)
        logits_bk = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
        return logits_bk.astype(jnp.float32), {"pre_logits": hid_bd}


class DenseHead(nn.Module):
    """GAP → Dense(features, relu) → dropout → Dense(K). Returns (logits B×K, {"pre_logits": B×features})."""
    num_classes: int
    features: int = 1024
    dropout: float = 0.3
    dtype: Any = None

    @nn.compact
    def __call__(self, feature_map_bhwc, train: bool = False, dropout_rate=None):
        pooled_bc = jnp.mean(feature_map_bhwc.astype(jnp.float32), axis=(1, 2))
        hid_bd = nn.relu(nn.Dense(self.features, dtype=self.dtype, name="dense")(pooled_bc))
        rate = _rate(self.dropout, dropout_rate)
        x = dropout(hid_bd, rate, self.make_rng("dropout") if train else None, train)
        logits_bk = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
        return logits_bk.astype(jnp.float32), {"pre_logits": hid_bd}


class LinearHead(nn.Module):
    """GAP → Dense(K). ``dropout_rate`` is accepted and ignored. Returns (logits B×K, {"pre_logits": B×C})."""
    num_classes: int
    dtype: Any = None

    @nn.compact
    def __call__(self, feature_map_bhwc, train: bool = False, dropout_rate=None):
        del train, dropout_rate
        pooled_bc = jnp.mean(feature_map_bhwc.astype(jnp.float32), axis=(1, 2))
        logits_bk = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(pooled_bc)
        return logits_bk.astype(jnp.float32), {"pre_logits": pooled_bc}


HEADS = {"gru": GRUHead, "dense": DenseHead, "linear": LinearHead}


def make_head(kind: str, num_classes: int, **kwargs) -> nn.Module:
    """Returns a head by name: "gru" | "dense" | "linear"."""
    if kind not in HEADS:
        raise ValueError(f"leukax/models/heads.py: unknown head {kind!r}; known: {', '.join(HEADS)}")
    return HEADS[kind](num_classes=num_classes, **kwargs)
