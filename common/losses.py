"""Retrieval losses: symmetric InfoNCE on embeddings plus a hashing term so that sign(codes) retrieve well.

Two hashing terms (`hash-loss`): "infonce", InfoNCE on the normalised codes (an item's own counterpart is the
only positive); "pairwise", the pairwise likelihood of deep cross-modal hashing (DCMH, Jiang & Li 2017; FedCAFE's
and PLFedCMH's hash loss): items sharing a label are similar, plus a bit-balance term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    distill_weight: float = 0.0  # the continuous ranking distilled into the code similarities (`code_distill`)
    balance_weight: float = 0.0  # bit balance and decorrelation (`bit_balance`)
    straight_through: bool = False  # hash terms on sign(code) with the tanh gradient, not on the relaxed code
    hash_loss: Literal["infonce", "pairwise"] = "infonce"


HASH_LOSSES: tuple[str, ...] = ("infonce", "pairwise")


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


def retrieval_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, img_code: torch.Tensor, txt_code: torch.Tensor,
                   scale: torch.Tensor, w: LossWeights,
                   similar: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE(embeddings) + w.hash * hash term + w.quant * mean((|code| - 1)^2)
    [+ w.distill * code_distill + w.balance * bit_balance].

    Hash term "infonce": InfoNCE on the normalised codes. For ±1 codes the cosine is 1 - 2·Hamming/bits, so it
    trains the Hamming ranking directly. "pairwise": `pairwise_likelihood` with `similar` (b × b, 1 where two items
    share a label; the identity when None). The quantisation term pushes tanh outputs to ±1 so that sign() loses
    little. The hash terms see the relaxed codes, or (`straight_through`) their signs.
    """
    l_emb = info_nce(img_emb, txt_emb, scale)
    ic, tc = (signed(img_code), signed(txt_code)) if w.straight_through else (img_code, txt_code)
    if w.hash_loss == "pairwise":
        if similar is None:
            similar = torch.eye(len(ic), device=ic.device)
        l_hash = pairwise_likelihood(ic, tc, similar)
    else:
        l_hash = info_nce(F.normalize(ic, dim=-1), F.normalize(tc, dim=-1), 1.0 / w.hash_temperature)
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
