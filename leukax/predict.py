"""Classify new blood-smear images with a trained ensemble, and refer the uncertain ones to an expert.

  python -m leukax.predict --model results/quickstart/model --images path/to/cell.png path/to/folder
  leukax-predict --model ... --images ... --out predictions.csv

Every input image gets one row, in sorted order per folder: `status` "ok" with the ensemble-mean
probability of each class (`p_<class>`), the prediction, the uncertainties (predictive entropy, mutual
information, variance, member disagreement) and `refer` (the uncertainty the bundle's referral rule uses is
above the threshold chosen on validation data); or `status` "error" with the reason (corrupt, truncated,
empty, not an image, over the pixel limit, unreadable TIFF, missing). A bad file never stops the run.

Images stream through in batches of --batch_size (only one batch of decoded images is in memory; each image
is resized to the model's input size right after decoding), a progress bar goes to stderr, and rows are
written to --out (.csv, .json or .jsonl) as each batch finishes. Large images, such as full ALL-IDB1 smears
(2592×1944), are accepted and resized WHOLE to the model's square input, exactly as the training images were
(aspect ratio not kept, not tiled); `size` records the original width×height. A smear holding many cells
thus gets one prediction for the whole field: crop single cells first for per-cell predictions.

A fused bundle (`experiments.hybrid_gru`: one hybrid per backbone, sum rule) is read the same way: each image
is resized to every hybrid's input size, the hybrids' members are pooled (sum rule = mean of all members), the
`p_<class>` columns are temperature-calibrated (T in the bundle; T = 1 for quickstart bundles), the uncertainty
columns are of the members themselves (what the referral thresholds were fitted on), and `ood_score` is the
mean of the hybrids' Mahalanobis scores.

Exit status: 0 every image was classified; 1 some inputs failed (their rows say why; the others were still
classified and written); 2 usage error (no images, bad option, unsupported --out suffix) or the model bundle
is missing or unreadable. A research tool, not a medical device: every prediction is a second opinion.
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
import warnings
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from leukax import bundle as bundle_lib
from leukax import calibration, uncertainty
from leukax.data import imageio
from leukax.models.classifier import Classifier
from leukax.models.heads import make_head
from leukax.preprocess import normalize
from leukax.pretrained import pretrained
from leukax.train.features import compute_features
from leukax.train.views import make_views

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
UNCERTAINTY_COLUMNS = ("predictive_entropy", "mutual_information", "variance", "disagreement", "ood_score")
_MEASURE_ALIASES = {"variance_pred": "variance"}  # bundle's `uncertainty` name -> column


class InputProblem(ValueError):
    """A path given on the command line that yields no image (missing, or a folder without images)."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def list_images(paths, strict: bool = True) -> list[pathlib.Path]:
    """Returns image files from files and folders (recursive, sorted per folder).

    A folder contributes its files with an image suffix (others, e.g. ALL-IDB's .xyc, are not images);
    a file given by name is always tried. strict=True raises FileNotFoundError for a missing path or a
    folder with no images; strict=False returns such a path as an `InputProblem` entry instead.
    """
    files: list = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            problem = None if found else InputProblem(p, f"folder has no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
            problem = None
        else:
            problem = InputProblem(p, "no such file or folder")
        if problem is not None:
            if strict:
                raise FileNotFoundError(str(problem))
            files.append(problem)
    return files


def image_sizes(cfg) -> tuple[int, ...]:
    """The input sizes (pixels) a bundle's backbones need: one for a single backbone, one per size when fused."""
    if isinstance(cfg, bundle_lib.FusedConfig):
        return tuple(sorted(set(int(x) for x in cfg.image_sizes)))
    return (int(cfg.image_size),)


def _at_size(images, size: int) -> np.ndarray:
    """Returns uint8 N×size×size×3 from `images`: a dict {size: N×S×S×3} (each resized from the original) or
    one N×S×S×3 array (resized again when S differs)."""
    if isinstance(images, dict):
        return images[size]
    images = np.asarray(images)
    if images.shape[1] == size:
        return images
    return np.stack([imageio.resize_image(x, size) for x in images])


def describe(cfg) -> str:
    """One line naming the model: backbone(s), head and members."""
    if isinstance(cfg, bundle_lib.FusedConfig):
        return (f"{cfg.fusion}-rule fusion of {len(cfg.hybrids)} hybrids ({', '.join(cfg.hybrids)}), "
                f"{cfg.num_members} members each")
    return f"{cfg.backbone} + {cfg.head} head, {cfg.num_members} members"


def load_model(directory) -> tuple[bundle_lib.BundleConfig | bundle_lib.FusedConfig, Callable]:
    """Returns (config, probs_fn) for a bundle directory, single-backbone or fused: probs_fn(images) ->
    (member probabilities M×N×K averaged over the bundle's views, Mahalanobis OOD score N (NaN without an
    OOD model)); `images` is uint8 N×S×S×3 or {size: N×S×S×3} (see `image_sizes`). A fused bundle's M is H·M
    (every hybrid's members, in the order of `cfg.hybrids`) and its OOD score the mean over hybrids."""
    cfg = bundle_lib.read_config(directory)
    if isinstance(cfg, bundle_lib.FusedConfig):
        return cfg, _load_fused(pathlib.Path(directory), cfg)
    cfg, variables_m = bundle_lib.load(directory)
    head = make_head(cfg.head, len(cfg.class_names), **cfg.head_kwargs)
    if cfg.mode == "head":
        weights = None if cfg.weights in (None, "none") else cfg.weights  # "none": random init (seed 0)
        backbone, bb_vars, _ = pretrained(cfg.backbone, weights=weights, **cfg.backbone_kwargs)
        transform, ood = variables_m.get("transform"), variables_m.get("ood")
        params_m = variables_m["params"]

        @jax.jit
        def head_probs(x_vntc):
            if transform is not None:  # the training part's standardisation (+ PCA)
                x_vntc = (x_vntc - transform["mean_c"]) / transform["std_c"]
                pooled_nc = jnp.mean(x_vntc, (0, 2))
                if "proj_cd" in transform:
                    x_vntc = x_vntc @ transform["proj_cd"]
            else:
                pooled_nc = jnp.mean(x_vntc, (0, 2))
            v, n = x_vntc.shape[:2]
            flat = x_vntc.reshape((v * n,) + x_vntc.shape[2:])
            probs = jax.vmap(lambda p: jnp.mean(jax.nn.softmax(
                head.apply({"params": p}, flat, train=False)[0], -1).reshape(v, n, -1), 0))(params_m)
            score = uncertainty.mahalanobis_score(ood, pooled_nc) if ood is not None else jnp.full((n,), jnp.nan)
            return probs, score

        def probs_fn(images):
            images = _at_size(images, cfg.image_size)
            views_vnhwc = make_views(images, cfg.views)
            v, n = views_vnhwc.shape[:2]
            fm = compute_features(backbone, bb_vars, views_vnhwc.reshape((v * n,) + images.shape[1:]),
                                  cfg.normalization, batch_size=len(images))
            probs, score = head_probs(jnp.asarray(fm.reshape(v, n, -1, fm.shape[-1])))
            return np.asarray(probs), np.asarray(score)
    else:
        backbone, _, _ = pretrained(cfg.backbone, weights=None, **cfg.backbone_kwargs)
        model = Classifier(backbone, head)

        @jax.jit
        def probs_fn_j(x):
            x = normalize(x, cfg.normalization)
            return jax.lax.map(lambda v: jax.nn.softmax(model.apply(v, x, train=False)[0], -1), variables_m)

        def probs_fn(images):
            images = _at_size(images, cfg.image_size)
            return np.asarray(probs_fn_j(jnp.asarray(images))), np.full(len(images), np.nan)
    return cfg, probs_fn


def _load_fused(directory: pathlib.Path, cfg: bundle_lib.FusedConfig) -> Callable:
    """The probs_fn of a fused bundle: every hybrid's members stacked (H·M)×N×K, OOD score = mean over hybrids."""
    if cfg.fusion != "sum":
        raise ValueError(f"{directory}: fusion rule {cfg.fusion!r} is not supported (sum)")
    subs = [load_model(directory / "hybrids" / name) for name in cfg.hybrids]
    for name, (sub, _) in zip(cfg.hybrids, subs):
        if list(sub.class_names) != list(cfg.class_names) or sub.num_members != cfg.num_members:
            raise ValueError(f"{directory}: hybrid {name} has classes {sub.class_names} and {sub.num_members} "
                             f"members; the fused bundle says {cfg.class_names} and {cfg.num_members}")

    def probs_fn(images):
        outs = [fn(images) for _, fn in subs]
        # Sum rule: (1/H) Σ_h (1/M) Σ_m p_hm = the mean over all H·M members (equal M, checked above).
        return np.concatenate([p for p, _ in outs], 0), np.mean(np.stack([o for _, o in outs]), 0)
    return probs_fn


def load_gradcam(directory) -> tuple[int, Callable] | None:
    """Returns (input size, fn) where fn(uint8 N×S×S×3, class_index N) -> Grad-CAM heatmaps N×S×S in [0, 1]
    (`leukax.gradcam`) of member 0 of the bundle's (for a fused bundle: its first hybrid's) backbone + feature
    transform + head; None for a finetune-mode bundle."""
    from leukax.gradcam import gradcam_classifier
    from leukax.train.recipe import TransformedHead
    directory = pathlib.Path(directory)
    top = bundle_lib.read_config(directory)
    if isinstance(top, bundle_lib.FusedConfig):
        directory = directory / "hybrids" / top.hybrids[0]
    cfg, variables_m = bundle_lib.load(directory)
    if cfg.mode != "head":
        return None
    weights = None if cfg.weights in (None, "none") else cfg.weights
    backbone, bb_vars, _ = pretrained(cfg.backbone, weights=weights, **cfg.backbone_kwargs)
    head = make_head(cfg.head, len(cfg.class_names), **cfg.head_kwargs)
    member0 = jax.tree.map(lambda a: jnp.asarray(a[0]), variables_m["params"])
    tf = variables_m.get("transform")
    if tf is None:
        model, head_vars = Classifier(backbone, head), member0
    else:
        proj = tf.get("proj_cd")
        model = Classifier(backbone, TransformedHead(head, int(tf["mean_c"].shape[0]), 0 if proj is None else proj.shape[1]))
        head_vars = {"head": member0, **{k: jnp.asarray(v) for k, v in tf.items()}}
    variables = {"params": {"backbone": bb_vars["params"], "head": head_vars},
                 "batch_stats": {"backbone": bb_vars.get("batch_stats", {})}}

    def fn(images_nhwc, class_index):
        x = normalize(jnp.asarray(images_nhwc), cfg.normalization)
        return np.asarray(gradcam_classifier(model, variables, x, jnp.asarray(class_index, jnp.int32)))
    return cfg.image_size, fn


# ------------------------------------------------------------------------------------- per-image rows
def columns(cfg: bundle_lib.BundleConfig) -> list[str]:
    """The output columns, in order (the same for ok and error rows)."""
    return (["file", "status", "error", "prediction"] + [f"p_{c}" for c in cfg.class_names]
            + list(UNCERTAINTY_COLUMNS) + ["refer", "size"])


def error_row(cfg, file, reason: str, size: str = "") -> dict:
    """Returns the row of an input that could not be classified."""
    row = dict.fromkeys(columns(cfg))
    row.update(file=str(file), status="error", error=reason, size=size)
    return row


def uncertainties(probs_mnk: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Returns the deep-ensemble summaries of M×N×K member probabilities, each over N images: the mean N×K
    (temperature-scaled, softmax(log p̄ / T), when T ≠ 1: same argmax), pred, and the uncertainty columns of the
    members themselves (see `leukax.uncertainty.deep_ensemble`)."""
    u = {k: np.asarray(v) for k, v in uncertainty.deep_ensemble(jnp.asarray(probs_mnk)).items()}
    if temperature != 1.0:
        u["mean"] = np.asarray(calibration.apply_temperature(jnp.asarray(u["mean"]), temperature))
    return dict(mean=u["mean"], pred=u["pred"], predictive_entropy=u["predictive_entropy"],
                mutual_information=u["mutual_information"], variance=u["variance_pred"],
                disagreement=u["disagreement"])


def measure(cfg: bundle_lib.BundleConfig) -> str:
    """The column holding the uncertainty the bundle's referral rule uses."""
    return _MEASURE_ALIASES.get(cfg.uncertainty, cfg.uncertainty)


def referral_reasons(cfg, unc_row: dict[str, float]) -> list[str]:
    """The referral rule, with its reasons: refer to an expert when the bundle's uncertainty measure is above its
    threshold, or the members disagree (mutual information, the epistemic part) above theirs, or the image is
    far from every training class (Mahalanobis OOD score above its threshold). All thresholds were fitted on
    validation data. Returns one "<column> <value> > <threshold>" per rule that fires (empty: no referral)."""
    rules = ((measure(cfg), cfg.referral_threshold), ("mutual_information", cfg.mi_threshold),
             ("ood_score", cfg.ood_threshold))
    return [f"{col} {unc_row[col]:.3g} > {thr:.3g}" for col, thr in rules
            if thr is not None and unc_row[col] is not None and np.isfinite(unc_row[col]) and unc_row[col] > thr]


def refer(cfg, unc_row: dict[str, float]) -> bool:
    """True when any referral rule fires (`referral_reasons`)."""
    return bool(referral_reasons(cfg, unc_row))


def ok_row(cfg, file, mean_k: np.ndarray, pred: int, unc_row: dict[str, float], size: str) -> dict:
    """Returns the row of a classified image."""
    row = dict(file=str(file), status="ok", error="", prediction=cfg.class_names[int(pred)])
    row.update({f"p_{c}": float(mean_k[k]) for k, c in enumerate(cfg.class_names)})
    row.update(unc_row)
    row.update(refer=bool(refer(cfg, unc_row)), size=size)
    return row


def decode(source, sizes, max_pixels: int | None = None, name=None) -> tuple[dict[int, np.ndarray], str]:
    """Returns ({size: uint8 S×S×3 resized whole from the original}, "W×H" of the original) of a file path or
    of encoded bytes (`name` for messages); raises imageio.ImageReadError with the reason."""
    with warnings.catch_warnings():  # e.g. PIL's "Corrupt EXIF data": the row carries the outcome
        warnings.simplefilter("ignore")
        if isinstance(source, (bytes, bytearray)):
            image = imageio.decode_image(bytes(source), name=name or "<upload>", max_pixels=max_pixels)
        else:
            image = imageio.read_image(source, max_pixels=max_pixels)
    return {s: imageio.resize_image(image, s) for s in sizes}, f"{image.shape[1]}x{image.shape[0]}"


def decode_or_reason(source, sizes, max_pixels: int | None = None, name=None):
    """Returns `decode(...)`, or the reason (a str) when the input cannot be decoded: never raises for a bad file."""
    if isinstance(source, InputProblem):
        return source.reason
    try:
        return decode(source, sizes, max_pixels, name)
    except imageio.ImageReadError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem, not the run's
        return f"cannot decode ({type(e).__name__}: {e})"


def classify(cfg, probs_fn, names: list, decoded: list, pad_to: int | None = None) -> list[dict]:
    """Maps decoded images to rows (the one function behind the command and the page): `decoded[i]` is
    `decode_or_reason`'s result for input `names[i]`, a reason string giving an error row. The batch is padded
    to `pad_to` images so the model compiles once."""
    rows: list[dict | None] = [None] * len(names)
    ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    for i, d in enumerate(decoded):
        if isinstance(d, str):
            rows[i] = error_row(cfg, names[i], d)
    if ok:
        n, pad = len(ok), max(pad_to or 0, len(ok)) - len(ok)
        batch = {s: np.stack([decoded[i][0][s] for i in ok] + [decoded[ok[-1]][0][s]] * pad)
                 for s in image_sizes(cfg)}
        probs_mnk, ood_n = probs_fn(batch if len(batch) > 1 else next(iter(batch.values())))
        u = uncertainties(np.asarray(probs_mnk)[:, :n], getattr(cfg, "temperature", 1.0))
        u["ood_score"] = np.asarray(ood_n)[:n]
        for j, i in enumerate(ok):
            unc_row = {c: float(u[c][j]) if np.isfinite(u[c][j]) else None for c in UNCERTAINTY_COLUMNS}
            rows[i] = ok_row(cfg, names[i], u["mean"][j], u["pred"][j], unc_row, decoded[i][1])
    return rows


def iter_predictions(cfg, probs_fn, files: Iterable, batch_size: int = 16, max_pixels: int | None = None,
                     progress=None) -> Iterator[list[dict]]:
    """Yields, per batch of `batch_size` inputs, their rows in input order (bad inputs as error rows).

    Only one batch of resized images is held; the batch is padded to `batch_size` so the model compiles once.
    `progress`: an object with .update(n) (e.g. tqdm), or None.
    """
    files = list(files)
    sizes = image_sizes(cfg)
    for s in range(0, len(files), batch_size):
        chunk = files[s:s + batch_size]
        names = [f.path if isinstance(f, InputProblem) else f for f in chunk]
        rows = classify(cfg, probs_fn, names, [decode_or_reason(f, sizes, max_pixels) for f in chunk], batch_size)
        if progress is not None:
            progress.update(len(chunk))
        yield rows


def predict_files(model_dir, files, batch_size: int = 16, max_pixels: int | None = None
                  ) -> tuple[bundle_lib.BundleConfig, list[dict]]:
    """Returns (config, one row per file: see `columns`; bad files get status "error" and the reason)."""
    cfg, probs_fn = load_model(model_dir)
    rows = [r for batch in iter_predictions(cfg, probs_fn, files, batch_size, max_pixels) for r in batch]
    return cfg, rows


# ------------------------------------------------------------------------------------- output
def csv_cells(row: dict) -> dict:
    """A result row as CSV cells: a missing value (None) is an empty cell."""
    return {k: "" if v is None else v for k, v in row.items()}


class RowWriter:
    """Writes rows to .csv / .json (one array) / .jsonl as they come, flushing after every batch."""

    SUFFIXES = (".csv", ".json", ".jsonl")

    def __init__(self, path, fieldnames: list[str]):
        self.path = pathlib.Path(path)
        self.kind = self.path.suffix.lower()
        if self.kind not in self.SUFFIXES:
            raise ValueError(f"--out {path}: unsupported suffix (use {', '.join(self.SUFFIXES)})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = self.path.open("w", newline="")
        self.n = 0
        if self.kind == ".csv":
            self.csv = csv.DictWriter(self.fh, fieldnames=fieldnames)
            self.csv.writeheader()
        elif self.kind == ".json":
            self.fh.write("[")

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            if self.kind == ".csv":
                self.csv.writerow(csv_cells(r))
            elif self.kind == ".json":
                self.fh.write(("," if self.n else "") + "\n" + json.dumps(r))
            else:
                self.fh.write(json.dumps(r) + "\n")
            self.n += 1
        self.fh.flush()

    def close(self) -> None:
        if self.kind == ".json":
            self.fh.write("\n]\n")
        self.fh.close()


def format_line(cfg, r: dict) -> str:
    """One tab-separated stdout line per row."""
    if r["status"] != "ok":
        return f"{r['file']}\tERROR\t{r['error']}"
    probs = " ".join(f"{c}={r['p_' + c]:.3f}" for c in cfg.class_names)
    return (f"{r['file']}\t{r['prediction']}\t{probs}\t{cfg.uncertainty}={r[measure(cfg)]:.3f}"
            f"{chr(9) + 'REFER to an expert' if r['refer'] else ''}")


# ------------------------------------------------------------------------------------- command
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m leukax.predict", description="Classify blood-smear images with a trained leukax "
        "ensemble; refer uncertain ones to an expert.", epilog="exit status: 0 all images classified, 1 some "
        "inputs failed (see their rows), 2 usage error or model bundle missing/unreadable")
    p.add_argument("paths", nargs="*", help="image files or folders")
    p.add_argument("--images", action="append", default=[], help="image file or folder (repeatable)")
    p.add_argument("--model", default="results/quickstart/model", help="bundle directory written by training")
    p.add_argument("--out", default=None, help="also write the rows here (.csv, .json or .jsonl), per batch")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (bounds memory)")
    p.add_argument("--max_pixels", type=int, default=None,
                   help="refuse images with more pixels (default 64e6)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr")
    return p


def cli(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (see the module docstring). Never raises for bad inputs."""
    p = parser()
    args = p.parse_args(argv)  # argparse exits with status 2 on a usage error
    paths = list(args.images) + list(args.paths)
    if not paths:
        p.error("give images: --images a.png --images folder/ (or as positional arguments)")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.out and pathlib.Path(args.out).suffix.lower() not in RowWriter.SUFFIXES:
        p.error(f"--out {args.out}: unsupported suffix (use {', '.join(RowWriter.SUFFIXES)})")
    files = list_images(paths, strict=False)
    try:
        cfg, probs_fn = load_model(args.model)
    except Exception as e:  # noqa: BLE001 - a missing/corrupt bundle is a user error: one line, no traceback
        print(f"leukax.predict: error: cannot load the model bundle {args.model}: {e}", file=sys.stderr)
        return EXIT_USAGE
    thr = cfg.referral_threshold
    print(f"model: {args.model} ({describe(cfg)}); referral: "
          f"{cfg.uncertainty} > {thr if thr is not None else 'none'}", flush=True)
    try:
        writer = RowWriter(args.out, columns(cfg)) if args.out else None
    except OSError as e:
        print(f"leukax.predict: error: cannot write --out {args.out}: {e}", file=sys.stderr)
        return EXIT_USAGE
    n_ok = n_bad = 0
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=not args.progress, desc="predict")
    try:
        for rows in iter_predictions(cfg, probs_fn, files, args.batch_size, args.max_pixels, progress=bar):
            for r in rows:
                n_ok, n_bad = n_ok + (r["status"] == "ok"), n_bad + (r["status"] != "ok")
                print(format_line(cfg, r), flush=True)  # tqdm keeps its bar on stderr
            if writer:
                writer.write(rows)
    finally:
        bar.close()
        if writer:
            writer.close()
    print(f"leukax.predict: {n_ok} classified, {n_bad} failed"
          + (f"; wrote {args.out}" if writer else ""), file=sys.stderr)
    return EXIT_OK if n_bad == 0 else EXIT_SOME_FAILED


def run():
    """Console-script entry point (`leukax-predict`, `python -m leukax.predict`): the program's process
    settings (`leukax.runtime.apply_xla_cpu_flags`), then `cli()`."""
    from leukax import runtime
    runtime.apply_xla_cpu_flags()
    sys.exit(cli())


if __name__ == "__main__":
    run()
