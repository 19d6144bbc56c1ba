"""Classify new blood-smear images with a trained ensemble, and refer the uncertain ones to an expert.

  python -m leukax.predict --model results/quickstart/model --images path/to/cell.png path/to/folder
  leukax-predict --model ... --images ... --out predictions.csv

Prints, per image: the ensemble-mean probability of each class, the predicted class, the uncertainty the
bundle's referral rule uses (and the others), and REFER when that uncertainty is above the threshold chosen
on validation data. A research tool, not a medical device: every prediction is a second opinion.
"""
from __future__ import annotations

import csv
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from leukax import bundle as bundle_lib
from leukax import uncertainty
from leukax.data import imageio

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_images(paths) -> list[pathlib.Path]:
    """Returns image files from files and folders (recursive, sorted); errors on a path with no image."""
    files: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise FileNotFoundError(f"{p}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def load_model(directory):
    """Returns (config, probs_fn) where probs_fn(uint8 N×S×S×3) -> probs M×N×K for a bundle directory."""
    from leukax.models import pretrained
    from leukax.models.classifier import Classifier
    from leukax.models.heads import make_head
    from leukax.train.ensemble import normalize
    from leukax.train.features import compute_features

    cfg, variables_m = bundle_lib.load(directory)
    head = make_head(cfg.head, len(cfg.class_names), **cfg.head_kwargs)
    if cfg.mode == "head":
        backbone, bb_vars, _ = pretrained(cfg.backbone, weights=cfg.weights, **cfg.backbone_kwargs)

        @jax.jit
        def head_probs(fm):
            def one(v):
                return jax.nn.softmax(head.apply(v, fm, train=False)[0], -1)
            return jax.vmap(one)(variables_m)

        def probs_fn(images):
            fm = compute_features(backbone, bb_vars, images, cfg.normalization)
            return np.asarray(head_probs(jnp.asarray(fm)))
    else:
        backbone, _, _ = pretrained(cfg.backbone, weights=None, **cfg.backbone_kwargs)
        model = Classifier(backbone, head)

        @jax.jit
        def probs_fn_j(x):
            x = normalize(x, cfg.normalization)
            return jax.lax.map(lambda v: jax.nn.softmax(model.apply(v, x, train=False)[0], -1), variables_m)

        def probs_fn(images):
            return np.asarray(probs_fn_j(jnp.asarray(images)))
    return cfg, probs_fn


def predict_files(model_dir, files, batch_size: int = 16) -> tuple[bundle_lib.BundleConfig, list[dict]]:
    """Returns (config, one dict per file: probabilities, prediction, uncertainties, refer flag)."""
    cfg, probs_fn = load_model(model_dir)
    rows = []
    for s in range(0, len(files), batch_size):
        chunk = files[s:s + batch_size]
        images = np.stack([imageio.resize_image(imageio.read_image(f), cfg.image_size) for f in chunk])
        unc = {k: np.asarray(v) for k, v in uncertainty.deep_ensemble(jnp.asarray(probs_fn(images))).items()}
        for i, f in enumerate(chunk):
            u = float(unc[cfg.uncertainty][i])
            refer = cfg.referral_threshold is not None and u > cfg.referral_threshold
            rows.append(dict(
                file=str(f), prediction=cfg.class_names[int(unc["pred"][i])],
                **{f"p_{c}": float(unc["mean"][i, k]) for k, c in enumerate(cfg.class_names)},
                predictive_entropy=float(unc["predictive_entropy"][i]),
                mutual_information=float(unc["mutual_information"][i]),
                variance=float(unc["variance_pred"][i]), disagreement=float(unc["disagreement"][i]),
                refer=bool(refer)))
    return cfg, rows


FLAGS = flags.FLAGS


def _define_flags():
    """Defines the command's flags (only when run as a command, so importing this module defines none)."""
    flags.DEFINE_string("model", "results/quickstart/model", "Bundle directory written by a training run.")
    flags.DEFINE_multi_string("images", None, "Image files or folders (repeatable; also positional).")
    flags.DEFINE_string("out", None, "Write the predictions here (.csv or .json).")
    flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")


def main(argv):
    logging.set_verbosity(logging.WARNING)
    paths = list(FLAGS.images or []) + list(argv[1:])
    if not paths:
        raise app.UsageError("give images: --images a.png --images folder/ (or as positional arguments)")
    files = list_images(paths)
    cfg, rows = predict_files(FLAGS.model, files, FLAGS.batch_size)
    thr = cfg.referral_threshold
    print(f"model: {FLAGS.model} ({cfg.backbone} + {cfg.head} head, {cfg.num_members} members); referral: "
          f"{cfg.uncertainty} > {thr if thr is not None else 'none'}")
    for r in rows:
        probs = " ".join(f"{c}={r['p_' + c]:.3f}" for c in cfg.class_names)
        print(f"{r['file']}\t{r['prediction']}\t{probs}\t{cfg.uncertainty}={r[cfg.uncertainty]:.3f}"
              f"{chr(9) + 'REFER to an expert' if r['refer'] else ''}")
    if FLAGS.out:
        out = pathlib.Path(FLAGS.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".json":
            out.write_text(json.dumps(rows, indent=2))
        else:
            with out.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        print(f"wrote {out}")


def run():
    """Console-script entry point (`leukax-predict`)."""
    _define_flags()
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
