"""Named configurations (experiments/configs/): the papers' documented values, flag precedence, clear errors,
and a tiny end-to-end study per configuration.

The paper numbers below are typed in from the papers (../shared/papers), each with its table or section, and
compared with what the configurations and the code they select actually use: a changed value fails here.
Tiny runs: random-weight backbones at 32 px, 2 members, 1-2 epochs (plumbing, not accuracy).
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import common, feature_fusion, hybrid_gru
from leukax.train import bayes, recipe
from leukax.train.finetune import ImageStream

# Akter et al. 2024, Table 2 (hyper-parameters after Bayesian optimisation), as printed.
AKTER_TABLE2 = {
    "inception_v3": dict(units=512, optimizer="sgd", learning_rate=0.01, momentum=0.3, dropout=0.4),
    "mobilenet_v2": dict(units=512, optimizer="sgd", learning_rate=0.01, momentum=0.9, dropout=0.1),
    "efficientnet_b3": dict(units=256, optimizer="rmsprop", learning_rate=0.0001, momentum=0.5, dropout=0.1),
}
# Akter et al. Tables 3, 6, 7: (training, test) images after augmentation; (all images before it).
AKTER_COUNTS = {"all_idb1": ((689, 22), 108), "all_idb2": ((1664, 52), 260), "all_idb": ((2353, 74), 368)}
# Himel et al. 2024, Table 1, and Sec. III-C (branch head Dense(1024) → Dropout(0.3)), Sec. III-B (16 copies).
HIMEL_TABLE1 = dict(batch_size=32, epochs=100, patience=50, split=(0.7, 0.1, 0.2))

TINY = ["--weights=none", "--image_size=32", "--members=2", "--batch_size=8"]


def test_akter2024_is_the_papers_method():
    c = common.named_config(hybrid_gru.Config, "akter2024")
    assert c.hparams == "paper" and recipe.PAPER_TABLE2 == AKTER_TABLE2            # Table 2, whole rows
    assert c.image_size == 224                                                      # Sec. 3.2.2: 224 × 224
    assert (c.views, c.augment) == ("none", "copies") and c.smoothing != "none"     # Sec. 3.2, 3.2.1
    assert c.order == "raster" and c.feature_dim == 0                               # flattened map, no PCA
    assert (c.weight_decay, c.label_smoothing, c.input_dropout) == (0.0, 0.0, 0.0)
    assert c.protocol == "paper_80_20" and c.leaky and c.val_fraction == 0.2       # Sec. 4.3: 80/20, 20 % val
    assert set(c.backbones) == set(AKTER_TABLE2) and c.heads == ("gru",)
    # Tables 3, 6, 7: about 8 stored training items per training image (1 original + num_affine copies),
    # an un-augmented test part of 20 %.
    for (train, test), n in AKTER_COUNTS.values():
        assert round(0.2 * n) == test and abs(train / (n - test) - (1 + c.num_affine)) < 0.02


def test_akter2024_bo_space_contains_table2():
    """--hparams=bo searches RECIPE_SPACE; every Table 2 point must lie in it (the paper gives no space)."""
    s = bayes.RECIPE_SPACE
    for row in AKTER_TABLE2.values():
        assert row["units"] in s["units"] and row["optimizer"] in s["optimizer"]
        assert s["log10_lr"][0] <= np.log10(row["learning_rate"]) <= s["log10_lr"][1]
        assert s["momentum"][0] <= row["momentum"] <= s["momentum"][1]
        assert s["dropout"][0] <= row["dropout"] <= s["dropout"][1]


def test_himel2024_is_the_papers_method():
    c = common.named_config(feature_fusion.Config, "himel2024")
    assert (c.batch_size, c.epochs, c.patience) == (HIMEL_TABLE1["batch_size"], HIMEL_TABLE1["epochs"],
                                                     HIMEL_TABLE1["patience"])
    assert c.features == 1024 and c.dropout == 0.3 and c.enhance and c.image_size == 224
    assert c.branches == ("efficientnet_b7", "mobilenet_v3_large")
    assert c.protocol == "paper" and c.expand == 16 and c.members == 1
    labels = np.arange(1000) % 2
    (s,) = feature_fusion.make_splits(c, labels, np.arange(1000), ["a", "b"])
    assert (len(s.train), len(s.val), len(s.test)) == tuple(int(f * 1000) for f in HIMEL_TABLE1["split"])


def test_leukax_config_is_todays_defaults():
    assert common.named_config(hybrid_gru.Config, "leukax") == hybrid_gru.Config(config="leukax")


def test_flags_override_single_fields():
    c = common.parse_argv(hybrid_gru.Config, ["p", "--config=akter2024", "--members=3", "--feature_dim=256",
                                              "--noleaky"])
    assert (c.members, c.feature_dim, c.leaky) == (3, 256, False)   # given: the flag wins, even at its default
    assert c.order == "raster" and c.num_affine == 7 and c.config == "akter2024"   # not given: the config's
    argv = common.command_line("experiments.hybrid_gru", c).split()[3:]
    assert common.parse_argv(hybrid_gru.Config, ["p", *argv]) == c   # the recorded command reproduces it
    assert common.parse_argv(hybrid_gru.Config, ["p"]) == hybrid_gru.Config()


@pytest.mark.parametrize("module, name, message", [
    ("experiments.hybrid_gru", "akter2025", "is not a named configuration; known: akter2024, himel2024, leukax"),
    ("experiments.feature_fusion", "akter2024", "configures experiments.hybrid_gru, not experiments.feature_fusion"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, module, name, message):
    r = subprocess.run([sys.executable, "-m", module, f"--config={name}", f"--out_dir={tmp_path / 'o'}"],
                       capture_output=True, text=True, timeout=300, cwd=common.REPO,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "o").exists()


def test_finetune_honours_table2(monkeypatch):
    """--mode=finetune --hparams=paper trains with the backbone's Table 2 row (units, optimizer, lr, momentum,
    dropout), not the recipe flags (InceptionV3: its row differs from akter2024's recipe fields in every value
    but the optimizer and learning rate)."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_make_train(tcfg, model, *a, **k):
        seen.update(tcfg=tcfg, head=model.head)
        raise Stop

    monkeypatch.setattr(hybrid_gru, "make_train", fake_make_train)
    cfg = common.named_config(hybrid_gru.Config, "akter2024", mode="finetune")
    split = type("S", (), dict(train=np.arange(4), val=np.arange(4, 6), test=np.arange(6, 8)))
    hybrid = dict(name="inception_v3", inputs=ImageStream(None, np.arange(8), 32), module=None, variables=None,
                  spec=type("Sp", (), dict(normalization="tf")))
    with pytest.raises(Stop):
        hybrid_gru.train_finetune(cfg, hybrid, split, np.zeros(8, np.int32), 2, 0)
    t, row = seen["tcfg"], AKTER_TABLE2["inception_v3"]
    assert (cfg.momentum, cfg.dropout) != (row["momentum"], row["dropout"])  # so the check below can fail
    assert (t.optimizer, t.learning_rate, t.momentum, t.dropout_rate) == (row["optimizer"], row["learning_rate"],
                                                                        row["momentum"], row["dropout"])
    assert seen["head"].units == row["units"]


def test_akter2024_tiny_study_on_all_idb2_layout(tmp_path, monkeypatch, capfd):
    """--config=akter2024 on folders laid out like ALL-IDB2: the paper's per-image 80/20 split, training part
    stored as 8 copies (original + 7 affine), un-augmented validation and test, Table 2, recorded name."""
    from tests.test_feature_fusion import _manual_root  # ALL-IDB2 + ASH fixtures, 8+ cells per class
    _manual_root(tmp_path / "manual")
    seen = []
    real = recipe.train_and_predict

    def spy(kind, rcp, hp, k, train_x, train_y, val_x, test_x, val_y, **kw):
        seen.append((np.shape(train_x), len(train_y), np.shape(val_x)[0], np.shape(test_x)[0], kw["units"], kw["order"]))
        return real(kind, rcp, hp, k, train_x, train_y, val_x, test_x, val_y, **kw)

    monkeypatch.setattr(recipe, "train_and_predict", spy)
    cfg = common.parse_argv(hybrid_gru.Config, ["p", "--config=akter2024", f"--out_dir={tmp_path / 'out'}", *TINY,
                                                "--epochs=1", "--backbones=mobilenet_v2", "--dataset=all_idb2",
                                                f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'tfds'}"])
    m = hybrid_gru.run(cfg)
    out, err = capfd.readouterr()
    assert "epoch 1/1: train loss" in err and "hybrid_gru: split r0_f0 (1/1), mobilenet_v2" in out   # progress
    split = json.loads(next((tmp_path / "out" / "splits").glob("*.json")).read_text())
    (train_shape, n_train, v_val, v_test, units, order), = seen
    assert train_shape[0] == 1 and n_train == train_shape[1] == 8 * len(split["train"])   # stored copies
    assert v_val == v_test == 1                                                          # un-augmented
    assert units == 512 and order == "raster"                                            # Table 2, raster
    assert m["config"] == "akter2024" and json.loads((tmp_path / "out" / "config.json").read_text())["config"] == "akter2024"
    assert "--config=akter2024" in m["command"] and m["model"]["tta"] is False
    rec = m["hybrids"][0]
    assert rec["smoothing"] == "gaussian" and rec["feature_shape"][0] == 8 and rec["image_size"] == 32
    assert "ungrouped-leaky" in m["protocol"]["name"]
    assert (tmp_path / "out" / "figures" / "augmentation_examples.png").is_file()   # Fig. 2
    sizes = m["protocol"]["first_split_sizes"]
    assert sizes["train_items_stored"] == 8 * sizes["train"] == 8 * len(split["train"])


def test_himel2024_tiny_study_on_all_idb2_ash_layout(tmp_path):
    """--config=himel2024 on folders laid out like ALL-IDB2 + ASH: 16 copies, per-image 70/10/20, recorded name."""
    from tests.test_feature_fusion import _manual_root
    root = _manual_root(tmp_path / "manual")
    cfg = common.parse_argv(feature_fusion.Config, [
        "p", "--config=himel2024", f"--out_dir={tmp_path / 'out'}", "--weights=none", "--image_size=32", "--epochs=1",
        "--patience=1", "--gradcam_per_class=1", "--branches=mobilenet_v2,efficientnet_lite0", "--baselines=",
        "--dataset=all_aml_healthy", f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}"])
    assert cfg.batch_size == 32 and cfg.features == 1024
    m = feature_fusion.run(cfg)
    assert m["config"] == "himel2024" and m["dataset"]["expand"] == 16 and m["protocol"]["splits"] == 1
    assert "ungrouped-leaky" in m["protocol"]["name"] and "batch 32" in m["protocol"]["training"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["config"] == "himel2024"


def test_rows_named_after_the_network_that_ran(shared_dir, monkeypatch):
    """A substituted backbone is labelled `used (for requested)` and its weights' provenance is recorded."""
    monkeypatch.setenv("LEUKAX_OFFLINE", "1")
    rec = common.load_backbone("efficientnet_b3", "imagenet", shared_dir / "weights", "efficientnet_lite2")[3]
    assert rec["label"] == "efficientnet_lite2 (for efficientnet_b3)"
    assert rec["weights_file"].startswith("efficientnet_lite2.npz") and "Lite2" in rec["differs_from_paper"]
    rec = common.load_backbone("mobilenet_v2", "imagenet", shared_dir / "weights")[3]
    assert rec["label"] == "mobilenet_v2" and "coral" in rec["weights_file"]
    assert "quantisation-aware" in rec["differs_from_paper"]
