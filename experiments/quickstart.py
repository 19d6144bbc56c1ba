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

import json
import pathlib
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from leukax import bundle as bundle_lib
from leukax import metrics, plots, uncertainty
from leukax.data import load_arrays
from leukax.data.splits import repeated_holdout, stratified_group_kfold
from leukax.gradcam import gradcam_classifier
from leukax.models import pretrained
from leukax.models.classifier import Classifier
from leukax.models.heads import make_head
from leukax.train.ensemble import TrainConfig, make_train, member_variables, normalize
from leukax.train.features import cached_features

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "results/quickstart", "Where metrics.json, config.json, figures/ and model/ go.")
flags.DEFINE_string("backbone", "mobilenet_v2", "Registered backbone name.")
flags.DEFINE_string("weights", "embedded", "Backbone weights: embedded | imagenet | a file path.")
flags.DEFINE_string("weights_dir", None, "Folder holding downloaded weight files (or env LEUKAX_WEIGHTS_DIR).")
flags.DEFINE_integer("image_size", 224, "Input size in pixels.")
flags.DEFINE_integer("members", 3, "Deep-ensemble members M.")
flags.DEFINE_integer("folds", 5, "Grouped stratified k-fold.")
flags.DEFINE_float("val_fraction", 0.2, "Fraction of all images used for validation inside each fold.")
flags.DEFINE_integer("units", 128, "GRU units (the paper's Bayesian-optimised MobileNetV2 value is 512; 128 keeps "
                     "the quickstart to a few minutes on 2 CPU cores).")
flags.DEFINE_float("dropout", 0.1, "Head dropout (the paper's MobileNetV2 value).")
flags.DEFINE_integer("hidden", 128, "Width of the first dense layer after the GRU.")
flags.DEFINE_enum("optimizer", "rmsprop", ["sgd", "rmsprop", "adam"], "optax optimizer.")
flags.DEFINE_float("learning_rate", 1e-4, "Learning rate.")
flags.DEFINE_float("momentum", 0.0, "Momentum (sgd / rmsprop).")
flags.DEFINE_integer("batch_size", 16, "Batch size.")
flags.DEFINE_integer("epochs", 60, "Maximum epochs.")
flags.DEFINE_integer("patience", 15, "Early-stopping patience in epochs (per member).")
flags.DEFINE_enum("referral_target", "coverage", ["coverage", "accuracy"],
                  "How the referral threshold is chosen on validation data: keep at least --referral_value of the "
                  "cases (coverage), or the largest cut whose retained accuracy reaches --referral_value (accuracy).")
flags.DEFINE_float("referral_value", 0.8, "Target coverage or accuracy of the referral rule.")
flags.DEFINE_integer("seed", 0, "Seed of splits, inits, dropout and data order.")

CLASS_LABELS = {"hem": "healthy (hem)", "all": "ALL (blast)"}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _mean_std(reports: list[dict], keys) -> dict:
    out = {}
    for key in keys:
        vals = []
        for r in reports:
            v = r
            for part in key.split("."):
                v = v[part]
            vals.append(np.nan if v is None else v)
        vals = np.asarray(vals, float)
        out[key] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals)), "per_fold": vals.tolist()}
    return out


def _train_ensemble(feats, labels, split, seed):
    head = make_head("gru", 2, units=FLAGS.units, dropout=FLAGS.dropout, hidden=FLAGS.hidden)
    cfg = TrainConfig(num_members=FLAGS.members, mode="head", optimizer=FLAGS.optimizer,
                      learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum or None,
                      dropout_rate=FLAGS.dropout, batch_size=FLAGS.batch_size, num_epochs=FLAGS.epochs,
                      patience=FLAGS.patience, monitor="val_loss", seed=seed, normalization=None, progress=True)
    tr = make_train(cfg, head, (feats[split.train], labels[split.train]), (feats[split.val], labels[split.val]))
    state = tr.fit()
    return head, tr, state


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO; progress is printed below
    t_start = time.perf_counter()
    out = pathlib.Path(FLAGS.out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "splits").mkdir(exist_ok=True)

    ds = load_arrays("cnmc2019", FLAGS.image_size)
    names = [CLASS_LABELS.get(c, c) for c in ds.class_names]
    labels = np.asarray(ds.labels)
    print(f"C-NMC 2019 sample: {ds.counts}, {len(np.unique(ds.groups))} subjects", flush=True)

    t0 = time.perf_counter()
    backbone, bb_vars, spec = pretrained(FLAGS.backbone, weights=FLAGS.weights, weights_dir=FLAGS.weights_dir)
    feats = cached_features(backbone, bb_vars, ds.images, spec.normalization)
    t_features = time.perf_counter() - t0
    print(f"frozen {FLAGS.backbone} features {feats.shape} in {t_features:.1f}s", flush=True)

    folds = stratified_group_kfold(labels, ds.groups, FLAGS.folds, FLAGS.seed, val_fraction=FLAGS.val_fraction,
                                   class_names=ds.class_names)
    reports, referrals, oof_probs, oof_unc = [], [], np.zeros((len(labels), 2)), np.zeros(len(labels))
    histories = None
    t0 = time.perf_counter()
    for split in folds:
        split.check_disjoint(ds.groups).save(out / "splits" / f"fold{split.fold}.json")
        print(f"fold {split.fold + 1}/{FLAGS.folds}", split.summary(labels, ds.class_names), sep="\n", flush=True)
        _, tr, state = _train_ensemble(feats, labels, split, FLAGS.seed + split.fold)
        if histories is None:
            histories = tr.history(state)
        ens_test = uncertainty.deep_ensemble(jnp.asarray(tr.predict(state, feats[split.test])))
        ens_val = uncertainty.deep_ensemble(jnp.asarray(tr.predict(state, feats[split.val])))
        y_te, y_va = labels[split.test], labels[split.val]
        reports.append(metrics.classification_report(y_te, ens_test["mean"], names))
        thr = uncertainty.fit_referral_threshold(np.asarray(ens_val["predictive_entropy"]),
                                                 np.asarray(ens_val["pred"]) == y_va, FLAGS.referral_target,
                                                 FLAGS.referral_value)
        referrals.append(uncertainty.referral_report(np.asarray(ens_test["predictive_entropy"]),
                                                     np.asarray(ens_test["pred"]) == y_te, thr))
        oof_probs[split.test] = np.asarray(ens_test["mean"])
        oof_unc[split.test] = np.asarray(ens_test["predictive_entropy"])
    t_cv = time.perf_counter() - t0

    keys = ["accuracy", "binary.precision", "binary.recall", "binary.f1", "binary.specificity",
            "binary.roc_auc", "nll", "brier", "ece"]
    summary = _mean_std(reports, keys)
    pooled = metrics.classification_report(labels, oof_probs, names)
    correct = oof_probs.argmax(-1) == labels

    # Final ensemble on all images (grouped validation part for early stopping and the referral threshold).
    t0 = time.perf_counter()
    final_split = repeated_holdout(labels, ds.groups, test_fraction=0.0, val_fraction=FLAGS.val_fraction,
                                   repeats=1, seed=FLAGS.seed, class_names=ds.class_names)[0]
    final_split.save(out / "splits" / "final.json")
    head, tr, state = _train_ensemble(feats, labels, final_split, FLAGS.seed + 1000)
    ens_val = uncertainty.deep_ensemble(jnp.asarray(tr.predict(state, feats[final_split.val])))
    final_thr = uncertainty.fit_referral_threshold(np.asarray(ens_val["predictive_entropy"]),
                                                   np.asarray(ens_val["pred"]) == labels[final_split.val],
                                                   FLAGS.referral_target, FLAGS.referral_value)
    best = state["best"]
    head_vars_m = {"params": best["params"]}
    t_final = time.perf_counter() - t0
    bcfg = bundle_lib.BundleConfig(
        backbone=FLAGS.backbone, weights=FLAGS.weights, image_size=FLAGS.image_size,
        normalization=spec.normalization, head="gru",
        head_kwargs=dict(units=FLAGS.units, dropout=FLAGS.dropout, hidden=FLAGS.hidden),
        class_names=list(ds.class_names), mode="head", num_members=FLAGS.members,
        uncertainty="predictive_entropy", referral_threshold=None if not np.isfinite(final_thr) else final_thr,
        provenance=dict(trained_on="cnmc2019 embedded sample (60 images)", commit=_git_commit()))
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
        protocol=f"{FLAGS.folds}-fold stratified k-fold grouped by subject; val {FLAGS.val_fraction:g} of all "
                 f"images (grouped) inside each fold's training part; mean ± std over folds",
        model=f"{FLAGS.backbone} ({FLAGS.weights} ImageNet weights, frozen) + GRU head "
              f"({FLAGS.units} units, dropout {FLAGS.dropout}), deep ensemble M={FLAGS.members}, head mode",
        test_mean_std=summary, pooled_out_of_fold=pooled, referral_per_fold=referrals,
        referral_mean_std=_mean_std([{k: (np.nan if v is None else v) for k, v in r.items()} for r in referrals],
                                    ["coverage", "accuracy_retained", "accuracy_referred", "accuracy_all"]),
        referral_rule=f"refer if predictive entropy > a threshold chosen on each fold's validation part for "
                      f"{FLAGS.referral_target} >= {FLAGS.referral_value}",
        timing_s=dict(total=t_total, features=t_features, cross_validation=t_cv, final_ensemble=t_final),
        environment=dict(commit=_git_commit(), device=str(jax.devices()[0]), backend=jax.default_backend(),
                         jax=jax.__version__, cpu_count=__import__("os").cpu_count(), python=platform.python_version()),
        command="python -m experiments.quickstart " + " ".join(f"--{k}={v}" for k, v in _flag_values().items()),
    )
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "config.json").write_text(json.dumps(_flag_values(), indent=2))
    acc = summary["accuracy"]
    auc = summary["binary.roc_auc"]
    print(f"quickstart: accuracy {acc['mean']:.3f} ± {acc['std']:.3f}, ROC AUC {auc['mean']:.3f} ± {auc['std']:.3f} "
          f"over {FLAGS.folds} subject-grouped folds; {t_total:.0f}s total. Wrote {out}/")


def _flag_values() -> dict:
    """Returns {flag: value} for the flags this module defines."""
    module = FLAGS.find_module_defining_flag("out_dir")
    return {f.name: f.value for f in FLAGS.flags_by_module_dict()[module]}


if __name__ == "__main__":
    app.run(main)
