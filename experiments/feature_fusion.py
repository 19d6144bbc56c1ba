"""Himel et al. 2024: the two-stage feature-fusion stacked ensemble, its Tables 2-5, 8 and Figures 1, 4-11.

Command:   python -m experiments.feature_fusion --weights_dir=../shared/weights   (embedded C-NMC sample →
           results/feature_fusion/cnmc2019/; the EfficientNet-Lite2 file must be in --weights_dir,
           $LEUKAX_WEIGHTS_DIR or the cache, else the run stops naming it)
           python -m experiments.feature_fusion --dataset=all_aml_healthy_standin --manual_dir=../shared/data
           python -m experiments.feature_fusion --dataset=all_aml_healthy --manual_dir=<ALL-IDB2 + ASH root>
           python -m experiments.feature_fusion --protocol=paper    (the paper's own leaky 70/10/20 protocol)
Runtime:   the default run (embedded C-NMC sample, 60 images, 224 px, grouped 5-fold × 2, Lite2 + MobileNetV2
           branches, InceptionV3 baseline, 100 epochs / patience 50) took 261 s (264 s wall) on 2 CPU cores
           shared by 4 engineers; the 3-class stand-in (70 images) 266-493 s (machine load), PBC (320 images) 656 s, the paper
           protocol on the stand-in (16 copies: 1120 items) 471 s. Each run writes its times to metrics.json.

The model (Figure 3 of the paper). Stage 1: each branch (EfficientNetB7, MobileNetV3Large) is an ImageNet
backbone, frozen, with Dense(1024, relu) → Dropout(0.3) → Dense(K) softmax. Table 3 shows that only this head
was trained (trainable = 1,028,099 of each base model), so training on frozen features (head mode, the only
mode here) is the paper's own training, not a shortcut. Stage 2: the branches' output Dense is dropped, their
1024-d features concatenated, and the MetaClassifier (1000 sigmoid → 100 relu → 10 sigmoid → softmax) trained.

Where the branch head reads (`--branch_input`): Table 3's counts (1,028,099 = 1000·1024 + 1024 + 1024·3 + 3;
totals = Keras model *with* top + that) show the paper put Dense(1024) on the backbone's 1000-way ImageNet
classifier output (Keras' include_top ends in softmax, so: ImageNet class probabilities) —
`--branch_input=imagenet_logits`. The default here is `pooled` (global-average-pooled backbone features),
because (1) the ImageNet classifier of most backbones cannot be obtained offline here (only EfficientNet-Lite
ships one), and (2) 1000 ImageNet class probabilities are a bottleneck trained for another task. Both are
reported where both run.

Training (Table 1): batch 32, 100 epochs, Adam (learning rate 1e-3, Keras' default: the paper gives none),
early stopping with patience 50 on validation loss, categorical cross-entropy — the defaults in every
protocol. Both stages train through `leukax.train.compiled` (each whole early-stopped run is one compiled
program; `fit_heads`). The split is what `--protocol` changes:
- grouped_kfold (default, honest): stratified k-fold grouped by subject / duplicate, `--repeats` seeds.
- paper: the paper's own — every image expanded offline into 16 rotated/flipped copies (4 rotations ×
  {none, h, v, both}: each distinct image twice), then a random per-image 70/10/20 split, so copies of one
  cell sit in training and test (leaky); this is how the paper's test set has 1248 = 0.2·16·390 images.
- paper_grouped: the same 70/10/20 with every copy kept with its original cell (no leak).

Data: the study holds no pixels. Labels, groups and sources come from `leukax.data.load_index`; the images
(and the paper's 16 copies of each, enhanced) are decoded from the TFDS source batch by batch through grain
(`feature_fusion_parts.Items`) and passed through each frozen backbone, so memory holds one batch plus the
pooled features (items × D float32) — a full-size dataset needs no more than its features.

Reports (metrics.json, README.md, figures/): Table 2 (each backbone alone with the same head; a backbone
without offline weights is listed "not runnable offline"), Table 8 (the meta-classifier on one branch vs two;
plus the branches' sum rule), Table 5 (per-class precision / recall / F1), Table 3 (parameters as the paper
counts them, for every Table 2 backbone, and measured test time per image and per step of 32), confusion
matrices, macro and per-class ROC and precision-recall curves, training curves and Grad-CAM per branch.
`--target=source` trains the same pipeline to predict the image's source lab instead of its class, which
measures the lab confound of composite datasets; `--noenhance` switches the enhancement off.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import feature_fusion_parts as fp
from experiments import feature_fusion_report as report
from experiments.common import field
from leukax import fusion, imagenet_top, metrics, records
from leukax.data import load_index
from leukax.data.splits import repeated_holdout
from leukax.models.heads import DenseHead
from leukax.train import compiled

PROTOCOLS = ("grouped_kfold", "paper", "paper_grouped")
BASELINES = tuple(n for n in fp.TABLE2 if n != "nasnet_large")


@dataclasses.dataclass
class Config:
    config: str = field("", "Named configuration experiments/configs/<name>.py (himel2024); flags given on the "
                        "command line override its fields.")
    out_dir: str = field("", "Output folder ('' = results/feature_fusion/<dataset>).")
    dataset: str = field("cnmc2019", "cnmc2019 (embedded) | all_aml_healthy (ALL-IDB2 + ASH, the paper's) | "
                         "all_aml_healthy_standin | lab_probe | all_idb1 | all_idb2 | pbc | any builder.")
    data_dir: str | None = field(None, "TFDS data dir of prepared datasets.")
    manual_dir: str | None = field(None, "Folder with the manually downloaded data (one folder per dataset).")
    classes: tuple = field((), "Keep only these classes, in this order (e.g. AML,healthy: Table 4's ASH row).")
    target: str = field("class", "class | source (predict the image's source lab: the confound).",
                        choices=("class", "source"))
    branches: tuple = field(("efficientnet_b7", "mobilenet_v3_large"), "The two stage-1 backbones.")
    branch_fallbacks: tuple = field(("efficientnet_lite2", "mobilenet_v2"),
                                    "Per branch, used when its ImageNet weights are missing ('' = fail).")
    branch_input: str = field("pooled", "pooled (default) | imagenet_logits (the paper's, Table 3).",
                              choices=("pooled", "imagenet_logits"))
    baselines: tuple = field(BASELINES, "Table 2 backbones trained alone with the same head ('' = none).")
    weights: str = field("imagenet", "imagenet | none (random init, for tests).")
    weights_dir: str | None = field(None, "Folder of weight files.")
    image_size: int = field(224, "Input size in pixels (all backbones).")
    enhance: bool = field(True, "Himel et al.'s enhancement: +30 brightness, ×1.4 contrast, Laplacian.")
    members: int = field(1, "Seeds per head (1 = the paper's single model).")
    features: int = field(1024, "Width of each branch's Dense (the fused features).")
    dropout: float = field(0.3, "Branch head dropout.")
    learning_rate: float = field(1e-3, "Adam learning rate, both stages.")
    batch_size: int = field(32, "Batch size (Table 1).")
    epochs: int = field(100, "Maximum epochs, both stages (Table 1).")
    patience: int = field(50, "Early-stopping patience on validation loss (Table 1).")
    protocol: str = field("grouped_kfold", "grouped_kfold | paper (leaky 70/10/20 on 16 copies) | paper_grouped.",
                          choices=PROTOCOLS)
    expand: int = field(-1, "Offline dihedral copies per image: 0, 8, 16; -1 = 16 for paper*, 0 otherwise.")
    folds: int = field(5, "k of grouped_kfold.")
    repeats: int = field(2, "Seeds repeated (grouped_kfold: k-fold repeats; paper*: holdouts).")
    val_fraction: float = field(0.2, "grouped_kfold: validation part (fraction of all images, grouped).")
    referral_accuracy: float = field(0.95, "Refer above the largest entropy cut reaching this val accuracy.")
    gradcam_per_class: int = field(2, "Test images per class in the Grad-CAM figure.")
    seed: int = field(0, "Seed of everything.")


def load_data(cfg):
    """Returns (Dataset index, kept source indices, labels, class names): the dataset's metadata without pixels
    (`load_index`: images are streamed from its TFDS source), the --classes subset and --target applied."""
    ds = load_index(cfg.dataset, data_dir=cfg.data_dir, manual_dir=cfg.manual_dir)
    keep = np.arange(len(ds.labels))
    labels, class_names = np.asarray(ds.labels, np.int32), tuple(ds.class_names)
    if cfg.classes:
        missing = [c for c in cfg.classes if c not in class_names]
        if missing:
            raise ValueError(f"experiments/feature_fusion.py: --classes {missing} not in {class_names}")
        old = [class_names.index(c) for c in cfg.classes]
        keep = np.flatnonzero(np.isin(labels, old))
        labels, class_names = np.asarray([old.index(int(y)) for y in labels[keep]], np.int32), tuple(cfg.classes)
    ds = dataclasses.replace(ds, labels=labels, groups=np.asarray(ds.groups)[keep],
                             sources=[ds.sources[i] for i in keep], class_names=class_names)
    if cfg.target == "source":
        names = tuple(sorted(set(ds.sources)))
        if len(names) < 2:
            raise ValueError(f"experiments/feature_fusion.py: --target=source needs ≥ 2 sources, got {names}")
        return ds, keep, np.asarray([names.index(s) for s in ds.sources], np.int32), names
    return ds, keep, labels, class_names


def make_splits(cfg, labels, groups, names):
    """Returns the Splits of cfg.protocol over the (expanded) items."""
    if cfg.protocol == "grouped_kfold":
        return common.make_splits("grouped_kfold", labels, groups, names, folds=cfg.folds, repeats=cfg.repeats,
                                  val_fraction=cfg.val_fraction, seed=cfg.seed)
    leaky = cfg.protocol == "paper"
    name = "paper 70/10/20 " + ("per image, ungrouped-leaky" if leaky else "grouped (copies with their cell)")
    return repeated_holdout(labels, None if leaky else groups, 0.2, 0.1, cfg.repeats, cfg.seed, names,
                            protocol=name)


def load_models(cfg, items):
    """Returns {requested name: model dict with "inputs" (N×1×1×D head inputs) or "error"}: the branches
    (with fallbacks) and the baselines; a baseline that is a branch shares it."""
    models = {}
    for i, name in enumerate(list(cfg.branches) + [b for b in cfg.baselines if b and b not in cfg.branches]):
        t0 = time.perf_counter()
        fallback = cfg.branch_fallbacks[i] if i < len(cfg.branches) and i < len(cfg.branch_fallbacks) else ""
        try:
            if name == "resnet101_v2":  # built from leukax's ResNetV2; no weights registered for it
                module, variables, spec, rec = fp.resnet101_v2(cfg.weights, cfg.seed)
            else:
                module, variables, spec, rec = common.load_backbone(name, cfg.weights, cfg.weights_dir, fallback,
                                                                    cfg.seed)
            m = dict(module=module, variables=variables, spec=spec, record=rec)
            pooled = fp.pooled_features(module, variables, spec.normalization, items)  # streamed
            if cfg.branch_input == "imagenet_logits":
                w = None if cfg.weights == "none" else cfg.weights
                m["top"] = imagenet_top.load_imagenet_top(rec["used"], pooled.shape[-1], w, cfg.weights_dir, cfg.seed)
                pooled = imagenet_top.top_outputs(rec["used"], m["top"], pooled, "softmax")
            m["inputs"] = pooled[:, None, None, :]
        except (FileNotFoundError, KeyError) as e:
            if name in cfg.branches:
                raise
            m = dict(error=f"not runnable offline (no ImageNet weights): {str(e).splitlines()[0][:300]}")
        m["seconds"] = time.perf_counter() - t0
        models[name] = m
    return models


def fit_heads(cfg, head, x, split, labels, k, seed, members: int, dropout: float):
    """Trains `members` heads on inputs x (N×...) with Table 1's recipe through the compiled head-mode trainer:
    Adam (Keras defaults) at a constant learning rate, categorical cross-entropy, batch min(batch_size, n_train),
    early stopping on the validation loss keeping each member's best weights. Returns (params_m..., p_val_mnk,
    p_test_mnk, history {k: M×epochs run})."""
    rcp = compiled.Recipe(num_members=members, num_epochs=cfg.epochs, batch_size=min(cfg.batch_size, len(split.train)),
                          patience=cfg.patience, optimizer="adam", schedule="constant", label_smoothing=0.0,
                          monitor="val_nll", val_views=0)
    hp = compiled.default_hparams(learning_rate=cfg.learning_rate, weight_decay=0.0, dropout=dropout,
                                  input_dropout=0.0, recurrent_dropout=0.0)
    res = compiled.fit(rcp, head, k, x[split.train], labels[split.train], x[split.val], labels[split.val], hp,
                       seed=seed, views=False)
    predict = compiled.make_predict(head)
    p_va, p_te = (np.asarray(predict(res.params, jnp.asarray(x[idx], jnp.float32)[None])) for idx in (split.val, split.test))
    epochs = int(np.max(res.epochs_run))
    return res.params, p_va, p_te, {key: np.asarray(v)[:, :epochs] for key, v in res.history.items()}


def train_head(cfg, x, split, labels, k, seed):
    """Stage 1 (or Table 2): DenseHead on head inputs. Returns (p_val_mnk, p_test_mnk, feats_mnd of every
    item, member-0 head params, history)."""
    head = DenseHead(k, features=cfg.features, dropout=cfg.dropout)
    params_m, p_va, p_te, hist = fit_heads(cfg, head, x, split, labels, k, seed, cfg.members, cfg.dropout)
    feats = np.asarray(jax.vmap(lambda p: head.apply({"params": p}, jnp.asarray(x))[1]["pre_logits"])(params_m))
    return p_va, p_te, feats, jax.tree.map(lambda a: a[0], params_m), hist


def train_meta(cfg, feats_list, split, labels, k, seed):
    """Stage 2 per member on concat(features of that member), no dropout (the paper's). Returns (p_val_mnk,
    p_test_mnk, member-0 variables, member-0 history)."""
    meta = fusion.MetaClassifier(k)
    p_va, p_te, v0, h0 = [], [], None, None
    for m in range(cfg.members):
        x = np.asarray(fusion.concat_features(*[f[m] for f in feats_list]))
        params_m, pv, pt, hist = fit_heads(cfg, meta, x, split, labels, k, seed + 104729 * m, 1, 0.0)
        p_va.append(pv[0])
        p_te.append(pt[0])
        if v0 is None:
            v0, h0 = {"params": jax.tree.map(lambda a: a[0], params_m)}, hist
    return np.stack(p_va), np.stack(p_te), v0, h0


def run(cfg: Config) -> dict:
    """Runs the study over every split; writes metrics.json, config.json, README.md, figures/, splits/."""
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    env = common.environment()  # provenance of the code that runs: read before, not after, a long run
    if len(cfg.branches) != 2:
        raise ValueError("experiments/feature_fusion.py: --branches needs exactly two backbones")
    out = pathlib.Path(cfg.out_dir or f"results/feature_fusion/{cfg.dataset}")
    for sub in ("figures", "splits"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ds, keep, labels0, names = load_data(cfg)
    k = len(names)
    expand = (16 if cfg.protocol.startswith("paper") else 0) if cfg.expand < 0 else cfg.expand
    items = fp.Items(ds.source, keep, cfg.image_size, expand, cfg.enhance)  # pixels streamed, never all held
    labels, groups = labels0[items.origin], np.asarray(ds.groups)[items.origin]

    models = load_models(cfg, items)
    branch_names = list(cfg.branches)
    runnable = [n for n, m in models.items() if "inputs" in m]
    splits = make_splits(cfg, labels, groups, names)
    rows = runnable + ["meta[branch 1]", "meta[branch 2]", "proposed", "branch_sum_rule"]
    per = {r: [] for r in rows}
    pooled = {r: np.zeros((len(labels), k), np.float32) for r in rows}
    mask = np.zeros(len(labels), bool)
    first = None
    t0 = time.perf_counter()
    for split in splits:
        common.check_and_save(split, groups, cfg.protocol == "paper", out / "splits")
        seed = cfg.seed + 1000 * split.repeat + split.fold
        probs, feats, heads, hist = {}, {}, {}, {}
        for n in runnable:
            p_va, p_te, f, hp, h = train_head(cfg, models[n]["inputs"], split, labels, k, seed)
            probs[n], feats[n], heads[n], hist[n] = (p_va, p_te), f, hp, h
        fb = [feats[b] for b in branch_names]
        for r, fl in (("meta[branch 1]", fb[:1]), ("meta[branch 2]", fb[1:]), ("proposed", fb)):
            p_va, p_te, v, h = train_meta(cfg, fl, split, labels, k, seed)
            probs[r] = (p_va, p_te)
            if r == "proposed":
                meta_vars, hist["proposed (meta-classifier)"] = v, h
        probs["branch_sum_rule"] = tuple(np.concatenate([probs[b][i] for b in branch_names]) for i in (0, 1))
        for r in rows:
            rep, unc, ref = common.evaluate_probs(labels[split.val], probs[r][0], labels[split.test], probs[r][1],
                                                  names, "accuracy", cfg.referral_accuracy)
            rep.update(fp.weighted_prf(rep))
            per[r].append((rep, unc, ref))
            if split.repeat == 0:
                pooled[r][split.test] = probs[r][1].mean(0)
        mask[split.test] |= split.repeat == 0
        if first is None:
            first = dict(split=split, heads=heads, meta=meta_vars, hist=hist)
    t_train = time.perf_counter() - t0

    keys = list(dict.fromkeys(common.metric_keys(k) + ["macro_roc_auc", "macro_f1", "weighted_precision",
                                                       "weighted_recall", "weighted_f1"]))
    results = {}
    for r in rows:
        reps = [p[0] for p in per[r]]
        results[r] = common.summarize(reps, [p[1] for p in per[r]], [p[2] for p in per[r]], keys)
        results[r]["per_class_mean_std"] = common.mean_std(
            reps, [f"per_class.{c}.{m}" for c in names for m in ("precision", "recall", "f1")])
        results[r]["pooled_first_repeat"] = metrics.classification_report(labels[mask], pooled[r][mask], names)
    for n, m in models.items():
        if "error" in m:
            results[n] = dict(error=m["error"])
    timing = report.timing(cfg, models, branch_names, first, k, items.images(first["split"].test[:32]))
    report.figures(cfg, out / "figures", models, branch_names, first, labels, pooled, mask, names, items, results)
    result = dict(
        study="Himel et al. 2024: two-stage feature-fusion stacked ensemble",
        dataset=dict(name=cfg.dataset, classes=list(names), target=cfg.target, n_images=int(len(labels0)),
                     n_items=int(len(labels)), expand=expand, counts=metrics_counts(labels0, names),
                     sources={str(s): int(c) for s, c in zip(*np.unique(ds.sources, return_counts=True))},
                     groups=int(len(np.unique(ds.groups))), image_size=cfg.image_size,
                     enhancement="enhance_paper2 (+30, ×1.4, Laplacian)" if cfg.enhance else "none"),
        protocol=dict(name=splits[0].protocol, splits=len(splits), repeats=cfg.repeats,
                      training=f"head mode (frozen backbones), Adam lr {cfg.learning_rate}, batch {cfg.batch_size}, "
                               f"≤{cfg.epochs} epochs, patience {cfg.patience}, members {cfg.members}",
                      summary="mean ± std over splits; pooled_first_repeat pools repeat 0's test parts"),
        branch_input=cfg.branch_input, branches=[models[b]["record"] for b in branch_names],
        baselines={n: (m.get("record") or {"error": m["error"]}) for n, m in models.items()},
        results=results, table3_paper_semantics=fp.table3(tuple(cfg.branches), k, "imagenet_logits"),
        table3_as_configured=fp.table3(tuple(cfg.branches), k, cfg.branch_input),
        test_time=timing, paper=dict(table2=fp.PAPER_TABLE2, table5=fp.PAPER_TABLE5, table8=fp.PAPER_TABLE8,
                                     table3_ms_per_step=fp.PAPER_TABLE3_MS_PER_STEP,
                                     source="Himel et al. 2024, IEEE Access: 3-class ALL-IDB2 + ASH composite, "
                                            "leaky 70/10/20 on 16 copies, Tesla P100"),
        timing_s=dict(total=time.perf_counter() - t_start, training=t_train,
                      features={n: m["seconds"] for n, m in models.items()}),
        load_average_1min=dict(start=load_start, end=os.getloadavg()[0]),  # other work on the machine
        peak_rss_mb=common.peak_rss_mb(),
        environment=env, command=common.command_line("experiments.feature_fusion", cfg), config=cfg.config or None)
    # rows named after the network that ran, e.g. "efficientnet_lite2 (for efficientnet_b7)"
    label = {n: m["record"].get("label", n) for n, m in models.items() if "record" in m}
    records.write_json(out / "metrics.json", dict(result, results={label.get(r, r): v for r, v in results.items()}))
    records.write_json(out / "config.json", dataclasses.asdict(cfg))
    (out / "README.md").write_text(report.readme(result))
    acc = {r: results[r]["test_mean_std"]["accuracy"]["mean"] for r in rows}
    print(f"feature_fusion: {out}: " + ", ".join(f"{r} {a:.3f}" for r, a in acc.items()))
    return result


def metrics_counts(labels, names) -> dict:
    return {n: int(np.sum(labels == i)) for i, n in enumerate(names)}


if __name__ == "__main__":
    common.main(Config, run)
