"""leukax.runtime: the XLA:CPU flags that programs apply (overridable, read by XLA when the backend starts), the
once-per-process warning of the compiled trainer about the deadlock-prone scheduler, and the allocator record."""
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

from leukax import runtime
from leukax.models.heads import make_head
from leukax.train import compiled

REPO = pathlib.Path(__file__).resolve().parents[1]
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
SCHED, YNN = runtime.XLA_CPU_FLAGS


def test_apply_appends_missing_flags_and_keeps_the_users():
    env = {}
    assert runtime.apply_xla_cpu_flags(env).split() == [f"{SCHED[0]}=false", f"{YNN[0]}=-individual_convolution"]
    assert runtime.apply_xla_cpu_flags(env) == env["XLA_FLAGS"]  # idempotent: nothing added twice
    env = {"XLA_FLAGS": f"--xla_dump_to=/tmp/x {SCHED[0]}=true"}
    assert runtime.apply_xla_cpu_flags(env).split() == ["--xla_dump_to=/tmp/x", f"{SCHED[0]}=true",
                                                        f"{YNN[0]}=-individual_convolution"]
    assert runtime.flag_value(SCHED[0], f"{SCHED[0]}=false {SCHED[0]}") == "true"  # the last one counts
    assert runtime.flag_value(SCHED[0], "--xla_cpu_enable_concurrency_optimized_scheduler_x=1") is None
    assert runtime.deadlock_prone("") and runtime.deadlock_prone(f"{SCHED[0]}=true")
    assert not runtime.deadlock_prone(f"{SCHED[0]}=false")


def test_flags_set_after_import_jax_reach_the_backend(tmp_path):
    """JAX starts its backends lazily, so XLA_FLAGS set after `import jax` (as `common.main` does) is read: an
    added --xla_dump_to makes the first computation dump its HLO there."""
    dump = tmp_path / "dump"
    code = ("import os, jax, jax.numpy as jnp\n"
            "from leukax import runtime\n"
            f"os.environ['XLA_FLAGS'] = '--xla_dump_to={dump}'\n"
            "runtime.apply_xla_cpu_flags()\n"
            "print(float(jax.jit(lambda x: x * 2)(jnp.ones(3)).sum()))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "6.0"
    assert any(dump.iterdir()), "XLA did not read XLA_FLAGS set after import jax"


def test_apply_after_the_backend_started_warns():
    import jax.numpy as jnp
    float(jnp.ones(2).sum())  # the backend is up in this process
    with pytest.warns(UserWarning, match="already started"):
        runtime.apply_xla_cpu_flags({})


def _make_train(members=2):
    compiled.make_train.cache_clear()  # make_train is cached per Recipe: run its body every time here
    return compiled.make_train(compiled.Recipe(num_members=members, num_epochs=1), make_head("linear", 2), 2)


def test_compiled_trainer_warns_once_when_the_scheduler_is_on(monkeypatch):
    monkeypatch.setitem(runtime._warned, "scheduler", False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _make_train(2)
        _make_train(3)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and SCHED[0] in str(w.message)]
    assert len(msgs) == 1 and f"XLA_FLAGS={SCHED[0]}=false" in msgs[0], msgs


def test_compiled_trainer_is_silent_when_the_scheduler_is_off(monkeypatch):
    monkeypatch.setitem(runtime._warned, "scheduler", False)
    monkeypatch.setenv("XLA_FLAGS", f"{SCHED[0]}=false")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _make_train()
    assert not [w for w in caught if SCHED[0] in str(w.message)]


def test_allocator_from_maps(tmp_path, monkeypatch):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 r-xp 00000000 fd:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
                    "7f20-7f30 r-xp 00000000 fd:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n7f40-7f50 rw-p 0 0 0\n")
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:-1")
    a = runtime.allocator(str(maps))
    assert a["name"] == "jemalloc" and a["library"].endswith("libjemalloc.so.2") and a["MALLOC_CONF"] == "dirty_decay_ms:-1"
    maps.write_text("7f20-7f30 r-xp 00000000 fd:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert runtime.allocator(str(maps))["name"] == "glibc"


def test_allocator_of_a_real_process():
    """A plain process runs on glibc; with libjemalloc2 installed (apt-get install libjemalloc2; CI's machine
    may lack it, then only the glibc half runs) a preloaded jemalloc is seen in /proc/self/maps."""
    code = "import json; from leukax import runtime; print(json.dumps(runtime.allocator()))"
    env = {k: v for k, v in os.environ.items() if k not in runtime.ALLOCATOR_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, check=True).stdout
    assert '"name": "glibc"' in out
    if pathlib.Path(JEMALLOC).exists():
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, LD_PRELOAD=JEMALLOC, PYTHONPATH=str(REPO)),
                             capture_output=True, text=True, check=True).stdout
        assert '"name": "jemalloc"' in out and "LD_PRELOAD" in out
