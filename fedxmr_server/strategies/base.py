"""Base of every fedxmr strategy: the round loop, reply validation and reporting, with hooks for the methods.

Clients: the server knows a client by its partition (`client-<id>`, learnt from a `query` message before the node's
first message and from every reply), not by its node id, which a resumed simulation renews; all per-client state is
keyed so. A round's cost follows the sampled nodes: a node is asked who it is when first sampled; per-client
evaluation asks `fraction-evaluate` of the nodes, the final test `test-clients` of them (0: all).
A method is one subclass (one file) that overrides some of these hooks:
- `payload(client, server_round, kind)`: the RecordDict one client receives (kind "train", "evaluate" or "test"),
  built fresh per client (never a shared object mutated in place). Default: the model of that node (`model_for`) and the
  config; evaluate/test messages add the shared dev/test gallery embedded by that model (`gallery`).
- `reply_problem(msg)`: method-specific checks on top of the base's (`_base_problem`); a reply with a problem is
  logged with its node id and left out, so one failing client never kills a round.
- `client_weights(replies)`: one weight per usable reply; must not change any state (default: num-examples, at most
  the size the client declared first); the base then caps every share at `max-client-share` (`common.trust`).
- `aggregate(server_round, replies, weights)`: how usable replies change the model: the global arrays
  (`state.arrays`) and/or per-client models (`state.clients`). Default: per-key weighted mean over the clients that
  sent the key (weights renormalised per key), so a text-only client never dilutes the image tower.
- `update_state(server_round, replies, weights)`: the method's own state (prototypes, routers, ...), called once per
  round after validation, once the weights are accepted, before `aggregate` (so `state.arrays` is still the model
  the clients started from); returns extra per-client report fields.
A method keeps *all* its state in `self.state` (`StrategyState`, serialisable: `checkpoint()` after every round,
`start(resume=...)` continues from one); the selection (`self.best`) is kept beside it. Selection: the round with
the best dev value of the `select-on` metric (`selection_score`: of the global model on the server's dev split,
or, for methods without one, of the per-client dev evaluation) is kept in `self.best`; test is scored once, for
that round's models (`final_test`).
Failures: every reply left out is recorded (`last_train["rejected"]`: node id, partition id, reason). A round with
fewer usable train replies than `min-nodes` (or than the nodes asked, if fewer) keeps the model (`under-quorum`);
`max-failed-rounds` such rounds in a row, or a run in which no reply was ever usable, raise `RunFailed`: the run ends
failed, never "completed".
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common.config import ConfigError, RunConfig
from common.data.concepts import CONCEPT_NAMES
from common.data.federation import TYPE_CODES
from common.evaluate import client_summary
from common import protocol as P
from common.robust import combine, norm_outliers
from common.trust import cap_shares
from fedxmr_server.privacy import ClientLevelDp
from fedxmr_server.strategies.secagg import SecureAggregation
from fedxmr_server.strategies.clients import ClientRegistry
from fedxmr_server.strategies.replies import (content_problem, effective_weights, from_array_record, mean_metrics,
                                              record_bytes, scalar, to_array_record)
from fedxmr_server.strategies.secure import SecureRounds
from fedxmr_server.strategies.selection import Selection, SelectsOnDev
from fedxmr_server.strategies.state import Checkpoint, StrategyState

Arrays = dict[str, np.ndarray]


class RunFailed(RuntimeError):
    """The run cannot produce an honest result (see the quorum rule in the module docstring)."""


class XmrStrategy(ClientRegistry, SelectsOnDev, SecureRounds, Strategy):
    """Round loop, validation, weighting/aggregation hooks and a single serialisable state object."""

    name = "base"
    description = "per-key weighted mean of the clients' trainable arrays"
    has_global_model = True  # False: no global model (selection and dev/test scores are per client)

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.state = StrategyState()
        self.best = Selection()
        self.last_train: dict[str, Any] = {}
        self.last_evaluate: dict[str, Any] = {}
        self._download_bytes = 0  # arrays sent in this round's train messages
        self._asked: list[Message] = []  # this round's train messages (the grid gives them ids when it sends them)
        self.last_train_asked = 0
        self._sent_to: dict[str, int] = {}  # message id -> node id, of this round's train messages
        # wall seconds of the last round's phases: train messages (send to last reply), aggregation + server dev
        # scoring, per-client evaluation messages
        self.timings: dict[str, float] = {}
        # set by the ServerApp: (arrays, split) -> gallery arrays (embedded by `arrays`, or raw features if None)
        self.gallery_fn: Callable[[Arrays | None, str], Arrays] | None = None
        # set by the ServerApp: the dataset's label columns (`common.data.datasets.concept_count`), the rows of the
        # label-indexed tables clients send (memories, prototypes)
        self.concepts = len(CONCEPT_NAMES)
        self.run_key = ""  # set by the ServerApp: names the run for the nodes' on-disk state (`P.RUN_KEY`)
        self._timeout = 3600.0  # of each message batch; `start` sets it
        self.privacy = ClientLevelDp(cfg) if cfg.dp else None  # DP-FedAvg replaces `aggregate` (fedxmr_server/privacy.py)
        # SecAgg+ replaces a train round's replies by their mean (fedxmr_server/strategies/secure.py)
        self.secure = SecureAggregation(cfg) if cfg.secure_aggregation else None
        own = [h for h in ("aggregate", "aggregate_train", "model_for", "payload")
               if getattr(type(self), h) is not getattr(XmrStrategy, h)]
        for guard, what, table in ((self.privacy, "client-level DP", "_DP_REFUSED"),
                                   (self.secure, "secure aggregation", "_SECAGG_REFUSED")):
            if guard is not None and own:
                raise ConfigError(f"method {self.name!r} has its own {own}, which {what} does not cover; list what "
                                  f"it sends in common/method_config.py ({table})")

    def summary(self) -> None:
        log(INFO, "fedxmr strategy %r: %s", self.name, self.description)

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def model_for(self, client: str, selected: bool = False) -> Arrays | None:
        """The arrays a client is sent (`selected`: of the round selected on dev); None for methods that never
        send weights."""
        return self.best.arrays if selected else self.state.arrays

    def payload(self, client: str, server_round: int, kind: str) -> RecordDict:
        config = ConfigRecord({P.SERVER_ROUND: server_round, P.BEST_ROUND: self.best.round,
                               P.SPLIT_KEY: P.SPLIT[kind], P.RUN_KEY: self.run_key})
        if kind == "train" and self.privacy is not None:
            config.update(self.privacy.client_config())
        content = RecordDict({P.CONFIG: config})
        arrays = self.model_for(client, selected=kind == "test")
        if arrays is not None:
            content[P.ARRAYS] = to_array_record(arrays)
        if kind != "train" and self.gallery_fn is not None:
            content[P.GALLERY] = to_array_record(self._gallery_for(client, arrays, P.SPLIT[kind]))
        return content

    def reply_problem(self, msg: Message) -> str | None:
        return self._base_problem(msg, arrays_required=True)

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        return np.array([self.size_of(m) for m in replies])

    def aggregate(self, server_round: int, replies: list[Message], weights: np.ndarray) -> None:
        client_arrays = [from_array_record(m.content[P.ARRAYS]) for m in replies]
        if self.privacy is not None:  # equal weights, clipped updates, noise; one release in the ledger
            self.state.arrays = self.privacy.release(self.state.arrays, client_arrays, self.last_train_asked,
                                                     self.state.meta)
            self.last_train["privacy"] = self.privacy.last
            return
        self.state.arrays = combine(self.state.arrays, client_arrays, weights, self.cfg.aggregation,
                                    self.cfg.trim_fraction, self.cfg.max_client_share)

    def update_state(self, server_round: int, replies: list[Message], weights: np.ndarray) -> dict[str, dict]:
        return {}

    # ---- validation ------------------------------------------------------------------------------------------------
    def _base_problem(self, msg: Message, arrays_required: bool) -> str | None:
        return content_problem(msg.content, self.state.arrays, self.cfg.max_num_examples, arrays_required)

    def _usable(self, server_round: int, replies: Iterable[Message]) -> tuple[list[Message], list[dict[str, Any]]]:
        """The usable replies, in a fixed order (partition id, then node id: aggregation sums never depend on
        arrival order), and one record (node id, partition id, reason) per reply left out, each also logged."""
        ok, rejected, self._digests = [], [], {}  # digests of this round's replies only (`replay_problem`)

        def reject(msg: Message, reason: str) -> None:
            log(WARNING, "node %s is left out this round: %s", self._sender(msg), reason)
            metrics = msg.content.metric_records.get(P.METRICS) if not msg.has_error() else None
            pid = metrics.get(P.PARTITION_ID) if metrics is not None else None
            rejected.append({"node-id": self._sender(msg), "reason": reason,
                             P.PARTITION_ID: pid if isinstance(pid, (int, float)) else None})

        for msg in replies:
            self._learn_partition(msg)
            problem = f"the node failed: {msg.error.reason}" if msg.has_error() else self.reply_problem(msg)
            if problem is None and P.ARRAYS in msg.content.array_records:
                problem = self.replay_problem(server_round, msg, from_array_record(msg.content[P.ARRAYS]))
            if problem:
                reject(msg, problem)
            else:
                ok.append(msg)
        ok.sort(key=lambda m: (scalar(m.content[P.METRICS].get(P.PARTITION_ID, -1)), m.metadata.src_node_id))
        with_arrays = [m for m in ok if P.ARRAYS in m.content.array_records and len(m.content[P.ARRAYS])]
        # under DP the clip bounds every update, and screening one client by the others' norms would leak them
        if self.cfg.update_norm_limit > 0 and self.state.arrays and with_arrays and self.privacy is None:
            reasons = norm_outliers(self.state.arrays, [from_array_record(m.content[P.ARRAYS]) for m in with_arrays],
                                    self.cfg.update_norm_limit)
            for msg, reason in zip(with_arrays, reasons):
                if reason:
                    reject(msg, reason)
                    ok.remove(msg)
        return ok, rejected

    def _quorum(self) -> int:
        """Usable train replies a round needs to change the model: `min-nodes`, or every node asked if fewer were (one
        node, centralized, is its own quorum); replies that never came count against it."""
        return min(self.cfg.min_nodes, max(self.last_train_asked, 1))

    def _sender(self, msg: Message) -> int:
        """The node a reply answers for: the error the SuperLink sends for an unavailable node comes from the
        SuperLink itself (node id 1), so it is matched to the message it answers."""
        return self._sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    # ---- Flower's Strategy API -------------------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float) -> list[int]:
        available = len(list(grid.get_node_ids()))
        size = max(int(available * fraction), self.cfg.min_nodes)
        nodes, _ = sample_nodes(grid, self.cfg.min_nodes, size)
        return nodes

    def _messages(self, grid: Grid, nodes: list[int], server_round: int, kind: str) -> list[Message]:
        self.identify(grid, self._timeout, nodes)  # payloads are per client: know who each node is first
        mtype = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
        return [Message(content=self.payload(self.client_key(n), server_round, kind), message_type=mtype,
                        dst_node_id=n) for n in nodes]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self._sample(grid, self.cfg.fraction_train)
        if self.privacy is not None:  # δ and the noise multiplier, once the federation's size is known
            self.privacy.start(self.state.meta, len(list(grid.get_node_ids())), len(nodes))
        messages = self._messages(grid, nodes, server_round, "train")
        self._download_bytes = sum(record_bytes(m.content) for m in messages)
        self.sent_arrays = {self.client_key(m.metadata.dst_node_id): from_array_record(m.content[P.ARRAYS])
                            for m in messages if P.ARRAYS in m.content.array_records}
        self._asked = messages
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.cfg.fraction_evaluate == 0.0:
            return []
        return self._messages(grid, self._sample(grid, self.cfg.fraction_evaluate), server_round, "evaluate")

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._asked if m.metadata.message_id}
        ok, rejected = self._usable(server_round, replies)
        replied = {self._sender(m) for m in replies}
        for node in (m.metadata.dst_node_id for m in self._asked if m.metadata.dst_node_id not in replied):
            # a dead simulation actor sends nothing at all
            log(WARNING, "node %s did not reply this round (lost, or past round-timeout)", node)
            rejected.append({"node-id": node, "reason": "no reply (node lost, or past round-timeout)",
                             P.PARTITION_ID: None})
        self.last_train_asked, self._asked = len(self._asked), []
        log(INFO, "aggregate_train: %d usable replies of %d", len(ok), len(replies))
        self.last_train = {"replies": len(replies), "usable": len(ok), "rejected": rejected, "clients": [],
                           "download-bytes": self._download_bytes,
                           "upload-bytes": sum(record_bytes(m.content) for m in replies if not m.has_error())}
        if len(ok) < self._quorum():  # under quorum: nothing is aggregated (and nothing released), the model is kept
            return None, None
        weights = np.asarray(self.client_weights(ok), dtype=np.float64)
        if not np.all(np.isfinite(weights)) or weights.sum() <= 0 or np.any(weights < 0):
            log(WARNING, "aggregation weights %s are not a usable distribution; the model is kept", weights)
            return None, None
        weights = cap_shares(weights, self.cfg.max_client_share)  # after the method's own weights
        self.remember(server_round, ok)
        info = self.update_state(server_round, ok, weights)  # sees the model the clients started from
        self.aggregate(server_round, ok, weights)
        metrics = [dict(m.content[P.METRICS]) for m in ok]
        known = self.state.meta.setdefault("modalities", {})
        for m, mm in zip(ok, metrics):
            known[self.client_of(m)] = [mod for mod in P.HAS if mm.get(P.HAS[mod], 1)]
        effective = effective_weights(weights, [set(m.content[P.ARRAYS].keys()) if P.ARRAYS in m.content.array_records
                                                 else set() for m in ok], self.cfg.max_client_share)
        self.last_train["clients"] = [
            {"node-id": m.metadata.src_node_id, "weight": float(w), **eff, **mm, **info.get(self.client_of(m), {})}
            for m, w, eff, mm in zip(ok, weights, effective, metrics)]
        agg = mean_metrics(metrics, weights)
        self.last_train["aggregate"] = agg
        return (to_array_record(self.state.arrays) if self.state.arrays else None), MetricRecord(agg)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        clients = []
        for msg in replies:
            self._learn_partition(msg)
            if msg.has_error() or P.METRICS not in msg.content.metric_records:
                log(WARNING, "node %s: no evaluation this round (%s)", msg.metadata.src_node_id,
                    msg.error.reason if msg.has_error() else "reply without metrics")
                continue
            clients.append({"node-id": msg.metadata.src_node_id, **dict(msg.content[P.METRICS])})
        clients.sort(key=lambda c: c.get(P.PARTITION_ID, -1))
        summary = client_summary(clients, {code: name for name, code in TYPE_CODES.items()}) if clients else {}
        self.last_evaluate = {"clients": clients, "summary": summary}
        return MetricRecord(summary) if summary else None

    # ---- the round loop ----------------------------------------------------------------------------------------------
    def _gallery_for(self, client: str, arrays: Arrays | None, split: str) -> Arrays:
        """The shared gallery of `split` as `client` needs it: embedded by `arrays` (raw features if None), only
        the modalities the client can query against."""
        gallery = self.gallery_fn(arrays, split)
        mods = self.state.meta.get("modalities", {}).get(client, ["img", "txt"])
        kinds = ("emb", "code") if arrays is not None else ("feat",)
        keys = [P.CAPTION_IMAGE, P.LABEL] + [f"{other}-{kind}" for mod, other in (("img", "txt"), ("txt", "img"))
                                             if mod in mods for kind in kinds]
        return {k: gallery[k] for k in keys if k in gallery}

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              round_fn: Callable[[int, dict[str, float] | None], None] | None = None,
              resume: Checkpoint | None = None) -> Result:
        """Per round: train, aggregate, score the global model on dev
        (`evaluate_fn`, every `eval-every` rounds), per-client dev evaluation (every `client-eval-every` rounds),
        selection, then `round_fn(round, dev)` (reporting, checkpointing); the quorum rule (module docstring).
        Round 0 scores the initial model. `resume`: continue after its round instead (nothing of rounds up to it is
        repeated). Flower's `train_config` / `evaluate_config` are not used: every message's config comes from
        `payload`."""
        self.summary()
        result = Result()
        if resume is not None:
            self._restore(resume)
            log(INFO, "resuming after round %d (selected so far: round %d)", resume.round, self.best.round)
        else:
            self.state.arrays = from_array_record(initial_arrays)
        self._timeout = timeout
        if resume is None and evaluate_fn and self.has_global_model:
            dev0 = evaluate_fn(0, initial_arrays)
            result.evaluate_metrics_serverapp[0] = dev0
            if round_fn:
                round_fn(0, dict(dev0) if dev0 else None)
        meta = self.state.meta  # the quorum rule's counters live in the state, so a resumed run keeps them
        for rnd in range(self.state.round + 1, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            clock = [time.perf_counter()]  # phase boundaries of the round, for `self.timings`
            if self.secure is not None:
                arrays, metrics = self.secure_train(grid, rnd, timeout)
                clock.append(time.perf_counter())
            else:
                replies = grid.send_and_receive(self.configure_train(rnd, initial_arrays, ConfigRecord(), grid),
                                                timeout=timeout)
                clock.append(time.perf_counter())
                arrays, metrics = self.aggregate_train(rnd, replies)
            self.state.round = rnd  # also when nothing was usable: the round happened
            usable = self.last_train.get("usable", 0)
            meta["ever-usable"] = bool(meta.get("ever-usable")) or usable > 0
            quorum = usable >= self._quorum() and metrics is not None
            self.last_train["under-quorum"] = not quorum
            meta["failed-in-a-row"] = 0 if quorum else int(meta.get("failed-in-a-row", 0)) + 1
            if not quorum:
                log(WARNING, "round %d: %d usable train replies of %d, fewer than min-nodes=%d; the model is kept",
                    rnd, usable, self.last_train.get("replies", 0), self.cfg.min_nodes)
            if arrays is not None:
                result.arrays = arrays
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            dev, client_metrics, self.last_evaluate = None, None, {}
            if evaluate_fn and self.has_global_model and _due(rnd, self.cfg.eval_every, num_rounds):
                dev_record = evaluate_fn(rnd, to_array_record(self.state.arrays))
                dev = dict(dev_record) if dev_record else None
                result.evaluate_metrics_serverapp[rnd] = dev_record
            clock.append(time.perf_counter())
            if _due(rnd, self.cfg.client_eval_every, num_rounds):
                replies = grid.send_and_receive(self.configure_evaluate(rnd, initial_arrays, ConfigRecord(), grid),
                                                timeout=timeout)
                client_metrics = self.aggregate_evaluate(rnd, replies)
            clock.append(time.perf_counter())
            self.timings = {"train-s": clock[1] - clock[0], "aggregate-and-dev-s": clock[2] - clock[1],
                            "client-eval-s": clock[3] - clock[2]}
            if client_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = client_metrics
            self._select(rnd, dev)
            if round_fn:
                round_fn(rnd, dev)
            if meta["failed-in-a-row"] >= self.cfg.max_failed_rounds:
                raise RunFailed(f"{meta['failed-in-a-row']} rounds in a row (to round {rnd}) had fewer usable train "
                                f"replies than min-nodes={self.cfg.min_nodes}; last reasons: "
                                f"{[r['reason'] for r in self.last_train.get('rejected', [])][:3]}")
        if not meta.get("ever-usable"):
            raise RunFailed(f"no client ever sent a usable train reply in {num_rounds} rounds; last reasons: "
                            f"{[r['reason'] for r in self.last_train.get('rejected', [])][:3]}")
        if self.best.round < 0:  # no dev score at all (e.g. every dev reply failed): report the last round, say so
            log(WARNING, "no round could be scored on dev; the last round is reported")
            self.best = Selection(num_rounds, float("nan"), dict(self.state.arrays), dict(self.state.clients))
        return result

    def final_test(self, grid: Grid, timeout: float) -> dict[str, Any]:
        """Per-client test, once, for the selected round's models (and the nodes' state of that round): every node,
        or a sample of `test-clients` of them; the result names the clients scored and of how many nodes."""
        available, wanted = len(list(grid.get_node_ids())), self.cfg.test_clients
        nodes = self._sample(grid, 1.0) if wanted == 0 or wanted >= available else sample_nodes(grid, 1, wanted)[0]
        replies = grid.send_and_receive(self._messages(grid, nodes, self.best.round, "test"), timeout=timeout)
        self.aggregate_evaluate(self.best.round, replies)
        if len(nodes) < available:
            scored = sorted(int(c[P.PARTITION_ID]) for c in self.last_evaluate["clients"] if P.PARTITION_ID in c)
            self.last_evaluate |= {"sampled": {"nodes": available, "asked": len(nodes), "scored-partitions": scored}}
        return self.last_evaluate


def _due(server_round: int, every: int, num_rounds: int) -> bool:
    """Whether a round is scored: every `every`-th round, and always the last one."""
    return server_round % every == 0 or server_round == num_rounds

