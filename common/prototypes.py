"""Semantic prototypes of the shared embedding space, per modality (used by RCSR).

A prototype table has one row per slot: row 0 is the mean of all embeddings, rows 1..C the per-concept means over
the dataset's labels (a feature file's own, else the DERIVED concepts of `common.data.concepts`), each L2-normalised;
`counts` says how many items fed a row (0: the row is empty). Clients without labels (Flickr8k image-only: labels
come from captions) use pseudo-labels, the nearest
global image prototype. The server fuses client tables into global tables with an EMA; clients anchor to them.
Pure numpy/torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.trust import cap_columns

MODS = ("img", "txt")

def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0, x / np.maximum(norm, 1e-12), 0.0)


def compute_prototypes(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table (1 + C, d), counts (1 + C,)) from embeddings (n, d) and multi-hot labels (n, C); an item with several
    concepts feeds each of their rows."""
    if len(emb) != len(labels):
        raise ValueError(f"compute_prototypes: {len(emb)} embeddings but {len(labels)} label rows")
    lab = labels.astype(np.float64)
    sums = np.vstack([emb.sum(axis=0, keepdims=True), lab.T @ emb])
    counts = np.concatenate([[len(emb)], lab.sum(axis=0)])
    return _normalise(sums).astype(np.float32), counts.astype(np.float32)


def pseudo_labels(emb: np.ndarray, table: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One-hot (n, C): each item's nearest non-empty concept prototype (cosine) of its own modality."""
    valid = counts[1:] > 0
    out = np.zeros((len(emb), len(valid)), dtype=np.uint8)
    if not valid.any() or not len(emb):
        return out
    sims = np.where(valid[None, :], emb @ table[1:].T, -np.inf)
    out[np.arange(len(emb)), sims.argmax(axis=1)] = 1
    return out


def fuse_prototypes(global_table: np.ndarray, global_counts: np.ndarray, tables: list[np.ndarray],
                    counts: list[np.ndarray], weights: np.ndarray, ema: float,
                    max_share: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One server update per round: for each row, the clients' prototypes averaged with weight
    `client weight * items in that row` (no client above `max_share` of a row: `common.trust.cap_columns`), then
    g <- normalise(ema * g + (1 - ema) * that average). A row seen for the first time takes the average as is (no EMA
    toward a zero vector); a row no client fed keeps its value.
    Returns the new table and the accumulated item counts (a row is valid once its count is > 0)."""
    if not tables:
        return global_table, global_counts
    w = cap_columns(np.asarray(weights, dtype=np.float64)[:, None] * np.stack(counts).astype(np.float64), max_share)
    mass = w.sum(axis=0)
    avg = _normalise(np.einsum("kr,krd->rd", w, np.stack(tables).astype(np.float64)))
    seen = global_counts > 0
    blended = np.where(seen[:, None], _normalise(ema * global_table + (1 - ema) * avg), avg)
    new = np.where((mass > 0)[:, None], blended, global_table)
    return new.astype(np.float32), (global_counts + np.stack(counts).sum(axis=0)).astype(np.float32)


@dataclass(frozen=True)
class Anchor:
    """Prototype anchoring for one modality: pull each item's embedding toward the *other* modality's global
    prototype of its concept(s), away from the other concepts (a prototype-level InfoNCE). `targets` (n_items, C)
    is multi-hot (derived or pseudo labels); items without a label are not anchored."""

    targets: torch.Tensor  # (n_items, C) float
    prototypes: torch.Tensor  # (C, d), other modality, rows of empty concepts masked out by `valid`
    valid: torch.Tensor  # (C,) bool
    weight: float
    temperature: float

    def loss(self, emb: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        target = self.targets[torch.as_tensor(idx, device=self.targets.device)] * self.valid
        has = target.sum(dim=1) > 0
        if not bool(has.any()):
            return emb.sum() * 0.0
        logits = (emb[has] @ self.prototypes.t()) / self.temperature
        logits = logits.masked_fill(~self.valid, float("-inf"))
        target = target[has] / target[has].sum(dim=1, keepdim=True)
        log_p = F.log_softmax(logits, dim=1).masked_fill(~self.valid, 0.0)
        return self.weight * -(target * log_p).sum(dim=1).mean()


def make_anchor(targets: np.ndarray, other_table: np.ndarray, other_counts: np.ndarray, weight: float,
                temperature: float, device: str | torch.device = "cpu") -> Anchor | None:
    """An Anchor toward the other modality's concept rows, or None if nothing can be anchored."""
    valid = other_counts[1:] > 0
    if weight <= 0 or not valid.any() or not (targets[:, valid].sum(axis=1) > 0).any():
        return None
    return Anchor(targets=torch.as_tensor(targets, dtype=torch.float32, device=device),
                  prototypes=torch.as_tensor(other_table[1:], dtype=torch.float32, device=device),
                  valid=torch.as_tensor(valid, device=device), weight=weight, temperature=temperature)


def prototype_accuracy(emb: np.ndarray, targets: np.ndarray, other_table: np.ndarray,
                       other_counts: np.ndarray) -> float:
    """Cross-modal consistency: the fraction of labelled items whose nearest *other-modality* concept prototype is
    one of their concepts (NaN when no item can be scored)."""
    valid = other_counts[1:] > 0
    scored = (targets[:, valid].sum(axis=1) > 0) if valid.any() else np.zeros(len(emb), bool)
    if not scored.any():
        return float("nan")
    sims = np.where(valid[None, :], emb[scored] @ other_table[1:].T, -np.inf)
    top = sims.argmax(axis=1)
    return float(targets[scored][np.arange(int(scored.sum())), top].astype(bool).mean())
