"""`results/` as a curated record: its size budget, and the compact writers that keep it small (`leukax.records`)."""
import io
import json
import pathlib
import subprocess

import numpy as np
from PIL import Image

from leukax import plots, records

REPO = pathlib.Path(__file__).resolve().parents[1]
# One current table per question; superseded runs and the figures of ablation runs live in git history (the
# benchmarks and results READMEs name the commit). 8 MiB holds every committed run with room for a few more.
RESULTS_BUDGET_BYTES = 8 * 2**20


def _committed_results() -> list[pathlib.Path]:
    """The files of results/ that git tracks (what a clone gets), or every file when this is not a checkout."""
    proc = subprocess.run(["git", "ls-files", "-z", "results"], cwd=REPO, capture_output=True)
    if proc.returncode == 0 and proc.stdout:
        return [REPO / p for p in proc.stdout.decode().split("\0") if p and (REPO / p).is_file()]
    return [p for p in (REPO / "results").rglob("*") if p.is_file()]


def test_results_folder_stays_within_its_size_budget():
    files = _committed_results()
    assert files, "results/ is empty or missing"
    total = sum(p.stat().st_size for p in files)
    biggest = sorted(files, key=lambda p: p.stat().st_size)[-5:]
    assert total <= RESULTS_BUDGET_BYTES, (
        f"results/ holds {total / 2**20:.2f} MiB > {RESULTS_BUDGET_BYTES / 2**20:.0f} MiB; largest: "
        + ", ".join(f"{p.relative_to(REPO)} ({p.stat().st_size // 1024} KiB)" for p in reversed(biggest)))


def test_dumps_json_equals_json_and_keeps_number_lists_on_one_line():
    obj = {"accuracy": {"mean": 0.5, "std": None, "per_split": [0.25, 0.75, 0.5]},
           "confusion_matrix": [[3, 1], [0, 4]], "names": ["hem", "all"], "empty": {}, "nested": [{"a": 1}, {"b": [2]}]}
    text = records.dumps_json(obj)
    assert json.loads(text) == obj
    assert '"per_split": [0.25, 0.75, 0.5]' in text
    assert '"confusion_matrix": [[3, 1], [0, 4]]' in text
    assert len(text) < len(json.dumps(obj, indent=2))


def test_committed_json_is_written_by_records():
    """Every JSON file in results/ is byte-identical to `dumps_json` of its own content (so reruns change only
    values, and results/ stays compact)."""
    for p in _committed_results():
        if p.suffix == ".json":
            assert p.read_text() == records.dumps_json(json.loads(p.read_text())), p


def test_save_figure_writes_a_palette_png_that_looks_like_the_plot(tmp_path):
    fig = plots.reliability_diagram(np.array([0, 1, 1, 0, 1]), np.array(
        [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]]))
    path = records.save_figure(fig, tmp_path / "sub" / "fig.png")
    saved = Image.open(path)
    assert saved.mode == "P"
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, bbox_inches="tight", format="png")
    buf.seek(0)
    rgb = np.asarray(Image.open(buf).convert("RGB"), np.int16)
    got = np.asarray(saved.convert("RGB"), np.int16)
    assert got.shape == rgb.shape
    assert np.abs(got - rgb).mean() < 2.0  # a plot has few colours: the palette image is (nearly) the same
    assert path.stat().st_size < len(buf.getvalue())
