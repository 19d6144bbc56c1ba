"""Quickstart: a pretrained MobileNetV2-GRU deep ensemble on the embedded C-NMC 2019 sample.

Command:   python -m experiments.quickstart            (writes results/quickstart/)
Runtime:   a few minutes on 2 CPU cores (measured time is in results/quickstart/metrics.json).

What it does (the first paper's hybrid, in head mode, with leakage-safe evaluation):
1. loads the 60 embedded C-NMC 2019 cells (30 ALL, 30 healthy "hem", 37 subjects) at 224 px;
2. computes the frozen ImageNet MobileNetV2 feature maps once (the float16 weights shipped in the package);
3. 5-fold stratified k-fold grouped by subject (no person on both sides), each fold's training part split
   again (grouped) into train / validation; an M-member GRU-head deep ensemble trains per fold, every member
   with its own seed, dropout keys and data order, early-stopped on its validation loss;
4. reports test metrics as mean ± std over folds, plus pooled out-of-fold metrics, uncertainty and a
   referral rule (refer when the predictive entropy is above a threshold chosen on validation data, by
   default so that 80% of validation cases are kept);
5. trains a final ensemble on all images (with a grouped validation part) and saves it as a bundle for
   `python -m leukax.predict --model results/quickstart/model --images <files>`.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common
from experiments.common import field
from leukax import bundle as bundle_lib
from leukax import metrics, plots, uncertainty
from leukax.data import load_arrays
from leukax.data.splits import repeated_holdout
from leukax.gradcam import gradcam_classifier
from leukax.models.classifier import Classifier
from leukax.models.heads import make_head
from leukax.pretrained import pretrained
from leukax.preprocess import normalize
from leukax.train.ensemble import TrainConfig, make_train, member_variables
from leukax.train.features import cached_features

CLASS_LABELS = {"hem": "healthy (hem)", "all": "ALL (blast)"}


@dataclasses.dataclass
class Config:
    out_dir: str = field("results/quickstart", "Where metrics.json, config.json, figures/ and model/ go.")
    backbone: str = field("mobilenet_v2", "Registered backbone name.")
    weights: str = field("embedded", "Backbone weights: embedded | imagenet | a file path.")
    weights_dir: str | None = field(None, "Folder holding downloaded weight files (or env LEUKAX_WEIGHTS_DIR).")
    image_size: int = field(224, "Input size in pixels.")
    members: int = field(3, "Deep-ensemble members M.")
    folds: int = field(5, "Grouped stratified k-fold.")
    val_fraction: float = field(0.2, "Fraction of all images used for validation inside each fold.")
    units: int = field(128, "GRU units (the paper's Bayesian-optimised MobileNetV2 value is 512; 128 keeps the "
                       "quickstart to a few minutes on 2 CPU cores).")
    dropout: float = field(0.1, "Head dropout (the paper's MobileNetV2 value).")
    hidden: int = field(128, "Width of the first dense layer after the GRU.")
    optimizer: str = field("rmsprop", "optax optimizer.", choices=("sgd", "rmsprop", "adam"))
    learning_rate: float = field(1e-4, "Learning rate.")
    momentum: float = field(0.0, "Momentum (sgd / rmsprop).")
    batch_size: int = field(16, "Batch size.")
    epochs: int = field(60, "Maximum epochs.")
    patience: int = field(15, "Early-stopping patience in epochs (per member).")
    referral_target: str = field(
        "coverage", "How the referral threshold is chosen on validation data: keep at least --referral_value of "
        "the cases (coverage), or the largest cut whose retained accuracy reaches --referral_value (accuracy).",
        choices=("coverage", "accuracy"))
    referral_value: float = field(0.8, "Target coverage or accuracy of the referral rule.")
    seed: int = field(0, "Seed of splits, inits, dropout and data order.")


def _train_ensemble(cfg: Config, feats, labels, split, seed):
    head = make_head("gru", 2, units=cfg.units, dropout=cfg.dropout, hidden=cfg.hidden)
    tcfg = TrainConfig(num_members=cfg.members, mode="head", optimizer=cfg.optimizer,
                       learning_rate=cfg.learning_rate, momentum=cfg.momentum or None,
                       dropout_rate=cfg.dropout, batch_size=cfg.batch_size, num_epochs=cfg.epochs,
                       patience=cfg.patience, monitor="val_loss", seed=seed, normalization=None, progress=True)
    tr = make_train(tcfg, head, (feats[split.train], labels[split.train]), (feats[split.val], labels[split.val]))
    state = tr.fit()
    return head, tr, state


def run(cfg: Config) -> dict:
    """Runs the quickstart; writes <out_dir>/metrics.json, config.json, figures/, splits/, model/."""
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO; progress is printed below
    t_start = time.perf_counter()
    out = pathlib.Path(cfg.out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "splits").mkdir(exist_ok=True)

    ds = load_arrays("cnmc2019", cfg.image_size)
    names = [CLASS_LABELS.get(c, c) for c in ds.class_names]
    labels = np.asarray(ds.labels)
    print(f"C-NMC 2019 sample: {ds.counts}, {len(np.unique(ds.groups))} subjects", flush=True)

    t0 = time.perf_counter()
    backbone, bb_vars, spec = pretrained(cfg.backbone, weights=cfg.weights, weights_dir=cfg.weights_dir)
    feats = cached_features(backbone, bb_vars, ds.images, spec.normalization)
    t_features = time.perf_counter() - t0
    print(f"frozen {cfg.backbone} features {feats.shape} in {t_features:.1f}s", flush=True)

    folds = common.make_splits("grouped_kfold", labels, ds.groups, ds.class_names, folds=cfg.folds, repeats=1,
                               val_fraction=cfg.val_fraction, seed=cfg.seed)
    reports, uncs, referrals = [], [], []
    oof_probs, oof_unc = np.zeros((len(labels), 2)), np.zeros(len(labels))
    histories = None
    t0 = time.perf_counter()
    for split in folds:
        split.check_disjoint(ds.groups).save(out / "splits" / f"fold{split.fold}.json")
        print(f"fold {split.fold + 1}/{cfg.folds}", split.summary(labels, ds.class_names), sep="\n", flush=True)
        _, tr, state = _train_ensemble(cfg, feats, labels, split, cfg.seed + split.fold)
        if histories is None:
            histories = tr.history(state)
        p_te, p_va = tr.predict(state, feats[split.test]), tr.predict(state, feats[split.val])
        report, unc, referral = common.evaluate_probs(labels[split.val], p_va, labels[split.test], p_te, names,
                                                      cfg.referral_target, cfg.referral_value)
        reports.append(report)
        uncs.append(unc)
        referrals.append(referral)
        ens_test = uncertainty.deep_ensemble(jnp.asarray(p_te))
        oof_probs[split.test] = np.asarray(ens_test["mean"])
        oof_unc[split.test] = np.asarray(ens_test["predictive_entropy"])
    t_cv = time.perf_counter() - t0

    summary = common.summarize(reports, uncs, referrals, common.metric_keys(2))
    pooled = metrics.classification_report(labels, oof_probs, names)
    correct = oof_probs.argmax(-1) == labels

    # Final ensemble on all images (grouped validation part for early stopping and the referral threshold).
    t0 = time.perf_counter()
    final_split = repeated_holdout(labels, ds.groups, test_fraction=0.0, val_fraction=cfg.val_fraction,
                                   repeats=1, seed=cfg.seed, class_names=ds.class_names)[0]
    final_split.save(out / "splits" / "final.json")
    head, tr, state = _train_ensemble(cfg, feats, labels, final_split, cfg.seed + 1000)
    ens_val = uncertainty.deep_ensemble(jnp.asarray(tr.predict(state, feats[final_split.val])))
    final_thr = uncertainty.fit_referral_threshold(np.asarray(ens_val["predictive_entropy"]),
                                                   np.asarray(ens_val["pred"]) == labels[final_split.val],
                                                   cfg.referral_target, cfg.referral_value)
    head_vars_m = {"params": state.best_params}
    t_final = time.perf_counter() - t0
    bcfg = bundle_lib.BundleConfig(
        backbone=cfg.backbone, weights=cfg.weights, image_size=cfg.image_size,
        normalization=spec.normalization, head="gru",
        head_kwargs=dict(units=cfg.units, dropout=cfg.dropout, hidden=cfg.hidden),
        class_names=list(ds.class_names), mode="head", num_members=cfg.members,
        uncertainty="predictive_entropy", referral_threshold=None if not np.isfinite(final_thr) else final_thr,
        provenance=dict(trained_on="cnmc2019 embedded sample (60 images)", commit=common.git_commit()))
    bundle_lib.save(out / "model", bcfg, head_vars_m)

    # Figures (pooled out-of-fold predictions; Grad-CAM with the final ensemble's member 0).
    fig_dir = out / "figures"
    plots.confusion_matrix(labels, oof_probs, names, title="Out-of-fold confusion matrix",
                           path=fig_dir / "confusion_matrix.png")
    plots.roc_curves(labels, oof_probs, names, path=fig_dir / "roc.png")
    plots.pr_curves(labels, oof_probs, names, path=fig_dir / "pr.png")
    plots.reliability_diagram(labels, oof_probs, path=fig_dir / "reliability.png")
    plots.uncertainty_histograms(oof_unc, correct, path=fig_dir / "uncertainty_hist.png")
    plots.accuracy_coverage(oof_unc, correct, path=fig_dir / "accuracy_coverage.png")
    plots.training_curves(histories, path=fig_dir / "training_curves_fold0.png")
    model = Classifier(backbone, head)
    show = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(2)])
    m0 = member_variables(state, 0)
    variables = {"params": {"backbone": bb_vars["params"], "head": m0["params"]},
                 "batch_stats": {"backbone": bb_vars.get("batch_stats", {})}}
    x = normalize(jnp.asarray(ds.images[show]), spec.normalization)
    heat, logits = gradcam_classifier(model, variables, x, return_logits=True)
    plots.gradcam_overlays(ds.images[show], np.asarray(heat), labels[show], np.asarray(jax.nn.softmax(logits)),
                           names, path=fig_dir / "gradcam.png")

    t_total = time.perf_counter() - t_start
    result = dict(
        task="C-NMC 2019 embedded sample, ALL vs healthy (hem), 60 images / 37 subjects",
        protocol=f"{cfg.folds}-fold stratified k-fold grouped by subject; val {cfg.val_fraction:g} of all "
                 f"images (grouped) inside each fold's training part; mean ± std over folds",
        model=f"{cfg.backbone} ({cfg.weights} ImageNet weights, frozen) + GRU head "
              f"({cfg.units} units, dropout {cfg.dropout}), deep ensemble M={cfg.members}, head mode",
        **summary, pooled_out_of_fold=pooled,
        referral_rule=f"refer if predictive entropy > a threshold chosen on each fold's validation part for "
                      f"{cfg.referral_target} >= {cfg.referral_value}",
        timing_s=dict(total=t_total, features=t_features, cross_validation=t_cv, final_ensemble=t_final),
        environment=common.environment(), command=common.command_line("experiments.quickstart", cfg),
    )
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    acc = summary["test_mean_std"]["accuracy"]
    auc = summary["test_mean_std"]["binary.roc_auc"]
    print(f"quickstart: accuracy {acc['mean']:.3f} ± {acc['std']:.3f}, ROC AUC {auc['mean']:.3f} ± {auc['std']:.3f} "
          f"over {cfg.folds} subject-grouped folds; {t_total:.0f}s total. Wrote {out}/")
    return result


if __name__ == "__main__":
    common.main(Config, run)
