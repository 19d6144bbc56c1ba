"""Preprocessing, enhancement and the two papers' augmentations, as pure batched JAX functions.

Every function takes a batch ``images_bhwc`` (uint8 or float in [0, 255]) and is jit-able; random ones take
an explicit PRNG key, so an ensemble member can draw its own augmentation with
``jax.vmap(augment_paper1, in_axes=(0, None))(keys_m, images_bhwc)``. Functions that return images keep the
input dtype: uint8 outputs are rounded (half to even) and clipped to [0, 255], float outputs are not rounded.

Conventions (chosen to match the tools the papers used):
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
  ``"reflect"`` and ``"constant"`` follow scipy.ndimage.
- Himel et al. (paper 2): ``+30 brightness, x1.4 contrast`` is OpenCV's ``convertScaleAbs(x, alpha=1.4,
  beta=30)`` = clip(1.4·x + 30) (contrast about 0, not about the mean), then `laplacian_sharpen` =
  ``filter2D`` with [[0,-1,0],[-1,5,-1],[0,-1,0]] per channel, border BORDER_REFLECT_101, clipped to [0, 255].
- Smoothing: `gaussian_blur` (separable, border REFLECT_101 like cv2.GaussianBlur / scipy ``mode="mirror"``)
  and `median_filter3x3` (border replicate, like cv2.medianBlur).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ("tf", "lite", "torch", "raw", "unit")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FILL_MODES = ("nearest", "reflect", "constant")
SHARPEN_KERNEL = ((0.0, -1.0, 0.0), (-1.0, 5.0, -1.0), (0.0, -1.0, 0.0))


def _check_bhwc(images, fn: str):
    if images.ndim != 4:
        raise ValueError(f"leukax/preprocess.py:{fn}: expected B×H×W×C images, got shape {images.shape}")


def _restore_dtype(y, dtype):
    """Casts float `y` back to `dtype`; integer dtypes are rounded and clipped to their range."""
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jnp.clip(jnp.round(y), info.min, info.max).astype(dtype)
    return y.astype(dtype)


# ----------------------------------------------------------------------------------------------- basics
@functools.partial(jax.jit, static_argnames=("size", "method", "antialias"))
def resize(images_bhwc, size: int | tuple[int, int], method: str = "bilinear", antialias: bool = True):
    """Returns B×h×w×C images (same dtype) via `jax.image.resize`; `size` is s or a tuple (h, w)."""
    _check_bhwc(images_bhwc, "resize")
    if method not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"leukax/preprocess.py:resize: unknown method {method!r}")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    b, _, _, c = images_bhwc.shape
    y = jax.image.resize(images_bhwc.astype(jnp.float32), (b, h, w, c), method=method, antialias=antialias)
    if method == "bicubic":  # cubic overshoots; keep the [0, 255] pixel range
        y = jnp.clip(y, 0.0, 255.0)
    return _restore_dtype(y, images_bhwc.dtype)


def normalize(images, kind: str):
    """Returns float32 images scaled for a backbone: kind in `NORMALIZATIONS` (input in [0, 255])."""
    x = jnp.asarray(images).astype(jnp.float32)
    if kind == "tf":
        return x / 127.5 - 1.0
    if kind == "lite":
        return (x - 127.0) / 128.0
    if kind == "torch":
        return (x / 255.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    if kind == "raw":
        return x
    if kind == "unit":
        return x / 255.0
    raise ValueError(f"leukax/preprocess.py:normalize: unknown normalization {kind!r}, "
                     f"expected one of {NORMALIZATIONS}")


# -------------------------------------------------------------------------------------- filtering
def _pad_hw(x_bhwc, r: int, mode: str):
    return jnp.pad(x_bhwc, ((0, 0), (r, r), (r, r), (0, 0)), mode=mode)


def _filter3x3(x_bhwc, kernel_33, mode: str):
    """Correlates every channel with a 3×3 kernel (shift-and-add). Returns float32 B×H×W×C."""
    h, w = x_bhwc.shape[1:3]
    xp = _pad_hw(x_bhwc.astype(jnp.float32), 1, mode)
    out = jnp.zeros(x_bhwc.shape, jnp.float32)
    for i in range(3):
        for j in range(3):
            if kernel_33[i][j] != 0.0:
                out = out + kernel_33[i][j] * xp[:, i:i + h, j:j + w, :]
    return out


def gaussian_kernel1d(sigma: float, radius: int | None = None) -> np.ndarray:
    """Returns the normalised 1-D Gaussian taps (2·radius+1,); radius defaults to int(4·sigma + 0.5)."""
    if sigma <= 0:
        raise ValueError(f"leukax/preprocess.py:gaussian_kernel1d: sigma must be > 0, got {sigma}")
    radius = int(4.0 * sigma + 0.5) if radius is None else int(radius)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("sigma", "radius"))
def gaussian_blur(images_bhwc, sigma: float = 1.0, radius: int | None = None):
    """Returns images (same shape/dtype) blurred by a separable Gaussian, border REFLECT_101."""
    _check_bhwc(images_bhwc, "gaussian_blur")
    taps = gaussian_kernel1d(sigma, radius)
    r = len(taps) // 2
    h, w = images_bhwc.shape[1:3]
    if r >= min(h, w):
        raise ValueError(f"leukax/preprocess.py:gaussian_blur: radius {r} too large for {h}×{w} images")
    x = images_bhwc.astype(jnp.float32)
    xp = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(float(taps[i]) * xp[:, i:i + h] for i in range(len(taps)))
    xp = jnp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="reflect")
    x = sum(float(taps[i]) * xp[:, :, i:i + w] for i in range(len(taps)))
    return _restore_dtype(x, images_bhwc.dtype)


@jax.jit
def median_filter3x3(images_bhwc):
    """Returns images (same shape/dtype) with each channel replaced by its 3×3 median, border replicate."""
    _check_bhwc(images_bhwc, "median_filter3x3")
    h, w = images_bhwc.shape[1:3]
    xp = _pad_hw(images_bhwc, 1, "edge")
    p = [xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]
    # median-of-9 compare-exchange network (Paeth): 19 min/max pairs, much cheaper than a sort on XLA:CPU
    for a, b in ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8),
                 (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2)):
        p[a], p[b] = jnp.minimum(p[a], p[b]), jnp.maximum(p[a], p[b])
    return p[4]


def smooth(images_bhwc, method: str = "gaussian", sigma: float = 1.0):
    """Returns the paper-1 noise-reduction smoothing: method "gaussian" (given sigma) or "median" (3×3)."""
    if method == "gaussian":
        return gaussian_blur(images_bhwc, sigma)
    if method == "median":
        return median_filter3x3(images_bhwc)
    raise ValueError(f"leukax/preprocess.py:smooth: unknown method {method!r} (gaussian|median)")


@jax.jit
def laplacian_sharpen(images_bhwc):
    """Returns images (same dtype) filtered with the Laplacian sharpening kernel, REFLECT_101, clipped."""
    _check_bhwc(images_bhwc, "laplacian_sharpen")
    y = jnp.clip(_filter3x3(images_bhwc, SHARPEN_KERNEL, "reflect"), 0.0, 255.0)
    return _restore_dtype(y, images_bhwc.dtype)


@functools.partial(jax.jit, static_argnames=("sharpen",))
def enhance_paper2(images_bhwc, brightness: float = 30.0, contrast: float = 1.4, sharpen: bool = True):
    """Returns Himel et al.'s enhancement clip(contrast·x + brightness), then `laplacian_sharpen`.

    Same shape and dtype; like OpenCV on uint8 images the intermediate image is rounded to uint8, float
    inputs stay unrounded (but clipped to [0, 255]).
    """
    _check_bhwc(images_bhwc, "enhance_paper2")
    y = jnp.clip(contrast * images_bhwc.astype(jnp.float32) + brightness, 0.0, 255.0)
    y = _restore_dtype(y, images_bhwc.dtype)
    return laplacian_sharpen(y) if sharpen else y


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
    _check_bhwc(images_bhwc, "affine_warp")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"leukax/preprocess.py:affine_warp: unknown fill_mode {fill_mode!r}, "
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
    return _restore_dtype(out.reshape(b, h, w, c), images_bhwc.dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def augment_paper1(key, images_bhwc, config: Paper1Aug = Paper1Aug()):
    """Returns Akter et al.'s augmentation of every image (one random affine warp each, then optional
    smoothing), B×H×W×C in the input dtype."""
    _check_bhwc(images_bhwc, "augment_paper1")
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
    _check_bhwc(images_bhwc, "augment_paper2")
    b, h, w, c = images_bhwc.shape
    if h != w:
        raise ValueError(f"leukax/preprocess.py:augment_paper2: rot90 needs square images, got {h}×{w}")
    u_3b = jax.random.uniform(key, (3, b))
    k = jnp.minimum(jnp.floor(4 * u_3b[0]), 3).astype(jnp.int32)
    fh, fv = u_3b[1] < 0.5, u_3b[2] < 0.5
    rows, cols = jax.vmap(lambda *a: dihedral_indices(h, *a))(k, fh, fv)
    return jax.vmap(lambda img, rr, cc: img[rr, cc])(images_bhwc, rows, cols)
