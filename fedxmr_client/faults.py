"""Fault drills: a node misbehaves on purpose when the run config's `faults` names its partition, so that tests and
rehearsals can check what the server does with it. Off unless asked for (`faults = ""`).

- `raise`: the train handler raises (a crashing ClientApp);
- `nan`: the node sends its arrays filled with NaN;
- `poison`: the node sends the global arrays plus 1000 x its update and claims 1000 x its examples.
"""

from __future__ import annotations

import numpy as np
import torch

POISON_SCALE = 1000.0


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
                num_examples: int) -> tuple[dict[str, torch.Tensor], int]:
    """The arrays and example count the node sends under drill `kind` (None: unchanged)."""
    if kind is None:
        return state, num_examples
    fail_if_drilled(kind)
    if kind == "nan":
        return {k: torch.full_like(v, float("nan")) for k, v in state.items()}, num_examples
    if kind == "poison":
        poisoned = {k: torch.as_tensor(received[k]) + POISON_SCALE * (v - torch.as_tensor(received[k]))
                    for k, v in state.items()}
        return poisoned, int(num_examples * POISON_SCALE)
    raise ValueError(f"unknown fault drill {kind!r}")
