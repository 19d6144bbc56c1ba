"""experiments/feature_fusion.py (Himel et al. 2024) end to end at tiny scale, in both protocols, on the
embedded C-NMC sample and on fixtures laid out like ALL-IDB2 + ASH (what `--manual_dir` reads).

Random-weight backbones at 32 px, 2 epochs: these check the plumbing, the tables and the protocols, not
accuracy. The paper's Table 3 parameter counts are checked in tests/test_fusion.py.
"""
import json

import numpy as np
import pytest

from experiments import common, feature_fusion
from experiments import feature_fusion_parts as fp
from leukax import fusion
from tests import fixtures

TINY = ["--weights=none", "--image_size=32", "--epochs=2", "--patience=2", "--repeats=1", "--gradcam_per_class=1",
        "--branches=mobilenet_v2,efficientnet_lite0", "--baselines=mobilenet_v2"]


def _run(out, *extra):
    return feature_fusion.run(common.parse_argv(feature_fusion.Config, ["prog", f"--out_dir={out}", *TINY, *extra]))


def _manual_root(root):
    """ALL-IDB2 (ImNNN_L.tif) + ASH (plain folder) fixtures with 8 cells per class, as `--manual_dir` expects."""
    fixtures.make_all_idb2(root)
    fixtures.make_ash(root)
    for i in range(10, 16):
        for label in (0, 1):
            fixtures.smooth_image(500 + 2 * i + label, 257, 257).save(root / "all_idb2" / f"Im{i + 200 * label:03d}_{label}.tif")
        fixtures.smooth_image(700 + i, 300, 300).save(root / "ash_aml" / f"aml_{i:03d}.jpg")
    return root


def test_dihedral_copies_are_the_papers_16():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    y, origin = fp.dihedral_copies(x, 16)
    assert y.shape == (32, 4, 4, 3) and list(origin) == [0] * 16 + [1] * 16
    distinct = {y[i].tobytes() for i in range(16)}
    assert len(distinct) == 8  # rot × {none, h, v, hv}: each of the 8 dihedral images twice
    assert all(sum(y[i].tobytes() == d for i in range(16)) == 2 for d in distinct)
    y8, o8 = fp.dihedral_copies(x, 8)
    assert len({y8[i].tobytes() for i in range(8)}) == 8 and list(o8[:8]) == [0] * 8
    np.testing.assert_array_equal(fp.dihedral_copies(x, 0)[0], x)
    with pytest.raises(ValueError, match="expand"):
        fp.dihedral_copies(x, 4)


@pytest.mark.parametrize("expand,enhance", [(16, True), (0, False)])
def test_streamed_items_and_features_equal_the_in_memory_ones(tmp_path, expand, enhance):
    """The study streams its items from the TFDS source (`fp.Items`, grain batches of 32 images) instead of
    holding every image and copy: the pixels and the pooled backbone features are those of the whole in-memory
    array (enhanced, then the paper's copies), item by item — 55 images: the last batch is partial."""
    import jax.numpy as jnp
    from leukax.data import load_arrays, load_index
    from leukax.preprocess import enhance_paper2
    from leukax.train.features import compute_features
    ds = load_index("cnmc2019", data_dir=tmp_path)
    keep = np.arange(5, 60)[::-1]  # a subset, out of order (as --classes picks)
    items = fp.Items(ds.source, keep, 32, expand, enhance)
    whole = load_arrays("cnmc2019", 32, data_dir=tmp_path).images[keep]
    if enhance:
        whole = np.asarray(enhance_paper2(jnp.asarray(whole)))
    want, origin = fp.dihedral_copies(whole, expand)
    np.testing.assert_array_equal(items.origin, origin)
    np.testing.assert_array_equal(np.concatenate(list(items.stream())), want)
    np.testing.assert_array_equal(items.images([0, 17, len(items) - 1]), want[[0, 17, -1]])
    module, variables, spec, _ = common.load_backbone("mobilenet_v2", "none", None)
    got = fp.pooled_features(module, variables, spec.normalization, items)
    np.testing.assert_array_equal(got, compute_features(module, variables, want, spec.normalization, 32, "pre_logits"))


def test_weighted_prf_is_sklearn_weighted_avg():
    rep = {"per_class": {"a": dict(precision=1.0, recall=0.5, f1=2 / 3, support=2),
                         "b": dict(precision=0.5, recall=1.0, f1=2 / 3, support=1)}}
    w = fp.weighted_prf(rep)
    assert w["weighted_precision"] == pytest.approx((2 * 1.0 + 0.5) / 3)
    assert w["weighted_recall"] == pytest.approx((2 * 0.5 + 1.0) / 3)


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ff_grouped")
    return out, _run(out, "--folds=2")


def test_grouped_run_tables_and_figures(grouped_run):
    out, m = grouped_run
    assert json.loads((out / "metrics.json").read_text())["results"].keys() == m["results"].keys()
    res = m["results"]
    assert {"mobilenet_v2", "efficientnet_lite0", "meta[branch 1]", "meta[branch 2]", "proposed",
            "branch_sum_rule"} <= set(res)
    assert "stratified_group_kfold" in m["protocol"]["name"] and m["protocol"]["splits"] == 2
    for row in ("proposed", "meta[branch 1]", "mobilenet_v2"):
        stats = res[row]["test_mean_std"]
        assert len(stats["accuracy"]["per_split"]) == 2 and 0 <= stats["accuracy"]["mean"] <= 1
        # weighted recall is accuracy (the paper's Table 2 columns are weighted averages)
        assert stats["weighted_recall"]["mean"] == pytest.approx(stats["accuracy"]["mean"], abs=1e-6)
        assert set(res[row]["per_class_mean_std"]) == {f"per_class.{c}.{k}" for c in ("hem", "all")
                                                      for k in ("precision", "recall", "f1")}
    assert res["proposed"]["pooled_first_repeat"]["n"] == 60 and m["dataset"]["expand"] == 0
    rows = m["test_time"]["rows"]
    assert rows["mobilenet_v2"]["trainable"] == fusion.branch_head_params(1280, 2)
    prop = rows["proposed (two branches + meta-classifier)"]
    # fused model = both branches without their output Dense + the meta-classifier on 2·1024 features
    assert prop["trainable"] == (fusion.branch_head_params(1280, 2, with_output=False)
                                 + fusion.branch_head_params(1280, 2, with_output=False)
                                 + fusion.meta_classifier_params(2048, 2))
    assert all(r["ms_per_step"] > 0 and r["ms_per_image"] == pytest.approx(r["ms_per_step"] / 32) for r in rows.values())
    t3 = {r["model"]: r for r in m["table3_paper_semantics"]}
    assert t3["proposed [meta-classifier]"]["total"] == fusion.meta_classifier_params(2048, 2)
    assert {"xception", "resnet101_v2", "efficientnet_b7", "mobilenet_v3_large"} <= set(t3)
    readme = (out / "README.md").read_text()
    for heading in ("Table 2", "Table 8", "Table 5", "Table 3", "Paper's", "python -m experiments.feature_fusion"):
        assert heading in readme
    # provenance of the run's cost: peak memory and the machine's load, measured, in metrics and README
    assert m["peak_rss_mb"] > 100 and set(m["load_average_1min"]) == {"start", "end"}
    assert f"peak RSS {m['peak_rss_mb'] / 1024:.2f} GB" in readme and "1-min load average" in readme
    assert "engineers" not in readme
    for name in ("confusion_matrix_proposed", "confusion_matrix_mobilenet_v2", "roc_pr_models", "roc_per_class_proposed",
                 "pr_per_class_proposed", "training_curves_first_split", "gradcam_branches", "enhancement",
                 "metrics_bars"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000


def test_paper_protocol_on_all_idb2_ash_layout(tmp_path):
    """`--manual_dir` at ALL-IDB2 + ASH folders runs the paper's 3-class study unchanged: 16 copies per image,
    a per-image (leaky) 70/10/20 split, the head on 1000 ImageNet outputs."""
    root = _manual_root(tmp_path / "manual")
    m = _run(tmp_path / "out", "--dataset=all_aml_healthy", f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}",
             "--protocol=paper", "--branch_input=imagenet_logits")
    ds = m["dataset"]
    assert ds["classes"] == ["ALL", "AML", "healthy"] and ds["counts"] == {"ALL": 9, "AML": 10, "healthy": 10}
    assert ds["n_items"] == 16 * 29 and ds["expand"] == 16
    assert "ungrouped-leaky" in m["protocol"]["name"] and m["protocol"]["splits"] == 1
    assert m["results"]["proposed"]["pooled_first_repeat"]["n"] == pytest.approx(0.2 * 16 * 29, abs=16)
    split = json.loads(next((tmp_path / "out" / "splits").glob("*.json")).read_text())
    origin = np.arange(16 * 29) // 16
    # the paper's leak: copies of one cell in both training and test
    assert set(origin[split["train"]]) & set(origin[split["test"]])
    assert m["test_time"]["rows"]["mobilenet_v2"]["trainable"] == fusion.branch_head_params(1000, 3)
    assert m["branch_input"] == "imagenet_logits"


def test_paper_grouped_source_target_keeps_copies_together(tmp_path):
    root = _manual_root(tmp_path / "manual")
    m = _run(tmp_path / "out", "--dataset=all_aml_healthy", f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}",
             "--protocol=paper_grouped", "--expand=8", "--target=source", "--classes=AML,healthy")
    assert m["dataset"]["classes"] == ["all_idb2", "ash_aml"] and m["dataset"]["n_images"] == 20
    split = json.loads(next((tmp_path / "out" / "splits").glob("*.json")).read_text())
    origin = np.arange(8 * 20) // 8
    parts = [set(origin[split[p]]) for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    with pytest.raises(ValueError, match="classes"):
        _run(tmp_path / "bad", "--dataset=all_aml_healthy", f"--manual_dir={root}",
             f"--data_dir={tmp_path / 'tfds'}", "--classes=AML,leukocyte")


def test_standin_and_lab_probe_builders(shared_dir, tmp_path):
    from leukax.data import load_arrays
    ds = load_arrays("all_aml_healthy_standin", 32, data_dir=tmp_path, manual_dir=shared_dir / "data")
    assert ds.class_names == ("ALL", "AML", "healthy") and ds.counts == {"ALL": 30, "AML": 10, "healthy": 30}
    src = np.asarray(ds.sources)
    assert set(src[ds.labels == 1]) == {"aml_lmu"} and set(src[ds.labels != 1]) == {"cnmc2019"}
    probe = load_arrays("lab_probe", 32, data_dir=tmp_path, manual_dir=shared_dir / "data")
    assert probe.counts == {"cnmc_hem": 30, "lmu_lyt": 10}


def test_macro_curves_perfect_and_chance():
    from leukax import plots
    labels = np.repeat(np.arange(3), 4)
    grid = np.linspace(0, 1, 11)
    tpr, prec, auc, ap = plots._macro_curves(labels, np.eye(3)[labels], grid)
    assert auc == 1.0 and ap == 1.0 and np.all(tpr[1:] == 1.0) and np.all(prec == 1.0)
    tpr, _, auc, _ = plots._macro_curves(labels, np.full((12, 3), 1 / 3), grid)
    assert auc == 0.5
    np.testing.assert_allclose(tpr, grid)  # all scores tied: the diagonal
