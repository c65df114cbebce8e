"""The trainable part of fedxmr: per-modality towers and hash heads on top of frozen features.

Tower = LayerNorm(frozen feature) -> Linear to the shared dimension -> residual bottleneck adapter
(x + up(GELU(down(x))), `up` zero-initialised so the adapter starts as identity) -> L2 normalisation.
Hash head = Linear(shared dim -> bits) giving the raw hash feature O; tanh while training, sign at retrieval.
Optional adaptive feature enhancement (FedCAFE, `cfg.afe_concepts` > 0): a classifier Linear(bits -> C) predicts
the concept distribution L̂ = softmax(·) from O, and the code is read from V_E = O + tanh(O) ⊙ (L̂ · P_g), P_g the
global memory (C × bits, one row per concept), a buffer the server sets every round (`<mod>.memory`).
Optional personal adapters (`cfg.personal`): one more zero-initialised residual adapter per tower, applied after
the shared one only when asked (`personal=True`); they never leave the node (`upload_keys` leaves them out).
Parameter names start with the modality (`img.` / `txt.`), so aggregation can work per modality; the temperature
(`logit_scale`) belongs to the image-text pair and is trained only by paired clients.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODALITIES: tuple[str, ...] = ("img", "txt")
MAX_SCALE = 100.0  # CLIP's cap on the inverse temperature


@dataclass(frozen=True)
class ModelConfig:
    img_dim: int
    txt_dim: int
    embed_dim: int = 256
    adapter_dim: int = 64
    hash_bits: int = 64
    temperature: float = 0.07
    learn_temperature: bool = True
    dropout: float = 0.3
    personal: bool = False
    hash_detach: bool = False  # the hash head learns on the embedding without moving it (hash terms: head only)
    hash_scale: float = 1.0  # the hash feature is scale × Linear(unit embedding): > 1 lets codes reach ±1 sooner
    afe_concepts: int = 0  # > 0: adaptive feature enhancement over that many concepts (FedCAFE)

    def to_dict(self) -> dict:
        return asdict(self)


class Adapter(nn.Module):
    """Residual bottleneck; zero-initialised up-projection makes it the identity at start."""

    def __init__(self, dim: int, bottleneck: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.drop(F.gelu(self.down(x))))


class Tower(nn.Module):
    """Frozen feature -> shared, L2-normalised embedding space, plus a hash head."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, cfg.embed_dim)
        self.adapter = Adapter(cfg.embed_dim, cfg.adapter_dim, cfg.dropout)
        self.personal = Adapter(cfg.embed_dim, cfg.adapter_dim, cfg.dropout) if cfg.personal else None
        self.hash = nn.Linear(cfg.embed_dim, cfg.hash_bits)
        self.hash_detach = cfg.hash_detach
        self.hash_scale = cfg.hash_scale
        self.classifier = nn.Linear(cfg.hash_bits, cfg.afe_concepts) if cfg.afe_concepts else None
        if cfg.afe_concepts:  # round 1: an all-zero memory, so V_E = O
            self.register_buffer("memory", torch.zeros(cfg.afe_concepts, cfg.hash_bits))

    def embed(self, x: torch.Tensor, personal: bool = False) -> torch.Tensor:
        h = self.adapter(self.proj(self.norm(x)))
        if personal:
            if self.personal is None:
                raise ValueError("this model has no personal adapters (ModelConfig.personal is False)")
            h = self.personal(h)
        return F.normalize(h, dim=-1)

    def forward(self, x: torch.Tensor, personal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, relaxed code in (-1, 1)). With `hash_detach` the code is a learned quantiser of the
        embedding: the hash terms train the head only, and the embedding is shaped by its own loss alone."""
        emb = self.embed(x, personal)
        return emb, torch.tanh(self.enhance(emb)[2])

    def enhance(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(O, concept logits, V_E) of the hash head on `emb`: V_E = O without enhancement."""
        raw = self.hash(emb.detach() if self.hash_detach else emb) * self.hash_scale
        if self.classifier is None:
            return raw, None, raw
        logits = self.classifier(raw)
        return raw, logits, enhanced(raw, torch.softmax(logits, dim=-1), self.memory)


def enhanced(raw: torch.Tensor, label_dist: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """FedCAFE's adaptive feature enhancement: V_E = O + tanh(O) ⊙ (L̂ · P_g). The selector tanh(O) lets each bit
    take as much of the memory read as its own confidence allows (0 where O is 0). With memory rows of norm ≤ 1
    (ours and the released code's), |L̂ · P_g| ≤ 1 and tanh|O| < |O|, so sign(V_E) = sign(O): AFE acts on the codes
    only through the training terms on V_E, never by flipping a bit at retrieval."""
    return raw + torch.tanh(raw) * (label_dist @ memory)


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
                       personal: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and relaxed codes (tanh of the hash feature, in (-1, 1)), in eval mode: what the codes are
        before the sign, to measure how binary they are and what the sign costs."""
        was_training = self.training
        self.eval()
        tower = self.tower(modality)
        device = next(self.parameters()).device
        embs, codes = [], []
        for start in range(0, len(feats), batch_size):
            x = torch.as_tensor(feats[start:start + batch_size], dtype=torch.float32, device=device)
            emb, relaxed = tower(x, personal)
            embs.append(emb.cpu().numpy())
            codes.append(relaxed.cpu().numpy())
        self.train(was_training)
        return np.concatenate(embs), np.concatenate(codes)

    def encode(self, modality: str, feats: np.ndarray, batch_size: int = 4096,
               personal: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and ±1 hash codes (sign, with 0 -> +1) for retrieval, in eval mode."""
        emb, relaxed = self.encode_relaxed(modality, feats, batch_size, personal)
        return emb, np.where(relaxed >= 0, 1, -1).astype(np.int8)

    @torch.no_grad()
    def hash_features(self, modality: str, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The enhanced hash feature V_E (= the raw O without AFE) and the concept logits (None without AFE), in
        eval mode: what FedCAFE's memory and PLFedCMH's prototypes are computed from."""
        was_training = self.training
        self.eval()
        tower = self.tower(modality)
        x = torch.as_tensor(feats, dtype=torch.float32, device=next(self.parameters()).device)
        _, logits, v_e = tower.enhance(tower.embed(x))
        self.train(was_training)
        return v_e.cpu().numpy(), (None if logits is None else logits.cpu().numpy())


def is_personal(key: str) -> bool:
    return ".personal." in key


def upload_keys(keys, modalities: tuple[str, ...]) -> list[str]:
    """The shared keys a client holding `modalities` trains and sends: its towers, and the temperature if paired."""
    pair = set(MODALITIES) <= set(modalities)
    return [k for k in keys if not is_personal(k) and (k.split(".", 1)[0] in modalities or (pair and "." not in k))]


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, state: dict[str, np.ndarray], partial: bool = False) -> None:
    """Load arrays into the model; a mis-shaped or unknown key is an error that names it, and so is a missing one
    unless `partial` (e.g. global arrays into a model that also has personal adapters)."""
    own = model.state_dict()
    missing = [] if partial else sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise KeyError(f"model state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"model state key {key!r}: shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}, strict=not partial)
