"""Generators for fixture datasets laid out like the access-controlled originals (shared/data/README.md).

ALL-IDB and the ASH image bank may not be redistributed, so the builders are tested on generated files with
the real names, formats, sizes (one full-size 2592x1944 smear; the rest scaled down where size does not
matter), `.xyc` centroid files and the known duplicate pairs. Pixels are smooth random colour fields.
"""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

# (file stem, (width, height)); label is the digit after "_".
ALL_IDB1_FILES = [("Im001_1", (2592, 1944)), ("Im002_1", (259, 194)), ("Im034_1", (171, 137)),
                  ("Im060_0", (171, 137)), ("Im093_0", (171, 137))]
ALL_IDB1_DUPLICATES = {"Im108_0": "Im093_0"}  # Im108_0.jpg is a copy of Im093_0.jpg
ALL_IDB2_FILES = [("Im001_1", (257, 257)), ("Im002_1", (257, 257)), ("Im003_1", (257, 190)),
                  ("Im130_0", (257, 257)), ("Im131_0", (201, 257)), ("Im223_0", (257, 257))]
ALL_IDB2_DUPLICATES = {"Im257_0": "Im223_0"}  # Im257_0.tif is a copy of Im223_0.tif
ASH_FILES = [("aml_001.jpg", (320, 240)), ("aml_002.jpg", (300, 300)), ("blast smear 3.png", (256, 200)),
             ("aml_004.png", (200, 256))]


def smooth_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Returns a PIL image: a coarse random colour field upsampled bicubically (compresses like a smear)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 230, (max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
    im = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    return im.convert(mode)


def xyc_points(seed: int, width: int, height: int, n: int) -> np.ndarray:
    """Returns float N×2 (x, y) integer-valued centroids inside the image."""
    rng = np.random.default_rng(seed + 1000)
    return np.stack([rng.integers(0, width, n), rng.integers(0, height, n)], -1).astype(np.float32)


def make_all_idb1(root: pathlib.Path) -> pathlib.Path:
    """Writes <root>/all_idb1/ImNNN_L.jpg + ImNNN_L.xyc (x y lines; empty for healthy); returns the folder."""
    folder = pathlib.Path(root) / "all_idb1"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (stem, (w, h)) in enumerate(ALL_IDB1_FILES):
        smooth_image(i, w, h).save(folder / f"{stem}.jpg", quality=90)
        pts = xyc_points(i, w, h, 2 + i) if stem.endswith("_1") else np.zeros((0, 2))
        (folder / f"{stem}.xyc").write_text("".join(f"{int(x)} {int(y)}\n" for x, y in pts))
    for dup, orig in ALL_IDB1_DUPLICATES.items():
        (folder / f"{dup}.jpg").write_bytes((folder / f"{orig}.jpg").read_bytes())
        (folder / f"{dup}.xyc").write_text("")
    return folder


def make_all_idb2(root: pathlib.Path) -> pathlib.Path:
    """Writes <root>/all_idb2/ImNNN_L.tif single-cell crops (257x257, some smaller); returns the folder."""
    folder = pathlib.Path(root) / "all_idb2"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (stem, (w, h)) in enumerate(ALL_IDB2_FILES):
        smooth_image(100 + i, w, h).save(folder / f"{stem}.tif")
    for dup, orig in ALL_IDB2_DUPLICATES.items():
        (folder / f"{dup}.tif").write_bytes((folder / f"{orig}.tif").read_bytes())
    return folder


def make_ash(root: pathlib.Path) -> pathlib.Path:
    """Writes <root>/ash_aml/ with JPEG and PNG (one RGBA) AML images; returns the folder."""
    folder = pathlib.Path(root) / "ash_aml"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, (w, h)) in enumerate(ASH_FILES):
        mode = "RGBA" if name == "aml_004.png" else "RGB"
        smooth_image(200 + i, w, h, mode).save(folder / name)
    return folder


def make_cnmc_full(root: pathlib.Path) -> pathlib.Path:
    """Writes <root>/cnmc2019/training_data/fold_{0,1}/{all,hem}/UID_<subject>_<img>_<cell>_<all|hem>.bmp
    and a renamed validation_data/C-NMC_test_prelim_phase_data/1.bmp (as in the official release)."""
    folder = pathlib.Path(root) / "cnmc2019"
    files = [("fold_0", "all", "UID_11_1_1_all.bmp"), ("fold_0", "all", "UID_11_2_1_all.bmp"),
             ("fold_0", "hem", "UID_H10_1_1_hem.bmp"), ("fold_1", "all", "UID_12_5_2_all.bmp"),
             ("fold_1", "hem", "UID_H10_7_1_hem.bmp"), ("fold_1", "hem", "UID_H22_3_1_hem.bmp")]
    for i, (fold, cls, name) in enumerate(files):
        d = folder / "training_data" / fold / cls
        d.mkdir(parents=True, exist_ok=True)
        smooth_image(300 + i, 64, 64).save(d / name)
    test = folder / "validation_data" / "C-NMC_test_prelim_phase_data"  # renamed, labels in a csv: not read
    test.mkdir(parents=True)
    smooth_image(399, 64, 64).save(test / "1.bmp")
    return folder


def make_manual_root(root: pathlib.Path) -> pathlib.Path:
    """Writes every manual fixture dataset under `root` (the layout `manual_dir` expects); returns root."""
    make_all_idb1(root)
    make_all_idb2(root)
    make_ash(root)
    make_cnmc_full(root)
    return pathlib.Path(root)
