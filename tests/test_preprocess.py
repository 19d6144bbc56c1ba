"""Tests for leukax/preprocess.py: exact small cases, Keras/scipy references, invariants, keys, jit/vmap."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from leukax import augment as aug
from leukax import preprocess as pp

RNG = np.random.default_rng(0)
IMG_U8 = RNG.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
IMG_F = IMG_U8.astype(np.float32)
OFF = aug.Paper1Aug(rotation_range=0, width_shift_range=0, height_shift_range=0, shear_range=0,
                   zoom_range=0, horizontal_flip=False, vertical_flip=False)


def warp1(img_hwc, fill_mode="nearest", cval=0.0, **params):
    m = aug.affine_matrix(img_hwc.shape[0], img_hwc.shape[1], **params)
    return np.asarray(aug.affine_warp(jnp.asarray(img_hwc)[None], m[None], fill_mode, cval)[0])


# ------------------------------------------------------------------------------------- basics
def test_normalize_kinds():
    x = np.array([[[[0, 127.5, 255]]]], np.float32)
    np.testing.assert_allclose(pp.normalize(x, "tf"), [[[[-1, 0, 1]]]])
    np.testing.assert_allclose(pp.normalize(x.astype(np.uint8), "lite"), [[[[-127 / 128, 0, 1]]]])
    np.testing.assert_allclose(pp.normalize(x, "unit"), [[[[0, 0.5, 1]]]])
    np.testing.assert_allclose(pp.normalize(x, "raw"), x)
    t = (np.array([0, 0.5, 1]) - np.array(pp.IMAGENET_MEAN)) / np.array(pp.IMAGENET_STD)
    np.testing.assert_allclose(pp.normalize(x, "torch")[0, 0, 0], t, rtol=1e-6)
    assert pp.normalize(x.astype(np.uint8), "raw").dtype == jnp.float32
    assert set(pp.NORMALIZATIONS) == {"tf", "lite", "torch", "raw", "unit"}
    feats = np.array([[0.5, -3.0, 300.0]], np.float16)  # None: not pixels (cached features), cast only
    assert pp.normalize(feats, None).dtype == jnp.float32
    np.testing.assert_array_equal(pp.normalize(feats, None), feats.astype(np.float32))
    with pytest.raises(ValueError, match="preprocess.py.*'imagenet'"):
        pp.normalize(x, "imagenet")


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "nearest"])
def test_resize_shape_dtype(method):
    y = pp.resize(IMG_U8, 8, method)
    assert y.shape == (3, 8, 8, 3) and y.dtype == jnp.uint8
    assert pp.resize(IMG_F, (12, 20), method).shape == (3, 12, 20, 3)
    # a constant image stays constant
    np.testing.assert_array_equal(pp.resize(np.full((1, 9, 9, 3), 77, np.uint8), 5, method), 77)
    # nearest 2× downsampling without antialias picks pixels; 16 -> 32 -> 16 is the identity
    np.testing.assert_array_equal(pp.resize(pp.resize(IMG_U8, 32, "nearest"), 16, "nearest", False), IMG_U8)


# ------------------------------------------------------------------------------------- affine warp
def test_identity_params_are_identity():
    np.testing.assert_array_equal(warp1(IMG_U8[0]), IMG_U8[0])
    # zoom 1 / shift 0 / rot 0 / no flips = identity through the whole augmentation, both dtypes
    key = jax.random.key(1)
    np.testing.assert_array_equal(aug.augment_paper1(key, IMG_U8, OFF), IMG_U8)
    np.testing.assert_allclose(aug.augment_paper1(key, IMG_F, OFF), IMG_F, atol=1e-4)


def test_rotation_90_of_3x3_is_rot90():
    a = np.arange(9, dtype=np.float32).reshape(3, 3, 1)
    np.testing.assert_allclose(warp1(a, theta=90.0), np.rot90(a, 1), atol=1e-5)
    np.testing.assert_allclose(warp1(a, theta=-90.0), np.rot90(a, -1), atol=1e-5)
    np.testing.assert_allclose(warp1(a, theta=180.0), np.rot90(a, 2), atol=1e-5)


def test_integer_shift_is_exact():
    a = IMG_U8[0]
    out = warp1(a, fill_mode="constant", shift_x=3 / 16, shift_y=-2 / 16)
    # output (y, x) reads input (y - 2, x + 3): content moves left by 3 and down by 2
    np.testing.assert_array_equal(out[2:, :13], a[:14, 3:])
    assert (out[:2] == 0).all() and (out[:, 13:] == 0).all()
    nearest = warp1(a, shift_x=3 / 16)
    np.testing.assert_array_equal(nearest[:, 13:], np.repeat(a[:, 15:16], 3, axis=1))


def test_flips_and_flip_twice():
    a = IMG_U8[0]
    np.testing.assert_array_equal(warp1(a, flip_h=True), a[:, ::-1])
    np.testing.assert_array_equal(warp1(a, flip_v=True), a[::-1])
    m = aug.affine_matrix(16, 16, flip_h=True, flip_v=True)
    np.testing.assert_allclose(m @ m, np.eye(3), atol=1e-6)


def test_matches_keras_apply_affine_transform():
    """Same matrix, sampling and fill as Keras' ImageDataGenerator warp (square image, tx along x)."""
    image = pytest.importorskip("keras.src.legacy.preprocessing.image")
    a = IMG_F[1]
    kw = dict(theta=30.0, tx=2.5, ty=-1.5, shear=12.0, zx=0.93, zy=1.08)
    ref = image.apply_affine_transform(a, row_axis=0, col_axis=1, channel_axis=2, fill_mode="nearest", **kw)
    ours = warp1(a, theta=30.0, shift_x=2.5 / 16, shift_y=-1.5 / 16, shear=12.0, zoom_x=0.93, zoom_y=1.08)
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    # Keras flips after the warp
    ours_f = warp1(a, theta=30.0, flip_h=True, flip_v=True)
    ref_f = image.apply_affine_transform(a, theta=30.0, row_axis=0, col_axis=1, channel_axis=2)[::-1, ::-1]
    np.testing.assert_allclose(ours_f, ref_f, atol=2e-3)


@pytest.mark.parametrize("mode", ["nearest", "reflect", "constant"])
def test_fill_modes_match_scipy(mode):
    a = IMG_F[2, :, :10]  # non-square
    m = np.asarray(aug.affine_matrix(16, 10, theta=25.0, shift_x=0.3, shift_y=-0.25, zoom_x=1.3, zoom_y=0.8))
    ours = np.asarray(aug.affine_warp(a[None], m[None], mode, cval=7.0)[0])
    # scipy works in (row, col): swap x and y of our (x, y) matrix
    p = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    mr = p @ m @ p
    ref = np.stack([scipy.ndimage.affine_transform(a[..., ch], mr[:2, :2], mr[:2, 2], order=1, mode=mode,
                                                   cval=7.0) for ch in range(3)], -1)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_augment_paper1_keys_dtype_range():
    k1, k2 = jax.random.key(0), jax.random.key(1)
    y1 = aug.augment_paper1(k1, IMG_U8)
    assert y1.shape == IMG_U8.shape and y1.dtype == jnp.uint8
    np.testing.assert_array_equal(y1, aug.augment_paper1(k1, IMG_U8))
    assert not np.array_equal(y1, aug.augment_paper1(k2, IMG_U8))
    yf = aug.augment_paper1(k1, IMG_F)
    assert yf.dtype == jnp.float32 and float(yf.min()) >= 0 and float(yf.max()) <= 255
    # per-image parameters differ within a batch and lie in the Keras ranges
    prm = aug.random_affine_params(k1, 64, aug.Paper1Aug())
    assert len(np.unique(np.asarray(prm["theta"]))) == 64
    assert np.abs(prm["theta"]).max() <= 45 and np.abs(prm["shear"]).max() <= 20
    assert np.abs(prm["shift_x"]).max() <= 0.2 and np.abs(prm["shift_y"]).max() <= 0.2
    for z in ("zoom_x", "zoom_y"):
        assert 0.9 <= float(prm[z].min()) and float(prm[z].max()) <= 1.1
    assert 0 < int(prm["flip_h"].sum()) < 64 and 0 < int(prm["flip_v"].sum()) < 64
    # one image repeated gets different warps
    same = np.repeat(IMG_U8[:1], 3, axis=0)
    outs = np.asarray(aug.augment_paper1(k1, same))
    assert len({o.tobytes() for o in outs}) == 3


def test_switches_turn_transforms_off():
    prm = aug.random_affine_params(jax.random.key(3), 8, dataclasses.replace(OFF, vertical_flip=True))
    assert (np.asarray(prm["theta"]) == 0).all() and (np.asarray(prm["zoom_x"]) == 1).all()
    assert not np.asarray(prm["flip_h"]).any() and np.asarray(prm["flip_v"]).any()


def test_only_rotation_on_rotates_a_ramp_about_the_centre():
    """rotation_range alone: every image is rotated about its centre by its drawn angle and nothing else.
    On a linear ramp f(x, y) = 2x + 3y + 10, bilinear sampling is exact, so output pixel p must equal
    f(c + R(θ)(p - c)) wherever that source point is inside the image (R = [[cos, -sin], [sin, cos]])."""
    cfg = dataclasses.replace(OFF, rotation_range=45.0)
    key = jax.random.key(4)
    h = w = 17
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp_hw = 2.0 * xs + 3.0 * ys + 10.0
    images = np.repeat(ramp_hw[None, ..., None], 3, -1).astype(np.float32)
    images = np.concatenate([images, images + 5.0])  # B = 2, so two different angles
    prm = aug.random_affine_params(key, 2, cfg)
    theta_b = np.deg2rad(np.asarray(prm["theta"], np.float64))
    assert (np.abs(theta_b) > np.deg2rad(1)).all() and (np.abs(theta_b) <= np.deg2rad(45)).all()
    out = np.asarray(aug.augment_paper1(key, images, cfg))
    c = (w - 1) / 2.0
    for b in range(2):
        cos, sin = np.cos(theta_b[b]), np.sin(theta_b[b])
        sx = c + cos * (xs - c) - sin * (ys - c)
        sy = c + sin * (xs - c) + cos * (ys - c)
        inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
        assert inside.mean() > 0.5
        expected_hw = 2.0 * sx + 3.0 * sy + 10.0 + 5.0 * b
        for ch in range(3):
            np.testing.assert_allclose(out[b, ..., ch][inside], expected_hw[inside], atol=2e-3)
        assert not np.allclose(out[b], images[b], atol=1.0)  # it did move


def test_jit_and_vmap_over_member_keys():
    keys_m = jax.random.split(jax.random.key(5), 3)
    augment_m = jax.jit(jax.vmap(aug.augment_paper1, in_axes=(0, None, None)), static_argnums=2)
    out_mb = augment_m(keys_m, IMG_U8, aug.Paper1Aug(smoothing="median"))
    assert out_mb.shape == (3,) + IMG_U8.shape and out_mb.dtype == jnp.uint8
    # member m's output is the plain augmentation with key m, then the 3×3 median
    np.testing.assert_array_equal(out_mb[1], pp.smooth(aug.augment_paper1(keys_m[1], IMG_U8), "median"))
    assert not np.array_equal(out_mb[0], out_mb[1])
    out2 = jax.jit(jax.vmap(aug.augment_paper2, in_axes=(0, None)))(keys_m, IMG_U8)
    np.testing.assert_array_equal(out2[2], aug.augment_paper2(keys_m[2], IMG_U8))


# ------------------------------------------------------------------------------------- smoothing
def test_gaussian_blur_matches_scipy_mirror():
    out = np.asarray(pp.gaussian_blur(IMG_F, sigma=1.2))
    r = int(4 * 1.2 + 0.5)
    ref = scipy.ndimage.gaussian_filter(IMG_F, sigma=(0, 1.2, 1.2, 0), mode="mirror", truncate=r / 1.2)
    np.testing.assert_allclose(out, ref, atol=1e-3)
    assert pp.gaussian_blur(IMG_U8, 1.0).dtype == jnp.uint8
    np.testing.assert_allclose(pp.gaussian_kernel1d(2.0).sum(), 1.0, rtol=1e-6)
    # mean is kept on a periodic-free constant image
    np.testing.assert_allclose(pp.smooth(np.full((1, 8, 8, 3), 50.0, np.float32), "gaussian", 1.0), 50.0,
                               rtol=1e-6)


def test_median_3x3_matches_scipy_and_removes_salt():
    out = np.asarray(pp.median_filter3x3(IMG_U8))
    ref = scipy.ndimage.median_filter(IMG_U8, size=(1, 3, 3, 1), mode="nearest")
    np.testing.assert_array_equal(out, ref)
    x = np.full((1, 7, 7, 3), 100, np.uint8)
    x[0, 3, 3] = 255
    np.testing.assert_array_equal(pp.smooth(x, "median"), 100)
    with pytest.raises(ValueError, match="unknown method"):
        pp.smooth(x, "bilateral")


# ------------------------------------------------------------------------------------- paper 2
def test_sharpen_delta_exact():
    x = np.full((1, 5, 5, 3), 100.0, np.float32)
    x[0, 2, 2] = 110.0
    y = np.asarray(pp.laplacian_sharpen(x))[0, ..., 0]
    expect = np.full((5, 5), 100.0)
    expect[2, 2] = 5 * 110 - 400  # 150
    expect[1, 2] = expect[3, 2] = expect[2, 1] = expect[2, 3] = 5 * 100 - 110 - 300  # 90
    np.testing.assert_array_equal(y, expect)
    # clipping to [0, 255]
    z = np.zeros((1, 5, 5, 1), np.uint8)
    z[0, 2, 2] = 200
    yz = np.asarray(pp.laplacian_sharpen(z))[0, ..., 0]
    assert yz[2, 2] == 255 and yz[1, 2] == 0 and yz.dtype == np.uint8


def _enhance_reference(img_hwc_u8):
    """Independent numpy version of OpenCV convertScaleAbs(1.4, 30) + filter2D(REFLECT_101), uint8."""
    y = np.clip(np.round(1.4 * img_hwc_u8.astype(np.float64) + 30), 0, 255)
    p = np.pad(y, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = y.shape[:2]
    out = np.empty_like(y)
    for i in range(h):
        for j in range(w):
            out[i, j] = 5 * p[i + 1, j + 1] - p[i, j + 1] - p[i + 2, j + 1] - p[i + 1, j] - p[i + 1, j + 2]
    return np.clip(out, 0, 255).astype(np.uint8)


def test_enhance_paper2_matches_reference():
    small = IMG_U8[:, :8, :8]
    out = np.asarray(pp.enhance_paper2(small))
    assert out.dtype == np.uint8
    for b in range(small.shape[0]):
        np.testing.assert_array_equal(out[b], _enhance_reference(small[b]))
    # without sharpening: brightness/contrast only; a dark flat image gets +30 ×1.4-scaled
    flat = np.full((1, 4, 4, 3), 50, np.uint8)
    np.testing.assert_array_equal(pp.enhance_paper2(flat, sharpen=False), 100)  # 1.4·50 + 30
    np.testing.assert_array_equal(pp.enhance_paper2(flat), 100)  # sharpening keeps a flat image
    # pure brightness shift raises the mean by exactly 30 where nothing clips
    mid = np.full((1, 4, 4, 3), 60.0, np.float32)
    np.testing.assert_allclose(pp.enhance_paper2(mid, 30, 1.0, False).mean(), 90.0)
    yf = pp.enhance_paper2(IMG_F)
    assert yf.dtype == jnp.float32 and float(yf.min()) >= 0 and float(yf.max()) <= 255


def test_augment_paper2_dihedral():
    a = np.arange(9, dtype=np.uint8).reshape(1, 3, 3, 1)
    for k in range(4):
        for fh in (False, True):
            for fv in (False, True):
                r, c = aug.dihedral_indices(3, jnp.int32(k), fh, fv)
                ref = np.rot90(a[0], k)
                ref = ref[:, ::-1] if fh else ref
                ref = ref[::-1] if fv else ref
                np.testing.assert_array_equal(a[0][r, c], ref)
    key = jax.random.key(7)
    y = aug.augment_paper2(key, IMG_U8)
    assert y.dtype == jnp.uint8 and y.shape == IMG_U8.shape
    np.testing.assert_array_equal(y, aug.augment_paper2(key, IMG_U8))
    # every output is one of the 8 dihedral images of its input (a permutation: same multiset of pixels)
    for b in range(3):
        cands = [np.rot90(IMG_U8[b], k)[:, ::s][::t] for k in range(4) for s in (1, -1) for t in (1, -1)]
        assert any(np.array_equal(np.asarray(y[b]), c) for c in cands)
    # rot90 ×4 and flip twice are identities
    r, c = aug.dihedral_indices(16, jnp.int32(1), False, False)
    x = IMG_U8[0]
    for _ in range(4):
        x = x[r, c]
    np.testing.assert_array_equal(x, IMG_U8[0])
    r, c = aug.dihedral_indices(16, jnp.int32(0), True, True)
    np.testing.assert_array_equal(IMG_U8[0][r, c][r, c], IMG_U8[0])
    # different keys give different draws over a batch of 8 copies
    many = np.repeat(IMG_U8[:1], 8, axis=0)
    assert not np.array_equal(aug.augment_paper2(jax.random.key(8), many), aug.augment_paper2(key, many))
    with pytest.raises(ValueError, match="square"):
        aug.augment_paper2(key, IMG_U8[:, :, :8])
