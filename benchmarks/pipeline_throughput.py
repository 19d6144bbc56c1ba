"""Images/s delivered by the grain pipeline (decode + resize + batch, with and without augmentation).

  python benchmarks/pipeline_throughput.py [--dataset=pbc|aml] [--image_size=224] [--batch_size=16] [--epochs=3]

Builds the TFDS dataset from the real images in shared/data (pbc: 320 JPEG 360x363; aml: 50 RGBA TIFF
400x400) into a temporary data dir, then times whole epochs, alternating the configurations epoch by epoch;
the first batch of every configuration is a warm-up (jit compile, thread start) and is not timed. Writes results/benchmarks/pipeline_throughput.{json,md}.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

import jax

from experiments import common
from experiments.common import field
from leukax import augment, records
from leukax.data import pipeline
from leukax.data.builders import get_builder

REPO = pathlib.Path(__file__).resolve().parents[1]
DATASETS = {"pbc": ("pbc-subset", None), "aml": ("aml-lmu-sample", r"^([A-Z]+)_")}


@dataclasses.dataclass
class Config:
    dataset: str = field("pbc", "pbc: 320 JPEG 360x363 | aml: 50 RGBA TIFF 400x400 (shared/data).",
                         choices=tuple(sorted(DATASETS)))
    image_size: int = field(224, "Resize to this many pixels.")
    batch_size: int = field(16, "Batch size.")
    epochs: int = field(2, "Epochs per configuration (the first batch of each is not timed).")
    num_threads: int = field(2, "grain reader threads.")
    out_dir: str = field(str(REPO / "results" / "benchmarks"), "Where pipeline_throughput.{json,md} go.")


def _shared_dir() -> pathlib.Path:
    for cand in (os.environ.get("LEUKAX_SHARED_DIR"), REPO.parent / "shared", REPO / "shared"):
        if cand and pathlib.Path(cand, "data").is_dir():
            return pathlib.Path(cand)
    sys.exit("benchmarks/pipeline_throughput.py: shared/data not found (set LEUKAX_SHARED_DIR)")


def time_epoch(source, args, epoch: int, augment=None, warmup: bool = False) -> tuple[int, float]:
    """Returns (images, seconds) for one epoch; with warmup the first batch (compile, threads) is not timed."""
    it = pipeline.batches(source, args.image_size, args.batch_size, epoch=epoch, seed=0, member=0,
                          augment=augment, drop_remainder=True, num_threads=args.num_threads)
    n_img, t = 0, time.perf_counter()
    for step, batch in enumerate(it):
        jax.block_until_ready(batch["image"])
        if warmup and step == 0:
            t = time.perf_counter()
            continue
        n_img += len(batch["label"])
    return n_img, time.perf_counter() - t


def time_all(source, args, augments: dict) -> dict:
    """Returns {name: {"images_per_s", "seconds", "images"}}; configurations alternate epoch by epoch, so
    a change in machine load (shared machine) hits them all alike."""
    totals = {name: [0, 0.0] for name in augments}
    for epoch in range(args.epochs):
        for name, aug in augments.items():
            n, sec = time_epoch(source, args, epoch, aug, warmup=epoch == 0)
            totals[name][0] += n
            totals[name][1] += sec
    return {k: {"images_per_s": round(n / sec, 1), "seconds": round(sec, 2), "images": n}
            for k, (n, sec) in totals.items()}


def run(args: Config) -> dict:
    """Times the pipeline on `args.dataset`; writes <out_dir>/pipeline_throughput.{json,md}."""
    folder, regex = DATASETS[args.dataset]
    root = _shared_dir() / "data" / folder
    with tempfile.TemporaryDirectory() as data_dir:
        t = time.perf_counter()
        builder = get_builder("image_folder", data_dir=data_dir, root=root, label_regex=regex)
        prepare_s = time.perf_counter() - t
        source = builder.as_data_source("train")
        results = time_all(source, args, {
            "none": None,
            "paper1 (affine warp)": pipeline.member_augment(augment.augment_paper1),
            "paper2 (rot90 + flips)": pipeline.member_augment(augment.augment_paper2),
        })
    env = common.environment()
    commit = env["commit"]
    record = {
        "command": common.command_line("benchmarks/pipeline_throughput.py", args),
        "git_commit": commit,
        "device": f"{env['backend']}:{env['device_kind']}; {env['cpu_count']} CPU cores; {env['cpu']}",
        "dataset": f"shared/data/{folder} ({len(source)} images, image_folder builder, array_record)",
        "image_size": args.image_size, "batch_size": args.batch_size, "epochs": args.epochs,
        "num_threads": args.num_threads, "prepare_seconds": round(prepare_s, 2),
        "augmentation": results,
    }
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records.write_json(out / "pipeline_throughput.json", record)
    rows = "\n".join(f"| {k} | {v['images_per_s']} | {v['images']} | {v['seconds']} |" for k, v in results.items())
    (out / "pipeline_throughput.md").write_text(
        f"# Input pipeline throughput\n\nCommand: `{record['command']}`  \nCommit: `{commit}`  \n"
        f"Device: {record['device']}  \nDataset: {record['dataset']}  \n"
        f"Decode + resize to {args.image_size} (PIL bicubic) + batch {args.batch_size}, "
        f"{args.num_threads} grain reader threads, {args.epochs} epochs per configuration (alternating), "
        f"first batch not timed. "
        f"Building the TFDS dataset took {record['prepare_seconds']} s.\n\n"
        f"| augmentation | images/s | images timed | seconds |\n|---|---|---|---|\n{rows}\n")
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    common.main(Config, run)
