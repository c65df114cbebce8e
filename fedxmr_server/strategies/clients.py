"""How the server knows its clients: by the partition a node says it holds (`client-<id>`), not by node id.

Why: node ids are assigned per SuperLink session (a resumed simulation gets new ones), partitions are not; all
per-client server state (per-client models, previous updates, minimax weights, known modalities) is keyed so.
A node says who it is in reply to a `query` message the server sends before the node's first message of this server
process (`identify`: only the nodes about to be messaged, so the cost follows the sampled nodes, not the
federation), and again in every reply's metrics (`partition-id`).
What the server holds a client to (docs/TRUST.md, "Bounded influence"): its size is the shard size it declared first
(in its first accepted reply), so a later reply cannot weigh more by claiming more examples
(`size_of`); and an upload equal to one accepted in the last `REPLAY_WINDOW` rounds (its own or another client's) is
a replay, left out (`replay_problem`; compared by a content digest of the arrays). Arrays equal to what the client
was sent this round are no update, never a replay.
"""

from __future__ import annotations

import hashlib
import math
from logging import INFO, WARNING

import numpy as np

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import protocol as P

REPLAY_WINDOW = 10  # rounds of accepted uploads remembered (their digests) to spot a replayed one


def digest(arrays: dict[str, np.ndarray]) -> str:
    """A content digest of a set of arrays (keys, dtypes, shapes, bytes): equal digests, equal arrays."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


class ClientRegistry:
    """Mixin of `XmrStrategy`: node id -> partition id, as the nodes said (this process only), the `identify`
    step, and what a client is held to. Expects `self.state` (StrategyState), `self.cfg` and `self.run_key`."""

    def __init__(self) -> None:
        self._partition_of: dict[int, int] = {}
        self._disputed: set[int] = set()  # nodes that claimed a partition another node holds (warned once)
        self.sent_arrays: dict[str, dict[str, np.ndarray]] = {}  # client -> the arrays this round's train message held
        self._digests: dict[int, str] = {}  # id(reply) -> digest of its arrays, this round (set by `replay_problem`)
        self._queried: set[int] = set()

    def client_key(self, node_id: int) -> str:
        """How the server knows a node: by its partition once the node said it (stable across a resumed run)."""
        pid = self._partition_of.get(node_id)
        return f"client-{pid}" if pid is not None else f"node-{node_id}"

    def client_of(self, msg: Message) -> str:
        self._learn_partition(msg)
        return self.client_key(msg.metadata.src_node_id)

    def _learn_partition(self, msg: Message) -> None:
        """Record which partition a replying node holds (first claim wins: two nodes claiming one partition is a
        deployment error, reported, and the second keeps its node key)."""
        metrics = msg.content.metric_records.get(P.METRICS) if not msg.has_error() else None
        pid = metrics.get(P.PARTITION_ID) if metrics is not None else None
        node = msg.metadata.src_node_id
        if not isinstance(pid, (int, float)) or not math.isfinite(pid) or node in self._partition_of \
                or node in self._disputed:
            return
        holder = next((n for n, p in self._partition_of.items() if p == int(pid)), None)
        if holder is not None:
            log(WARNING, "nodes %s and %s both say they hold partition %d; node %s is keyed by its node id",
                holder, node, int(pid), node)
            self._disputed.add(node)
            return
        self._partition_of[node] = int(pid)

    def identify(self, grid: Grid, timeout: float, nodes: list[int]) -> None:
        """Ask the nodes of `nodes` that have not said who they are yet (`query`; a node answers from its configs),
        so that payloads and per-client state are keyed by partition from a node's first message on. Called before
        every batch of messages: a node is asked once per server process, when it is first sampled."""
        new = [n for n in nodes if n not in self._partition_of and n not in self._disputed and n not in self._queried]
        if not new:
            return
        self._queried.update(new)  # asked once: a node that cannot answer says who it is in its replies instead
        config = ConfigRecord({P.RUN_KEY: self.run_key})
        replies = grid.send_and_receive([Message(RecordDict({P.CONFIG: config}), message_type=MessageType.QUERY,
                                                 dst_node_id=n) for n in new], timeout=timeout)
        known, meta = self.state.meta.setdefault("modalities", {}), self.state.meta
        for msg in replies:
            if msg.has_error():
                log(WARNING, "node %s did not say who it is: %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            self._learn_partition(msg)
            metrics = msg.content[P.METRICS] if P.METRICS in msg.content.metric_records else {}
            known[self.client_of(msg)] = [m for m in P.HAS if metrics.get(P.HAS[m], 1)]
            parts = metrics.get(P.NUM_PARTITIONS)
            if isinstance(parts, (int, float)) and math.isfinite(parts) and parts >= 1:
                meta["num-partitions"] = max(int(parts), int(meta.get("num-partitions", 0)))
        log(INFO, "identify: %d of %d new nodes said which partition they hold (%d known)",
            sum(n in self._partition_of for n in new), len(new), len(self._partition_of))

    # ---- what a client is held to ------------------------------------------------------------------------------
    def size_of(self, msg: Message) -> float:
        """A reply's example count, never more than the client declared first (module docstring)."""
        claimed = float(msg.content[P.METRICS][P.NUM_EXAMPLES])
        return min(claimed, float(self.state.meta.get("sizes", {}).get(self.client_of(msg), claimed)))

    def replay_problem(self, server_round: int, msg: Message, arrays: dict[str, np.ndarray]) -> str | None:
        """Why `arrays` are a replay of an accepted upload of the last `REPLAY_WINDOW` rounds (None: they are not).
        Arrays equal to the model the client was sent are no update at all, never a replay."""
        if not arrays:
            return None
        self._digests[id(msg)] = key = digest(arrays)  # `remember` stores it, once the reply is accepted
        sent = self.sent_arrays.get(self.client_of(msg), self.state.arrays)
        if all(k in sent and np.array_equal(v, sent[k]) for k, v in arrays.items()):
            return None
        seen = self.state.meta.get("uploads", {}).get(key)
        if seen is None or server_round - seen[1] > REPLAY_WINDOW:
            return None
        return f"its arrays replay the upload of {seen[0]} in round {seen[1]}"

    def remember(self, server_round: int, replies: list[Message]) -> None:
        """Record the accepted replies: a new client's size, every upload's digest (for `replay_problem`)."""
        meta = self.state.meta
        uploads = {k: v for k, v in meta.get("uploads", {}).items() if server_round - v[1] < REPLAY_WINDOW}
        for msg in replies:
            meta.setdefault("sizes", {}).setdefault(self.client_of(msg), float(msg.content[P.METRICS][P.NUM_EXAMPLES]))
            if id(msg) in self._digests:
                uploads.setdefault(self._digests[id(msg)], [self.client_of(msg), server_round])
        meta["uploads"], self._digests = uploads, {}
