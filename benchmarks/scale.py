"""Wall time per phase and peak RSS of the hybrid-GRU study against dataset size (issue 19).

  python benchmarks/scale.py                          (N = 1000, 4000, 16000; writes results/benchmarks/scale.{json,md})
  python benchmarks/scale.py --sizes=200,400 --out_dir=/tmp/scale   (a quick look)
  python benchmarks/scale.py --program=dev_suite --sizes=1000,4000  (the development suite on the same images, as
                                                       a class folder: writes scale_dev_suite.{json,md})

For every N it writes a synthetic folder in the official C-NMC 2019 layout
(`cnmc2019/training_data/fold_{0,1,2}/{all,hem}/UID_<subject>_<image>_<cell>_<all|hem>.png`) made from the 60
embedded sample cells: copy i of a cell is one of its 8 dihedral views plus Gaussian noise (sigma 2 grey levels),
so no two files are equal and the builder's duplicate check keeps them all. Subjects are the sample's subjects ×
copy block, so grouped splits still keep a (synthetic) subject on one side. The images are NOT independent cells:
accuracies from these folders mean nothing and are not reported.

Each N then runs `python -m experiments.hybrid_gru --dataset=cnmc2019/full --manual_dir=<folder>
--backbones=mobilenet_v2 --heads=probe,gru` in a fresh process (one grouped 80/20 split, M = 3, 5 epochs: the
study's phases at a size 2 cores finish; what grows with N is the same as in the default study), with a fresh
TFDS data dir and feature folder. Phase times come from the study's metrics.json (`timing_s`: data = TFDS build +
index, features = streamed extraction of 8 views, training = probe + GRU on the split); peak RSS is the child's
`ru_maxrss` from `os.wait4` (the same number `/usr/bin/time -v` prints).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from experiments import common
from experiments.common import field
from leukax import records
from leukax.data.builders.datasets import cnmc_records, sample_dir

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    sizes: tuple = field((1000, 4000, 16000), "Numbers of synthetic images N, one study each.")
    members: int = field(3, "Deep-ensemble members of each head.")
    epochs: int = field(5, "Training epochs (patience = epochs: no early stop).")
    work_dir: str = field("", "Scratch folder for the synthetic images, TFDS data and features (default: a "
                          "temporary folder, deleted after each N).")
    weights_dir: str = field(str(REPO.parent / "shared" / "weights"), "Folder of weight files (MobileNetV2 .h5).")
    out_dir: str = field(str(REPO / "results" / "benchmarks"), "Where scale.{json,md} go.")
    extra: str = field("", "Extra flags passed to the study, space-separated.")
    program: str = field("hybrid_gru", "The study: hybrid_gru (one grouped 80/20 split) or dev_suite (--folds "
                         "grouped folds of `--datasets=folder:<N images>`, the same streamed feature path).",
                         choices=("hybrid_gru", "dev_suite"))
    folds: int = field(5, "--program=dev_suite: grouped folds (every fold trains the probe and the GRU).")


def make_folder(root: pathlib.Path, n: int, seed: int = 0, classes: bool = False) -> pathlib.Path:
    """Writes n distinct noisy dihedral copies of the embedded C-NMC sample in the official layout (classes=True:
    as <root>/classes/{all,hem}/, a folder of class subfolders); returns the folder to pass as --manual_dir."""
    rng = np.random.default_rng(seed)
    recs = sorted(cnmc_records(sample_dir()), key=lambda r: r.filename)
    images = [np.asarray(Image.open(r.path).convert("RGB")) for r in recs]
    for i in range(n):
        j, copy = i % len(recs), i // len(recs)
        r, img = recs[j], images[j]
        v = int(rng.integers(8))
        view = np.rot90(img[:, ::-1] if v >= 4 else img, v % 4)
        noisy = np.clip(view + rng.normal(0, 2, view.shape), 0, 255).astype(np.uint8)
        healthy = r.subject.startswith("H")
        subject = f"{'H' if healthy else ''}{int(r.subject.lstrip('H')) * 100 + copy % 100}"
        cls = "all" if r.label == 1 else "hem"
        d = root / "classes" / cls if classes else root / "cnmc2019" / "training_data" / f"fold_{copy % 3}" / cls
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(d / f"UID_{subject}_{copy}_{j}_{cls}.png", compress_level=1)
    return root


def run_one(n: int, args: Config, work: pathlib.Path) -> dict:
    """Makes the N-image folder, runs the study in a child process; returns its phase times and peak RSS."""
    t = time.perf_counter()
    suite = args.program == "dev_suite"
    manual = make_folder(work / "manual", n, classes=suite)
    make_s = time.perf_counter() - t
    out = work / "study"
    common_flags = [f"--data_dir={work / 'tfds'}", f"--feature_cache={work / 'features'}", f"--out_dir={out}",
                    "--backbones=mobilenet_v2", "--heads=probe,gru", f"--members={args.members}",
                    f"--epochs={args.epochs}", f"--patience={args.epochs}", "--repeats=1",
                    f"--weights_dir={args.weights_dir}"]
    if suite:
        cmd = [sys.executable, "-m", "experiments.dev_suite", f"--datasets=folder:{manual / 'classes'}",
               f"--folds={args.folds}"] + common_flags + args.extra.split()
    else:
        cmd = [sys.executable, "-m", "experiments.hybrid_gru", "--dataset=cnmc2019/full", f"--manual_dir={manual}",
               "--head=gru", "--protocol=paper_80_20", "--nosave_model", "--quiet"] + common_flags + args.extra.split()
    print(f"scale: N = {n}: {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmarks/scale.py: the study failed at N = {n} (exit {status})")
    m = json.loads((out / "metrics.json").read_text())
    disk_mb = sum(f.stat().st_size for f in (work / "features").rglob("*") if f.is_file()) / 1e6
    row = dict(n=n, make_folder_s=round(make_s, 1), wall_s=round(wall, 1), peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
               features_on_disk_mb=round(disk_mb, 1), study_command=m["command"],
               study_commit=m["environment"]["commit"])
    if suite:
        (path,) = (work / "features").glob("*.npy")
        shape, sec = list(np.load(path, mmap_mode="r").shape), m["datasets"]["classes"]
        row.update(phases_s={"whole suite (data, features, folds)": round(m["timing_s"]["total"], 1),
                             f"features + {sec['splits']} folds (probe + GRU)": round(sec["training_s"], 1)},
                   folds=sec["splits"])
    else:
        shape = next(iter(m["hybrids"]))["feature_shape"]
        row.update(phases_s={"data (TFDS build + index)": round(m["timing_s"]["data"], 1),
                             "features (8 views, streamed)": round(sum(m["timing_s"]["features"].values()), 1),
                             "training (probe + GRU, 1 split)": round(m["timing_s"]["training"], 1)},
                   peak_rss_mb_after={k: round(v, 1) for k, v in m["peak_rss_mb_after"].items()},
                   split=m["protocol"]["first_split_sizes"])
    v, _, tokens, _ = shape
    # float16 V×N×T×256 of all N images: the three parts of the split (hybrid_gru), or every fold's (dev_suite)
    return dict(row, reduced_features_mb=round(v * n * tokens * 256 * 2 / 1e6, 1), feature_shape=shape)


def run(args: Config) -> dict:
    env = common.environment()  # provenance read before the long runs, not after
    rows = []
    for n in args.sizes:
        n = int(n)
        if args.work_dir:
            work = pathlib.Path(args.work_dir) / f"n{n}"
            shutil.rmtree(work, ignore_errors=True)
            rows.append(run_one(n, args, work))
        else:
            with tempfile.TemporaryDirectory(prefix=f"leukax_scale_{n}_") as d:
                rows.append(run_one(n, args, pathlib.Path(d)))
        print(f"scale: {json.dumps(rows[-1])}", flush=True)
    record = dict(command=common.command_line("benchmarks/scale.py", args), commit=env["commit"],
                  device=f"{env['backend']}:{env['device_kind']}; {env['cpu_count']} CPU cores; {env['cpu']}",
                  allocator=env["allocator"], date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  dataset="synthetic C-NMC 2019 layout from the embedded 60-cell sample (noisy dihedral copies)",
                  protocol=(f"{args.folds} grouped folds of experiments.dev_suite" if args.program == "dev_suite"
                            else "one grouped 80/20 split (val 20 % inside)")
                           + f", heads probe + GRU, M = {args.members}, {args.epochs} epochs, MobileNetV2 (224 px, "
                           "8 dihedral views)",
                  program=args.program, rows=rows)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "scale" if args.program == "hybrid_gru" else f"scale_{args.program}"
    records.write_json(out / f"{stem}.json", record)
    (out / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    rows, suite = record["rows"], record.get("program") == "dev_suite"
    phases = list(rows[0]["phases_s"])
    head = ("| N | " + " | ".join(phases) + " | study wall | peak RSS | reduced features (float16) | "
            "peak RSS − reduced | bfloat16 maps on disk |")
    lines = [head, "|" + "---|" * (len(phases) + 6)]
    for r in rows:
        lines.append(f"| {r['n']:,} | " + " | ".join(f"{r['phases_s'][p]:.0f} s" for p in phases)
                     + f" | {r['wall_s'] / 60:.1f} min | {r['peak_rss_mb'] / 1e3:.2f} GB | "
                     f"{r['reduced_features_mb'] / 1e3:.2f} GB | "
                     f"{(r['peak_rss_mb'] - r['reduced_features_mb']) / 1e3:.2f} GB | "
                     f"{r['features_on_disk_mb'] / 1e3:.1f} GB |")
    ratio = ""
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        ratio = (f"\nWall time ratio N = {b['n']:,} / N = {a['n']:,}: {b['wall_s'] / a['wall_s']:.1f}× for "
                 f"{b['n'] / a['n']:.0f}× the images" + ("" if suite else " (issue 19's target: ≤ 18× for 16×)")
                 + ".\n")
    title = "the development suite" if suite else "the hybrid-GRU study"
    return (f"# Scale: {title} against dataset size\n\nCommand: `{record['command']}`  \n"
            f"Commit: `{record['commit']}`  \nDevice: {record['device']}; allocator: {record['allocator']}  \n"
            f"Date: {record['date']}  \nData: {record['dataset']}  \nProtocol: {record['protocol']}  \n"
            f"Study command (per N): `{rows[-1]['study_command']}`\n\n" + "\n".join(lines) + "\n" + ratio)


if __name__ == "__main__":
    common.main(Config, run)
