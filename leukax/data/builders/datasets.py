"""The leukemia datasets as TFDS builders (no TensorFlow needed); see base.py for what is recorded.

Manual data live under one root (`manual_dir`, default $LEUKAX_MANUAL_DIR or <data_dir>/manual), one folder
per dataset: `all_idb1/`, `all_idb2/`, `ash_aml/`, `cnmc2019/`, `pbc/` (the official folder names
`ALL_IDB1`, `ALL_IDB2`, `C-NMC_Leukemia`, `PBC_dataset_normal_DIB` work too). A single-dataset builder also
accepts `manual_dir` pointing straight at its own folder.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.resources
import logging
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from leukax.data.builders.base import (DatasetError, LeukaxBuilder, ManualDownloadError, Record, is_image,
                                       list_images)

ALL_IDB_URL = "https://scotti.di.unimi.it/all/"
ASH_URL = "https://imagebank.hematology.org/"
CNMC_DOI = "doi:10.7937/tcia.2019.dc64i46r (https://doi.org/10.7937/tcia.2019.dc64i46r)"
PBC_DOI = "doi:10.17632/snkd93bnjr.1 (https://data.mendeley.com/datasets/snkd93bnjr/1)"
PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil",
               "platelet")
ALL_IDB_CITATION = ("Labati R.D., Piuri V., Scotti F. (2011) ALL-IDB: the acute lymphoblastic leukemia image "
                    "database for image processing. IEEE ICIP, pp. 2045-2048. doi:10.1109/ICIP.2011.6115881")
log = logging.getLogger("leukax.data")
_IDB1_RE = re.compile(r"^Im(\d+)_([01])\.jpe?g$", re.IGNORECASE)
_IDB2_RE = re.compile(r"^Im(\d+)_([01])\.tiff?$", re.IGNORECASE)
_CNMC_RE = re.compile(r"^UID_(H?\d+)_\d+_\d+_(all|hem)\.(bmp|png)$", re.IGNORECASE)


def find_manual(root: pathlib.Path, aliases: tuple[str, ...], dataset: str, what: str, url: str,
                expect: str, allow_root: bool = True) -> pathlib.Path:
    """Returns the first of root/<alias> (or root itself, if allow_root) holding image files, else raises
    ManualDownloadError saying what to download, from where, and where to put it."""
    for cand in [root / a for a in aliases] + ([root] if allow_root else []):
        if cand.is_dir() and any(is_image(p) for p in cand.rglob("*")):
            return cand
    raise ManualDownloadError(
        f"{dataset}: no images found under {root / aliases[0]}. This dataset must be downloaded by hand: "
        f"{what}, from {url}. Put {expect} in {root / aliases[0]}/ (subfolders are fine), or pass "
        f"manual_dir=<folder> / set LEUKAX_MANUAL_DIR to the root that holds it.")


def _strict(files: list[pathlib.Path], pattern: re.Pattern, folder: pathlib.Path, dataset: str, expect: str):
    bad = [str(p.relative_to(folder)) for p in files if not pattern.match(p.name)]
    if bad:
        raise DatasetError(f"{dataset}: image files in {folder} not named {expect} (nothing is skipped "
                           f"silently; move them out): {bad[:10]}")


def read_xyc(path: pathlib.Path) -> np.ndarray:
    """Returns float32 N×2 (x, y) blast centroids from an ALL-IDB1 .xyc file (N = 0 for an empty file)."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        try:
            if len(parts) != 2:
                raise ValueError(f"{len(parts)} fields")
            rows.append([float(parts[0]), float(parts[1])])
        except ValueError as e:
            raise DatasetError(f"{path}:{i}: expected an 'x y' pair, got {line!r} ({e})") from e
    return np.asarray(rows, np.float32).reshape(-1, 2)


def all_idb1_records(root: pathlib.Path, prefix: str = "") -> list[Record]:
    """Returns ALL-IDB1 records: ImNNN_L.jpg, label L, xyc centroids from ImNNN_L.xyc anywhere in the tree."""
    folder = find_manual(root, ("all_idb1", "ALL_IDB1"), "all_idb1",
                         "ALL-IDB1 (108 full blood-smear JPEGs ImNNN_L.jpg and their ImNNN_L.xyc files)",
                         f"the ALL-IDB request page {ALL_IDB_URL}", "the ImNNN_L.jpg and ImNNN_L.xyc files",
                         allow_root=not prefix)
    files = list_images(folder)
    _strict(files, _IDB1_RE, folder, "all_idb1", "ImNNN_L.jpg")
    xycs = {p.stem.lower(): p for p in folder.rglob("*.xyc")}
    out = []
    for p in files:
        x = xycs.get(p.stem.lower())
        if x is None:
            raise DatasetError(f"all_idb1: {p} has no {p.stem}.xyc centroid file (empty for healthy images)")
        out.append(Record(p, int(_IDB1_RE.match(p.name).group(2)), prefix + p.name, source="all_idb1",
                          xyc=read_xyc(x)))
    return out


def all_idb2_records(root: pathlib.Path, prefix: str = "") -> list[Record]:
    """Returns ALL-IDB2 records: single-cell crops ImNNN_L.tif, label L."""
    folder = find_manual(root, ("all_idb2", "ALL_IDB2"), "all_idb2",
                         "ALL-IDB2 (260 single-cell TIFF crops ImNNN_L.tif)",
                         f"the ALL-IDB request page {ALL_IDB_URL}", "the ImNNN_L.tif files", allow_root=not prefix)
    files = list_images(folder)
    _strict(files, _IDB2_RE, folder, "all_idb2", "ImNNN_L.tif")
    return [Record(p, int(_IDB2_RE.match(p.name).group(2)), prefix + p.name, source="all_idb2") for p in files]


def ash_records(root: pathlib.Path, label: int = 0, prefix: str = "") -> list[Record]:
    """Returns ASH image-bank AML records: every image under the folder, one class."""
    folder = find_manual(root, ("ash_aml", "ASH"), "ash_aml",
                         "acute myeloid leukemia (AML) images from the American Society of Hematology image bank",
                         ASH_URL, "the JPEG/PNG images (one plain folder)", allow_root=not prefix)
    return [Record(p, label, prefix + str(p.relative_to(folder)), source="ash_aml") for p in list_images(folder)]


def folder_records(root: pathlib.Path, class_names=None, label_regex: str | None = None,
                   dataset: str = "image_folder") -> tuple[list[Record], tuple[str, ...]]:
    """Returns (records, class names) for a class_name/*.ext tree (or flat files + `label_regex` whose
    group 1 is the class). Class names are sorted unless given; unknown or empty classes are errors."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DatasetError(f"{dataset}: {root} is not a folder")
    files = list_images(root)
    if not files:
        raise DatasetError(f"{dataset}: no image files ({', '.join(e[1:] for e in ('.jpg', '.png', '.tif'))}, "
                           f"...) under {root}")
    if label_regex:
        rx = re.compile(label_regex)
        found = {}
        for p in files:
            m = rx.search(p.name)
            if not m:
                raise DatasetError(f"{dataset}: {p} does not match label_regex {label_regex!r}")
            found[p] = m.group(1)
    else:
        loose = [p.name for p in files if p.parent == root]
        if loose:
            raise DatasetError(f"{dataset}: images directly in {root} belong to no class folder: {loose[:10]}")
        found = {p: p.relative_to(root).parts[0] for p in files}
    names = tuple(class_names) if class_names else tuple(sorted(set(found.values())))
    unknown = sorted(set(found.values()) - set(names))
    if unknown:
        raise DatasetError(f"{dataset}: unknown class(es) {unknown} in {root}; expected {list(names)}")
    empty = [n for n in names if n not in set(found.values())]
    if empty:
        raise DatasetError(f"{dataset}: no images for class(es) {empty} in {root}")
    index = {n: i for i, n in enumerate(names)}
    return [Record(p, index[c], str(p.relative_to(root)), source=c) for p, c in found.items()], names


class AllIdb1(LeukaxBuilder, skip_registration=True):
    name = "all_idb1"
    CLASS_NAMES = ("healthy", "ALL")
    DESCRIPTION = "ALL-IDB1: 108 full blood smears (label 1 = ALL) with blast centroids (xyc)."
    HOMEPAGE = ALL_IDB_URL
    CITATION = ALL_IDB_CITATION
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Request ALL-IDB at {ALL_IDB_URL}; put ALL_IDB1 in <manual_dir>/all_idb1/."

    def _records(self):
        return all_idb1_records(self._manual_root)


class AllIdb2(LeukaxBuilder, skip_registration=True):
    name = "all_idb2"
    CLASS_NAMES = ("healthy", "ALL")
    DESCRIPTION = "ALL-IDB2: 260 single-cell crops (label 1 = ALL), 257x257 (11 smaller)."
    HOMEPAGE = ALL_IDB_URL
    CITATION = ALL_IDB_CITATION
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Request ALL-IDB at {ALL_IDB_URL}; put ALL_IDB2 in <manual_dir>/all_idb2/."

    def _records(self):
        return all_idb2_records(self._manual_root)


class AshAml(LeukaxBuilder, skip_registration=True):
    name = "ash_aml"
    CLASS_NAMES = ("AML",)
    DESCRIPTION = "AML images from the ASH image bank (one class)."
    HOMEPAGE = ASH_URL
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download AML images from {ASH_URL}; put them in <manual_dir>/ash_aml/."

    def _records(self):
        return ash_records(self._manual_root)


class AllIdb(LeukaxBuilder, skip_registration=True):
    name = "all_idb"
    CLASS_NAMES = ("healthy", "ALL")
    DESCRIPTION = "ALL-IDB1 + ALL-IDB2, binary ALL vs healthy (Akter et al. 2024); `source` says which."
    HOMEPAGE = ALL_IDB_URL
    CITATION = ALL_IDB_CITATION

    def _records(self):
        return (all_idb1_records(self._manual_root, "all_idb1/")
                + all_idb2_records(self._manual_root, "all_idb2/"))


class AllAmlHealthy(LeukaxBuilder, skip_registration=True):
    name = "all_aml_healthy"
    CLASS_NAMES = ("ALL", "AML", "healthy")
    DESCRIPTION = "ALL and healthy from ALL-IDB2 + AML from the ASH image bank (Himel et al. 2024)."

    def _records(self):
        idb2 = all_idb2_records(self._manual_root, "all_idb2/")
        for r in idb2:
            r.label = 0 if r.label == 1 else 2
        return idb2 + ash_records(self._manual_root, label=1, prefix="ash_aml/")


def sample_dir() -> pathlib.Path:
    """Returns the folder of the embedded 60-image C-NMC 2019 sample (images/ + labels.csv)."""
    return pathlib.Path(str(importlib.resources.files("leukax.data") / "sample" / "cnmc2019"))


def cnmc_records(folder: pathlib.Path, prefix: str = "") -> list[Record]:
    """Returns C-NMC records from a labels.csv (filename,subject,class,label) or from UID_<subject>_..._<all|hem>
    file names (the official training_data/fold_*/{all,hem}/ layout); label 1 = all, 0 = hem."""
    csvs = sorted(folder.rglob("labels.csv"))
    if csvs:
        out = []
        for path in csvs:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    cand = [path.parent / row["filename"], path.parent / "images" / row["filename"]]
                    img = next((c for c in cand if c.is_file()), None)
                    if img is None:
                        raise DatasetError(f"cnmc2019: {path} lists {row['filename']}, which is not in "
                                           f"{path.parent} or {path.parent / 'images'}")
                    label = int(row["label"])
                    if (label, row["class"].lower()) not in ((1, "all"), (0, "hem")):
                        raise DatasetError(f"cnmc2019: {path}: {row['filename']} has class {row['class']!r} "
                                           f"and label {label}; expected all=1 or hem=0")
                    out.append(Record(img, label, prefix + str(img.relative_to(folder)), subject=str(row["subject"]),
                                      source="cnmc2019"))
        return out
    files = list_images(folder)
    _strict(files, _CNMC_RE, folder, "cnmc2019", "UID_<subject>_<image>_<cell>_<all|hem>.bmp")
    return [Record(p, int(_CNMC_RE.match(p.name).group(2).lower() == "all"), prefix + str(p.relative_to(folder)),
                   subject=_CNMC_RE.match(p.name).group(1), source=p.parent.parent.name) for p in files]


class Cnmc2019(LeukaxBuilder, skip_registration=True):
    """C-NMC 2019 (B-ALL vs normal): config `sample` = the embedded 60 cells, `full` = the manual release."""
    name = "cnmc2019"
    CLASS_NAMES = ("hem", "all")
    DESCRIPTION = "C-NMC 2019 single segmented cells, label 1 = all (B-ALL), 0 = hem; `subject` kept."
    HOMEPAGE = "https://doi.org/10.7937/tcia.2019.dc64i46r"
    CITATION = "Gupta A., Gupta R. (2019) ALL Challenge dataset of ISBI 2019, TCIA. doi:10.7937/tcia.2019.dc64i46r"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="sample", description="embedded 60-image sample"),
                       tfds.core.BuilderConfig(name="full", description="full release from manual_dir")]

    def _records(self):
        if self.builder_config.name == "sample":
            return cnmc_records(sample_dir())
        folder = find_manual(self._manual_root, ("cnmc2019", "C-NMC_Leukemia"), "cnmc2019",
                             "the C-NMC 2019 release (C-NMC_Leukemia: training_data/fold_*/{all,hem}/*.bmp)",
                             f"The Cancer Imaging Archive, {CNMC_DOI}",
                             "C-NMC_Leukemia/training_data (or images + labels.csv with "
                             "filename,subject,class,label)")
        if (folder / "training_data").is_dir():  # the official release: use its labelled training folds
            others = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name != "training_data")
            log.info("cnmc2019: reading %s/training_data; not reading %s (renamed test images)", folder, others)
            return cnmc_records(folder / "training_data", prefix="training_data/")
        return cnmc_records(folder)


class Pbc(LeukaxBuilder, skip_registration=True):
    name = "pbc"
    CLASS_NAMES = PBC_CLASSES
    DESCRIPTION = "PBC dataset of normal peripheral blood cells (Acevedo et al. 2020), 8 class folders."
    HOMEPAGE = "https://data.mendeley.com/datasets/snkd93bnjr/1"
    CITATION = "Acevedo A. et al. (2020) Data in Brief 30:105474. doi:10.1016/j.dib.2020.105474"

    def _records(self):
        folder = find_manual(self._manual_root, ("pbc", "PBC_dataset_normal_DIB"), "pbc",
                             "the PBC dataset (PBC_dataset_normal_DIB with 8 class folders)", PBC_DOI,
                             f"the class folders {', '.join(PBC_CLASSES)}")
        while not any((folder / c).is_dir() for c in PBC_CLASSES):
            subs = [d for d in folder.iterdir() if d.is_dir()]
            if len(subs) != 1:
                raise DatasetError(f"pbc: no class folders {PBC_CLASSES} in {folder}")
            folder = subs[0]
        return folder_records(folder, PBC_CLASSES, dataset="pbc")[0]


SUBJECTS_CSV = "subjects.csv"


def read_subjects_csv(path: pathlib.Path, root: pathlib.Path, records: list[Record],
                      dataset: str = "image_folder") -> None:
    """Sets `subject` of `records` from a CSV with columns file,subject (file relative to `root`, e.g.
    blast/img1.png, or a bare file name when that name is unique); files it does not list keep no subject."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{dataset}: cannot read {path} ({e})") from None
    if not rows or not {"file", "subject"} <= set(rows[0]):
        raise DatasetError(f"{dataset}: {path} needs a header with the columns file,subject")
    by_rel = {r.filename.replace("\\", "/"): r for r in records}
    by_name: dict[str, list[Record]] = {}
    for r in records:
        by_name.setdefault(r.path.name, []).append(r)
    unknown = []
    for i, row in enumerate(rows, 2):
        key = (row["file"] or "").strip().replace("\\", "/")
        rec = by_rel.get(key) or (by_name[key][0] if len(by_name.get(key, ())) == 1 else None)
        if rec is None:
            unknown.append(f"line {i}: {key!r}")
            continue
        rec.subject = str(row["subject"] or "").strip()
    if unknown:
        raise DatasetError(f"{dataset}: {path} names files that are not images under {root} (or whose name is "
                           f"not unique): {unknown[:10]}")


class ImageFolder(LeukaxBuilder, skip_registration=True):
    """A lab's own images: one subfolder per class (class_name/*.ext, the torchvision/TFDS ImageFolder
    convention), or flat files + `label_regex`. `root` defaults to `manual_dir`, so every experiment reaches it
    with `--dataset=image_folder --manual_dir=DIR`. Subjects (patient, slide) come from `groups_csv` or, when
    present, DIR/subjects.csv (columns file,subject): a split then keeps each subject on one side. Unreadable
    files are named in a warning and left out; mixed sizes and modes (RGBA, grayscale, 16-bit TIFF) are
    decoded to RGB by `leukax.data.imageio`. The config name hashes the root path, the file list (path, size,
    mtime), the class names, the regex and the subjects CSV, so a changed folder is rebuilt."""
    name = "image_folder"
    SKIP_UNREADABLE = True

    def __init__(self, root=None, *, class_names=None, label_regex: str | None = None, groups_csv=None,
                 **kwargs):
        root = root if root is not None else kwargs.get("manual_dir")
        if root is None:
            raise DatasetError("image_folder: which folder? pass --manual_dir=DIR (one subfolder per class)")
        self._root = pathlib.Path(root).expanduser().resolve()
        records, names = folder_records(self._root, class_names, label_regex)
        if len(names) < 2:
            raise DatasetError(f"image_folder: {self._root} has one class ({names[0]}); a classifier needs at "
                               "least two class subfolders")
        csv_path = pathlib.Path(groups_csv).expanduser() if groups_csv else self._root / SUBJECTS_CSV
        if groups_csv and not csv_path.is_file():
            raise DatasetError(f"image_folder: groups CSV {csv_path} not found")
        h = hashlib.sha1(f"{self._root}|{names}|{label_regex}".encode())
        if csv_path.is_file():
            read_subjects_csv(csv_path, self._root, records)
            h.update(csv_path.read_bytes())
        self._records_names = records, names
        for r in records:
            st = r.path.stat()
            h.update(f"|{r.filename}:{st.st_size}:{st.st_mtime_ns}".encode())
        slug = re.sub(r"[^a-z0-9]+", "_", self._root.name.lower()).strip("_") or "root"
        config = tfds.core.BuilderConfig(name=f"{slug}_{h.hexdigest()[:10]}", description=str(self._root))
        super().__init__(config=config, **kwargs)

    @property
    def class_names(self):
        return self._records_names[1]

    def _records(self):
        return self._records_names[0]

    def _check_kept(self, records):
        super()._check_kept(records)
        empty = sorted(set(self.class_names) - {self.class_names[r.label] for r in records})
        if empty:
            raise DatasetError(f"image_folder: no readable images left for class(es) {empty} in {self._root}")


BUILDERS = {b.name: b for b in (AllIdb1, AllIdb2, AshAml, AllIdb, AllAmlHealthy, Cnmc2019, Pbc, ImageFolder)}
