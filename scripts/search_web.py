"""A small local web page over a run's gallery (`python -m scripts.search serve runs/<run>`), on the standard
library's HTTP server: no JavaScript, one form.

- `/?q=<caption>&mode=<mode>&k=<k>`: the top images for a typed caption, as thumbnails with their scores;
- `/?image=<i>`: the top captions for gallery image i (the page lists gallery images to pick from);
- `/thumb/<i>`: a thumbnail of gallery image i (only gallery images are ever served).
Results carry `data-rank` / `data-score` attributes and the query time, for people and for the browser test.
"""

from __future__ import annotations

import html
import io
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from PIL import Image

from common.gallery import MODES, Gallery, GalleryError, TrainedModel

PICKS = 24  # gallery images offered for image queries
THUMB = 160

STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:70em}"
         ".hits{display:flex;flex-wrap:wrap;gap:.8em}.hit{width:170px;font-size:.85em}"
         ".hit img{width:160px;height:120px;object-fit:cover}.picks img{width:64px;height:48px;object-fit:cover}"
         "ol.captions li{margin:.3em 0}")


def page(gallery: Gallery, params: dict[str, str], results: str) -> str:
    q = html.escape(params.get("q", ""), quote=True)
    mode = params.get("mode") if params.get("mode") in MODES else "continuous"
    options = "".join(f'<option value="{m}"{" selected" if m == mode else ""}>{m}</option>' for m in MODES)
    picks = "".join(f'<a href="/?image={i}&mode={mode}"><img src="/thumb/{i}" alt="gallery image {i}"></a>'
                    for i in range(min(PICKS, len(gallery.images))))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fedxmr search</title><style>{STYLE}</style>"
            f"</head><body><h1>fedxmr search</h1><p>{len(gallery.images)} images, {len(gallery.captions)} captions "
            f"({html.escape(str(gallery.source.get('split') or 'custom gallery'))})</p>"
            f"<form id='search' method='get' action='/'><input id='q' name='q' size='60' value='{q}' "
            f"placeholder='type a caption'> <select name='mode'>{options}</select> "
            f"<input type='hidden' name='k' value='{int(params.get('k', 8))}'><button type='submit'>search images"
            f"</button></form><p>or pick an image to find its captions:</p><div class='picks'>{picks}</div>"
            f"{results}</body></html>")


def text_results(gallery: Gallery, hits: list[tuple[int, float]], text: str, seconds: float) -> str:
    cards = "".join(f"<div class='hit' data-rank='{r}' data-score='{s:.4f}'><img src='/thumb/{i}' alt=''>"
                    f"<br>{r}. {html.escape(Path(gallery.images[i]).name)}<br>score {s:.4f}</div>"
                    for r, (i, s) in enumerate(hits, 1))
    return (f"<h2>Images for “{html.escape(text)}”</h2><p id='timing'>{seconds * 1000:.1f} ms</p>"
            f"<div class='hits' id='results'>{cards}</div>")


def image_results(gallery: Gallery, image: int, hits: list[tuple[int, float]], seconds: float) -> str:
    items = "".join(f"<li data-rank='{r}' data-score='{s:.4f}'>{html.escape(gallery.captions[i])} "
                    f"<small>({s:.4f})</small></li>" for r, (i, s) in enumerate(hits, 1))
    return (f"<h2>Captions for <img src='/thumb/{image}' alt='' style='height:48px'> "
            f"{html.escape(Path(gallery.images[image]).name)}</h2><p id='timing'>{seconds * 1000:.1f} ms</p>"
            f"<ol class='captions' id='results'>{items}</ol>")


def make_handler(trained: TrainedModel, gallery: Gallery, default_mode: str, candidates: int):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            params = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                if url.path.startswith("/thumb/"):
                    self._send(200, thumbnail(gallery, int(url.path.rsplit("/", 1)[1])), "image/jpeg")
                    return
                if url.path != "/":
                    self._send(404, b"not found", "text/plain")
                    return
                mode = params.get("mode", default_mode)
                if mode not in MODES:
                    raise GalleryError(f"unknown search mode {mode!r}; expected one of {MODES}")
                k = max(1, min(int(params.get("k", 8)), 50))
                results = ""
                if params.get("q"):
                    start = time.perf_counter()
                    emb, code = trained.embed_texts([params["q"]])
                    hits = gallery.search("img", emb, code, mode, k, candidates)
                    pairs = [(int(i), float(s)) for i, s in zip(hits.ids[0], hits.scores[0]) if i >= 0]
                    results = text_results(gallery, pairs, params["q"], time.perf_counter() - start)
                elif "image" in params:
                    i = int(params["image"])
                    if not 0 <= i < len(gallery.images):
                        raise GalleryError(f"no gallery image {i}")
                    start = time.perf_counter()
                    hits = gallery.search("txt", gallery.img_emb[i:i + 1], gallery.img_code[i:i + 1], mode, k,
                                          candidates)
                    pairs = [(int(j), float(s)) for j, s in zip(hits.ids[0], hits.scores[0]) if j >= 0]
                    results = image_results(gallery, i, pairs, time.perf_counter() - start)
                self._send(200, page(gallery, params, results).encode(), "text/html; charset=utf-8")
            except (GalleryError, ValueError, OSError) as exc:
                self._send(400, f"bad request: {exc}".encode(), "text/plain; charset=utf-8")

        def log_message(self, format: str, *args) -> None:  # quiet: one line per query is noise here
            pass

    return Handler


def thumbnail(gallery: Gallery, i: int) -> bytes:
    if not 0 <= i < len(gallery.images):
        raise GalleryError(f"no gallery image {i}")
    with Image.open(gallery.images[i]) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMB, THUMB))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
    return out.getvalue()


def server(trained: TrainedModel, gallery: Gallery, host: str, port: int, mode: str,
           candidates: int) -> ThreadingHTTPServer:
    """The HTTP server, with the text encoder loaded first (the first query would otherwise wait for it)."""
    trained.backbone.text_encoder()
    return ThreadingHTTPServer((host, port), make_handler(trained, gallery, mode, candidates))


def serve(trained: TrainedModel, gallery: Gallery, host: str, port: int, mode: str, candidates: int) -> None:
    httpd = server(trained, gallery, host, port, mode, candidates)
    print(f"fedxmr search: http://{host}:{httpd.server_address[1]}/  (Ctrl-C stops)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
