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
from leukax import uncertainty
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


def load_model(directory) -> tuple[bundle_lib.BundleConfig, Callable]:
    """Returns (config, probs_fn) for a bundle directory: probs_fn(uint8 N×S×S×3) -> (member probabilities
    M×N×K averaged over the bundle's views, Mahalanobis OOD score N (NaN without an OOD model))."""
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
            return np.asarray(probs_fn_j(jnp.asarray(images))), np.full(len(images), np.nan)
    return cfg, probs_fn


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


def uncertainties(probs_mnk: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the deep-ensemble summaries of M×N×K member probabilities, each over N images: the mean N×K,
    pred, and the uncertainty columns (see `leukax.uncertainty.deep_ensemble`)."""
    u = {k: np.asarray(v) for k, v in uncertainty.deep_ensemble(jnp.asarray(probs_mnk)).items()}
    return dict(mean=u["mean"], pred=u["pred"], predictive_entropy=u["predictive_entropy"],
                mutual_information=u["mutual_information"], variance=u["variance_pred"],
                disagreement=u["disagreement"])


def measure(cfg: bundle_lib.BundleConfig) -> str:
    """The column holding the uncertainty the bundle's referral rule uses."""
    return _MEASURE_ALIASES.get(cfg.uncertainty, cfg.uncertainty)


def refer(cfg: bundle_lib.BundleConfig, unc_row: dict[str, float]) -> bool:
    """The referral rule: refer to an expert when the bundle's uncertainty measure is above its threshold, or
    the members disagree (mutual information, the epistemic part) above theirs, or the image is far from every
    training class (Mahalanobis OOD score above its threshold). All thresholds were fitted on validation data."""
    rules = ((cfg.referral_threshold, unc_row[measure(cfg)]), (cfg.mi_threshold, unc_row["mutual_information"]),
             (cfg.ood_threshold, unc_row["ood_score"]))
    return any(thr is not None and val is not None and np.isfinite(val) and val > thr for thr, val in rules)


def ok_row(cfg, file, mean_k: np.ndarray, pred: int, unc_row: dict[str, float], size: str) -> dict:
    """Returns the row of a classified image."""
    row = dict(file=str(file), status="ok", error="", prediction=cfg.class_names[int(pred)])
    row.update({f"p_{c}": float(mean_k[k]) for k, c in enumerate(cfg.class_names)})
    row.update(unc_row)
    row.update(refer=bool(refer(cfg, unc_row)), size=size)
    return row


def _decode(file, image_size: int, max_pixels: int | None) -> tuple[np.ndarray, str]:
    """Returns (uint8 S×S×3 resized whole, "W×H" of the original); raises ImageReadError with the reason."""
    with warnings.catch_warnings():  # e.g. PIL's "Corrupt EXIF data": the row carries the outcome
        warnings.simplefilter("ignore")
        image = imageio.read_image(file, max_pixels=max_pixels)
    size = f"{image.shape[1]}x{image.shape[0]}"
    return imageio.resize_image(image, image_size), size


def iter_predictions(cfg, probs_fn, files: Iterable, batch_size: int = 16, max_pixels: int | None = None,
                     progress=None) -> Iterator[list[dict]]:
    """Yields, per batch of `batch_size` inputs, their rows in input order (bad inputs as error rows).

    Only one batch of resized images is held; the batch is padded to `batch_size` so the model compiles once.
    `progress`: an object with .update(n) (e.g. tqdm), or None.
    """
    files = list(files)
    for s in range(0, len(files), batch_size):
        chunk = files[s:s + batch_size]
        rows: list[dict | None] = [None] * len(chunk)
        images, sizes, where = [], [], []
        for i, f in enumerate(chunk):
            if isinstance(f, InputProblem):
                rows[i] = error_row(cfg, f.path, f.reason)
                continue
            try:
                image, size = _decode(f, cfg.image_size, max_pixels)
            except imageio.ImageReadError as e:
                rows[i] = error_row(cfg, f, e.reason)
                continue
            except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem, not the run's
                rows[i] = error_row(cfg, f, f"cannot decode ({type(e).__name__}: {e})")
                continue
            images.append(image)
            sizes.append(size)
            where.append(i)
        if images:
            n = len(images)
            batch = np.stack(images + [images[-1]] * (batch_size - n))
            probs_mnk, ood_n = probs_fn(batch)
            u = uncertainties(np.asarray(probs_mnk)[:, :n])
            u["ood_score"] = np.asarray(ood_n)[:n]
            for j, i in enumerate(where):
                unc_row = {c: float(u[c][j]) if np.isfinite(u[c][j]) else None for c in UNCERTAINTY_COLUMNS}
                rows[i] = ok_row(cfg, chunk[i], u["mean"][j], u["pred"][j], unc_row, sizes[j])
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
                self.csv.writerow({k: "" if v is None else v for k, v in r.items()})
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
    print(f"model: {args.model} ({cfg.backbone} + {cfg.head} head, {cfg.num_members} members); referral: "
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
