"""open_clip as a first-class backbone: any model name, with a pretrained tag, a local checkpoint, or random init.

Image features are `encode_image` outputs and caption features `encode_text` outputs (the model's joint space,
`embed_dim` wide), L2-normalised. Random init is seeded (seed 0) so that every node computes the same frozen
features; it is only meant for tests and smoke runs.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

import common  # noqa: F401  (torchvision shim before open_clip)
from common.backbones import Backbone, BackboneError

_CONFIG_DIR = Path(__file__).parent / "configs"


def _open_clip():
    import open_clip

    for cfg in sorted(_CONFIG_DIR.glob("*.json")):
        if cfg.stem not in open_clip.list_models():
            open_clip.add_model_config(cfg)
    return open_clip


def _weights_id(pretrained: str | None) -> str:
    """Cache-key part naming the weights: the tag, a checkpoint's content hash prefix, or 'random-seed0'."""
    if pretrained is None:
        return "random-seed0"
    path = Path(pretrained).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        return f"ckpt-{digest.hexdigest()[:16]}"
    return pretrained


@cache
def _load(model: str, pretrained: str | None, device: str, weights_id: str):
    """Build once per process; `weights_id` is in the cache key so an overwritten checkpoint is loaded again."""
    oc = _open_clip()
    if model not in oc.list_models():
        raise BackboneError(f"open_clip has no model config {model!r} (see open_clip.list_models())")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net, _, preprocess = oc.create_model_and_transforms(model, pretrained=pretrained, device=device)
    except (RuntimeError, OSError, ValueError) as exc:
        raise BackboneError(
            f"open_clip weights {model}:{pretrained} are not available locally ({exc}). Nothing is downloaded at "
            f"run time: pass a local checkpoint, e.g. 'openclip:{model}:/path/to/open_clip_model.safetensors'"
        ) from exc
    return net.eval(), preprocess, oc.get_tokenizer(model)


class _OpenClipImage:
    def __init__(self, model: str, pretrained: str | None, device: str, weights: str, key: str, dim: int) -> None:
        self.net, self.preprocess, _ = _load(model, pretrained, device, weights)
        self.device, self.key, self.dim = device, key, dim

    @torch.no_grad()
    def encode(self, items: Sequence[Path]) -> np.ndarray:
        from PIL import Image

        batch = []
        for path in items:
            try:
                with Image.open(path) as im:
                    batch.append(self.preprocess(im.convert("RGB")))
            except OSError as exc:
                raise BackboneError(f"cannot read image {path}: {exc}") from exc
        feats = self.net.encode_image(torch.stack(batch).to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu().numpy()


class _OpenClipText:
    def __init__(self, model: str, pretrained: str | None, device: str, weights: str, key: str, dim: int) -> None:
        self.net, _, self.tokenizer = _load(model, pretrained, device, weights)
        self.device, self.key, self.dim = device, key, dim

    @torch.no_grad()
    def encode(self, items: Sequence[str]) -> np.ndarray:
        feats = self.net.encode_text(self.tokenizer(list(items)).to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu().numpy()


def openclip_backbone(model: str, pretrained: str | None, device: str) -> Backbone:
    oc = _open_clip()
    cfg = oc.get_model_config(model)
    if cfg is None:
        raise BackboneError(f"open_clip has no model config {model!r} (see open_clip.list_models())")
    dim = int(cfg["embed_dim"])
    weights = _weights_id(pretrained)
    img_key = f"openclip-{model}-{weights}-image@preprocess-default-l2"
    txt_key = f"openclip-{model}-{weights}-text@tokenizer-default-l2"
    return Backbone(
        name=f"openclip:{model}" + (f":{pretrained}" if pretrained else ""),
        img_dim=dim,
        txt_dim=dim,
        img_key=img_key,
        txt_key=txt_key,
        _image=lambda: _OpenClipImage(model, pretrained, device, weights, img_key, dim),
        _text=lambda: _OpenClipText(model, pretrained, device, weights, txt_key, dim),
    )
