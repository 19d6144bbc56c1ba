"""A trained ensemble on disk: everything `leukax.predict` needs to classify new images.

Layout of a bundle directory:
  bundle.json   backbone name, weights id, image size, normalisation, head kind + kwargs, class names,
                mode, the referral rule (uncertainty measure + threshold), provenance;
  variables/    Orbax checkpoint of the member-stacked variables (M leading axis): head-only variables in
                "head" mode (the backbone is rebuilt from `weights`), the whole Classifier in "finetune" mode;
                in head mode optionally also "transform" ({"mean_c", "std_c", "proj_cd"}: the feature
                standardisation/PCA fitted on training data) and "ood" ({"means_kd", "precision_dd"}: the
                Mahalanobis out-of-distribution model of `leukax.uncertainty.fit_mahalanobis`), not stacked.
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
    views: str = "none"                       # views averaged at prediction (TTA), leukax.train.views
    mi_threshold: float | None = None         # refer when the mutual information (epistemic) is above
    ood_threshold: float | None = None        # refer when the Mahalanobis OOD score is above
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
    """Returns (config, member-stacked variables) from a bundle directory.

    Raises FileNotFoundError (no bundle.json / variables) or ValueError (unreadable or incompatible), each
    one line naming the file and what to do; never a chained library traceback.
    """
    directory = pathlib.Path(directory).resolve()
    cfg_path = directory / "bundle.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a leukax model bundle (no bundle.json); train one with "
                                f"`python -m experiments.quickstart` or pass the directory it wrote")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: unreadable bundle.json ({e})") from None
    if not isinstance(raw, dict) or raw.get("version") != BUNDLE_VERSION:
        version = raw.get("version") if isinstance(raw, dict) else None
        raise ValueError(f"{cfg_path}: bundle version {version} is not {BUNDLE_VERSION}")
    try:
        config = BundleConfig(**raw)
    except TypeError as e:
        raise ValueError(f"{cfg_path}: not a bundle config ({e})") from None
    var_path = directory / "variables"
    if not var_path.is_dir():
        raise FileNotFoundError(f"{var_path}: missing (the bundle holds no trained variables)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            variables_m = ckptr.restore(var_path)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore errors of a damaged checkpoint
        raise ValueError(f"{var_path}: cannot restore the ensemble's variables, damaged or incomplete "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    return config, variables_m
