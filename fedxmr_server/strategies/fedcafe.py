"""FedCAFE (federated cross-modal hashing with adaptive feature enhancement, ACM MM 2024) on fedxmr's towers.

Each round: the server sends the model with the global memory P_g (in the towers' `memory` buffers, read by the
adaptive feature enhancement, and as a `memory` record); clients train with FedCAFE's terms and send their models
and local memories (`fedxmr_client/methods/fedcafe.py`); the server fuses the memories into the next P_g by K-means
(`common.memory.fuse_memories`: rows stay aligned to concepts), scores every client's memory against it (Eq. 9)
and aggregates the models with α = the memory weights (Eq. 10-11; `fedcafe-weighting`, see `common.memory` for
the direction), per key over the clients that sent it, so a unimodal client never dilutes the other tower. The
paper weighs by α alone, not by data size; so does this (`fedcafe-weighting = "size"`, FedAvg's weights, is an
ablation). A reply without memory rows (an image-only node before any memory exists) gets the mean Sim of the
others. The memory lives in the strategy state (resumable).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message, RecordDict

from common import protocol as P
from common.config import RunConfig
from common.memory import fuse_memories, memory_nll, memory_weights, normalise_rows
from common.parts.fedcafe import memory_key
from common.method_config import FedCafeSection
from common.trust import bounded_counts
from fedxmr_server.strategies.base import XmrStrategy, from_array_record, to_array_record

MEMORY, COUNT = "fedcafe/memory", "fedcafe/count"


class FedCafeXmr(XmrStrategy):
    name = "fedcafe"
    description = ("FedCAFE: global memory by K-means fusion of the clients' concept memories, adaptive feature "
                   "enhancement, aggregation weighted by memory similarity")

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.opts: FedCafeSection = cfg.options  # type: ignore[assignment]
        self._fused_for: tuple[tuple, tuple[np.ndarray, np.ndarray] | None] = ((), None)  # replies -> fused memory

    def payload(self, client: str, server_round: int, kind: str) -> RecordDict:
        content = super().payload(client, server_round, kind)
        if kind == "train" and MEMORY in self.state.buffers:
            content[P.MEMORY] = to_array_record({"memory": self.state.buffers[MEMORY]})
        return content

    def reply_problem(self, msg: Message) -> str | None:
        problem = super().reply_problem(msg)
        if problem or P.MEMORY not in msg.content.array_records:
            return problem
        rec = from_array_record(msg.content[P.MEMORY])
        memory, count = rec.get("memory"), rec.get("count")
        expected = (self.concepts, self.cfg.hash_bits)
        if memory is None or count is None or memory.shape != expected or count.shape != (expected[0],):
            return f"memory record missing or mis-shaped (expected memory {expected} and count ({expected[0]},))"
        if not (np.all(np.isfinite(memory)) and np.all(np.isfinite(count))) or np.any(count < 0):
            return "memory record is not finite or has negative counts"
        return None

    def _memories(self, replies: list[Message]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Each reply's memory as the server uses it: rows normalised (the client's are unit rows; a scaled row
        would swamp Sim_k and the fusion), counts within the client's size (`common.trust`); None without rows."""
        out = []
        for msg in replies:
            rec = from_array_record(msg.content[P.MEMORY]) if P.MEMORY in msg.content.array_records else {}
            counts = bounded_counts(rec["count"], self.size_of(msg)) if rec else None
            out.append((normalise_rows(rec["memory"]), counts) if rec and counts.sum() > 0 else None)
        return out

    def _fused(self, replies: list[Message]) -> tuple[np.ndarray, np.ndarray] | None:
        """The next global memory from this round's client memories, fused once per set of replies (the weights
        and the stored memory then come from the very same K-means)."""
        memories = self._memories(replies)
        key = tuple(None if m is None else (m[0].tobytes(), m[1].tobytes()) for m in memories)
        if self._fused_for[0] != key:
            held = [m for m in memories if m is not None]
            fused = (fuse_memories([m for m, _ in held], [c for _, c in held], self.opts.kmeans_iters, self.cfg.seed,
                                   self.cfg.max_client_share) if held else None)
            self._fused_for = (key, fused)
        return self._fused_for[1]

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        if self.opts.weighting == "size":  # the ablation that isolates α: FedAvg's weights, every other part kept
            return super().client_weights(replies)
        fused = self._fused(replies)
        if fused is None or self.opts.weighting == "uniform":
            return np.ones(len(replies))
        sims = [memory_nll(*mem, *fused) if mem is not None else np.nan for mem in self._memories(replies)]
        known = [s for s in sims if np.isfinite(s)]
        return memory_weights(np.array([s if np.isfinite(s) else np.mean(known) for s in sims]), self.opts.weighting)

    def update_state(self, server_round: int, replies: list[Message], weights: np.ndarray) -> dict[str, dict]:
        fused = self._fused(replies)
        if fused is not None:
            self.state.buffers[MEMORY], self.state.buffers[COUNT] = fused
        if self.opts.weighting == "size":  # the weights are FedAvg's, not memory weights
            return {}
        return {self.client_of(m): {"memory-weight": float(w)} for m, w in zip(replies, weights)}

    def aggregate(self, server_round: int, replies: list[Message], weights: np.ndarray) -> None:
        super().aggregate(server_round, replies, weights)
        if MEMORY in self.state.buffers:  # the new memory goes out inside the model (the towers' AFE reads it)
            for key in (memory_key("img"), memory_key("txt")):
                if key in self.state.arrays:
                    self.state.arrays[key] = self.state.buffers[MEMORY].astype(self.state.arrays[key].dtype)
