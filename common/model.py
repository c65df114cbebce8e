"""The trainable part of fedxmr: per-modality towers and hash heads on top of frozen features.

Tower = LayerNorm(frozen feature) -> Linear to the shared dimension -> residual bottleneck adapter
(x + up(GELU(down(x))), `up` zero-initialised so the adapter starts as identity) -> L2 normalisation.
Hash head = Linear(shared dim -> bits) giving the raw hash feature O; tanh while training, sign at retrieval.
Anything more a method needs lives in its own part (`common.parts`, named in `ModelConfig.parts`): an "embed" part
is another view of the embedding, used when asked for by name; a "code" part turns O into the feature the code is
read from. Private parts never leave the node (`upload_keys`).
Parameter names start with the modality (`img.` / `txt.`), so aggregation can work per modality; the temperature
(`logit_scale`) belongs to the image-text pair and is trained only by paired clients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.blocks import Adapter, ModelConfig
from common.parts import is_private, specs

__all__ = ["MODALITIES", "Adapter", "ModelConfig", "Tower", "XmrModel", "upload_keys", "state_to_numpy",
           "load_numpy_state"]

MODALITIES: tuple[str, ...] = ("img", "txt")
MAX_SCALE = 100.0  # CLIP's cap on the inverse temperature


class CodeOut(NamedTuple):
    raw: torch.Tensor  # O, the hash head's output
    aux: torch.Tensor | None  # what the code part adds (None without one)
    feature: torch.Tensor  # what the code is read from (O without a code part)


class Tower(nn.Module):
    """Frozen feature -> shared, L2-normalised embedding space, plus a hash head and the config's parts."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        parts = specs(cfg)
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, cfg.embed_dim)
        self.adapter = Adapter(cfg.embed_dim, cfg.adapter_dim, cfg.dropout)
        # embed parts before the hash head, code parts after it: the order the initialisation draws in
        self.views = tuple(name for name, spec in parts.items() if spec.stage == "embed")
        for name in self.views:
            self.add_module(name, parts[name].build(cfg))
        self.hash = nn.Linear(cfg.embed_dim, cfg.hash_bits)
        self.hash_detach = cfg.hash_detach
        self.hash_scale = cfg.hash_scale
        self.code_part = next((name for name, spec in parts.items() if spec.stage == "code"), None)
        if self.code_part is not None:
            self.add_module(self.code_part, parts[self.code_part].build(cfg))

    def embed(self, x: torch.Tensor, view: str | None = None) -> torch.Tensor:
        h = self.adapter(self.proj(self.norm(x)))
        if view is not None:
            if view not in self.views:
                raise ValueError(f"this model has no {view!r} view (its embed parts: {list(self.views)})")
            h = self.get_submodule(view)(h)
        return F.normalize(h, dim=-1)

    def forward(self, x: torch.Tensor, view: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, relaxed code in (-1, 1)). With `hash_detach` the code is a learned quantiser of the
        embedding: the hash terms train the head only, and the embedding is shaped by its own loss alone."""
        emb = self.embed(x, view)
        return emb, torch.tanh(self.code(emb).feature)

    def code(self, emb: torch.Tensor) -> CodeOut:
        """The hash head on `emb`, then the code part if the model has one."""
        raw = self.hash(emb.detach() if self.hash_detach else emb) * self.hash_scale
        if self.code_part is None:
            return CodeOut(raw, None, raw)
        aux, feature = self.get_submodule(self.code_part)(raw)
        return CodeOut(raw, aux, feature)


class XmrModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.img = Tower(cfg.img_dim, cfg)
        self.txt = Tower(cfg.txt_dim, cfg)
        # shape (1,), not a 0-d scalar: Flower's Array round-trips 0-d tensors as shape (1,)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(min(1.0 / cfg.temperature, MAX_SCALE))),
                                        requires_grad=cfg.learn_temperature)

    def tower(self, modality: str) -> Tower:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        return self.img if modality == "img" else self.txt

    def scale(self) -> torch.Tensor:
        """Inverse temperature. Capped at 100 as in CLIP by `clamp_temperature` after each step (clamping here
        would zero its gradient above the cap and leave it stuck there)."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        self.logit_scale.clamp_(max=math.log(MAX_SCALE))

    @torch.no_grad()
    def encode_relaxed(self, modality: str, feats: np.ndarray, batch_size: int = 4096,
                       view: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and relaxed codes (tanh of the hash feature, in (-1, 1)), in eval mode: what the codes are
        before the sign, to measure how binary they are and what the sign costs."""
        was_training = self.training
        self.eval()
        tower = self.tower(modality)
        device = next(self.parameters()).device
        embs, codes = [], []
        for start in range(0, len(feats), batch_size):
            x = torch.as_tensor(feats[start:start + batch_size], dtype=torch.float32, device=device)
            emb, relaxed = tower(x, view)
            embs.append(emb.cpu().numpy())
            codes.append(relaxed.cpu().numpy())
        self.train(was_training)
        return np.concatenate(embs), np.concatenate(codes)

    def encode(self, modality: str, feats: np.ndarray, batch_size: int = 4096,
               view: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and ±1 hash codes (sign, with 0 -> +1) for retrieval, in eval mode; `view`: an embed part."""
        emb, relaxed = self.encode_relaxed(modality, feats, batch_size, view)
        return emb, np.where(relaxed >= 0, 1, -1).astype(np.int8)

    @torch.no_grad()
    def hash_features(self, modality: str, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The feature the codes are read from (the raw O without a code part) and the code part's own output (None
        without one), in eval mode: what tables of code features (memories, prototypes) are computed from."""
        was_training = self.training
        self.eval()
        tower = self.tower(modality)
        x = torch.as_tensor(feats, dtype=torch.float32, device=next(self.parameters()).device)
        out = tower.code(tower.embed(x))
        self.train(was_training)
        return out.feature.cpu().numpy(), (None if out.aux is None else out.aux.cpu().numpy())


def upload_keys(keys, modalities: tuple[str, ...]) -> list[str]:
    """The shared keys a client holding `modalities` trains and sends: its towers, and the temperature if paired."""
    pair = set(MODALITIES) <= set(modalities)
    return [k for k in keys if not is_private(k) and (k.split(".", 1)[0] in modalities or (pair and "." not in k))]


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, state: dict[str, np.ndarray], partial: bool = False) -> None:
    """Load arrays into the model; a mis-shaped or unknown key is an error that names it, and so is a missing one
    unless `partial` (e.g. global arrays into a model that also has a private part)."""
    own = model.state_dict()
    missing = [] if partial else sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise KeyError(f"model state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"model state key {key!r}: shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}, strict=not partial)
