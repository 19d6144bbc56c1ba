"""Tests for leukax/data/splits.py: grouping, disjointness, coverage, stratification, determinism, errors."""
import csv

import numpy as np
import pytest

from leukax.data import splits as sp


def _counts(labels, idx, n_cls):
    return np.bincount(labels[idx], minlength=n_cls)


@pytest.fixture(scope="module")
def grouped_data():
    """300 items, 3 unbalanced classes, groups of 1-3 items of one class each."""
    rng = np.random.default_rng(0)
    labels, groups, g = [], [], 0
    for c, n_groups in enumerate((60, 40, 25)):
        for _ in range(n_groups):
            size = int(rng.integers(1, 4))
            labels += [c] * size
            groups += [g] * size
            g += 1
    perm = rng.permutation(len(labels))
    return np.array(labels)[perm], np.array(groups)[perm]


def allidb_fixture(idb: int):
    """ALL-IDB-like file names, labels and tiny images with the datasets' known duplicate pair."""
    rng = np.random.default_rng(idb)
    if idb == 1:  # 108 smears, 49 ALL then 59 healthy; Im108_0 duplicates Im093_0
        names = [f"Im{i:03d}_{int(i <= 49)}.jpg" for i in range(1, 109)]
        pair = ("Im093_0.jpg", "Im108_0.jpg")
    else:  # 260 crops, 130/130; Im257_0 duplicates Im223_0
        names = [f"Im{i:03d}_{int(i <= 130)}.tif" for i in range(1, 261)]
        pair = ("Im223_0.tif", "Im257_0.tif")
    images = rng.integers(0, 256, (len(names), 4, 4, 3), dtype=np.uint8)
    a, b = names.index(pair[0]), names.index(pair[1])
    images[b] = images[a]
    labels = np.array([int(n[6]) for n in names])
    return names, labels, images, (a, b)


def _check_split(split, labels, groups):
    n = len(labels)
    all_idx = np.concatenate([split.train, split.val, split.test])
    assert len(all_idx) == len(np.unique(all_idx)) == n
    for part in (split.train, split.val, split.test):
        assert np.all(np.diff(part) > 0) and part.dtype == np.int64
    split.check_disjoint(groups)
    g_parts = [set(groups[p].tolist()) for p in (split.train, split.val, split.test)]
    assert not (g_parts[0] & g_parts[1]) and not (g_parts[0] & g_parts[2]) and not (g_parts[1] & g_parts[2])


# ------------------------------------------------------------------------------------------- groups
def test_duplicate_and_combined_groups():
    a = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    g = sp.duplicate_groups([a, a + 1, a.copy(), a.astype(np.float32), b"xy", b"xy", "h1", "h1"])
    np.testing.assert_array_equal(g, [0, 1, 0, 2, 3, 3, 4, 4])
    subject = np.array([0, 0, 1, 2, 3])
    dup = np.array(["a", "b", "b", "c", "d"])
    np.testing.assert_array_equal(sp.combine_groups(subject, dup), [0, 0, 0, 1, 2])
    # transitive: 0-1 by subject, 1-2 by dup, 2-3 by a third grouping
    np.testing.assert_array_equal(sp.combine_groups([0, 0, 1, 2], [5, 6, 6, 7], [8, 9, 3, 3]), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="lengths differ"):
        sp.combine_groups([0, 1], [0])


# ------------------------------------------------------------------------------------------- k-fold
def test_kfold_coverage_disjoint_stratified(grouped_data):
    labels, groups = grouped_data
    folds = sp.stratified_group_kfold(labels, groups, k=5, seed=0)
    assert [f.fold for f in folds] == list(range(5))
    tests = np.concatenate([f.test for f in folds])
    assert len(tests) == len(np.unique(tests)) == len(labels)  # every index in exactly one test fold
    for f in folds:
        _check_split(f, labels, groups)
        assert len(f.val) == 0
    # each group in exactly one test fold
    owner = {}
    for f in folds:
        for g in np.unique(groups[f.test]).tolist():
            assert owner.setdefault(g, f.fold) == f.fold
    assert len(owner) == len(np.unique(groups))
    # class proportions: per-class test counts within ±3 (groups have up to 3 items) of n_c / k
    per_fold = np.stack([_counts(labels, f.test, 3) for f in folds])
    assert np.abs(per_fold - np.bincount(labels) / 5).max() <= 3


def test_kfold_singletons_within_one_per_class():
    labels = np.repeat([0, 1, 2], [53, 31, 12])
    folds = sp.stratified_group_kfold(labels, None, k=5, seed=3)
    per_fold = np.stack([_counts(labels, f.test, 3) for f in folds])
    assert (per_fold.max(0) - per_fold.min(0)).max() <= 1
    sizes = [len(f.test) for f in folds]
    assert max(sizes) - min(sizes) <= 1


def test_kfold_determinism_and_val(grouped_data):
    labels, groups = grouped_data
    a = sp.stratified_group_kfold(labels, groups, 4, seed=11, val_fraction=0.15)
    b = sp.stratified_group_kfold(labels, groups, 4, seed=11, val_fraction=0.15)
    c = sp.stratified_group_kfold(labels, groups, 4, seed=12, val_fraction=0.15)
    for x, y in zip(a, b):
        for part in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(x, part), getattr(y, part))
    assert any(not np.array_equal(x.test, y.test) for x, y in zip(a, c))
    for f in a:
        _check_split(f, labels, groups)
        assert abs(len(f.val) - 0.15 * len(labels)) <= 6
        assert (_counts(labels, f.val, 3) > 0).all()


# ------------------------------------------------------------------------------------------- holdout
def test_repeated_holdout_and_paper_protocols(grouped_data):
    labels, groups = grouped_data
    reps = sp.repeated_holdout(labels, groups, test_fraction=0.2, val_fraction=0.1, repeats=3, seed=0)
    assert [r.repeat for r in reps] == [0, 1, 2]
    assert not np.array_equal(reps[0].test, reps[1].test)
    for r in reps:
        _check_split(r, labels, groups)
        assert abs(len(r.test) - 0.2 * len(labels)) <= 6 and abs(len(r.val) - 0.1 * len(labels)) <= 6
    # ungrouped singletons: within ±1 per class of the protocol fractions
    for protocol, (fr_test, fr_val) in sp.PAPER_PROTOCOLS.items():
        s = sp.paper_split(labels, groups, protocol, seed=1, grouped=False)
        assert "leaky" in s.protocol and s.meta["grouped"] is False
        n_c = np.bincount(labels)
        assert np.abs(_counts(labels, s.test, 3) - fr_test * n_c).max() <= 1
        assert np.abs(_counts(labels, s.val, 3) - fr_val * n_c).max() <= 1
        g = sp.paper_split(labels, groups, protocol, seed=1)
        assert g.protocol == f"paper {protocol} grouped"
        _check_split(g, labels, groups)
    # test_fraction=0: train/val only (the final model on all data)
    final = sp.repeated_holdout(labels, groups, 0.0, 0.1, seed=2)[0]
    assert len(final.test) == 0 and (_counts(labels, final.val, 3) > 0).all()
    _check_split(final, labels, groups)
    with pytest.raises(ValueError, match="unknown protocol"):
        sp.paper_split(labels, groups, "60/40")


@pytest.mark.parametrize("idb", [1, 2])
def test_allidb_duplicate_pairs_same_side(idb):
    names, labels, images, (a, b) = allidb_fixture(idb)
    groups = sp.duplicate_groups(list(images))
    assert groups[a] == groups[b] and len(np.unique(groups)) == len(names) - 1
    side = lambda s, i: next(p for p in ("train", "val", "test") if i in getattr(s, p))  # noqa: E731
    for seed in range(4):
        for s in [sp.paper_split(labels, groups, "80/20", seed),
                  sp.paper_split(labels, groups, "70/10/20", seed),
                  *sp.stratified_group_kfold(labels, groups, 5, seed, val_fraction=0.1)]:
            assert side(s, a) == side(s, b), (s.protocol, seed)
            s.check_disjoint(groups)
    # the papers' ungrouped split leaks the pair for some seed, and check_disjoint catches it
    leaky = [sp.paper_split(labels, groups, "80/20", seed, grouped=False) for seed in range(20)]
    split_pair = [s for s in leaky if side(s, a) != side(s, b)]
    assert split_pair
    with pytest.raises(ValueError, match="span two parts"):
        split_pair[0].check_disjoint(groups)


def test_cnmc_subject_grouping(cnmc_sample_dir):
    root = cnmc_sample_dir
    with open(root / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    labels = np.array([int(r["label"]) for r in rows])
    subjects = np.array([r["subject"] for r in rows])
    assert len(rows) == 60 and len(np.unique(subjects)) == 37
    dup = sp.duplicate_groups([(root / "images" / r["filename"]).read_bytes() for r in rows])
    groups = sp.combine_groups(subjects, dup)
    assert len(np.unique(groups)) == 37  # no byte-identical files across subjects in the sample
    folds = sp.stratified_group_kfold(labels, groups, k=5, seed=0, val_fraction=0.1,
                                      class_names=["hem", "all"])
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests.tolist()) == list(range(60))
    for f in folds:
        _check_split(f, labels, subjects)
        assert (_counts(labels, f.test, 2) > 0).all() and (_counts(labels, f.val, 2) > 0).all()
        assert "hem" in f.summary(labels, ["hem", "all"])
    s = sp.paper_split(labels, subjects, "70/10/20", seed=0, class_names=["hem", "all"])
    _check_split(s, labels, subjects)


# ------------------------------------------------------------------------------------------- io, errors
def test_save_load_roundtrip_and_summary(tmp_path, grouped_data):
    labels, groups = grouped_data
    s = sp.stratified_group_kfold(labels, groups, 3, seed=5, val_fraction=0.1)[2]
    s.meta["dataset"] = "toy"
    t = sp.Split.load(s.save(tmp_path / "splits" / "split.json"))
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(s, part), getattr(t, part))
        assert getattr(t, part).dtype == np.int64
    assert (t.protocol, t.seed, t.fold, t.repeat, t.meta) == (s.protocol, 5, 2, 0, s.meta)
    text = t.summary(labels, ["a", "b", "c"])
    row = next(line for line in text.splitlines() if line.startswith("test"))
    assert row.split()[1:] == [str(len(t.test))] + [str(c) for c in _counts(labels, t.test, 3)]
    assert f"train={len(t.train)}" in str(t)


def test_errors_name_class_and_part():
    labels = np.array([0] * 20 + [1] * 20 + [2] * 2)
    groups = np.array(list(range(40)) + [99, 99])  # class 2 is a single group
    with pytest.raises(ValueError, match=r"class 'AML' would be empty in the (train|test) part"):
        sp.paper_split(labels, groups, "80/20", seed=0, class_names=["healthy", "ALL", "AML"])
    with pytest.raises(ValueError, match=r"class 2 would be empty in the (train|val|test) part"):
        sp.repeated_holdout(labels, groups, 0.2, 0.1, seed=0)
    with pytest.raises(ValueError, match=r"class 'AML' has 1 group\(s\), fewer than k=5"):
        sp.stratified_group_kfold(labels, groups, 5, seed=0, class_names=["healthy", "ALL", "AML"])
    with pytest.raises(ValueError, match="appears in two parts"):
        sp.Split(train=[0, 1], val=[], test=[1], protocol="bad", seed=0)
