"""How results are written to disk, so that `results/` stays a readable, small record.

- `dumps_json` / `write_json`: JSON whose objects are indented one key per line but whose lists of scalars
  (per-split accuracies, split indices, reliability bins) stay on one line. Same values as `json.dumps`;
  about half the bytes of ``indent=2`` on leukax's metrics files.
- `save_figure`: a Matplotlib figure as an optimised 256-colour palette PNG. Plots have few colours, so the
  palette image looks the same; photographic panels (Grad-CAM, enhancement examples) are dithered. About a
  third of the bytes of Matplotlib's RGBA PNG on leukax's figures.

`tests/test_records.py` holds `results/` to a size budget.
"""
from __future__ import annotations

import io
import json
import pathlib

_SCALARS = (str, int, float, bool, type(None))


def dumps_json(obj, indent: int = 1) -> str:
    """`json.dumps(obj, indent=indent)` with every list of scalars (or of such lists, e.g. a confusion
    matrix) written on one line. `json.loads(dumps_json(x)) == json.loads(json.dumps(x))`."""
    def flat(v) -> bool:
        return isinstance(v, _SCALARS) or (isinstance(v, (list, tuple)) and all(
            isinstance(u, _SCALARS) or (isinstance(u, (list, tuple)) and all(isinstance(w, _SCALARS) for w in u))
            for u in v))

    def enc(v, level: int) -> str:
        if flat(v):
            return json.dumps(v, allow_nan=False)
        pad, inner = " " * (indent * level), " " * (indent * (level + 1))
        if isinstance(v, dict):
            if not v:
                return "{}"
            items = [f"{inner}{json.dumps(str(k))}: {enc(u, level + 1)}" for k, u in v.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(v, (list, tuple)):
            return "[\n" + ",\n".join(inner + enc(u, level + 1) for u in v) + "\n" + pad + "]"
        raise TypeError(f"leukax/records.py: {type(v).__name__} is not JSON serialisable")

    return enc(obj, 0) + "\n"


def write_json(path, obj) -> pathlib.Path:
    """Writes `dumps_json(obj)` to `path` (parents created); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_json(obj))
    return path


def palette_png(rgb_image, colors: int = 256) -> bytes:
    """A PIL image as an optimised palette PNG (median-cut palette, Floyd–Steinberg dithering)."""
    from PIL import Image
    q = rgb_image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                          dither=Image.Dither.FLOYDSTEINBERG)
    buf = io.BytesIO()
    q.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def save_figure(fig, path, dpi: int = 120) -> pathlib.Path:
    """Renders a Matplotlib figure (tight bounding box) and writes it to `path` as `palette_png`."""
    from PIL import Image
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, bbox_inches="tight", format="png")
    buf.seek(0)
    path.write_bytes(palette_png(Image.open(buf)))
    return path
