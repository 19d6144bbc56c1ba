"""Parts of the Himel et al. 2024 study (experiments/feature_fusion.py) that are not the training loop:
the paper's offline dihedral expansion, Table 2/3/5/8 rows, test-time measurement, Grad-CAM per branch,
and the Markdown tables of results/feature_fusion/*/README.md.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from leukax import fusion, gradcam, imagenet_top
from leukax.models import registry
from leukax.models.classifier import Classifier
from leukax.models.resnet_v2 import ResNetV2
from leukax.preprocess import normalize

# Himel et al. Table 2 in its order; NASNetLarge is not implemented in leukax.
TABLE2 = ("xception", "nasnet_large", "inception_v3", "resnet50_v2", "resnet101_v2", "efficientnet_b6",
          "efficientnet_b7", "mobilenet_v3_large")
# ResNet101V2 as keras.applications builds it, from leukax's ResNetV2 (registered weights exist for none).
STACKS_101 = (("conv2", 64, 3, 2), ("conv3", 128, 4, 2), ("conv4", 256, 23, 2), ("conv5", 512, 3, 1))

# The paper's numbers (Himel et al. 2024, 3-class composite, its own leaky 70/10/20 protocol), to print
# beside ours: Table 2 / Table 8 (accuracy, precision, recall, F1 as weighted averages in %, AUC).
PAPER_TABLE2 = {"xception": (90.5, 90.5, 90.5, 90.5, 0.98), "nasnet_large": (91.6, 91.7, 91.6, 91.6, 0.98),
                "inception_v3": (92.1, 92.1, 92.1, 92.1, 0.98), "resnet50_v2": (92.1, 92.1, 92.1, 92.1, 0.98),
                "resnet101_v2": (93.0, 93.1, 93.0, 93.0, 0.99), "efficientnet_b6": (94.0, 94.0, 94.0, 94.0, 0.99),
                "efficientnet_b7": (96.4, 96.4, 96.4, 96.4, 0.99),
                "mobilenet_v3_large": (98.4, 98.4, 98.4, 98.4, 0.99), "proposed": (99.3, 99.3, 99.3, 99.3, 0.99)}
PAPER_TABLE8 = {"single branch 1": (96.4, 96.5, 96.4, 96.4), "single branch 2": (98.8, 98.8, 98.8, 98.8),
                "dual branch": (99.3, 99.3, 99.3, 99.3)}
PAPER_TABLE5 = {"ALL": {"efficientnet_b7": (95.4, 95.0, 95.2), "mobilenet_v3_large": (96.9, 98.3, 97.6),
                        "proposed": (98.8, 99.0, 98.9)},
                "AML": {"efficientnet_b7": (99.5, 99.3, 99.4), "mobilenet_v3_large": (100.0, 99.8, 99.9),
                        "proposed": (100.0, 100.0, 100.0)},
                "healthy": {"efficientnet_b7": (94.3, 95.0, 94.6), "mobilenet_v3_large": (98.3, 97.1, 97.7),
                            "proposed": (99.0, 98.8, 98.9)}}
PAPER_TABLE3_TOTALS = {"xception": 23_938_579, "nasnet_large": 89_977_917, "inception_v3": 24_879_883,
                       "resnet50_v2": 26_641_899, "resnet101_v2": 45_703_659, "efficientnet_b6": 44_293_242,
                       "efficientnet_b7": 67_686_786, "mobilenet_v3_large": 6_535_531,
                       "proposed [branch 1: efficientnet_b7]": 67_683_711,
                       "proposed [branch 2: mobilenet_v3_large]": 6_532_456,
                       "proposed [meta-classifier]": 2_150_143}
PAPER_TABLE3_MS_PER_STEP = {"xception": 112, "nasnet_large": 262, "inception_v3": 106, "resnet50_v2": 115,
                            "resnet101_v2": 121, "efficientnet_b6": 167, "efficientnet_b7": 209,
                            "mobilenet_v3_large": 94, "proposed": 228}


def dihedral_copies(images_bhwc, copies: int):
    """Returns (images (B·copies)×S×S×3, origin index (B·copies)): the paper's offline augmentation.

    copies=16: rot90 by k ∈ {0,1,2,3} × flips {none, horizontal, vertical, both} as Himel et al. list them
    (rotation and flip); since flipping both ways is a 180° turn, each distinct image appears twice.
    copies=8: the 8 distinct dihedral images. copies ≤ 1: the images unchanged."""
    x = np.asarray(images_bhwc)
    if copies <= 1:
        return x, np.arange(len(x))
    flips = {16: ((0, 0), (1, 0), (0, 1), (1, 1)), 8: ((0, 0), (1, 0))}.get(copies)
    if flips is None:
        raise ValueError(f"experiments/feature_fusion_parts.py: --expand must be 0, 8 or 16, got {copies}")
    out, origin = [], []
    for k in range(4):
        r = np.rot90(x, k, axes=(1, 2))
        for fh, fv in flips:
            y = r[:, :, ::-1] if fh else r
            out.append(y[:, ::-1] if fv else y)
            origin.append(np.arange(len(x)))
    order = np.argsort(np.concatenate(origin), kind="stable")   # copies of image i are adjacent
    return np.ascontiguousarray(np.concatenate(out)[order]), np.concatenate(origin)[order]


class Items:
    """The study's items without their pixels in memory: item j is copy `copy[j]` (in `dihedral_copies`' order)
    of source example `keep[origin[j]]`, enhanced (`enhance_paper2`) when `enhance`. Pixels come from the TFDS
    source on demand: `images(items)` for the few that figures and timing need, `stream()` batch by batch
    through the grain pipeline (`leukax.data.pipeline.epoch_dataset`) for feature extraction, so memory holds
    one batch whatever the dataset's size."""

    def __init__(self, source, keep, image_size: int, expand: int, enhance: bool, batch_images: int = 32):
        self.source, self.keep, self.image_size = source, np.asarray(keep, np.int64), image_size
        self.expand, self.enhance, self.batch_images = expand, enhance, batch_images
        self.copies = max(1, expand)  # dihedral_copies: expand ≤ 1 leaves the images as they are
        self.origin = np.repeat(np.arange(len(self.keep)), self.copies)
        self.copy = np.tile(np.arange(self.copies), len(self.keep))

    def __len__(self) -> int:
        return len(self.origin)

    def _prepare(self, images_bhwc, enhanced: bool):
        from leukax.preprocess import enhance_paper2
        x = np.asarray(images_bhwc)
        return np.asarray(enhance_paper2(jnp.asarray(x))) if enhanced and self.enhance else x

    def images(self, items, enhanced: bool = True) -> np.ndarray:
        """Returns uint8 B×S×S×3: the pixels of `items` (raw, before enhancement, with enhanced=False)."""
        from leukax.data.pipeline import load_example
        items = np.asarray(items, np.int64)
        out = []
        for j in items:
            x = load_example(self.source, int(self.keep[self.origin[j]]), self.image_size)["image"][None]
            out.append(dihedral_copies(self._prepare(x, enhanced), self.expand)[0][self.copy[j]])
        return np.stack(out) if out else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)

    def stream(self):
        """Yields uint8 (b·copies)×S×S×3 batches of every item in order (b = batch_images source images)."""
        from leukax.data.pipeline import epoch_dataset
        for batch in epoch_dataset(self.source, self.image_size, self.batch_images, indices=self.keep,
                                   shuffle=False):
            yield dihedral_copies(self._prepare(batch["image"], True), self.expand)[0]


def pooled_features(module, variables, normalization, items: Items, output: str = "pre_logits",
                    batch_size: int = 32) -> np.ndarray:
    """Returns N_items×D float32 backbone outputs of every item, computed batch by batch from `items.stream()`
    (`leukax.train.features.compute_features` per batch: the same numbers as on the whole array)."""
    from leukax.train.features import compute_features
    out, start = None, 0
    for x in items.stream():
        n = len(x)
        if len(items) >= batch_size and n % batch_size:  # the batches of the whole array, the last one padded
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - n % batch_size, 0)])
        f = compute_features(module, variables, x, normalization, batch_size, output)[:n]
        if out is None:
            out = np.empty((len(items),) + f.shape[1:], np.float32)
        out[start: start + len(f)] = f
        start += len(f)
    assert start == len(items), (start, len(items))
    return out


def weighted_prf(report: dict) -> dict:
    """Returns support-weighted precision / recall / F1 (sklearn's "weighted avg", the paper's Table 2)."""
    pc = report["per_class"]
    n = sum(v["support"] for v in pc.values())
    out = {}
    for m in ("precision", "recall", "f1"):
        out[f"weighted_{m}"] = float(sum((v[m] or 0.0) * v["support"] for v in pc.values()) / max(n, 1))
    return out


def make_backbone(name: str):
    """Returns the no-top module of a Table 2 backbone (resnet101_v2 built from leukax's ResNetV2)."""
    return ResNetV2(stacks=STACKS_101) if name == "resnet101_v2" else registry.get_spec(name).make()


def resnet101_v2(weights: str, seed: int = 0):
    """Returns (module, variables, spec, record) of ResNet101V2 with random weights (weights "none"); leukax
    registers no ImageNet file for it, so "imagenet" raises FileNotFoundError."""
    if weights not in ("none", "random", ""):
        raise FileNotFoundError("resnet101_v2: no ImageNet weights registered in leukax (the Keras file "
                                "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5 is not listed)")
    module = make_backbone("resnet101_v2")
    variables = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 96, 96, 3)))
    spec = registry.BackboneSpec(name="resnet101_v2", make=module.__class__, input_size=224, normalization="tf",
                                 keras_app="ResNet101V2")
    return module, variables, spec, dict(requested="resnet101_v2", used="resnet101_v2", substitution=None,
                                         weights="random init", normalization="tf")


def backbone_size(name: str) -> tuple[int, int]:
    """Returns (variables of the no-top backbone as Keras counts them, feature channels), by shape only."""
    m = make_backbone(name)
    x = jnp.zeros((1, 75, 75, 3))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    fm = jax.eval_shape(lambda v_: m.apply(v_, x)[0], v)
    total = sum(a.size for a in jax.tree_util.tree_leaves(v)) + imagenet_top.keras_constant_params(name)
    return int(total), int(fm.shape[-1])


def table3(branches: tuple, num_classes: int, branch_input: str) -> list[dict]:
    """Returns Table 3's parameter rows (paper semantics) for every Table 2 backbone leukax has."""
    names = [n for n in TABLE2 if n != "nasnet_large"]
    sizes = {n: backbone_size(n) for n in dict.fromkeys(names + list(branches))}
    return fusion.table3_rows({n: s[0] for n, s in sizes.items()}, {n: s[1] for n, s in sizes.items()},
                              tuple(branches), num_classes, branch_input, base_models=names)


def ms_per_step(fn, images, batch: int = 32, repeats: int = 3) -> dict:
    """Returns {"ms_per_step", "ms_per_image"}: best of `repeats` timed calls of fn on one batch of `batch`
    images (tiled from `images` when fewer), after a warm-up call that compiles."""
    x = np.asarray(images)
    x = jnp.asarray(np.resize(x, (batch,) + x.shape[1:]))
    jax.block_until_ready(fn(x))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        best = min(best, time.perf_counter() - t0)
    return dict(ms_per_step=1000.0 * best, ms_per_image=1000.0 * best / batch)


def branch_classifier(branch: dict, head_params: dict, num_classes: int, features: int, branch_input: str):
    """Returns (Classifier(backbone, BranchHead), variables): the frozen backbone [+ ImageNet top] with a
    trained head — the whole branch, for Grad-CAM and timing."""
    hidden = imagenet_top.top_hidden(branch["record"]["used"]) if branch_input == "imagenet_logits" else -1
    model = Classifier(branch["module"], fusion.BranchHead(num_classes, features=features, imagenet_hidden=hidden))
    head = dict(head_params)
    if branch_input == "imagenet_logits":
        head["imagenet_top"] = branch["top"]["params"]
    bb = branch["variables"]
    return model, {"params": {"backbone": bb["params"], "head": head},
                   "batch_stats": {"backbone": bb.get("batch_stats", {})}}


def branch_forward(branch, model, variables):
    """Returns jitted images_bhwc (uint8/float, 0..255) -> (softmax B×K, Dense(1024) features B×1024)."""
    norm = branch["spec"].normalization

    def fn(x):
        logits, out = model.apply(variables, normalize(x, norm))
        return jax.nn.softmax(logits), out["pre_logits"]
    return jax.jit(fn)


def branch_gradcam(branch, model, variables, images):
    """Returns (heatmaps B×H×W in [0, 1], probs B×K) of a whole branch, for its predicted classes."""
    x = normalize(jnp.asarray(images), branch["spec"].normalization)
    heat, logits = gradcam.gradcam_classifier(model, variables, x, None, True)
    return np.asarray(heat), np.asarray(jax.nn.softmax(logits))


def pick_per_class(labels, candidates, per_class: int = 2) -> np.ndarray:
    """Returns up to `per_class` indices of each class from `candidates` (in order)."""
    labels = np.asarray(labels)
    return np.asarray([i for c in np.unique(labels[candidates]) for i in
                       [j for j in candidates if labels[j] == c][:per_class]], int)


def _fmt(stat, pct: bool = True) -> str:
    if stat is None or stat.get("mean") is None:
        return "–"
    m, s = stat["mean"], stat["std"] or 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def markdown_rows(rows: dict, paper: dict, keys=("accuracy", "weighted_precision", "weighted_recall",
                                                  "weighted_f1", "macro_roc_auc")) -> list[str]:
    """Returns Markdown table lines: one per model, ours (mean ± std over splits, %) then the paper's."""
    head = "| model | " + " | ".join(keys) + " | paper's (acc, P, R, F1[, AUC]) |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for name, row in rows.items():
        stats = row.get("test_mean_std") if isinstance(row, dict) else None
        if stats is None:
            lines.append(f"| {name} | " + " | ".join(["–"] * len(keys)) + f" | {paper.get(name, '–')} |")
            continue
        cells = [_fmt(stats.get(k), pct=k != "macro_roc_auc") for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {paper.get(row.get('paper_key', name), '–')} |")
    return lines
