"""End-to-end runs of experiments/hybrid_gru.py at tiny scale (experiments/feature_fusion.py: tests/test_feature_fusion.py).

Random-weight backbones at 32 px on the embedded C-NMC 2019 sample (60 images), M=2, 1-2 epochs, 2 folds.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, feature_fusion, hybrid_gru
from leukax import fusion
from leukax.train import bayes

TINY = ["--weights=none", "--image_size=32", "--members=2", "--folds=2", "--batch_size=8"]


def _parse(cls, out_dir, *extra):
    return common.parse_argv(cls, ["prog", f"--out_dir={out_dir}", *TINY, *extra])


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid_gru")
    cfg = _parse(hybrid_gru.Config, out, "--backbones=mobilenet_v2,efficientnet_lite0", "--epochs=2",
                 "--heads=probe,gru", "--units=8", "--hidden=8", "--feature_dim=16")
    return out, hybrid_gru.run(cfg)


def test_flags_round_trip():
    cfg = _parse(hybrid_gru.Config, "/tmp/x", "--backbones=a,b", "--leaky", "--hparams=bo")
    assert cfg.backbones == ("a", "b") and cfg.leaky is True and cfg.members == 2 and cfg.hparams == "bo"
    argv = common.command_line("experiments.hybrid_gru", cfg).split()[3:]
    assert common.parse_argv(hybrid_gru.Config, ["prog", *argv]) == cfg
    ff = common.parse_argv(feature_fusion.Config, ["prog", "--noenhance", "--branch_fallbacks="])
    assert ff.enhance is False and ff.branch_fallbacks == () and ff.branches == ("efficientnet_b7", "mobilenet_v3_large")


def test_hybrid_gru_outputs(hybrid_run):
    out, m = hybrid_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["fused"]["gru"]["test_mean_std"]["accuracy"] == m["fused"]["gru"]["test_mean_std"]["accuracy"]
    assert set(m["per_hybrid"]) == {"mobilenet_v2", "efficientnet_lite0"}
    assert all(set(h) == {"probe", "gru"} for h in m["per_hybrid"].values()) and set(m["fused"]) == {"probe", "gru"}
    assert [h["weights"] for h in m["hybrids"]] == ["random init"] * 2
    assert [h["feature_shape"][0] for h in m["hybrids"]] == [8, 8]  # 8 dihedral views cached per image
    for part in [p for h in m["per_hybrid"].values() for p in h.values()] + list(m["fused"].values()):
        stats = part["test_mean_std"]
        cal = part["calibration_mean_std"]
        assert cal["temperature"]["mean"] > 0 and len(cal["ece_after"]["per_split"]) == 2
        for key in common.metric_keys(2):
            assert key in stats and len(stats[key]["per_split"]) == 2
        assert 0.0 <= stats["accuracy"]["mean"] <= 1.0
        assert {"predictive_entropy", "mutual_information", "variance_pred", "aurc"} <= set(part["uncertainty_mean_std"])
        assert len(part["referral_per_split"]) == 2
    hp = m["per_hybrid"]["mobilenet_v2"]["gru"]["hparams_per_split"][0]
    assert (hp["units"], hp["optimizer"], hp["source"]) == (8, "adamw", "recipe flags")
    assert m["paper_reported"]["accuracy"]["all_idb2"] == 0.9807 and "Akter" in m["paper_reported"]["source"]
    assert "stratified_group_kfold" in m["protocol"]["name"] and m["dataset"]["n"] == 60
    assert (out / "config.json").exists() and m["command"].startswith("python -m experiments.hybrid_gru")
    assert len(list((out / "splits").glob("*.json"))) == 2
    for name in ("confusion_matrix_fused", "roc_fused", "reliability_fused", "accuracy_coverage_fused",
                 "training_curves_first", "confusion_matrix_mobilenet_v2", "training_curves_first_mobilenet_v2",
                 "training_curves_first_efficientnet_lite0"):  # Fig. 9: every hybrid, not only the first
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000


def test_hybrid_gru_sum_rule_consistent(hybrid_run):
    """The fused probabilities are the sum rule written out by hand, and the reported per-fold accuracies and
    their mean are recomputed from the saved predictions and the saved splits."""
    out, m = hybrid_run
    z = np.load(out / "predictions_first_repeat.npz")
    h0, h1, fz = z["probs_mobilenet_v2_gru"], z["probs_efficientnet_lite0_gru"], z["probs_fused_gru"]
    assert h0.shape == h1.shape == fz.shape == (60, 2)
    total = h0 + h1  # sum rule: Σ_h p_h, normalised over classes
    np.testing.assert_allclose(fz, total / total.sum(-1, keepdims=True), atol=1e-6)
    assert not np.allclose(fz, h0, atol=1e-4) and not np.allclose(fz, h1, atol=1e-4)
    labels = np.empty(60, int)
    labels[z["index"]] = z["labels"]
    fused = np.empty((60, 2))
    fused[z["index"]] = fz
    pooled = m["fused"]["gru"]["pooled_first_repeat"]
    assert pooled["n"] == 60
    assert pooled["accuracy"] == pytest.approx(np.mean(fused.argmax(-1) == labels), abs=1e-6)
    # per fold: accuracy on that fold's saved test indices; then their mean and (population) std
    folds = [json.loads((out / "splits" / f"r0_f{f}.json").read_text()) for f in range(2)]
    accs = [np.mean(fused[s["test"]].argmax(-1) == labels[s["test"]]) for s in folds]
    assert sorted(np.concatenate([s["test"] for s in folds]).tolist()) == list(range(60))
    reported = m["fused"]["gru"]["test_mean_std"]["accuracy"]
    np.testing.assert_allclose(reported["per_split"], accs, atol=1e-6)
    assert reported["mean"] == pytest.approx(np.mean(accs), abs=1e-6)
    assert reported["std"] == pytest.approx(np.std(accs), abs=1e-6)
    # NLL per fold from the saved predictions (float32 clip at eps, as leukax.metrics.nll)
    nlls = [-np.mean(np.log(np.clip(fused[s["test"], labels[s["test"]]], np.finfo(np.float32).eps, 1)))
            for s in folds]
    np.testing.assert_allclose(m["fused"]["gru"]["test_mean_std"]["nll"]["per_split"], nlls, atol=1e-5)


def test_hybrid_gru_validation_fitted_fusion_rows(hybrid_run):
    """Beside the sum rule, `fused_fitted` applies weights fitted on each split's validation predictions and
    `fused_chosen` the rule chosen there: both recomputed from the saved per-split validation / test means."""
    out, m = hybrid_run
    z = np.load(out / "predictions_per_split.npz")
    for i in range(2):
        y_va = z["labels"][z[f"split{i}_val_index"]]
        va = np.stack([z[f"split{i}_{h}_gru_val"] for h in ("mobilenet_v2", "efficientnet_lite0")])
        te = np.stack([z[f"split{i}_{h}_gru_test"] for h in ("mobilenet_v2", "efficientnet_lite0")])
        choice = fusion.choose_rule(va, y_va)
        for row, w in (("fused_fitted", choice["fitted_weights"]), ("fused_chosen", choice["weights"])):
            hp = m[row]["gru"]["hparams_per_split"][i]
            assert hp["rule"] == choice["rule"] and np.allclose(hp["fitted_weights"], choice["fitted_weights"])
            expect = np.asarray(fusion.weighted_rule(te, w))
            np.testing.assert_allclose(z[f"split{i}_{row}_gru_test"], expect, atol=1e-6)
            y_te = z["labels"][z[f"split{i}_test_index"]]
            assert m[row]["gru"]["test_mean_std"]["accuracy"]["per_split"][i] == pytest.approx(
                np.mean(expect.argmax(-1) == y_te), abs=1e-6)
    assert "fused (validation-fitted weights)" in hybrid_gru.summary_table(m)


def test_hybrid_gru_pooled_calibration_from_saved_splits(hybrid_run):
    """The pooled out-of-fold calibration is recomputed by hand from predictions_per_split.npz: every cell's test
    prediction (before, and after its fold's temperature) concatenated over the folds of the repeat."""
    out, m = hybrid_run
    z = np.load(out / "predictions_per_split.npz")
    labels = z["labels"]
    test = np.concatenate([z[f"split{i}_test_index"] for i in range(2)])
    assert sorted(test.tolist()) == list(range(60))
    for i in range(2):  # validation and test parts of a split are disjoint and match the saved split files
        s = json.loads((out / "splits" / f"r0_f{i}.json").read_text())
        assert z[f"split{i}_val_index"].tolist() == s["val"] and z[f"split{i}_test_index"].tolist() == s["test"]
    probs = np.concatenate([z[f"split{i}_fused_gru_test"] for i in range(2)])
    pooled = m["fused"]["gru"]["calibration_pooled_per_repeat"]
    from leukax import metrics
    assert pooled["ece_before"]["mean"] == pytest.approx(float(metrics.ece(labels[test], probs)), abs=1e-6)
    assert len(pooled["ece_after"]["per_split"]) == 1  # one repeat
    from leukax import calibration
    sigma = json.loads((out / "config.json").read_text())["temperature_prior"]
    assert sigma == calibration.PRIOR_SCALE  # the default: the MAP T under the suite's prior
    cal = []
    for i in range(2):  # each fold's T from its own validation part, applied to its own test part
        t = calibration.fit_temperature(jnp.asarray(labels[z[f"split{i}_val_index"]]), z[f"split{i}_fused_gru_val"],
                                        sigma)
        cal.append(np.asarray(calibration.apply_temperature(z[f"split{i}_fused_gru_test"], t)))
        assert float(t) == pytest.approx(m["fused"]["gru"]["calibration_mean_std"]["temperature"]["per_split"][i], rel=1e-5)
    assert pooled["ece_after"]["mean"] == pytest.approx(float(metrics.ece(labels[test], np.concatenate(cal))), abs=1e-5)
    assert pooled["nll_after"]["mean"] == pytest.approx(float(metrics.nll(labels[test], np.concatenate(cal))), abs=1e-5)


def test_mean_std_by_hand():
    """Aggregation over splits: mean and population std of the per-split values; None (a metric undefined in
    that split) is kept in per_split and left out of mean and std. Random-weight runs tie across folds, so
    this is where a wrong mean or std can show."""
    reports = [{"accuracy": 0.5, "binary": {"f1": 0.2}}, {"accuracy": 1.0, "binary": {"f1": None}},
               {"accuracy": 0.6, "binary": {"f1": 0.4}}]
    out = common.mean_std(reports, ["accuracy", "binary.f1"])
    assert out["accuracy"]["per_split"] == [0.5, 1.0, 0.6]
    assert out["accuracy"]["mean"] == pytest.approx(0.7)
    assert out["accuracy"]["std"] == pytest.approx(np.sqrt((0.2 ** 2 + 0.3 ** 2 + 0.1 ** 2) / 3))
    assert out["binary.f1"]["per_split"] == [0.2, None, 0.4]
    assert out["binary.f1"]["mean"] == pytest.approx(0.3) and out["binary.f1"]["std"] == pytest.approx(0.1)
    assert common.mean_std([{"a": None}], ["a"])["a"] == {"mean": None, "std": None, "per_split": [None]}


def test_hybrid_gru_bo_paper_protocol(tmp_path):
    cfg = _parse(hybrid_gru.Config, tmp_path, "--backbones=mobilenet_v2", "--epochs=1", "--members=1", "--hparams=bo",
                 "--bo_trials=2", "--bo_batch=2", "--bo_vector=2", "--protocol=paper_80_20", "--leaky", "--heads=gru",
                 "--feature_dim=16", "--views=none")
    m = hybrid_gru.run(cfg)
    assert "ungrouped-leaky" in m["protocol"]["name"] and m["protocol"]["splits"] == 1
    trials = bayes.load_log(tmp_path / "bo" / "mobilenet_v2_r0_f0.json")
    assert len(trials) == 2 and all(set(t["info"]) >= {"val_acc", "val_nll"} for t in trials)
    hp = m["per_hybrid"]["mobilenet_v2"]["gru"]["hparams_per_split"][0]
    best = max(trials, key=lambda t: t["target"])
    assert hp["units"] == best["params"]["units"] and "BO trial" in hp["source"]
    assert hp["optimizer"] == best["params"]["optimizer"] and "optimizer_index" not in hp
    assert hp["learning_rate"] == pytest.approx(10 ** best["params"]["log10_lr"])


def test_paper_hparams_are_the_whole_table2_row():
    """--hparams=paper: units, optimizer, learning rate, momentum and dropout of Akter et al.'s Table 2, a constant
    learning rate and no label smoothing; --optimizer=sgd --momentum=0 in the recipe gives momentum 0."""
    cfg = _parse(hybrid_gru.Config, "/tmp/x", "--hparams=paper")
    rcp, hp, units, source = hybrid_gru.split_hparams(cfg, "inception_v3", None, None, None, None, 2, "/tmp/x")
    assert (units, rcp.optimizer, rcp.schedule, rcp.label_smoothing) == (512, "sgd", "constant", 0.0)
    assert (hp["learning_rate"], hp["momentum"], hp["dropout"]) == (0.01, 0.3, 0.4) and "Table 2" in source
    rcp, hp, units, _ = hybrid_gru.split_hparams(cfg, "efficientnet_b3", None, None, None, None, 2, "/tmp/x")
    assert (units, rcp.optimizer, hp["learning_rate"], hp["momentum"]) == (256, "rmsprop", 1e-4, 0.5)
    cfg = _parse(hybrid_gru.Config, "/tmp/x", "--optimizer=sgd", "--momentum=0")
    rcp, hp, _, _ = hybrid_gru.split_hparams(cfg, "mobilenet_v2", None, None, None, None, 2, "/tmp/x")
    assert rcp.optimizer == "sgd" and hp["momentum"] == 0.0


def test_load_backbone_substitution(shared_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKAX_OFFLINE", "1")
    monkeypatch.setenv("LEUKAX_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="efficientnet_b3"):
        common.load_backbone("efficientnet_b3", "imagenet", shared_dir / "weights", substitute="")
    _, variables, spec, rec = common.load_backbone("efficientnet_b3", "imagenet", shared_dir / "weights",
                                                       substitute="efficientnet_lite0")
    assert rec["used"] == "efficientnet_lite0" and "efficientnet_b3" in rec["substitution"]
    assert spec.normalization == "lite" and rec["weights"] == "imagenet"
    _, random_vars, _, rec0 = common.load_backbone("efficientnet_lite0", "none", None)
    assert rec0["params"] == rec["params"]  # same network, and the file's values were loaded into it
    loaded, random = (jax.tree_util.tree_leaves(v["params"]) for v in (variables, random_vars))
    assert not any(np.allclose(a, b) for a, b in zip(loaded, random) if a.size > 1000)


@pytest.mark.parametrize("flags, message", [
    (["--folds=40"], "cannot split this dataset"),
    (["--dataset=all_idb2", "--manual_dir={tmp}"], "must be downloaded by hand"),
    (["--backbones=resnet9000"], "unknown backbone"),
    (["--hparams=paper", "--backbones=xception"], "Table 2 has no row"),
])
def test_bad_inputs_end_with_one_line_before_any_work(tmp_path, flags, message):
    """A dataset too small for the folds, a manual folder with the wrong layout, an unknown backbone, or paper
    hyper-parameters for a backbone the paper did not use: exit 2, one line naming the problem, no traceback,
    nothing written (checked before any feature extraction)."""
    import subprocess
    import sys
    out = tmp_path / "out"
    argv = [f.format(tmp=tmp_path) for f in flags]
    r = subprocess.run([sys.executable, "-m", "experiments.hybrid_gru", f"--out_dir={out}", "--weights=none", *argv],
                       capture_output=True, text=True, timeout=300, cwd=common.REPO,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "LEUKAX_DATA_DIR": str(tmp_path / "tfds")})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr
    assert not (out / "metrics.json").exists() and not (out / "figures").exists()


def test_paper_80_20_is_64_16_20():
    labels = np.arange(100) % 2
    (s,) = common.make_splits("paper_80_20", labels, np.arange(100), ["a", "b"], folds=5, repeats=1,
                              val_fraction=0.2, seed=0, leaky=True)
    assert (len(s.train), len(s.val), len(s.test)) == (64, 16, 20)


def _read_scalars(logdir) -> dict:
    """{tag: [(step, value)]} from the TensorBoard event files under logdir (TFRecord framing, Event protos)."""
    import struct
    from tensorboardX.proto import event_pb2
    out = {}
    for f in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12: pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_write_history_means_the_members_still_training(tmp_path):
    common.write_history(tmp_path, "mobilenet_v2/gru", {"val_loss": np.array([[1.0, 0.5, np.nan], [3.0, 1.5, 0.25]]),
                                                        "val_acc": np.array([[np.nan, np.nan, np.nan]])})
    s = _read_scalars(tmp_path)
    assert set(s) == {"val_loss/mobilenet_v2/gru"}  # an all-NaN curve writes nothing
    assert s["val_loss/mobilenet_v2/gru"] == [(1, 2.0), (2, 1.0), (3, 0.25)]


def test_write_history_tags_use_tensorboards_alphabet(tmp_path):
    common.write_history(tmp_path, "efficientnet_lite2 (for efficientnet_b3)/gru", {"val_acc": np.array([[0.5]])})
    assert set(_read_scalars(tmp_path)) == {"val_acc/efficientnet_lite2_for_efficientnet_b3/gru"}


def test_write_history_calls_in_one_second_keep_every_curve(tmp_path):
    for bb in ("a", "b", "c"):  # one split, several hybrids, written within the same second
        common.write_history(tmp_path, f"{bb}/gru", {"val_loss": np.array([[1.0, 0.5]])})
    assert set(_read_scalars(tmp_path)) == {"val_loss/a/gru", "val_loss/b/gru", "val_loss/c/gru"}


def test_hybrid_gru_writes_tensorboard_curves_per_split(hybrid_run):
    out, m = hybrid_run
    for sid in ("r0_f0", "r0_f1"):
        s = _read_scalars(out / "tensorboard" / sid)
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            for bb in ("mobilenet_v2", "efficientnet_lite0"):
                steps = [step for step, _ in s[f"{key}/{bb}/gru"]]
                assert steps == [1, 2] and all(np.isfinite(v) for _, v in s[f"{key}/{bb}/gru"])


def test_hybrid_gru_finetune_mode_streams_its_images(tmp_path, monkeypatch):
    """--mode=finetune trains backbone + GRU on images read from the TFDS source batch by batch (an ImageStream
    per part, never an image array) and reports every split."""
    seen, make_train = [], hybrid_gru.make_train
    monkeypatch.setattr(hybrid_gru, "make_train", lambda tcfg, model, tr, va, **k: (
        seen.append((type(tr[0]).__name__, type(va[0]).__name__)), make_train(tcfg, model, tr, va, **k))[1])
    cfg = _parse(hybrid_gru.Config, tmp_path, "--mode=finetune", "--backbones=mobilenet_v2", "--epochs=1",
                 "--members=1", "--units=4", "--hidden=4", "--heads=gru", "--nosave_model", "--quiet")
    m = hybrid_gru.run(cfg)
    assert seen == [("ImageStream", "ImageStream")] * 2
    acc = m["per_hybrid"]["mobilenet_v2"]["gru"]["test_mean_std"]["accuracy"]["per_split"]
    assert len(acc) == 2 and all(0 <= a <= 1 for a in acc)
    assert m["hybrids"][0]["feature_shape"] == [32, 32, 3] and m["model"]["mode"] == "finetune"
