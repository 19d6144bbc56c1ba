"""Importing leukax changes nothing in the process (issue 18): every module under `leukax` (the opt-in
`leukax.native` too) is imported in a fresh interpreter whose HOME is an empty folder, after `import jax`
(whose own import sets two variables), and then

- os.environ is what it was (XLA_FLAGS in particular stays unset);
- no process was started (audit hook on subprocess.Popen, os.exec, os.posix_spawn, os.spawn, os.system, os.fork)
  and no shared library was loaded through ctypes from leukax or HOME (no native build, no block cache);
- nothing was written under HOME;
- after a JAX computation, the `posix_memalign` and `free` entries of jaxlib's libjax_common.so global offset
  table (what the deleted block cache rewrote) still point to libc's functions.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(r'''
    import ctypes, importlib, json, os, pathlib, pkgutil, struct, sys, time

    EVENTS = ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.fork", "os.forkpty",
              "ctypes.dlopen")
    events = []
    import jax  # its own import sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY: the baseline is after it
    sys.addaudithook(lambda name, args: events.append([name, repr(args)[:300]]) if name in EVENTS else None)
    env_before = dict(os.environ)
    t0 = time.perf_counter()
    import leukax
    modules = ["leukax"]
    for info in pkgutil.walk_packages(leukax.__path__, "leukax."):
        importlib.import_module(info.name)
        modules.append(info.name)
    import_s = time.perf_counter() - t0
    env_after = dict(os.environ)

    def got_slots(lib_substring, names):
        """{name: [value of each JUMP_SLOT / GLOB_DAT slot]} of the loaded object whose path has lib_substring."""
        rows = [m.split() for m in pathlib.Path("/proc/self/maps").read_text().splitlines()]
        rows = [m for m in rows if len(m) >= 6 and lib_substring in m[5]]
        base = min(int(m[0].split("-")[0], 16) for m in rows if int(m[2], 16) == 0)
        data = pathlib.Path(rows[0][5]).read_bytes()
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        cstr = lambda o: data[o:data.index(b"\0", o)].decode()
        by = {cstr(secs[shstrndx][4] + s[0]): s for s in secs}
        symname = lambda i: cstr(by[".dynstr"][4] + struct.unpack_from("<I", data, by[".dynsym"][4] + 24 * i)[0])
        out = {n: [] for n in names}
        for sec in (".rela.plt", ".rela.dyn"):
            s = by.get(sec)
            for off in range(s[4], s[4] + s[5], 24) if s else ():
                r_offset, r_info, _ = struct.unpack_from("<QQq", data, off)
                if r_info & 0xffffffff in (6, 7) and symname(r_info >> 32) in out:  # GLOB_DAT, JUMP_SLOT
                    out[symname(r_info >> 32)].append(ctypes.c_void_p.from_address(base + r_offset).value)
        return out

    import jax.numpy as jnp
    assert float(jnp.ones((2048, 1024)).sum()) == 2048 * 1024  # XLA:CPU allocates and frees its buffers
    libc = ctypes.CDLL("libc.so.6")
    libc_addr = {n: ctypes.cast(getattr(libc, n), ctypes.c_void_p).value for n in ("posix_memalign", "free")}
    slots = got_slots("libjax_common", tuple(libc_addr))
    print(json.dumps({"modules": modules, "import_s": import_s, "events": events,
                      "env_changed": sorted(k for k in set(env_before) | set(env_after)
                                            if env_before.get(k) != env_after.get(k)),
                      "xla_flags": env_after.get("XLA_FLAGS"),
                      "got": {n: [v == libc_addr[n] for v in vals] for n, vals in slots.items()},
                      "default_posix_memalign_is_libc": ctypes.cast(ctypes.CDLL(None).posix_memalign,
                                                                    ctypes.c_void_p).value == libc_addr["posix_memalign"]}))
''')


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    home = tmp_path_factory.mktemp("empty_home")
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "XDG_CACHE_HOME", "JAX_COMPILATION_CACHE_DIR", "LD_PRELOAD")}
    env.update(HOME=str(home), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=home, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"home": home, **json.loads(proc.stdout.strip().splitlines()[-1])}


def test_every_module_imported(child):
    assert {"leukax.native", "leukax.native.depthwise", "leukax.native.build", "leukax.runtime",
            "leukax.train.compiled", "leukax.models.layers", "leukax.predict"} <= set(child["modules"])
    assert all(m.startswith("leukax") for m in child["modules"]) and len(child["modules"]) > 40


def test_environment_unchanged(child):
    assert child["env_changed"] == [] and child["xla_flags"] is None


def test_no_process_started_and_no_library_loaded_by_ctypes(child):
    started = [e for e in child["events"] if e[0] != "ctypes.dlopen"]
    assert started == []
    loaded = [e for e in child["events"] if e[0] == "ctypes.dlopen" and ("leukax" in e[1] or str(child["home"]) in e[1])]
    assert loaded == []


def test_nothing_written_under_home(child):
    assert sorted(str(p.relative_to(child["home"])) for p in child["home"].rglob("*")) == []


def test_allocator_entries_of_jaxlib_still_libc(child):
    got = child["got"]
    assert got["posix_memalign"] and got["free"], got  # the relocations were found
    assert all(got["posix_memalign"]) and all(got["free"]), got
    assert child["default_posix_memalign_is_libc"]
