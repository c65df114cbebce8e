"""Retrieval losses: symmetric InfoNCE on embeddings plus a hashing term so that sign(codes) retrieve well.

Three hashing terms (`hash-loss`): "infonce", InfoNCE on the normalised codes (an item's own counterpart is the
only positive); "pairwise", the pairwise likelihood of deep cross-modal hashing (DCMH, Jiang & Li 2017; FedCAFE's
and PLFedCMH's hash loss): items sharing a label are similar, plus a bit-balance term; "center", central similarity
quantisation (CSQ, Yuan et al. 2020): each item's code is pulled bit by bit to the hash center of its labels, fixed
±1 codewords shared by every client (no communication, the same targets under any partition), which also drives the
codes to ±1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float,
             positives: torch.Tensor | None = None, share: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` matches row i of `b`; the other rows of the batch are negatives. With
    `positives` (b × b, 1 where two items share a label) and `share` > 0, that share of each row's target mass is
    spread over the label-sharing items (supervised-contrastive style), so items of a label are no longer pushed
    apart; the rest stays on the item's own counterpart."""
    logits = scale * a @ b.t()
    if positives is None or share <= 0:
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    eye = torch.eye(a.shape[0], device=a.device)
    soft = (1.0 - share) * eye + share * positives / positives.sum(dim=1, keepdim=True)
    # `positives` is symmetric, so row i of `soft` is item i's target in either direction
    return 0.5 * (F.cross_entropy(logits, soft) + F.cross_entropy(logits.t(), soft))


@dataclass(frozen=True)
class LossWeights:
    hash_weight: float = 0.5
    quant_weight: float = 0.1
    hash_temperature: float = 0.1
    distill_weight: float = 0.0  # the continuous ranking distilled into the code similarities (`code_distill`)
    balance_weight: float = 0.0  # bit balance and decorrelation (`bit_balance`)
    straight_through: bool = False  # hash terms on sign(code) with the tanh gradient, not on the relaxed code
    hash_loss: Literal["infonce", "pairwise", "center"] = "infonce"
    label_positives: float = 0.0  # share of the InfoNCE targets (embeddings, and codes) on label-sharing items


HASH_LOSSES: tuple[str, ...] = ("infonce", "pairwise", "center")
CENTER_SEED = 0  # the hash centers are a function of (labels, bits) alone, so every client derives the same ones


def signed(code: torch.Tensor) -> torch.Tensor:
    """sign(code) forward, the identity's gradient backward (straight-through estimator): the hash terms then
    score the ±1 codes that retrieval uses, not their tanh relaxation."""
    return code + (torch.where(code >= 0, 1.0, -1.0) - code).detach()


def code_distill(img_emb: torch.Tensor, txt_emb: torch.Tensor, img_code: torch.Tensor, txt_code: torch.Tensor,
                 scale: torch.Tensor, code_temperature: float) -> torch.Tensor:
    """KL(continuous ranking || code ranking) over the batch, both directions: the softmax of the (detached)
    embedding similarities teaches the code cosines the order of *every* caption, not only which one is the
    positive (InfoNCE on codes alone), so the Hamming ranking follows the continuous one."""
    with torch.no_grad():
        teacher = scale * img_emb @ txt_emb.t()
    student = F.normalize(img_code, dim=-1) @ F.normalize(txt_code, dim=-1).t() / code_temperature
    kl = 0.0
    for t, s in ((teacher, student), (teacher.t(), student.t())):
        kl = kl + F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
    return 0.5 * kl


def bit_balance(code: torch.Tensor) -> torch.Tensor:
    """Each bit half +1, half -1 over the batch (mean 0), and bits uncorrelated (off-diagonal of the bit
    correlation 0): unbalanced or redundant bits waste code length."""
    bits = code.shape[1]
    corr = code.t() @ code / code.shape[0]
    off = corr - torch.diag(torch.diagonal(corr))
    return (code.mean(dim=0) ** 2).mean() + (off ** 2).sum() / (bits * (bits - 1))


def pairwise_likelihood(img_code: torch.Tensor, txt_code: torch.Tensor, similar: torch.Tensor) -> torch.Tensor:
    """DCMH's negative log-likelihood of the pairwise similarities, mean over the b × b pairs:
    θ_ij = ½ <img_i, txt_j>, NLL = softplus(θ) - S·θ (softplus, not log(1 + e^θ), so that it cannot overflow),
    plus the bit balance of both sides (each bit's mean over the batch near 0)."""
    theta = 0.5 * img_code @ txt_code.t()
    nll = (F.softplus(theta) - similar * theta).mean()
    balance = (img_code.mean(dim=0) ** 2).mean() + (txt_code.mean(dim=0) ** 2).mean()
    return nll + balance


@functools.lru_cache(maxsize=16)
def _centers(concepts: int, bits: int) -> np.ndarray:
    """(concepts, bits) ±1 hash centers, as CSQ: rows of a Hadamard matrix and their negations (pairwise Hamming
    distance bits/2 or bits) when bits is a power of 2 and concepts <= 2·bits, else seeded random ±1 rows."""
    if bits & (bits - 1) == 0 and concepts <= 2 * bits:
        h = np.ones((1, 1))
        while h.shape[0] < bits:
            h = np.block([[h, h], [h, -h]])
        return np.concatenate([h, -h])[:concepts]
    return np.where(np.random.default_rng(CENTER_SEED).random((concepts, bits)) < 0.5, -1.0, 1.0)


def center_targets(labels: torch.Tensor, bits: int) -> torch.Tensor:
    """Each item's hash center: the sign of the sum of its labels' centers (ties: the bit of its first label's
    center), as CSQ does for multi-label items; (b, bits) ±1. Rows without a label are 0 (no target)."""
    centers = torch.as_tensor(_centers(labels.shape[1], bits), dtype=labels.dtype, device=labels.device)
    total = labels @ centers
    first = centers[labels.argmax(dim=1)] * (labels.sum(dim=1, keepdim=True) > 0)
    return torch.where(total != 0, torch.sign(total), first)


def center_loss(code: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bitwise binary cross-entropy of the relaxed code, read as P(bit = +1) = (code + 1) / 2, against the item's hash
    center; items without labels do not count."""
    target = center_targets(labels, code.shape[1])
    has = target.abs().sum(dim=1) > 0
    if not bool(has.any()):
        return code.sum() * 0.0
    prob = ((code[has] + 1.0) / 2.0).clamp(1e-6, 1.0 - 1e-6)
    return F.binary_cross_entropy(prob, (target[has] + 1.0) / 2.0)


def label_similarity(labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """(n, n) 1/0: items sharing a label, and every item with itself (its own counterpart); without labels, the
    identity."""
    eye = torch.eye(n, dtype=torch.bool, device=device)
    if labels is None or labels.shape[1] == 0:
        return eye.float()
    return ((labels @ labels.t() > 0) | eye).float()


def retrieval_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, img_code: torch.Tensor, txt_code: torch.Tensor,
                   scale: torch.Tensor, w: LossWeights,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE(embeddings) + w.hash * hash term + w.quant * mean((|code| - 1)^2)
    [+ w.distill * code_distill + w.balance * bit_balance].

    Hash term "infonce": InfoNCE on the normalised codes (label-sharing items get `label_positives` of the target
    too, as in the embedding InfoNCE). For ±1 codes the cosine is 1 - 2·Hamming/bits, so it
    trains the Hamming ranking directly. "pairwise": `pairwise_likelihood`, two items similar when they share a label
    (`labels`: b × C multi-hot, row i for both sides of pair i; without labels only an item and its counterpart are).
    "center": `center_loss` of both sides (no term without labels). The quantisation term pushes tanh outputs to ±1
    so that sign() loses little. The hash terms see the relaxed codes, or (`straight_through`) their signs.
    """
    similar = label_similarity(labels, len(img_emb), img_emb.device)
    l_emb = info_nce(img_emb, txt_emb, scale, similar if labels is not None else None, w.label_positives)
    ic, tc = (signed(img_code), signed(txt_code)) if w.straight_through else (img_code, txt_code)
    if w.hash_loss == "pairwise":
        l_hash = pairwise_likelihood(ic, tc, similar)
    elif w.hash_loss == "center":
        l_hash = (0.5 * (center_loss(ic, labels) + center_loss(tc, labels)) if labels is not None
                  and labels.shape[1] else ic.sum() * 0.0)
    else:
        l_hash = info_nce(F.normalize(ic, dim=-1), F.normalize(tc, dim=-1), 1.0 / w.hash_temperature,
                          similar if labels is not None else None, w.label_positives)
    l_quant = ((img_code.abs() - 1.0) ** 2).mean() + ((txt_code.abs() - 1.0) ** 2).mean()
    total = l_emb + w.hash_weight * l_hash + w.quant_weight * l_quant
    parts = {"loss_emb": l_emb.item(), "loss_hash": l_hash.item(), "loss_quant": l_quant.item()}
    if w.distill_weight > 0:
        l_distill = code_distill(img_emb, txt_emb, ic, tc, scale, w.hash_temperature)
        total = total + w.distill_weight * l_distill
        parts["loss_distill"] = l_distill.item()
    if w.balance_weight > 0:
        l_balance = 0.5 * (bit_balance(img_code) + bit_balance(txt_code))
        total = total + w.balance_weight * l_balance
        parts["loss_balance"] = l_balance.item()
    return total, parts
