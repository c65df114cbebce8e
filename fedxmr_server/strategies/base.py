"""Base of every fedxmr strategy: Flower's FedAvg message flow with robust, hookable aggregation.

Hooks for subclasses (one strategy per file):
- `train_config(server_round)`: extra keys for the train ConfigRecord (e.g. FedProx's `proximal-mu`);
- `client_weights(replies)`: one aggregation weight per usable reply (default: number of examples).
Clients send only the arrays they trained (an image-only client only `img.*`), so every key is averaged over the
clients that sent it, weights renormalised per key: a text-only client never dilutes the image tower, and a key
nobody trained keeps its value. A reply is usable when it has no error, sends a non-empty subset of the global
keys with matching shapes, and every value is finite; anything else is logged with the node id and left out, so
one failing client never kills a round.
Evaluation: each node gets the shared test gallery embedded by the global model (`gallery_fn`), only the
modalities it can query against, and its per-client scores are summarised by client type.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.data.federation import TYPE_CODES
from common.evaluate import client_summary
from fedxmr_server.strategies.state import StrategyState


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


class XmrStrategy(FedAvg):
    """FedAvg's sampling and messaging; fedxmr's validation, weighting hooks and a single state object."""

    name = "base"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                         min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes,
                         min_available_nodes=cfg.min_nodes)
        self.cfg = cfg
        self.state = StrategyState()
        self.last_train: dict[str, Any] = {}
        self.last_evaluate: dict[str, Any] = {}
        self.gallery_fn: Callable[[ArrayRecord], dict[str, np.ndarray]] | None = None

    # ---- hooks -------------------------------------------------------------------------------------------------
    def train_config(self, server_round: int) -> dict[str, Any]:
        return {}

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        return np.array([float(m.content["metrics"]["num-examples"]) for m in replies])

    # ---- Flower API --------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.state.arrays:
            self.state.arrays = from_array_record(arrays)
        merged = ConfigRecord({**dict(config), **self.train_config(server_round)})
        return super().configure_train(server_round, arrays, merged, grid)

    def _usable(self, replies: Iterable[Message]) -> list[Message]:
        ok = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(WARNING, "node %s failed this round and is left out: %s", node, msg.error.reason)
                continue
            problem = self._reply_problem(msg)
            if problem:
                log(WARNING, "node %s sent an unusable reply and is left out: %s", node, problem)
                continue
            ok.append(msg)
        return ok

    def _reply_problem(self, msg: Message) -> str | None:
        content = msg.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return "reply lacks the 'arrays' ArrayRecord or the 'metrics' MetricRecord"
        n = content["metrics"].get("num-examples")
        if not isinstance(n, (int, float)) or not n > 0:
            return f"metric 'num-examples' must be a positive number, got {n!r}"
        arrays = content["arrays"]
        if not len(arrays):
            return "reply carries no arrays"
        if self.state.arrays and not set(arrays.keys()) <= set(self.state.arrays):
            return f"arrays not in the global model: {sorted(set(arrays.keys()) - set(self.state.arrays))[:4]}"
        for key, arr in arrays.items():
            value = arr.numpy()
            if self.state.arrays and value.shape != self.state.arrays[key].shape:
                return f"array {key!r} has shape {value.shape}, expected {self.state.arrays[key].shape}"
            if not np.all(np.isfinite(value)):
                return f"array {key!r} has non-finite values"
        return None

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = self._usable(replies)
        log(INFO, "aggregate_train: %d usable replies of %d", len(ok), len(replies))
        self.last_train = {"replies": len(replies), "usable": len(ok), "clients": []}
        if not ok:
            return None, None
        weights = np.asarray(self.client_weights(ok), dtype=np.float64)
        if not np.all(np.isfinite(weights)) or weights.sum() <= 0:
            log(WARNING, "aggregation weights %s are not a usable distribution; the model is kept", weights)
            return None, None
        weights = weights / weights.sum()
        client_arrays = [from_array_record(m.content["arrays"]) for m in ok]
        self.state.arrays = {key: self._average(key, old, weights, client_arrays)
                             for key, old in self.state.arrays.items()}
        self.state.round = server_round
        metrics = [dict(m.content["metrics"]) for m in ok]
        known = self.state.meta.setdefault("modalities", {})
        for m, mm in zip(ok, metrics):
            known[str(m.metadata.src_node_id)] = [mod for mod in ("img", "txt") if mm.get(f"has-{mod}", 1)]
        self.last_train["clients"] = [
            {"node-id": m.metadata.src_node_id, "weight": float(w), **mm} for m, w, mm in zip(ok, weights, metrics)
        ]
        scalar_keys = [k for k, v in metrics[0].items() if isinstance(v, (int, float))]
        agg = {k: float(sum(w * mm.get(k, 0.0) for w, mm in zip(weights, metrics))) for k in scalar_keys}
        agg["num-examples"] = float(sum(mm["num-examples"] for mm in metrics))
        self.last_train["aggregate"] = agg
        return to_array_record(self.state.arrays), MetricRecord(agg)

    @staticmethod
    def _average(key: str, old: np.ndarray, weights: np.ndarray, client_arrays: list[dict]) -> np.ndarray:
        """Weighted mean over the clients that sent `key`, weights renormalised over them; else the old value."""
        held = [(w, a[key]) for w, a in zip(weights, client_arrays) if key in a]
        total = sum(w for w, _ in held)
        if not held or total <= 0:
            return old
        return np.sum([w / total * v.astype(np.float64) for w, v in held], axis=0).astype(old.dtype)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        if not messages or self.gallery_fn is None:
            return messages
        gallery = self.gallery_fn(arrays)
        known = self.state.meta.get("modalities", {})
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            mods = known.get(str(node), ["img", "txt"])
            keys = ["caption-image"] + ["txt-emb"] * ("img" in mods) + ["img-emb"] * ("txt" in mods)
            content = RecordDict({"arrays": arrays, "config": config,
                                  "gallery": to_array_record({k: gallery[k] for k in keys})})
            out.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        clients = []
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                log(WARNING, "node %s: no evaluation this round (%s)", msg.metadata.src_node_id,
                    msg.error.reason if msg.has_error() else "reply without metrics")
                continue
            clients.append({"node-id": msg.metadata.src_node_id, **dict(msg.content["metrics"])})
        clients.sort(key=lambda c: c.get("partition-id", -1))
        summary = client_summary(clients, {code: name for name, code in TYPE_CODES.items()}) if clients else {}
        self.last_evaluate = {"clients": clients, "summary": summary}
        return MetricRecord(summary) if summary else None
