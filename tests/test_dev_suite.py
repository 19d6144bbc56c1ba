"""experiments/dev_suite.py: its scores and paired differences, and a tiny-scale run (random-weight MobileNetV2 at
32 px on the embedded C-NMC 2019 sample, 2 folds, M = 2, 1 epoch)."""
import dataclasses
import json

import numpy as np
import pytest

from experiments import common, dev_suite
from leukax import fusion


def test_split_scores_and_selective_accuracy():
    y = np.arange(20) % 2
    p = np.full((20, 2), 0.05)
    p[np.arange(20), y] = 0.95
    p[:2] = [[0.45, 0.55], [0.55, 0.45]]   # the two least confident cells are wrong (labels 0, 1)
    s = dev_suite.split_scores(y, p, coverage=0.9)
    assert s["accuracy"] == pytest.approx(0.9) and s["acc_at_coverage"] == pytest.approx(1.0)
    assert dev_suite.split_scores(y, p, coverage=1.0)["acc_at_coverage"] == pytest.approx(0.9)
    # The lab's referral: the confidence threshold keeping 90 % of the validation cells, applied to the test cells.
    p_val = np.full((10, 2), 0.5)
    p_val[:, 0] = np.linspace(0.6, 0.96, 10)  # the 9 most confident validation cells reach 0.64
    v = dev_suite.split_scores(y, p, p_val, coverage=0.9)
    assert v["coverage_at_val_threshold"] == pytest.approx(0.9) and v["acc_at_val_threshold"] == pytest.approx(1.0)
    p_val[:, 0] = 0.99  # a validation threshold above every test confidence: no test cell is kept
    v = dev_suite.split_scores(y, p, p_val, coverage=0.9)
    assert v["kept_at_val_threshold"] == 0 and np.isnan(v["acc_at_val_threshold"])


def test_calibration_after_scaling_fits_on_validation_and_pools_the_scaled_test_cells():
    """An over-confident model (probabilities sharpened by T = 3 from calibrated ones): the temperature fitted on
    validation undoes it, the ECE falls to the level a calibrated model shows at that size (the null band), and
    the pooled ECE is that of the concatenated scaled test cells."""
    import jax.numpy as jnp
    from leukax import calibration, metrics
    rng = np.random.default_rng(0)

    def draw(n):  # calibrated probabilities, labels drawn from them, then made over-confident
        q = rng.uniform(0.5, 1.0, n)
        y = (rng.uniform(size=n) < q).astype(int)  # class 1 with probability q
        p = np.stack([1 - q, q], -1)
        return y, np.asarray(calibration.apply_temperature(jnp.asarray(p, jnp.float32), 1 / 3.0))

    parts = [draw(400) + draw(400) for _ in range(2)]
    out = dev_suite.calibration_after_scaling(parts, draws=500)
    for r in out["per_split"]:
        assert r["temperature"] == pytest.approx(3.0, rel=0.25)
        assert r["ece"] > 0.08 and r["ece_scaled"] < r["ece_null_p95"] < 0.08 and r["n"] == 400
    scaled = [np.asarray(calibration.apply_temperature(jnp.asarray(p_te), r["temperature"]))
              for (_, _, _, p_te), r in zip(parts, out["per_split"])]
    y = np.concatenate([y_te for _, _, y_te, _ in parts])
    assert out["pooled_n"] == 800 and out["pooled_ece_scaled"] == pytest.approx(
        float(metrics.ece(jnp.asarray(y), jnp.asarray(np.concatenate(scaled)))), abs=1e-5)


def test_paired_differences_and_verdict():
    d = dev_suite.paired([0.9, 0.8, 0.85, 0.9], [0.8, 0.7, 0.8, 0.85])
    np.testing.assert_allclose(d["per_split"], [0.1, 0.1, 0.05, 0.05], atol=1e-12)
    assert d["mean"] == pytest.approx(0.075) and d["se"] == pytest.approx(np.std([.1, .1, .05, .05], ddof=1) / 2)
    assert (d["wins"], d["losses"], d["verdict"]) == (4, 0, "wins")
    assert dev_suite.paired([0.8, 0.7], [0.9, 0.8])["verdict"] == "loses"
    assert dev_suite.paired([0.8, 0.9], [0.9, 0.8])["verdict"] == "tie"
    nll = dev_suite.paired([0.3, 0.4], [0.5, 0.6], higher_is_better=False)   # lower NLL: a is better
    assert (nll["mean"], nll["wins"], nll["verdict"]) == (pytest.approx(-0.2), 2, "wins")


def test_versus_baseline_pairs_the_same_splits_of_two_runs(tmp_path):
    """--baseline: every dataset × backbone × head of both runs gets this run − baseline per split (accuracy: higher
    is better, NLL: lower), fused rows excepted; a dataset whose split indices differ is left out, not paired."""
    def run(acc_gru, nll_gru, test_idx):
        heads = {"gru": {"accuracy": {"per_split": acc_gru}, "nll": {"per_split": nll_gru}},
                 "probe": {"accuracy": {"per_split": [0.5, 0.5]}, "nll": {"per_split": [1.0, 1.0]}}}
        m = {"command": "python -m experiments.dev_suite", "datasets": {
            name: {"backbones": {"mobilenet_v2": {"heads": heads}, "fused (sum rule)": {"heads": heads}}}
            for name in ("pbc", "cnmc2019")}}
        npz = {"pbc_r0_f0_test_index": np.array([1, 2]), "pbc_r0_f0_val_index": np.array([3]),
               "cnmc2019_r0_f0_test_index": np.array(test_idx), "cnmc2019_r0_f0_val_index": np.array([3])}
        return m, npz
    base_m, base_npz = run([0.8, 0.6], [0.5, 0.9], [1, 2])
    (tmp_path / "metrics.json").write_text(json.dumps(base_m))
    np.savez(tmp_path / "predictions_per_split.npz", **base_npz)
    m, npz = run([0.9, 0.5], [0.4, 0.7], [1, 4])
    vb = dev_suite.versus_baseline(m, npz, tmp_path)
    assert vb["baseline"] == str(tmp_path) and vb["baseline_command"] == base_m["command"]
    assert vb["datasets"]["cnmc2019"] == {"left out": "its splits differ from the baseline's"}
    assert set(vb["datasets"]["pbc"]) == {"mobilenet_v2"} and set(vb["datasets"]["pbc"]["mobilenet_v2"]) == {"gru", "probe"}
    gru = vb["datasets"]["pbc"]["mobilenet_v2"]["gru"]
    np.testing.assert_allclose(gru["accuracy"]["per_split"], [0.1, -0.1], atol=1e-12)
    np.testing.assert_allclose(gru["nll"]["per_split"], [-0.1, -0.2], atol=1e-12)
    assert (gru["nll"]["wins"], gru["accuracy"]["wins"], gru["accuracy"]["losses"]) == (2, 1, 1)
    m["versus_baseline"] = vb
    assert "| pbc | mobilenet_v2 | gru | +0.000 ± 0.141 | tie |" in dev_suite.summary_table(
        {**m, "model": {"heads": ["gru"]}, "datasets": {}})


def test_tiny_suite_run_is_consistent_with_its_saved_predictions(tmp_path):
    cfg = common.parse_argv(dev_suite.Config, [
        "prog", f"--out_dir={tmp_path}", "--datasets=cnmc2019", "--weights=none", "--image_size=32", "--members=2",
        "--folds=2", "--repeats=1", "--epochs=1", "--heads=probe,dense,gru_pool", "--units=4", "--hidden=4",
        "--feature_dim=8", "--batch_size=8", "--backbones=mobilenet_v2,efficientnet_lite0"])
    m = dev_suite.run(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text())["datasets"] == json.loads(json.dumps(m["datasets"]))
    assert m["complete"] is True and m["command"].startswith("python -m experiments.dev_suite")
    assert "commit" in m["environment"]
    sec = m["datasets"]["cnmc2019"]
    assert sec["n"] == 60 and sec["splits"] == 2
    bb = sec["backbones"]["mobilenet_v2"]
    assert set(bb["heads"]) == {"probe", "dense", "gru_pool"}
    assert set(bb["paired"]) == {"gru_pool - probe", "gru_pool - dense", "dense - probe"}
    z = np.load(tmp_path / "predictions_per_split.npz")
    labels = z["cnmc2019_labels"]
    for i, sid in enumerate(("r0_f0", "r0_f1")):   # the reported accuracies, recomputed from what was saved
        test = z[f"cnmc2019_{sid}_test_index"]
        split = json.loads((tmp_path / "splits" / "cnmc2019" / f"{sid}.json").read_text())
        assert sorted(split["test"]) == sorted(test.tolist())
        acc = {h: float(np.mean(z[f"cnmc2019_mobilenet_v2_{h}_{sid}_test"].argmax(-1) == labels[test]))
               for h in ("probe", "dense", "gru_pool")}
        for h, a in acc.items():
            assert bb["heads"][h]["accuracy"]["per_split"][i] == pytest.approx(a)
        assert bb["paired"]["gru_pool - probe"]["accuracy"]["per_split"][i] == pytest.approx(acc["gru_pool"] - acc["probe"])
        # fusion rows: the sum rule, weights fitted on the split's validation means, the rule chosen there
        va = np.stack([z[f"cnmc2019_{b}_dense_{sid}_val"] for b in ("mobilenet_v2", "efficientnet_lite0")])
        te = np.stack([z[f"cnmc2019_{b}_dense_{sid}_test"] for b in ("mobilenet_v2", "efficientnet_lite0")])
        choice = fusion.choose_rule(va, labels[z[f"cnmc2019_{sid}_val_index"]])
        for row, w in zip(dev_suite.FUSED_ROWS, ([1, 1], choice["fitted_weights"], choice["weights"])):
            f_te = np.asarray(fusion.weighted_rule(te, np.asarray(w, np.float32)))
            np.testing.assert_allclose(z[f"cnmc2019_{row.replace(' ', '_')}_dense_{sid}_test"], f_te, atol=1e-6)
            assert sec["backbones"][row]["heads"]["dense"]["accuracy"]["per_split"][i] == pytest.approx(
                np.mean(f_te.argmax(-1) == labels[test]))
    kept = [bb["heads"]["dense"][k]["per_split"] for k in ("kept_at_val_threshold", "correct_at_val_threshold")]
    assert bb["heads"]["dense"]["pooled_acc_at_val_threshold"] == pytest.approx(sum(kept[1]) / sum(kept[0]))
    cal = bb["heads"]["dense"]["calibration"]   # temperature on each split's validation part, ECE on its test part
    assert [r["n"] for r in cal["per_split"]] == [len(z[f"cnmc2019_{sid}_test_index"]) for sid in ("r0_f0", "r0_f1")]
    assert cal["pooled_n"] == 60 and all(r["ece_null_p95"] > 0 for r in cal["per_split"])
    assert "calibration" in sec["backbones"]["fused (sum rule)"]["heads"]["dense"]
    rc = dev_suite.recompute_calibration(tmp_path, m)["cnmc2019"]  # from the saved arrays alone, as for older runs
    for row in ("mobilenet_v2", "fused (validation-fitted)"):
        for kind in ("probe", "dense", "gru_pool"):
            got, want = rc[row][kind], sec["backbones"][row]["heads"][kind]["calibration"]
            assert got["pooled_ece_scaled"] == pytest.approx(want["pooled_ece_scaled"], abs=1e-5)
            assert [r["temperature"] for r in got["per_split"]] == pytest.approx([r["temperature"] for r in want["per_split"]], rel=1e-4)
    sweep = dev_suite.run(dataclasses.replace(cfg, recalibrate=str(tmp_path), prior_scales=(0.0, 0.5),
                                              heads=("dense",)))  # σ = 0 is the run's own maximum-likelihood fit
    ece = json.loads((tmp_path / "temperature_prior.json").read_text())["ece"]["cnmc2019"]
    assert ece == json.loads(json.dumps(sweep["ece"]["cnmc2019"])) and set(ece["mobilenet_v2"]) == {"dense"}
    for row in ("mobilenet_v2", "fused (sum rule)"):
        assert ece[row]["dense"]["0.0"]["pooled_ece_scaled"] == pytest.approx(
            sec["backbones"][row]["heads"]["dense"]["calibration"]["pooled_ece_scaled"], abs=1e-4)
        assert set(ece[row]["dense"]) == {"0.0", "0.5"}
    assert "--recalibrate=" in sweep["command"] and (tmp_path / "temperature_prior.md").exists()
    assert (tmp_path / "figures" / "selective_cnmc2019.png").stat().st_size > 1000
    assert "| cnmc2019 (S=2) | mobilenet_v2 |" in dev_suite.summary_table(m)


def test_suite_streams_a_labs_own_folder(tmp_path):
    """--datasets=folder:<path>: a folder of class subfolders joins the suite under its own name; its images
    stream into bfloat16 feature files in --feature_cache (as hybrid_gru's), never into memory as a whole."""
    from tests.fixtures import smooth_image
    root = tmp_path / "mylab"
    for c, cls in enumerate(("blast", "normal")):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            smooth_image(100 * c + i, 40, 36).save(root / cls / f"{cls}_{i}.png")
    cache = tmp_path / "features"
    cfg = common.parse_argv(dev_suite.Config, [
        "prog", f"--out_dir={tmp_path / 'out'}", f"--datasets=folder:{root}", f"--data_dir={tmp_path / 'tfds'}",
        "--weights=none", "--image_size=32", "--heads=probe", "--folds=2", "--repeats=1",
        "--feature_dim=8", f"--feature_cache={cache}"])
    m = dev_suite.run(cfg)
    sec = m["datasets"]["mylab"]
    assert sec["n"] == 20 and sec["classes"] == ["blast", "normal"] and sec["splits"] == 2
    assert len(sec["backbones"]["mobilenet_v2"]["heads"]["probe"]["accuracy"]["per_split"]) == 2
    files = sorted(cache.glob("devsuite_mylab_mobilenet_v2_32_*.npy"))
    assert len(files) == 1
    f = np.load(files[0], mmap_mode="r")   # V×N×T×C, bfloat16 stored as its 16 bits
    assert f.shape[:2] == (8, 20) and f.dtype == np.uint16
    with pytest.raises(common.InputError, match="unknown"):
        dev_suite.run(dataclasses.replace(cfg, datasets=("mylab",)))
