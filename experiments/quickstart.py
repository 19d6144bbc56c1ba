"""Quickstart: a pretrained MobileNetV2-GRU deep ensemble on the embedded C-NMC 2019 sample.

Command:   python -m experiments.quickstart            (writes results/quickstart/)
Runtime:   about 1 min on 2 CPU cores: 58 s with a cold compilation cache, 45 s warm (2026-12-02, a quiet 2-core
           AVX2 EPYC, commit 19c45e2 + docstrings; each run writes metrics.json → timing_s).

What it does (the first paper's hybrid, in head mode, with leakage-safe evaluation):
1. loads the 60 embedded C-NMC 2019 cells (30 ALL, 30 healthy "hem", 37 subjects) at 224 px;
2. computes the frozen ImageNet MobileNetV2 feature maps of 8 dihedral views per cell once (the float16
   weights shipped in the package);
3. 5-fold stratified k-fold grouped by subject (no person on both sides), each fold's training part split
   again (grouped) into train / validation; features standardised with training statistics; an M-member
   GRU-head deep ensemble trains per fold as one compiled program (leukax.train.compiled), every member with
   its own seed, dropout keys, data order and view per epoch, early-stopped on its validation NLL; test
   predictions average the views; a logistic-regression linear probe on the same features and folds is the
   baseline; temperature scaling is fitted on each validation part;
4. reports test metrics as mean ± std over folds, plus pooled out-of-fold metrics, uncertainty and a
   referral rule (refer when the predictive entropy is above a threshold chosen on validation data, by
   default so that 80% of validation cases are kept);
5. trains a final ensemble on all images (with a grouped validation part) and saves it as a bundle for
   `python -m leukax.predict --model results/quickstart/model --images <files>`, with referral thresholds on
   entropy, mutual information and a Mahalanobis out-of-distribution score fitted on the validation part.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common
from experiments.common import field
from leukax import bundle as bundle_lib
from leukax import metrics, plots, records, uncertainty
from leukax.data import load_arrays
from leukax.data.splits import repeated_holdout
from leukax.gradcam import gradcam_classifier
from leukax.models.classifier import Classifier
from leukax.pretrained import pretrained
from leukax.preprocess import normalize
from leukax.train import compiled, probe, recipe
from leukax.train.views import view_features

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
    views: str = field("dihedral", "Cached views per image (augmentation in head mode, TTA).",
                       choices=("dihedral", "none"))
    feature_dim: int = field(0, "PCA feature channels, fitted on the training part (0 = all standardised channels).")
    units: int = field(128, "GRU units (the paper's Bayesian-optimised MobileNetV2 value is 512).")
    order: str = field("center_last", "Order the GRU reads the 7×7 positions: center_last | raster.",
                       choices=("center_last", "raster"))
    hidden: int = field(128, "Width of the first dense layer after the GRU.")
    learning_rate: float = field(3e-3, "Peak learning rate (AdamW, warm-up + cosine).")
    dropout: float = field(0.3, "Dropout before the last layer.")
    input_dropout: float = field(0.2, "Dropout of feature channels.")
    weight_decay: float = field(1e-2, "Decoupled weight decay.")
    batch_size: int = field(16, "Batch size.")
    epochs: int = field(60, "Maximum epochs.")
    patience: int = field(15, "Early-stopping patience in epochs (per member).")
    referral_target: str = field(
        "coverage", "How the referral threshold is chosen on validation data: keep at least --referral_value of "
        "the cases (coverage), or the largest cut whose retained accuracy reaches --referral_value (accuracy).",
        choices=("coverage", "accuracy"))
    referral_value: float = field(0.8, "Target coverage or accuracy of the referral rule.")
    ood_alpha: float = field(0.05, "Out-of-distribution rules refer at most this fraction of in-distribution cells "
                             "(conformal quantile of validation scores).")
    seed: int = field(0, "Seed of splits, inits, dropout and data order.")


def _train(cfg: Config, views, labels, train_idx, val_idx, seed):
    """Fits the feature transform on the training part and a GRU-head deep ensemble (compiled trainer);
    returns (transform, head, result, transformed val features)."""
    tf = recipe.fit_transform(views[:, train_idx], cfg.feature_dim, seed=seed)
    rcp = compiled.Recipe(num_members=cfg.members, num_epochs=cfg.epochs, batch_size=cfg.batch_size,
                          patience=cfg.patience)
    hp = compiled.default_hparams(learning_rate=cfg.learning_rate, dropout=cfg.dropout,
                                  input_dropout=cfg.input_dropout, weight_decay=cfg.weight_decay)
    head = recipe.make_model("gru", 2, cfg.units, cfg.hidden, order=cfg.order)
    va = tf.apply(views[:, val_idx])
    res = compiled.fit(rcp, head, 2, tf.apply(views[:, train_idx]), labels[train_idx], va, labels[val_idx], hp,
                       seed=seed)
    return tf, head, res, va


def conformal_threshold(scores_val, alpha: float) -> float:
    """Returns the ⌈(n+1)(1−α)⌉-th smallest validation score (its maximum when n is small): an in-distribution
    cell's score exceeds it with probability ≤ α (split conformal, exchangeable scores)."""
    s = np.sort(np.asarray(scores_val, float))
    return float(s[min(len(s) - 1, int(np.ceil((len(s) + 1) * (1 - alpha))) - 1)])


def run(cfg: Config) -> dict:
    """Runs the quickstart; writes <out_dir>/metrics.json, config.json, figures/, splits/, model/."""
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO; progress is printed below
    t_start = time.perf_counter()
    env = common.environment()  # provenance of the code that runs: read before, not after, a long run
    out = pathlib.Path(cfg.out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "splits").mkdir(exist_ok=True)

    ds = load_arrays("cnmc2019", cfg.image_size)
    names = [CLASS_LABELS.get(c, c) for c in ds.class_names]
    labels = np.asarray(ds.labels)
    print(f"C-NMC 2019 sample: {ds.counts}, {len(np.unique(ds.groups))} subjects", flush=True)

    t0 = time.perf_counter()
    backbone, bb_vars, spec = pretrained(cfg.backbone, weights=cfg.weights, weights_dir=cfg.weights_dir)
    views = view_features(backbone, bb_vars, ds.images, spec.normalization, cfg.views)
    t_features = time.perf_counter() - t0
    print(f"frozen {cfg.backbone} features of {views.shape[0]} views {views.shape[1:]} in {t_features:.1f}s", flush=True)

    folds = common.make_splits("grouped_kfold", labels, ds.groups, ds.class_names, folds=cfg.folds, repeats=1,
                               val_fraction=cfg.val_fraction, seed=cfg.seed)
    reports, uncs, referrals, calib, probe_acc = [], [], [], [], []
    oof_probs, oof_unc = np.zeros((len(labels), 2)), np.zeros(len(labels))
    histories = None
    t0 = time.perf_counter()
    for split in folds:
        split.check_disjoint(ds.groups).save(out / "splits" / f"fold{split.fold}.json")
        print(f"fold {split.fold + 1}/{cfg.folds}", split.summary(labels, ds.class_names), sep="\n", flush=True)
        tf, head, res, va = _train(cfg, views, labels, split.train, split.val, cfg.seed + split.fold)
        te = tf.apply(views[:, split.test])
        p_va, p_te, info = recipe.predict_both(head, res, va, te)
        histories = info["history"] if histories is None else histories
        report, unc, referral = common.evaluate_probs(labels[split.val], p_va, labels[split.test], p_te, names,
                                                      cfg.referral_target, cfg.referral_value)
        cal, _ = common.calibrate(labels[split.val], p_va, labels[split.test], p_te)
        pr = probe.fit(tf.apply(views[:, split.train]), labels[split.train], 2)
        probe_acc.append(float(np.mean(np.asarray(probe.predict(pr, jnp.asarray(te))).argmax(-1) == labels[split.test])))
        for lst, v in ((reports, report), (uncs, unc), (referrals, referral), (calib, cal)):
            lst.append(v)
        ens_test = uncertainty.deep_ensemble(jnp.asarray(p_te))
        oof_probs[split.test] = np.asarray(ens_test["mean"])
        oof_unc[split.test] = np.asarray(ens_test["predictive_entropy"])
    t_cv = time.perf_counter() - t0

    summary = common.summarize(reports, uncs, referrals, common.metric_keys(2))
    summary["calibration_mean_std"] = common.mean_std(calib, common.CALIBRATION_KEYS)
    summary["linear_probe_accuracy"] = {"mean": float(np.mean(probe_acc)), "std": float(np.std(probe_acc)),
                                        "per_split": probe_acc}
    pooled = metrics.classification_report(labels, oof_probs, names)
    correct = oof_probs.argmax(-1) == labels

    # Final ensemble on all images (grouped validation part for early stopping and the referral thresholds).
    t0 = time.perf_counter()
    final_split = repeated_holdout(labels, ds.groups, test_fraction=0.0, val_fraction=cfg.val_fraction,
                                   repeats=1, seed=cfg.seed, class_names=ds.class_names)[0]
    final_split.save(out / "splits" / "final.json")
    tf, head, res, va = _train(cfg, views, labels, final_split.train, final_split.val, cfg.seed + 1000)
    p_va = np.asarray(compiled.make_predict(head)(res.params, jnp.asarray(va)))
    ens_val = uncertainty.deep_ensemble(jnp.asarray(p_va))
    final_thr = uncertainty.fit_referral_threshold(np.asarray(ens_val["predictive_entropy"]),
                                                   np.asarray(ens_val["pred"]) == labels[final_split.val],
                                                   cfg.referral_target, cfg.referral_value)
    pooled_nc = lambda idx: tf.standardize(views[:, idx]).mean((0, 2))  # noqa: E731  (N×C, as predict pools)
    ood_model = uncertainty.fit_mahalanobis(pooled_nc(final_split.train), labels[final_split.train], 2)
    ood_val = np.asarray(uncertainty.mahalanobis_score(ood_model, jnp.asarray(pooled_nc(final_split.val))))
    transform = {"mean_c": tf.mean_c, "std_c": tf.std_c, **({"proj_cd": tf.proj_cd} if tf.proj_cd is not None else {})}
    t_final = time.perf_counter() - t0
    bcfg = bundle_lib.BundleConfig(
        backbone=cfg.backbone, weights=cfg.weights, image_size=cfg.image_size,
        normalization=spec.normalization, head="gru", head_kwargs=dict(units=cfg.units, dropout=0.0, hidden=cfg.hidden, order=cfg.order),
        class_names=list(ds.class_names), mode="head", num_members=cfg.members, views=cfg.views,
        uncertainty="predictive_entropy", referral_threshold=None if not np.isfinite(final_thr) else final_thr,
        mi_threshold=conformal_threshold(ens_val["mutual_information"], cfg.ood_alpha),
        ood_threshold=conformal_threshold(ood_val, cfg.ood_alpha),
        provenance=dict(trained_on="cnmc2019 embedded sample (60 images)", commit=common.git_commit()))
    bundle_lib.save(out / "model", bcfg, {"params": res.params, "transform": transform, "ood": ood_model})

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
    show = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(2)])
    m0 = jax.tree.map(lambda a: a[0], res.params)
    gradcam_head = recipe.TransformedHead(head, int(tf.mean_c.shape[0]), 0 if tf.proj_cd is None else tf.proj_cd.shape[1])
    model = Classifier(backbone, gradcam_head)
    variables = {"params": {"backbone": bb_vars["params"], "head": recipe.TransformedHead.variables(tf, m0)},
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
        model=f"{cfg.backbone} ({cfg.weights} ImageNet weights, frozen; {cfg.views} views + TTA) + GRU head "
              f"({cfg.units} units, dropout {cfg.dropout}, input dropout {cfg.input_dropout}), deep ensemble "
              f"M={cfg.members}, compiled head-mode trainer (AdamW, label smoothing, warm-up + cosine)",
        **summary, pooled_out_of_fold=pooled,
        referral_rule=f"refer if predictive entropy > a threshold chosen on each fold's validation part for "
                      f"{cfg.referral_target} >= {cfg.referral_value}; the saved model also refers when the mutual "
                      f"information or the Mahalanobis OOD score exceeds its conformal validation quantile "
                      f"(alpha {cfg.ood_alpha})",
        timing_s=dict(total=t_total, features=t_features, cross_validation=t_cv, final_ensemble=t_final),
        environment=env, command=common.command_line("experiments.quickstart", cfg),
    )
    records.write_json(out / "metrics.json", result)
    records.write_json(out / "config.json", dataclasses.asdict(cfg))
    acc = summary["test_mean_std"]["accuracy"]
    auc = summary["test_mean_std"]["binary.roc_auc"]
    lp = summary["linear_probe_accuracy"]
    print(f"linear probe on the same features and folds: accuracy {lp['mean']:.3f} ± {lp['std']:.3f}")
    print(f"quickstart: accuracy {acc['mean']:.3f} ± {acc['std']:.3f}, ROC AUC {auc['mean']:.3f} ± {auc['std']:.3f} "
          f"over {cfg.folds} subject-grouped folds; {t_total:.0f}s total. Wrote {out}/")
    return result


if __name__ == "__main__":
    common.main(Config, run)
