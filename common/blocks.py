"""What the shared model (`common.model`) and the method-owned parts (`common.parts`) both build on: the model's
config and the residual adapter. Its own module so that parts can use them without importing the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
    hash_detach: bool = False  # the hash head learns on the embedding without moving it (hash terms: head only)
    hash_scale: float = 1.0  # the hash feature is scale × Linear(unit embedding): > 1 lets codes reach ±1 sooner
    parts: tuple[str, ...] = ()  # method-owned parts of each tower, by name (`common.parts.PARTS`)
    concepts: int = 0  # label columns of the dataset, for parts that predict them (0: none known)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """From `to_dict()` as a run's config.json holds it; also reads the keys runs wrote before parts existed
        (`personal`, `afe_concepts`), so their run directories still load."""
        raw = dict(raw)
        parts = list(raw.pop("parts", ()))
        # the part names of `common.parts.personal` / `.fedcafe` (not imported: parts import this module; a test
        # ties them)
        if raw.pop("personal", False):
            parts.insert(0, "personal")
        legacy_concepts = int(raw.pop("afe_concepts", 0))
        if legacy_concepts:
            parts.append("fedcafe")
            raw["concepts"] = legacy_concepts
        return cls(**raw, parts=tuple(parts))


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
