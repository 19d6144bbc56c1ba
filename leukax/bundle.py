"""A trained ensemble on disk: everything `leukax.predict` needs to classify new images.

Layout of a bundle directory:
  bundle.json   backbone name, weights id, image size, normalisation, head kind + kwargs, class names,
                mode, the referral rule (uncertainty measure + threshold), provenance;
  variables/    Orbax checkpoint of the member-stacked variables (M leading axis): head-only variables in
                "head" mode (the backbone is rebuilt from `weights`), the whole Classifier in "finetune" mode.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

BUNDLE_VERSION = 1


@dataclasses.dataclass
class BundleConfig:
    """What is needed to rebuild the model; stored as bundle.json."""
    backbone: str
    weights: str
    image_size: int
    normalization: str
    head: str
    head_kwargs: dict[str, Any]
    class_names: list[str]
    mode: str = "head"
    num_members: int = 1
    uncertainty: str = "predictive_entropy"
    referral_threshold: float | None = None
    backbone_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = BUNDLE_VERSION


def save(directory, config: BundleConfig, variables_m: dict) -> pathlib.Path:
    """Writes bundle.json and the member-stacked `variables_m` (leaves M×...) to `directory`; returns it."""
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bundle.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    path = directory / "variables"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, jax.tree.map(np.asarray, variables_m), force=True)
    return directory


def load(directory) -> tuple[BundleConfig, dict]:
    """Returns (config, member-stacked variables) from a bundle directory; errors name what is missing."""
    directory = pathlib.Path(directory).resolve()
    cfg_path = directory / "bundle.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a leukax model bundle (no bundle.json); train one with "
                                f"`python -m experiments.quickstart` or pass the directory it wrote")
    raw = json.loads(cfg_path.read_text())
    if raw.get("version") != BUNDLE_VERSION:
        raise ValueError(f"{cfg_path}: bundle version {raw.get('version')} is not {BUNDLE_VERSION}")
    config = BundleConfig(**raw)
    with ocp.StandardCheckpointer() as ckptr:
        variables_m = ckptr.restore(directory / "variables")
    return config, variables_m
