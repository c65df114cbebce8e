"""Per-reply bookkeeping of a round: content checks, metric means, per-tower weights, sortable metric values, and
the conversion of arrays to and from Flower records."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from common import protocol as P
from common.trust import cap_shares


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def record_bytes(content: RecordDict) -> int:
    """Bytes of all arrays a message carries (what a method exchanges; configs and metrics are negligible)."""
    return int(sum(a.numpy().nbytes for rec in content.array_records.values() for a in rec.values()))


def scalar(value: Any, default: float = -1) -> float:
    """A metric value as a number for sorting (a list, which MetricRecord allows, or anything else: `default`)."""
    return float(value) if isinstance(value, (int, float)) else default


def effective_weights(weights: np.ndarray, sent: list[set[str]], max_share: float = 1.0) -> list[dict[str, float]]:
    """Each client's weight after per-key renormalisation and the per-key cap (as `common.robust.combine` applies
    them), per tower: its share of the image and of the text tower (the logged `weight` is before it)."""
    out: list[dict[str, float]] = [{} for _ in sent]
    for mod in ("img", "txt"):
        held = np.array([float(any(k.startswith(f"{mod}.") for k in keys)) for keys in sent]) * weights
        if held.sum() > 0:
            for row, w in zip(out, cap_shares(held / held.sum(), max_share)):
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


def content_problem(content: RecordDict, reference: dict[str, np.ndarray], max_num_examples: float,
                    arrays_required: bool) -> str | None:
    """What is wrong with a reply's content (None: nothing), checked against the global model `reference`
    (empty: not known yet): metrics and `num-examples` bounds, declared modalities, keys, dtype, shape, and values
    finite *as the global model stores them*."""
    if P.METRICS not in content.metric_records:
        return f"reply lacks the {P.METRICS!r} MetricRecord"
    n = content[P.METRICS].get(P.NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or not math.isfinite(n) or not n > 0:
        return f"metric {P.NUM_EXAMPLES!r} must be a positive finite number, got {n!r}"
    if n > max_num_examples:
        return f"metric {P.NUM_EXAMPLES!r} = {n:g} exceeds max-num-examples = {max_num_examples}"
    if P.ARRAYS not in content.array_records:
        return f"reply lacks the {P.ARRAYS!r} ArrayRecord" if arrays_required else None
    arrays = content[P.ARRAYS]
    if arrays_required and not len(arrays):
        return "reply carries no arrays"
    undeclared = [k for k in arrays.keys() if k.split(".", 1)[0] in P.HAS
                  and not content[P.METRICS].get(P.HAS[k.split(".", 1)[0]], 1)]
    if undeclared:
        return f"arrays of a modality the client says it does not hold: {undeclared[:4]}"
    if reference and not set(arrays.keys()) <= set(reference):
        return f"arrays not in the global model: {sorted(set(arrays.keys()) - set(reference))[:4]}"
    for key, arr in arrays.items():
        value = arr.numpy()
        if value.dtype.kind != "f":  # int, bool or complex would be cast silently (complex: truncated)
            return f"array {key!r} has dtype {value.dtype}, expected floating point"
        if reference and value.shape != reference[key].shape:
            return f"array {key!r} has shape {value.shape}, expected {reference[key].shape}"
        if reference:  # finite *as the global model stores it*: 1e300 in float64 is inf in float32
            with np.errstate(over="ignore"):
                value = value.astype(reference[key].dtype)
        if not np.all(np.isfinite(value)):
            return f"array {key!r} has non-finite values (as {value.dtype})"
    return None


def is_paired(msg: Message) -> bool:
    """Whether a reply's client holds both modalities (`has-img` / `has-txt`, both 1 when not reported)."""
    return all(msg.content[P.METRICS].get(P.HAS[m], 1) for m in P.HAS)
