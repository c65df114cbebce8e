"""Fault and attack drills: a node misbehaves on purpose when the run config's `faults` names its partition, so that
tests, rehearsals and the attack measurements (docs/ATTACKS.md) can check what the server does with it. Off unless
asked for (`faults = ""`).

Faults:
- `raise`: the train handler raises (a crashing ClientApp);
- `nan`: the node sends its arrays filled with NaN;
- `poison`: the node sends the global arrays plus 1000 x its update and claims 1000 x its examples.
Attacks whose replies are well-formed (each passes every shape and finiteness check):
- `inflate`: claims 1000 x its examples, and 1000 x the items of every row of its tables (prototypes, memory);
- `scale`: its tables (prototype and memory rows, linear statistics) x 1000, counts unchanged;
- `boast`: reports RCSR consistency and pair recall 50 and a train loss of 1e30;
- `flip`: sends the global arrays minus 5 x its update: the opposite direction, inside the update-norm screen;
- `replay`: sends its first upload again in every later round (kept in the node's context state).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

POISON_SCALE = 1000.0
FLIP_SCALE = 5.0
REPLAY_RECORD = "fault-replay"
FAULTS = ("raise", "nan", "poison", "inflate", "scale", "boast", "flip", "replay")
COUNT_KEYS = ("count", "img-count", "txt-count")  # item counts per row in a method's tables


class InjectedFault(RuntimeError):
    """Raised by a node drilled to fail (`faults = "<partition>:raise"`)."""


def fault_of(faults: str, partition_id: int) -> str | None:
    """The drill for this partition, if any ('1:raise,3:nan' -> 'raise' for partition 1)."""
    for item in filter(None, faults.split(",")):
        pid, kind = item.split(":")
        if int(pid) == partition_id:
            return kind
    return None


def fail_if_drilled(kind: str | None) -> None:
    """Raise `InjectedFault` if this node is drilled to fail (called before any work)."""
    if kind == "raise":
        raise InjectedFault("fault drill: this node raises in every train message (run config `faults`)")


def apply_fault(kind: str | None, state: dict[str, torch.Tensor], received: dict[str, np.ndarray],
                num_examples: int, memo: RecordDict) -> tuple[dict[str, torch.Tensor], int]:
    """The arrays and example count the node sends under drill `kind` (None, or a drill of other parts: unchanged).
    `memo`: the node's context state (what `replay` sends)."""
    fail_if_drilled(kind)
    if kind == "nan":
        return {k: torch.full_like(v, float("nan")) for k, v in state.items()}, num_examples
    if kind in ("poison", "flip"):
        scale = POISON_SCALE if kind == "poison" else -FLIP_SCALE
        moved = {k: torch.as_tensor(received[k]) + scale * (v - torch.as_tensor(received[k])) for k, v in state.items()}
        return moved, int(num_examples * POISON_SCALE) if kind == "poison" else num_examples
    if kind == "inflate":
        return state, int(num_examples * POISON_SCALE)
    if kind == "replay" and state:
        if REPLAY_RECORD not in memo.array_records:
            memo[REPLAY_RECORD] = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in state.items()})
        return {k: torch.as_tensor(a.numpy()) for k, a in memo[REPLAY_RECORD].items()}, num_examples
    return state, num_examples


def tamper_reply(kind: str | None, metrics: dict[str, float], records: RecordDict, arrays_key: str) -> None:
    """What drills `inflate`, `scale` and `boast` change in a reply's metrics and method records (in place); the
    model arrays (record `arrays_key`) are `apply_fault`'s."""
    if kind == "boast":
        metrics |= {k: 50.0 for k in ("rcsr-consistency", "rcsr-pair-recall") if k in metrics}
        metrics["train-loss"] = 1e30
        return
    if kind not in ("inflate", "scale"):
        return
    for name, record in list(records.array_records.items()):
        if name == arrays_key:
            continue
        out = {}
        for key, array in record.items():
            value = array.numpy()
            is_count = key in COUNT_KEYS or key.endswith(("-n", "-ysum"))
            if (kind == "inflate") == is_count:  # inflate: the counts; scale: everything else
                value = value * POISON_SCALE
            out[key] = Array(np.ascontiguousarray(value))
        records[name] = ArrayRecord(out)
