"""FedCAFE's model part (ACM MM 2024): adaptive feature enhancement on the hash head.

A classifier Linear(bits -> C) predicts the concept distribution L̂ = softmax(·) from the raw hash feature O, and
the code is read from V_E = O + tanh(O) ⊙ (L̂ · P_g), P_g the global memory (C × bits, one row per concept), a
buffer the server sets every round (`memory_key`). Arrays: `<mod>.fedcafe.classifier.*`, `<mod>.fedcafe.memory`.
"""

from __future__ import annotations

import torch
from torch import nn

from common.blocks import ModelConfig

NAME = "fedcafe"


def memory_key(modality: str) -> str:
    """The array that carries the global memory inside the model, per tower."""
    return f"{modality}.{NAME}.memory"


class EnhancementHead(nn.Module):
    """O -> (concept logits, V_E)."""

    def __init__(self, bits: int, concepts: int) -> None:
        super().__init__()
        if concepts < 1:
            raise ValueError("the fedcafe part needs the dataset's concept count (ModelConfig.concepts >= 1)")
        self.classifier = nn.Linear(bits, concepts)
        self.register_buffer("memory", torch.zeros(concepts, bits))  # round 1: all zero, so V_E = O

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(raw)
        return logits, enhanced(raw, torch.softmax(logits, dim=-1), self.memory)


def build(cfg: ModelConfig) -> nn.Module:
    return EnhancementHead(cfg.hash_bits, cfg.concepts)


def enhanced(raw: torch.Tensor, label_dist: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """FedCAFE's adaptive feature enhancement: V_E = O + tanh(O) ⊙ (L̂ · P_g). The selector tanh(O) lets each bit
    take as much of the memory read as its own confidence allows (0 where O is 0). With memory rows of norm ≤ 1
    (ours and the released code's), |L̂ · P_g| ≤ 1 and tanh|O| < |O|, so sign(V_E) = sign(O): AFE acts on the codes
    only through the training terms on V_E, never by flipping a bit at retrieval."""
    return raw + torch.tanh(raw) * (label_dist @ memory)
