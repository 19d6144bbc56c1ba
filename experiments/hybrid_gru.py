"""Akter et al. 2024: hybrid CNN-GRU deep ensembles fused with the sum rule.

Command:   python -m experiments.hybrid_gru                          (writes results/hybrid_gru/)
           python -m experiments.hybrid_gru --dataset=all_idb2 --manual_dir=<ALL-IDB folder> --hparams=bo
           python -m experiments.hybrid_gru --protocol=paper_80_20 --leaky     (the paper's own split)
Runtime:   `--members=3` on the embedded sample (60 images, 224 px, 3 backbones, 5 folds, paper hparams) took
           752 s on 2 CPU cores (results/hybrid_gru/README.md); the default M=5 takes about 5/3 of the
           training part. `--hparams=bo` adds about `--bo_trials` trainings per hybrid and split. Every run
           writes its measured times to metrics.json (timing_s).

What it does:
1. loads `--dataset` (cnmc2019 = the embedded sample; all_idb1, all_idb2, all_idb or any builder name);
2. for each backbone of `--backbones` builds the ImageNet network (EfficientNetB3 has no offline weights:
   `--b3_substitute=efficientnet_lite2` takes its place when they cannot be found, and the substitution is
   recorded) and, in `--mode=head`, computes its frozen feature maps once;
3. splits by `--protocol`: grouped_kfold (stratified k-fold grouped by subject/duplicate, repeated over
   `--repeats` seeds) or paper_80_20 (80 % train / 20 % test, grouped, or `--leaky` per image as the paper
   did); a grouped validation part (`--val_fraction` of all images) is carved from every training part;
4. per split and backbone, a GRU-head deep ensemble of `--members` seeds; hyper-parameters from the paper
   (`--hparams=paper`, leukax.models.heads.PAPER_GRU_HEADS) or from Bayesian optimisation on that split's
   validation part only (`--hparams=bo`, logs in <out_dir>/bo/, resumed when present);
5. fuses the hybrids' ensemble-mean probabilities with the sum rule; reports per-hybrid and fused test
   metrics (mean ± std over splits), deep-ensemble uncertainty and referral at a validation-chosen entropy
   threshold, with the paper's reported accuracies beside ours, labelled as the paper's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from leukax import fusion, metrics, plots, uncertainty
from leukax.data import load_arrays
from leukax.data.splits import repeated_holdout, stratified_group_kfold
from leukax.models import pretrained
from leukax.models.classifier import Classifier, count_params
from leukax.models.heads import PAPER_GRU_HEADS, make_head
from leukax.preprocess import augment_paper1
from leukax.train import bayes
from leukax.train.ensemble import TrainConfig, make_train
from leukax.train.features import cached_features

# Akter et al. 2024, as reported in the paper (their protocol: a random per-image split, i.e. `--leaky`).
PAPER_REPORTED = {
    "source": "Akter et al. 2024, reported test accuracy of the sum-rule fused hybrid ensemble (not measured here)",
    "accuracy": {"all_idb1": 1.0, "all_idb2": 0.9807, "all_idb": 0.9864},
}


@dataclasses.dataclass
class Config:
    out_dir: str = "results/hybrid_gru"
    dataset: str = "cnmc2019"
    data_dir: str | None = None
    manual_dir: str | None = None
    backbones: tuple = ("mobilenet_v2", "inception_v3", "efficientnet_b3")
    b3_substitute: str = "efficientnet_lite2"
    weights: str = "imagenet"
    weights_dir: str | None = None
    image_size: int = 224
    mode: str = "head"
    members: int = 5
    hparams: str = "paper"
    bo_trials: int = 10
    bo_init_points: int = 3
    bo_metric: str = "val_acc"
    units: int = 256
    dropout: float = 0.2
    hidden: int = 128
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-4
    momentum: float = 0.0
    batch_size: int = 16
    epochs: int = 60
    patience: int = 15
    protocol: str = "grouped_kfold"
    folds: int = 5
    repeats: int = 1
    val_fraction: float = 0.2
    leaky: bool = False
    referral_accuracy: float = 0.95
    feature_cache: str | None = None
    seed: int = 0


HELP = {
    "out_dir": "Where metrics.json, config.json, figures/, splits/ and bo/ go.",
    "dataset": "cnmc2019 (embedded sample) | all_idb1 | all_idb2 | all_idb | any leukax builder name.",
    "data_dir": "TFDS data dir of prepared datasets.", "manual_dir": "Folder with the manually downloaded data.",
    "backbones": "Comma-separated backbones, one hybrid each.",
    "b3_substitute": "Used instead of efficientnet_b3 when its ImageNet weights are missing ('' = fail).",
    "weights": "imagenet | none (random init, for tests).", "weights_dir": "Folder of weight files.",
    "image_size": "Input size in pixels (all backbones).", "mode": "head (frozen features) | finetune.",
    "members": "Deep-ensemble members M per hybrid.", "hparams": "paper | bo.",
    "bo_trials": "Bayesian-optimisation trials per hybrid and split.", "bo_init_points": "Random BO trials first.",
    "bo_metric": "BO objective on the validation part: val_acc | val_nll.",
    "units": "GRU units for a backbone the paper did not use.", "dropout": "Dropout for such a backbone.",
    "hidden": "Width of the dense layer after the GRU.", "optimizer": "sgd | rmsprop | adam (hparams=paper).",
    "learning_rate": "Learning rate (hparams=paper).", "momentum": "Momentum (hparams=paper).",
    "batch_size": "Batch size.", "epochs": "Maximum epochs.", "patience": "Early-stopping patience (epochs).",
    "protocol": "grouped_kfold | paper_80_20.", "folds": "k of grouped_kfold.", "repeats": "Seeds repeated.",
    "val_fraction": "Validation part (fraction of all images, grouped) inside every training part.",
    "leaky": "paper_80_20 per image, ignoring subjects and duplicates (as the paper did).",
    "referral_accuracy": "Refer above the largest entropy cut whose validation accuracy reaches this.",
    "feature_cache": "Folder to keep frozen features as .npy between runs.", "seed": "Seed of everything.",
}


# ------------------------------------------------------------------------------------------------ flags
def define_flags(config_cls, helps: dict, flag_values) -> None:
    """Defines one absl flag per field of the dataclass `config_cls` on `flag_values`."""
    from absl import flags
    for f in dataclasses.fields(config_cls):
        d, h = f.default, helps.get(f.name, f.name)
        if isinstance(d, bool):
            flags.DEFINE_boolean(f.name, d, h, flag_values=flag_values)
        elif isinstance(d, int):
            flags.DEFINE_integer(f.name, d, h, flag_values=flag_values)
        elif isinstance(d, float):
            flags.DEFINE_float(f.name, d, h, flag_values=flag_values)
        elif isinstance(d, tuple):
            flags.DEFINE_list(f.name, list(d), h, flag_values=flag_values)
        else:
            flags.DEFINE_string(f.name, d, h, flag_values=flag_values)


def config_from_flags(config_cls, flag_values):
    """Returns `config_cls` filled from parsed flags (lists become tuples)."""
    kw = {f.name: flag_values[f.name].value for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def parse_argv(config_cls, argv: list[str]):
    """Returns `config_cls` from a command line such as ["prog", "--members=2"] (own FlagValues, no globals)."""
    from absl import flags
    fv = flags.FlagValues()
    define_flags(config_cls, HELP if config_cls is Config else getattr(sys.modules[config_cls.__module__], "HELP"), fv)
    fv(argv)
    return config_from_flags(config_cls, fv)


def command_line(module: str, cfg) -> str:
    """Returns the `python -m` command that reproduces `cfg`."""
    parts = []
    for k, v in dataclasses.asdict(cfg).items():
        if v is None:
            continue
        v = ",".join(v) if isinstance(v, (list, tuple)) else v
        parts.append(f"--{k}" if v is True else f"--no{k}" if v is False else f"--{k}={v}")
    return f"python -m {module} " + " ".join(parts)


# ----------------------------------------------------------------------------------- shared experiment parts
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=pathlib.Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=pathlib.Path(__file__).parent).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+uncommitted" if dirty else "")
    except OSError:
        return "unknown"


def environment() -> dict:
    return dict(commit=git_commit(), device=str(jax.devices()[0]), backend=jax.default_backend(),
                jax=jax.__version__, cpu_count=os.cpu_count(), python=platform.python_version())


def get(report: dict, key: str):
    for part in key.split("."):
        report = report[part]
    return report


def mean_std(reports: list[dict], keys) -> dict:
    """Returns {key: {"mean", "std", "per_split"}} over reports (dotted keys, None → nan)."""
    out = {}
    for key in keys:
        vals = np.asarray([np.nan if get(r, key) is None else get(r, key) for r in reports], float)
        ok = not np.all(np.isnan(vals))
        out[key] = {"mean": float(np.nanmean(vals)) if ok else None, "std": float(np.nanstd(vals)) if ok else None,
                    "per_split": [None if np.isnan(v) else float(v) for v in vals]}
    return out


def metric_keys(num_classes: int) -> list[str]:
    if num_classes == 2:
        return ["accuracy", "binary.precision", "binary.recall", "binary.f1", "binary.specificity",
                "binary.roc_auc", "nll", "brier", "ece"]
    return ["accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_specificity", "macro_roc_auc",
            "nll", "brier", "ece"]


def load_backbone(name: str, weights: str, weights_dir, substitute: str = "", seed: int = 0):
    """Returns (module, variables, spec, record): `name` with ImageNet or random weights, or `substitute`
    when its ImageNet weights are missing; `record` says what was used."""
    w = None if weights in ("none", "random", "") else weights
    try:
        module, variables, spec = pretrained(name, weights=w, weights_dir=weights_dir, seed=seed)
        used, note = name, None
    except FileNotFoundError as e:
        if not substitute:
            raise FileNotFoundError(f"experiments: no ImageNet weights for {name!r} ({e}); pass --weights=none "
                                    "or choose a backbone with offline weights") from e
        module, variables, spec = pretrained(substitute, weights=w, weights_dir=weights_dir, seed=seed)
        used, note = substitute, f"{name} ImageNet weights not found; {substitute} used in its place"
    record = dict(requested=name, used=used, substitution=note, weights=weights if w else "random init",
                  normalization=spec.normalization, params=count_params(variables))
    return module, variables, spec, record


def make_splits(cfg, labels, groups, class_names) -> list:
    """Returns the list of Splits of `cfg.protocol` (every one with a grouped validation part)."""
    if cfg.val_fraction <= 0:
        raise ValueError("experiments: --val_fraction must be > 0 (early stopping, BO and referral use it)")
    if cfg.protocol == "grouped_kfold":
        return [s for r in range(cfg.repeats) for s in _kfold(cfg, labels, groups, class_names, r)]
    if cfg.protocol == "paper_80_20":
        name = "paper 80/20 (validation carved from the 80 %) " + ("ungrouped-leaky" if cfg.leaky else "grouped")
        return repeated_holdout(labels, None if cfg.leaky else groups, 0.2, cfg.val_fraction, cfg.repeats,
                                cfg.seed, class_names, protocol=name)
    raise ValueError(f"experiments: --protocol must be grouped_kfold | paper_80_20, got {cfg.protocol!r}")


def _kfold(cfg, labels, groups, class_names, r):
    splits = stratified_group_kfold(labels, groups, cfg.folds, cfg.seed + r, cfg.val_fraction, class_names)
    for s in splits:
        s.repeat = r
    return splits


def evaluate_probs(labels_val, probs_val_mnk, labels_test, probs_test_mnk, class_names, referral_accuracy):
    """Returns (classification report, uncertainty summary, referral report) of an ensemble on the test
    part, the referral threshold fitted on the validation part."""
    ens_va = uncertainty.deep_ensemble(jnp.asarray(probs_val_mnk))
    ens_te = uncertainty.deep_ensemble(jnp.asarray(probs_test_mnk))
    report = metrics.classification_report(labels_test, np.asarray(ens_te["mean"]), class_names)
    correct_te = np.asarray(ens_te["pred"]) == labels_test
    unc = {k: float(np.mean(ens_te[k])) for k in ("predictive_entropy", "mutual_information", "variance_pred",
                                                   "total_variance", "disagreement")}
    unc["aurc"] = float(uncertainty.aurc(ens_te["predictive_entropy"], jnp.asarray(correct_te)))
    thr = uncertainty.fit_referral_threshold(np.asarray(ens_va["predictive_entropy"]),
                                             np.asarray(ens_va["pred"]) == labels_val, "accuracy", referral_accuracy)
    referral = uncertainty.referral_report(np.asarray(ens_te["predictive_entropy"]), correct_te, thr)
    return report, unc, referral


def summarize(reports: list[dict], uncs: list[dict], referrals: list[dict], keys) -> dict:
    ref_keys = ["coverage", "accuracy_retained", "accuracy_all"]
    return dict(test_mean_std=mean_std(reports, keys), uncertainty_mean_std=mean_std(uncs, list(uncs[0])),
                referral_mean_std=mean_std(referrals, ref_keys), referral_per_split=referrals)


# ----------------------------------------------------------------------------------------------- training
def split_hparams(cfg, role: str, split, x, labels, num_classes, bo_dir) -> dict:
    """Returns {"units", "dropout", "optimizer", "learning_rate", "momentum", "source"} for one hybrid on one
    split: the paper's table, or the best BO trial scored on this split's validation part only."""
    if cfg.hparams == "paper":
        paper = PAPER_GRU_HEADS.get(role)
        return dict(units=int(paper["units"] if paper else cfg.units),
                    dropout=float(paper["dropout"] if paper else cfg.dropout), optimizer=cfg.optimizer,
                    learning_rate=cfg.learning_rate, momentum=cfg.momentum,
                    source=f"PAPER_GRU_HEADS[{role!r}]" if paper else "flags (not in the paper's table)")
    if cfg.hparams != "bo":
        raise ValueError(f"experiments/hybrid_gru.py: --hparams must be paper | bo, got {cfg.hparams!r}")
    base = _train_config(cfg, dict(units=0, dropout=0.0, optimizer="sgd", learning_rate=1e-3, momentum=0.0),
                         cfg.seed + 7919 * split.repeat + split.fold, "head")
    if cfg.mode != "head":
        raise ValueError("experiments/hybrid_gru.py: --hparams=bo searches heads on frozen features (--mode=head)")
    objective = bayes.paper1_objective(
        (x[split.train], labels[split.train]), (x[split.val], labels[split.val]), base,
        lambda units: make_head("gru", num_classes, units=units, dropout=0.0, hidden=cfg.hidden), cfg.bo_metric)
    log_path = pathlib.Path(bo_dir) / f"{role}_r{split.repeat}_f{split.fold}.json"
    best = bayes.run(objective, bayes.PAPER1_SPACE, cfg.bo_trials, log_path,
                     init_points=min(cfg.bo_init_points, cfg.bo_trials), seed=cfg.seed)["best"]
    p = best["params"]
    return dict(units=int(p["units"]), dropout=float(p["dropout"]), optimizer=p["optimizer"],
                learning_rate=float(10.0 ** p["log10_lr"]), momentum=float(p["momentum"]),
                source=f"BO trial {best['trial']} of {log_path.name} ({cfg.bo_metric}={best['target']:.4f})")


def _train_config(cfg, hp, seed, mode, normalization=None) -> TrainConfig:
    return TrainConfig(num_members=cfg.members, mode=mode, optimizer=hp["optimizer"],
                       learning_rate=hp["learning_rate"], momentum=hp["momentum"] or None,
                       dropout_rate=hp["dropout"], batch_size=cfg.batch_size, num_epochs=cfg.epochs,
                       patience=cfg.patience, monitor="val_loss", seed=seed, normalization=normalization)


def train_hybrid(cfg, hybrid: dict, hp: dict, split, labels, num_classes, seed):
    """Trains one GRU-head deep ensemble; returns (probs_val_mnk, probs_test_mnk, history)."""
    head = make_head("gru", num_classes, units=hp["units"], dropout=hp["dropout"], hidden=cfg.hidden)
    x = hybrid["inputs"]
    if cfg.mode == "head":
        model, extra = head, {}
        tcfg = _train_config(cfg, hp, seed, "head")
    else:
        model = Classifier(hybrid["module"], head)
        extra = dict(augment_fn=augment_paper1, pretrained=hybrid["variables"])
        tcfg = _train_config(cfg, hp, seed, "finetune", hybrid["spec"].normalization)
    tr = make_train(tcfg, model, (x[split.train], labels[split.train]), (x[split.val], labels[split.val]), **extra)
    state = tr.fit()
    return tr.predict(state, x[split.val]), tr.predict(state, x[split.test]), tr.history(state)


# --------------------------------------------------------------------------------------------------- run
def run(cfg: Config) -> dict:
    """Runs the study; writes <out_dir>/metrics.json, config.json, figures/, splits/ and returns the metrics."""
    t_start = time.perf_counter()
    if cfg.mode not in ("head", "finetune"):
        raise ValueError(f"experiments/hybrid_gru.py: --mode must be head | finetune, got {cfg.mode!r}")
    out = pathlib.Path(cfg.out_dir)
    for sub in ("figures", "splits"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ds = load_arrays(cfg.dataset, cfg.image_size, data_dir=cfg.data_dir, manual_dir=cfg.manual_dir)
    names, labels, k = list(ds.class_names), np.asarray(ds.labels), len(ds.class_names)

    hybrids, t_features = [], {}
    for name in cfg.backbones:
        t0 = time.perf_counter()
        module, variables, spec, record = load_backbone(
            name, cfg.weights, cfg.weights_dir, cfg.b3_substitute if name == "efficientnet_b3" else "", cfg.seed)
        inputs = ds.images if cfg.mode == "finetune" else cached_features(
            module, variables, ds.images, spec.normalization, cache_dir=cfg.feature_cache, cache_tag=record["used"])
        t_features[name] = time.perf_counter() - t0
        hybrids.append(dict(name=name, module=module, variables=variables, spec=spec, record=record, inputs=inputs))

    splits = make_splits(cfg, labels, ds.groups, names)
    per = {h["name"]: {"reports": [], "unc": [], "referral": [], "hparams": []} for h in hybrids + [{"name": "fused"}]}
    first = [s for s in splits if s.repeat == 0]
    oof = {h: np.zeros((len(labels), k), np.float32) for h in per}
    oof_unc, oof_mask, history0 = np.zeros(len(labels), np.float32), np.zeros(len(labels), bool), None
    t0 = time.perf_counter()
    for split in splits:
        sid = f"r{split.repeat}_f{split.fold}"
        split.check_disjoint(ds.groups if not (cfg.protocol == "paper_80_20" and cfg.leaky) else np.arange(len(labels)))
        split.save(out / "splits" / f"{sid}.json")
        y_va, y_te = labels[split.val], labels[split.test]
        val_hmnk, test_hmnk = [], []
        for h in hybrids:
            hp = split_hparams(cfg, h["name"], split, h["inputs"], labels, k, out / "bo")
            p_va, p_te, hist = train_hybrid(cfg, h, hp, split, labels, k, cfg.seed + 1000 * split.repeat + split.fold)
            history0 = hist if history0 is None else history0
            rep, unc, ref = evaluate_probs(y_va, p_va, y_te, p_te, names, cfg.referral_accuracy)
            for key, v in (("reports", rep), ("unc", unc), ("referral", ref), ("hparams", dict(split=sid, **hp))):
                per[h["name"]][key].append(v)
            val_hmnk.append(p_va)
            test_hmnk.append(p_te)
            if split in first:
                oof[h["name"]][split.test] = p_te.mean(0)
        # Sum rule over the hybrids' ensemble means = the mean over all H·M members (equal M per hybrid).
        fused_te = np.asarray(fusion.sum_rule(np.stack(test_hmnk)))
        all_va, all_te = np.concatenate(val_hmnk), np.concatenate(test_hmnk)
        rep, unc, ref = evaluate_probs(y_va, all_va, y_te, all_te, names, cfg.referral_accuracy)
        np.testing.assert_allclose(np.asarray(uncertainty.ensemble_mean(jnp.asarray(all_te))), fused_te, atol=1e-5)
        for key, v in (("reports", rep), ("unc", unc), ("referral", ref)):
            per["fused"][key].append(v)
        if split in first:
            oof["fused"][split.test] = fused_te
            oof_unc[split.test] = np.asarray(uncertainty.predictive_entropy(jnp.asarray(fused_te)))
            oof_mask[split.test] = True
    t_train = time.perf_counter() - t0

    keys = metric_keys(k)
    results = {}
    for hname, d in per.items():
        results[hname] = summarize(d["reports"], d["unc"], d["referral"], keys)
        results[hname]["pooled_first_repeat"] = metrics.classification_report(labels[oof_mask], oof[hname][oof_mask], names)
        if d["hparams"]:
            results[hname]["hparams_per_split"] = d["hparams"]
    np.savez(out / "predictions_first_repeat.npz", labels=labels[oof_mask], index=np.flatnonzero(oof_mask),
             **{f"probs_{h}": p[oof_mask] for h, p in oof.items()})
    _figures(out / "figures", labels[oof_mask], {h: p[oof_mask] for h, p in oof.items()}, oof_unc[oof_mask],
             names, history0)

    metrics_json = dict(
        study="Akter et al. 2024: hybrid CNN-GRU deep ensembles, sum-rule fusion",
        dataset=dict(name=cfg.dataset, n=len(labels), counts=ds.counts, groups=int(len(np.unique(ds.groups))),
                     image_size=cfg.image_size),
        protocol=dict(name=splits[0].protocol, splits=len(splits), repeats=cfg.repeats,
                      summary="mean ± std over all splits; pooled_first_repeat pools repeat 0's test parts"),
        hybrids=[h["record"] for h in hybrids],
        model=dict(head="GRUHead", mode=cfg.mode, members=cfg.members, hparams=cfg.hparams, fusion="sum rule",
                   augmentation="augment_paper1" if cfg.mode == "finetune" else "none (frozen features)"),
        per_hybrid={h["name"]: results[h["name"]] for h in hybrids}, fused=results["fused"],
        paper_reported=PAPER_REPORTED,
        referral_rule=f"refer if predictive entropy > threshold whose validation accuracy >= {cfg.referral_accuracy}",
        timing_s=dict(total=time.perf_counter() - t_start, features=t_features, training=t_train),
        environment=environment(), command=command_line("experiments.hybrid_gru", cfg))
    (out / "metrics.json").write_text(json.dumps(metrics_json, indent=2))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    acc = results["fused"]["test_mean_std"]["accuracy"]
    print(f"hybrid_gru: fused accuracy {acc['mean']:.3f} ± {acc['std']:.3f} over {len(splits)} splits "
          f"({metrics_json['protocol']['name']}); wrote {out}/")
    return metrics_json


def _figures(fig_dir, labels, probs: dict, unc_fused, names, history) -> None:
    fused = probs["fused"]
    plots.confusion_matrix(labels, fused, names, title="Sum-rule fusion: confusion matrix",
                           path=fig_dir / "confusion_matrix_fused.png")
    for h, p in probs.items():
        if h != "fused":
            plots.confusion_matrix(labels, p, names, title=f"{h}-GRU ensemble", path=fig_dir / f"confusion_matrix_{h}.png")
    plots.roc_curves(labels, fused, names, path=fig_dir / "roc_fused.png")
    plots.reliability_diagram(labels, fused, path=fig_dir / "reliability_fused.png")
    correct = fused.argmax(-1) == labels
    plots.uncertainty_histograms(unc_fused, correct, path=fig_dir / "uncertainty_hist_fused.png")
    plots.accuracy_coverage(unc_fused, correct, path=fig_dir / "accuracy_coverage_fused.png")
    if history is not None:
        plots.training_curves(history, path=fig_dir / "training_curves_first.png")


def main(argv):
    del argv
    from absl import flags
    run(config_from_flags(Config, flags.FLAGS))


if __name__ == "__main__":
    from absl import app, flags
    define_flags(Config, HELP, flags.FLAGS)
    app.run(main)
