"""End to end at tiny scale: the quickstart trains, evaluates and saves a bundle; predict reads it back."""
import json

import numpy as np
import pytest

from experiments import common, quickstart
from leukax import bundle as bundle_lib
from leukax import predict
from leukax.data.builders import sample_dir


@pytest.fixture(scope="module")
def quickstart_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    quickstart.run(common.parse_argv(quickstart.Config, [
        "quickstart", f"--out_dir={out}", "--image_size=64", "--members=2", "--folds=2", "--epochs=2", "--units=8",
        "--hidden=8", "--patience=5"]))
    return out


def test_quickstart_writes_metrics_figures_and_bundle(quickstart_out):
    result = json.loads((quickstart_out / "metrics.json").read_text())
    acc = result["test_mean_std"]["accuracy"]
    assert len(acc["per_split"]) == 2 and 0.0 <= acc["mean"] <= 1.0
    assert result["pooled_out_of_fold"]["n"] == 60  # every image is tested exactly once
    assert "commit" in result["environment"] and result["command"].startswith("python -m experiments.quickstart")
    for name in ("confusion_matrix", "roc", "reliability", "uncertainty_hist", "accuracy_coverage", "gradcam",
                 "training_curves_fold0"):
        assert (quickstart_out / "figures" / f"{name}.png").stat().st_size > 5_000
    splits = sorted(p.name for p in (quickstart_out / "splits").iterdir())
    assert splits == ["final.json", "fold0.json", "fold1.json"]
    cfg, variables_m = bundle_lib.load(quickstart_out / "model")
    assert cfg.num_members == 2 and cfg.class_names == ["hem", "all"]
    leaves = [np.asarray(x) for x in __import__("jax").tree_util.tree_leaves(variables_m["params"])]
    assert all(x.shape[0] == 2 for x in leaves)
    assert not np.allclose(leaves[0][0], leaves[0][1])  # members differ


def test_predict_reads_the_bundle(quickstart_out):
    images = sorted((sample_dir() / "images").glob("*.png"))[:3]
    cfg, rows = predict.predict_files(quickstart_out / "model", images)
    assert [r["file"] for r in rows] == [str(p) for p in images]
    for r in rows:
        assert r["prediction"] in cfg.class_names
        assert abs(r["p_hem"] + r["p_all"] - 1.0) < 1e-5
        assert 0.0 <= r["predictive_entropy"] <= np.log(2) + 1e-6
        assert isinstance(r["refer"], bool)


def test_predict_refers_what_is_not_a_cell(quickstart_out, tmp_path):
    """Noise, a uniform image and natural photos are referred (OOD score or mutual information above the
    validation-fitted thresholds), while most real cells of the sample are not."""
    from PIL import Image
    from skimage import data as skdata
    rng = np.random.default_rng(0)
    odd = {"noise.png": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "uniform.png": np.full((224, 224, 3), 128, np.uint8),
           "astronaut.png": skdata.astronaut(), "coffee.png": skdata.coffee(), "chelsea.png": skdata.chelsea()}
    for name, arr in odd.items():
        Image.fromarray(arr).save(tmp_path / name)
    cfg, rows = predict.predict_files(quickstart_out / "model", sorted(tmp_path.glob("*.png")))
    assert cfg.ood_threshold is not None and cfg.mi_threshold is not None
    assert all(r["status"] == "ok" and r["refer"] for r in rows), [(r["file"], r["ood_score"]) for r in rows]
    cells = sorted((sample_dir() / "images").glob("*.png"))[:12]
    _, cell_rows = predict.predict_files(quickstart_out / "model", cells)
    odd_min = min(r["ood_score"] for r in rows)
    assert np.median([r["ood_score"] for r in cell_rows]) < odd_min  # real cells are closer to training


def test_predict_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict.list_images([tmp_path / "missing.png"])
    with pytest.raises(FileNotFoundError, match="folder has no images"):
        predict.list_images([tmp_path])
    with pytest.raises(FileNotFoundError, match="not a leukax model bundle"):
        bundle_lib.load(tmp_path)
