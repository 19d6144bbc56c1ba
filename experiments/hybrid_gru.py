"""Akter et al. 2024: hybrid CNN-GRU deep ensembles fused with the sum rule — with baselines, calibration and
augmentation that reaches head mode.

Command:   python -m experiments.hybrid_gru                          (writes results/hybrid_gru/)
           python -m experiments.hybrid_gru --dataset=all_idb2 --manual_dir=<ALL-IDB folder>
           python -m experiments.hybrid_gru --dataset=pbc --manual_dir=../shared/data/pbc-subset --out_dir=results/heads/pbc
           python -m experiments.hybrid_gru --hparams=paper                   (Table 2 per backbone, whole)
           python -m experiments.hybrid_gru --hparams=bo --bo_trials=30       (batched BO on validation only)
           python -m experiments.hybrid_gru --protocol=paper_80_20 --leaky     (the paper's own split)
           python -m experiments.hybrid_gru --dataset=image_folder --manual_dir=<one subfolder per class>
                                                                               (a lab's own cells; subjects.csv optional)
Runtime:   (2 CPU cores, AVX2 EPYC, quiet, 2026-12-02, commits fd84b3b / 6786b30; every run writes its times to
           metrics.json → timing_s)
           - PBC, 320 cells, 3 backbones × 5 folds, heads probe + GRU (M = 5): 8.4 min of training (505 s); the
             first run also extracts 8 views per cell: 26 s MobileNetV2, 3.7 min InceptionV3 (299 px), 65 s Lite2
             (results/heads/README.md, rerun at fd84b3b).
           - PBC, --backbones=mobilenet_v2 --heads=gru, cached features: 123 s of training for the 5 folds (compiles,
             predictions and calibration included; 133 s in all).
           - PBC, --backbones=mobilenet_v2 --heads=gru --hparams=bo --bo_trials=30 --protocol=paper_80_20: 7.5 min in
             all, 6.7 min of it the 30-trial search (results/benchmarks/bo_pbc_mobilenet_v2.md).
           - ALL-IDB2 (260 cells), defaults: ~7 min of training + ~5 min of feature extraction, scaled from the PBC
             run (ALL-IDB is not on these machines).
           - Measured before the 2026-12-02 speedups (so upper bounds): PBC with --repeats=5 (25 splits), 90 min of
             training (results/heads/pbc_5x5); C-NMC sample, 60 cells, all four heads, 6 min with cached features.

What it does (head mode, the default; `--mode=finetune` trains backbone + GRU end to end instead, its images
read from the TFDS source batch by batch through grain with the paper's augmentation per member):
1. loads `--dataset` (cnmc2019 = the embedded sample; all_idb1, all_idb2, all_idb, pbc or any builder name);
2. per backbone of `--backbones` (EfficientNetB3 has no offline weights: `--b3_substitute` takes its place and
   the substitution is recorded) computes the frozen feature maps of `--views` (8 dihedral views per image:
   rotations/flips, exact for single cells) once;
3. splits by `--protocol` (grouped k-fold repeated `--repeats` times, or the paper's 80/20, grouped or
   `--leaky`), a grouped validation part inside every training part; views are only ever sliced per split;
4. per split and backbone: standardisation + PCA to `--feature_dim` fitted on the training part only; then
   on the same features and split the linear probe (logistic regression), a linear head, a dense head and the
   GRU head (`--heads`), each head a deep ensemble of `--members` trained by the compiled trainer
   (leukax.train.compiled: AdamW, label smoothing, warm-up + cosine, dropouts, early stopping on validation
   NLL keeping each member's best weights, a different view per member and epoch), predictions averaged over
   the views (TTA); temperature scaling fitted on validation data;
5. fuses the backbones' `--head` ensembles with the sum rule (and every other head kind likewise); reports
   per head and fused test metrics as mean ± std over splits, before/after temperature scaling, deep-ensemble
   uncertainty (Akter's two-term variance) and referral, with the paper's reported numbers beside ours.
6. (`--save_model`, on by default) trains every hybrid's `--head` ensemble once more on all images, with a grouped
   validation part for early stopping, temperature and referral thresholds, and saves ONE fused bundle to
   <out_dir>/model (`save_final_model`) for `python -m leukax.predict` and `python -m leukax.app`.
`--hparams=paper` applies the whole of Table 2 per backbone (units, optimizer, learning rate, momentum,
dropout; constant learning rate, no label smoothing, no weight decay) to the GRU head.

Why these defaults (results/dev_suite/three_backbones/README.md: every head and fusion rule on PBC, the C-NMC
sample and the AML-LMU sample, three backbones, the same splits): `--head=gru` because its ensemble does not
lose to the probe on any of the 9 backbone × set pairs (−0.033 to +0.260 accuracy, "wins" on 5, ties on 4); not
`gru_pool`, which helps the fused C-NMC row (+0.067, a tie) but is behind on AML-LMU and PBC (−0.040, −0.016
fused); the sum rule as the main fused row because the validation-fitted weights and the validation choice never
beat it (mean accuracy −0.060 to +0.000, NLL never lower) — both are reported beside it. The GRU head's
own defaults, each against one change on the same splits (results/dev_suite/recipe_variants/README.md):
`--order=center_last` (raster order loses 0.46 on AML-LMU and 0.21 on PBC), `--feature_dim=256` (no PCA and PCA
128 tie on every set) and `--units=128` (64 units lose on AML-LMU's NLL; 256 tie on all nine backbone × set pairs,
mean −0.001, at ~1.4× the training time). `--temperature_prior=0.5`: with it the fused GRU's pooled ECE after scaling is
inside the band of a calibrated model on all three sets (PBC 0.036, C-NMC 0.096, AML-LMU 0.095), while maximum
likelihood (σ = 0) leaves AML-LMU outside (0.207, band 0.092) and 6 of the 18 GRU rows outside theirs (σ = 0.5: 2);
it costs PBC its ≤ 0.02 (0.019 → 0.036, inside its band 0.050) (results/dev_suite/three_backbones/README.md).
"""
from __future__ import annotations

import dataclasses
import pathlib
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.common import field
from leukax import bundle as bundle_lib
from leukax import calibration, fusion, metrics, plots, records, uncertainty
from leukax.augment import augment_paper1
from leukax.data import load_index
from leukax.data.pipeline import load_example
from leukax.models.classifier import Classifier
from leukax.models import registry as model_registry
from leukax.models.heads import make_head
from leukax.preprocess import smooth
from leukax.train import bayes, compiled, recipe
from leukax.data.splits import repeated_holdout
from leukax.train.finetune import ImageStream, TrainConfig, make_train

# Fused rows beside the paper's sum rule (`fused`), when there are several hybrids.
FITTED_FUSION = ("fused_fitted", "fused_chosen")
FUSION_LABELS = {"fused_fitted": "fused (validation-fitted weights)", "fused_chosen": "fused (rule chosen on validation)"}

# Akter et al. 2024, as reported in the paper (their protocol: a random per-image split, i.e. `--leaky`).
PAPER_REPORTED = {
    "source": "Akter et al. 2024, reported test accuracy of the sum-rule fused hybrid ensemble (not measured here)",
    "accuracy": {"all_idb1": 1.0, "all_idb2": 0.9807, "all_idb": 0.9864},
}


@dataclasses.dataclass
class Config:
    config: str = field("", "Named configuration experiments/configs/<name>.py (akter2024 | leukax); flags given "
                        "on the command line override its fields.")
    out_dir: str = field("results/hybrid_gru", "Where metrics.json, config.json, figures/, splits/ and bo/ go.")
    dataset: str = field("cnmc2019", "cnmc2019 (embedded sample) | all_idb1 | all_idb2 | all_idb | pbc | any "
                         "leukax builder name.")
    data_dir: str | None = field(None, "TFDS data dir of prepared datasets.")
    manual_dir: str | None = field(None, "Folder with the manually downloaded data.")
    backbones: tuple = field(("mobilenet_v2", "inception_v3", "efficientnet_b3"),
                             "Comma-separated backbones, one hybrid each.")
    b3_substitute: str = field("efficientnet_lite2",
                               "Used instead of efficientnet_b3 when its ImageNet weights are missing ('' = fail).")
    weights: str = field("imagenet", "imagenet | none (random init, for tests).")
    weights_dir: str | None = field(None, "Folder of weight files.")
    image_size: int = field(0, "Input size in pixels (0 = each backbone's own: 224 / 299 / 260).")
    mode: str = field("head", "head (frozen features) | finetune.", choices=("head", "finetune"))
    cpu_kernels: str = field("xla", "Depthwise convolutions on CPU: xla (pure JAX, the default graph) | native "
                             "(leukax.native's C++ kernel, built with g++; for finetuning).", choices=common.CPU_KERNELS)
    heads: tuple = field(("probe", "linear", "dense", "gru"), "Heads trained on the same features and splits: "
                         "probe (logistic regression), linear, dense, gru.")
    head: str = field("gru", "The head whose ensembles the main result fuses.", choices=("gru", "dense", "linear", "probe"))
    members: int = field(5, "Deep-ensemble members M per head.")
    hparams: str = field("recipe", "recipe (leukax's defaults below) | paper (Table 2 per backbone) | bo.",
                         choices=("recipe", "paper", "bo"))
    views: str = field("dihedral", "Cached views per image: dihedral (8) | none.", choices=("dihedral", "none"))
    num_affine: int = field(0, "Extra views drawn from the paper's affine augmentation.")
    augment: str = field("views", "views (each member draws a view per image and epoch; TTA) | copies (the paper's: "
                         "every view of a training image is one more stored training item; validation and test "
                         "read the un-augmented view 0 only).", choices=("views", "copies"))
    smoothing: str = field("none", "Noise-removal smoothing of every image before feature extraction "
                           "(leukax.preprocess.smooth; Akter et al. Sec. 3.2): none | gaussian (sigma 1) | median "
                           "(3x3).", choices=("none", "gaussian", "median"))
    feature_dim: int = field(256, "PCA feature channels, fitted on the training part (0 = all standardised channels).")
    feature_residency: str = field("auto", "Where the reduced features live while heads train: auto (on the device "
                                   "while they take at most half its free memory, else host) | device | host (each "
                                   "batch fed from host memory by the compiled trainer; same results).",
                                   choices=compiled.RESIDENCIES)
    units: int = field(128, "GRU units (recipe).")
    order: str = field("center_last", "Order the GRU reads the H·W positions: center_last (the cell's centre last) "
                       "| raster (row-major, the flattened map).", choices=("center_last", "raster"))
    hidden: int = field(128, "Width of the dense layer after the GRU.")
    optimizer: str = field("adamw", "Optimizer (recipe).", choices=compiled.OPTIMIZERS[:-1])  # not "traced"
    learning_rate: float = field(3e-3, "Peak learning rate (recipe).")
    momentum: float = field(0.9, "Momentum of sgd / rmsprop (recipe); 0 means none.")
    weight_decay: float = field(1e-2, "Weight decay (decoupled for adamw).")
    dropout: float = field(0.3, "Dropout before the last layer.")
    input_dropout: float = field(0.2, "Dropout of feature channels.")
    label_smoothing: float = field(0.1, "Label smoothing (recipe).")
    batch_size: int = field(32, "Batch size.")
    epochs: int = field(40, "Maximum epochs.")
    patience: int = field(10, "Early-stopping patience (epochs).")
    bo_trials: int = field(30, "Bayesian-optimisation trials per hybrid and split.")
    bo_batch: int = field(6, "BO trials suggested together (constant liar), scored before the next batch.")
    bo_members: int = field(1, "Members per BO trial (the paper tuned single hybrids and then ensembled them; the "
                            "chosen setting is then trained with --members).")
    bo_vector: int = field(1, "BO trials of equal GRU width vectorised into one call (1 on CPU, where it measured no "
                           "faster; e.g. 6 on a GPU). Groups are padded to it, so each width compiles once.")
    bo_metric: str = field("val_nll", "BO objective on the validation part.", choices=("val_acc", "val_nll"))
    protocol: str = field("grouped_kfold", "grouped_kfold | paper_80_20.", choices=common.PROTOCOLS)
    folds: int = field(5, "k of grouped_kfold.")
    repeats: int = field(1, "Seeds repeated.")
    val_fraction: float = field(0.2, "Validation part (fraction of all images, grouped) inside every training part.")
    leaky: bool = field(False, "paper_80_20 per image, ignoring subjects and duplicates (as the paper did).")
    referral_accuracy: float = field(0.95, "Refer above the largest entropy cut whose validation accuracy reaches "
                                     "this.")
    feature_cache: str | None = field(None, "Folder to keep frozen features (float16 .npy, resumable) between runs; "
                                      "unset = a temporary folder deleted at the end.")
    quiet: bool = field(False, "No progress bars or per-phase lines on stderr.")
    groups_csv: str | None = field(None, "--dataset=image_folder: CSV with columns file,subject (default: "
                                   "<manual_dir>/subjects.csv when present); splits keep a subject on one side.")
    save_model: bool = field(True, "After cross-validation, train the final fused model on all images (grouped "
                             "validation part) and save it to <out_dir>/model for leukax.predict and leukax.app.")
    temperature_prior: float = field(calibration.PRIOR_SCALE, "σ of a Gaussian prior on log T for temperature "
                                     "scaling (0 = maximum likelihood). On validation parts of ~10 cells without an "
                                     "error the maximum-likelihood T runs to 0.05; σ = 0.5 keeps it finite and the "
                                     "fused ECE inside a calibrated model's band on every suite set (results/"
                                     "dev_suite/three_backbones/README.md).")
    ood_alpha: float = field(0.05, "The saved model's mutual-information and OOD rules refer at most this fraction "
                             "of in-distribution cells (conformal quantile of validation scores).")
    seed: int = field(0, "Seed of everything.")
    progress: bool = field(False, "Print one line per training epoch (head mode) and per split.")


# ----------------------------------------------------------------------------------------------- training
def split_hparams(cfg, role: str, tr, va, split, labels, num_classes, bo_dir, y_tr=None):
    """Returns (compiled.Recipe, traced hyper-parameters, GRU units, source) for one hybrid on one split: leukax's
    recipe, the paper's Table 2 row, or the best batched-BO trial scored on this split's validation part only."""
    base = compiled.Recipe(num_members=cfg.members, num_epochs=cfg.epochs, batch_size=cfg.batch_size,
                           patience=cfg.patience, optimizer=cfg.optimizer, label_smoothing=cfg.label_smoothing,
                           progress=cfg.progress)
    if cfg.hparams == "recipe":
        hp = compiled.default_hparams(learning_rate=cfg.learning_rate, momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay, dropout=cfg.dropout,
                                      input_dropout=cfg.input_dropout)
        return base, hp, cfg.units, "recipe flags"
    if cfg.hparams == "paper":
        row = recipe.PAPER_TABLE2.get(role)
        if row is None:
            raise common.InputError(f"experiments/hybrid_gru.py: Table 2 has no row for {role!r}; use --hparams=recipe")
        rcp = dataclasses.replace(base, optimizer=row["optimizer"], schedule="constant", label_smoothing=0.0)
        hp = compiled.default_hparams(learning_rate=row["learning_rate"], momentum=row["momentum"],
                                      dropout=row["dropout"], weight_decay=0.0, input_dropout=0.0)
        return rcp, hp, row["units"], f"Akter et al. 2024 Table 2 [{role}]"
    y_tr, y_va = labels[split.train] if y_tr is None else y_tr, labels[split.val]

    # Trials of one GRU width share one compiled program (optimizer, learning rate, momentum, dropouts and weight
    # decay are traced), run `bo_vector` trials per call; each trial trains `bo_members` members.
    rcp = dataclasses.replace(base, optimizer="traced", num_members=cfg.bo_members)

    pid, count = jax.process_index(), jax.process_count()

    def objective_batch(params_list):
        # Over several processes, trial i trains on process i mod P; the scores are then shared (all processes
        # suggest the same next batch: the BO is deterministic given the scores).
        mine = [i for i in range(len(params_list)) if i % count == pid]
        scores = np.full((len(params_list), 2), np.nan)  # (val_acc, val_nll) per trial
        groups: dict = {}
        for i in mine:
            groups.setdefault(int(params_list[i]["units"]), []).append(i)
        for units, idx in groups.items():
            head = recipe.make_model("gru", num_classes, units, cfg.hidden, order=cfg.order)
            probs_tmnk = []
            for c in range(0, len(idx), cfg.bo_vector):
                hps = [bayes.recipe_hparams(params_list[i]) for i in idx[c: c + cfg.bo_vector]]
                hps += hps[-1:] * (cfg.bo_vector - len(hps))  # padding: the same program for every call
                res = compiled.fit(rcp, head, num_classes, tr, y_tr, va, y_va, hps, seed=cfg.seed)
                probs_tmnk += [compiled.predict_probs(head, compiled.trial(res, t).params, va)
                               for t in range(min(cfg.bo_vector, len(idx) - c))]
            for t, i in enumerate(idx):
                mean_nk = probs_tmnk[t].mean(0)
                scores[i] = (np.mean(mean_nk.argmax(-1) == y_va),
                             float(metrics.nll(jnp.asarray(y_va, jnp.int32), jnp.asarray(mean_nk))))
        if count > 1:
            if not cfg.quiet:
                print(f"{role}: BO trials {mine} of {len(params_list)} on process {pid} of {count}", flush=True)
            scores = common.gather_rows(scores, owner=np.arange(len(params_list)) % count)
        return [(float(acc) if cfg.bo_metric == "val_acc" else -float(nll),
                 {"val_acc": float(acc), "val_nll": float(nll)}) for acc, nll in scores]

    log_path = pathlib.Path(bo_dir) / f"{role}_r{split.repeat}_f{split.fold}.json"
    if count > 1:  # a resumed search must resume alike everywhere, or the processes would suggest different trials
        logged = common.gather_rows(np.full((count, 1), len(bayes.load_log(log_path))), owner=np.arange(count))
        if len(set(logged.ravel().tolist())) > 1:
            raise common.InputError(f"experiments/hybrid_gru.py: the processes hold {logged.ravel().tolist()} logged "
                                    f"BO trials in {log_path.name}: resume a divided search from the same logs, or "
                                    "remove them")
    best = bayes.run_batched(objective_batch, bayes.RECIPE_SPACE, cfg.bo_trials, log_path, batch=cfg.bo_batch,
                             init_points=min(cfg.bo_batch, cfg.bo_trials), seed=cfg.seed)["best"]
    p = best["params"]
    hp = {k: v for k, v in bayes.recipe_hparams(p).items() if k != "optimizer_index"}  # static below
    return (dataclasses.replace(base, optimizer=p["optimizer"]), hp, int(p["units"]),
            f"BO trial {best['trial']} of {log_path.name} ({cfg.bo_metric} target={best['target']:.4f})")


def train_finetune(cfg, hybrid: dict, split, labels, num_classes, seed):
    """--mode=finetune: backbone + GRU head trained end to end with the paper's augmentation; returns
    (probs_val_mnk, probs_test_mnk, info)."""
    row = dict(units=cfg.units, optimizer="adam" if cfg.optimizer == "adamw" else cfg.optimizer,
               learning_rate=cfg.learning_rate, momentum=cfg.momentum, dropout=cfg.dropout)
    if cfg.hparams == "paper":  # Table 2's whole row, as in head mode (`split_hparams`)
        row = recipe.PAPER_TABLE2[hybrid["name"]]
    head = make_head("gru", num_classes, units=row["units"], dropout=row["dropout"], hidden=cfg.hidden, order=cfg.order)
    part = lambda idx: dataclasses.replace(hybrid["inputs"], indices=hybrid["inputs"].indices[idx])  # noqa: E731
    tcfg = TrainConfig(num_members=cfg.members, optimizer=row["optimizer"],
                       learning_rate=row["learning_rate"], momentum=row["momentum"],
                       dropout_rate=row["dropout"], batch_size=cfg.batch_size, num_epochs=cfg.epochs,
                       patience=cfg.patience, monitor="val_loss", seed=seed,
                       normalization=hybrid["spec"].normalization)
    tr = make_train(tcfg, Classifier(hybrid["module"], head), (part(split.train), labels[split.train]),
                    (part(split.val), labels[split.val]), augment_fn=augment_paper1, pretrained=hybrid["variables"])
    state = tr.fit()
    return (tr.predict(state, part(split.val)), tr.predict(state, part(split.test)),
            {"members": cfg.members, "history": tr.history(state),
             "hparams": dict(source=f"Akter et al. 2024 Table 2 [{hybrid['name']}]" if cfg.hparams == "paper"
                             else "recipe flags", **row)})


def _residency(cfg, views, num_images: int) -> str:
    """Where the reduced features of `num_images` images live (`--feature_residency`, weighed by their bytes)."""
    return compiled.feature_residency(recipe.transformed_bytes(cfg.feature_dim, views, num_images),
                                      cfg.feature_residency)


def train_heads(cfg, hybrid: dict, split, labels, num_classes, seed, bo_dir) -> dict:
    """Head mode: every head kind of `cfg.heads` on the same transformed features of this split; returns
    {kind: (probs_val_mnk, probs_test_mnk, info)} (info["hparams"] says where the GRU's came from)."""
    views = hybrid["inputs"]  # V×N×T×C
    tf = recipe.fit_transform(views, cfg.feature_dim, seed=seed, indices=split.train)  # reads sampled rows only
    where = _residency(cfg, views, sum(map(len, split.parts().values())))
    tr, va, te = (recipe.transform(tf, views, idx, residency=where) for idx in (split.train, split.val, split.test))
    y_tr = labels[split.train]
    if cfg.augment == "copies":  # V×N → 1×(V·N) stored training items (view-major); un-augmented val/test
        tr, va, te, y_tr = tr.reshape((1, -1) + tr.shape[2:]), va[:1], te[:1], np.tile(y_tr, len(tr))
    rcp, hp, units, source = split_hparams(cfg, hybrid["name"], tr, va, split, labels, num_classes, bo_dir, y_tr)
    out = {}
    for kind in cfg.heads:
        k_rcp, k_hp = (rcp, hp) if kind == "gru" else (dataclasses.replace(rcp, optimizer="adamw", schedule="warmup_cosine"),
                                                        compiled.default_hparams())
        p_va, p_te, info = recipe.train_and_predict(kind, k_rcp, k_hp, num_classes, tr, y_tr, va, te,
                                                    labels[split.val], units=units, hidden=cfg.hidden,
                                                    order=cfg.order, seed=seed, residency=where,
                                                    mesh=common.member_mesh(cfg.members) if where == "device" else None)
        info["hparams"] = dict(source=source if kind == "gru" else "recipe defaults", units=units if kind == "gru"
                               else None, optimizer=k_rcp.optimizer, **{k: float(v) for k, v in k_hp.items()})
        out[kind] = (p_va, p_te, info)
    return out


# --------------------------------------------------------------------------------------------------- run
def run(cfg: Config) -> dict:
    """Runs the study; writes <out_dir>/metrics.json, config.json, figures/, splits/ and returns the metrics."""
    t_start = time.perf_counter()
    env = common.environment()  # provenance of the code that runs: read before, not after, a long run
    out = pathlib.Path(cfg.out_dir)
    scratch = tempfile.TemporaryDirectory(prefix="leukax_features_")  # features without --feature_cache
    kinds = ("gru",) if cfg.mode == "finetune" else tuple(cfg.heads)
    if cfg.head not in kinds:
        raise common.InputError(f"experiments/hybrid_gru.py: --head={cfg.head} is not among --heads={','.join(kinds)}")
    unknown = set(kinds) - set(recipe.HEAD_KINDS)
    if unknown:
        raise common.InputError(f"experiments/hybrid_gru.py: --heads: unknown {sorted(unknown)}; known {recipe.HEAD_KINDS}")
    save_model = cfg.save_model and cfg.mode == "head" and cfg.head != "probe"
    if cfg.save_model and not save_model:
        print(f"hybrid_gru: no model will be saved: bundles hold head-mode ensembles (--mode={cfg.mode}, "
              f"--head={cfg.head})", flush=True)
    if cfg.groups_csv and cfg.dataset != "image_folder":
        raise common.InputError("experiments/hybrid_gru.py: --groups_csv is for --dataset=image_folder")
    if cfg.mode == "finetune" and cfg.hparams == "bo":
        raise common.InputError("experiments/hybrid_gru.py: --mode=finetune with --hparams=bo is not implemented "
                                "(BO runs in head mode); use --hparams=paper or recipe")
    if cfg.hparams == "paper" and set(cfg.backbones) - set(recipe.PAPER_TABLE2):
        raise common.InputError(f"experiments/hybrid_gru.py: --hparams=paper: Table 2 has no row for "
                                f"{sorted(set(cfg.backbones) - set(recipe.PAPER_TABLE2))}; use --hparams=recipe")
    for name in cfg.backbones:  # inputs checked before any feature extraction or compilation
        try:
            model_registry.get_spec(name)
        except KeyError as e:
            raise common.InputError(f"experiments/hybrid_gru.py: --backbones: {e.args[0]}") from None
    # Both modes stream the images from the TFDS source (labels, groups and names in memory, no pixels): head mode
    # into the feature extraction, finetune mode into every training step (finetune.ImageStream).
    t_data = time.perf_counter()  # building the TFDS dataset on first use, then reading its index
    ds = load_index(cfg.dataset, data_dir=cfg.data_dir, manual_dir=cfg.manual_dir, **_data_kwargs(cfg))
    splits = common.make_splits(cfg.protocol, np.asarray(ds.labels), ds.groups, list(ds.class_names), folds=cfg.folds,
                                repeats=cfg.repeats, val_fraction=cfg.val_fraction, seed=cfg.seed, leaky=cfg.leaky)
    t_data = time.perf_counter() - t_data
    rss = {"data": common.peak_rss_mb()}  # peak RSS so far after each phase: which phase set the peak
    smallest = min(len(s.train) for s in splits)
    if cfg.mode == "head" and smallest < cfg.batch_size:
        raise common.InputError(f"experiments/hybrid_gru.py: a training part holds only {smallest} images, fewer "
                                f"than --batch_size={cfg.batch_size}; lower --batch_size or --folds, or add images")
    for sub in ("figures", "splits"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    feature_dir = pathlib.Path(cfg.feature_cache or scratch.name)
    # several processes divide the extraction when they share the cache folder; else each extracts every image
    extraction_part = (jax.process_index(), jax.process_count()) if cfg.feature_cache else (0, 1)
    hybrids, t_features = [], {}
    for name in cfg.backbones:
        t0 = time.perf_counter()
        module, variables, spec, record = common.load_backbone(
            name, cfg.weights, cfg.weights_dir, cfg.b3_substitute if name == "efficientnet_b3" else "", cfg.seed,
            cfg.cpu_kernels)
        size = cfg.image_size or spec.input_size
        smoothing = None if cfg.smoothing == "none" else (lambda x: np.asarray(smooth(x, cfg.smoothing)))
        if cfg.mode == "finetune":
            # decoded, resized and smoothed (before augmentation, as the paper) batch by batch while training
            inputs = ImageStream(ds.source, np.arange(len(ds.labels)), size, image_fn=smoothing)
        else:  # V×N×T×C bfloat16 on disk, extracted batch by batch (resumable), read a few images at a time
            inputs = common.view_feature_file(
                module, variables, spec, record, ds, size, feature_dir, cfg.dataset, views=cfg.views,
                num_affine=cfg.num_affine, seed=cfg.seed, smoothing=cfg.smoothing, image_fn=smoothing,
                part=extraction_part, progress=not cfg.quiet, desc=f"{name}: features")
        record.update(image_size=size, views=cfg.views, num_affine=cfg.num_affine, smoothing=cfg.smoothing,
                      feature_dtype=str(np.dtype(getattr(inputs, "dtype", np.float32))),
                      feature_shape=list(np.shape(inputs)[1:]) if cfg.mode == "finetune" else list(np.shape(inputs)))
        t_features[name] = time.perf_counter() - t0
        rss[f"features {name}"] = common.peak_rss_mb()
        if cfg.num_affine and name == cfg.backbones[0]:  # Akter et al. Fig. 2: what one stored copy is made of
            first = load_example(ds.source, 0, size)["image"]
            first = first if smoothing is None else smoothing(first[None])[0]
            plots.augmentation_examples(first, cfg.seed, path=out / "figures" / "augmentation_examples.png")
        hybrids.append(dict(name=name, module=module, variables=variables, spec=spec, record=record, inputs=inputs))
    names, labels, k = list(ds.class_names), np.asarray(ds.labels), len(ds.class_names)
    fused_rows = ("fused",) + (FITTED_FUSION if len(hybrids) > 1 else ())
    models = [(h["name"], kind) for h in hybrids for kind in kinds] + [(f, kind) for f in fused_rows for kind in kinds]
    per = {m: {"reports": [], "unc": [], "referral": [], "calibration": [], "hparams": [], "probs": []} for m in models}
    first = [s for s in splits if s.repeat == 0]
    oof = {m: np.zeros((len(labels), k), np.float32) for m in models}
    oof_mask, histories0 = np.zeros(len(labels), bool), {}  # first split: every hybrid's curves (Fig. 9)
    t0 = time.perf_counter()
    bar = common.progress(len(splits) * len(hybrids), "training (split × backbone)", cfg.quiet)
    for split in splits:
        sid = common.check_and_save(split, ds.groups, cfg.protocol == "paper_80_20" and cfg.leaky, out / "splits")
        y_va, y_te = labels[split.val], labels[split.test]
        seed = cfg.seed + 1000 * split.repeat + split.fold
        by_kind = {kind: ([], []) for kind in kinds}
        for h in hybrids:
            bar.set_postfix_str(f"repeat {split.repeat} fold {split.fold} {h['name']}")
            if cfg.progress:
                print(f"hybrid_gru: split {sid} ({splits.index(split) + 1}/{len(splits)}), {h['record']['label']}, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            trained = ({"gru": train_finetune(cfg, h, split, labels, k, seed)} if cfg.mode == "finetune"
                       else train_heads(cfg, h, split, labels, k, seed, out / "bo"))
            bar.update(1)
            for kind, (p_va, p_te, info) in trained.items():
                if "history" in info:  # per-epoch curves, watchable while the study runs
                    common.write_history(out / "tensorboard" / sid, f"{h['record']['label']}/{kind}", info["history"])
                _record(per[(h["name"], kind)], y_va, p_va, y_te, p_te, names, cfg, dict(split=sid, **info.get("hparams", {})))
                by_kind[kind][0].append(p_va.mean(0))
                by_kind[kind][1].append(p_te.mean(0))
                if split in first:
                    oof[(h["name"], kind)][split.test] = p_te.mean(0)
                if split is splits[0] and kind == cfg.head and "history" in info:
                    histories0[h["record"]["label"]] = info["history"]
        for kind, (va_h, te_h) in by_kind.items():
            # Sum rule over the hybrids' ensemble means (Akter et al.: f = x_i + x_m + x_e), normalised.
            fused_va, fused_te = (np.asarray(fusion.sum_rule(np.stack(v))) for v in (va_h, te_h))
            _record(per[("fused", kind)], y_va, fused_va[None], y_te, fused_te[None], names, cfg, None)
            if split in first:
                oof[("fused", kind)][split.test] = fused_te
            if len(va_h) > 1:  # beside the paper's rule: weights fitted on validation, and the rule chosen there
                choice = fusion.choose_rule(np.stack(va_h), y_va)
                for row, w in zip(FITTED_FUSION, (choice["fitted_weights"], choice["weights"])):
                    f_va, f_te = (np.asarray(fusion.weighted_rule(np.stack(x), w)) for x in (va_h, te_h))
                    _record(per[(row, kind)], y_va, f_va[None], y_te, f_te[None], names, cfg, dict(split=sid, **choice))
                    if split in first:
                        oof[(row, kind)][split.test] = f_te
        oof_mask[split.test] |= split in first
    bar.close()
    t_train = time.perf_counter() - t0
    rss["training"] = common.peak_rss_mb()

    keys = common.metric_keys(k)
    results = {}
    for m, d in per.items():
        r = common.summarize(d["reports"], d["unc"], d["referral"], keys)
        r["calibration_mean_std"] = common.mean_std(d["calibration"], common.CALIBRATION_KEYS)
        r["calibration_pooled_per_repeat"] = pooled_calibration(labels, splits, d["probs"])
        r["pooled_first_repeat"] = metrics.classification_report(labels[oof_mask], oof[m][oof_mask], names)
        if any(d["hparams"]):
            r["hparams_per_split"] = d["hparams"]
        results.setdefault(m[0], {})[m[1]] = r
    np.savez(out / "predictions_first_repeat.npz", labels=labels[oof_mask], index=np.flatnonzero(oof_mask),
             **{f"probs_{h}_{kind}": p[oof_mask] for (h, kind), p in oof.items()})
    per_split = {}  # every split's validation / test ensemble means: calibration can be studied without retraining
    for i, split in enumerate(splits):
        per_split.update({f"split{i}_{part}_index": getattr(split, part) for part in ("val", "test")})
        for (h, kind), d in per.items():
            per_split.update({f"split{i}_{h}_{kind}_{part}": d["probs"][i][part] for part in ("val", "test")})
    np.savez_compressed(out / "predictions_per_split.npz", labels=labels, **per_split)
    main = {x["record"]["label"]: oof[(x["name"], cfg.head)][oof_mask] for x in hybrids}  # the network that ran
    main["fused"] = oof[("fused", cfg.head)][oof_mask]
    _figures(out / "figures", labels[oof_mask], main, names, histories0)

    t_final = time.perf_counter()
    model_dir = None
    if save_model:
        cv = {"accuracy": results["fused"][cfg.head]["test_mean_std"]["accuracy"],
              "macro_f1" if k > 2 else "binary.f1": results["fused"][cfg.head]["test_mean_std"][common.metric_keys(k)[3]],
              "ece_after_temperature": results["fused"][cfg.head]["calibration_mean_std"]["ece_after"],
              "protocol": splits[0].protocol, "splits": len(splits)}
        data = dict(dataset=cfg.dataset, manual_dir=cfg.manual_dir, n=len(labels), counts=ds.counts)
        model_dir = save_final_model(cfg, hybrids, ds, out / "model", dict(
            data=data, commit=env["commit"], cv_fused_test=cv, command=common.command_line("experiments.hybrid_gru", cfg)))
        print(f"hybrid_gru: saved the fused model to {model_dir}/ (python -m leukax.predict --model {model_dir} "
              f"--images <folder>)", flush=True)
    t_final = time.perf_counter() - t_final

    metrics_json = dict(
        study="Akter et al. 2024: hybrid CNN-GRU deep ensembles, sum-rule fusion (with linear/dense baselines, "
              "views + TTA, temperature scaling)",
        dataset=dict(name=cfg.dataset, n=len(labels), counts=ds.counts, groups=int(len(np.unique(ds.groups)))),
        protocol=dict(name=splits[0].protocol, splits=len(splits), repeats=cfg.repeats,
                      first_split_sizes=dict(  # Akter et al.'s Tables 3, 6, 7 count stored training items
                          train=len(splits[0].train), val=len(splits[0].val), test=len(splits[0].test),
                          train_items_stored=len(splits[0].train) * (np.shape(hybrids[0]["inputs"])[0] if
                                                                     cfg.mode == "head" and cfg.augment == "copies" else 1)),
                      summary="mean ± std over all splits; pooled_first_repeat pools repeat 0's test parts"),
        hybrids=[h["record"] for h in hybrids],
        config=cfg.config or None,
        model=dict(main_head=cfg.head, heads=list(kinds), mode=cfg.mode, members=cfg.members, hparams=cfg.hparams,
                   augment=cfg.augment, smoothing=cfg.smoothing, order=cfg.order,
                   fusion="sum rule (the paper's; `fused`); beside it `fused_fitted`: weights on the simplex "
                          "fitted on each split's validation part (leukax.fusion.fit_weights), and `fused_chosen`: "
                          "sum or fitted, chosen by cross-fitted validation NLL (leukax.fusion.choose_rule)",
                   views=cfg.views, tta=cfg.augment == "views" and (cfg.views != "none" or cfg.num_affine > 0),
                   feature_dim=cfg.feature_dim, calibration="temperature scaling fitted on the validation part"),
        per_hybrid={h["record"]["label"]: results[h["name"]] for h in hybrids}, fused=results["fused"],
        **{row: results[row] for row in FITTED_FUSION if row in results},
        paper_reported=PAPER_REPORTED,
        referral_rule=f"refer if predictive entropy > threshold whose validation accuracy >= {cfg.referral_accuracy}",
        saved_model=str(model_dir) if model_dir else None,
        timing_s=dict(total=time.perf_counter() - t_start, data=t_data, features=t_features, training=t_train,
                      final_model=t_final),
        peak_rss_mb=common.peak_rss_mb(), peak_rss_mb_after=dict(rss, final_model=common.peak_rss_mb()),
        environment=env, command=common.command_line("experiments.hybrid_gru", cfg))
    records.write_json(out / "metrics.json", metrics_json)
    records.write_json(out / "config.json", dataclasses.asdict(cfg))
    print(summary_table(metrics_json))
    print(f"hybrid_gru: wrote {out}/ in {metrics_json['timing_s']['total']:.0f} s (peak RSS "
          f"{metrics_json['peak_rss_mb']:.0f} MB)")
    scratch.cleanup()
    return metrics_json


def _data_kwargs(cfg) -> dict:
    """Builder arguments beyond the dataset's name (image_folder's subjects CSV)."""
    return {"groups_csv": cfg.groups_csv} if cfg.groups_csv else {}


def save_final_model(cfg, hybrids: list[dict], ds, model_dir, provenance: dict) -> pathlib.Path:
    """Trains every hybrid's `--head` ensemble on all images (a grouped validation part of `--val_fraction` for
    early stopping) and saves ONE fused bundle (`leukax.bundle.save_fused`). On the validation part, for the
    fused ensemble (sum rule = mean of all H·M members): the temperature T (`calibration.fit_temperature`), the
    entropy referral threshold (`--referral_accuracy`), and conformal thresholds (`--ood_alpha`) on the mutual
    information and on the mean over hybrids of the Mahalanobis OOD scores; each hybrid's sub-bundle gets
    its own thresholds the same way, so it can be used alone."""
    labels, k = np.asarray(ds.labels), len(ds.class_names)
    split = repeated_holdout(labels, ds.groups, test_fraction=0.0, val_fraction=cfg.val_fraction, repeats=1,
                             seed=cfg.seed, class_names=ds.class_names)[0]
    split.check_disjoint(ds.groups)
    y_va = labels[split.val]
    subs, probs_va, ood_va = {}, [], []
    for h in hybrids:
        views = h["inputs"]
        tf = recipe.fit_transform(views, cfg.feature_dim, seed=cfg.seed, indices=split.train)
        where = _residency(cfg, views, len(split.train) + len(split.val))
        tr, va = (recipe.transform(tf, views, idx, residency=where) for idx in (split.train, split.val))
        rcp, hp, units, source = split_hparams(cfg, h["name"], tr, va, split, labels, k,
                                               pathlib.Path(model_dir).parent / "bo" / "final")
        if cfg.head != "gru":
            rcp, hp = dataclasses.replace(rcp, optimizer="adamw", schedule="warmup_cosine"), compiled.default_hparams()
        head = recipe.make_model(cfg.head, k, units, cfg.hidden, order=cfg.order)
        res = compiled.fit(rcp, head, k, tr, labels[split.train], va, y_va, hp, seed=cfg.seed + 999, residency=where)
        p_va = compiled.predict_probs(head, res.params, va, where)
        pooled = lambda idx: recipe.pooled_standardized(tf, views, idx)  # noqa: E731  (N×C, as predict pools)
        ood_model = uncertainty.fit_mahalanobis(pooled(split.train), labels[split.train], k)
        ood = np.asarray(uncertainty.mahalanobis_score(ood_model, jnp.asarray(pooled(split.val))))
        thr = _thresholds(cfg, p_va, y_va, ood)
        spec = h["spec"]
        head_kwargs = (dict(units=units, hidden=cfg.hidden, dropout=0.0, order=cfg.order) if cfg.head == "gru"
                       else dict(features=256, dropout=0.0) if cfg.head == "dense" else {})
        weights = cfg.weights if cfg.weights not in ("none", "random", "") else "none"
        bb_kwargs = ({"weights_dir": cfg.weights_dir} if cfg.weights_dir and weights != "none" else {}) | (
            {"seed": cfg.seed} if weights == "none" else {})
        bcfg = bundle_lib.BundleConfig(
            backbone=h["record"]["used"], weights=weights, image_size=h["record"]["image_size"],
            normalization=spec.normalization, head=cfg.head, head_kwargs=head_kwargs,
            class_names=list(ds.class_names), mode="head", num_members=cfg.members, views=cfg.views,
            backbone_kwargs=bb_kwargs, provenance=dict(provenance, hybrid=h["record"], hparams=source), **thr)
        transform = {"mean_c": tf.mean_c, "std_c": tf.std_c, **({"proj_cd": tf.proj_cd} if tf.proj_cd is not None else {})}
        subs[h["name"]] = (bcfg, {"params": res.params, "transform": transform, "ood": ood_model})
        probs_va.append(p_va)
        ood_va.append(ood)
    fused_va_mnk = np.concatenate(probs_va, 0)  # sum rule = mean of all H·M members (equal M)
    fcfg = bundle_lib.FusedConfig(
        hybrids=list(subs), class_names=list(ds.class_names), image_sizes=[c.image_size for c, _ in subs.values()],
        fusion="sum", num_members=cfg.members, provenance=dict(provenance, validation_n=int(len(split.val))),
        **_thresholds(cfg, fused_va_mnk, y_va, np.mean(np.stack(ood_va), 0)))
    return bundle_lib.save_fused(model_dir, fcfg, subs)


def _thresholds(cfg, probs_val_mnk, labels_val, ood_val_n) -> dict:
    """Returns the bundle's temperature and referral thresholds, all fitted on the validation part."""
    ens = uncertainty.deep_ensemble(jnp.asarray(probs_val_mnk))
    t = calibration.fit_temperature(jnp.asarray(labels_val, jnp.int32), ens["mean"], cfg.temperature_prior)
    ref = uncertainty.fit_referral_threshold(np.asarray(ens["predictive_entropy"]),
                                             np.asarray(ens["pred"]) == labels_val, "accuracy", cfg.referral_accuracy)
    return dict(temperature=float(t), uncertainty="predictive_entropy",
                referral_threshold=float(ref) if np.isfinite(ref) else None,
                mi_threshold=uncertainty.conformal_threshold(ens["mutual_information"], cfg.ood_alpha),
                ood_threshold=uncertainty.conformal_threshold(ood_val_n, cfg.ood_alpha))


def _record(d: dict, y_va, p_va, y_te, p_te, names, cfg, hparams) -> None:
    rep, unc, ref = common.evaluate_probs(y_va, p_va, y_te, p_te, names, "accuracy", cfg.referral_accuracy)
    cal, cal_te = common.calibrate(y_va, p_va, y_te, p_te, cfg.temperature_prior)
    probs = dict(val=np.mean(p_va, 0), test=np.mean(p_te, 0), test_calibrated=cal_te)
    for key, v in (("reports", rep), ("unc", unc), ("referral", ref), ("calibration", cal), ("hparams", hparams),
                   ("probs", probs)):
        d[key].append(v)


def pooled_calibration(labels, splits, probs: list[dict]) -> dict:
    """Calibration of the out-of-fold predictions: per repeat, every cell's test prediction (from the one fold
    that held it out) pooled into one set of N, then ECE / NLL / Brier before and after temperature scaling
    (each fold's T fitted on its own validation part); mean ± std over repeats. Binned ECE is biased upwards
    by roughly sqrt(bins / N), so on 64-cell folds it cannot fall far below ~0.06 even for a calibrated model;
    pooling the N cells of a repeat is the standard cross-validated estimate."""
    reports = []
    for r in sorted({s.repeat for s in splits}):
        idx = [i for i, s in enumerate(splits) if s.repeat == r]
        test = np.concatenate([splits[i].test for i in idx])
        y = jnp.asarray(labels[test], jnp.int32)
        rep = {}
        for tag, key in (("before", "test"), ("after", "test_calibrated")):
            p = jnp.asarray(np.concatenate([probs[i][key] for i in idx]))
            for name, fn in (("ece", metrics.ece), ("nll", metrics.nll), ("brier", metrics.brier)):
                rep[f"{name}_{tag}"] = float(fn(y, p))
        reports.append(rep)
    return common.mean_std(reports, list(reports[0]))


def summary_table(m: dict) -> str:
    """Returns a markdown table: accuracy, ECE before/after temperature scaling, per backbone and head."""
    rows = ["| model | head | accuracy | ROC AUC | ECE | ECE after TS | NLL after TS | pooled ECE after TS |",
            "|---|---|---|---|---|---|---|---|"]
    any_result = next(iter(m["fused"].values()))["test_mean_std"]
    auc_key = "binary.roc_auc" if "binary.roc_auc" in any_result else "macro_roc_auc"
    fused = [("fused (sum rule)", m["fused"])] + [(FUSION_LABELS[row], m[row]) for row in FITTED_FUSION if row in m]
    for name, heads in list(m["per_hybrid"].items()) + fused:
        for kind, r in heads.items():
            t, c, pc = r["test_mean_std"], r["calibration_mean_std"], r["calibration_pooled_per_repeat"]
            f = lambda x: "–" if x["mean"] is None else f"{x['mean']:.3f} ± {x['std']:.3f}"  # noqa: E731
            rows.append(f"| {name} | {kind} | {f(t['accuracy'])} | {f(t[auc_key])} | {f(t['ece'])} | "
                        f"{f(c['ece_after'])} | {f(c['nll_after'])} | {f(pc['ece_after'])} |")
    return "\n".join(rows)


def _figures(fig_dir, labels, probs: dict, names, histories: dict) -> None:
    fused = probs["fused"]
    unc_fused = np.asarray(uncertainty.predictive_entropy(jnp.asarray(fused)))
    plots.confusion_matrix(labels, fused, names, title="Sum-rule fusion: confusion matrix",
                           path=fig_dir / "confusion_matrix_fused.png")
    for h, p in probs.items():
        if h != "fused":
            plots.confusion_matrix(labels, p, names, title=f"{h}-GRU ensemble", path=fig_dir / f"confusion_matrix_{h.split()[0]}.png")
    plots.roc_curves(labels, fused, names, path=fig_dir / "roc_fused.png")
    plots.reliability_diagram(labels, fused, path=fig_dir / "reliability_fused.png")
    correct = fused.argmax(-1) == labels
    plots.uncertainty_histograms(unc_fused, correct, path=fig_dir / "uncertainty_hist_fused.png")
    plots.accuracy_coverage(unc_fused, correct, path=fig_dir / "accuracy_coverage_fused.png")
    if histories:  # Akter et al. Fig. 9: every hybrid's loss and accuracy per epoch (member means), first split
        def mean_curves(h):  # over the members still training (NaN after a member stopped)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # epochs after every member stopped: NaN
                return {k: np.nanmean(np.atleast_2d(np.asarray(v, float)), 0) for k, v in h.items()}
        plots.training_curves({f"{label}-GRU, member mean": mean_curves(h) for label, h in histories.items()},
                              path=fig_dir / "training_curves_first.png")
        for label, h in histories.items():  # and each hybrid's members
            plots.training_curves(h, path=fig_dir / f"training_curves_first_{label.split()[0]}.png")


if __name__ == "__main__":
    common.main(Config, run)
