"""Secure aggregation of a train round with Flower's SecAgg+ (`SecAggPlusWorkflow`): the server learns the weighted
mean of the sampled clients' models and nothing about any one of them (honest-but-curious server; docs/PRIVACY.md).

Why this shape: Flower 1.42 ships SecAgg+ only as a legacy workflow (it drives a legacy `Strategy` through
`configure_fit` / `aggregate_fit` on a `LegacyContext`, and its client mod reads FitIns and answers FitRes), while
fedxmr's strategies run their own round loop on Messages. So one train round runs the workflow's four stages
(setup, share keys, collect masked vectors, unmask) behind a small legacy face (`_Round`), and the node side
(`fedxmr_client/secagg.py`) turns FitIns into the usual train message and the reply back into a FitRes.

Per-array means: SecAgg+ averages one vector per client with one weight. Every node sends every array of the round's
upload list (zeros for one it did not train, e.g. a text-only client's image tower) and, last, an indicator vector
(1 per array it trained); the server divides each array's mean by its indicator's mean, which is FedAvg's per-key
weighted mean over the clients that sent the key. An array fewer than 2 sampled clients would send is left off the
upload list (the mean of one client is that client's array). Weights are fixed by the server before the round (see
`SecureRounds.secure_weights`), as integers in 1..`P.SECAGG_MAX_WEIGHT`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from fedxmr_server.strategies.replies import from_array_record

Arrays = dict[str, np.ndarray]


def message_bytes(content: RecordDict) -> int:
    """Bytes of every record a message carries: arrays, and config and metric values (SecAgg+'s keys, shares and
    masked vectors travel in configs, as bytes and lists of bytes; Flower's `count_bytes` refuses lists)."""
    values = [v for rec in (*content.config_records.values(), *content.metric_records.values()) for v in rec.values()]
    arrays = sum(a.numpy().nbytes for rec in content.array_records.values() for a in rec.values())
    return int(arrays + sum(_value_bytes(v) for v in values))


def _value_bytes(value: Any) -> int:
    """Bytes of one config or metric value (a list: of its items)."""
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return len(value) if isinstance(value, (bytes, str)) else 8


@dataclass
class _Proxy:
    """All the workflow asks of a legacy ClientProxy: the node id."""
    node_id: int


@dataclass
class _Round:
    """The legacy-Strategy face the workflow talks to: hands it this round's FitIns, keeps the results it unmasked
    (each FitRes then carries the aggregate, not the client's vector, plus that client's metrics)."""
    fitins: list[tuple[_Proxy, FitIns]]
    results: list[tuple[Any, Any]] | None = None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[_Proxy, FitIns]]:
        return self.fitins

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        self.results = results
        return None, {}


class _Workflow(SecAggPlusWorkflow):
    """Flower's workflow, but a client lost before it sent its masked vector (in setup or while sharing keys) is
    dropped from the round instead of counted dead: no one masked with it, so there is nothing to unmask, yet
    Flower's unmask stage would ask its neighbours for key shares they never received and halt the round."""

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        keep = set(state.active_node_ids)
        state.sampled_node_ids = keep
        state.nid_to_neighbours = {n: nb & keep for n, nb in state.nid_to_neighbours.items() if n in keep}
        return super().collect_masked_vectors_stage(grid, context, state)


def quantisation_range(clients: int) -> int:
    """SecAgg+'s levels per value for a round of `clients`: each masked entry is at most this, and their sum must stay
    below the 2³² modulus (Flower's default 2²² overflows from 1,024 clients on); finer for small rounds."""
    return 2 ** (31 - max(clients, 1).bit_length())


@dataclass
class _Metered:
    """The grid, counting the messages and bytes of each stage (one `send_and_receive` per stage), and keeping the
    reason of every error reply (node id -> reason)."""
    grid: Grid
    stages: list[dict[str, float]] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        messages, start = list(messages), time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        for r in replies:
            if r.has_error():
                self.errors[sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)] = r.error.reason
        self.stages.append({"sent": len(messages), "down-bytes": sum(message_bytes(m.content) for m in messages),
                            "up-bytes": sum(message_bytes(r.content) for r in replies if not r.has_error()),
                            "replies": sum(not r.has_error() for r in replies),
                            "seconds": time.perf_counter() - start})
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


@dataclass
class SecureRound:
    """What one secure train round gave: the replies (metrics only) of the clients whose vectors entered the sum,
    the per-array means (None: the protocol halted, nothing was aggregated) and the cost."""
    replies: list[Message]
    means: Arrays | None
    shares: dict[str, float]  # per array in `means`: the weight share of the clients that sent it
    cost: dict[str, Any]
    errors: dict[int, str]  # node id -> why it is not in the sum (the error it replied), where it said


class SecureAggregation:
    """Runs a train round's messages through SecAgg+ (`secagg-shares`, `secagg-threshold`, `secagg-clip`)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def round(self, grid: Grid, messages: list[Message], weights: dict[int, float], upload: list[str],
              server_round: int, timeout: float) -> SecureRound:
        """`messages`: the strategy's train messages (model + config per node); `weights`: node id -> weight;
        `upload`: the arrays the nodes send (the others keep their value this round)."""
        keys = sorted(messages[0].content[P.ARRAYS].keys()) if messages else []  # every node gets the global model
        top = max(weights.values(), default=1.0)
        fitins = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            arrays = from_array_record(msg.content[P.ARRAYS])
            config = dict(msg.content[P.CONFIG]) | {
                P.SECAGG_KEYS: " ".join(keys), P.SECAGG_UPLOAD: " ".join(upload),
                P.SECAGG_WEIGHT: max(1, round(P.SECAGG_MAX_WEIGHT * weights[node] / top))}
            fitins.append((_Proxy(node), FitIns(ndarrays_to_parameters([arrays[k] for k in keys]), config)))
        face = _Round(fitins)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=face)  # type: ignore[arg-type]
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = _Workflow(num_shares=float(self.cfg.secagg_shares),
                             reconstruction_threshold=float(self.cfg.secagg_threshold),
                             max_weight=float(P.SECAGG_MAX_WEIGHT), clipping_range=self.cfg.secagg_clip,
                             quantization_range=quantisation_range(len(messages)), timeout=timeout)
        metered, start = _Metered(grid), time.perf_counter()
        workflow(metered, context)  # type: ignore[arg-type]
        cost = {"seconds": time.perf_counter() - start, "stages": metered.stages,
                "down-bytes": sum(s["down-bytes"] for s in metered.stages),
                "up-bytes": sum(s["up-bytes"] for s in metered.stages)}
        if not face.results:
            log(WARNING, "round %d: SecAgg+ halted (too few clients answered a stage); nothing is aggregated",
                server_round)
            return SecureRound([], None, {}, cost, metered.errors)
        replies = [_reply(proxy.node_id, fitres.metrics) for proxy, fitres in face.results]
        vector = parameters_to_ndarrays(face.results[0][1].parameters)
        log(INFO, "round %d: SecAgg+ summed %d of %d clients in %.1f s", server_round, len(replies), len(messages),
            cost["seconds"])
        used = [weights[proxy.node_id] for proxy, _ in face.results]
        means, shares = _per_array_means(upload, vector, min(used) / sum(used))
        return SecureRound(replies, means, shares, cost, metered.errors)


def _per_array_means(keys: list[str], vector: list[np.ndarray], smallest: float) -> tuple[Arrays, dict[str, float]]:
    """Each array's mean over the clients that sent it: its weighted mean over all clients divided by the weight
    share of its senders (the indicator, the last entry), and that share. An array no client sent (share below half
    the smallest client's, `smallest`: quantisation noise) is left out: the model keeps it."""
    indicator = np.asarray(vector[-1], dtype=np.float64)
    sent = [(k, v, share) for k, v, share in zip(keys, vector[:-1], indicator, strict=True) if share > 0.5 * smallest]
    return ({k: (np.asarray(v, dtype=np.float64) / share).astype(np.float32) for k, v, share in sent},
            {k: float(share) for k, _, share in sent})


def _reply(node: int, metrics: dict[str, Any]) -> Message:
    """A train reply as the strategy's bookkeeping reads it: the client's metrics, no arrays (it sent none in the
    clear)."""
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict({P.METRICS: MetricRecord({k: v for k, v in metrics.items()
                                                        if isinstance(v, (int, float))})}), reply_to=sent)
