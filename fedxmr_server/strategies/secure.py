"""The train phase of a round under secure aggregation (`secure-aggregation = true`, `secagg.py` beside it), as a
mixin of `XmrStrategy`: the same sampling, payloads, quorum rule and report as a plain round, but the server gets
only the weighted mean. What a plain round checks per reply and cannot check here (the content of each update,
replays, the norm screen) is said in docs/PRIVACY.md."""

from __future__ import annotations

from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import protocol as P
from common.trust import cap_shares
from fedxmr_server.strategies.secagg import SecureAggregation
from fedxmr_server.strategies.replies import mean_metrics, to_array_record


class SecureRounds:
    """`secure_train` replaces Flower's send-and-aggregate of a train round; the methods' per-reply hooks
    (`reply_problem`, `client_weights`, `update_state`, `aggregate`) are not called: there are no replies to see."""

    secure: SecureAggregation | None = None
    privacy: Any
    state: Any
    cfg: Any

    def secure_weights(self, nodes: list[int]) -> dict[int, float]:
        """Each sampled node's weight, fixed before it trains: the size its client declared in its first reply
        (`remember`), the median known size for a client not yet heard from (1 if none is known), capped by
        `max-client-share` as in a plain round."""
        sizes = self.state.meta.get("sizes", {})
        known = [sizes[self.client_key(n)] for n in nodes if self.client_key(n) in sizes]
        default = float(np.median(known)) if known else 1.0
        raw = np.array([float(sizes.get(self.client_key(n), default)) for n in nodes])
        return dict(zip(nodes, cap_shares(raw, self.cfg.max_client_share).tolist()))

    def secure_train(self, grid: Grid, server_round: int,
                     timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        self._asked = []
        nodes = [m.metadata.dst_node_id for m in messages]
        # under client-side DP every client weighs the same (the release's sensitivity is one clipped update)
        weights = self.secure_weights(nodes) if self.privacy is None else dict.fromkeys(nodes, 1.0)
        out = self.secure.round(grid, messages, weights, server_round, timeout)
        in_sum = {r.metadata.src_node_id for r in out.replies}
        self.last_train_asked = len(nodes)
        self.last_train = {"replies": len(out.replies), "usable": len(out.replies), "clients": [],
                           "rejected": [{"node-id": n, "reason": "no masked vector in the sum (failed or dropped)",
                                         P.PARTITION_ID: None} for n in nodes if n not in in_sum],
                           "download-bytes": out.cost["down-bytes"], "upload-bytes": out.cost["up-bytes"],
                           "secagg": out.cost}
        if out.means is None or len(out.replies) < self._quorum():
            return None, None
        if self.privacy is not None:  # equal weights: an array's share × the clients summed = its senders
            senders = {k: round(share * len(out.replies)) for k, share in out.shares.items()}
            summed = {k: senders[k] * (mean.astype(np.float64) - self.state.arrays[k]) for k, mean in out.means.items()}
            self.state.arrays = self.privacy.release_sum(self.state.arrays, summed, min(senders.values(), default=0),
                                                         len(nodes), self.state.meta)
            self.last_train["privacy"] = self.privacy.last
        else:
            self.state.arrays = {k: out.means.get(k, v) for k, v in self.state.arrays.items()}
        meta = self.state.meta
        metrics = [dict(r.content[P.METRICS]) for r in out.replies]
        for reply, mm in zip(out.replies, metrics):
            client = self.client_of(reply)
            meta.setdefault("sizes", {}).setdefault(client, float(mm.get(P.NUM_EXAMPLES, 1.0)))
            meta.setdefault("modalities", {})[client] = [mod for mod in P.HAS if mm.get(P.HAS[mod], 1)]
        used = np.array([weights[r.metadata.src_node_id] for r in out.replies])
        self.last_train["clients"] = [{"node-id": r.metadata.src_node_id, "weight": float(w), **mm}
                                      for r, w, mm in zip(out.replies, used, metrics)]
        agg = mean_metrics(metrics, used)
        self.last_train["aggregate"] = agg
        log(INFO, "secure_train: the mean of %d clients, %d arrays updated", len(out.replies), len(out.means))
        return to_array_record(self.state.arrays), MetricRecord(agg)
