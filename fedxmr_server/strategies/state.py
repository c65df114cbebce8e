"""All server-side state of a strategy in one serialisable object, so that a run can checkpoint and resume."""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.parts import upgrade_state


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
        # checkpoints written before model parts existed name FedCAFE's arrays the old way
        return cls(round=header["round"], arrays=upgrade_state(arrays),
                   clients={c: upgrade_state(a) for c, a in clients.items()}, buffers=buffers, meta=header["meta"])

    def save(self, path: Path) -> None:
        _write_atomically(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> "StrategyState":
        return cls.from_bytes(Path(path).read_bytes())


@dataclass
class Checkpoint:
    """What a run needs to continue after round `round` as if it had never stopped: the strategy's state, the
    selection (best-dev round: `best.round`, its models, `best.meta["score"]`) and the server process's RNG
    states (Python, NumPy's global, torch's). Written after every round, atomically."""

    round: int
    state: StrategyState
    best: StrategyState
    rng: dict[str, Any]

    def save(self, path: Path) -> None:
        header = json.dumps({"round": self.round, "python-rng": self.rng["python"],
                             "numpy-rng": self.rng["numpy"][:1] + self.rng["numpy"][2:]}).encode()
        payload = {"state": np.frombuffer(self.state.to_bytes(), np.uint8),
                   "best": np.frombuffer(self.best.to_bytes(), np.uint8),
                   "numpy-rng-keys": self.rng["numpy"][1], "torch-rng": self.rng["torch"],
                   "header": np.frombuffer(header, np.uint8)}
        buf = io.BytesIO()
        np.savez(buf, **payload)
        _write_atomically(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes().decode())
                numpy_rng = header["numpy-rng"]
                rng = {"python": header["python-rng"], "torch": z["torch-rng"],
                       "numpy": [numpy_rng[0], z["numpy-rng-keys"], *numpy_rng[1:]]}
                return cls(round=int(header["round"]), state=StrategyState.from_bytes(z["state"].tobytes()),
                           best=StrategyState.from_bytes(z["best"].tobytes()), rng=rng)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"checkpoint {path} is unreadable ({exc})") from exc


def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [kind, keys, int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().numpy().copy()}


def restore_rng(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(rng["numpy"]))
    torch.set_rng_state(torch.as_tensor(rng["torch"]))


def _write_atomically(path: Path, blob: bytes) -> None:
    """Temp file + rename: a run killed while writing never leaves a half-written file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
