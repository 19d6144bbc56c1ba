"""Builds leukax's native sources (`leukax/native/*.cc`) with g++ when first asked, and caches the libraries.

Nothing here runs at import: `build` is called by `leukax.native.depthwise.available()`, which only a model
built with ``depthwise_impl="native"`` (``--cpu_kernels=native``) reaches. A library lands in ``cache_dir``
(an argument; default ``$XDG_CACHE_HOME/leukax/native`` or ``~/.cache/leukax/native``), named
``<source stem>-<key>.so`` where the key hashes the source, the compiler and its flags, the jaxlib version and
the CPU's feature flags (the build uses ``-march=native``). A file lock keeps concurrent processes
(pytest-xdist) from building the same library twice.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

SOURCES = pathlib.Path(__file__).resolve().parent
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def default_cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/leukax/native, else ~/.cache/leukax/native."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "leukax" / "native"


def cpu_flags() -> str:
    """The CPU's feature-flags line of /proc/cpuinfo (or the machine name where there is none)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def build_key(source: pathlib.Path, cxx: str, flags: tuple[str, ...] = CXXFLAGS) -> str:
    """sha256 over source, compiler, flags, jaxlib version and CPU flags (first 16 hex digits)."""
    import jaxlib
    h = hashlib.sha256()
    for part in (source.read_bytes(), cxx.encode(), " ".join(flags).encode(), jaxlib.__version__.encode(),
                 cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build(source: pathlib.Path, cxx: str, includes: tuple[str, ...] = (), libs: tuple[str, ...] = (),
          cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Compiles `source` (if not cached in `cache_dir`, default `default_cache_dir()`) and returns the .so path.
    Raises RuntimeError on failure."""
    exe = shutil.which(cxx)
    if exe is None:
        raise RuntimeError(f"C++ compiler {cxx!r} not found")
    out_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = (*CXXFLAGS, *(f"-I{i}" for i in includes))
    so = out_dir / f"{source.stem}-{build_key(source, cxx, flags + libs)}.so"
    if so.exists():
        return so
    import fcntl
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if so.exists():  # another process built it while we waited
            return so
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [exe, *flags, str(source), "-o", tmp, *libs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {' | '.join(tail)}")
        os.replace(tmp, so)
    return so
