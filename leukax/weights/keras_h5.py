"""Legacy Keras `.h5` weights (the files `keras.applications` downloads) into Flax variables, by layer name.

Layout read: root attribute `layer_names`; one group per layer with attribute `weight_names`
(`b'Conv1/kernel:0'`, or Keras 3's `b'Conv1/kernel'`); datasets at `/<layer>/<weight_name>`.
Full-model files (`model_weights` group) and chunked attributes (`layer_names0`, ...) are accepted.
Only h5py datasets are read: nothing in the file is executed or unpickled. Every refusal (missing,
truncated or corrupt file, wrong layout, shape mismatch) raises `leukax.weights.errors.WeightsError` naming
the file and the reason, and `load_into` raises before returning, so nothing is partially loaded.

Mapping (the backbone contract): `kernel` -> params[layer]["kernel"]; `depthwise_kernel`
(kh×kw×C×1; Keras 3 writes it as `kernel`) -> params[layer]["kernel"] (kh×kw×1×C); `bias` -> params[layer]["bias"]; BN `gamma` ->
"scale", `beta` -> "bias", `moving_mean` -> batch_stats[layer]["mean"], `moving_variance` -> "var".
"""
from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from leukax.weights.errors import WeightsError

if TYPE_CHECKING:
    import h5py

# Keras weight name -> (collection, flax name).
KERAS_TO_FLAX = {
    "kernel": ("params", "kernel"),
    "depthwise_kernel": ("params", "kernel"),
    "bias": ("params", "bias"),
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}
H5Dict = dict[str, dict[str, np.ndarray]]


def _attr_strings(group: h5py.Group, name: str) -> list[str]:
    """Reads a (possibly chunked: name0, name1, ...) string-list attribute."""
    if name in group.attrs:
        raw = list(group.attrs[name])
    else:
        raw, i = [], 0
        while f"{name}{i}" in group.attrs:
            raw.extend(group.attrs[f"{name}{i}"])
            i += 1
    return [r.decode("utf8") if isinstance(r, bytes) else str(r) for r in raw]


def weight_short_name(name: str) -> str:
    """'block_1_expand/kernel:0' -> 'kernel'."""
    return name.split("/")[-1].split(":")[0]


def read_h5(path: str | os.PathLike) -> H5Dict:
    """Returns {layer_name: {short weight name ('kernel', 'gamma', ...): float array}}, file order.

    Layers without weights are left out. Raises WeightsError for a missing, truncated or corrupt file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(path, "no such weights file")
    try:
        return _read_h5(path)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises OSError/KeyError/RuntimeError/... for damaged files
        raise WeightsError(path, f"unreadable HDF5 weights file, truncated or corrupt ({type(e).__name__}: "
                                 f"{e})") from None


def _read_h5(path: pathlib.Path) -> H5Dict:
    out: H5Dict = {}
    import h5py  # here, not at import: h5py's import runs `uname -p`
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        layer_names = _attr_strings(root, "layer_names")
        if not layer_names:
            raise WeightsError(path, "no 'layer_names' attribute; not a legacy Keras weights .h5 "
                                     "(Keras 3 '.weights.h5' files are a different format)")
        for layer in layer_names:
            if layer not in root:
                raise WeightsError(path, f"layer {layer!r} is listed in layer_names but has no group")
            g = root[layer]
            weights = {}
            for wname in _attr_strings(g, "weight_names"):
                ds = g.get(wname)
                if not isinstance(ds, h5py.Dataset):
                    raise WeightsError(path, f"weight {layer}/{wname} is listed but not a dataset")
                short = weight_short_name(wname)
                if short in weights:
                    raise WeightsError(path, f"layer {layer!r} has two weights named {short!r}")
                weights[short] = np.asarray(ds[()])
            if weights:
                out[layer] = weights
    return out


def _plain(tree: Any) -> Any:
    """Deep copy of nested mappings into plain dicts (leaves shared)."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _get(tree: Mapping, keys: tuple[str, ...]) -> Mapping | None:
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def load_into(variables: Mapping, path_or_dict: str | os.PathLike | H5Dict,
              prefix: tuple[str, ...] = (), strict: bool = True) -> dict:
    """Returns a copy of `variables` with every Keras layer's weights put in by layer name.

    prefix: the module path of the backbone inside `variables` (e.g. ("backbone",)).
    strict: raise if a Flax layer under `prefix` with variables gets nothing from the file
      ("missing") or a file layer finds no Flax layer ("unexpected"). Shapes are always checked.
    Raises WeightsError (file name + every problem) before returning: `variables` itself is never modified.
    """
    source = str(path_or_dict) if not isinstance(path_or_dict, Mapping) else None
    h5 = path_or_dict if isinstance(path_or_dict, Mapping) else read_h5(path_or_dict)
    out = _plain(variables)
    trees = {col: _get(out, (col, *prefix)) for col in ("params", "batch_stats")}
    flax_layers = set()
    for col, tree in trees.items():
        if tree is not None:
            flax_layers |= {k for k, v in tree.items() if isinstance(v, Mapping)}
    unexpected, shape_errors, filled = [], [], set()
    loaded_layers = set()
    for layer, weights in h5.items():
        if layer not in flax_layers:
            unexpected.append(layer)
            continue
        loaded_layers.add(layer)
        for wname, value in weights.items():
            if wname not in KERAS_TO_FLAX:
                unexpected.append(f"{layer}/{wname}")
                continue
            col, fname = KERAS_TO_FLAX[wname]
            leaves = (trees[col] or {}).get(layer, {})
            if fname not in leaves:
                unexpected.append(f"{layer}/{wname} (no {col}/{fname})")
                continue
            target = leaves[fname]
            if value.ndim == 4 and value.shape[3] == 1 and target.shape[2] == 1 and (
                    wname == "depthwise_kernel" or tuple(value.shape) != tuple(target.shape)):
                value = np.swapaxes(value, 2, 3)  # Keras depthwise kh×kw×C×1 (Keras 3 calls it kernel)
            if tuple(target.shape) != tuple(value.shape):
                shape_errors.append(f"{layer}/{wname}: file {tuple(value.shape)} vs flax "
                                    f"{col}/{fname} {tuple(target.shape)}")
                continue
            if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
                shape_errors.append(f"{layer}/{wname}: file dtype {value.dtype} is not numeric")
                continue
            leaves[fname] = np.asarray(value, dtype=target.dtype)
            filled.add((col, layer, fname))
    missing = []
    for col, tree in trees.items():
        for layer, leaves in (tree or {}).items():
            if isinstance(leaves, Mapping):
                missing += [f"{col}/{layer}/{k}" for k in leaves if (col, layer, k) not in filled
                            and not isinstance(leaves[k], Mapping)]
    problems = []
    if shape_errors:
        problems.append("shape mismatches: " + "; ".join(shape_errors))
    if strict and missing:
        problems.append(f"missing (not in file): {', '.join(sorted(missing))}")
    if strict and unexpected:
        problems.append(f"unexpected (no Flax layer under prefix {prefix}): {', '.join(unexpected)}")
    if problems:
        raise WeightsError(source, "cannot load Keras weights: " + " | ".join(problems))
    return out


FLAX_TO_KERAS = {("params", "scale"): "gamma", ("batch_stats", "mean"): "moving_mean",
                 ("batch_stats", "var"): "moving_variance"}


def to_h5_dict(variables: Mapping, prefix: tuple[str, ...] = ()) -> H5Dict:
    """Inverse of `load_into`: {layer: {keras weight name: np.ndarray}}.

    A layer whose params hold "scale" or whose batch_stats hold "mean" is a BatchNorm ("bias" ->
    "beta"); a kh×kw×1×C kernel of a layer whose name contains "depthwise" or "dwconv" becomes a
    kh×kw×C×1 `depthwise_kernel`.
    """
    params = _get(variables, ("params", *prefix)) or {}
    stats = _get(variables, ("batch_stats", *prefix)) or {}
    out: H5Dict = {}
    for layer in list(params) + [k for k in stats if k not in params]:
        p, s = params.get(layer, {}), stats.get(layer, {})
        is_bn = "scale" in p or "mean" in s
        w = {}
        for name, value in p.items():
            value = np.asarray(value)
            if name == "kernel" and value.ndim == 4 and value.shape[2] == 1 and (
                    "depthwise" in layer or "dwconv" in layer):
                w["depthwise_kernel"] = np.swapaxes(value, 2, 3)
            elif name == "bias" and is_bn:
                w["beta"] = value
            else:
                w[FLAX_TO_KERAS.get(("params", name), name)] = value
        for name, value in s.items():
            w[FLAX_TO_KERAS[("batch_stats", name)]] = np.asarray(value)
        out[layer] = dict(sorted(w.items(), key=lambda kv: _KERAS_ORDER.get(kv[0], 99)))
    return out


_KERAS_ORDER = {"kernel": 0, "depthwise_kernel": 0, "gamma": 1, "bias": 2, "beta": 2,
                "moving_mean": 3, "moving_variance": 4}


def write_h5(path: str | os.PathLike, layers: H5Dict, layer_names: list[str] | None = None) -> None:
    """Writes {layer: {weight: array}} in the legacy layout of the keras.applications files.

    layer_names: every layer in model order (weightless ones too); defaults to `layers`' keys.
    """
    layer_names = list(layers) if layer_names is None else layer_names
    import h5py
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode("utf8") for n in layer_names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"leukax"
        for layer in layer_names:
            g = f.create_group(layer)
            weights = layers.get(layer, {})
            g.attrs["weight_names"] = np.array([f"{layer}/{k}:0".encode("utf8") for k in weights],
                                               dtype="S")
            for k, v in weights.items():
                g.create_dataset(f"{layer}/{k}:0", data=np.asarray(v))
