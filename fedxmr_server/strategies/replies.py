"""Per-reply bookkeeping of a round: metric means, per-tower weights, sortable metric values."""

from __future__ import annotations

from typing import Any

import numpy as np

from common import protocol as P


def scalar(value: Any, default: float = -1) -> float:
    """A metric value as a number for sorting (a list, which MetricRecord allows, or anything else: `default`)."""
    return float(value) if isinstance(value, (int, float)) else default


def effective_weights(weights: np.ndarray, sent: list[set[str]]) -> list[dict[str, float]]:
    """Each client's weight after per-key renormalisation, per tower: its share of the image and of the text tower
    (the logged `weight` is before it)."""
    out: list[dict[str, float]] = [{} for _ in sent]
    for mod in ("img", "txt"):
        held = np.array([float(any(k.startswith(f"{mod}.") for k in keys)) for keys in sent]) * weights
        if held.sum() > 0:
            for row, w in zip(out, held / held.sum()):
                row[f"weight-{mod}"] = float(w)
    return out


def mean_metrics(metrics: list[dict], weights: np.ndarray) -> dict[str, float]:
    """Weighted mean of every numeric metric over the clients that report it (weights renormalised over them);
    identifiers and checksums are not averaged."""
    keys = sorted({k for mm in metrics for k, v in mm.items() if isinstance(v, (int, float))} - set(P.NOT_AVERAGED))
    agg = {}
    for key in keys:
        held = [(w, float(mm[key])) for w, mm in zip(weights, metrics) if isinstance(mm.get(key), (int, float))]
        total = sum(w for w, _ in held)
        if total > 0:
            agg[key] = float(sum(w * v for w, v in held) / total)
    agg[P.NUM_EXAMPLES] = float(sum(mm[P.NUM_EXAMPLES] for mm in metrics))
    return agg
