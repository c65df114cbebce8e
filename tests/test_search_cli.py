"""Search with a trained run (issue 16): the gallery built from a run dir, text and image queries through the CLI
agree with the model's own embeddings, errors name the file, and the web page works in a real headless browser
(Debian's chromium; skipped, saying so, where it is not installed)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from common.backbones import build_backbone
from common.gallery import Gallery, TrainedModel
from common.metrics import hamming_distance
from common.model import XmrModel, state_to_numpy
from scripts.search import main as search_main
from scripts.search_web import server

TINY = "openclip:fedxmr-tiny"


@pytest.fixture(scope="module")
def run_dir(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir as the ServerApp writes it (config.json, weights.safetensors), with the tiny backbone, and a custom
    gallery of 8 real test images and their first captions built through the CLI."""
    root = tmp_path_factory.mktemp("search")
    backbone = build_backbone(TINY)
    torch.manual_seed(0)
    from common.config import parse_run_config

    cfg = parse_run_config({"backbone": TINY, "embed-dim": 32, "adapter-dim": 8, "hash-bits": 16})
    model = XmrModel(cfg.model_cfg(backbone.img_dim, backbone.txt_dim))
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run": cfg.as_flat_dict(), "model": model.cfg.to_dict()}))
    save_file({k: np.ascontiguousarray(v) for k, v in state_to_numpy(model).items()}, str(run / "weights.safetensors"))
    names = (flickr8k_dir / "Flickr_8k.testImages.txt").read_text().split()[:8]
    images = root / "images"
    images.mkdir()
    for name in names:
        shutil.copy(flickr8k_dir / "images" / name, images / name)
    first = {}
    for line in (flickr8k_dir / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, caption = line.split("\t", 1)
        first.setdefault(key.split("#")[0], caption)
    (root / "captions.txt").write_text("\n".join(first[n] for n in names) + "\n", encoding="utf-8")
    assert search_main(["build", str(run), "--images", str(images), "--captions", str(root / "captions.txt")]) == 0
    return run


def test_queries_rank_the_gallery_by_the_models_own_scores(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    trained, gallery = TrainedModel.load(run_dir), Gallery.load(run_dir / "search" / "custom")
    assert len(gallery.images) == 8 and len(gallery.captions) == 8
    emb, code = trained.embed_images([Path(gallery.images[3])])
    np.testing.assert_allclose(emb[0], gallery.img_emb[3], atol=1e-5)
    exact = gallery.search("txt", emb, code, "continuous", 8)
    np.testing.assert_array_equal(exact.ids[0], np.argsort(-(gallery.txt_emb @ emb[0]), kind="stable"))
    hamming = gallery.search("txt", emb, code, "hamming", 8)
    np.testing.assert_array_equal(-hamming.scores[0], hamming_distance(code, gallery.txt_code)[0][hamming.ids[0]])
    both = gallery.search("txt", emb, code, "two-stage", 8, candidates=8)
    np.testing.assert_array_equal(both.ids, exact.ids)
    assert search_main(["query", str(run_dir), "--text", "a dog in the snow", "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    scores = [float(line.split()[1]) for line in out[1:]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and "ms" in out[0]


def test_errors_name_the_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert search_main(["query", str(tmp_path), "--text", "x"]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    assert search_main(["build", str(run_dir), "--images", str(tmp_path)]) == 2
    assert f"--images {tmp_path}: no image files" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(json.loads((run_dir / "config.json").read_text())))
    save_file({"img/x": np.zeros(2, np.float32)}, str(tmp_path / "weights.safetensors"))
    assert search_main(["query", str(tmp_path), "--text", "x"]) == 2
    assert "one model per client; choose one of ['img']" in capsys.readouterr().err


def test_the_page_escapes_what_it_echoes(run_dir: Path) -> None:
    trained, gallery = TrainedModel.load(run_dir), Gallery.load(run_dir / "search" / "custom")
    httpd = server(trained, gallery, "127.0.0.1", 0, "continuous", 200)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        with pytest.raises(urllib.error.HTTPError) as err:  # an unknown mode is refused, as plain text
            urllib.request.urlopen(base + "?mode=%22%3E%3Cscript%3Ealert(1)%3C/script%3E")
        assert err.value.code == 400 and err.value.headers["Content-Type"].startswith("text/plain")
        assert err.value.headers["X-Content-Type-Options"] == "nosniff"
        page = urllib.request.urlopen(base + "?q=%3Cb%3Ebold%3C/b%3E&k=3").read().decode()
        assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "thumb/99")
    finally:
        httpd.shutdown()


class Browser:
    """Headless chromium driven over the DevTools protocol (websockets, already installed with Flower)."""

    def __init__(self, exe: str, profile: Path) -> None:
        self.proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
        from websockets.sync.client import connect

        self._session = connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"], max_size=None)
        self.ws = self._session.__enter__()
        self.next_id = 0
        self.call("Page.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                return msg.get("result", {})

    def wait_load(self) -> None:
        while json.loads(self.ws.recv(timeout=60)).get("method") != "Page.loadEventFired":
            pass

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self._session.__exit__(None, None, None)
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_the_search_page_in_a_headless_browser(run_dir: Path, tmp_path: Path) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on PATH: install Debian's `chromium` (.ci/run does where it can use apt-get)")
    trained, gallery = TrainedModel.load(run_dir), Gallery.load(run_dir / "search" / "custom")
    httpd = server(trained, gallery, "127.0.0.1", 0, "continuous", 200)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    browser = Browser(exe, tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=url)
        browser.wait_load()
        assert browser.js("document.querySelectorAll('.picks img').length") == 8
        browser.js("document.querySelector('#q').value = 'a dog runs through the snow';"
                   "document.querySelector('#search').submit()")
        browser.wait_load()
        assert "q=a+dog+runs" in browser.js("location.href")
        hits = browser.js("[...document.querySelectorAll('#results .hit')].map(e => [+e.dataset.rank, "
                          "+e.dataset.score, e.querySelector('img').complete && e.querySelector('img').naturalWidth])")
        assert [h[0] for h in hits] == list(range(1, 9)), hits
        assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
        assert all(h[2] > 0 for h in hits), "every thumbnail loaded"
        assert browser.js("document.querySelector('#timing').textContent").endswith(" ms")
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "search-page.png").write_bytes(base64.b64decode(shot))
        print(f"screenshot: {tmp_path / 'search-page.png'}")
        browser.js("document.querySelector('.picks a').click()")
        browser.wait_load()
        captions = browser.js("[...document.querySelectorAll('#results li')].map(e => +e.dataset.score)")
        assert len(captions) == 8 and captions == sorted(captions, reverse=True)
    finally:
        browser.close()
        httpd.shutdown()
