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
import pathlib
import time

import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.common import field
from leukax import fusion, metrics, plots, uncertainty
from leukax.data import load_arrays
from leukax.models.classifier import Classifier
from leukax.models.heads import PAPER_GRU_HEADS, make_head
from leukax.augment import augment_paper1
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
    out_dir: str = field("results/hybrid_gru", "Where metrics.json, config.json, figures/, splits/ and bo/ go.")
    dataset: str = field("cnmc2019", "cnmc2019 (embedded sample) | all_idb1 | all_idb2 | all_idb | any leukax "
                         "builder name.")
    data_dir: str | None = field(None, "TFDS data dir of prepared datasets.")
    manual_dir: str | None = field(None, "Folder with the manually downloaded data.")
    backbones: tuple = field(("mobilenet_v2", "inception_v3", "efficientnet_b3"),
                             "Comma-separated backbones, one hybrid each.")
    b3_substitute: str = field("efficientnet_lite2",
                               "Used instead of efficientnet_b3 when its ImageNet weights are missing ('' = fail).")
    weights: str = field("imagenet", "imagenet | none (random init, for tests).")
    weights_dir: str | None = field(None, "Folder of weight files.")
    image_size: int = field(224, "Input size in pixels (all backbones).")
    mode: str = field("head", "head (frozen features) | finetune.", choices=("head", "finetune"))
    members: int = field(5, "Deep-ensemble members M per hybrid.")
    hparams: str = field("paper", "paper | bo.", choices=("paper", "bo"))
    bo_trials: int = field(10, "Bayesian-optimisation trials per hybrid and split.")
    bo_init_points: int = field(3, "Random BO trials first.")
    bo_metric: str = field("val_acc", "BO objective on the validation part.", choices=("val_acc", "val_nll"))
    units: int = field(256, "GRU units for a backbone the paper did not use.")
    dropout: float = field(0.2, "Dropout for such a backbone.")
    hidden: int = field(128, "Width of the dense layer after the GRU.")
    optimizer: str = field("rmsprop", "Optimizer (hparams=paper).", choices=("sgd", "rmsprop", "adam"))
    learning_rate: float = field(1e-4, "Learning rate (hparams=paper).")
    momentum: float = field(0.0, "Momentum (hparams=paper).")
    batch_size: int = field(16, "Batch size.")
    epochs: int = field(60, "Maximum epochs.")
    patience: int = field(15, "Early-stopping patience (epochs).")
    protocol: str = field("grouped_kfold", "grouped_kfold | paper_80_20.", choices=common.PROTOCOLS)
    folds: int = field(5, "k of grouped_kfold.")
    repeats: int = field(1, "Seeds repeated.")
    val_fraction: float = field(0.2, "Validation part (fraction of all images, grouped) inside every training part.")
    leaky: bool = field(False, "paper_80_20 per image, ignoring subjects and duplicates (as the paper did).")
    referral_accuracy: float = field(0.95, "Refer above the largest entropy cut whose validation accuracy reaches "
                                     "this.")
    feature_cache: str | None = field(None, "Folder to keep frozen features as .npy between runs.")
    seed: int = field(0, "Seed of everything.")


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
        module, variables, spec, record = common.load_backbone(
            name, cfg.weights, cfg.weights_dir, cfg.b3_substitute if name == "efficientnet_b3" else "", cfg.seed)
        inputs = ds.images if cfg.mode == "finetune" else cached_features(
            module, variables, ds.images, spec.normalization, cache_dir=cfg.feature_cache, cache_tag=record["used"])
        t_features[name] = time.perf_counter() - t0
        hybrids.append(dict(name=name, module=module, variables=variables, spec=spec, record=record, inputs=inputs))

    splits = common.make_splits(cfg.protocol, labels, ds.groups, names, folds=cfg.folds, repeats=cfg.repeats,
                                val_fraction=cfg.val_fraction, seed=cfg.seed, leaky=cfg.leaky)
    per = {h["name"]: {"reports": [], "unc": [], "referral": [], "hparams": []} for h in hybrids + [{"name": "fused"}]}
    first = [s for s in splits if s.repeat == 0]
    oof = {h: np.zeros((len(labels), k), np.float32) for h in per}
    oof_unc, oof_mask, history0 = np.zeros(len(labels), np.float32), np.zeros(len(labels), bool), None
    t0 = time.perf_counter()
    for split in splits:
        sid = common.check_and_save(split, ds.groups, cfg.protocol == "paper_80_20" and cfg.leaky, out / "splits")
        y_va, y_te = labels[split.val], labels[split.test]
        val_hmnk, test_hmnk = [], []
        for h in hybrids:
            hp = split_hparams(cfg, h["name"], split, h["inputs"], labels, k, out / "bo")
            p_va, p_te, hist = train_hybrid(cfg, h, hp, split, labels, k, cfg.seed + 1000 * split.repeat + split.fold)
            history0 = hist if history0 is None else history0
            rep, unc, ref = common.evaluate_probs(y_va, p_va, y_te, p_te, names, "accuracy", cfg.referral_accuracy)
            for key, v in (("reports", rep), ("unc", unc), ("referral", ref), ("hparams", dict(split=sid, **hp))):
                per[h["name"]][key].append(v)
            val_hmnk.append(p_va)
            test_hmnk.append(p_te)
            if split in first:
                oof[h["name"]][split.test] = p_te.mean(0)
        # Sum rule over the hybrids' ensemble means = the mean over all H·M members (equal M per hybrid).
        fused_te = np.asarray(fusion.sum_rule(np.stack(test_hmnk)))
        all_va, all_te = np.concatenate(val_hmnk), np.concatenate(test_hmnk)
        rep, unc, ref = common.evaluate_probs(y_va, all_va, y_te, all_te, names, "accuracy",
                                              cfg.referral_accuracy)
        np.testing.assert_allclose(np.asarray(uncertainty.ensemble_mean(jnp.asarray(all_te))), fused_te, atol=1e-5)
        for key, v in (("reports", rep), ("unc", unc), ("referral", ref)):
            per["fused"][key].append(v)
        if split in first:
            oof["fused"][split.test] = fused_te
            oof_unc[split.test] = np.asarray(uncertainty.predictive_entropy(jnp.asarray(fused_te)))
            oof_mask[split.test] = True
    t_train = time.perf_counter() - t0

    keys = common.metric_keys(k)
    results = {}
    for hname, d in per.items():
        results[hname] = common.summarize(d["reports"], d["unc"], d["referral"], keys)
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
        environment=common.environment(), command=common.command_line("experiments.hybrid_gru", cfg))
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


if __name__ == "__main__":
    common.main(Config, run)
