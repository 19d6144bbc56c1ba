"""experiments/dev_suite.py: its scores and paired differences, and a tiny-scale run (random-weight MobileNetV2 at
32 px on the embedded C-NMC 2019 sample, 2 folds, M = 2, 1 epoch)."""
import json

import numpy as np
import pytest

from experiments import common, dev_suite


def test_split_scores_and_selective_accuracy():
    y = np.arange(20) % 2
    p = np.full((20, 2), 0.05)
    p[np.arange(20), y] = 0.95
    p[:2] = [[0.45, 0.55], [0.55, 0.45]]   # the two least confident cells are wrong (labels 0, 1)
    s = dev_suite.split_scores(y, p, coverage=0.9)
    assert s["accuracy"] == pytest.approx(0.9) and s["acc_at_coverage"] == pytest.approx(1.0)
    assert dev_suite.split_scores(y, p, coverage=1.0)["acc_at_coverage"] == pytest.approx(0.9)


def test_paired_differences_and_verdict():
    d = dev_suite.paired([0.9, 0.8, 0.85, 0.9], [0.8, 0.7, 0.8, 0.85])
    np.testing.assert_allclose(d["per_split"], [0.1, 0.1, 0.05, 0.05], atol=1e-12)
    assert d["mean"] == pytest.approx(0.075) and d["se"] == pytest.approx(np.std([.1, .1, .05, .05], ddof=1) / 2)
    assert (d["wins"], d["losses"], d["verdict"]) == (4, 0, "wins")
    assert dev_suite.paired([0.8, 0.7], [0.9, 0.8])["verdict"] == "loses"
    assert dev_suite.paired([0.8, 0.9], [0.9, 0.8])["verdict"] == "tie"
    nll = dev_suite.paired([0.3, 0.4], [0.5, 0.6], higher_is_better=False)   # lower NLL: a is better
    assert (nll["mean"], nll["wins"], nll["verdict"]) == (pytest.approx(-0.2), 2, "wins")


def test_tiny_suite_run_is_consistent_with_its_saved_predictions(tmp_path):
    cfg = common.parse_argv(dev_suite.Config, [
        "prog", f"--out_dir={tmp_path}", "--datasets=cnmc2019", "--weights=none", "--image_size=32", "--members=2",
        "--folds=2", "--repeats=1", "--epochs=1", "--heads=probe,dense,gru_pool", "--units=4", "--hidden=4",
        "--feature_dim=8", "--batch_size=8"])
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
    assert "| cnmc2019 (S=2) | mobilenet_v2 |" in dev_suite.summary_table(m)
