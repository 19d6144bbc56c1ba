"""A trained ensemble on disk: everything `leukax.predict` needs to classify new images.

Layout of a bundle directory:
  bundle.json   backbone name, weights id, image size, normalisation, head kind + kwargs, class names,
                mode, the referral rule (uncertainty measure + threshold), provenance;
  variables/    Orbax checkpoint of the member-stacked variables (M leading axis): head-only variables in
                "head" mode (the backbone is rebuilt from `weights`), the whole Classifier in "finetune" mode;
                in head mode optionally also "transform" ({"mean_c", "std_c", "proj_cd"}: the feature
                standardisation/PCA fitted on training data) and "ood" ({"means_kd", "precision_dd"}: the
                Mahalanobis out-of-distribution model of `leukax.uncertainty.fit_mahalanobis`), not stacked.

A fused bundle (`experiments.hybrid_gru`: one hybrid per backbone, fused with the sum rule) is a directory with
  bundle.json   kind "fused": the hybrids' names, the fusion rule, the calibration temperature, the referral
                and OOD thresholds of the FUSED ensemble, the class names and the provenance (`FusedConfig`);
  hybrids/<name>/  one single-backbone bundle per hybrid (each also usable on its own).
With H hybrids of M members each, the sum rule p = (1/H) Σ_h (1/M) Σ_m p_hm equals the mean over all H·M
members, so the fused ensemble's uncertainty is that of the H·M members taken together.
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
    temperature: float = 1.0                  # calibrated p = softmax(log p̄ / T), T fitted on validation data
    version: int = BUNDLE_VERSION


@dataclasses.dataclass
class FusedConfig:
    """A fused bundle's bundle.json: `hybrids` are the sub-bundles hybrids/<name>/; thresholds and the
    temperature belong to the fused ensemble (fitted on its validation part)."""
    hybrids: list[str]
    class_names: list[str]
    image_sizes: list[int]                    # each hybrid's input size, in the order of `hybrids`
    fusion: str = "sum"
    num_members: int = 1                      # per hybrid (equal for all, so the sum rule = the mean of all members)
    uncertainty: str = "predictive_entropy"
    referral_threshold: float | None = None
    mi_threshold: float | None = None
    ood_threshold: float | None = None        # on the mean over hybrids of their Mahalanobis OOD scores
    temperature: float = 1.0
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    kind: str = "fused"
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


def save_fused(directory, config: FusedConfig, hybrids: dict[str, tuple[BundleConfig, dict]]) -> pathlib.Path:
    """Writes a fused bundle: bundle.json (`config`) and hybrids/<name>/ (`save` of each (config, variables))."""
    directory = pathlib.Path(directory).resolve()
    if list(hybrids) != list(config.hybrids):
        raise ValueError(f"save_fused: hybrids {list(hybrids)} differ from config.hybrids {config.hybrids}")
    for name, (cfg_h, variables_m) in hybrids.items():
        save(directory / "hybrids" / name, cfg_h, variables_m)
    (directory / "bundle.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return directory


def read_config(directory) -> BundleConfig | FusedConfig:
    """Returns the bundle.json of a single-backbone or fused bundle (no variables are read).

    Raises FileNotFoundError (no bundle.json) or ValueError (unreadable or incompatible), one line each."""
    directory = pathlib.Path(directory).resolve()
    cfg_path = directory / "bundle.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a leukax model bundle (no bundle.json); train one with "
                                f"`python -m experiments.quickstart` or `python -m experiments.hybrid_gru`, or "
                                f"pass the directory it wrote")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: unreadable bundle.json ({e})") from None
    if not isinstance(raw, dict) or raw.get("version") != BUNDLE_VERSION:
        version = raw.get("version") if isinstance(raw, dict) else None
        raise ValueError(f"{cfg_path}: bundle version {version} is not {BUNDLE_VERSION}")
    cls = FusedConfig if raw.get("kind") == "fused" else BundleConfig
    try:
        return cls(**raw)
    except TypeError as e:
        raise ValueError(f"{cfg_path}: not a bundle config ({e})") from None


def load(directory) -> tuple[BundleConfig, dict]:
    """Returns (config, member-stacked variables) from a bundle directory.

    Raises FileNotFoundError (no bundle.json / variables) or ValueError (unreadable or incompatible), each
    one line naming the file and what to do; never a chained library traceback.
    """
    directory = pathlib.Path(directory).resolve()
    config = read_config(directory)
    if isinstance(config, FusedConfig):
        raise ValueError(f"{directory}: a fused bundle; its hybrids are in {directory / 'hybrids'}/ "
                         f"(leukax.predict.load_model reads both kinds)")
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
