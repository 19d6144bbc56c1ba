"""Native CPU depthwise convolution through the XLA FFI (`leukax/native/depthwise.cc`), opt-in.

    y[b,o,p,c] = Σ_ij xpad[b, o·sh + i, p·sw + j, c] · k[i,j,0,c]     (xpad: x zero-padded by pads)

with a custom VJP whose input gradient dx[b,h,w,c] = Σ_ij g[b, (h+plo_h−i)/sh, (w+plo_w−j)/sw, c] · k[i,j,0,c]
(exact divisions only) and kernel gradient dk[i,j,0,c] = Σ_bop xpad[b, o·sh+i, p·sw+j, c] · g[b,o,p,c] are two
more handlers. float32 only; `layers.depthwise_conv(..., impl="native")` resolves the padding and runs the
shift path for other dtypes or negative pads.

Chosen only explicitly: ``depthwise_impl="native"`` on a backbone, ``--cpu_kernels=native`` in the programs.
The shared library is compiled with g++ (``$CXX``, or `CXX` here) when `available()` is first called, into
`CACHE_DIR` (None: `leukax.native.build.default_cache_dir()`), named by a hash of the source, the compiler and
its flags, the jaxlib version and the CPU's feature flags (the build uses ``-march=native``); a file lock keeps
concurrent processes (pytest-xdist) from building it twice. When the compiler is missing, the build fails or
the library does not load, `available()` is False with `unavailable_reason()`, and a native call raises.

Under `jax.vmap` the calls use ``vmap_method="broadcast_all"``: the handlers take any leading dimensions as
independent problems, so an ensemble's members run in one call (3 members × 8 × 56×56×144, forward and
backward, one core: 51 ms median against 56 ms with "sequential").

Measured gain over the default pure-XLA ("shift") path: results/benchmarks/README.md.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from leukax.native import build as native_build

log = logging.getLogger(__name__)

SOURCE = native_build.SOURCES / "depthwise.cc"
CXX: str | None = None        # None: $CXX, else g++
CACHE_DIR: str | None = None  # None: native_build.default_cache_dir()
TARGETS = {"forward": "LeukaxDepthwiseForward", "input_grad": "LeukaxDepthwiseInputGrad",
           "kernel_grad": "LeukaxDepthwiseKernelGrad", "pool_threads": "LeukaxPoolThreads"}
_PREFIX = "leukax_depthwise_"
VMAP_METHOD = "broadcast_all"  # one call over all mapped problems (see the module docstring)

_state: dict = {"ok": None, "reason": "", "lib": None}


def build(cxx: str | None = None, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Compiles the handlers (if not cached; `leukax.native.build`) and returns the .so path. Raises
    RuntimeError on failure."""
    return native_build.build(SOURCE, cxx or CXX or os.environ.get("CXX", "g++"),
                              includes=(jax.ffi.include_dir(),), cache_dir=cache_dir or CACHE_DIR)


def _load_and_register(cxx: str | None = None) -> ctypes.CDLL:
    lib = ctypes.cdll.LoadLibrary(str(build(cxx)))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(_PREFIX + name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


def available() -> bool:
    """True when the handlers are built, loaded and registered (tried once per process; see `reset`)."""
    if _state["ok"] is None:
        try:
            _state["lib"] = _load_and_register()
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001  (any failure: not available, and why)
            _state["ok"], _state["reason"] = False, f"{type(e).__name__}: {e}"
            log.warning("leukax native depthwise unavailable: %s", _state["reason"])
    return _state["ok"]


def unavailable_reason() -> str:
    """Why `available()` is False ('' otherwise or before it was called)."""
    return _state["reason"]


def reset() -> None:
    """Forgets the outcome of `available()` so the next call tries again (tests). Registered targets stay."""
    _state.update(ok=None, reason="", lib=None)


def pool_threads() -> int:
    """Threads of XLA's CPU intra-op pool as a handler sees them (the kernels split their rows over them)."""
    if not available():
        raise RuntimeError(unavailable_reason())
    call = jax.ffi.ffi_call(_PREFIX + "pool_threads", jax.ShapeDtypeStruct((1,), jnp.int32))
    return int(jax.jit(call)()[0])


def _call(name, out_shape, a, b, strides, pads):
    call = jax.ffi.ffi_call(_PREFIX + name, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method=VMAP_METHOD)
    return call(a, b, sh=np.int64(strides[0]), sw=np.int64(strides[1]),
                ph=np.int64(pads[0][0]), pw=np.int64(pads[1][0]))


def _out_hw(hw, kernel_hw, strides, pads):
    return tuple((hw[d] + pads[d][0] + pads[d][1] - kernel_hw[d]) // strides[d] + 1 for d in range(2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x_bhwc, kernel_hw1c, strides, pads):
    """y = depthwise(x, k) with pads ((lo_h, hi_h), (lo_w, hi_w)); see the module docstring."""
    return _depthwise_fwd(x_bhwc, kernel_hw1c, strides, pads)[0]


def _depthwise_fwd(x_bhwc, kernel_hw1c, strides, pads):
    b, h, w, c = x_bhwc.shape
    ho, wo = _out_hw((h, w), kernel_hw1c.shape[:2], strides, pads)
    return _call("forward", (b, ho, wo, c), x_bhwc, kernel_hw1c, strides, pads), (x_bhwc, kernel_hw1c)


def _depthwise_bwd(strides, pads, res, g_bhwc):
    x_bhwc, kernel_hw1c = res
    dx_bhwc = _call("input_grad", x_bhwc.shape, g_bhwc, kernel_hw1c, strides, pads)
    dk_hw1c = _call("kernel_grad", kernel_hw1c.shape, x_bhwc, g_bhwc, strides, pads)
    return dx_bhwc, dk_hw1c


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def supports(x_bhwc, pads) -> bool:
    """True when the handlers can take this call: float32 input and pads ≥ 0."""
    return x_bhwc.dtype == jnp.float32 and min(min(p) for p in pads) >= 0


def depthwise_conv(x_bhwc, kernel_hw1c, strides=(1, 1), padding=((0, 0), (0, 0))):
    """Depthwise conv by the native handlers. Returns B×Ho×Wo×C. float32 only; `padding` explicit
    ((lo_h, hi_h), (lo_w, hi_w)), each ≥ 0 (`layers.depthwise_conv(..., impl="native")` resolves 'SAME'/'VALID'
    and runs the shift path where `supports` is False)."""
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if x_bhwc.dtype != jnp.float32 or min(min(p) for p in pads) < 0:
        raise ValueError(f"depthwise_conv takes float32 and pads >= 0, got {x_bhwc.dtype} and {pads}")
    if not available():
        raise RuntimeError(f"leukax native depthwise unavailable: {unavailable_reason()}")
    return _depthwise(x_bhwc, kernel_hw1c.astype(jnp.float32), tuple(int(s) for s in strides), pads)
