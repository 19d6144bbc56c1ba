"""The browser page `leukax.app` (issue 21): served on a free local port and driven by headless Chromium
(Debian's chromium + chromium-driver, selenium), plus Starlette's test client for the refusals.

The model is a real bundle built here in seconds: frozen embedded MobileNetV2 features of the 60 embedded
C-NMC cells, two logistic-regression members (bootstrap halves, `leukax.train.probe`) written as a linear head
behind the fitted standardisation, with a Mahalanobis OOD model; so Grad-CAM, REFER and OK all have real inputs.
Set LEUKAX_APP_SCREENSHOT=path to keep the browser's screenshot (results/app/ holds the committed one).
"""
import csv
import io
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from leukax import bundle as bundle_lib
from leukax import predict, uncertainty
from leukax.data.builders import sample_dir
from leukax.pretrained import pretrained
from leukax.train import probe
from leukax.train.features import compute_features

starlette = pytest.importorskip("starlette", reason="the app extra (pip install -e '.[app]') is not installed")
from leukax import app as app_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 224
BROWSER_SKIP = "chromium and chromedriver not installed (apt-get install chromium chromium-driver)"


def _cells():
    return sorted((sample_dir() / "images").glob("*.png"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rows = list(csv.DictReader(open(sample_dir() / "labels.csv")))
    label = {r["filename"]: int(r["label"]) for r in rows}
    files = _cells()
    y = np.array([label[f.name] for f in files])
    backbone, bb_vars, spec = pretrained("mobilenet_v2", weights="embedded")
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)) for f in files])
    fm = compute_features(backbone, bb_vars, x, spec.normalization)
    fm_ntc = np.asarray(fm).reshape(len(x), -1, fm.shape[-1])
    rng = np.random.default_rng(0)
    members = []
    for _ in range(2):  # two members on different 40-cell subsets: they disagree a little
        idx = np.sort(rng.choice(len(x), 40, replace=False))
        members.append(probe.fit(fm_ntc[idx][None], y[idx], 2))
    full = probe.fit(fm_ntc[None], y, 2)  # the standardisation every member reads through
    mean_c, std_c = np.asarray(full["mean"]), np.asarray(full["std"])
    # a member's logits ((x̄ − μ_m)/σ_m) w_m + b_m written on the shared standardisation z = (x̄ − μ)/σ
    params = []
    for p in members:
        scale = std_c / np.asarray(p["std"])
        w = np.asarray(p["w"]) * scale[:, None]
        b = np.asarray(p["b"]) + ((mean_c - np.asarray(p["mean"])) / np.asarray(p["std"])) @ np.asarray(p["w"])
        params.append({"logits": {"kernel": w.astype(np.float32), "bias": b.astype(np.float32)}})
    params_m = jax.tree.map(lambda *v: np.stack(v), *params)
    pooled = ((fm_ntc - mean_c) / std_c).mean(1)
    ood = uncertainty.fit_mahalanobis(pooled, y, 2)
    scores = np.asarray(uncertainty.mahalanobis_score(ood, pooled))
    out = tmp_path_factory.mktemp("app_model") / "model"
    cfg = bundle_lib.BundleConfig(
        backbone="mobilenet_v2", weights="embedded", image_size=SIZE, normalization=spec.normalization,
        head="linear", head_kwargs={}, class_names=["hem", "all"], mode="head", num_members=2, views="none",
        referral_threshold=0.5, ood_threshold=uncertainty.conformal_threshold(scores, 0.05),
        provenance=dict(trained_on="tests/test_app.py: the 60 embedded cells (a test model)"))
    bundle_lib.save(out, cfg, {"params": params_m, "transform": {"mean_c": mean_c, "std_c": std_c}, "ood": ood})
    return out


@pytest.fixture(scope="module")
def predictor(model_dir):
    return app_lib.Predictor(model_dir)


@pytest.fixture()
def client(model_dir, predictor):
    from starlette.testclient import TestClient
    return TestClient(app_lib.make_app(model_dir, max_file_mb=0.05, max_files=3, predictor=predictor))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_import_starts_nothing():
    code = "import threading, leukax.app; print(threading.active_count(), 'uvicorn' in __import__('sys').modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.stdout.split() == ["1", "False"], r.stderr


def test_refusals_are_messages_not_server_errors(client, tmp_path):
    assert "<form" in client.get("/").text
    cell = _cells()[0].read_bytes()
    big = b"\x89PNG" + b"0" * 60_000  # over the 0.05 MB limit of this client
    r = client.post("/predict", files=[("files", ("cell.png", cell, "image/png")), ("files", ("empty.png", b"", "image/png")),
                                       ("files", ("big.png", big, "image/png"))])
    assert r.status_code == 200
    assert "empty file" in r.text and "too large (over 0.05 MB)" in r.text and "could not be classified" in r.text
    assert r.text.count("class='card'") == 1
    r = client.post("/predict", files=[("files", (f"{i}.png", cell, "image/png")) for i in range(5)])
    assert r.status_code == 400 and "at most 3 files per upload" in r.text
    r = client.post("/predict", files=[("files", ("", b"", "application/octet-stream"))])
    assert r.status_code == 400 and "No file chosen" in r.text
    r = client.post("/predict", files=[("files", ("../../etc/passwd", b"root:x:0:0", "text/plain"))])
    assert r.status_code == 200 and "not a recognised image format" in r.text and "../../etc/passwd" in r.text
    assert client.get("/results/nope.csv").status_code == 404


def test_command_binds_localhost_and_says_so(model_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "leukax.app", "--model", str(model_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert f"http://localhost:{port}/" in line and "bound to 127.0.0.1" in line, proc.stderr.read() if not line else line
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert b"<form" in r.read()
                break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("the page did not answer")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "leukax.app", "--model", str(model_dir.parent / "none")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "cannot load the model bundle" in bad.stderr


@pytest.fixture()
def server(model_dir, predictor):
    import uvicorn
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app_lib.make_app(model_dir, predictor=predictor), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_in_headless_chromium(server, model_dir, tmp_path):
    """Upload a real cell and a broken file through the page in Chromium: prediction, probabilities,
    uncertainty, REFER/OK, Grad-CAM, the broken file's message, and a CSV equal to leukax.predict's rows."""
    chromium, driver_bin = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip(BROWSER_SKIP)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    cells = [_cells()[0], _cells()[-1]]
    broken = tmp_path / "broken_cell.png"
    broken.write_bytes(cells[0].read_bytes()[:300])  # a truncated PNG
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,1000"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        driver.get(server + "/")
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys("\n".join(str(p) for p in cells + [broken]))
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        # the submit reloads the page: a <body> found before the reload goes stale while it is read, so poll again
        WebDriverWait(driver, 180, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: "images classified" in d.find_element(By.TAG_NAME, "body").text)
        text = driver.find_element(By.TAG_NAME, "body").text
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert len(cards) == 2 and "2 of 3 images classified" in text
        _, rows = predict.predict_files(model_dir, cells + [broken])
        for card, row in zip(cards, rows):
            t = card.text
            badge = "REFER" if row["refer"] else "OK"
            assert card.find_element(By.CSS_SELECTOR, ".pred .cls").text == row["prediction"]
            assert card.find_element(By.CSS_SELECTOR, ".pred .badge").text == badge
            assert f"{row['p_hem']:.3f}" in t and f"{row['p_all']:.3f}" in t
            assert f"{row['mutual_information']:.3f}" in t and f"{row['variance']:.3f}" in t
            assert len(card.find_elements(By.TAG_NAME, "img")) == 2  # the cell and its Grad-CAM overlay
        assert "broken_cell.png: could not be classified: corrupt or truncated image data" in text
        driver.save_screenshot(str(tmp_path / "app.png"))
        if os.environ.get("LEUKAX_APP_SCREENSHOT"):
            driver.save_screenshot(os.environ["LEUKAX_APP_SCREENSHOT"])
        href = driver.find_element(By.ID, "csv").get_attribute("href")
    finally:
        driver.quit()
    with urllib.request.urlopen(href, timeout=30) as r:
        got = list(csv.DictReader(io.StringIO(r.read().decode())))
    assert list(got[0]) == predict.columns(bundle_lib.load(model_dir)[0])
    assert [g["status"] for g in got] == ["ok", "ok", "error"]
    for g, row in zip(got, rows):
        assert pathlib.Path(g["file"]).name == pathlib.Path(row["file"]).name and g["prediction"] == (row["prediction"] or "")
        if row["status"] == "ok":
            np.testing.assert_allclose([float(g["p_hem"]), float(g["predictive_entropy"])],
                                       [row["p_hem"], row["predictive_entropy"]], atol=1e-5)
    assert Image.open(tmp_path / "app.png").size[0] > 500
