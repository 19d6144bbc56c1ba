"""Himel et al. 2024: two-stage feature-fusion stacked ensemble, with the paper's ablation and tables.

Command:   python -m experiments.feature_fusion                      (writes results/feature_fusion/)
           python -m experiments.feature_fusion --dataset=all_aml_healthy --manual_dir=<data folder>
           python -m experiments.feature_fusion --branches=efficientnet_lite2,mobilenet_v2   (offline weights)
Runtime:   the full default run (60 images, 224 px, 5 folds, offline branches EfficientNet-Lite2 +
           MobileNetV2) has not been timed yet; the test-size run (random weights, 32 px, M=2, 2 epochs,
           2 folds) took ~2 min on 2 busy CPU cores. Measured times are written to metrics.json (timing_s).

What it does:
1. loads `--dataset` (default cnmc2019, binary; `all_aml_healthy` = the paper's 3-class task where the data
   is available) and applies the paper's enhancement (+30 brightness, ×1.4 contrast, Laplacian sharpening;
   `--noenhance` to switch it off) to every image;
2. stage 1: each branch of `--branches` (the paper: EfficientNetB7 + MobileNetV3Large; no offline ImageNet
   weights exist for them here, so a branch whose weights cannot be found is replaced by the same position
   of `--branch_fallbacks`, default efficientnet_lite2,mobilenet_v2, and the substitution is recorded; an
   empty `--branch_fallbacks=` turns that into an error) gets a DenseHead(1024, relu, dropout 0.3) softmax
   classifier, trained on frozen features (`--mode=head`) or fine-tuned with rot90/flip augmentation;
3. stage 2: the branches are frozen, their 1024-d `pre_logits` concatenated, and the MetaClassifier
   (1000 sigmoid → 100 relu → 10 sigmoid → softmax) trained on them with the head-mode trainer;
4. leakage-safe splits by `--protocol` (experiments/common.py); reports the ablation (each branch's own
   softmax, the two branches' sum rule, the fused meta-classifier), parameter counts and measured test time
   per image.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.common import field
from leukax import fusion, metrics, plots
from leukax.data import load_arrays
from leukax.models.classifier import Classifier, count_params
from leukax.models.heads import DenseHead
from leukax.preprocess import augment_paper2, enhance_paper2
from leukax.train.ensemble import TrainConfig, make_train, member_variables, normalize
from leukax.train.features import cached_features, compute_features


@dataclasses.dataclass
class Config:
    out_dir: str = field("results/feature_fusion", "Where metrics.json, config.json, figures/ and splits/ go.")
    dataset: str = field("cnmc2019", "cnmc2019 (embedded sample, binary) | all_aml_healthy (the paper's 3 "
                         "classes) | any builder.")
    data_dir: str | None = field(None, "TFDS data dir of prepared datasets.")
    manual_dir: str | None = field(None, "Folder with the manually downloaded data.")
    branches: tuple = field(("efficientnet_b7", "mobilenet_v3_large"), "Comma-separated stage-1 backbones.")
    branch_fallbacks: tuple = field(("efficientnet_lite2", "mobilenet_v2"),
                                    "Per position, used when a branch's ImageNet weights are missing ('' = fail).")
    weights: str = field("imagenet", "imagenet | none (random init, for tests).")
    weights_dir: str | None = field(None, "Folder of weight files.")
    image_size: int = field(224, "Input size in pixels.")
    enhance: bool = field(True, "Apply enhance_paper2 to every image.")
    mode: str = field("head", "head (frozen backbone features) | finetune.", choices=("head", "finetune"))
    members: int = field(1, "Seeds per stage (deep ensemble).")
    features: int = field(1024, "Width of each branch's dense layer (the fused features).")
    dropout: float = field(0.3, "Branch head dropout.")
    optimizer: str = field("adam", "Stage-1 optimizer.", choices=("sgd", "rmsprop", "adam"))
    learning_rate: float = field(1e-4, "Stage-1 learning rate.")
    batch_size: int = field(16, "Batch size.")
    epochs: int = field(30, "Stage-1 maximum epochs.")
    patience: int = field(10, "Stage-1 early-stopping patience (epochs).")
    meta_optimizer: str = field("adam", "Stage-2 optimizer.", choices=("sgd", "rmsprop", "adam"))
    meta_learning_rate: float = field(1e-3, "Stage-2 learning rate.")
    meta_epochs: int = field(100, "Stage-2 maximum epochs.")
    meta_patience: int = field(20, "Stage-2 early-stopping patience (epochs).")
    protocol: str = field("grouped_kfold", "grouped_kfold | paper_80_20.", choices=common.PROTOCOLS)
    folds: int = field(5, "k of grouped_kfold.")
    repeats: int = field(1, "Seeds repeated.")
    val_fraction: float = field(0.2, "Validation part (fraction of all images, grouped) inside every training part.")
    leaky: bool = field(False, "paper_80_20 per image (ignores subjects).")
    referral_accuracy: float = field(0.95, "Refer above the largest entropy cut whose validation accuracy reaches "
                                     "this.")
    timing_images: int = field(32, "Test images used to measure the time per image.")
    seed: int = field(0, "Seed of everything.")


def _stage1_config(cfg, seed, mode, normalization) -> TrainConfig:
    return TrainConfig(num_members=cfg.members, mode=mode, optimizer=cfg.optimizer, learning_rate=cfg.learning_rate,
                       dropout_rate=cfg.dropout, batch_size=cfg.batch_size, num_epochs=cfg.epochs,
                       patience=cfg.patience, monitor="val_loss", seed=seed, normalization=normalization)


def train_branch(cfg, branch: dict, split, labels, num_classes, seed):
    """Stage 1 for one branch. Returns (probs_val_mnk, probs_test_mnk, feats_mnd (1024-d pre_logits of every
    image, per member), member-0 Classifier variables, history)."""
    head = DenseHead(num_classes, features=cfg.features, dropout=cfg.dropout)
    x = branch["inputs"]
    if cfg.mode == "head":
        model, extra, norm = head, {}, None
        tcfg = _stage1_config(cfg, seed, "head", None)
    else:
        model, norm = Classifier(branch["module"], head), branch["spec"].normalization
        extra = dict(augment_fn=augment_paper2, pretrained=branch["variables"])
        tcfg = _stage1_config(cfg, seed, "finetune", norm)
    tr = make_train(tcfg, model, (x[split.train], labels[split.train]), (x[split.val], labels[split.val]), **extra)
    state = tr.fit()
    feats = np.stack([compute_features(model, member_variables(state, m), x, norm, output="pre_logits")
                      for m in range(cfg.members)])
    m0 = member_variables(state, 0)
    if cfg.mode == "head":  # the frozen backbone + member 0's head as one Classifier (timing, counts)
        bb = branch["variables"]
        m0 = {"params": {"backbone": bb["params"], "head": m0["params"]},
              "batch_stats": {"backbone": bb.get("batch_stats", {})}}
    return tr.predict(state, x[split.val]), tr.predict(state, x[split.test]), feats, m0, tr.history(state)


def train_meta(cfg, feats_bmnd: list, split, labels, num_classes, seed):
    """Stage 2: one MetaClassifier per member m on concat(branch features of member m).
    Returns (probs_val_mnk, probs_test_mnk, member-0 meta variables)."""
    meta = fusion.MetaClassifier(num_classes)
    p_va, p_te, v0 = [], [], None
    for m in range(cfg.members):
        x = np.asarray(fusion.concat_features(*[f[m] for f in feats_bmnd]))
        tcfg = TrainConfig(num_members=1, mode="head", optimizer=cfg.meta_optimizer,
                           learning_rate=cfg.meta_learning_rate, batch_size=cfg.batch_size,
                           num_epochs=cfg.meta_epochs, patience=cfg.meta_patience, monitor="val_loss",
                           seed=seed + 104729 * m, normalization=None)
        tr = make_train(tcfg, meta, (x[split.train], labels[split.train]), (x[split.val], labels[split.val]))
        state = tr.fit()
        p_va.append(tr.predict(state, x[split.val])[0])
        p_te.append(tr.predict(state, x[split.test])[0])
        v0 = member_variables(state, 0) if v0 is None else v0
    return np.stack(p_va), np.stack(p_te), v0


def _ms_per_image(fn, x, repeats: int = 3) -> float:
    jax.block_until_ready(fn(x))  # compile + warm-up
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / x.shape[0]


def timing_and_params(branches, branch_vars, meta_vars, num_classes, images) -> dict:
    """Returns {"rows": [{"model", "params", "ms_per_image"}...]}: each branch alone (backbone + head softmax)
    and the two-stage model (all branches, their heads' features, meta-classifier), timed on `images`."""
    models = [Classifier(b["module"], DenseHead(num_classes, features=_width(v))) for b, v in zip(branches, branch_vars)]
    meta = fusion.MetaClassifier(num_classes)
    x = jnp.asarray(images)
    rows = []
    for b, model, v in zip(branches, models, branch_vars):
        fn = jax.jit(lambda x_, model=model, v=v, norm=b["spec"].normalization:
                     jax.nn.softmax(model.apply(v, normalize(x_, norm))[0]))
        rows.append(dict(model=f"branch {b['record']['used']} (own softmax)", params=count_params(v),
                         ms_per_image=_ms_per_image(fn, x)))

    def two_stage(x_):
        feats = [model.apply(v, normalize(x_, b["spec"].normalization))[1]["pre_logits"]
                 for b, model, v in zip(branches, models, branch_vars)]
        return jax.nn.softmax(meta.apply(meta_vars, fusion.concat_features(*feats))[0])

    total = {k: sum(count_params(v)[k] for v in branch_vars) + count_params(meta_vars)[k]
             for k in ("total", "trainable", "non_trainable")}
    rows.append(dict(model="meta-classifier alone", params=count_params(meta_vars), ms_per_image=None))
    rows.append(dict(model="two-stage fused model (branches + meta-classifier)", params=total,
                     ms_per_image=_ms_per_image(jax.jit(two_stage), x)))
    return dict(rows=rows, timed_on=f"{x.shape[0]} images of {x.shape[1]} px, batch = all, best of 3, "
                                   f"{jax.devices()[0]}")


def _width(variables) -> int:
    return int(variables["params"]["head"]["dense"]["kernel"].shape[-1])


def run(cfg: Config) -> dict:
    """Runs both stages over every split; writes <out_dir>/metrics.json, config.json, figures/, splits/."""
    t_start = time.perf_counter()
    if cfg.mode not in ("head", "finetune"):
        raise ValueError(f"experiments/feature_fusion.py: --mode must be head | finetune, got {cfg.mode!r}")
    out = pathlib.Path(cfg.out_dir)
    for sub in ("figures", "splits"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ds = load_arrays(cfg.dataset, cfg.image_size, data_dir=cfg.data_dir, manual_dir=cfg.manual_dir)
    names, labels, k = list(ds.class_names), np.asarray(ds.labels), len(ds.class_names)
    images = ds.images
    if cfg.enhance:
        images = np.concatenate([np.asarray(enhance_paper2(jnp.asarray(images[s:s + 64])))
                                 for s in range(0, len(images), 64)])

    branches, t_features = [], {}
    for i, name in enumerate(cfg.branches):
        t0 = time.perf_counter()
        fallback = cfg.branch_fallbacks[i] if i < len(cfg.branch_fallbacks) else ""
        module, variables, spec, record = common.load_backbone(name, cfg.weights, cfg.weights_dir, fallback, cfg.seed)
        if cfg.mode == "head":  # pooled features N×1×1×C: DenseHead's global average pool leaves them as they are
            inputs = cached_features(module, variables, images, spec.normalization, output="pre_logits")[:, None, None]
        else:
            inputs = images
        t_features[name] = time.perf_counter() - t0
        branches.append(dict(name=name, module=module, variables=variables, spec=spec, record=record, inputs=inputs))
    bnames = [b["record"]["used"] for b in branches]
    if len(set(bnames)) != len(bnames):
        raise ValueError(f"experiments/feature_fusion.py: the branches used {bnames} are not distinct")

    splits = common.make_splits(cfg.protocol, labels, ds.groups, names, folds=cfg.folds, repeats=cfg.repeats,
                                val_fraction=cfg.val_fraction, seed=cfg.seed, leaky=cfg.leaky)
    rows = bnames + ["branch_sum_rule", "fused_meta"]
    per = {r: {"reports": [], "unc": [], "referral": []} for r in rows}
    pooled = {r: np.zeros((len(labels), k), np.float32) for r in rows}
    mask = np.zeros(len(labels), bool)
    table, t0 = None, time.perf_counter()
    for split in splits:
        common.check_and_save(split, ds.groups, cfg.protocol == "paper_80_20" and cfg.leaky, out / "splits")
        y_va, y_te = labels[split.val], labels[split.test]
        seed = cfg.seed + 1000 * split.repeat + split.fold
        probs = {}
        feats, bvars = [], []
        for b, bname in zip(branches, bnames):
            p_va, p_te, f_mnd, v0, _ = train_branch(cfg, b, split, labels, k, seed)
            probs[bname] = (p_va, p_te)
            feats.append(f_mnd)
            bvars.append(v0)
        probs["branch_sum_rule"] = (np.concatenate([probs[n][0] for n in bnames]),
                                    np.concatenate([probs[n][1] for n in bnames]))
        m_va, m_te, meta_vars = train_meta(cfg, feats, split, labels, k, seed)
        probs["fused_meta"] = (m_va, m_te)
        for r in rows:
            rep, unc, ref = common.evaluate_probs(y_va, probs[r][0], y_te, probs[r][1], names, "accuracy",
                                                  cfg.referral_accuracy)
            per[r]["reports"].append(rep)
            per[r]["unc"].append(unc)
            per[r]["referral"].append(ref)
            if split.repeat == 0:
                pooled[r][split.test] = probs[r][1].mean(0)
        mask[split.test] |= split.repeat == 0
        if table is None:  # parameter counts and test time, measured once on this split's test images
            table = timing_and_params(branches, bvars, meta_vars, k, images[split.test][:cfg.timing_images])
    t_train = time.perf_counter() - t0

    keys = common.metric_keys(k)
    ablation = {}
    for r in rows:
        ablation[r] = common.summarize(per[r]["reports"], per[r]["unc"], per[r]["referral"], keys)
        ablation[r]["pooled_first_repeat"] = metrics.classification_report(labels[mask], pooled[r][mask], names)
    fig = out / "figures"
    plots.confusion_matrix(labels[mask], pooled["fused_meta"][mask], names, title="Two-stage fused model",
                           path=fig / "confusion_matrix_fused_meta.png")
    for bname in bnames:
        plots.confusion_matrix(labels[mask], pooled[bname][mask], names, title=f"Branch {bname} alone",
                               path=fig / f"confusion_matrix_{bname}.png")
    plots.roc_curves(labels[mask], pooled["fused_meta"][mask], names, path=fig / "roc_fused_meta.png")
    plots.reliability_diagram(labels[mask], pooled["fused_meta"][mask], path=fig / "reliability_fused_meta.png")

    result = dict(
        study="Himel et al. 2024: two-stage feature-fusion stacked ensemble",
        dataset=dict(name=cfg.dataset, n=len(labels), counts=ds.counts, groups=int(len(np.unique(ds.groups))),
                     image_size=cfg.image_size, enhancement="enhance_paper2 (+30, ×1.4, Laplacian)" if cfg.enhance
                     else "none"),
        protocol=dict(name=splits[0].protocol, splits=len(splits), repeats=cfg.repeats,
                      summary="mean ± std over all splits; pooled_first_repeat pools repeat 0's test parts"),
        branches=[b["record"] for b in branches],
        model=dict(stage1=f"DenseHead({cfg.features}, relu, dropout {cfg.dropout}) softmax per branch",
                   stage2="MetaClassifier 1000 sigmoid → 100 relu → 10 sigmoid → softmax on concat features",
                   mode=cfg.mode, members=cfg.members,
                   augmentation="augment_paper2 (rot90/flips)" if cfg.mode == "finetune" else "none (frozen features)"),
        ablation=ablation, params_and_test_time=table,
        paper_reported="not transcribed here: compare with the tables of Himel et al. 2024 (their protocol and data)",
        timing_s=dict(total=time.perf_counter() - t_start, features=t_features, training=t_train),
        environment=common.environment(), command=common.command_line("experiments.feature_fusion", cfg))
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    acc = ablation["fused_meta"]["test_mean_std"]["accuracy"]
    print(f"feature_fusion: fused accuracy {acc['mean']:.3f} ± {acc['std']:.3f} over {len(splits)} splits; "
          + ", ".join(f"{r} {ablation[r]['test_mean_std']['accuracy']['mean']:.3f}" for r in bnames)
          + f"; wrote {out}/")
    return result


if __name__ == "__main__":
    common.main(Config, run)
