"""read_image: every pixel format we meet in microscopy, and a clear error for each kind of bad file."""
import io
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from leukax.data.imageio import ImageReadError, decode_image, image_size, read_image

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)


def _save(tmp_path, name, im, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_rgb_png_roundtrip(tmp_path):
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(RGB)))
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, RGB)


def test_rgba_composited_over_white(tmp_path):
    alpha = np.full((12, 10, 1), 255, np.uint8)
    alpha[0, 0] = 0
    alpha[1, 1] = 128
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(np.concatenate([RGB, alpha], -1))))
    np.testing.assert_array_equal(out[2:], RGB[2:])  # opaque: unchanged
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent: white
    want = np.rint((RGB[1, 1] / 255 * (128 / 255) + (1 - 128 / 255)) * 255)
    np.testing.assert_allclose(out[1, 1], want, atol=1)


def test_palette_and_palette_transparency(tmp_path):
    p_img = Image.fromarray(RGB).quantize(8)
    out = read_image(_save(tmp_path, "p.png", p_img))
    np.testing.assert_array_equal(out, np.asarray(p_img.convert("RGB")))
    p_img.info["transparency"] = 0
    out_t = read_image(_save(tmp_path, "pt.png", p_img, transparency=0))
    idx = np.asarray(p_img) == 0
    assert idx.any() and (out_t[idx] == 255).all()


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_grayscale_8bit(tmp_path, mode):
    g = RNG.integers(0, 256, (9, 7), dtype=np.uint8)
    im = Image.fromarray(g).convert(mode)
    out = read_image(_save(tmp_path, f"g_{mode}.png", im))
    want = np.asarray(im.convert("L"))
    assert out.shape == (9, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], want)


def test_grayscale_16bit_scaled_not_clipped(tmp_path):
    g16 = np.array([[0, 257, 1000], [32768, 65280, 65535]], np.uint16)
    for name, write in [("g16.png", lambda p: Image.fromarray(g16).save(p)),
                        ("g16.tif", lambda p: tifffile.imwrite(p, g16))]:
        p = tmp_path / name
        write(p)
        out = read_image(p)
        np.testing.assert_array_equal(out[..., 0], np.rint(g16 / 257.0).astype(np.uint8))
        assert (out[..., 0] == out[..., 2]).all()


def test_mode_I_32bit(tmp_path):
    g = np.array([[0, 65535], [-5, 70000]], np.int32)
    p = _save(tmp_path, "i.tif", Image.fromarray(g, mode="I"))
    out = read_image(p)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [0, 255]])


def test_rgb_16bit_tiff_via_tifffile(tmp_path):
    rgb16 = RGB.astype(np.uint16) * 257
    p = tmp_path / "rgb16.tif"
    tifffile.imwrite(p, rgb16, photometric="rgb")
    np.testing.assert_array_equal(read_image(p), RGB)
    p2 = tmp_path / "planar.tif"
    tifffile.imwrite(p2, np.moveaxis(rgb16, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(p2), RGB)


def test_float_tiff(tmp_path):
    p = tmp_path / "f.tif"
    tifffile.imwrite(p, (RGB / 255.0).astype(np.float32), photometric="rgb")
    np.testing.assert_allclose(read_image(p), RGB, atol=1)
    tifffile.imwrite(p, (RGB * 2.0).astype(np.float32), photometric="rgb")
    with pytest.raises(ImageReadError, match="outside"):
        read_image(p)


def test_cmyk_jpeg(tmp_path):
    im = Image.fromarray(RGB).convert("CMYK")
    out = read_image(_save(tmp_path, "c.jpg", im, quality=95))
    np.testing.assert_allclose(out.astype(int), np.asarray(im.convert("RGB")).astype(int), atol=40)
    assert out.shape == (12, 10, 3)


def test_errors_name_file_and_reason(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.jpg: empty file"):
        read_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.png: not a recognised image format"):
        read_image(text)
    buf = io.BytesIO()
    Image.fromarray(np.tile(RGB, (20, 20, 1))).save(buf, "JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="trunc.jpg: corrupt or truncated"):
        read_image(trunc)
    bad_tif = tmp_path / "bad.tif"
    bad_tif.write_bytes(b"II*\x00" + b"\xff" * 40)
    with pytest.raises(ImageReadError, match="bad.tif: unreadable TIFF"):
        read_image(bad_tif)
    with pytest.raises(ImageReadError, match="missing.png: cannot read file"):
        read_image(tmp_path / "missing.png")


def _png_claiming(width, height):
    """Returns PNG bytes whose header (with a valid CRC) claims width×height pixels."""
    png = io.BytesIO()
    Image.fromarray(RGB).save(png, "PNG")
    raw = bytearray(png.getvalue())
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    return bytes(raw)


def test_zero_size_image(tmp_path):
    p = tmp_path / "zero.png"
    p.write_bytes(_png_claiming(0, 12))
    with pytest.raises(ImageReadError, match="zero.png: (zero-size|not a recognised)"):
        read_image(p)


def test_too_large_checked_before_decoding(tmp_path):
    p = _save(tmp_path, "big.png", Image.fromarray(RGB))
    with pytest.raises(ImageReadError, match="big.png: too large: 10x12 = 120 pixels > max_pixels=100"):
        read_image(p, max_pixels=100)
    with pytest.raises(ImageReadError, match="too large"):
        read_image(p, max_pixels=119)
    assert read_image(p, max_pixels=120).shape == (12, 10, 3)
    assert read_image(p).shape == (12, 10, 3)  # default limit: 64 Mpx
    # A header claiming 100k x 100k pixels: rejected from the header alone (the data is not there).
    with pytest.raises(ImageReadError, match="bomb.png: too large: 9000x9000 = 81000000 pixels > max_pixels=64000000"):
        decode_image(_png_claiming(9000, 9000), name="bomb.png")
    with pytest.raises(ImageReadError, match="bomb.png: too large"):  # beyond PIL's own hard limit
        decode_image(_png_claiming(100_000, 100_000), name="bomb.png", max_pixels=10**12)


def test_image_size_from_header(tmp_path):
    data = _save(tmp_path, "s.png", Image.fromarray(RGB)).read_bytes()
    assert image_size(data) == (12, 10)


def test_real_aml_lmu_rgba_tiff(shared_dir):
    files = sorted((shared_dir / "data" / "aml-lmu-sample" / "images").glob("*.tiff"))
    assert len(files) == 50
    with Image.open(files[0]) as im:
        assert im.mode == "RGBA"
        rgba = np.asarray(im)
    out = read_image(files[0])
    assert out.shape == (400, 400, 3) and out.dtype == np.uint8
    assert (rgba[..., 3] == 255).all()  # opaque, so compositing keeps the colours exactly
    np.testing.assert_array_equal(out, rgba[..., :3])
