"""Classification heads that read a backbone's feature map.

- `GRUHead` (Akter et al. 2024): the B×H×W×C feature map read as a sequence of H·W steps (row-major)
  by a GRU; its final state goes through Dense(hidden, relu) → dropout → Dense(num_classes).
- `DenseHead` (Himel et al. 2024): global-average-pool → Dense(1024, relu) → Dropout(0.3) →
  Dense(num_classes). Its 1024-d relu output is the feature the second stage fuses.
- `LinearHead`: global-average-pool → Dense(num_classes) (the no-GRU baseline).
- `GRUPoolHead`: the GRU's final state concatenated with the globally pooled features before the dense layers,
  so the dense head on pooled features is a special case (issue 20).

Every head: ``__call__(feature_map_bhwc, train=False, dropout_rate=None, input_dropout_rate=None, ...)`` returns
``(logits_bk, {"pre_logits": B×D})``; softmax is applied by callers. ``dropout_rate`` overrides the
head's own rate and may be a traced scalar, so a hyper-parameter search can change it without recompiling.
Dropout draws from the rng stream ``"dropout"`` (needed whenever ``train=True``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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


def _pool(feature_map):
    """Global average pool of B×H×W×C (or a B×T×C sequence, or already pooled B×C) to B×C float32."""
    x = feature_map.astype(jnp.float32)
    return x if x.ndim == 2 else jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


class _Weights(nn.Module):
    """Holds a kernel (and bias) under this module's name without applying them (same names as nn.Dense)."""
    features: int
    use_bias: bool
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,)) if self.use_bias else None
        return kernel, bias


def _gru_inputs(x_btc, k_c3u, b_3u):
    """Returns the input projections x_t W_ig + b_ig (g = r, z, n) of all T steps: three T×B×U arrays, each one
    B·T×C @ C×U matmul before the recurrence. Three arrays, not one T×B×3U: XLA:CPU vectorises the step's gate
    loop badly when it slices the gates out of the minor dimension (measured 10× slower per step)."""
    return tuple(jnp.einsum("btc,cu->tbu", x_btc, k_c3u[:, g]) + b_3u[g] for g in range(3))


def _gru_forward(x3_tbu, k_u3u, b_hn_u, mask_bu, save: bool):
    """The recurrence. Returns (h_T B×U, per step (h_{t-1}, r, z, n, h̃_{t-1} W_hn + b_hn) when `save`)."""
    def step(h_bu, x3):
        xr, xz, xn = x3
        hh_bu = h_bu * mask_bu
        r = jax.nn.sigmoid(xr + hh_bu @ k_u3u[:, 0])
        z = jax.nn.sigmoid(xz + hh_bu @ k_u3u[:, 1])
        hn = hh_bu @ k_u3u[:, 2] + b_hn_u
        n = jnp.tanh(xn + r * hn)
        return (1.0 - z) * n + z * h_bu, ((h_bu, r, z, n, hn) if save else None)

    b, u = x3_tbu[0].shape[1], k_u3u.shape[0]
    return jax.lax.scan(step, jnp.zeros((b, u), x3_tbu[0].dtype), x3_tbu)


@jax.custom_vjp
def gru_sequence(x_btc, k_c3u, b_3u, k_u3u, b_hn_u, mask_bu):
    """Returns the final GRU state B×U of the sequence x B×T×C (flax GRUCell equations, see `GRU`); mask_bu
    multiplies h_{t-1} in the recurrent matmuls (variational recurrent dropout; ones for none).

    Its hand-written backward pass (`_gru_bwd`) runs only the B×3U @ 3U×U state gradient inside the reversed
    scan and keeps each step's gate gradients δ_t; the weight gradients are then single large matmuls over all
    T·B rows (dW_h = Σ_t h̃_{t-1}ᵀ δ_t, dW_i = Σ_t x_tᵀ δ_t) instead of T small accumulations inside the loop,
    as autodiff of the scan does. Equal to autodiff (tests/test_heads.py)."""
    return _gru_forward(_gru_inputs(x_btc, k_c3u, b_3u), k_u3u, b_hn_u, mask_bu, False)[0]


def _gru_fwd(x_btc, k_c3u, b_3u, k_u3u, b_hn_u, mask_bu):
    h_bu, saved = _gru_forward(_gru_inputs(x_btc, k_c3u, b_3u), k_u3u, b_hn_u, mask_bu, True)
    return h_bu, (x_btc, k_c3u, k_u3u, mask_bu, saved)


def _gru_bwd(res, dh_bu):
    """Backpropagation through time. With h̃ = h_{t-1} ⊙ mask, hn = h̃ W_hn + b_hn, a_n = x W_in + b_in + r ⊙ hn:
        δn = dh ⊙ (1 − z) ⊙ (1 − n²)     δz = dh ⊙ (h_{t-1} − n) ⊙ z(1 − z)     δr = δn ⊙ hn ⊙ r(1 − r)
        dh_{t-1} = dh ⊙ z + ([δr δz δn⊙r] W_hᵀ) ⊙ mask"""
    x_btc, k_c3u, k_u3u, mask_bu, (h_tbu, r, z, n, hn) = res
    u = k_u3u.shape[0]
    k_3uu = k_u3u.reshape(u, 3 * u).T

    def step(carry, saved):
        dh, dmask = carry
        h_prev, r, z, n, hn = saved
        d_an = dh * (1.0 - z) * (1.0 - n * n)
        d_ar = d_an * hn * r * (1.0 - r)
        d_az = dh * (h_prev - n) * z * (1.0 - z)
        d_hn = d_an * r
        dhh = jnp.concatenate([d_ar, d_az, d_hn], -1) @ k_3uu          # d/dh̃_{t-1}: one B×3U @ 3U×U matmul
        return (dh * z + dhh * mask_bu, dmask + dhh * h_prev), (d_ar, d_az, d_an, d_hn)

    (_, dmask_bu), (d_ar, d_az, d_an, d_hn) = jax.lax.scan(
        step, (dh_bu, jnp.zeros_like(mask_bu)), (h_tbu, r, z, n, hn), reverse=True)
    hh_tbu = h_tbu * mask_bu
    dk_u3u = jnp.stack([jnp.einsum("tbu,tbv->uv", hh_tbu, d) for d in (d_ar, d_az, d_hn)], 1)
    d_in = (d_ar, d_az, d_an)
    dk_c3u = jnp.stack([jnp.einsum("btc,tbv->cv", x_btc, d) for d in d_in], 1)
    db_3u = jnp.stack([d.sum((0, 1)) for d in d_in])
    dx_btc = sum(jnp.einsum("tbv,cv->btc", d, k_c3u[:, g]) for g, d in enumerate(d_in))
    return dx_btc.astype(x_btc.dtype), dk_c3u, db_3u, dk_u3u, d_hn.sum((0, 1)), dmask_bu


gru_sequence.defvjp(_gru_fwd, _gru_bwd)


class GRU(nn.Module):
    """GRU over a sequence, returning the final state B×U. Same equations and parameter names as
    `flax.linen.GRUCell` (ir, iz, in with bias; hr, hz without; hn with bias):

        r_t = σ(x_t W_ir + b_ir + h_{t-1} W_hr)        z_t = σ(x_t W_iz + b_iz + h_{t-1} W_hz)
        n_t = tanh(x_t W_in + b_in + r_t ⊙ (h_{t-1} W_hn + b_hn))     h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}

    The input projections x_t [W_ir W_iz W_in] of all T steps are computed before the recurrence (the scan
    carries only the U×3U recurrent matmul): on 7×7×1280 MobileNetV2 maps that projection is most of the
    head's FLOPs. ``recurrent_dropout`` (traced rate allowed) drops h_{t-1} units with one mask per sequence
    (variational dropout, Gal & Ghahramani 2016) in the recurrent matmuls when ``rng`` is given. Runs
    `gru_sequence` (hand-written backward pass).
    """
    units: int

    @nn.compact
    def __call__(self, seq_btc, recurrent_dropout=0.0, rng=None):
        b, t, c = seq_btc.shape
        u = self.units
        w_i = [_Weights(u, True, name=n)(c) for n in ("ir", "iz", "in")]
        w_h = [_Weights(u, n == "hn", nn.initializers.orthogonal(), name=n)(u) for n in ("hr", "hz", "hn")]
        dt = seq_btc.dtype
        k_c3u = jnp.stack([k for k, _ in w_i], 1).astype(dt)
        # Every argument of gru_sequence comes out of a jnp op: params may be numpy arrays (a loaded bundle), which
        # a custom_vjp under vmap rejects as non-canonical constants.
        b_4u = jnp.stack([bb for _, bb in w_i] + [w_h[2][1]]).astype(dt)      # b_ir, b_iz, b_in, b_hn
        k_u3u = jnp.stack([k for k, _ in w_h], 1).astype(dt)
        mask_bu = jnp.ones((b, u), dt)
        if rng is not None:
            mask_bu = dropout(mask_bu, recurrent_dropout, rng, True)
        return gru_sequence(seq_btc, k_c3u, b_4u[:3], k_u3u, b_4u[3], mask_bu)


def sequence_order(h: int, w: int, order: str):
    """Returns the H·W position indices in the order the GRU reads them: "raster" (row-major, the flattened map)
    or "center_last" (farthest from the map's centre first, the centre last, ties row-major). A single cell sits
    in the middle of its crop, so "center_last" ends the sequence — whose final state the head reads — on the
    cell instead of on the background of the bottom-right corner."""
    if order == "raster":
        return np.arange(h * w)
    if order != "center_last":
        raise ValueError(f"leukax/models/heads.py: GRU order must be raster|center_last, got {order!r}")
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    return np.lexsort((np.arange(h * w), -(yy ** 2 + xx ** 2).ravel()))


def _read_sequence(head, feature_map_bhwc, train: bool, input_dropout_rate):
    """Returns the B×T×C sequence a GRU head reads: the H·W positions in `head.order`, with spatial input dropout
    (one channel mask per image, shared by all positions) when training. A B×T×C input is a flattened
    (row-major) square map, or a plain sequence when T is not a square."""
    if feature_map_bhwc.ndim == 3:
        b, t, c = feature_map_bhwc.shape
        side = int(round(t ** 0.5))
        feature_map_bhwc = feature_map_bhwc.reshape(b, side, t // side, c) if side * side == t else \
            feature_map_bhwc[:, :, None, :]
    b, h, w, c = feature_map_bhwc.shape
    seq_btc = feature_map_bhwc.reshape(b, h * w, c).astype(head.dtype or jnp.float32)
    seq_btc = seq_btc[:, sequence_order(h, w, head.order)]
    if train:
        keep_b1c = dropout(jnp.ones((b, 1, c), seq_btc.dtype), _rate(head.input_dropout, input_dropout_rate),
                           head.make_rng("dropout"), True)
        seq_btc = seq_btc * keep_b1c
    return seq_btc


class GRUHead(nn.Module):
    """GRU over the H·W feature-map positions, then two dense layers. Returns (logits B×K, {"pre_logits": B×hidden}).

    Regularisation for small data (all traced rates allowed, all off at inference): ``input_dropout`` drops
    feature channels (one mask per image, shared by all positions: spatial dropout), ``recurrent_dropout`` the
    GRU's recurrent state, ``dropout`` (the paper's rate) the hidden dense layer.
    """
    num_classes: int
    units: int = 512
    dropout: float = 0.4
    hidden: int = 128
    input_dropout: float = 0.0
    recurrent_dropout: float = 0.0
    order: str = "raster"
    dtype: Any = None
    pool_skip: ClassVar[bool] = False  # `GRUPoolHead`: the pooled features beside the final state

    @nn.compact
    def __call__(self, feature_map_bhwc, train: bool = False, dropout_rate=None, input_dropout_rate=None,
                 recurrent_dropout_rate=None):
        seq_btc = _read_sequence(self, feature_map_bhwc, train, input_dropout_rate)
        rec_rate = _rate(self.recurrent_dropout, recurrent_dropout_rate)
        state_bu = GRU(self.units, name="gru")(seq_btc, rec_rate, self.make_rng("dropout") if train else None)
        if self.pool_skip:
            state_bu = jnp.concatenate([state_bu, jnp.mean(seq_btc, 1)], -1)  # u = [h_T ; mean_t x_t]
        hid_bd = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="dense")(state_bu))
        rate = _rate(self.dropout, dropout_rate)
        x = dropout(hid_bd, rate, self.make_rng("dropout") if train else None, train)
        logits_bk = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
        return logits_bk.astype(jnp.float32), {"pre_logits": hid_bd}


class GRUPoolHead(GRUHead):
    """The GRU head with a skip of the pooled features: the GRU's final state h_T and the global mean of the
    (input-dropped) sequence, concatenated, go through the same two dense layers:

        u = [h_T ; (1/T) Σ_t x_t]  (B×(U+C))      a = relu(u W + b)  (B×hidden)      logits = a W_o + b_o

    With the rows of W that read h_T at zero this IS `DenseHead(features=hidden)` on the pooled features, so
    the dense head on the same features is a special case the GRU can only add to (tests/test_heads.py).
    Returns (logits B×K, {"pre_logits": B×hidden}); regularisation as `GRUHead`."""
    units: int = 128
    dropout: float = 0.3
    order: str = "center_last"
    pool_skip: ClassVar[bool] = True


class DenseHead(nn.Module):
    """GAP → Dense(features, relu) → dropout → Dense(K). Returns (logits B×K, {"pre_logits": B×features})."""
    num_classes: int
    features: int = 1024
    dropout: float = 0.3
    dtype: Any = None

    @nn.compact
    def __call__(self, feature_map_bhwc, train: bool = False, dropout_rate=None, input_dropout_rate=None,
                 recurrent_dropout_rate=None):
        del recurrent_dropout_rate
        pooled_bc = _pool(feature_map_bhwc)
        if train and input_dropout_rate is not None:
            pooled_bc = dropout(pooled_bc, input_dropout_rate, self.make_rng("dropout"), True)
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
    def __call__(self, feature_map_bhwc, train: bool = False, dropout_rate=None, input_dropout_rate=None,
                 recurrent_dropout_rate=None):
        del train, dropout_rate, input_dropout_rate, recurrent_dropout_rate
        pooled_bc = _pool(feature_map_bhwc)
        logits_bk = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(pooled_bc)
        return logits_bk.astype(jnp.float32), {"pre_logits": pooled_bc}


HEADS = {"gru": GRUHead, "gru_pool": GRUPoolHead, "dense": DenseHead, "linear": LinearHead}


def make_head(kind: str, num_classes: int, **kwargs) -> nn.Module:
    """Returns a head by name: "gru" | "gru_pool" | "dense" | "linear"."""
    if kind not in HEADS:
        raise ValueError(f"leukax/models/heads.py: unknown head {kind!r}; known: {', '.join(HEADS)}")
    return HEADS[kind](num_classes=num_classes, **kwargs)
