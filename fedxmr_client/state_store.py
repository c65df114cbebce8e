"""Node state (personal adapters, a method's own model of the node) on the node's own disk, one version per round.

Why on disk: the Deployment Engine starts a fresh process per message, and a resumed simulation starts fresh
actors, so `context.state` does not survive what a run must survive. Why one version per round: a message of
round r must see the state as it was in effect then, whatever happened later:
- train of round r starts from the newest version before r (a run killed during round r and resumed trains
  round r again from the same state, not from the state the killed attempt wrote);
- dev evaluation of round r uses the newest version up to r;
- the once-only test of the round selected on dev, b, uses the newest version up to b.
Versions older than the one in effect at the selected round are deleted (the selection only moves forward).

Layout: `<cache-dir>/node-state/<run-key>/partition-<id>/round-<r>.npz`, each file holding every state record of
the node as `<record>/<array key>`; written atomically (temp file + rename).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from common.parts import upgrade_state

States = dict[str, dict[str, np.ndarray]]  # record name -> array key -> array
_VERSION = re.compile(r"^round-(\d+)\.npz$")


class NodeStateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of(cls, cache_dir: Path, run_key: str, partition_id: int) -> "NodeStateStore":
        if not run_key or "/" in run_key or run_key.startswith("."):
            raise ValueError(f"node state: bad run key {run_key!r}")
        return cls(cache_dir / "node-state" / run_key / f"partition-{partition_id}")

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_VERSION.match, os.listdir(self.root)) if m)

    def _newest(self, as_of: int) -> int | None:
        return max((v for v in self.versions() if v <= as_of), default=None)

    def load(self, as_of: int) -> States:
        """The node's state as it was in effect in round `as_of` (empty before it first saved any)."""
        version = self._newest(as_of)
        if version is None:
            return {}
        path = self.root / f"round-{version}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                states: States = {}
                for name in z.files:
                    record, key = name.split("/", 1)
                    states.setdefault(record, {})[key] = z[name]
        except (OSError, ValueError) as exc:
            raise ValueError(f"node state file {path} is unreadable ({exc}); delete it to start this node's "
                             f"state afresh") from exc
        return {record: upgrade_state(arrays) for record, arrays in states.items()}  # old array names, renamed

    def save(self, server_round: int, states: States, selected_round: int) -> Path:
        """Write the state of `server_round` (replacing a version a killed attempt of this round left), then drop
        versions no message can need any more: those before the one in effect at `selected_round`, and any after
        this round (left by a killed attempt of a later round)."""
        self.root.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **{f"{record}/{k}": v for record, arrays in states.items() for k, v in arrays.items()})
        path = self.root / f"round-{server_round}.npz"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        keep_from = self._newest(selected_round) if selected_round >= 1 else None
        for version in self.versions():
            if (keep_from is not None and version < keep_from) or version > server_round:
                (self.root / f"round-{version}.npz").unlink(missing_ok=True)
        return path
