"""The development suite of issue 20: every head kind on every real set at hand, same features, same splits,
paired differences against the baselines — so a head-mode recipe change is judged on all sets, never on one.

Command:   python -m experiments.dev_suite --weights_dir=../shared/weights --feature_cache=<dir>
           (writes results/dev_suite/: metrics.json, predictions_per_split.npz, splits/)
           python -m experiments.dev_suite --datasets=pbc,cnmc2019,aml_lmu,standin,lab_probe --repeats=3
           python -m experiments.dev_suite --recalibrate=<run folder> --heads=gru   (no training: the sweep of the
           temperature prior σ on a finished run's saved predictions, `temperature_prior_sweep`)
Runtime:   see results/dev_suite/README.md (measured, with the command, commit and peak RSS).

Datasets (under `--data_root`, the shared folder of ../shared/data/README.md):
- `pbc`: the PBC subset, 320 normal blood cells, 8 classes (groups: duplicate pixels; PBC has no subjects);
- `cnmc2019`: the C-NMC 2019 sample, 60 cells, ALL vs healthy (hem), grouped by subject (37 subjects);
- `aml_lmu`: the AML-Cytomorphology_LMU sample, 50 cells, 5 classes (EOS, LYT, MON, MYO, NGS);
- `standin` (ALL/AML/healthy from two labs) and `lab_probe` (C-NMC hem vs LMU LYT: learns the lab), optional;
- `folder:<path>`: a lab's own set, a folder of class subfolders (named by its last path component).

Per dataset and backbone: frozen features of the 8 dihedral views, extracted and read exactly as
`experiments.hybrid_gru` does (`common.view_feature_file`: images streamed from the TFDS source into a bfloat16
file, kept in `--feature_cache`; per split the standardisation/PCA fitted on sampled training rows and the
reduced 16-bit features built a chunk at a time, `recipe.fit_transform` / `recipe.transform`), so memory holds
one split's reduced features, not the dataset's maps, and a suite row is the arithmetic the study runs;
repeated stratified grouped k-fold
(`--folds` × `--repeats`, a grouped validation part inside every training part), and on every split the
standardisation (+ PCA) fitted on the training part, then every head of `--heads` on those same features:
the logistic-regression probe, and linear / dense / gru / gru_pool deep ensembles of `--members` from the
compiled trainer (`leukax.train.recipe.train_and_predict`, TTA over the views). The GRU heads get the recipe
flags below (hybrid_gru's defaults); linear and dense get `compiled.default_hparams()`, as in hybrid_gru.

Reported per dataset, backbone and head: test accuracy, NLL, ECE and the accuracy of the 90 % most confident
cells, mean ± std over splits; and paired differences a − b on the same splits (`PAIRS`), with mean, std,
standard error se = std/√S and a verdict: "loses" if mean < −2·se, "wins" if mean > 2·se, else "tie". Splits of
repeated k-fold share training data, so se understates the noise: a "tie" is a tie, a "loses" is a flag to
look at, not a test.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.common import field
from leukax import fusion, metrics, plots, records
from leukax.data import load_index
from leukax.train import compiled, recipe

# (a, b): the paired differences a − b reported for every dataset and backbone (when both heads ran).
PAIRS = (("gru", "probe"), ("gru", "dense"), ("gru_pool", "probe"), ("gru_pool", "dense"), ("gru_pool", "gru"),
         ("dense", "probe"))
FUSED_ROWS = ("fused (sum rule)", "fused (validation-fitted)", "fused (chosen on validation)")
COVERAGE = 0.9  # selective prediction: accuracy of the most confident 90 % of a split's test cells


def _index(name: str, root: pathlib.Path, data_dir):
    """Returns the suite dataset `name` as a `leukax.data.load_index` Dataset (labels, groups and the TFDS source
    the images stream from; no pixels in memory), from the shared data folder `root`; `folder:<path>` is a
    folder of class subfolders (a lab's own set, `image_folder`), named by its last path component."""
    if name.startswith(FOLDER):
        return load_index("image_folder", data_dir=data_dir, manual_dir=name[len(FOLDER):])
    if name == "pbc":
        return load_index("pbc", data_dir=data_dir, manual_dir=str(root / "pbc-subset"))
    if name == "cnmc2019":
        return load_index("cnmc2019", data_dir=data_dir)  # the embedded sample (= cnmc2019-sample)
    if name == "aml_lmu":
        return load_index("image_folder", data_dir=data_dir, root=str(root / "aml-lmu-sample" / "images"),
                          label_regex=r"^([A-Z]+)_")
    if name == "standin":
        return load_index("all_aml_healthy_standin", data_dir=data_dir, manual_dir=str(root))
    if name == "lab_probe":
        return load_index("lab_probe", data_dir=data_dir, manual_dir=str(root))
    raise common.InputError(f"experiments/dev_suite.py: unknown dataset {name!r}; known {DATASETS} or "
                            f"{FOLDER}<folder of class subfolders>")


def _label(name: str) -> str:
    """The name a dataset has in metrics.json and the tables (a folder's last component)."""
    return pathlib.PurePath(name[len(FOLDER):]).name if name.startswith(FOLDER) else name


DATASETS = ("pbc", "cnmc2019", "aml_lmu", "standin", "lab_probe")
FOLDER = "folder:"  # --datasets=folder:<path>: a folder of class subfolders


@dataclasses.dataclass
class Config:
    out_dir: str = field("results/dev_suite", "Where metrics.json, predictions_per_split.npz and splits/ go.")
    datasets: tuple = field(("pbc", "cnmc2019", "aml_lmu"), f"Comma-separated, of {', '.join(DATASETS)}, or "
                            f"{FOLDER}<path> (a folder of class subfolders: a lab's own set, any size).")
    data_root: str = field("../shared/data", "The shared data folder (pbc-subset/, aml-lmu-sample/, ...).")
    data_dir: str | None = field(None, "TFDS data dir of prepared datasets.")
    backbones: tuple = field(("mobilenet_v2",), "Comma-separated backbones (frozen, ImageNet weights).")
    weights: str = field("imagenet", "imagenet | none (random init, for tests).")
    weights_dir: str | None = field(None, "Folder of weight files.")
    image_size: int = field(0, "Input size in pixels (0 = each backbone's own).")
    heads: tuple = field(("probe", "linear", "dense", "gru", "gru_pool"), "Head kinds, all on the same features "
                         f"and splits, of {', '.join(recipe.HEAD_KINDS)}.")
    members: int = field(5, "Deep-ensemble members M per head.")
    feature_dim: int = field(256, "PCA feature channels fitted on the training part (0 = all standardised).")
    units: int = field(128, "GRU units.")
    hidden: int = field(128, "Width of the dense layer after the GRU.")
    order: str = field("center_last", "GRU reading order.", choices=("center_last", "raster"))
    learning_rate: float = field(3e-3, "Peak learning rate of the GRU heads (hybrid_gru's recipe).")
    weight_decay: float = field(1e-2, "Weight decay of the GRU heads.")
    dropout: float = field(0.3, "Dropout before the last layer (GRU heads).")
    input_dropout: float = field(0.2, "Dropout of feature channels (GRU heads).")
    label_smoothing: float = field(0.1, "Label smoothing.")
    batch_size: int = field(32, "Batch size (capped at a quarter of the smallest training part).")
    epochs: int = field(40, "Maximum epochs.")
    patience: int = field(10, "Early-stopping patience (epochs).")
    folds: int = field(5, "k of the grouped k-fold.")
    repeats: int = field(2, "Seeds of the k-fold (S = folds × repeats splits per dataset).")
    val_fraction: float = field(0.2, "Grouped validation part (fraction of all) inside every training part.")
    feature_cache: str | None = field(None, "Folder to keep the frozen features (bfloat16 .npy, resumable) between "
                                      "runs (default: a temporary folder, deleted at the end).")
    baseline: str | None = field(None, "A finished suite run's folder: every dataset × backbone × head of both runs, "
                                 "on identical splits, gets the paired difference this run − baseline (a recipe "
                                 "change judged against the recipe it would replace).")
    seed: int = field(0, "Seed of everything.")
    recalibrate: str | None = field(None, "A finished run's folder: train nothing; sweep the temperature prior σ "
                                    "over --prior_scales on its saved predictions and write "
                                    "<run>/temperature_prior.json and .md (`temperature_prior_sweep`).")
    prior_scales: tuple = field((0.0, 0.25, 0.5, 1.0, 2.0), "--recalibrate: σ values (0 = maximum likelihood).")


# ------------------------------------------------------------------------------------------------ metrics
def split_scores(labels_n, probs_nk, probs_val_nk=None, coverage: float = COVERAGE) -> dict[str, float]:
    """Returns accuracy, NLL, ECE and the accuracy of the ⌈coverage·N⌉ most confident cells (max probability);
    with the validation predictions also the referral a lab would run: the confidence threshold that keeps
    `coverage` of the validation cells, applied to the test cells (acc_at_val_threshold on the cells kept,
    coverage_at_val_threshold = the fraction of test cells kept)."""
    y, p = jnp.asarray(labels_n, jnp.int32), jnp.asarray(probs_nk, jnp.float32)
    conf = np.asarray(p).max(-1)
    keep = max(1, int(np.ceil(coverage * len(labels_n))))
    top = np.argsort(-conf, kind="stable")[:keep]
    out = dict(accuracy=float(metrics.accuracy(y, p)), nll=float(metrics.nll(y, p)), ece=float(metrics.ece(y, p)),
               acc_at_coverage=float(metrics.accuracy(y[top], p[top])))
    if probs_val_nk is not None:
        conf_val = np.sort(np.asarray(probs_val_nk).max(-1))[::-1]
        t = conf_val[max(1, int(np.ceil(coverage * len(conf_val)))) - 1]  # keeps ⌈coverage·N_val⌉ of validation
        kept = conf >= t
        correct = np.asarray(p).argmax(-1)[kept] == np.asarray(labels_n)[kept]
        out.update(coverage_at_val_threshold=float(kept.mean()), kept_at_val_threshold=int(kept.sum()),
                   correct_at_val_threshold=int(correct.sum()),
                   acc_at_val_threshold=float(correct.mean()) if kept.any() else float("nan"))
    return out


def calibration_after_scaling(parts, num_bins: int = 15, draws: int = 2000, seed: int = 0,
                              prior_scale: float = 0.0) -> dict:
    """Calibration as a lab would deploy it: on every split a temperature fitted on the validation part
    (`calibration.fit_temperature`), applied to that split's test part. `parts`: per split
    (labels_val_n, probs_val_nk, labels_test_n, probs_test_nk). Returns per-split ECE before / after scaling,
    each beside the 95th percentile of the ECE a perfectly calibrated model shows at that split's size
    (`metrics.ece_null` on the scaled confidences: binned ECE is biased upwards on small sets), and the ECE
    after scaling of all splits' test cells pooled, with its own null percentile."""
    from leukax import calibration
    key = jax.random.PRNGKey(seed)
    per, ys, ps = [], [], []
    for i, (y_va, p_va, y_te, p_te) in enumerate(parts):
        t = calibration.fit_temperature(jnp.asarray(y_va, jnp.int32), jnp.asarray(p_va, jnp.float32), prior_scale)
        scaled = np.asarray(calibration.apply_temperature(jnp.asarray(p_te, jnp.float32), t))
        null = metrics.ece_null(jax.random.fold_in(key, i), jnp.asarray(scaled.max(-1)), len(y_te), draws, num_bins)
        per.append(dict(temperature=float(t), ece=float(metrics.ece(jnp.asarray(y_te), jnp.asarray(p_te), num_bins)),
                        ece_scaled=float(metrics.ece(jnp.asarray(y_te), jnp.asarray(scaled), num_bins)),
                        ece_null_p95=float(np.percentile(np.asarray(null), 95)), n=int(len(y_te))))
        ys.append(np.asarray(y_te))
        ps.append(scaled)
    y, p = np.concatenate(ys), np.concatenate(ps)
    null = metrics.ece_null(jax.random.fold_in(key, len(parts)), jnp.asarray(p.max(-1)), len(y), draws, num_bins)
    return dict(per_split=per, pooled_ece_scaled=float(metrics.ece(jnp.asarray(y), jnp.asarray(p), num_bins)),
                pooled_ece_null_p95=float(np.percentile(np.asarray(null), 95)), pooled_n=int(len(y)))


def fused_rows(va_h, te_h, labels_val):
    """Yields (row of FUSED_ROWS, fused validation N×K, fused test N×K, the choice) from H×N×K backbone ensemble
    means: the sum rule (the paper's), weights fitted on validation, and the rule chosen on validation
    (`leukax.fusion.choose_rule`)."""
    choice = fusion.choose_rule(va_h, labels_val)
    for row, w in zip(FUSED_ROWS, ([1.0] * len(va_h), choice["fitted_weights"], choice["weights"])):
        f_va, f_te = (np.asarray(fusion.weighted_rule(x, w)) for x in (va_h, te_h))
        yield row, f_va, f_te, choice


def recompute_calibration(out_dir, metrics_json: dict, **kw) -> dict:
    """Returns {dataset: {backbone or fused row: {head: calibration_after_scaling(...)}}} from a finished run's
    predictions_per_split.npz (for runs made before the suite reported it): each backbone's saved validation and
    test means, and the fused rows rebuilt from them exactly as `run_dataset` does (sum rule, validation-fitted
    weights, the rule chosen on validation)."""
    z = np.load(pathlib.Path(out_dir) / "predictions_per_split.npz")
    heads = metrics_json["model"]["heads"]
    out = {}
    for name, d in metrics_json["datasets"].items():
        backbones = [b for b in d["backbones"] if b not in FUSED_ROWS]
        labels = z[f"{name}_labels"]
        sids = sorted({k[len(name) + 1:-len("_test_index")] for k in z.files
                       if k.startswith(f"{name}_r") and k.endswith("_test_index")})
        out[name] = {}
        for kind in heads:
            parts = {b: [] for b in backbones + list(FUSED_ROWS)}
            for sid in sids:
                va_i, te_i = z[f"{name}_{sid}_val_index"], z[f"{name}_{sid}_test_index"]
                va_h = np.stack([z[f"{name}_{b}_{kind}_{sid}_val"] for b in backbones])
                te_h = np.stack([z[f"{name}_{b}_{kind}_{sid}_test"] for b in backbones])
                for b, v, t in zip(backbones, va_h, te_h):
                    parts[b].append((labels[va_i], v, labels[te_i], t))
                if len(backbones) > 1:
                    for row, f_va, f_te, _ in fused_rows(va_h, te_h, labels[va_i]):
                        parts[row].append((labels[va_i], f_va, labels[te_i], f_te))
            for b, pr in parts.items():
                if pr:
                    out[name].setdefault(b, {})[kind] = calibration_after_scaling(pr, **kw)
    return out


def temperature_prior_sweep(cfg: Config, draws: int = 200) -> dict:
    """--recalibrate=<run>: per dataset, row (backbone or fused rule) and head of `--heads`, the pooled ECE after
    temperature scaling (`recompute_calibration` with `prior_scale` σ: each split's T, MAP under log T ~ N(0, σ²),
    fitted on its validation means, applied to its test means) and the smallest per-split T, for every σ of
    `cfg.prior_scales` (0 = maximum likelihood). No training. Writes <run>/temperature_prior.json and .md."""
    env = common.environment()
    folder = pathlib.Path(cfg.recalibrate)
    m = json.loads((folder / "metrics.json").read_text())
    table: dict = {}
    for sigma in map(float, cfg.prior_scales):
        for name, rows in recompute_calibration(folder, m, draws=draws, prior_scale=sigma).items():
            for row, by_head in rows.items():
                for kind, c in by_head.items():
                    if kind in cfg.heads:
                        table.setdefault(name, {}).setdefault(row, {}).setdefault(kind, {})[str(sigma)] = dict(
                            pooled_ece_scaled=round(c["pooled_ece_scaled"], 4),
                            min_temperature=round(min(r["temperature"] for r in c["per_split"]), 3))
    # only the flags the sweep reads (the training flags of cfg did not run here; the run's own are in run_command)
    sweep_cfg = dict(recalibrate=cfg.recalibrate, heads=",".join(cfg.heads),
                     prior_scales=",".join(map(str, cfg.prior_scales)))
    command = "python -m experiments.dev_suite " + " ".join(f"--{k}={v}" for k, v in sweep_cfg.items())
    out = dict(command=command, environment=env,
               peak_rss_mb=common.peak_rss_mb(), run=str(folder), run_command=m.get("command"), ece=table)
    records.write_json(folder / "temperature_prior.json", out)
    sig = [str(float(s)) for s in cfg.prior_scales]
    md = [f"`{out['command']}` (commit {env['commit']}): pooled ECE after temperature scaling, smallest per-split T "
          "in brackets, per prior scale σ (0 = maximum likelihood).", "",
          "| dataset | row | head | " + " | ".join(f"σ = {s}" for s in sig) + " |", "|---|---|---|" + "---|" * len(sig)]
    md += [f"| {name} | {row} | {kind} | " + " | ".join(
        f"{v[s]['pooled_ece_scaled']:.3f} ({v[s]['min_temperature']:.2f})" for s in sig) + " |"
        for name, rows in table.items() for row, by_head in rows.items() for kind, v in by_head.items()]
    (folder / "temperature_prior.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return out


def paired(a_s, b_s, higher_is_better: bool = True) -> dict:
    """Paired difference a − b over S splits: mean, std, se = std/√S, per split, and a's wins/losses and verdict
    (a wins a split when it is better there: a − b > 0 for accuracy, < 0 for NLL with higher_is_better=False)."""
    d = np.asarray(a_s, float) - np.asarray(b_s, float)
    mean, std = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0
    se = std / np.sqrt(len(d))
    g = d if higher_is_better else -d    # the gain of a over b
    verdict = "loses" if g.mean() < -2 * se else "wins" if g.mean() > 2 * se else "tie"
    return dict(mean=mean, std=std, se=float(se), wins=int((g > 0).sum()), losses=int((g < 0).sum()),
                verdict=verdict, per_split=d.tolist())


# ---------------------------------------------------------------------------------------------------- run
def _hparams(cfg, kind: str):
    """(Recipe, traced hyper-parameters) of a head kind: GRU heads the recipe flags, others the defaults."""
    rcp = compiled.Recipe(num_members=cfg.members, num_epochs=cfg.epochs, batch_size=cfg.batch_size,
                          patience=cfg.patience, label_smoothing=cfg.label_smoothing)
    if kind.startswith("gru"):
        return rcp, compiled.default_hparams(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                             dropout=cfg.dropout, input_dropout=cfg.input_dropout)
    return rcp, compiled.default_hparams()


def run_dataset(cfg: Config, name: str, out: pathlib.Path, npz: dict, feature_dir,
                on_split=lambda section: None) -> dict:
    """Every backbone × split × head on one dataset; returns its section of metrics.json. `on_split(section)`
    is called after every split with the section so far (the run writes a partial metrics.json). Memory: the
    images stream into the feature files in `feature_dir`; a split holds its reduced 16-bit features, never the
    dataset's maps."""
    ds = _index(name, pathlib.Path(cfg.data_root), cfg.data_dir)
    name = _label(name)
    labels, k = np.asarray(ds.labels), len(ds.class_names)
    splits = common.make_splits("grouped_kfold", labels, ds.groups, list(ds.class_names), folds=cfg.folds,
                                repeats=cfg.repeats, val_fraction=cfg.val_fraction, seed=cfg.seed)
    smallest = min(len(s.train) for s in splits)
    batch = min(cfg.batch_size, max(4, smallest // 4))
    c = dataclasses.replace(cfg, batch_size=batch)
    section = dict(n=len(labels), classes=list(ds.class_names), counts=ds.counts,
                   groups=int(len(np.unique(ds.groups))), splits=len(splits), batch_size=batch, backbones={})
    probs_fused = {kind: [[] for _ in splits] for kind in cfg.heads}  # per split: the backbones' test means
    probs_fused_val = {kind: [[] for _ in splits] for kind in cfg.heads}  # ... and validation means
    t0 = time.perf_counter()
    for bb in cfg.backbones:
        module, variables, spec, record = common.load_backbone(bb, cfg.weights, cfg.weights_dir, "", cfg.seed)
        size = cfg.image_size or spec.input_size
        # as hybrid_gru: bfloat16 maps on disk, read a chunk of images at a time; 16-bit reduced features
        views = common.view_feature_file(module, variables, spec, record, ds, size, feature_dir, f"devsuite_{name}",
                                         seed=cfg.seed, desc=f"{name} {bb}: features")
        scores = {kind: [] for kind in cfg.heads}
        for i, split in enumerate(splits):
            sid = common.check_and_save(split, ds.groups, False, out / "splits" / name)
            seed = cfg.seed + 1000 * split.repeat + split.fold
            tf = recipe.fit_transform(views, cfg.feature_dim, seed=seed, indices=split.train)
            tr, va, te = (recipe.transform(tf, views, idx) for idx in (split.train, split.val, split.test))
            for kind in cfg.heads:
                rcp, hp = _hparams(c, kind)
                p_va, p_te, _ = recipe.train_and_predict(kind, rcp, hp, k, tr, labels[split.train], va, te,
                                                         labels[split.val], units=cfg.units, hidden=cfg.hidden,
                                                         order=cfg.order, seed=seed)
                mean_nk, mean_val_nk = p_te.mean(0), p_va.mean(0)
                scores[kind].append(split_scores(labels[split.test], mean_nk, mean_val_nk))
                probs_fused[kind][i].append(mean_nk)
                probs_fused_val[kind][i].append(mean_val_nk)
                npz[f"{name}_{bb}_{kind}_{sid}_test"] = mean_nk.astype(np.float32)
                npz[f"{name}_{bb}_{kind}_{sid}_val"] = mean_val_nk.astype(np.float32)
            npz[f"{name}_{sid}_test_index"] = split.test
            npz[f"{name}_{sid}_val_index"] = split.val
            print(f"dev_suite: {name} {bb} {sid}: " + " ".join(
                f"{kind}={scores[kind][-1]['accuracy']:.3f}" for kind in cfg.heads), flush=True)
            section["backbones"][bb] = _section(cfg, scores, record)
            section["splits_done"] = i + 1
            on_split(section)
            del tr, va, te  # before the next split builds its own: one split's reduced features at a time
        for kind in cfg.heads:  # this backbone's means are the last ones appended for every split
            section["backbones"][bb]["heads"][kind]["calibration"] = calibration_after_scaling(
                [(labels[s.val], probs_fused_val[kind][i][-1], labels[s.test], probs_fused[kind][i][-1])
                 for i, s in enumerate(splits)])
    if len(cfg.backbones) > 1:  # per head kind, over the backbones' ensemble means: the sum rule (the paper's),
        # weights fitted on validation, and the rule chosen on validation (leukax.fusion.choose_rule)
        rows = {row: {kind: [] for kind in cfg.heads} for row in FUSED_ROWS}
        fused_parts = {row: {kind: [] for kind in cfg.heads} for row in FUSED_ROWS}
        for kind in cfg.heads:
            for i, s in enumerate(splits):
                va_h, te_h = np.stack(probs_fused_val[kind][i]), np.stack(probs_fused[kind][i])
                for row, f_va, f_te, choice in fused_rows(va_h, te_h, labels[s.val]):
                    rows[row][kind].append(dict(split_scores(labels[s.test], f_te, f_va), rule_fitted=float(
                        choice["rule"] == "fitted")))
                    npz[f"{name}_{row.replace(' ', '_')}_{kind}_r{s.repeat}_f{s.fold}_test"] = f_te.astype(np.float32)
                    fused_parts[row][kind].append((labels[s.val], f_va, labels[s.test], f_te))
        for row in FUSED_ROWS:
            section["backbones"][row] = _section(cfg, rows[row], None)
            for kind in cfg.heads:
                section["backbones"][row]["heads"][kind]["calibration"] = calibration_after_scaling(fused_parts[row][kind])
    # Selective prediction curves of the main rows, every split's test cells pooled (1 − max probability ranks)
    main = FUSED_ROWS[-1] if len(cfg.backbones) > 1 else cfg.backbones[0]
    tag = main.replace(" ", "_")
    curves = {}
    for kind in cfg.heads:
        p = np.concatenate([npz[f"{name}_{tag}_{kind}_r{s.repeat}_f{s.fold}_test"] for s in splits])
        y = np.concatenate([labels[s.test] for s in splits])
        curves[kind] = (1 - p.max(-1), p.argmax(-1) == y)
    plots.selective_curves(curves, title=f"{name}: {main}, test cells of all {len(splits)} splits",
                           path=out / "figures" / f"selective_{name}.png")
    section["training_s"] = time.perf_counter() - t0
    npz[f"{name}_labels"] = labels
    return section


def versus_baseline(m: dict, npz: dict, baseline_dir) -> dict:
    """Returns {dataset: {backbone: {head: {"accuracy": paired, "nll": paired}}}}: this run − the baseline run in
    `baseline_dir`, for every dataset × backbone × head both ran, on splits whose validation and test indices
    are identical (checked from both runs' predictions_per_split.npz; a dataset whose splits differ is left out
    with the reason)."""
    base_dir = pathlib.Path(baseline_dir)
    base = json.loads((base_dir / "metrics.json").read_text())
    z = np.load(base_dir / "predictions_per_split.npz")
    out = {}
    for name, d in m["datasets"].items():
        if name not in base["datasets"]:
            continue
        ids = sorted(k for k in npz if k.startswith(f"{name}_r") and k.endswith("_index"))
        if any(k not in z.files or not np.array_equal(z[k], npz[k]) for k in ids):
            out[name] = {"left out": "its splits differ from the baseline's"}
            continue
        for bb, sec in d["backbones"].items():
            if bb in FUSED_ROWS or bb not in base["datasets"][name]["backbones"]:
                continue
            b_heads = base["datasets"][name]["backbones"][bb]["heads"]
            for kind, h in sec["heads"].items():
                if kind in b_heads:
                    out.setdefault(name, {}).setdefault(bb, {})[kind] = {
                        metric: paired(h[metric]["per_split"], b_heads[kind][metric]["per_split"], metric != "nll")
                        for metric in ("accuracy", "nll")}
    return dict(baseline=str(base_dir), baseline_command=base.get("command"), datasets=out)


def paired_table(heads: dict) -> dict:
    """Returns {"a - b": {"accuracy": paired(...), "nll": paired(...)}} for the `PAIRS` present in `heads` (the
    per-head summaries of one dataset and backbone, each with per_split values)."""
    return {f"{a} - {b}": {m: paired(heads[a][m]["per_split"], heads[b][m]["per_split"], m != "nll")
                           for m in ("accuracy", "nll")}
            for a, b in PAIRS if a in heads and b in heads}


def _section(cfg, scores: dict, record) -> dict:
    out = dict(heads={kind: common.mean_std(s, list(s[0])) for kind, s in scores.items()})
    for kind, s in scores.items():  # the validation-threshold referral pooled over all splits' test cells
        if "kept_at_val_threshold" in s[0]:
            kept = sum(r["kept_at_val_threshold"] for r in s)
            out["heads"][kind]["pooled_acc_at_val_threshold"] = sum(r["correct_at_val_threshold"] for r in s) / max(kept, 1)
    out["paired"] = paired_table(out["heads"])
    if record is not None:
        out["backbone"] = record
    return out


def run(cfg: Config) -> dict:
    """Runs the suite; writes <out_dir>/metrics.json, predictions_per_split.npz, splits/ and returns the metrics."""
    if cfg.recalibrate:
        return temperature_prior_sweep(cfg)
    t_start = time.perf_counter()
    env = common.environment()
    unknown = (({d for d in cfg.datasets if not d.startswith(FOLDER)} - set(DATASETS))
               | (set(cfg.heads) - set(recipe.HEAD_KINDS)))
    if unknown:
        raise common.InputError(f"experiments/dev_suite.py: unknown datasets/heads {sorted(unknown)}")
    out = pathlib.Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz: dict = {}
    results: dict = {}

    def write(complete: bool) -> dict:
        """Writes metrics.json (after every split: a run cut short keeps its finished splits, complete=False)."""
        m = dict(study="issue 20 development suite: every head on every real set, same features and splits, "
                       "paired differences", complete=complete, datasets=results,
                 protocol=dict(name="stratified grouped k-fold, repeated", folds=cfg.folds, repeats=cfg.repeats,
                               val_fraction=cfg.val_fraction,
                               verdict="loses if mean difference < -2 se, wins if > 2 se (se = std/sqrt(S)), else tie"),
                 model=dict(heads=list(cfg.heads), members=cfg.members, feature_dim=cfg.feature_dim, units=cfg.units,
                            hidden=cfg.hidden, order=cfg.order, views="dihedral (8), TTA", epochs=cfg.epochs,
                            coverage=COVERAGE),
                 timing_s=dict(total=time.perf_counter() - t_start), peak_rss_mb=common.peak_rss_mb(),
                 environment=env,
                 command=common.command_line("experiments.dev_suite", cfg))
        if complete and cfg.baseline:
            m["versus_baseline"] = versus_baseline(m, npz, cfg.baseline)
        records.write_json(out / "metrics.json", m)
        np.savez_compressed(out / "predictions_per_split.npz", **npz)
        return m

    with tempfile.TemporaryDirectory(prefix="leukax_features_") as scratch:  # features without --feature_cache
        for name in cfg.datasets:
            label = _label(name)
            results[label] = run_dataset(cfg, name, out, npz, cfg.feature_cache or scratch,
                                         lambda section, label=label: (results.__setitem__(label, section),
                                                                       write(False)))
    m = write(True)
    print(summary_table(m))
    print(f"dev_suite: wrote {out}/ in {m['timing_s']['total']:.0f} s")
    return m


def summary_table(m: dict) -> str:
    """Markdown: accuracy per head, then the paired accuracy differences (mean ± std over splits, verdict)."""
    heads = m["model"]["heads"]
    rows = ["| dataset | backbone | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    prs = []
    for name, d in m["datasets"].items():
        for bb, sec in d["backbones"].items():
            acc = [sec["heads"][h]["accuracy"] for h in heads]
            rows.append(f"| {name} (S={d['splits']}) | {bb} | " + " | ".join(
                f"{a['mean']:.3f} ± {a['std']:.3f}" for a in acc) + " |")
            for pair, p in sec["paired"].items():
                a = p["accuracy"]
                prs.append(f"| {name} | {bb} | {pair} | {a['mean']:+.3f} ± {a['std']:.3f} | {a['wins']}/{a['losses']} | "
                           f"{a['verdict']} |")
    vb = m.get("versus_baseline", {}).get("datasets", {})
    base_rows = [f"| {name} | {bb} | {kind} | {p['accuracy']['mean']:+.3f} ± {p['accuracy']['std']:.3f} | "
                 f"{p['accuracy']['verdict']} | {p['nll']['mean']:+.3f} ± {p['nll']['std']:.3f} | {p['nll']['verdict']} |"
                 for name, d in vb.items() for bb, hs in d.items() if isinstance(hs, dict)
                 for kind, p in hs.items()]
    if base_rows:
        base_rows = ["", f"This run − baseline ({m['versus_baseline']['baseline']}), same splits:", "",
                     "| dataset | backbone | head | accuracy | verdict | NLL | verdict |", "|---|---|---|---|---|---|---|",
                     *base_rows]
    return "\n".join(rows + ["", "| dataset | backbone | paired accuracy | mean ± std | wins/losses | verdict |",
                             "|---|---|---|---|---|---|"] + prs + base_rows)


if __name__ == "__main__":
    common.main(Config, run)
