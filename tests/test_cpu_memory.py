"""`import leukax` installs the block cache for XLA:CPU's buffers (leukax/cpu_memory.py, csrc/block_cache.cc):
a program with a 32 MB temporary per call faults no fresh pages on most later calls, while with
LEUKAX_MALLOC=system glibc maps and unmaps the temporary every call (at least 8,192 new 4 KiB pages each)."""
import json
import os
import subprocess
import sys

import pytest

from leukax import cpu_memory

PROGRAM = r"""
import json, resource, leukax, jax, jax.numpy as jnp
from leukax import cpu_memory
k = jnp.ones((3, 3, 16, 16), jnp.float32) / 144
f = jax.jit(lambda x: jax.nn.relu(jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).sum())  # a 32 MiB temporary
x = jnp.ones((8, 256, 256, 16), jnp.float32)
ref = float(f(x))
f(x).block_until_ready()
faults = []
for _ in range(6):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert float(f(x)) == ref
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
del x
print(json.dumps({"faults": faults, "value": ref, **cpu_memory.status()}))
"""


def _run(mode):
    env = {k: v for k, v in os.environ.items() if k != "LEUKAX_MALLOC"}
    if mode:
        env["LEUKAX_MALLOC"] = mode
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_import_installs_the_block_cache_and_system_opts_out():
    cached, system = _run(None), _run("system")
    assert cached["installed"] and cached["slots"] >= 2, cached
    assert not system["installed"] and system["reason"] == "LEUKAX_MALLOC=system", system
    assert cached["value"] == system["value"]
    pages = 8 * 256 * 256 * 16 * 4 // 4096
    assert min(system["faults"]) >= pages, system       # fresh pages every call
    # the same pages again; a call may still carve a second block when it starts before the previous call's
    # buffer is returned (XLA frees it asynchronously), seen once in a loaded test run
    assert sum(f < pages // 8 for f in cached["faults"]) >= 4, cached
    assert cached["hits"] >= 6 and cached["live_bytes"] == 0, cached  # reused, and returned once x is gone


def test_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("LEUKAX_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="cache"):
        cpu_memory.configure_from_env()


def test_missing_compiler_leaves_glibc(tmp_path):
    """Without a compiler the import still works, nothing is patched, and status() says why."""
    code = ("import json, leukax; from leukax import cpu_memory; import jax.numpy as jnp; "
            "assert float(jnp.ones((4096, 1024)).sum()) == 4194304.0; print(json.dumps(cpu_memory.status()))")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), LEUKAX_FFI_CACHE=str(tmp_path))
    env.pop("LEUKAX_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert not status["installed"] and "not found" in status["reason"], status


def test_import_sets_the_xla_cpu_flags_and_keeps_the_users():
    """`import leukax` adds the scheduler and YNNPACK-convolution flags to XLA_FLAGS; a user's own setting wins."""
    code = "import os, leukax; print(os.environ['XLA_FLAGS'])"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    flags = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=120).stdout.split()
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in flags, flags
    assert "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" in flags, flags
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    flags = subprocess.run([sys.executable, "-c", code], env=dict(env, XLA_FLAGS=mine), capture_output=True,
                           text=True, timeout=120).stdout.split()
    assert mine in flags and "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" not in flags, flags
