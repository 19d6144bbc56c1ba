"""Torch state dicts (`.pth` zip or `.npz`) as numpy arrays, without torch and without running pickled code.

`read_state_dict` unpickles `archive/data.pkl` with an allow-list: only `collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` (re-implemented here with numpy) and the torch
storage type names resolve; any other global (`os.system`, `builtins.eval`, `subprocess.*`, ...) raises
before it can be called. `.npz` files are read with `allow_pickle=False`: a member holding a pickled object
array is refused. Every refusal (pickle, truncated or corrupt archive, missing keys) raises
`leukax.weights.errors.WeightsError` with the file name and the reason, and nothing is returned.
Mapping the arrays onto a network (EfficientNet-Lite) is `leukax.pretrained.efficientnet_lite_variables`.
"""
from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from leukax.weights.errors import WeightsError

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Refusal(pickle.UnpicklingError):
    """The pickle asks for something a state dict never needs (a global outside the allow-list, ...)."""


class _StorageType:
    """Stands for a `torch.<X>Storage` class inside the pickle; only carries its numpy dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """numpy version of torch._utils._rebuild_tensor_v2: returns a copy of the strided view."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, np.ndarray):
        raise _Refusal(f"tensor storage must come from a persistent id, got {type(storage)}")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if size and any(s > 0 for s in size):
        last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride) if n > 0)
        if storage_offset < 0 or last >= storage.size or min(stride) < 0:
            raise _Refusal(f"tensor view {size}/{stride}+{storage_offset} exceeds its storage "
                                         f"of {storage.size} elements")
    base = storage[storage_offset:]
    view = np.lib.stride_tricks.as_strided(base, size, tuple(s * storage.itemsize for s in stride))
    return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from `_ALLOWED`; storages are read from the zip archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.source, self.byteorder = archive, prefix, source, byteorder
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _Refusal(
                f"refusing to load global {module}.{name} (not a tensor/state-dict type; "
                f"only {', '.join(sorted(f'{m}.{n}' for m, n in _ALLOWED))} are allowed)")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise _Refusal(f"unsupported persistent id {pid!r:.200}")
        _, stype, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            member = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(member)
            except KeyError as e:
                raise _Refusal(f"storage {member} missing from the archive") from e
            dtype = stype.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
            if len(raw) % dtype.itemsize:
                raise _Refusal(f"storage {member} has {len(raw)} bytes, not a "
                                             f"multiple of {dtype.itemsize}")
            arr = np.frombuffer(raw, dtype=dtype).astype(stype.dtype)
            if numel is not None and arr.size < int(numel):
                raise _Refusal(f"storage {member} holds {arr.size} < {numel}")
            self.storages[key] = arr
        return self.storages[key]


def _flatten(obj: Any, source: str, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(obj, np.ndarray):
        return {prefix: obj}
    if isinstance(obj, (bool, int, float)):
        return {prefix: np.asarray(obj)}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, source, f"{prefix}.{k}" if prefix else str(k)))
        return out
    raise WeightsError(source, f"value at {prefix!r} is a {type(obj).__name__}, not a tensor")


def _read_pth(path: pathlib.Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise WeightsError(path, "not a zip-format torch file (legacy pre-1.6 .pth is not supported)")
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise WeightsError(path, f"expected one <archive>/data.pkl, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        obj = _RestrictedUnpickler(archive.read(pkls[0]), archive, prefix, str(path), byteorder).load()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(path, f"top-level object is a {type(obj).__name__}, not a state dict")
    return _flatten(obj, str(path))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Returns {key: np.ndarray} from a torch `.pth`/`.pt` zip or an `.npz`, in file order.

    Raises WeightsError (file + reason) for a missing file, any pickle that is not a plain state dict, a
    pickled object array in an `.npz`, or a truncated/corrupt archive.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(path, "no such state-dict file")
    read = _read_npz if path.suffix == ".npz" else _read_pth
    try:
        return read(path)
    except WeightsError:
        raise
    except _Refusal as e:
        raise WeightsError(path, f"refused: {e}") from None
    except Exception as e:  # noqa: BLE001 - zipfile/pickle/numpy errors of a truncated or corrupt file
        raise WeightsError(path, f"unreadable, truncated or corrupt ({type(e).__name__}: {e})") from None


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads every member with allow_pickle=False; a pickled object array (or a pickle) is refused."""
    try:
        f = np.load(path, allow_pickle=False)
    except ValueError as e:  # a bare pickle renamed .npz
        raise WeightsError(path, f"refused: holds pickled data, not arrays ({e})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise WeightsError(path, f"not an .npz archive (a single {type(f).__name__})")
    out = {}
    with f:
        for k in f.files:
            try:
                out[k] = f[k]
            except ValueError as e:
                if "allow_pickle" not in str(e):
                    raise
                raise WeightsError(path, f"refused: member {k!r} is a pickled object array (code could run "
                                         "when it is loaded); a state dict holds only numeric arrays") from None
    return out
