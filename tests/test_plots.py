"""leukax.plots: every figure renders to a non-trivial PNG and shows class names, not indices."""
import numpy as np
import pytest

from leukax import plots

NAMES = ["ALL", "AML", "healthy"]


@pytest.fixture(scope="module")
def preds():
    rng = np.random.default_rng(0)
    n, k = 90, 3
    labels = np.repeat(np.arange(k), n // k)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs.astype(np.float32)


def _texts(fig):
    out = []
    for ax in fig.axes:
        out += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        if ax.get_legend() is not None:
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    return " | ".join(out)


def _check_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes, (path, len(data))


def test_confusion_matrix(preds, tmp_path):
    labels, probs = preds
    fig = plots.confusion_matrix(labels, probs, NAMES, path=tmp_path / "cm.png")
    _check_png(tmp_path / "cm.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    # the count drawn at (column = predicted j, row = true i) is the number of class-i images predicted j
    preds = probs.argmax(-1)
    drawn = {tuple(int(round(c)) for c in t.get_position()): int(t.get_text()) for t in ax.texts}
    expected = {(j, i): int(np.sum((labels == i) & (preds == j))) for i in range(3) for j in range(3)}
    assert drawn == expected and sum(drawn.values()) == len(labels)
    assert len({v for (j, i), v in expected.items() if i != j}) > 1  # off-diagonal counts differ: has teeth
    ax_pct = next(a for a in fig.axes if "% of true class" in a.get_title())
    pct = {tuple(int(round(c)) for c in t.get_position()): t.get_text() for t in ax_pct.texts}
    assert pct[(0, 0)] == f"{100 * expected[(0, 0)] / np.sum(labels == 0):.1f}%"
    assert any("% of true class" in ax.get_title() for ax in fig.axes)


def test_roc_and_pr_curves(preds, tmp_path):
    labels, probs = preds
    fig = plots.roc_curves(labels, probs, NAMES, path=tmp_path / "roc.png")
    _check_png(tmp_path / "roc.png")
    text = _texts(fig)
    assert all(f"{n} (AUC = " in text for n in NAMES)
    fig = plots.pr_curves(labels, probs, NAMES, path=tmp_path / "pr.png")
    _check_png(tmp_path / "pr.png")
    assert all(f"{n} (AP = " in _texts(fig) for n in NAMES)
    # binary: only the positive class is drawn
    b_labels = (labels == 0).astype(int)
    b_probs = np.stack([1 - probs[:, 0], probs[:, 0]], 1)
    fig = plots.roc_curves(b_labels, b_probs, ["other", "ALL"])
    assert "ALL (AUC" in _texts(fig) and "other (AUC" not in _texts(fig)


def test_training_curves(tmp_path):
    hist = [{"train_loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.8, 0.7], "train_acc": [0.5, 0.7, 0.9],
             "val_acc": [0.4, 0.6, 0.7]} for _ in range(3)]
    fig = plots.training_curves(hist, path=tmp_path / "train.png")
    _check_png(tmp_path / "train.png")
    text = _texts(fig)
    assert "member 2 validation" in text and "Epoch" in text and "Accuracy" in text
    assert len(fig.axes[0].lines) == 6
    # the ensemble trainer's stacked form {"train_loss": M×E, ...}
    stacked = {k: np.stack([h[k] for h in hist]) for k in hist[0]}
    stacked["val_acc"][1, 2] = np.nan  # an epoch member 1 did not run
    fig = plots.training_curves(stacked)
    assert len(fig.axes[1].lines) == 6 and "member 1 validation" in _texts(fig)


def test_reliability_diagram(preds, tmp_path):
    labels, probs = preds
    fig = plots.reliability_diagram(labels, probs, path=tmp_path / "rel.png")
    _check_png(tmp_path / "rel.png")
    assert "ECE = " in fig.axes[0].get_title()


def test_uncertainty_plots(preds, tmp_path):
    labels, probs = preds
    ent = -(probs * np.log(probs)).sum(1)
    correct = probs.argmax(1) == labels
    fig = plots.uncertainty_histograms(ent, correct, threshold=0.8, path=tmp_path / "hist.png")
    _check_png(tmp_path / "hist.png")
    assert "misclassified" in _texts(fig) and "refer above 0.8" in _texts(fig)
    fig = plots.accuracy_coverage(ent, correct, threshold=0.8, path=tmp_path / "cov.png")
    _check_png(tmp_path / "cov.png")
    assert "referred" in _texts(fig) and "Coverage" in _texts(fig)


def test_gradcam_overlays(preds, tmp_path):
    labels, probs = preds
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (4, 48, 48, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:48, :48]
    heat = np.stack([np.exp(-((yy - 10 * i - 8) ** 2 + (xx - 24) ** 2) / 60.0) for i in range(4)])
    fig = plots.gradcam_overlays(images, heat, labels[::30][:3].tolist() + [1], probs[[0, 30, 60, 1]], NAMES,
                                 path=tmp_path / "cam.png")
    _check_png(tmp_path / "cam.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert "true: ALL\npred: " in titles[0] and "true: AML" in " ".join(titles)
    assert "Grad-CAM for " in titles[1] or any("Grad-CAM for " in t for t in titles)
    with pytest.raises(ValueError, match="plots.py"):
        plots.gradcam_overlays(images[:0], heat[:0], [], probs[:0], NAMES)
