"""Finetune mode through grain: does the image pipeline keep up with the training step? (issue 19, item 3)

  python benchmarks/finetune_stream.py            (writes results/benchmarks/finetune_stream.{json,md})

On the PBC subset (320 JPEG cells, image_folder builder, array_record), MobileNetV2 (random init: speed does not
depend on the weights) + GRU head finetuned at `--image_size` with M members and batch B per member:
- pipeline alone: M×B-image steps produced by `finetune.ImageStream` (decode JPEG, resize, the same member
  orders the trainer uses), nothing consuming them;
- training in memory: the same epoch with every image already decoded in an array (what the step consumes);
- training streamed: the same epoch reading its images through the ImageStream (what a user runs).
Each is timed over `--epochs` epochs after one warm-up epoch (compilation, thread start); the ratio pipeline /
in-memory must be ≥ 2 (issue 19's target), and streamed ≈ in-memory means the pipeline is off the critical path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from experiments import common
from experiments.common import field
from leukax import augment, records
from leukax.data import load_arrays, load_index
from leukax.models.classifier import Classifier
from leukax.models.heads import make_head
from leukax.train import finetune

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    image_size: int = field(224, "Input size in pixels.")
    members: int = field(3, "Members M.")
    batch_size: int = field(16, "Batch B per member.")
    images: int = field(96, "Training images per epoch (the first of the PBC subset).")
    epochs: int = field(2, "Timed epochs per variant (after one warm-up epoch).")
    num_threads: int = field(2, "grain reader threads.")
    shared_dir: str = field(str(REPO.parent / "shared"), "The shared folder (data/pbc-subset).")
    out_dir: str = field(str(REPO / "results" / "benchmarks"), "Where finetune_stream.{json,md} go.")


def _timed_epochs(train: finetune.Train, epochs: int) -> float:
    """Seconds of `epochs` epochs after a warm-up epoch."""
    state = train.fit(until_epoch=1)
    t = time.perf_counter()
    train.fit(state=state, until_epoch=1 + epochs)
    return time.perf_counter() - t


def run(args: Config) -> dict:
    env = common.environment()
    pbc = pathlib.Path(args.shared_dir) / "data" / "pbc-subset"
    if not pbc.is_dir():
        sys.exit(f"benchmarks/finetune_stream.py: {pbc} not found (--shared_dir)")
    with tempfile.TemporaryDirectory() as data_dir:
        ds = load_index("pbc", data_dir=data_dir, manual_dir=str(pbc))
        idx = np.random.default_rng(0).permutation(len(ds.labels))[:args.images]
        y = np.asarray(ds.labels, np.int32)[idx]
        t = time.perf_counter()
        images = load_arrays("pbc", args.image_size, data_dir=data_dir, manual_dir=str(pbc), cache=False).images[idx]
        decode_all_s = time.perf_counter() - t
        stream = finetune.ImageStream(ds.source, idx, args.image_size, num_threads=args.num_threads)
        module, variables, spec, _ = common.load_backbone("mobilenet_v2", "none", None, "", 0)
        model = Classifier(module, make_head("gru", len(ds.class_names), units=128, hidden=128))
        cfg = finetune.TrainConfig(num_members=args.members, batch_size=args.batch_size, num_epochs=1 + args.epochs,
                                   normalization=spec.normalization, learning_rate=1e-4, seed=0)
        steps = args.images // args.batch_size
        step_images = steps * args.batch_size * args.members * args.epochs

        # pipeline alone: the same member orders as the trainer, nothing consuming the batches
        keys = finetune.init(finetune.Spec(cfg, model), images[:1]).data_key
        list(finetune._stream_epoch_batches(stream, np.asarray(finetune.permutations(keys, 0, len(idx))),
                                            args.batch_size))  # warm-up: threads, file handles
        t = time.perf_counter()
        for e in range(1, 1 + args.epochs):
            perm = np.asarray(finetune.permutations(keys, e, len(idx)))
            for _ in finetune._stream_epoch_batches(stream, perm, args.batch_size):
                pass
        pipeline_s = time.perf_counter() - t
        aug = augment.augment_paper1
        memory_s = _timed_epochs(finetune.make_train(cfg, model, (images, y), augment_fn=aug), args.epochs)
        streamed_s = _timed_epochs(finetune.make_train(cfg, model, (stream, y), augment_fn=aug), args.epochs)
    rates = {"pipeline alone (ImageStream)": step_images / pipeline_s,
             "training, images in memory": step_images / memory_s,
             "training, images streamed": step_images / streamed_s}
    record = dict(command=common.command_line("benchmarks/finetune_stream.py", args), commit=env["commit"],
                  device=f"{env['backend']}:{env['device_kind']}; {env['cpu_count']} CPU cores; {env['cpu']}",
                  allocator=env["allocator"], date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  load_average_1min=os.getloadavg()[0],
                  dataset=f"PBC subset (shared/data/pbc-subset), {args.images} of 320 JPEG 360x363 cells",
                  setup=dict(backbone="mobilenet_v2 (random init) + GRU(128)", image_size=args.image_size,
                             members=args.members, batch_per_member=args.batch_size, augmentation="augment_paper1",
                             num_threads=args.num_threads, timed_epochs=args.epochs, images_per_variant=step_images),
                  images_per_s={k: round(v, 1) for k, v in rates.items()},
                  pipeline_over_consumption=round(rates["pipeline alone (ImageStream)"] /
                                                  rates["training, images in memory"], 1),
                  streamed_over_memory=round(rates["training, images streamed"] / rates["training, images in memory"], 3),
                  decode_all_in_memory_s=round(decode_all_s, 1), peak_rss_mb=round(common.peak_rss_mb(), 1))
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records.write_json(out / "finetune_stream.json", record)
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in rates.items())
    (out / "finetune_stream.md").write_text(
        f"# Finetune mode through grain: pipeline vs training step\n\nCommand: `{record['command']}`  \n"
        f"Commit: `{record['commit']}`  \nDevice: {record['device']}; load average at the end "
        f"{record['load_average_1min']:.1f}  \nDate: {record['date']}  \nData: {record['dataset']}  \n"
        f"Setup: {json.dumps(record['setup'])}  \nPeak RSS of the benchmark process: "
        f"{record['peak_rss_mb'] / 1e3:.2f} GB\n\n| what | images/s |\n|---|---|\n{rows}\n\n"
        f"Pipeline / consumption: **{record['pipeline_over_consumption']}×** (issue 19's target: ≥ 2×). Streamed / "
        f"in-memory training: {record['streamed_over_memory']}.\n")
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    common.main(Config, run)
