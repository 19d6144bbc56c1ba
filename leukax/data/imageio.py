"""Decode any microscopy image file into uint8 RGB, or fail with the file name and the reason.

Conventions (the same for every dataset, so the models always see H×W×3 uint8):
- Alpha (RGBA, LA, PA, palette with transparency, TIFF extra samples) is composited over WHITE:
  transparent pixels become bright background, like the slide around a cell, instead of the
  undefined colour stored under alpha 0. Fully opaque images (the AML-LMU TIFFs) are unchanged.
- Grayscale (1, L, LA, I;16*, I) is replicated to three channels.
- 16-bit data is scaled to 8 bits as round(x * 255 / 65535) (PIL's own convert would clip at 255);
  PIL mode "I" (32-bit int, what PIL gives for some 16-bit files) is read as 16-bit, clipped to [0, 65535].
- Float data must lie in [0, 1] and is scaled by 255.
- CMYK, YCbCr, LAB, HSV go through PIL's convert("RGB").
- Multi-frame files give their first frame; EXIF orientation is ignored (raw pixel order, as Keras/TF).
- Decompression-bomb check: the pixel count from the header is compared to `max_pixels`
  (an argument; default `DEFAULT_MAX_PIXELS` = 64 Mpx) BEFORE any pixel is decoded.
TIFFs that PIL cannot decode (e.g. 16-bit RGB, planar, exotic compression) are read with tifffile.
"""
from __future__ import annotations

import io
import pathlib
import warnings

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageReadError(ValueError):
    """An image file that cannot be turned into RGB pixels; `path` and `reason` say which and why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def read_image(path, max_pixels: int | None = None) -> np.ndarray:
    """Returns the image at `path` as np.uint8 H×W×3 (see the module docstring for conversions)."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e.strerror or e})") from e
    return decode_image(data, name=path, max_pixels=max_pixels)


def image_size(data: bytes, name="<bytes>") -> tuple[int, int]:
    """Returns (height, width) from the header of encoded image bytes, without decoding pixels."""
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size[1], im.size[0]
    except Exception:  # noqa: BLE001 - fall back to tifffile / explicit error below
        if data[:4] in _TIFF_MAGIC:
            shape = _tiff_shape(data, name)
            return shape[0], shape[1]
        raise ImageReadError(name, "not a recognised image format") from None


def decode_image(data: bytes, name="<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Returns encoded image bytes decoded to np.uint8 H×W×3; `name` is used in error messages."""
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    is_tiff = data[:4] in _TIFF_MAGIC
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageReadError(name, f"too large: over PIL's decompression-bomb limit ({e})") from e
    except Exception as e:  # noqa: BLE001
        if is_tiff:
            return _decode_tiff(data, name, max_pixels, pil_error=e)
        raise ImageReadError(name, f"not a recognised image format ({type(e).__name__})") from e
    _check_size(name, im.size[1], im.size[0], max_pixels)
    if is_tiff and _pil_tiff_lossy(im):
        return _decode_tiff(data, name, max_pixels, pil_error=None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.seek(0)
            im.load()
    except Exception as e:  # noqa: BLE001
        if is_tiff:
            return _decode_tiff(data, name, max_pixels, pil_error=e)
        raise ImageReadError(name, f"corrupt or truncated image data ({e})") from e
    return _pil_to_rgb8(im, name)


def _pil_tiff_lossy(im: Image.Image) -> bool:
    """True for TIFF layouts PIL reads lossily or wrongly: >8-bit colour, planar, float samples."""
    tags = getattr(im, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    planar = tags.get(284, 1)
    sample_format = tags.get(339, (1,))
    sample_format = sample_format if isinstance(sample_format, tuple) else (sample_format,)
    return (len(bits) > 1 and max(bits) > 8) or (planar == 2 and len(bits) > 1) or 3 in sample_format


def _check_size(name, height: int, width: int, max_pixels: int) -> None:
    if height <= 0 or width <= 0:
        raise ImageReadError(name, f"zero-size image ({width}x{height})")
    if height * width > max_pixels:
        raise ImageReadError(
            name, f"too large: {width}x{height} = {height * width} pixels > max_pixels={max_pixels} "
            "(decompression-bomb check; raise max_pixels, e.g. predict --max_pixels, if the file is trusted)")


def _pil_to_rgb8(im: Image.Image, name) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    elif mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGB", "RGBA", "L", "LA", "1"):
        return _array_to_rgb8(np.asarray(im.convert("L") if mode == "1" else im), name)
    if mode.startswith("I;16"):
        return _array_to_rgb8(np.asarray(im).astype(np.uint16), name)
    if mode == "I":
        return _array_to_rgb8(np.clip(np.asarray(im), 0, 65535).astype(np.uint16), name)
    if mode == "F":
        return _array_to_rgb8(np.asarray(im), name)
    try:  # CMYK, YCbCr, LAB, HSV, RGBX, RGBa, La ...
        return _array_to_rgb8(np.asarray(im.convert("RGB")), name)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(name, f"unsupported image mode {mode!r} ({e})") from e


def _array_to_rgb8(arr: np.ndarray, name) -> np.ndarray:
    """Returns an H×W, H×W×1..4 array of any supported dtype as uint8 H×W×3 (alpha over white)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ImageReadError(name, f"unsupported pixel array shape {arr.shape}")
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0 if arr.shape[-1] in (2, 4) else None
    elif arr.dtype == bool:
        arr, x = arr.astype(np.uint8) * 255, None
        if arr.shape[-1] in (2, 4):
            x = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageReadError(name, "float image with values outside [0, 1]")
        x = arr.astype(np.float32)
    else:
        raise ImageReadError(name, f"unsupported pixel dtype {arr.dtype}")
    if x is None:  # uint8 without alpha: exact, no float round trip
        return np.ascontiguousarray(np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr)
    if x.shape[-1] in (2, 4):
        color, alpha = x[..., :-1], x[..., -1:]
        x = color * alpha + (1.0 - alpha)  # composite over white
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8))


def _tiff_shape(data: bytes, name) -> tuple:
    import tifffile
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            shape = page.shape
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and len(shape) == 3:
                shape = (shape[1], shape[2], shape[0])
            return tuple(shape) if len(shape) >= 2 else (0, 0)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(name, f"unreadable TIFF ({e})") from e


def _decode_tiff(data: bytes, name, max_pixels: int, pil_error: Exception) -> np.ndarray:
    import tifffile
    shape = _tiff_shape(data, name)
    _check_size(name, shape[0], shape[1], max_pixels)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            arr = page.asarray()
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and arr.ndim == 3:
                arr = np.moveaxis(arr, 0, -1)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(name, f"unreadable TIFF (PIL: {pil_error}; tifffile: {e})") from e
    if arr.dtype.kind in "iu" and arr.dtype not in (np.uint8, np.uint16):
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageReadError(name, f"unsupported TIFF pixel range for dtype {arr.dtype}")
        arr = arr.astype(np.uint16)
    return _array_to_rgb8(arr, name)


def resize_image(image_hw3: np.ndarray, size: int) -> np.ndarray:
    """Returns uint8 size×size×3: the whole image squashed to a square (aspect ratio NOT kept, as Keras'
    image_size= loaders do) with PIL bicubic, which widens its kernel when shrinking (antialiased)."""
    if image_hw3.shape[:2] == (size, size):
        return image_hw3
    return np.asarray(Image.fromarray(image_hw3).resize((size, size), Image.Resampling.BICUBIC))
