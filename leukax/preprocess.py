"""Resizing, normalisation and enhancement, as pure batched JAX functions (augmentation: `leukax.augment`).

Every function takes a batch ``images_bhwc`` (uint8 or float in [0, 255]) and is jit-able. Functions that
return images keep the input dtype: uint8 outputs are rounded (half to even) and clipped to [0, 255], float
outputs are not rounded. `normalize` is the one place where pixels become a backbone's input.

Conventions (chosen to match the tools the papers used):
- Himel et al. (paper 2): ``+30 brightness, x1.4 contrast`` is OpenCV's ``convertScaleAbs(x, alpha=1.4,
  beta=30)`` = clip(1.4·x + 30) (contrast about 0, not about the mean), then `laplacian_sharpen` =
  ``filter2D`` with [[0,-1,0],[-1,5,-1],[0,-1,0]] per channel, border BORDER_REFLECT_101, clipped to [0, 255].
- Smoothing: `gaussian_blur` (separable, border REFLECT_101 like cv2.GaussianBlur / scipy ``mode="mirror"``)
  and `median_filter3x3` (border replicate, like cv2.medianBlur).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ("tf", "lite", "torch", "raw", "unit")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHARPEN_KERNEL = ((0.0, -1.0, 0.0), (-1.0, 5.0, -1.0), (0.0, -1.0, 0.0))


def check_bhwc(images, where: str):
    """Raises ValueError naming `where` ("<file>:<function>" under leukax/) unless `images` is B×H×W×C."""
    if images.ndim != 4:
        raise ValueError(f"leukax/{where}: expected B×H×W×C images, got shape {images.shape}")


def restore_dtype(y, dtype):
    """Casts float `y` back to `dtype`; integer dtypes are rounded and clipped to their range."""
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jnp.clip(jnp.round(y), info.min, info.max).astype(dtype)
    return y.astype(dtype)


# ----------------------------------------------------------------------------------------------- basics
@functools.partial(jax.jit, static_argnames=("size", "method", "antialias"))
def resize(images_bhwc, size: int | tuple[int, int], method: str = "bilinear", antialias: bool = True):
    """Returns B×h×w×C images (same dtype) via `jax.image.resize`; `size` is s or a tuple (h, w)."""
    check_bhwc(images_bhwc, "preprocess.py:resize")
    if method not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"leukax/preprocess.py:resize: unknown method {method!r}")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    b, _, _, c = images_bhwc.shape
    y = jax.image.resize(images_bhwc.astype(jnp.float32), (b, h, w, c), method=method, antialias=antialias)
    if method == "bicubic":  # cubic overshoots; keep the [0, 255] pixel range
        y = jnp.clip(y, 0.0, 255.0)
    return restore_dtype(y, images_bhwc.dtype)


def normalize(images, kind: str | None):
    """Returns float32 images scaled for a backbone: kind in `NORMALIZATIONS` (input in [0, 255]); kind None
    = the input is not pixels (e.g. cached backbone features for a head) and is only cast to float32.

    tf: x/127.5 - 1; lite: (x - 127)/128; torch: (x/255 - ImageNet mean)/ImageNet std; raw: x; unit: x/255.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    if kind is None or kind == "raw":
        return x
    if kind == "tf":
        return x / 127.5 - 1.0
    if kind == "lite":
        return (x - 127.0) / 128.0
    if kind == "torch":
        return (x / 255.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
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
    check_bhwc(images_bhwc, "preprocess.py:gaussian_blur")
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
    return restore_dtype(x, images_bhwc.dtype)


@jax.jit
def median_filter3x3(images_bhwc):
    """Returns images (same shape/dtype) with each channel replaced by its 3×3 median, border replicate."""
    check_bhwc(images_bhwc, "preprocess.py:median_filter3x3")
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
    check_bhwc(images_bhwc, "preprocess.py:laplacian_sharpen")
    y = jnp.clip(_filter3x3(images_bhwc, SHARPEN_KERNEL, "reflect"), 0.0, 255.0)
    return restore_dtype(y, images_bhwc.dtype)


@functools.partial(jax.jit, static_argnames=("sharpen",))
def enhance_paper2(images_bhwc, brightness: float = 30.0, contrast: float = 1.4, sharpen: bool = True):
    """Returns Himel et al.'s enhancement clip(contrast·x + brightness), then `laplacian_sharpen`.

    Same shape and dtype; like OpenCV on uint8 images the intermediate image is rounded to uint8, float
    inputs stay unrounded (but clipped to [0, 255]).
    """
    check_bhwc(images_bhwc, "preprocess.py:enhance_paper2")
    y = jnp.clip(contrast * images_bhwc.astype(jnp.float32) + brightness, 0.0, 255.0)
    y = restore_dtype(y, images_bhwc.dtype)
    return laplacian_sharpen(y) if sharpen else y
