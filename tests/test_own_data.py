"""A lab's own folder of cells (issue 21): `--dataset=image_folder --manual_dir=DIR` in experiments.hybrid_gru, its
clear one-line errors, and the fused bundle it saves, read back by `leukax.predict`.

Tiny scale: random-weight backbones at 32 px, 2 folds, M = 2, 1 epoch.
"""
import csv
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from experiments import common, hybrid_gru
from leukax import bundle as bundle_lib
from leukax import predict
from leukax.data import arrays
from leukax.data.builders import DatasetError

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fixtures  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--weights=none", "--image_size=32", "--members=2", "--folds=2", "--batch_size=8", "--epochs=1",
        "--heads=gru", "--units=8", "--hidden=8", "--feature_dim=16", "--views=none"]


def make_folder(root: pathlib.Path, per_class=(6, 6), mixed: bool = True, broken: bool = False) -> pathlib.Path:
    """class folders blast/ and normal/ of smooth PNGs; with `mixed`, also RGBA, grayscale, 16-bit TIFF, JPEG of
    other sizes; with `broken`, a truncated PNG and a text file named .jpg; a subjects.csv (2 cells per subject)."""
    rows = []
    for c, (name, n) in enumerate(zip(("blast", "normal"), per_class)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            fixtures.smooth_image(100 * c + i, 40 + 3 * i, 36).save(root / name / f"{i}.png")
            rows.append((f"{name}/{i}.png", f"{name}_s{i // 2}"))
    if mixed:
        fixtures.smooth_image(7, 50, 44, "RGBA").save(root / "blast" / "rgba.png")
        fixtures.smooth_image(8, 30, 30, "L").save(root / "normal" / "gray.png")
        gray16 = (np.asarray(fixtures.smooth_image(9, 48, 40, "L"), np.uint16) * 257)
        tifffile.imwrite(root / "normal" / "deep16.tif", gray16)
        fixtures.smooth_image(10, 64, 60).save(root / "blast" / "photo.jpg", quality=90)
    if broken:
        good = (root / "blast" / "0.png").read_bytes()
        (root / "blast" / "truncated.png").write_bytes(good[: len(good) // 2])
        (root / "normal" / "notes.jpg").write_text("not an image")
    with open(root / "subjects.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "subject"), *rows])
    return root


def _cfg(tmp_path, folder, *extra):
    return common.parse_argv(hybrid_gru.Config, ["prog", f"--out_dir={tmp_path / 'out'}", "--dataset=image_folder",
                                                 f"--manual_dir={folder}", f"--data_dir={tmp_path / 'tfds'}",
                                                 *TINY, *extra])


def test_mixed_modes_subjects_and_unreadable_files(tmp_path, caplog):
    """RGBA, grayscale, 16-bit TIFF and JPEG of mixed sizes become uint8 N×32×32×3; subjects.csv groups cells;
    each unreadable file is named in a warning and the others are kept."""
    folder = make_folder(tmp_path / "cells", broken=True)
    with caplog.at_level("WARNING", logger="leukax.data"):
        ds = arrays.load_arrays("image_folder", 32, data_dir=tmp_path / "tfds", manual_dir=folder)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "truncated.png" in warned and "notes.jpg" in warned
    assert ds.class_names == ("blast", "normal") and ds.counts == {"blast": 8, "normal": 8}
    assert ds.images.shape == (16, 32, 32, 3) and ds.images.dtype == np.uint8
    assert sorted(set(zip(ds.heights.tolist(), ds.widths.tolist()))) != [(36, 40)]  # sizes really differed
    subj = dict(zip(ds.filenames, ds.subjects))
    assert subj["blast/0.png"] == subj["blast/1.png"] == "blast_s0" and subj["blast/rgba.png"] == ""
    g = dict(zip(ds.filenames, ds.groups.tolist()))
    assert g["blast/0.png"] == g["blast/1.png"] != g["blast/2.png"]  # one subject, one group
    i = ds.filenames.index("blast/rgba.png")  # alpha composited over white, not dropped to black
    assert ds.images[i].mean() > 60


@pytest.mark.parametrize("case, match", [
    ("empty", "no image files"),
    ("one_class", "one class"),
    ("too_few", "fewer than k=2 folds"),
    ("small", "fewer than --batch_size"),
    ("all_unreadable_class", "no readable images left for class"),
    ("bad_csv", "names files that are not images"),
])
def test_bad_folders_are_one_line_errors(tmp_path, case, match):
    folder = tmp_path / "cells"
    if case == "empty":
        folder.mkdir()
    elif case == "one_class":
        make_folder(folder, mixed=False)
        for f in (folder / "normal").iterdir():
            f.unlink()
        (folder / "normal").rmdir()
        (folder / "subjects.csv").unlink()
    elif case == "too_few":
        make_folder(folder, per_class=(6, 1), mixed=False)
    elif case == "small":
        make_folder(folder, per_class=(10, 10), mixed=False)
    elif case == "all_unreadable_class":
        make_folder(folder, mixed=False)
        for f in (folder / "normal").glob("*.png"):
            f.write_bytes(b"")
    else:
        make_folder(folder, mixed=False)
        with open(folder / "subjects.csv", "a") as f:
            f.write("blast/missing.png,x\n")
    with pytest.raises((DatasetError, common.InputError), match=match):
        hybrid_gru.run(_cfg(tmp_path, folder, *(["--batch_size=32"] if case == "small" else [])))


def test_command_line_error_is_one_line_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "experiments.hybrid_gru", "--dataset=image_folder",
                        f"--manual_dir={empty}", f"--data_dir={tmp_path / 'tfds'}", f"--out_dir={tmp_path / 'o'}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "no image files" in r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line] == [
        line for line in r.stderr.splitlines() if line.startswith("hybrid_gru: error:")]


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    folder = make_folder(tmp / "cells", per_class=(10, 10))
    cfg = _cfg(tmp, folder, "--backbones=mobilenet_v2,efficientnet_lite0", "--batch_size=4")
    return tmp, folder, hybrid_gru.run(cfg)


def test_study_saves_a_fused_bundle(fused_run):
    tmp, folder, m = fused_run
    model = tmp / "out" / "model"
    assert m["saved_model"] == str(model.resolve())
    cfg = bundle_lib.read_config(model)
    assert isinstance(cfg, bundle_lib.FusedConfig) and cfg.fusion == "sum"
    assert cfg.hybrids == ["mobilenet_v2", "efficientnet_lite0"] and cfg.class_names == ["blast", "normal"]
    assert cfg.temperature > 0 and cfg.mi_threshold is not None and cfg.ood_threshold is not None
    prov = cfg.provenance
    assert prov["data"]["dataset"] == "image_folder" and prov["data"]["n"] == 24 and prov["commit"]
    assert prov["cv_fused_test"]["accuracy"] == m["fused"]["gru"]["test_mean_std"]["accuracy"]
    for name in cfg.hybrids:  # each hybrid is a bundle of its own
        sub = bundle_lib.read_config(model / "hybrids" / name)
        assert sub.backbone == name and sub.num_members == 2 and sub.image_size == 32


def test_fused_prediction_is_the_mean_of_the_hybrids(fused_run, tmp_path):
    """predict on the fused bundle = softmax(log p̄ / T) with p̄ the mean of the per-backbone ensemble means,
    each computed independently from its own sub-bundle; members pooled for the uncertainty columns."""
    tmp, folder, _ = fused_run
    model = tmp / "out" / "model"
    files = sorted((folder / "blast").glob("*.png"))[:3] + [folder / "normal" / "deep16.tif"]
    (tmp_path / "bad.png").write_bytes(b"")
    cfg, rows = predict.predict_files(model, files + [tmp_path / "bad.png"], batch_size=4)
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"] and rows[-1]["error"].startswith("empty file")
    assert list(rows[0]) == predict.columns(cfg)
    x = np.stack([predict.decode(f, (32,))[0][32] for f in files])
    means, members = [], []
    for name in cfg.hybrids:
        _, fn = predict.load_model(model / "hybrids" / name)
        p_mnk = np.asarray(fn(x)[0])
        members.append(p_mnk)
        means.append(p_mnk.mean(0))
    p_bar = np.mean(means, 0)
    logit = np.log(np.clip(p_bar, np.finfo(np.float32).tiny, 1)) / cfg.temperature
    expected = np.exp(logit - logit.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    got = np.array([[r["p_blast"], r["p_normal"]] for r in rows[:4]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [r["prediction"] for r in rows[:4]] == [cfg.class_names[i] for i in p_bar.argmax(-1)]
    pooled = np.concatenate(members, 0)  # mutual information of all H·M members
    ent = lambda p: -(p * np.log(np.clip(p, 1e-12, 1))).sum(-1)  # noqa: E731
    mi = ent(pooled.mean(0)) - ent(pooled).mean(0)
    np.testing.assert_allclose([r["mutual_information"] for r in rows[:4]], mi, atol=1e-4)
    # the command reads the fused bundle too, with the documented columns
    out = tmp_path / "p.csv"
    assert predict.cli(["--model", str(model), "--out", str(out), "--no-progress", *map(str, files)]) == 0
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == predict.columns(cfg)
