"""`python -m leukax.predict` on real folders: good images get rows, every bad file gets a row naming it and the
reason, exit statuses 0 / 1 / 2, no traceback, batches streamed and written as they finish.

A tiny head-mode bundle (the embedded ImageNet MobileNetV2 at 32 px + random dense heads, M = 2) keeps it cheap;
its real features make the probabilities differ from image to image.
"""
import csv
import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from fixtures import smooth_image
from leukax import bundle as bundle_lib
from leukax import predict
from leukax.data.builders import sample_dir
from leukax.models.heads import make_head
from leukax.pretrained import pretrained
from leukax.train.features import compute_features

SIZE = 32
CLASSES = ["hem", "all"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A real bundle as quickstart writes one, with a referral threshold at the median training entropy."""
    out = tmp_path_factory.mktemp("bundle") / "model"
    backbone, bb_vars, spec = pretrained("mobilenet_v2", weights="embedded")
    x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE)))
                  for p in sorted((sample_dir() / "images").glob("*.png"))[:4]])
    fm = compute_features(backbone, bb_vars, x, spec.normalization)
    head = make_head("dense", 2, features=8)
    members = [head.init(k, fm[:1]) for k in jax.random.split(jax.random.key(0), 2)]
    variables_m = jax.tree.map(lambda *v: np.stack(v), *members)
    cfg = bundle_lib.BundleConfig(backbone="mobilenet_v2", weights="embedded", image_size=SIZE,
                                  normalization=spec.normalization, head="dense", head_kwargs=dict(features=8),
                                  class_names=CLASSES, mode="head", num_members=2, referral_threshold=0.69)
    bundle_lib.save(out, cfg, variables_m)
    return out


def png_claiming(width, height) -> bytes:
    """A PNG whose header claims width×height (a decompression bomb's header; the data is tiny)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


GOOD = ["cell_a.png", "cell_b.png", "cell_c.png"]
BAD = {  # name -> words its reason must contain
    "empty.png": "empty file",
    "notes.jpg": "not a recognised image format",
    "truncated.png": "truncated",
    "corrupt.png": "corrupt",
    "huge.png": "too large",
    "broken.tif": "unreadable TIFF",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    cells = sorted((sample_dir() / "images").glob("*.png"))
    for name, src in zip(GOOD, cells):
        (d / name).write_bytes(src.read_bytes())
    smooth_image(0, 2592, 1944).save(d / "smear_Im001_1.jpg", quality=85)  # a full ALL-IDB1-size smear
    (d / "smear_Im001_1.xyc").write_text("10 20\n")  # beside it, as in ALL-IDB1: not an image, not listed
    (d / "empty.png").write_bytes(b"")
    (d / "notes.jpg").write_text("this is a text file named .jpg\n")
    data = cells[3].read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    idat = data.index(b"IDAT") + 8  # compressed pixels scrambled, length and header intact
    (d / "corrupt.png").write_bytes(data[:idat] + bytes(b ^ 0x5A for b in data[idat:idat + 64]) + data[idat + 64:])
    (d / "huge.png").write_bytes(png_claiming(20000, 20000))
    (d / "broken.tif").write_bytes(b"II*\x00" + b"\x08\x00\x00\x00" + b"\xff" * 40)
    return d


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_mixed_folder_every_file_gets_a_row(tiny_bundle, folder, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    status = predict.cli(["--model", str(tiny_bundle), "--images", str(folder), "--out", str(out),
                          "--batch_size", "3", "--no-progress"])
    assert status == predict.EXIT_SOME_FAILED
    rows = read_csv(out)
    expected = sorted(GOOD + list(BAD) + ["smear_Im001_1.jpg"])
    assert [pathlib.Path(r["file"]).name for r in rows] == expected  # one row each, sorted, no .xyc
    assert list(rows[0]) == predict.columns(bundle_lib.load(tiny_bundle)[0])
    by_name = {pathlib.Path(r["file"]).name: r for r in rows}
    for name in GOOD + ["smear_Im001_1.jpg"]:
        r = by_name[name]
        assert r["status"] == "ok" and r["error"] == "" and r["prediction"] in CLASSES
        assert float(r["p_hem"]) + float(r["p_all"]) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= float(r["predictive_entropy"]) <= np.log(2) + 1e-6
        assert r["refer"] == str(float(r["predictive_entropy"]) > 0.69)
    assert by_name["smear_Im001_1.jpg"]["size"] == "2592x1944"  # accepted, resized whole
    for name, words in BAD.items():
        r = by_name[name]
        assert r["status"] == "error" and words in r["error"], (name, r["error"])
        assert r["prediction"] == "" and r["p_hem"] == ""
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    for name in BAD:
        assert any(line.startswith(str(folder / name) + "\tERROR\t") for line in printed.out.splitlines())
    assert "4 classified, 6 failed" in printed.err


def test_ok_rows_equal_a_direct_forward_pass(tiny_bundle, folder):
    """Batching, padding and bad files in between do not change any image's probabilities."""
    files = [folder / n for n in ["cell_a.png", "empty.png", "cell_b.png", "cell_c.png"]]
    cfg, rows = predict.predict_files(tiny_bundle, files, batch_size=3)
    _, probs_fn = predict.load_model(tiny_bundle)
    from leukax.data import imageio
    x = np.stack([imageio.resize_image(imageio.read_image(f), SIZE) for f in files if f.name != "empty.png"])
    mean_nk = np.asarray(probs_fn(x)[0]).mean(0)
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok"]
    assert np.ptp(mean_nk[:, 0]) > 1e-3  # images get different probabilities, so a mix-up would show
    np.testing.assert_allclose([[r["p_hem"], r["p_all"]] for r in ok], mean_nk, atol=1e-5)


def test_rows_written_per_batch_before_a_crash(tiny_bundle, folder, tmp_path, monkeypatch):
    """--out holds every finished batch even if the run dies in a later one (here: the model raises)."""
    real = predict.load_model
    calls, on_disk = [], []

    def crashing_load(directory):
        cfg, probs_fn = real(directory)

        def probs(images):
            calls.append(len(images))
            if len(calls) == 2:
                on_disk.append(out.read_text())  # what a SIGKILL now would leave: batch 1 already flushed
                raise KeyboardInterrupt("stopped by the user")
            return probs_fn(images)
        return cfg, probs

    monkeypatch.setattr(predict, "load_model", crashing_load)
    for suffix in (".csv", ".json"):
        out = tmp_path / f"partial{suffix}"
        calls.clear()
        files = [str(folder / n) for n in GOOD] + [str(folder / "smear_Im001_1.jpg")]
        with pytest.raises(KeyboardInterrupt):
            predict.cli(["--model", str(tiny_bundle), "--out", str(out), "--batch_size", "2", "--no-progress",
                         *files])
        rows = read_csv(out) if suffix == ".csv" else json.loads(out.read_text())
        assert [pathlib.Path(r["file"]).name for r in rows] == GOOD[:2]  # the first batch, complete
        assert calls == [2, 2]
        assert all(name in on_disk[-1] for name in GOOD[:2]) and GOOD[2] not in on_disk[-1]


def test_all_good_exits_0_and_json_out(tiny_bundle, folder, tmp_path):
    out = tmp_path / "p.jsonl"
    assert predict.cli(["--model", str(tiny_bundle), "--out", str(out), "--no-progress",
                        str(folder / "cell_a.png"), str(folder / "cell_b.png")]) == predict.EXIT_OK
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"] and isinstance(rows[0]["refer"], bool)


def test_missing_paths_are_rows_not_errors(tiny_bundle, tmp_path, capsys):
    empty_dir = tmp_path / "nothing_here"
    empty_dir.mkdir()
    status = predict.cli(["--model", str(tiny_bundle), "--no-progress", str(tmp_path / "gone.png"), str(empty_dir)])
    assert status == predict.EXIT_SOME_FAILED
    out = capsys.readouterr().out
    assert f"{tmp_path / 'gone.png'}\tERROR\tno such file or folder" in out
    assert f"{empty_dir}\tERROR\tfolder has no images" in out


@pytest.mark.parametrize("argv, words", [
    ([], "give images"),
    (["--out", "x.xlsx", "a.png"], "unsupported suffix"),
    (["--batch_size", "0", "a.png"], "--batch_size"),
    (["--bogus", "a.png"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        predict.cli(argv)
    assert e.value.code == predict.EXIT_USAGE and words in capsys.readouterr().err


def test_command_missing_or_damaged_model_exits_2_without_traceback(tmp_path, folder):
    """As a user runs it: one line on stderr naming the folder, status 2, no Python traceback."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "bundle.json").write_text(json.dumps({"version": 1, "backbone": "mobilenet_v2"}))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for model, words in ((tmp_path / "no_model", "no bundle.json"), (damaged, "not a bundle config")):
        r = subprocess.run([sys.executable, "-m", "leukax.predict", "--model", str(model), str(folder)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        assert str(model) in r.stderr and words in r.stderr
