"""Search with a trained run: index a gallery, then query it by text (-> images) or by image (-> captions).

    python -m scripts.search build runs/<run> --split test                  # the run's test split (cached features)
    python -m scripts.search build runs/<run> --images DIR --captions FILE --name mine
    python -m scripts.search query runs/<run> --text "a dog runs on the beach" [--mode two-stage] [-k 5]
    python -m scripts.search query runs/<run> --image photo.jpg
    python -m scripts.search serve runs/<run> [--port 8765]                 # a local web page (scripts/search_web.py)

The gallery is stored beside the run (`runs/<run>/search/<name>/`, default name: the split, or "custom"). Runs of
methods without a global model (local, fedproto, plfedcmh) hold one model per client: pick it with --client.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common.data.datasets import load_split
from common.features import resolve_cache_dir, split_features
from common.gallery import MODES, Gallery, GalleryError, TrainedModel, build_gallery

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def gallery_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "search" / name


def default_gallery(run_dir: Path) -> str | None:
    """The run's gallery to search when none is named: "test" if built, else the first by name."""
    names = sorted(p.parent.name for p in (run_dir / "search").glob("*/items.json"))
    return "test" if "test" in names else (names[0] if names else None)


def split_gallery(trained: TrainedModel, split: str) -> Gallery:
    """A split of the run's dataset, from the run's feature cache (encoding only what it lacks)."""
    run = json.loads((trained.run_dir / "config.json").read_text())["run"]
    data = load_split(run["data-dir"], split, data_keys=run.get("data-keys", ""),
                      cache_dir=resolve_cache_dir(run["cache-dir"]))
    start = time.perf_counter()
    feats = split_features(data, trained.backbone, resolve_cache_dir(run["cache-dir"]))
    (img_emb, img_code), (txt_emb, txt_code) = (trained.model.encode(m, feats[m]) for m in ("img", "txt"))
    source = {"split": split, "data-dir": run["data-dir"], "run": str(trained.run_dir), "client": trained.client,
              "build-seconds": round(time.perf_counter() - start, 2)}
    return Gallery([str(p) for p in data.image_paths()], list(data.captions), img_emb, img_code, txt_emb, txt_code,
                   source)


def custom_gallery(trained: TrainedModel, images: Path | None, captions: Path | None) -> Gallery:
    paths: list[Path] = []
    if images is not None:
        if not images.is_dir():
            raise GalleryError(f"--images {images}: not a folder")
        paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise GalleryError(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    lines: list[str] = []
    if captions is not None:
        if not captions.is_file():
            raise GalleryError(f"--captions {captions}: no such file")
        lines = [line.strip() for line in captions.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise GalleryError(f"--captions {captions}: no captions (one per line)")
    return build_gallery(trained, paths, lines, {"images": str(images or ""), "captions": str(captions or "")})


def query(trained: TrainedModel, gallery: Gallery, text: str | None, image: Path | None, mode: str, k: int,
          candidates: int) -> tuple[list[tuple[str, float]], float]:
    """Top-k (item, score) for one text or image query, and the seconds the query took (embedding included; the
    encoder is loaded before the clock starts, as a server holds it)."""
    (trained.backbone.text_encoder if text is not None else trained.backbone.image_encoder)()
    start = time.perf_counter()
    if text is not None:
        emb, code = trained.embed_texts([text])
        target, items = "img", gallery.images
    else:
        if image is None or not Path(image).is_file():
            raise GalleryError(f"query image {image}: no such file")
        emb, code = trained.embed_images([Path(image)])
        target, items = "txt", gallery.captions
    hits = gallery.search(target, emb, code, mode, k, candidates)
    seconds = time.perf_counter() - start
    return [(items[i], float(s)) for i, s in zip(hits.ids[0], hits.scores[0]) if i >= 0], seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "query", "serve"):
        p = sub.add_parser(name)
        p.add_argument("run", type=Path, help="a finished run dir (config.json, weights.safetensors)")
        p.add_argument("--client", help="for runs with one model per client, e.g. client-0")
        p.add_argument("--name", help="gallery name (default: the split, or 'custom')")
        if name == "build":
            p.add_argument("--split", choices=("train", "dev", "test"))
            p.add_argument("--images", type=Path, help="a folder of your own images")
            p.add_argument("--captions", type=Path, help="a text file of your own captions, one per line")
        else:
            p.add_argument("--mode", choices=MODES, default="continuous")
            p.add_argument("--candidates", type=int, default=200, help="two-stage: Hamming candidates re-ranked")
        if name == "query":
            p.add_argument("--text")
            p.add_argument("--image", type=Path)
            p.add_argument("-k", type=int, default=5)
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        trained = TrainedModel.load(args.run, args.client)
        if args.command == "build":
            if not (args.split or args.images or args.captions):
                parser.error("build needs --split, or --images and/or --captions")
            gallery = (split_gallery(trained, args.split) if args.split
                       else custom_gallery(trained, args.images, args.captions))
            folder = gallery.save(gallery_dir(args.run, args.name or args.split or "custom"))
            print(f"{folder}: {len(gallery.images)} images, {len(gallery.captions)} captions, "
                  f"built in {gallery.source['build-seconds']} s")
            return 0
        name = args.name or default_gallery(args.run)
        if name is None:
            raise GalleryError(f"{args.run}: no gallery yet; run `python -m scripts.search build {args.run} "
                               f"--split test` first")
        gallery = Gallery.load(gallery_dir(args.run, name))
        if args.command == "serve":
            from scripts.search_web import serve

            serve(trained, gallery, args.host, args.port, args.mode, args.candidates)
            return 0
        if (args.text is None) == (args.image is None):
            parser.error("query needs exactly one of --text or --image")
        hits, seconds = query(trained, gallery, args.text, args.image, args.mode, args.k, args.candidates)
    except (ValueError, KeyError) as exc:  # GalleryError, DatasetError, BackboneError, a config without a key
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unit = "cosine" if args.mode != "hamming" else "-Hamming distance"
    print(f"{'images' if args.text is not None else 'captions'} for {args.text or args.image!s} "
          f"({args.mode}, {seconds * 1000:.1f} ms, score = {unit}):")
    for rank, (item, score) in enumerate(hits, 1):
        print(f"{rank:>3}. {score:8.4f}  {Path(item).name if args.text is not None else item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
