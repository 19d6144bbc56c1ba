"""TFDS builders for the leukemia datasets (no TensorFlow needed): `get_builder(name, ...)`."""
from __future__ import annotations

from leukax.data.builders.base import (DatasetError, LeukaxBuilder, ManualDownloadError, Record, class_counts,
                                       default_data_dir, default_manual_dir, leakage_groups, pixel_hash)
from leukax.data.builders.datasets import BUILDERS, PBC_CLASSES, read_xyc, sample_dir
from leukax.data.builders.standin import BUILDERS as _STANDIN

BUILDERS.update(_STANDIN)  # all_aml_healthy_standin, lab_probe (open stand-ins, shared/data)


def names() -> list[str]:
    """Returns the builder names: all_idb1, all_idb2, ash_aml, all_idb, all_aml_healthy, cnmc2019, pbc,
    image_folder, all_aml_healthy_standin, lab_probe
    ("cnmc2019/full" selects a config)."""
    return list(BUILDERS)


def get_builder(name: str, data_dir=None, manual_dir=None, max_pixels=None, prepare: bool = True, **kwargs):
    """Returns the (prepared, unless prepare=False) builder for `name` ("name" or "name/config").

    image_folder needs `root=` (and optionally class_names=, label_regex=)."""
    base, _, config = name.partition("/")
    if base not in BUILDERS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
    if config:
        kwargs["config"] = config
    builder = BUILDERS[base](data_dir=data_dir, manual_dir=manual_dir, max_pixels=max_pixels, **kwargs)
    if prepare:
        builder.download_and_prepare()
    return builder
