"""Retrieval losses: symmetric InfoNCE on embeddings plus a hashing term so that sign(codes) retrieve well."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` matches row i of `b`; the other rows of the batch are negatives."""
    logits = scale * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@dataclass(frozen=True)
class LossWeights:
    hash_weight: float = 0.5
    quant_weight: float = 0.1
    hash_temperature: float = 0.1


def retrieval_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, img_code: torch.Tensor, txt_code: torch.Tensor,
                   scale: torch.Tensor, w: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE(embeddings) + w.hash * InfoNCE(normalised relaxed codes) + w.quant * mean((|code| - 1)^2).

    For ±1 codes the cosine is 1 - 2·Hamming/bits, so the hash InfoNCE trains the Hamming ranking directly; the
    quantisation term pushes tanh outputs to ±1 so that sign() loses little.
    """
    l_emb = info_nce(img_emb, txt_emb, scale)
    l_hash = info_nce(F.normalize(img_code, dim=-1), F.normalize(txt_code, dim=-1), 1.0 / w.hash_temperature)
    l_quant = ((img_code.abs() - 1.0) ** 2).mean() + ((txt_code.abs() - 1.0) ** 2).mean()
    total = l_emb + w.hash_weight * l_hash + w.quant_weight * l_quant
    return total, {"loss_emb": l_emb.item(), "loss_hash": l_hash.item(), "loss_quant": l_quant.item()}
