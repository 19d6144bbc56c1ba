"""Leakage-safe train/val/test splits, computed on indices BEFORE any augmentation.

A *group* is a set of items that must stay on one side of every split: images of one subject, and byte- or
pixel-identical duplicates (ALL-IDB1 ``Im108_0.jpg`` = ``Im093_0.jpg``, ALL-IDB2 ``Im257_0.tif`` =
``Im223_0.tif``). `combine_groups` joins several groupings into connected components.

All splitters assign whole groups greedily (largest first, ties in a seeded random order) to the part whose
per-class counts are furthest below their targets, so class proportions are kept to within one item per
class where the groups allow it. Everything is numpy and deterministic given the seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from leukax import records

PARTS = ("train", "val", "test")


@dataclasses.dataclass(eq=False)
class Split:
    """Index arrays (sorted int64) of one split, with how it was made."""
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    protocol: str
    seed: int
    fold: int = 0
    repeat: int = 0
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for part in PARTS:
            setattr(self, part, np.sort(np.asarray(getattr(self, part), dtype=np.int64).reshape(-1)))
        all_idx = np.concatenate([self.train, self.val, self.test])
        if len(np.unique(all_idx)) != len(all_idx):
            raise ValueError(f"leukax/data/splits.py:Split: an index appears in two parts ({self.protocol})")

    def parts(self) -> dict[str, np.ndarray]:
        """Returns {"train": idx, "val": idx, "test": idx}."""
        return {p: getattr(self, p) for p in PARTS}

    def check_disjoint(self, groups) -> "Split":
        """Raises ValueError if any group has items in two parts; returns self."""
        groups = np.asarray(groups)
        owner: dict[Any, str] = {}
        bad = []
        for part, idx in self.parts().items():
            for g in np.unique(groups[idx]).tolist():
                if owner.setdefault(g, part) != part:
                    bad.append(f"{g!r} ({owner[g]}+{part})")
        if bad:
            raise ValueError(f"leukax/data/splits.py:check_disjoint: {len(bad)} group(s) span two parts of "
                             f"{self.protocol} fold={self.fold} repeat={self.repeat}: {', '.join(bad[:10])}")
        return self

    def summary(self, labels=None, class_names: Sequence[str] | None = None) -> str:
        """Returns a table of part sizes and, given labels, per-class counts per part."""
        head = f"Split {self.protocol} seed={self.seed} fold={self.fold} repeat={self.repeat}"
        if labels is None:
            return head + ": " + ", ".join(f"{p}={len(i)}" for p, i in self.parts().items())
        labels = np.asarray(labels)
        n_cls = int(labels.max()) + 1
        names = list(class_names) if class_names is not None else [str(c) for c in range(n_cls)]
        w = max(6, *(len(n) for n in names))
        lines = [head, f"{'part':<6} {'n':>5} " + " ".join(f"{n:>{w}}" for n in names)]
        for part, idx in self.parts().items():
            counts = np.bincount(labels[idx], minlength=n_cls)
            lines.append(f"{part:<6} {len(idx):>5} " + " ".join(f"{c:>{w}}" for c in counts))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        d = {p: i.tolist() for p, i in self.parts().items()}
        d.update(protocol=self.protocol, seed=self.seed, fold=self.fold, repeat=self.repeat, meta=self.meta)
        return d

    def save(self, path) -> pathlib.Path:
        """Writes the split as JSON; returns the path."""
        return records.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Split":
        """Reads a split written by `save`."""
        d = json.loads(pathlib.Path(path).read_text())
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# ------------------------------------------------------------------------------------------- groups
def _relabel(keys: Sequence[Any]) -> np.ndarray:
    """Returns int64 ids 0..G-1 numbered by first occurrence of each key."""
    ids: dict[Any, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


def duplicate_groups(hashes_or_arrays: Sequence[Any]) -> np.ndarray:
    """Returns int64 (N,) group ids; identical items (equal hash strings, equal bytes, or pixel-identical
    arrays of equal shape and dtype) share an id."""
    keys = []
    for item in hashes_or_arrays:
        if isinstance(item, (str, int)):
            keys.append(item)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            keys.append(hashlib.sha256(bytes(item)).hexdigest())
        else:
            a = np.ascontiguousarray(np.asarray(item))
            keys.append(hashlib.sha256(f"{a.shape}{a.dtype}".encode() + a.tobytes()).hexdigest())
    return _relabel(keys)


def combine_groups(*group_arrays) -> np.ndarray:
    """Returns int64 (N,) ids of the connected components: items sharing an id in ANY array are joined."""
    if not group_arrays:
        raise ValueError("leukax/data/splits.py:combine_groups: needs at least one group array")
    arrays = [np.asarray(g) for g in group_arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"leukax/data/splits.py:combine_groups: lengths differ {[len(a) for a in arrays]}")
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in arrays:
        first: dict[Any, int] = {}
        for i, g in enumerate(a.tolist()):
            j = first.setdefault(g, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return _relabel([find(i) for i in range(n)])


# ------------------------------------------------------------------------------------------- assignment
def _prepare(labels, groups):
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups).reshape(-1)
    if len(groups) != len(labels):
        raise ValueError(f"leukax/data/splits.py: {len(labels)} labels but {len(groups)} groups")
    if len(labels) == 0:
        raise ValueError("leukax/data/splits.py: no items to split")
    if labels.min() < 0:
        raise ValueError("leukax/data/splits.py: labels must be non-negative class ids")
    gid = _relabel(groups.tolist())
    n_cls = int(labels.max()) + 1
    counts_gc = np.zeros((gid.max() + 1, n_cls), np.int64)
    np.add.at(counts_gc, (gid, labels), 1)
    return labels, gid, counts_gc


def _assign(counts_gc: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Returns (G,) part index per group: greedy on the increase of squared per-class deficits."""
    fractions = np.asarray(fractions, np.float64)
    target_pc = fractions[:, None] * counts_gc.sum(0)[None, :]
    target_p = target_pc.sum(1)
    have_pc = np.zeros_like(target_pc)
    n_c = np.maximum(counts_gc.sum(0), 1)  # weigh rare classes up
    order = rng.permutation(len(counts_gc))
    order = order[np.argsort(-counts_gc[order].sum(1), kind="stable")]  # largest groups first
    part_g = np.empty(len(counts_gc), np.int64)
    tie = rng.permutation(len(fractions))
    for g in order:
        c = counts_gc[g]
        cost = (((have_pc + c - target_pc) ** 2 - (have_pc - target_pc) ** 2) / n_c).sum(1)
        size_gap = (have_pc.sum(1) - target_p) / np.maximum(target_p, 1)
        cost = np.where(fractions > 0, np.round(cost, 9), np.inf)
        p = np.lexsort((tie, size_gap, cost))[0]
        part_g[g] = p
        have_pc[p] += c
    return part_g


def _class_name(c: int, class_names) -> str:
    return repr(class_names[c]) if class_names is not None else f"{c}"


def _check_classes(split: Split, labels, counts_gc, class_names, fractions: Sequence[float]):
    """Raises ValueError naming the class and the part if a class present in the data misses a part whose
    fraction (train, val, test) is > 0."""
    n_cls = counts_gc.shape[1]
    groups_per_class = (counts_gc > 0).sum(0)
    for part in (p for p, f in zip(PARTS, fractions) if f > 0):
        present = np.bincount(labels[getattr(split, part)], minlength=n_cls) > 0
        for c in np.flatnonzero(~present & (groups_per_class > 0)):
            raise ValueError(
                f"leukax/data/splits.py: class {_class_name(c, class_names)} would be empty in the "
                f"{part} part of {split.protocol} (seed={split.seed}, fold={split.fold}, "
                f"repeat={split.repeat}); it has {groups_per_class[c]} group(s) and "
                f"{counts_gc[:, c].sum()} item(s)")


def _split_from_parts(gid, part_g, part_names, **kw) -> Split:
    part_i = part_g[gid]
    idx = {name: np.flatnonzero(part_i == p) for p, name in enumerate(part_names)}
    return Split(train=idx.get("train", []), val=idx.get("val", []), test=idx.get("test", []), **kw)


# ------------------------------------------------------------------------------------------- splitters
def stratified_group_kfold(labels, groups, k: int, seed: int, val_fraction: float = 0.0,
                           class_names: Sequence[str] | None = None) -> list[Split]:
    """Returns k Splits; every group is in exactly one test fold, class proportions kept per fold.

    `val_fraction` (of ALL items) is carved, grouped and stratified, from each fold's training part.
    """
    labels, gid, counts_gc = _prepare(labels, groups)
    if k < 2:
        raise ValueError(f"leukax/data/splits.py:stratified_group_kfold: k must be >= 2, got {k}")
    if not 0.0 <= val_fraction < 1.0 - 1.0 / k:
        raise ValueError(f"leukax/data/splits.py:stratified_group_kfold: val_fraction {val_fraction} must be "
                         f"in [0, {1 - 1 / k:.3f}) for k={k}")
    for c, n_groups in enumerate((counts_gc > 0).sum(0)):
        if 0 < n_groups < k:
            raise ValueError(f"leukax/data/splits.py:stratified_group_kfold: class "
                             f"{_class_name(c, class_names)} has {n_groups} group(s), fewer than k={k} folds")
    rng = np.random.default_rng([seed, k])
    fold_g = _assign(counts_gc, [1.0 / k] * k, rng)
    protocol = f"stratified_group_kfold(k={k}, val={val_fraction:g})"
    splits = []
    for f in range(k):
        part_g = np.where(fold_g == f, 2, 0)
        if val_fraction > 0:
            rest = np.flatnonzero(fold_g != f)
            v = val_fraction / (1.0 - 1.0 / k)
            sub = _assign(counts_gc[rest], [1.0 - v, v], np.random.default_rng([seed, k, f]))
            part_g[rest] = sub
        split = _split_from_parts(gid, part_g, PARTS, protocol=protocol, seed=seed, fold=f,
                                  meta={"k": k, "val_fraction": val_fraction, "grouped": True})
        _check_classes(split, labels, counts_gc, class_names, (1.0, val_fraction, 1.0))
        splits.append(split)
    return splits


def repeated_holdout(labels, groups, test_fraction: float, val_fraction: float = 0.0, repeats: int = 1,
                     seed: int = 0, class_names: Sequence[str] | None = None,
                     protocol: str | None = None) -> list[Split]:
    """Returns `repeats` stratified grouped train/val/test Splits (fractions of all items).

    ``test_fraction=0`` gives train/val only (e.g. a final model on all data); ``groups=None`` = one group
    per item (an ungrouped stratified split).
    """
    labels, gid, counts_gc = _prepare(labels, groups)
    train_fraction = 1.0 - test_fraction - val_fraction
    fractions = (train_fraction, val_fraction, test_fraction)
    if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and train_fraction > 0):
        raise ValueError(f"leukax/data/splits.py:repeated_holdout: bad fractions test={test_fraction}, "
                         f"val={val_fraction}")
    protocol = protocol or f"repeated_holdout(test={test_fraction:g}, val={val_fraction:g})"
    splits = []
    for r in range(repeats):
        part_g = _assign(counts_gc, fractions, np.random.default_rng([seed, r]))
        split = _split_from_parts(gid, part_g, PARTS, protocol=protocol, seed=seed, repeat=r,
                                  meta={"test_fraction": test_fraction, "val_fraction": val_fraction,
                                        "grouped": groups is not None})
        _check_classes(split, labels, counts_gc, class_names, fractions)
        splits.append(split)
    return splits


PAPER_PROTOCOLS = {"80/20": (0.2, 0.0), "70/10/20": (0.2, 0.1)}


def paper_split(labels, groups, protocol: str = "80/20", seed: int = 0, grouped: bool = True,
                class_names: Sequence[str] | None = None) -> Split:
    """Returns one stratified Split in a paper's own protocol: "80/20" (train/test) or "70/10/20".

    ``grouped=False`` ignores `groups` and reproduces the papers' random per-image split; its protocol name
    says "ungrouped-leaky" because duplicates and subjects then cross parts.
    """
    if protocol not in PAPER_PROTOCOLS:
        raise ValueError(f"leukax/data/splits.py:paper_split: unknown protocol {protocol!r}, "
                         f"expected one of {tuple(PAPER_PROTOCOLS)}")
    test_f, val_f = PAPER_PROTOCOLS[protocol]
    name = f"paper {protocol} " + ("grouped" if grouped else "ungrouped-leaky")
    split = repeated_holdout(labels, groups if grouped else None, test_f, val_f, 1, seed, class_names,
                             protocol=name)[0]
    split.meta["grouped"] = grouped
    return split
