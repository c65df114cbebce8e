"""All server-side state of a strategy in one serialisable object, so that a run can checkpoint and resume."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class StrategyState:
    """`arrays`: the global model; `clients`: per-client models by node id (methods that keep one per client);
    `buffers`: method-specific tensors (prototypes, memories, learned weighters); `meta`: JSON-able bookkeeping
    (e.g. per-client history)."""

    round: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    clients: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        payload = {f"arrays/{k}": v for k, v in self.arrays.items()}
        payload |= {f"clients/{node}/{k}": v for node, arrays in self.clients.items() for k, v in arrays.items()}
        payload |= {f"buffers/{k}": v for k, v in self.buffers.items()}
        header = json.dumps({"round": self.round, "meta": self.meta}).encode()
        payload["__header__"] = np.frombuffer(header, dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **payload)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "StrategyState":
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            header = json.loads(z["__header__"].tobytes().decode())
            arrays = {k[len("arrays/"):]: z[k] for k in z.files if k.startswith("arrays/")}
            buffers = {k[len("buffers/"):]: z[k] for k in z.files if k.startswith("buffers/")}
            clients: dict[str, dict[str, np.ndarray]] = {}
            for k in z.files:
                if k.startswith("clients/"):
                    node, key = k[len("clients/"):].split("/", 1)
                    clients.setdefault(node, {})[key] = z[k]
        return cls(round=header["round"], arrays=arrays, clients=clients, buffers=buffers, meta=header["meta"])

    def save(self, path: Path) -> None:
        """Atomic write: a killed run never leaves a half-written checkpoint."""
        tmp = Path(f"{path}.tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "StrategyState":
        return cls.from_bytes(Path(path).read_bytes())
