"""Figures for reports, readable by a hematologist: class names on axes, titled panels, labelled units.

Every function returns a `matplotlib.figure.Figure` (built without pyplot, rendered by Agg) and, when
`path` is given, also saves it there as a palette PNG (`leukax.records.save_figure`). matplotlib is imported
at the first figure, not at import (its font manager runs fc-list and writes a cache under HOME), and no
backend is selected for the process.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from leukax import metrics, records, uncertainty

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kw) -> Figure:
    """A new `matplotlib.figure.Figure(**kw)` (no pyplot)."""
    from matplotlib.figure import Figure
    return Figure(**kw)

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _save(fig: Figure, path) -> Figure:
    if path is not None:
        records.save_figure(fig, path)
    return fig


def _curve_classes(k: int, pos_label: int | None) -> list[int]:
    if pos_label is not None:
        return [pos_label]
    return [1] if k == 2 else list(range(k))


def confusion_matrix(labels_n, probs_nk, class_names, title: str = "Confusion matrix", path=None) -> Figure:
    """Two panels: counts, and row-normalised (% of each true class). Rows = true, columns = predicted."""
    class_names = list(class_names)
    k = len(class_names)
    cm = np.asarray(metrics.confusion_matrix(np.asarray(labels_n), np.asarray(probs_nk).argmax(-1), k))
    row = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 2.2 + 0.9 * k
    fig = _figure(figsize=(2 * size + 1, size))
    for ax, data, sub, fmt in ((fig.add_subplot(1, 2, 1), cm, "counts", "{:d}"),
                               (fig.add_subplot(1, 2, 2), row * 100, "% of true class", "{:.1f}%")):
        im = ax.imshow(data, cmap="Blues", vmin=0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(k), class_names, rotation=30, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.set_title(f"{title} ({sub})")
        hi = data.max() if data.size else 0
        for i in range(k):
            for j in range(k):
                v = int(data[i, j]) if fmt == "{:d}" else data[i, j]
                ax.text(j, i, fmt.format(v), ha="center", va="center",
                        color="white" if data[i, j] > hi / 2 else "black")
    fig.tight_layout()
    return _save(fig, path)


def _roc_points(is_pos, scores):
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], is_pos[order].astype(float)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each tie group
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    return tp, fp


def roc_curves(labels_n, probs_nk, class_names, pos_label: int | None = None, path=None) -> Figure:
    """ROC curves one-vs-rest (only the positive class when K = 2), AUC in the legend."""
    labels_n, probs_nk = np.asarray(labels_n), np.asarray(probs_nk, np.float64)
    fig = _figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for c in _curve_classes(probs_nk.shape[-1], pos_label):
        is_pos = labels_n == c
        tp, fp = _roc_points(is_pos, probs_nk[:, c])
        tpr = np.r_[0, tp] / max(is_pos.sum(), 1)
        fpr = np.r_[0, fp] / max((~is_pos).sum(), 1)
        auc = float(metrics.roc_auc_binary(is_pos, probs_nk[:, c]))
        ax.plot(fpr, tpr, color=_COLORS[c % len(_COLORS)], lw=2, label=f"{class_names[c]} (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 − specificity)",
           ylabel="True positive rate (sensitivity)", title="ROC curves (each class vs rest)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pr_curves(labels_n, probs_nk, class_names, pos_label: int | None = None, path=None) -> Figure:
    """Precision-recall curves one-vs-rest (only the positive class when K = 2), average precision in legend."""
    labels_n, probs_nk = np.asarray(labels_n), np.asarray(probs_nk, np.float64)
    fig = _figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for c in _curve_classes(probs_nk.shape[-1], pos_label):
        is_pos = labels_n == c
        tp, fp = _roc_points(is_pos, probs_nk[:, c])
        recall = np.r_[0, tp / max(is_pos.sum(), 1)]
        precision = np.r_[1, tp / np.maximum(tp + fp, 1)]
        ap = float(metrics.average_precision_binary(is_pos, probs_nk[:, c]))
        color = _COLORS[c % len(_COLORS)]
        ax.step(recall, precision, where="pre", color=color, lw=2, label=f"{class_names[c]} (AP = {ap:.3f})")
        ax.axhline(is_pos.mean(), color=color, ls=":", lw=1)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="Recall (sensitivity)",
           ylabel="Precision (positive predictive value)",
           title="Precision-recall curves (dotted: prevalence)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def training_curves(histories, path=None) -> Figure:
    """Loss and accuracy per epoch, train (solid) vs validation (dashed), one colour per ensemble member.

    histories: {member_name: {"train_loss": [...], "val_loss": [...], "train_acc": [...], "val_acc": [...]}}
    or a list of such dicts (named "member 0", ...), or the ensemble trainer's stacked form
    {"train_loss": M×E, ...} (rows = members; NaN epochs are not drawn). Missing keys are skipped;
    "accuracy" may replace "acc".
    """
    if isinstance(histories, dict) and not any(isinstance(v, dict) for v in histories.values()):
        stacked = {k: np.atleast_2d(np.asarray(v, float)) for k, v in histories.items()}
        m = max((v.shape[0] for v in stacked.values()), default=0)
        histories = [{k: v[i] for k, v in stacked.items() if i < v.shape[0]} for i in range(m)]
    if not isinstance(histories, dict):
        histories = {f"member {i}": h for i, h in enumerate(histories)}
    fig = _figure(figsize=(11, 4.2))
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    for m, (name, hist) in enumerate(histories.items()):
        color = _COLORS[m % len(_COLORS)]
        for ax, metric in zip(axes, ("loss", "acc")):
            for split, ls in (("train", "-"), ("val", "--")):
                ys = hist.get(f"{split}_{metric}", hist.get(f"{split}_accuracy") if metric == "acc" else None)
                if ys is None or len(ys) == 0:
                    continue
                ax.plot(np.arange(1, len(ys) + 1), np.asarray(ys, float), ls, color=color, lw=1.5,
                        label=f"{name} {'train' if split == 'train' else 'validation'}")
    from matplotlib.ticker import MaxNLocator
    for ax, label in zip(axes, ("Loss (cross-entropy)", "Accuracy")):
        ax.set(xlabel="Epoch", ylabel=label, title=f"{label.split(' ')[0]} per epoch, train vs validation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def reliability_diagram(labels_n, probs_nk, num_bins: int = 15, title: str = "Reliability diagram",
                        path=None) -> Figure:
    """Accuracy vs confidence per equal-width bin (gap shaded), ECE in the title, bin counts below."""
    b = {k: np.asarray(v) for k, v in metrics.reliability_bins(np.asarray(labels_n), np.asarray(probs_nk),
                                                                num_bins).items()}
    ece = float(metrics.ece(np.asarray(labels_n), np.asarray(probs_nk), num_bins))
    centers = (b["edges"][:-1] + b["edges"][1:]) / 2
    width = 1.0 / num_bins
    has = b["count"] > 0
    fig = _figure(figsize=(5.5, 6.5))
    ax, ax_n = fig.add_subplot(4, 1, (1, 3)), fig.add_subplot(4, 1, 4)
    ax.bar(centers[has], b["accuracy"][has], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centers[has], b["confidence"][has] - b["accuracy"][has], bottom=b["accuracy"][has], width=width,
           color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy in bin", title=f"{title} (ECE = {ece:.3f})")
    ax.legend(loc="upper left")
    ax.set_xticklabels([])
    ax_n.bar(centers, b["count"], width=width, color="gray", edgecolor="black")
    ax_n.set(xlim=(0, 1), xlabel="Confidence (max predicted probability)", ylabel="Images")
    fig.tight_layout()
    return _save(fig, path)


def uncertainty_histograms(uncertainty_n, correct_n, name: str = "Predictive entropy (nats)",
                           threshold: float | None = None, bins: int = 20, path=None) -> Figure:
    """Histograms of an uncertainty for correct vs misclassified images (optionally the referral threshold)."""
    u, correct = np.asarray(uncertainty_n, float), np.asarray(correct_n, bool)
    edges = np.histogram_bin_edges(u, bins=bins)
    fig = _figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    ax.hist(u[correct], bins=edges, alpha=0.6, color="tab:green", label=f"correct (n = {correct.sum()})")
    ax.hist(u[~correct], bins=edges, alpha=0.6, color="tab:red", label=f"misclassified (n = {(~correct).sum()})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", label=f"refer above {threshold:.3g}")
    ax.set(xlabel=name, ylabel="Images", title=f"{name.split(' (')[0]}: correct vs misclassified")
    ax.legend()
    return _save(fig, path)


def accuracy_coverage(uncertainty_n, correct_n, threshold: float | None = None,
                      name: str = "predictive entropy", path=None) -> Figure:
    """Accuracy on retained images vs coverage (least uncertain first), the referral threshold marked."""
    t, cov, acc = uncertainty.accuracy_coverage_curve(uncertainty_n, correct_n)
    a = float(uncertainty.aurc(np.asarray(uncertainty_n, np.float32), np.asarray(correct_n)))
    fig = _figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    ax.plot(np.r_[0, cov], np.r_[acc[0], acc], color="tab:blue", lw=2, drawstyle="steps-pre",
            label=f"ranked by {name} (AURC = {a:.3f})")
    ax.axhline(acc[-1], color="gray", ls=":", label=f"no referral ({acc[-1]:.3f})")
    if threshold is not None:
        rep = uncertainty.referral_report(uncertainty_n, correct_n, threshold)
        if rep["accuracy_retained"] is not None:
            ax.plot([rep["coverage"]], [rep["accuracy_retained"]], "o", color="tab:red", ms=9,
                    label=f"threshold {threshold:.3g}: {rep['n_referred']} of {rep['n']} referred, "
                          f"accuracy {rep['accuracy_retained']:.3f}")
            ax.axvline(rep["coverage"], color="tab:red", ls="--", lw=1)
    ax.set(xlim=(0, 1.02), xlabel="Coverage (fraction of images decided automatically)",
           ylabel="Accuracy on retained images", title="Selective prediction: refer the most uncertain")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def selective_curves(curves: dict, title: str = "Selective prediction", path=None) -> Figure:
    """Accuracy on retained cells vs coverage for several models on the same cells: `curves` maps a label to
    (uncertainty_n, correct_n); each is ranked least uncertain first, its AURC in the legend."""
    fig = _figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for name, (u, c) in curves.items():
        _, cov, acc = uncertainty.accuracy_coverage_curve(u, c)
        a = float(uncertainty.aurc(np.asarray(u, np.float32), np.asarray(c)))
        ax.plot(np.r_[0, cov], np.r_[acc[0], acc], lw=1.8, drawstyle="steps-pre",
                label=f"{name} (AURC {a:.3f}, all {acc[-1]:.3f})")
    ax.set(xlim=(0, 1.02), xlabel="Coverage (fraction of cells decided automatically)",
           ylabel="Accuracy on retained cells", title=title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gradcam_overlays(images_bhwc, heatmaps_bhw, labels_n, probs_nk, class_names, max_images: int = 8,
                     alpha: float = 0.45, path=None) -> Figure:
    """Top row: the images; bottom row: Grad-CAM heatmap over them. Titles: true class, predicted class and
    its probability (red when wrong). images are uint8 (or floats in [0, 1]) B×H×W×3."""
    images = np.asarray(images_bhwc)
    if images.dtype != np.uint8:
        images = np.clip(images, 0, 1)
    heat = np.asarray(heatmaps_bhw, float)
    labels, probs = np.asarray(labels_n), np.asarray(probs_nk)
    n = min(len(images), max_images)
    if n == 0:
        raise ValueError("leukax/plots.py: gradcam_overlays needs at least one image")
    fig = _figure(figsize=(2.6 * n, 5.6))
    for i in range(n):
        pred = int(probs[i].argmax())
        ok = pred == int(labels[i])
        top, bottom = fig.add_subplot(2, n, i + 1), fig.add_subplot(2, n, n + i + 1)
        top.imshow(images[i])
        top.set_title(f"true: {class_names[int(labels[i])]}\npred: {class_names[pred]} ({probs[i, pred]:.2f})",
                      color="black" if ok else "tab:red", fontsize=10)
        bottom.imshow(images[i])
        im = bottom.imshow(heat[i], cmap="jet", alpha=alpha, vmin=0, vmax=1)
        bottom.set_title(f"Grad-CAM for {class_names[pred]}", fontsize=9)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=fig.axes, fraction=0.02, pad=0.01, label="class evidence (0–1)")
    return _save(fig, path)


def _macro_curves(labels_n, probs_nk, grid_g):
    """Returns (macro TPR on FPR grid, macro precision on recall grid, macro AUC, macro AP), one-vs-rest
    curves averaged over classes (K = 2: the positive class only)."""
    tprs, precs, aucs, aps = [], [], [], []
    for c in _curve_classes(probs_nk.shape[-1], None):
        is_pos = labels_n == c
        tp, fp = _roc_points(is_pos, probs_nk[:, c])
        tpr, fpr = np.r_[0, tp] / max(is_pos.sum(), 1), np.r_[0, fp] / max((~is_pos).sum(), 1)
        tprs.append(np.interp(grid_g, fpr, tpr))
        rec, prec = np.r_[0, tp / max(is_pos.sum(), 1)], np.r_[1, tp / np.maximum(tp + fp, 1)]
        # step interpolation: precision at recall r = the precision of the first threshold reaching r
        idx = np.minimum(np.searchsorted(rec, grid_g, side="left"), len(rec) - 1)
        precs.append(prec[idx])
        aucs.append(float(metrics.roc_auc_binary(is_pos, probs_nk[:, c])))
        aps.append(float(metrics.average_precision_binary(is_pos, probs_nk[:, c])))
    return np.mean(tprs, 0), np.mean(precs, 0), float(np.mean(aucs)), float(np.mean(aps))


def model_comparison_curves(labels_n, probs_by_model: dict, class_names, title: str = "", path=None) -> Figure:
    """Two panels comparing models (Himel et al. Figs. 5, 6): macro-averaged one-vs-rest ROC (mean TPR over
    classes on a common FPR grid) and precision-recall (mean precision on a recall grid); macro AUC / AP
    in the legend. probs_by_model: {model name: N×K probabilities}. The class names are in the title."""
    labels_n = np.asarray(labels_n)
    grid = np.linspace(0, 1, 201)
    fig = _figure(figsize=(11, 5))
    roc_ax, pr_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (name, probs) in enumerate(probs_by_model.items()):
        tpr, prec, auc, ap = _macro_curves(labels_n, np.asarray(probs, np.float64), grid)
        color = _COLORS[i % len(_COLORS)]
        roc_ax.plot(grid, tpr, color=color, lw=2, label=f"{name} (macro AUC = {auc:.3f})")
        pr_ax.plot(grid, prec, color=color, lw=2, label=f"{name} (macro AP = {ap:.3f})")
    roc_ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    classes = ", ".join(class_names) if len(class_names) > 2 else f"{class_names[1]} vs {class_names[0]}"
    roc_ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 − specificity)",
               ylabel="True positive rate (sensitivity)", title=f"Macro ROC ({classes})")
    pr_ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="Recall (sensitivity)",
              ylabel="Precision (positive predictive value)", title=f"Macro precision-recall ({classes})")
    for ax in (roc_ax, pr_ax):
        ax.legend(loc="lower left" if ax is pr_ax else "lower right", fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def gradcam_branches(images_bhwc, heat_by_branch: dict, labels_n, probs_by_branch: dict, class_names,
                     alpha: float = 0.45, title: str = "", path=None) -> Figure:
    """Himel et al. Fig. 10: one column per image; row 0 the input (true class), then one row per branch
    with that branch's Grad-CAM over the image and its predicted class and probability (red when wrong).
    heat_by_branch / probs_by_branch: {branch name: B×H×W heatmaps / B×K probabilities}."""
    images = np.asarray(images_bhwc)
    labels = np.asarray(labels_n)
    n, rows = len(images), 1 + len(heat_by_branch)
    if n == 0:
        raise ValueError("leukax/plots.py: gradcam_branches needs at least one image")
    fig = _figure(figsize=(2.5 * n + 1, 2.6 * rows))
    im = None
    for i in range(n):
        ax = fig.add_subplot(rows, n, i + 1)
        ax.imshow(images[i])
        ax.set_title(f"input, true: {class_names[int(labels[i])]}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        for r, (name, heat) in enumerate(heat_by_branch.items(), 1):
            probs = np.asarray(probs_by_branch[name])
            pred = int(probs[i].argmax())
            ax = fig.add_subplot(rows, n, r * n + i + 1)
            ax.imshow(images[i])
            im = ax.imshow(np.asarray(heat)[i], cmap="jet", alpha=alpha, vmin=0, vmax=1)
            ax.set_title(f"pred: {class_names[pred]} ({probs[i, pred]:.2f})", fontsize=9,
                         color="black" if pred == int(labels[i]) else "tab:red")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name.replace(" → ", "\n→ "), fontsize=9)
    fig.colorbar(im, ax=fig.axes, fraction=0.02, pad=0.01, label="Grad-CAM class evidence (0–1)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def image_pairs(raw_bhwc, enhanced_bhwc, labels_n, class_names, path=None) -> Figure:
    """Himel et al. Fig. 1: each image raw (top) and enhanced (bottom), titled with its class."""
    raw, enh, labels = np.asarray(raw_bhwc), np.asarray(enhanced_bhwc), np.asarray(labels_n)
    n = len(raw)
    fig = _figure(figsize=(2.3 * n, 5))
    for i in range(n):
        for row, (img, what) in enumerate(((raw, "raw"), (enh, "enhanced"))):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            ax.imshow(img[i])
            ax.set_title(f"{class_names[int(labels[i])]}, {what}", fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, path)


def metric_bars(values_by_model: dict, metric_names, title: str = "", path=None) -> Figure:
    """Himel et al. Fig. 4: grouped bars, one group per model, one bar per metric (values in [0, 1], with an
    optional std as error bar). values_by_model: {model: [(mean, std), ...] in metric_names order}."""
    models = list(values_by_model)
    m = len(metric_names)
    fig = _figure(figsize=(max(6, 1.3 * len(models) * m / 3 + 3), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / m
    for j, name in enumerate(metric_names):
        mean = [values_by_model[k][j][0] for k in models]
        std = [values_by_model[k][j][1] for k in models]
        ax.bar(np.arange(len(models)) + (j - (m - 1) / 2) * width, mean, width, yerr=std, capsize=2,
               color=_COLORS[j % len(_COLORS)], label=name)
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="score (mean ± std over splits)", title=title or "Models compared")
    ax.legend(fontsize=8, ncol=m, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def augmentation_examples(image_hwc, seed: int = 0, path=None) -> Figure:
    """Akter et al.'s Fig. 2: one image, then the same image after each of Sec. 3.2.1's transforms on its own
    (`leukax.augment.augment_paper1` with every other range set to 0 / flag off), then all of them together —
    the draw that makes one stored training copy."""
    import dataclasses

    import jax

    from leukax.augment import Paper1Aug, augment_paper1
    off = Paper1Aug(rotation_range=0.0, width_shift_range=0.0, height_shift_range=0.0, shear_range=0.0,
                    zoom_range=0.0, horizontal_flip=False, vertical_flip=False)
    single = {"rotation ≤ 45°": dict(rotation_range=45.0), "height shift ≤ 20 %": dict(height_shift_range=0.2),
              "width shift ≤ 20 %": dict(width_shift_range=0.2), "zoom ± 10 %": dict(zoom_range=0.1),
              "horizontal flip": dict(horizontal_flip=True), "vertical flip": dict(vertical_flip=True),
              "shear ≤ 20°": dict(shear_range=20.0)}
    x = np.asarray(image_hwc)[None]
    key = jax.random.PRNGKey(seed)
    panels = {"original": x[0]}
    for i, (name, kw) in enumerate(single.items()):
        # flips are drawn with p = 0.5: take the first key whose draw flips, so the panel shows the transform
        for j in range(64):
            y = np.asarray(augment_paper1(jax.random.fold_in(key, 64 * i + j), x, dataclasses.replace(off, **kw)))[0]
            if "flip" not in name or not np.array_equal(y, x[0]):
                break
        panels[name] = y
    panels["all seven (one stored copy)"] = np.asarray(augment_paper1(jax.random.fold_in(key, 10_000), x))[0]
    fig = _figure(figsize=(3 * 5, 3 * 2))
    for i, (name, img) in enumerate(panels.items()):
        ax = fig.add_subplot(2, 5, i + 1)
        ax.imshow(np.clip(img, 0, 255).astype(np.uint8))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle("Akter et al. Sec. 3.2.1 augmentation (Keras ImageDataGenerator semantics)")
    return _save(fig, path)
