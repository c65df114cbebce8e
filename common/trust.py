"""Bounds on what a client can make the server do with well-formed replies. Pure numpy.

A reply that passes every shape and finiteness check can still steer an aggregate if the server believes the numbers
it carries. The server therefore bounds each client-supplied quantity by what it can check (docs/TRUST.md, "Bounded
influence"):
- `cap_shares`: no client's share of any mix exceeds `max-client-share` (or the uniform share, if that is larger),
  applied after the method's own weights; `cap_columns`: the same per row of a table fused over clients;
- `clip_rows`: rows of a table that should be unit vectors or means of unit vectors (prototypes, FedCAFE memory
  rows) are cut to norm <= 1; `clip_entries`: means of relaxed codes to [-1, 1];
- `bounded_counts`: per-row item counts within [0, the items of the client's declared size];
- `bounded_fraction`: a measured rate (consistency, recall) within [0, 1];
- `bounded_loss`: a loss at most `LOSS_GROWTH` x the client's own previous one (and, relative to the peers,
  at most `REL_LOSS_MAX`).
"""

from __future__ import annotations

import numpy as np

LOSS_GROWTH = 2.0  # a client's loss may at most double from one of its rounds to the next before it is cut
TEXTS_PER_IMAGE = 10  # the most captions per image a client's text counts may hold (Flickr8k and COCO: 5-7)
REL_LOSS_MAX = 4.0  # a loss relative to the peers' mean is cut here (RCSR's minimax: exp(eta x 4) per round at most)


def share_limit(weights: np.ndarray, cap: float) -> float:
    """The largest share any one of the clients with positive weight may hold: the cap, or the uniform share if that
    is larger (a mix of k clients cannot give every one less than 1 / k)."""
    return max(float(cap), 1.0 / max(int(np.count_nonzero(np.asarray(weights) > 0)), 1))


def cap_shares(weights: np.ndarray, cap: float) -> np.ndarray:
    """The weights as a distribution in which no entry exceeds `share_limit`: entries above it are set to it and their
    excess is spread over the others in proportion to their weights (water-filling); zero entries stay zero. Where
    nothing is above the limit, the weights are returned as given (bit for bit) if they already sum to 1 within
    1e-9, else normalised: capping never changes numbers it does not have to."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(f"cap_shares needs non-negative finite weights with a positive sum, got {w.tolist()}")
    limit = share_limit(w, cap)
    if np.all(w <= limit * w.sum()):
        return w if abs(w.sum() - 1.0) <= 1e-9 else w / w.sum()
    w = w / w.sum()
    capped = np.zeros(len(w), dtype=bool)
    while True:
        free = ~capped & (w > 0)
        rest = 1.0 - limit * capped.sum()
        out = np.where(capped, limit, 0.0)
        out[free] = w[free] / w[free].sum() * rest
        over = free & (out > limit * (1 + 1e-12))
        if not over.any():
            return out
        capped |= over


def cap_columns(weights: np.ndarray, cap: float) -> np.ndarray:
    """(clients, rows) weights with every row's shares capped (`cap_shares` per column), each column's total kept:
    per-row mixes (a prototype or memory row fused over clients) are capped row by row."""
    w = np.asarray(weights, dtype=np.float64).copy()
    for r in np.flatnonzero(w.sum(axis=0) > 0):
        if w[:, r].max() > share_limit(w[:, r], cap) * w[:, r].sum():  # columns where nothing binds stay exact
            w[:, r] = cap_shares(w[:, r], cap) * w[:, r].sum()
    return w


def clip_rows(table: np.ndarray, max_norm: float = 1.0) -> np.ndarray:
    """Each row scaled down to norm <= `max_norm` (rows already within it are unchanged)."""
    t = np.asarray(table, dtype=np.float64)
    norms = np.linalg.norm(t, axis=-1, keepdims=True)
    return (t * np.minimum(1.0, max_norm / np.maximum(norms, 1e-12))).astype(np.float32)


def clip_entries(table: np.ndarray, bound: float = 1.0) -> np.ndarray:
    return np.clip(np.asarray(table, dtype=np.float32), -bound, bound)


def bounded_counts(counts: np.ndarray, size: float, modality: str = "img") -> np.ndarray:
    """Item counts per row, each within [0, the items a client of `size` images can hold]: `size` images, or
    `TEXTS_PER_IMAGE` x `size` captions for text tables (a client holds no more items of a concept than items)."""
    most = float(size) * (TEXTS_PER_IMAGE if modality == "txt" else 1)
    return np.clip(np.asarray(counts, dtype=np.float32), 0.0, most)


def bounded_fraction(value: float) -> float:
    """A measured rate (NaN stays NaN: not measured)."""
    return float(np.clip(value, 0.0, 1.0)) if np.isfinite(value) else float(value)


def bounded_loss(loss: float, previous: float | None) -> float:
    """A client's loss, cut to `LOSS_GROWTH` x its own previous (bounded) loss when it has one."""
    if previous is None or not np.isfinite(previous) or previous <= 0 or not np.isfinite(loss):
        return float(loss)
    return float(min(loss, LOSS_GROWTH * previous))
