"""A local web page for a second opinion on single-cell images: upload cells, see each with its prediction.

  pip install -e ".[app]"
  python -m leukax.app --model results/hybrid_gru/model          (or: leukax-app --model ...)

The page shows, per uploaded image: the image, the predicted class, every class's probability, the ensemble's
uncertainty (predictive entropy, mutual information, Akter et al.'s variance of the predicted class, member
disagreement, Mahalanobis OOD score), REFER / OK with the rule that fired, and the Grad-CAM overlay of the
(first hybrid's) member 0 for the predicted class. All results can be downloaded as CSV, with the same columns
as `python -m leukax.predict --out x.csv`. Every number comes from `leukax.predict.classify`, the function
the command uses; nothing is recomputed here.

Why Starlette + uvicorn (the `app` extra) and not Gradio: the page is one form and one server-rendered HTML
response, which Starlette (the ASGI toolkit under FastAPI, ~1 dependency) and uvicorn serve with a handful of
small, well-maintained packages; Gradio pulls in a large dependency tree and a JavaScript front end, and its
output is harder to test deterministically. The HTML has no JavaScript and loads nothing from elsewhere
(images are inline data: URIs), so it works offline.

Safety: binds 127.0.0.1 unless --host says otherwise (and says so); each uploaded file is read up to
--max_file_mb (default 20 MB) and at most --max_files per request; uploads are parsed by Starlette into
memory or its spooled temporary files (the system temp folder) and never written anywhere else; a client's
file name is only shown (HTML-escaped), never used as a path. A bad file (empty, not an image, truncated, too
large) gets its reason on the page, never a server error. Importing this module starts nothing.
A research tool, not a medical device: every prediction is a second opinion.
"""
from __future__ import annotations

import argparse
import base64
import collections
import csv
import html
import io
import secrets
import sys
import threading

import numpy as np

from leukax import predict

MB = 1 << 20
KEEP_RESULTS = 32  # CSVs kept in memory for download (oldest dropped first)
THUMB = 160       # pixels of the thumbnails on the page

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#23395d;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;font-size:13px;opacity:.85}main{padding:18px 24px;max-width:1180px}
form.upload{background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:14px 16px;margin-bottom:16px}
button{background:#23395d;color:#fff;border:0;border-radius:5px;padding:7px 16px;font-size:14px;cursor:pointer}
.card{background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:12px 14px;margin:0 0 12px;display:flex;gap:16px;align-items:flex-start}
.card img{width:160px;height:160px;border-radius:4px;border:1px solid #ccd}
.card figure{margin:0;text-align:center;font-size:11px;color:#5b6475}
.info{flex:1;min-width:260px}.info h2{font-size:15px;margin:0 0 6px;word-break:break-all}
.pred{font-size:18px;font-weight:600;margin:2px 0 8px}
.badge{display:inline-block;border-radius:4px;padding:2px 9px;font-weight:700;font-size:13px;margin-left:8px}
.refer{background:#fde3e1;color:#a01d12;border:1px solid #e9a49d}.ok{background:#e0f3e5;color:#17612e;border:1px solid #9ccfaa}
.reason{font-size:12px;color:#5b6475;margin:2px 0 8px}
table.p{border-collapse:collapse;font-size:13px}table.p td{padding:1px 6px 1px 0}
.bar{background:#e7eaf0;width:160px;height:10px;border-radius:3px}.bar div{background:#4a78c2;height:10px;border-radius:3px}
table.u{border-collapse:collapse;font-size:12px;margin-top:8px}table.u td{padding:1px 10px 1px 0;color:#3a4252}
.error{background:#fff4e5;border:1px solid #f0c27b;border-radius:8px;padding:10px 14px;margin:0 0 12px}
.error b{color:#8a4b00}.foot{font-size:12px;color:#5b6475;margin-top:18px}
a.csv{display:inline-block;margin:0 0 14px;font-weight:600}
"""


def _png_uri(image_hw3: np.ndarray) -> str:
    """Returns a data: URI holding `image_hw3` (uint8 H×W×3) as PNG, shown THUMB×THUMB."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image_hw3).resize((THUMB, THUMB), Image.Resampling.BILINEAR).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def overlay(image_hw3: np.ndarray, heat_hw: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Returns uint8 H×W×3: (1 − α·h)·image + α·h·jet(h), the Grad-CAM heat h ∈ [0, 1] blended where it is high."""
    import matplotlib
    jet = matplotlib.colormaps["jet"](np.clip(heat_hw, 0, 1))[..., :3] * 255.0
    w = alpha * np.clip(heat_hw, 0, 1)[..., None]
    return np.clip((1 - w) * image_hw3 + w * jet, 0, 255).astype(np.uint8)


class Predictor:
    """The loaded bundle: `rows_and_views(names, payloads)` returns predict's rows and, per image, its thumbnail
    and Grad-CAM overlay (data: URIs). One prediction at a time (a lock): the model is not re-entrant."""

    def __init__(self, model_dir, max_pixels: int | None = None):
        self.model_dir = str(model_dir)
        self.cfg, self.probs_fn = predict.load_model(model_dir)
        self.gradcam = predict.load_gradcam(model_dir)
        self.sizes = predict.image_sizes(self.cfg)
        self.max_pixels = max_pixels
        self.lock = threading.Lock()

    def rows_and_views(self, names: list[str], payloads: list) -> tuple[list[dict], list[dict]]:
        """`payloads[i]`: the bytes of upload i, or a reason string (e.g. too large). Returns (rows, views)."""
        sizes = set(self.sizes) | ({self.gradcam[0]} if self.gradcam else set())
        decoded = [p if isinstance(p, str) else predict.decode_or_reason(p, sorted(sizes), self.max_pixels, name=n)
                   for n, p in zip(names, payloads)]
        with self.lock:
            rows = predict.classify(self.cfg, self.probs_fn, names, decoded)
            views = [{} for _ in names]
            ok = [i for i, r in enumerate(rows) if r["status"] == "ok"]
            if ok and self.gradcam is not None:
                size, fn = self.gradcam
                x = np.stack([decoded[i][0][size] for i in ok])
                cls = [self.cfg.class_names.index(rows[i]["prediction"]) for i in ok]
                heat = fn(x, cls)
                for j, i in enumerate(ok):
                    views[i]["gradcam"] = _png_uri(overlay(x[j], heat[j]))
            for i in ok:
                views[i]["image"] = _png_uri(decoded[i][0][max(decoded[i][0])])
        return rows, views


# ------------------------------------------------------------------------------------------------- HTML
def _page(body: str, predictor: Predictor) -> str:
    cfg = predictor.cfg
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>leukax: second opinion</title>"
            f"<style>{CSS}</style></head><body><header><h1>leukax — second opinion on single blood cells</h1>"
            f"<p>{html.escape(predict.describe(cfg))} · classes: {html.escape(', '.join(cfg.class_names))} · "
            f"a research tool, not a medical device</p></header><main>{body}"
            f"<p class='foot'>Model: {html.escape(predictor.model_dir)}. REFER means: send this cell to a "
            f"haematologist (uncertainty or out-of-distribution score above a threshold fitted on validation "
            f"data). Grad-CAM: where ensemble member 0 (of the first hybrid, in a fused model) looked for the "
            f"predicted class.</p>"
            f"</main></body></html>")


def _form(max_file_mb: float, max_files: int) -> str:
    return ("<form class='upload' method='post' action='/predict' enctype='multipart/form-data'>"
            "<label>Cell images (PNG, JPEG, TIFF, BMP; one or many): "
            "<input type='file' name='files' multiple accept='image/*,.tif,.tiff'></label> "
            f"<button type='submit'>Classify</button><div class='reason'>Up to {max_files} files of at most "
            f"{max_file_mb:g} MB each; single cells, not whole smears.</div></form>")


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _card(cfg, row: dict, view: dict) -> str:
    name = html.escape(str(row["file"]))
    if row["status"] != "ok":
        return f"<div class='error'><b>{name}</b>: could not be classified: {html.escape(str(row['error']))}</div>"
    unc = {c: row[c] for c in predict.UNCERTAINTY_COLUMNS}
    reasons = predict.referral_reasons(cfg, unc)
    badge = ("<span class='badge refer'>REFER</span>" if row["refer"] else "<span class='badge ok'>OK</span>")
    reason = ("refer to an expert: " + "; ".join(reasons)) if reasons else "every uncertainty below its threshold"
    probs = "".join(f"<tr><td>{html.escape(c)}</td><td>{row['p_' + c]:.3f}</td><td><div class='bar'>"
                    f"<div style='width:{100 * row['p_' + c]:.1f}%'></div></div></td></tr>" for c in cfg.class_names)
    u = "".join(f"<tr><td>{label}</td><td>{_fmt(row[col])}</td></tr>" for col, label in (
        ("predictive_entropy", "predictive entropy"), ("mutual_information", "mutual information"),
        ("variance", "variance (Akter et al.)"), ("disagreement", "member disagreement"),
        ("ood_score", "OOD score (Mahalanobis)")))
    figs = f"<figure><img src='{view['image']}' alt='{name}'><figcaption>image ({row['size']})</figcaption></figure>"
    if "gradcam" in view:
        figs += f"<figure><img src='{view['gradcam']}' alt='Grad-CAM'><figcaption>Grad-CAM</figcaption></figure>"
    return (f"<div class='card'>{figs}<div class='info'><h2>{name}</h2><div class='pred'>"
            f"<span class='cls'>{html.escape(row['prediction'])}</span> {badge}</div><div class='reason'>{html.escape(reason)}</div>"
            f"<table class='p'>{probs}</table><table class='u'>{u}</table></div></div>")


def _csv_text(cfg, rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=predict.columns(cfg))
    w.writeheader()
    w.writerows(predict.csv_cells(r) for r in rows)
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------- app
def make_app(model_dir, max_file_mb: float = 20.0, max_files: int = 50, max_pixels: int | None = None,
             predictor: Predictor | None = None):
    """Returns the Starlette app serving `model_dir` (loads the model now; serves nothing until run)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route

    pred = predictor or Predictor(model_dir, max_pixels)
    limit = int(max_file_mb * MB)
    results: collections.OrderedDict[str, str] = collections.OrderedDict()

    async def index(request: Request):
        return HTMLResponse(_page(_form(max_file_mb, max_files), pred))

    async def classify(request: Request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_files * (limit + MB):
            return HTMLResponse(_page(_form(max_file_mb, max_files) + "<div class='error'><b>Upload too large</b>: "
                                      f"at most {max_files} files of {max_file_mb:g} MB each.</div>", pred), 413)
        try:
            form = await request.form(max_files=max_files, max_fields=max_files + 10)
        except Exception as e:  # noqa: BLE001 - a malformed or oversized form is the client's problem: say so
            return HTMLResponse(_page(_form(max_file_mb, max_files) + "<div class='error'><b>Upload refused</b>: "
                                      f"at most {max_files} files per upload ({html.escape(str(e))})</div>", pred), 400)
        uploads = [f for f in form.getlist("files") if hasattr(f, "read")]
        names, payloads = [], []
        for up in uploads:
            data = await up.read(limit + 1)
            names.append(up.filename or "(no name)")
            payloads.append(f"too large (over {max_file_mb:g} MB)" if len(data) > limit else data)
            await up.close()
        await form.close()
        if not names or all(n == "(no name)" and p == b"" for n, p in zip(names, payloads)):
            return HTMLResponse(_page(_form(max_file_mb, max_files) + "<div class='error'><b>No file chosen</b>: "
                                      "pick one or more cell images.</div>", pred), 400)
        rows, views = pred.rows_and_views(names, payloads)
        token = secrets.token_urlsafe(12)
        results[token] = _csv_text(pred.cfg, rows)
        while len(results) > KEEP_RESULTS:
            results.popitem(last=False)
        n_ok = sum(r["status"] == "ok" for r in rows)
        n_ref = sum(bool(r["refer"]) for r in rows if r["status"] == "ok")
        body = (_form(max_file_mb, max_files) + f"<p>{n_ok} of {len(rows)} images classified, {n_ref} referred. <a class='csv' id='csv' href='/results/{token}.csv' download='leukax_predictions.csv'>"
                f"Download the results (CSV)</a></p>" + "".join(_card(pred.cfg, r, v) for r, v in zip(rows, views)))
        return HTMLResponse(_page(body, pred))

    async def download(request: Request):
        text = results.get(request.path_params["token"])
        if text is None:
            return PlainTextResponse("no such result (results are kept for the last few uploads only)", 404)
        return Response(text, media_type="text/csv",
                        headers={"Content-Disposition": "attachment; filename=leukax_predictions.csv"})

    return Starlette(routes=[Route("/", index), Route("/predict", classify, methods=["POST"]),
                             Route("/predict", index, methods=["GET"]),
                             Route("/results/{token}.csv", download)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leukax.app", description="A local web page that classifies "
                                "uploaded cell images with a trained leukax bundle (second opinion, with referral).")
    p.add_argument("--model", default="results/quickstart/model", help="bundle directory (quickstart or fused)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this computer only; "
                   "0.0.0.0 shares the page with the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_file_mb", type=float, default=20.0, help="largest accepted upload per file")
    p.add_argument("--max_files", type=int, default=50, help="most files per upload")
    return p


def cli(argv: list[str] | None = None) -> int:
    """Loads the bundle and serves the page until Ctrl-C; returns the exit status (2: bad model or missing extra)."""
    args = parser().parse_args(argv)
    try:
        import uvicorn
        import starlette  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: Starlette's form parser)
    except ImportError as e:
        print(f"leukax.app: error: {e.name} is missing; install the page's extra: pip install -e \".[app]\"",
              file=sys.stderr)
        return 2
    try:
        app = make_app(args.model, args.max_file_mb, args.max_files)
    except Exception as e:  # noqa: BLE001 - a missing/corrupt bundle is a user error: one line, no traceback
        print(f"leukax.app: error: cannot load the model bundle {args.model}: {e}", file=sys.stderr)
        return 2
    local = args.host in ("127.0.0.1", "localhost", "::1")
    print(f"leukax.app: open http://{'localhost' if local else args.host}:{args.port}/ "
          + ("(local only: bound to 127.0.0.1; pass --host 0.0.0.0 to share it on the network)" if local else
             f"(bound to {args.host}: reachable from the network, no authentication)"), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def run():
    """Console-script entry point (`leukax-app`)."""
    sys.exit(cli())


if __name__ == "__main__":
    run()
