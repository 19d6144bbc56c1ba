"""What every experiment and benchmark shares, so that each of them reads as its paper's recipe.

- Configuration: a `@dataclasses.dataclass` Config whose fields are made with `field(default, help)`; every
  field becomes one absl flag of the same name (`define_flags`), `parse_argv` fills a Config from a command
  line without touching the global FLAGS, `main(Config, run)` is the `__main__` entry point, and
  `command_line` writes the command that reproduces a Config.
- Provenance: `git_commit` (the commit, "+uncommitted" when the tree has changes) and `environment`
  (commit, device, backend, versions, cores).
- Splits by protocol (`make_splits`), backbones with a recorded substitution (`load_backbone`), evaluation of
  an ensemble's M×N×K probabilities (`evaluate_probs`) and mean ± std over splits (`mean_std`, `summarize`),
  all with one schema: {"mean", "std", "per_split"}, None where a value is missing.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from leukax import metrics, runtime, uncertainty
from leukax.data.splits import repeated_holdout, stratified_group_kfold
from leukax.models.classifier import count_params
from leukax.pretrained import pretrained_with_source

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ configuration
def field(default, help: str, choices: tuple | None = None):  # noqa: A002 (absl's word)
    """A Config field whose flag has this help text (and, with `choices`, only these values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def define_flags(config_cls, flag_values: flags.FlagValues = flags.FLAGS, module_name: str | None = None) -> None:
    """Defines one absl flag per field of the dataclass `config_cls`: bool, int, float, tuple → list,
    `choices` → enum, anything else (str, None) → string. `module_name` is the module whose `--help` lists them."""
    for f in dataclasses.fields(config_cls):
        d, h, choices = f.default, f.metadata.get("help", f.name), f.metadata.get("choices")
        kw = dict(flag_values=flag_values, module_name=module_name)
        if choices:
            flags.DEFINE_enum(f.name, d, list(choices), h, **kw)
        elif isinstance(d, bool):
            flags.DEFINE_boolean(f.name, d, h, **kw)
        elif isinstance(d, int):
            flags.DEFINE_integer(f.name, d, h, **kw)
        elif isinstance(d, float):
            flags.DEFINE_float(f.name, d, h, **kw)
        elif isinstance(d, tuple):
            flags.DEFINE_list(f.name, [str(v) for v in d], h, **kw)
        else:
            flags.DEFINE_string(f.name, d, h, **kw)


def config_from_flags(config_cls, flag_values: flags.FlagValues = flags.FLAGS):
    """Returns `config_cls` filled from parsed flags; a list flag becomes a tuple of its default's type."""
    kw = {}
    for f in dataclasses.fields(config_cls):
        v = flag_values[f.name].value
        if isinstance(f.default, tuple):
            cast = type(f.default[0]) if f.default else str
            v = tuple(cast(x) for x in v)
        kw[f.name] = v
    return config_cls(**apply_named_config(config_cls, kw, flag_values))


def parse_argv(config_cls, argv: list[str]):
    """Returns `config_cls` from a command line such as ["prog", "--members=2"] (own FlagValues, no globals)."""
    fv = flags.FlagValues()
    define_flags(config_cls, fv)
    fv(argv)
    return config_from_flags(config_cls, fv)


class InputError(ValueError):
    """A user's input cannot work (flag value, data folder, dataset too small for the protocol); one line says why."""

# -------------------------------------------------------------------------------- named configurations
# `--config=<name>` loads experiments/configs/<name>.py (big_vision style): its `get_config()` returns field values
# of ONE experiment's Config, and its EXPERIMENT names that experiment. Precedence, lowest first:
#     Config defaults  <  get_config()  <  flags given on the command line.
# The name stays in the Config's `config` field, so config.json, metrics.json["command"] and the reproducing
# command line record it.
CONFIGS_PACKAGE = "experiments.configs"


def config_names() -> list[str]:
    """Returns the names of the named configurations (the modules of experiments/configs/)."""
    return sorted(p.stem for p in (REPO / "experiments" / "configs").glob("*.py") if not p.stem.startswith("_"))


def experiment_name(config_cls) -> str:
    """Returns the experiment a Config belongs to ("hybrid_gru" for experiments/hybrid_gru.py, also when that
    module runs as __main__)."""
    mod = sys.modules.get(config_cls.__module__)
    return pathlib.Path(getattr(mod, "__file__", None) or config_cls.__module__.replace(".", "/")).stem


def load_named_config(name: str, config_cls) -> dict:
    """Returns the field values of the named configuration `name` for `config_cls`; InputError (one line) when
    the name is unknown, the configuration belongs to another experiment or sets a field the Config lacks."""
    import importlib
    if name not in config_names():
        raise InputError(f"experiments: --config={name!r} is not a named configuration; known: "
                         f"{', '.join(config_names())} (experiments/configs/)")
    module = importlib.import_module(f"{CONFIGS_PACKAGE}.{name}")
    experiment = experiment_name(config_cls)
    if module.EXPERIMENT != experiment:
        raise InputError(f"experiments: --config={name} configures experiments.{module.EXPERIMENT}, not "
                         f"experiments.{experiment}: run python -m experiments.{module.EXPERIMENT} --config={name}")
    values = dict(module.get_config())
    unknown = set(values) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise InputError(f"experiments/configs/{name}.py sets fields that experiments.{experiment}.Config lacks: "
                         f"{sorted(unknown)}")
    return dict(values, config=name)


def apply_named_config(config_cls, kw: dict, flag_values: flags.FlagValues | None = None) -> dict:
    """Returns the field values `kw` (parsed flags) with the named configuration kw["config"] underneath: a
    field whose flag was given on the command line (`flag_values[name].present`) keeps its flag value, every
    other field takes the configuration's value. Without a `config` field or name, `kw` unchanged."""
    name = kw.get("config") or ""
    if not name:
        return kw
    given = {k for k in kw if flag_values is not None and k in flag_values and flag_values[k].present}
    return {**kw, **{k: v for k, v in load_named_config(name, config_cls).items() if k not in given}}


def named_config(config_cls, name: str, **overrides):
    """Returns `config_cls` set to the named configuration `name`, then `overrides` (for tests and notebooks)."""
    return config_cls(**{**load_named_config(name, config_cls), **overrides})



def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (default ~/.cache/leukax/jax_cache, or $JAX_COMPILATION_CACHE_DIR):
    a rerun, another repeat or another backbone with the same shapes loads the compiled trainer from disk
    instead of compiling it again (~10 s per head-mode program on 2 CPU cores). Returns the folder."""
    path = path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(pathlib.Path.home() / ".cache" / "leukax" / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def main(config_cls, run, compilation_cache: bool = True) -> None:
    """The `if __name__ == "__main__"` of an experiment: flags from `config_cls`, then `run(config)`.

    The process settings come first, before any JAX backend starts: the XLA:CPU flags of
    `leukax.runtime.apply_xla_cpu_flags` (a flag already in XLA_FLAGS keeps its value). With
    `compilation_cache` (experiments; benchmarks that time compilation pass False) the persistent
    compilation cache is on (`enable_compilation_cache`).

    A bad flag value, a manual folder with the wrong layout or a dataset too small for the protocol ends the
    program with one line on stderr and exit status 2 (no traceback); experiments check these before any
    feature extraction or compilation."""
    runtime.apply_xla_cpu_flags()
    from leukax.data.builders.base import DatasetError, ManualDownloadError
    define_flags(config_cls, module_name=sys.argv[0])
    define_distributed_flags()

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]} (every setting is a --flag)")
        if compilation_cache:
            enable_compilation_cache()
        try:
            cfg = process_config(config_from_flags(config_cls), init_distributed_from_flags())
            run(cfg)  # returns None: app.run would print and exit 1 on a returned value
        except (InputError, DatasetError, ManualDownloadError) as e:
            print(f"{pathlib.Path(sys.argv[0]).stem}: error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main)


# ---------------------------------------------------------------------------------------------- scale-out
DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The launch settings of JAX's own distributed runtime, shared by every experiment (not part of a Config:
    they say where a run executes, not what it computes)."""
    if "coordinator_address" in flag_values:
        return
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a run over several processes "
                        "(jax.distributed); unset = one process.", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", 1, "Processes in the run (one per host; jax.distributed).",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", 0, "This process's index in [0, num_processes).", flag_values=flag_values)


def init_distributed(coordinator_address: str | None, num_processes: int = 1, process_id: int = 0) -> int:
    """Joins a run of `num_processes` processes with `jax.distributed.initialize` (before any computation);
    returns this process's index. CPU backends exchange collectives through gloo. One process: nothing happens.

    Every process loads the same data and splits and trains the same programs; the ensemble's member axis is
    sharded over the global mesh of all processes' devices (`member_mesh`), so each device trains M/D members,
    and `compiled.fit` gathers the trained members back to every process. With `--feature_cache` on a folder
    every process sees (a shared filesystem), the processes divide the feature extraction (each extracts a
    contiguous range of the images into the same file, `views.stream_view_features`); without it each
    process extracts every image into its own temporary folder."""
    if num_processes <= 1 and not coordinator_address:
        return 0
    if not coordinator_address or not 0 <= process_id < num_processes:
        raise InputError(f"experiments: a run over {num_processes} processes needs --coordinator_address=host:port "
                         f"and 0 <= --process_id < {num_processes} (got {coordinator_address!r}, {process_id})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return jax.process_index()


def init_distributed_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> int:
    return init_distributed(*(flag_values[k].value for k in DISTRIBUTED_FLAGS))


def process_config(cfg, process_index: int):
    """Process 0 writes the run's files; another process (same computation, same numbers) writes its copy to a
    temporary folder. The feature cache stays: the processes share it (`init_distributed`)."""
    if process_index == 0 or not hasattr(cfg, "out_dir"):
        return cfg
    import tempfile
    return dataclasses.replace(cfg, out_dir=tempfile.mkdtemp(prefix=f"leukax_process{process_index}_"))


def gather_rows(local, owner) -> np.ndarray:
    """Returns `local` (n×k) with row i taken from process owner[i]'s `local`: what each process computed for
    the rows it owns, shared with every process (`process_allgather` after a barrier). One process: `local`."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    from leukax import runtime
    runtime.await_all_processes()  # gloo's first collective waits only 30 s for the others
    every = np.asarray(multihost_utils.process_allgather(local))  # P×n×k
    return every[np.asarray(owner), np.arange(len(local))]


def member_mesh(num_members: int):
    """A `Mesh` with axis "members" over every device of every process when there are several and they divide
    `num_members`; else None (one device trains all members)."""
    from jax.sharding import Mesh
    devices = jax.devices()
    if len(devices) <= 1:
        return None
    if num_members % len(devices):
        raise InputError(f"experiments: --members={num_members} is not a multiple of the {len(devices)} devices "
                         "the member axis is sharded over")
    return Mesh(np.array(devices), ("members",))


def command_line(program: str, cfg) -> str:
    """Returns the command that reproduces `cfg`: `python -m <module> --flags` or `python <script.py> --flags`."""
    parts = []
    for k, v in dataclasses.asdict(cfg).items():
        if v is None:
            continue
        v = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
        parts.append(f"--{k}" if v is True else f"--no{k}" if v is False else shlex.quote(f"--{k}={v}"))
    return ("python " if program.endswith(".py") else "python -m ") + program + " " + " ".join(parts)


# --------------------------------------------------------------------------------------------- provenance
def git_commit() -> str:
    """Returns the checked-out commit of this repository, with "+uncommitted" when the tree has changes,
    or "unknown" outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        return "unknown"
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown"
    return head.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def environment() -> dict:
    """Returns the provenance every result records: commit, device, backend, versions, CPU cores, XLA_FLAGS and
    the allocator the process runs with (`leukax.runtime.allocator`)."""
    dev = jax.devices()[0]
    return dict(commit=git_commit(), device=str(dev), device_kind=getattr(dev, "device_kind", ""),
                backend=jax.default_backend(), process_count=jax.process_count(), device_count=jax.device_count(),
                jax=jax.__version__, python=platform.python_version(),
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                allocator=runtime.allocator(),
                argv=" ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (getrusage's ru_maxrss: KiB on Linux)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_history(logdir, tag: str, history: dict) -> None:
    """Writes a trained ensemble's per-epoch curves as TensorBoard scalars under `logdir` (one run per split):
    for every key of `history` (train_loss, train_acc, val_loss = NLL, val_acc; M×E, NaN after a member
    stopped) the mean over the members still training, step = epoch, tag "<key>/<tag>"
    (`tensorboard --logdir <out_dir>/tensorboard` compares splits, backbones and heads).
    Each call writes its own event file: tensorboardX names a file by the second and the host only, so two
    writers to one run in the same second would otherwise overwrite each other."""
    import uuid
    from tensorboardX import SummaryWriter
    with SummaryWriter(str(logdir), flush_secs=5, filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}") as w:
        for key, v in history.items():
            v_me = np.atleast_2d(np.asarray(v, np.float64))
            for epoch in range(v_me.shape[1]):
                col = v_me[:, epoch][np.isfinite(v_me[:, epoch])]
                if len(col):  # TensorBoard's tag alphabet ("efficientnet_lite2 (for efficientnet_b3)" → "..._for_...")
                    name = re.sub(r"_*/_*", "/", re.sub(r"[^A-Za-z0-9_./-]+", "_", f"{key}/{tag}")).strip("_")
                    w.add_scalar(name, float(col.mean()), epoch + 1)


def progress(total: int, desc: str, quiet: bool = False):
    """A progress bar with rate and ETA on stderr for a long phase (tqdm); `quiet` hides it."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------- splits
PROTOCOLS = ("grouped_kfold", "paper_80_20")


def make_splits(protocol: str, labels, groups, class_names, *, folds: int, repeats: int, val_fraction: float,
                seed: int, leaky: bool = False) -> list:
    """Returns the Splits of `protocol`, every one with a grouped validation part (`val_fraction` of all):
    grouped_kfold = stratified k-fold grouped by subject/duplicate, repeated over `repeats` seeds;
    paper_80_20 = 80 % train / 20 % test, grouped, or per image with `leaky` (as the paper did), validation
    `val_fraction` of the 80 % (0.2: the paper's 64/16/20)."""
    if val_fraction <= 0:
        raise InputError("experiments: --val_fraction must be > 0 (early stopping, BO and referral use it)")
    try:
        return _make_splits(protocol, labels, groups, class_names, folds, repeats, val_fraction, seed, leaky)
    except InputError:
        raise
    except ValueError as e:  # e.g. a class with fewer subjects than folds
        raise InputError(f"experiments: cannot split this dataset: {e}") from None


def _make_splits(protocol, labels, groups, class_names, folds, repeats, val_fraction, seed, leaky) -> list:
    if protocol == "grouped_kfold":
        splits = []
        for r in range(repeats):
            for s in stratified_group_kfold(labels, groups, folds, seed + r, val_fraction, class_names):
                s.repeat = r
                splits.append(s)
        return splits
    if protocol == "paper_80_20":
        # Akter et al.'s 80/20 with `val_fraction` of the 80 % for validation: 0.2 gives their 64/16/20.
        name = f"paper 80/20 (validation {val_fraction:g} of the 80 %) " + ("ungrouped-leaky" if leaky else "grouped")
        return repeated_holdout(labels, None if leaky else groups, 0.2, 0.8 * val_fraction, repeats, seed,
                                class_names, protocol=name)
    raise InputError(f"experiments: --protocol must be one of {PROTOCOLS}, got {protocol!r}")


def check_and_save(split, groups, leaky: bool, splits_dir) -> str:
    """Checks that no group (no image when `leaky`) has items in two parts, writes <splits_dir>/<id>.json;
    returns the split's id "r<repeat>_f<fold>"."""
    sid = f"r{split.repeat}_f{split.fold}"
    split.check_disjoint(np.arange(len(groups)) if leaky else groups)
    split.save(pathlib.Path(splits_dir) / f"{sid}.json")
    return sid


# ---------------------------------------------------------------------------------------------- backbones
CPU_KERNELS = ("xla", "native")


def load_backbone(name: str, weights: str, weights_dir, substitute: str = "", seed: int = 0, cpu_kernels: str = "xla"):
    """Returns (module, variables, spec, record): `name` with ImageNet or random weights, or `substitute`
    when its ImageNet weights are missing; `record` says what was used. cpu_kernels: "xla" (default graph) or
    "native" (`leukax.native`'s depthwise kernel; a program's --cpu_kernels)."""
    w = None if weights in ("none", "random", "") else weights
    try:
        module, variables, spec, source = pretrained_with_source(name, weights=w, weights_dir=weights_dir, seed=seed,
                                                                 cpu_kernels=cpu_kernels)
        used, note = name, None
    except FileNotFoundError as e:
        if not substitute:
            raise FileNotFoundError(f"experiments: no ImageNet weights for {name!r} ({e}); pass --weights=none "
                                    "or choose a backbone with offline weights") from e
        module, variables, spec, source = pretrained_with_source(substitute, weights=w, weights_dir=weights_dir,
                                                                 seed=seed, cpu_kernels=cpu_kernels)
        used, note = substitute, f"{name} ImageNet weights not found; {substitute} used in its place"
    record = dict(requested=name, used=used, substitution=note, weights=weights if w else "random init",
                  normalization=spec.normalization, params=count_params(variables), cpu_kernels=cpu_kernels,
                  label=used if used == name else f"{used} (for {name})",
                  **weights_provenance(name, used, source))
    return module, variables, spec, record


def view_feature_file(module, variables, spec, record: dict, ds, size: int, feature_dir, prefix: str, *,
                      views: str = "dihedral", num_affine: int = 0, seed: int = 0, smoothing: str = "none",
                      image_fn=None, part: tuple[int, int] = (0, 1), progress: bool = True, desc: str = "features"):
    """Returns the backbone's frozen V×N×T×C feature maps of every view of every image of `ds` (a
    `leukax.data.load_index` dataset: no pixels in memory) as a bfloat16 `views.FeatureFile` in `feature_dir`,
    extracted batch by batch (resumable, divided over `part`'s processes) unless a file with the same content key
    (network, weights, the dataset's fingerprint, size, views, seed, `smoothing`) is already there. Every study
    that trains heads on frozen features reads them through this one path (hybrid_gru, dev_suite)."""
    from leukax.train import features
    from leukax.train.views import stream_view_features
    key = features.stream_key(module, variables, spec.normalization, ds.fingerprint, size, views, num_affine, seed,
                              "bfloat16", smoothing)
    return stream_view_features(
        module, variables, ds.source, size, spec.normalization,
        pathlib.Path(feature_dir) / f"{prefix}_{record['used']}_{size}_{key[:16]}.npy", views=views,
        num_affine=num_affine, seed=seed, progress=progress, desc=desc, image_fn=image_fn, part=part,
        barrier=runtime.await_all_processes)


def weights_provenance(requested: str, used: str, source: dict) -> dict:
    """Returns {"weights_file", "weights_source", "differs_from_paper"} from the `source` that
    `pretrained_with_source` reports for the network `used`: the file it loaded, where that comes from, and how
    the network that ran differs from the paper's keras.applications `requested` with ImageNet weights."""
    from leukax.weights import registry as weights_registry
    sub = "" if used == requested else f"{used} ran in place of the paper's {requested}. "
    differs = weights_registry.DIFFERS_FROM_KERAS_IMAGENET
    cand, path = source["candidate"], source["file"]
    if cand is not None:
        return dict(weights_file=f"{path.name} ({cand.name}, {cand.hash_type} {cand.hash})",
                    weights_source=cand.url or cand.notes,
                    differs_from_paper=sub + (differs.get(cand.name) or "the keras.applications ImageNet weights"))
    if source["embedded"]:
        return dict(weights_file="mobilenet_v2_1.0_224_no_top.f16.npz (embedded)",
                    weights_source="leukax/weights/embedded/NOTICE", differs_from_paper=sub + differs["embedded"])
    if path is not None:
        return dict(weights_file=str(path), weights_source="a file given by the user",
                    differs_from_paper=sub + "unknown")
    return dict(weights_file=None, weights_source="random initialisation",
                differs_from_paper=sub + "random weights, not ImageNet")


# --------------------------------------------------------------------------------------------- evaluation
def metric_keys(num_classes: int) -> list[str]:
    """The (dotted) keys of metrics.classification_report summarised over splits."""
    if num_classes == 2:
        return ["accuracy", "binary.precision", "binary.recall", "binary.f1", "binary.specificity",
                "binary.roc_auc", "nll", "brier", "ece"]
    return ["accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_specificity", "macro_roc_auc",
            "nll", "brier", "ece"]


REFERRAL_KEYS = ("coverage", "accuracy_retained", "accuracy_referred", "accuracy_all")


def evaluate_probs(labels_val, probs_val_mnk, labels_test, probs_test_mnk, class_names,
                   referral_target: str = "accuracy", referral_value: float = 0.95):
    """Returns (classification report, uncertainty summary, referral report) of an ensemble on the test part;
    the referral threshold on predictive entropy is fitted on the validation part (target "accuracy": the
    largest cut whose retained accuracy reaches `referral_value`; "coverage": keep at least that fraction)."""
    ens_va = uncertainty.deep_ensemble(jnp.asarray(probs_val_mnk))
    ens_te = uncertainty.deep_ensemble(jnp.asarray(probs_test_mnk))
    report = metrics.classification_report(labels_test, np.asarray(ens_te["mean"]), class_names)
    correct_te = np.asarray(ens_te["pred"]) == labels_test
    unc = {k: float(np.mean(ens_te[k])) for k in ("predictive_entropy", "mutual_information", "variance_pred",
                                                   "total_variance", "disagreement")}
    unc["aurc"] = float(uncertainty.aurc(ens_te["predictive_entropy"], jnp.asarray(correct_te)))
    thr = uncertainty.fit_referral_threshold(np.asarray(ens_va["predictive_entropy"]),
                                             np.asarray(ens_va["pred"]) == labels_val, referral_target,
                                             referral_value)
    referral = uncertainty.referral_report(np.asarray(ens_te["predictive_entropy"]), correct_te, thr)
    return report, unc, referral


def _get(report: dict, key: str):
    for part in key.split("."):
        report = report[part]
    return report


def mean_std(reports: list[dict], keys) -> dict:
    """Returns {key: {"mean", "std", "per_split"}} over reports (dotted keys). A missing value (None) is
    None in per_split and left out of mean and std; mean and std are None when every value is missing."""
    out = {}
    for key in keys:
        vals = np.asarray([np.nan if _get(r, key) is None else _get(r, key) for r in reports], float)
        ok = not np.all(np.isnan(vals))
        out[key] = {"mean": float(np.nanmean(vals)) if ok else None, "std": float(np.nanstd(vals)) if ok else None,
                    "per_split": [None if np.isnan(v) else float(v) for v in vals]}
    return out


def summarize(reports: list[dict], uncs: list[dict], referrals: list[dict], keys) -> dict:
    """Returns the per-model summary every experiment writes: test_mean_std, uncertainty_mean_std,
    referral_mean_std and referral_per_split."""
    return dict(test_mean_std=mean_std(reports, keys), uncertainty_mean_std=mean_std(uncs, list(uncs[0])),
                referral_mean_std=mean_std(referrals, REFERRAL_KEYS), referral_per_split=referrals)


def calibrate(labels_val, probs_val_mnk, labels_test, probs_test_mnk, prior_scale: float | None = None
              ) -> tuple[dict, np.ndarray]:
    """Temperature-scales the ensemble mean (T fitted on the validation part, `leukax.calibration`; with
    prior_scale σ > 0 the MAP T under log T ~ N(0, σ²), None: the programs' `calibration.PRIOR_SCALE`); returns
    ({"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "brier_before", "brier_after"} on the
    test part, calibrated test probabilities N×K)."""
    from leukax import calibration
    mean_va = jnp.asarray(np.mean(probs_val_mnk, 0))
    mean_te = jnp.asarray(np.mean(probs_test_mnk, 0))
    prior_scale = calibration.PRIOR_SCALE if prior_scale is None else prior_scale
    t = calibration.fit_temperature(jnp.asarray(labels_val, jnp.int32), mean_va, prior_scale)
    cal_te = calibration.apply_temperature(mean_te, t)
    y = jnp.asarray(labels_test, jnp.int32)
    out = {"temperature": float(t)}
    for name, fn in (("ece", metrics.ece), ("nll", metrics.nll), ("brier", metrics.brier)):
        out[f"{name}_before"], out[f"{name}_after"] = float(fn(y, mean_te)), float(fn(y, cal_te))
    return out, np.asarray(cal_te)


CALIBRATION_KEYS = ("temperature", "ece_before", "ece_after", "nll_before", "nll_after", "brier_before", "brier_after")
