"""experiments/common.py: config ↔ flags, provenance, one mean ± std schema, and no experiment importing another."""
import ast
import dataclasses
import pathlib
import re

import numpy as np
import pytest
from absl import flags

from experiments import common
from experiments.common import field

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class _Config:
    name: str = field("a", "A string.")
    sizes: tuple = field((3, 5), "Integers.")
    rate: float = field(0.5, "A float.")
    fast: bool = field(False, "A switch.")
    path: str | None = field(None, "Optional.")
    axis: str = field("vmap", "One of three.", choices=("vmap", "map", "sequential"))


def test_flags_from_dataclass_round_trip():
    cfg = common.parse_argv(_Config, ["prog", "--sizes=1,2,4", "--fast", "--axis=map", "--path=/x"])
    assert cfg == _Config(sizes=(1, 2, 4), fast=True, axis="map", path="/x")
    assert common.parse_argv(_Config, ["prog"]) == _Config()
    argv = common.command_line("benchmarks/x.py", cfg).split()
    assert argv[:2] == ["python", "benchmarks/x.py"]
    assert common.parse_argv(_Config, ["prog", *argv[2:]]) == cfg
    with pytest.raises(flags.IllegalFlagValueError):
        common.parse_argv(_Config, ["prog", "--axis=pmap"])
    fv = flags.FlagValues()
    common.define_flags(_Config, fv)
    assert fv["rate"].help == "A float." and fv["sizes"].help == "Integers."


def test_mean_std_one_schema_none_for_missing():
    reports = [{"a": 1.0, "b": {"c": None}}, {"a": 3.0, "b": {"c": None}}, {"a": None, "b": {"c": None}}]
    out = common.mean_std(reports, ["a", "b.c"])
    assert out["a"] == {"mean": 2.0, "std": 1.0, "per_split": [1.0, 3.0, None]}
    assert out["b.c"] == {"mean": None, "std": None, "per_split": [None, None, None]}


def test_git_commit_has_dirty_marker():
    commit = common.git_commit()
    assert commit == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+uncommitted)?", commit)
    env = common.environment()
    assert env["commit"] == commit and {"device", "backend", "jax", "python", "cpu_count"} <= set(env)
    assert {"name", "library"} <= set(env["allocator"]) and "xla_flags" in env


def test_splits_by_protocol():
    labels = np.repeat([0, 1], 20)
    groups = np.arange(40) // 2
    kfold = common.make_splits("grouped_kfold", labels, groups, ["a", "b"], folds=4, repeats=2, val_fraction=0.2,
                               seed=0)
    assert [(s.repeat, s.fold) for s in kfold] == [(r, f) for r in range(2) for f in range(4)]
    tested = np.concatenate([s.test for s in kfold if s.repeat == 0])
    assert sorted(tested) == list(range(40))
    for s in kfold:
        s.check_disjoint(groups)
    holdout = common.make_splits("paper_80_20", labels, groups, ["a", "b"], folds=0, repeats=1, val_fraction=0.2,
                                 seed=0, leaky=True)
    assert len(holdout) == 1 and "ungrouped-leaky" in holdout[0].protocol
    with pytest.raises(ValueError, match="protocol"):
        common.make_splits("random", labels, groups, ["a", "b"], folds=2, repeats=1, val_fraction=0.2, seed=0)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def _has_main(path: pathlib.Path) -> bool:
    return any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
               for node in ast.parse(path.read_text()).body)


def test_no_experiment_imports_another():
    """An experiment is a module of experiments/ with a __main__ entry; no module there imports one (helper
    modules of a single experiment, like common.py, may be imported)."""
    modules = {p.stem: p for p in (REPO / "experiments").glob("*.py")}
    entries = {f"experiments.{n}" for n, p in modules.items() if _has_main(p)}
    assert {"experiments.hybrid_gru", "experiments.feature_fusion", "experiments.quickstart"} <= entries
    for name, path in modules.items():
        assert not _imports(path) & entries, name


def test_every_dependency_is_imported():
    """Each run-time dependency of pyproject.toml is imported by leukax, experiments or benchmarks."""
    import importlib.metadata
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    dists = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    provides: dict[str, set] = {}
    for module, names in importlib.metadata.packages_distributions().items():
        for name in names:
            provides.setdefault(name.lower().replace("_", "-"), set()).add(module)
    imported = set()
    for folder in ("leukax", "experiments", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            imported |= {name.split(".")[0] for name in _imports(path)}
    unused = sorted(d for d in dists if not provides.get(d, set()) & imported)
    assert not unused, f"pyproject.toml dependencies never imported: {unused}"


def test_main_applies_the_xla_cpu_flags_before_the_backend_starts():
    """`common.main` (every experiment's and benchmark's entry point) sets the XLA:CPU flags of
    `leukax.runtime` before any JAX backend starts, after `import jax` (the experiments import it at the top);
    a value the user gave in XLA_FLAGS wins."""
    import json
    import os
    import subprocess
    import sys
    code = ("import dataclasses, json, os\n"
            "from experiments import common\n"
            "from jax._src import xla_bridge\n"
            "@dataclasses.dataclass\n"
            "class Config:\n"
            "    x: int = common.field(0, 'unused')\n"
            "def run(cfg):\n"
            "    started = xla_bridge.backends_are_initialized()\n"
            "    import jax.numpy as jnp; float(jnp.ones(3).sum())\n"
            "    print(json.dumps([os.environ.get('XLA_FLAGS', ''), started]))\n"
            "common.main(Config, run, compilation_cache=False)\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))

    def flags_seen(**extra):
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        return json.loads(out)

    xla_flags, started = flags_seen()
    assert not started
    assert xla_flags.split() == ["--xla_cpu_enable_concurrency_optimized_scheduler=false",
                                 "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]
    xla_flags, _ = flags_seen(XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=true")
    assert xla_flags.split() == ["--xla_cpu_enable_concurrency_optimized_scheduler=true",
                                 "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]

