"""The two papers' training augmentations, as pure batched JAX functions with explicit PRNG keys.

Every function takes a batch ``images_bhwc`` (uint8 or float in [0, 255]), is jit-able and keeps the input
dtype (uint8 rounded half to even and clipped). A random one takes an explicit key, so an ensemble member
draws its own augmentation with ``jax.vmap(augment_paper1, in_axes=(0, None))(keys_m, images_bhwc)``.

- Akter et al. (paper 1) used Keras' ``ImageDataGenerator``; `random_affine_params` draws the same
  distributions (``rotation_range`` degrees, ``*_shift_range`` fractions of the size, ``shear_range`` in
  DEGREES as in keras-preprocessing >= 1.0.6 / Keras 3, ``zoom_range`` z -> independent x and y zoom in
  [1 - z, 1 + z], flips with p = 0.5) and `affine_matrix` builds Keras' matrix
  ``centre · rotation · shift · shear · zoom · centre⁻¹`` about the exact centre ((W-1)/2, (H-1)/2).
  Keras 3 adds ``tx`` (drawn from *height_shift_range*·H) to the column coordinate and centres on
  (H/2 - 0.5) along x; we keep the documented meaning (width shift moves along x, centre (W-1)/2), which for
  square images is the very same warp and distribution. Keras flips after
  the warp; here the flips are folded into the one warp (output coordinates flipped first).
  Sampling is bilinear (Keras ``interpolation_order=1``); fill modes ``"nearest"`` (Keras default),
  ``"reflect"`` and ``"constant"`` follow scipy.ndimage. Optional smoothing after the warp is
  `leukax.preprocess.smooth`.
- Himel et al. (paper 2): rot90 by k ~ U{0..3}, then horizontal and vertical flips with p = 0.5 each
  (`augment_paper2`, exact pixel permutations).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from leukax.preprocess import check_bhwc, restore_dtype, smooth

FILL_MODES = ("nearest", "reflect", "constant")


# ------------------------------------------------------------------------------------- paper 1 affine
@dataclasses.dataclass(frozen=True)
class Paper1Aug:
    """Akter et al.'s ImageDataGenerator settings; set a range to 0 / a flag to False to switch it off."""
    rotation_range: float = 45.0       # degrees, theta ~ U(-r, r)
    width_shift_range: float = 0.2     # fraction of W
    height_shift_range: float = 0.2    # fraction of H
    shear_range: float = 20.0          # degrees (Keras >= 2.2 semantics)
    zoom_range: float | tuple[float, float] = 0.1  # z -> [1 - z, 1 + z], x and y drawn independently
    horizontal_flip: bool = True
    vertical_flip: bool = True
    fill_mode: str = "nearest"         # nearest | reflect | constant
    cval: float = 0.0
    smoothing: str | None = None       # None | "gaussian" | "median", applied after the warp
    sigma: float = 1.0

    def zoom_bounds(self) -> tuple[float, float]:
        z = self.zoom_range
        return (1.0 - z, 1.0 + z) if isinstance(z, (int, float)) else (float(z[0]), float(z[1]))


@functools.partial(jax.jit, static_argnames=("batch", "config"))
def random_affine_params(key, batch: int, config: Paper1Aug = Paper1Aug()) -> dict[str, jax.Array]:
    """Returns per-image parameters, each of shape (batch,): theta/shear (deg), shift_x/shift_y (fractions
    of W/H), zoom_x/zoom_y, flip_h/flip_v (bool)."""
    u_8b = jax.random.uniform(key, (8, batch), jnp.float32)  # one draw: XLA:CPU compiles threefry slowly
    lerp = lambda u, lo, hi: lo + (hi - lo) * u  # noqa: E731
    zeros, ones = jnp.zeros((batch,), jnp.float32), jnp.ones((batch,), jnp.float32)
    rot, ws, hs, sh = (config.rotation_range, config.width_shift_range, config.height_shift_range,
                       config.shear_range)
    zlo, zhi = config.zoom_bounds()
    zoom = (zlo, zhi) != (1.0, 1.0)
    return {
        "theta": lerp(u_8b[0], -rot, rot) if rot else zeros,
        "shift_x": lerp(u_8b[1], -ws, ws) if ws else zeros,
        "shift_y": lerp(u_8b[2], -hs, hs) if hs else zeros,
        "shear": lerp(u_8b[3], -sh, sh) if sh else zeros,
        "zoom_x": lerp(u_8b[4], zlo, zhi) if zoom else ones,
        "zoom_y": lerp(u_8b[5], zlo, zhi) if zoom else ones,
        "flip_h": (u_8b[6] < 0.5) & config.horizontal_flip,
        "flip_v": (u_8b[7] < 0.5) & config.vertical_flip,
    }


@functools.partial(jax.jit, static_argnames=("height", "width"))
def affine_matrix(height: int, width: int, theta=0.0, shift_x=0.0, shift_y=0.0, shear=0.0, zoom_x=1.0,
                  zoom_y=1.0, flip_h=False, flip_v=False):
    """Returns the 3×3 matrix mapping output pixel (x=col, y=row, 1) to input (x, y, 1) for one image.

    Shifts are fractions of width/height; angles in degrees. Same matrix as Keras' apply_affine_transform
    (with tx = shift_x·W, ty = shift_y·H), flips applied to the output afterwards.
    """
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    t, s = jnp.deg2rad(f32(theta)), jnp.deg2rad(f32(shear))
    one, zero = jnp.ones_like(t), jnp.zeros_like(t)
    mat = lambda rows: jnp.stack([jnp.stack(r) for r in rows])  # noqa: E731
    rotation = mat([[jnp.cos(t), -jnp.sin(t), zero], [jnp.sin(t), jnp.cos(t), zero], [zero, zero, one]])
    shift = mat([[one, zero, f32(shift_x) * width], [zero, one, f32(shift_y) * height], [zero, zero, one]])
    shear_m = mat([[one, -jnp.sin(s), zero], [zero, jnp.cos(s), zero], [zero, zero, one]])
    zoom = mat([[f32(zoom_x), zero, zero], [zero, f32(zoom_y), zero], [zero, zero, one]])
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    centre = jnp.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]], jnp.float32)
    uncentre = jnp.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]], jnp.float32)
    m = centre @ rotation @ shift @ shear_m @ zoom @ uncentre
    fx = jnp.where(jnp.asarray(flip_h), -1.0, 1.0)
    fy = jnp.where(jnp.asarray(flip_v), -1.0, 1.0)
    flip = mat([[fx, zero, jnp.where(jnp.asarray(flip_h), width - 1.0, 0.0)],
                [zero, fy, jnp.where(jnp.asarray(flip_v), height - 1.0, 0.0)], [zero, zero, one]])
    return m @ flip


@functools.partial(jax.jit, static_argnames=("height", "width"))
def affine_matrices(params: dict[str, jax.Array], height: int, width: int):
    """Returns B×3×3 matrices (output → input pixel coords) from `random_affine_params` output."""
    return jax.vmap(lambda p: affine_matrix(height, width, **p))(params)


def _fold_coord(c, n: int, mode: str):
    """Maps a continuous coordinate into [0, n-1] according to the fill mode ('constant' clamps)."""
    if mode == "reflect" and n > 1:  # half-sample symmetric: d c b a | a b c d | d c b a
        period = 2.0 * n
        c = jnp.mod(c + 0.5, period)
        c = jnp.where(c >= n, period - c, c) - 0.5
    return jnp.clip(c, 0.0, n - 1.0)


@functools.partial(jax.jit, static_argnames=("fill_mode",))
def affine_warp(images_bhwc, matrices_b33, fill_mode: str = "nearest", cval: float = 0.0):
    """Returns B×H×W×C images (same dtype) bilinearly sampled at `matrices_b33 @ (x, y, 1)` per pixel."""
    check_bhwc(images_bhwc, "augment.py:affine_warp")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"leukax/augment.py:affine_warp: unknown fill_mode {fill_mode!r}, "
                         f"expected one of {FILL_MODES}")
    b, h, w, c = images_bhwc.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    grid_3p = jnp.stack([xs.ravel(), ys.ravel(), jnp.ones(h * w, jnp.float32)])
    src_b3p = jnp.einsum("bij,jp->bip", matrices_b33.astype(jnp.float32), grid_3p)
    snap = lambda v: jnp.where(jnp.abs(v - jnp.round(v)) < 1e-4, jnp.round(v), v)  # noqa: E731
    sx, sy = snap(src_b3p[:, 0]), snap(src_b3p[:, 1])                               # B×P
    inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    sx, sy = _fold_coord(sx, w, fill_mode), _fold_coord(sy, h, fill_mode)
    x0, y0 = jnp.floor(sx), jnp.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)
    flat = images_bhwc.astype(jnp.float32).reshape(b, h * w, c)
    take = lambda yy, xx: jnp.take_along_axis(flat, (yy * w + xx)[..., None], axis=1)  # noqa: E731
    out = ((1 - fy) * ((1 - fx) * take(y0, x0) + fx * take(y0, x1))
           + fy * ((1 - fx) * take(y1, x0) + fx * take(y1, x1)))
    if fill_mode == "constant":
        out = jnp.where(inside[..., None], out, jnp.float32(cval))
    return restore_dtype(out.reshape(b, h, w, c), images_bhwc.dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def augment_paper1(key, images_bhwc, config: Paper1Aug = Paper1Aug()):
    """Returns Akter et al.'s augmentation of every image (one random affine warp each, then optional
    smoothing), B×H×W×C in the input dtype."""
    check_bhwc(images_bhwc, "augment.py:augment_paper1")
    b, h, w, _ = images_bhwc.shape
    mats = affine_matrices(random_affine_params(key, b, config), h, w)
    out = affine_warp(images_bhwc, mats, config.fill_mode, config.cval)
    return smooth(out, config.smoothing, config.sigma) if config.smoothing else out


# ------------------------------------------------------------------------------------- paper 2 dihedral
@functools.partial(jax.jit, static_argnames=("n",))
def dihedral_indices(n: int, k, flip_h, flip_v):
    """Returns (rows, cols) n×n int32 source indices of flip_v(flip_h(rot90(x, k))) for one square image."""
    r, c = jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij")
    r = jnp.where(flip_v, n - 1 - r, r)
    c = jnp.where(flip_h, n - 1 - c, c)
    # np.rot90(a, k)[r, c] reads a at: k=0 (r, c), k=1 (c, n-1-r), k=2 (n-1-r, n-1-c), k=3 (n-1-c, r)
    rows = jnp.select([k == 0, k == 1, k == 2], [r, c, n - 1 - r], n - 1 - c)
    cols = jnp.select([k == 0, k == 1, k == 2], [c, n - 1 - r, n - 1 - c], r)
    return rows.astype(jnp.int32), cols.astype(jnp.int32)


@jax.jit
def augment_paper2(key, images_bhwc):
    """Returns Himel et al.'s augmentation: per image rot90 by k ~ U{0..3}, then horizontal and vertical
    flips with p = 0.5 each (exact pixel permutations), B×S×S×C in the input dtype."""
    check_bhwc(images_bhwc, "augment.py:augment_paper2")
    b, h, w, c = images_bhwc.shape
    if h != w:
        raise ValueError(f"leukax/augment.py:augment_paper2: rot90 needs square images, got {h}×{w}")
    u_3b = jax.random.uniform(key, (3, b))
    k = jnp.minimum(jnp.floor(4 * u_3b[0]), 3).astype(jnp.int32)
    fh, fv = u_3b[1] < 0.5, u_3b[2] < 0.5
    rows, cols = jax.vmap(lambda *a: dihedral_indices(h, *a))(k, fh, fv)
    return jax.vmap(lambda img, rr, cc: img[rr, cc])(images_bhwc, rows, cols)
