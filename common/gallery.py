"""Search with a trained run: load its model, index a gallery once, query it by text or by image. No Flower.

A run dir holds `config.json` (the model config and the backbone name) and `weights.safetensors` (the selected
round's model; methods without a global model store every client's as `<client>/<key>`, so one is chosen). A
gallery is images (files) and captions (strings), embedded and hashed once by the run's backbone and towers and
stored beside the run (`<run>/search/<name>/`: `index.npz` with embeddings and ±1 codes, `items.json` with the image
paths, captions and what the gallery was built from). Queries go through `common.search`: exact continuous search,
Hamming search over packed codes, or two-stage (Hamming top-C re-ranked by the embeddings).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from safetensors.numpy import load_file

from common.backbones import IDENTITY, Backbone, build_backbone, identity_backbone
from common.model import ModelConfig, XmrModel, load_numpy_state
from common.parts import upgrade_state
from common.search import ExactIndex, HammingIndex, Hits, TwoStageIndex

Mode = Literal["continuous", "hamming", "two-stage"]
MODES: tuple[str, ...] = ("continuous", "hamming", "two-stage")
ENCODE_BATCH = 32


class GalleryError(ValueError):
    """A run or gallery that cannot be searched; the message names the file or key."""


@dataclass
class TrainedModel:
    """A run's towers and hash heads with its frozen backbone."""

    model: XmrModel
    backbone: Backbone
    run_dir: Path
    client: str | None = None

    @classmethod
    def load(cls, run_dir: str | Path, client: str | None = None, device: str = "cpu") -> "TrainedModel":
        run_dir = Path(run_dir)
        config_path, weights_path = run_dir / "config.json", run_dir / "weights.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise GalleryError(f"{path}: missing (is {run_dir} a finished fedxmr run dir?)")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise GalleryError(f"{config_path}: not readable JSON ({exc})") from None
        if "model" not in config or "backbone" not in config.get("run", {}):
            raise GalleryError(f"{config_path}: no 'model' config or 'run.backbone' key")
        weights = load_file(str(weights_path))
        owners = sorted({k.split("/", 1)[0] for k in weights if "/" in k})
        if owners:  # per-client models (local, fedproto, plfedcmh)
            if client not in owners:
                raise GalleryError(f"{weights_path}: this run has one model per client; choose one of {owners} "
                                   f"(got {client!r})")
            weights = {k.split("/", 1)[1]: v for k, v in weights.items() if k.startswith(f"{client}/")}
        model = XmrModel(ModelConfig.from_dict(config["model"]))
        try:
            load_numpy_state(model, upgrade_state(weights))
        except (KeyError, ValueError) as exc:
            raise GalleryError(f"{weights_path}: {exc}") from None
        model.eval()
        name = config["run"]["backbone"]
        backbone = (identity_backbone(model.cfg.img_dim, model.cfg.txt_dim) if name == IDENTITY
                    else build_backbone(name, device))
        return cls(model, backbone, run_dir, client)

    def embed_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encoder = self.backbone.text_encoder()
        feats = np.concatenate([encoder.encode(list(texts[i:i + 4 * ENCODE_BATCH]))
                                for i in range(0, len(texts), 4 * ENCODE_BATCH)])
        return self.model.encode("txt", feats)

    def embed_images(self, paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        encoder = self.backbone.image_encoder()
        feats = np.concatenate([encoder.encode(list(paths[i:i + ENCODE_BATCH]))
                                for i in range(0, len(paths), ENCODE_BATCH)])
        return self.model.encode("img", feats)


@dataclass
class Gallery:
    """Images and captions with their embeddings and codes; `source` says what it was built from."""

    images: list[str]
    captions: list[str]
    img_emb: np.ndarray
    img_code: np.ndarray
    txt_emb: np.ndarray
    txt_code: np.ndarray
    source: dict = field(default_factory=dict)
    _indexes: dict = field(default_factory=dict, repr=False)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "index.npz", img_emb=self.img_emb, img_code=self.img_code, txt_emb=self.txt_emb,
                 txt_code=self.txt_code)
        (folder / "items.json").write_text(json.dumps({"images": self.images, "captions": self.captions,
                                                       "source": self.source}, indent=1))
        return folder

    @classmethod
    def load(cls, folder: Path) -> "Gallery":
        for name in ("index.npz", "items.json"):
            if not (folder / name).is_file():
                raise GalleryError(f"{folder / name}: missing; build the gallery first (python -m scripts.search "
                                   f"build)")
        try:
            items = json.loads((folder / "items.json").read_text())
            with np.load(folder / "index.npz") as z:
                arrays = {k: z[k] for k in ("img_emb", "img_code", "txt_emb", "txt_code")}
            images, captions = items["images"], items["captions"]
        except (OSError, ValueError, KeyError) as exc:
            raise GalleryError(f"{folder}: unreadable gallery ({exc}); build it again") from None
        if len(arrays["img_emb"]) != len(images) or len(arrays["txt_emb"]) != len(captions):
            raise GalleryError(f"{folder}: index.npz and items.json disagree on the number of images or captions")
        return cls(images, captions, **arrays, source=items.get("source", {}))

    def _index(self, target: str, mode: Mode):
        key = (target, mode)
        if key not in self._indexes:
            emb, code = (self.img_emb, self.img_code) if target == "img" else (self.txt_emb, self.txt_code)
            if not len(emb):
                raise GalleryError(f"the gallery has no {'images' if target == 'img' else 'captions'} to search")
            self._indexes[key] = (ExactIndex(emb) if mode == "continuous" else HammingIndex(code)
                                  if mode == "hamming" else TwoStageIndex(code, emb))
        return self._indexes[key]

    def search(self, target: str, emb: np.ndarray, code: np.ndarray, mode: Mode, k: int,
               candidates: int = 200) -> Hits:
        """Top-k gallery items of `target` ("img" or "txt") for each query; scores: cosine, or minus the Hamming
        distance."""
        if mode not in MODES:
            raise GalleryError(f"unknown search mode {mode!r}; expected one of {MODES}")
        index = self._index(target, mode)
        if mode == "continuous":
            return index.search(emb, k)
        if mode == "hamming":
            return index.search(code, k)
        return index.search(code, emb, k, candidates)


def build_gallery(trained: TrainedModel, images: Sequence[Path], captions: Sequence[str],
                  source: dict) -> Gallery:
    """Embed and hash `images` and `captions` (either may be empty) with the run's model."""
    dim, bits = trained.model.cfg.embed_dim, trained.model.cfg.hash_bits
    empty = (np.zeros((0, dim), np.float32), np.zeros((0, bits), np.int8))
    start = time.perf_counter()
    img = trained.embed_images(images) if len(images) else empty
    txt = trained.embed_texts(captions) if len(captions) else empty
    source = {**source, "run": str(trained.run_dir), "client": trained.client,
              "build-seconds": round(time.perf_counter() - start, 2)}
    return Gallery([str(p) for p in images], list(captions), img[0], img[1], txt[0], txt[1], source)
