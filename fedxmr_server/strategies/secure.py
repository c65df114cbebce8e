"""The train phase of a round under secure aggregation (`secure-aggregation = true`, `secagg.py` beside it), as a
mixin of `XmrStrategy`: the same sampling, payloads, quorum rule and report as a plain round, but the server gets
only the weighted mean. The methods' per-reply hooks (`reply_problem`, `client_weights`, `update_state`,
`aggregate`) are not called: there are no replies to see. What a plain round checks per reply and cannot check here
(the content of each update, replays, the norm screen) is said in docs/PRIVACY.md."""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import protocol as P
from common.model import upload_keys
from common.trust import cap_shares
from fedxmr_server.strategies.replies import content_problem, mean_metrics, to_array_record
from fedxmr_server.strategies.secagg import SecureAggregation


class SecureRounds:
    """`secure_train` replaces Flower's send-and-aggregate of a train round. The host (`XmrStrategy`) provides
    `configure_train`, `client_key`, `client_of`, `_quorum`, `state`, `cfg` and `privacy`."""

    secure: SecureAggregation | None = None
    privacy: Any
    state: Any
    cfg: Any

    def would_send(self, client: str) -> list[str]:
        """The arrays `client` trains and sends, from the modalities it declared (identify): its towers, and the
        temperature if paired. A method whose clients send less overrides it (`paired-only`)."""
        mods = tuple(self.state.meta.get("modalities", {}).get(client, P.HAS))
        return upload_keys(self.state.arrays, mods)

    def secure_weights(self, nodes: list[int]) -> dict[int, float]:
        """Each sampled node's weight, fixed before it trains: the size its client declared in its first reply
        (`remember`), the median known size for a client not yet heard from (1 if none is known: round 1 is an
        equal-weight mean), capped by `max-client-share` over the sampled clients (a plain round caps per array,
        over the clients that sent it)."""
        sizes = self.state.meta.get("sizes", {})
        known = [sizes[self.client_key(n)] for n in nodes if self.client_key(n) in sizes]
        default = float(np.median(known)) if known else 1.0
        raw = np.array([float(sizes.get(self.client_key(n), default)) for n in nodes])
        return dict(zip(nodes, cap_shares(raw, self.cfg.max_client_share).tolist()))

    def secure_upload(self, nodes: list[int]) -> list[str]:
        """The arrays this round's nodes send: those at least 2 of them would send (the mean of one client's array is
        that array). The others keep their value this round, and are logged."""
        senders: dict[str, int] = {}
        for node in nodes:
            for key in self.would_send(self.client_key(node)):
                senders[key] = senders.get(key, 0) + 1
        alone = sorted(k for k, n in senders.items() if n < 2)
        if alone:
            log(WARNING, "secure aggregation: %d arrays have one sender among the sampled clients and are not "
                "updated this round (%s ...)", len(alone), alone[:3])
        return sorted(k for k, n in senders.items() if n >= 2)

    def secure_train(self, grid: Grid, server_round: int,
                     timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One train round through SecAgg+: the mean of the clients summed becomes the model (or, under client-side
        DP, the release from their sum); the report names who was summed and who was not, and why."""
        messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        self._asked = []
        nodes = [m.metadata.dst_node_id for m in messages]
        # under client-side DP every client weighs the same (the release's sensitivity is one clipped update)
        weights = self.secure_weights(nodes) if self.privacy is None else dict.fromkeys(nodes, 1.0)
        out = self.secure.round(grid, messages, weights, self.secure_upload(nodes), server_round, timeout)
        in_sum = {r.metadata.src_node_id for r in out.replies}
        self.last_train_asked = len(nodes)
        self.last_train = {"replies": len(out.replies), "usable": len(out.replies), "clients": [],
                           "rejected": [{"node-id": n, "reason": f"not in the sum: {out.errors.get(n, 'no reply')}",
                                         P.PARTITION_ID: None} for n in nodes if n not in in_sum],
                           "download-bytes": out.cost["down-bytes"], "upload-bytes": out.cost["up-bytes"],
                           "secagg": out.cost}
        if out.means is None:
            return None, None
        released = self._secure_release(out.means, out.shares, len(out.replies), len(nodes))
        if len(out.replies) < self._quorum():
            return None, None  # the model is kept (a DP release the server decoded is still in the ledger)
        self.state.arrays = released
        self._remember_secure(out.replies, weights)
        log(INFO, "secure_train: the mean of %d clients, %d arrays updated", len(out.replies), len(out.means))
        return to_array_record(self.state.arrays), MetricRecord(self.last_train["aggregate"])

    def _secure_release(self, means: dict[str, np.ndarray], shares: dict[str, float], summed: int,
                        asked: int) -> dict[str, np.ndarray]:
        """The next model from the decoded means: the means themselves, or, under client-side DP (equal weights: an
        array's share × the clients summed = its senders), the release from the sum of the noised updates over the
        clients asked, booked in the ledger."""
        if self.privacy is None:
            return {k: means.get(k, v) for k, v in self.state.arrays.items()}
        senders = {k: round(share * summed) for k, share in shares.items()}
        total = {k: senders[k] * (mean.astype(np.float64) - self.state.arrays[k]) for k, mean in means.items()}
        out = self.privacy.release_sum(self.state.arrays, total, min(senders.values(), default=0), asked,
                                       self.state.meta)
        self.last_train["privacy"] = self.privacy.last
        return out

    def _remember_secure(self, replies: list[Message], weights: dict[int, float]) -> None:
        """Sizes and modalities the summed clients declared (a reply whose metrics fail the plain round's checks is
        recorded with the reason; its vector is in the sum, with the weight the server fixed), and the report."""
        meta, rows = self.state.meta, []
        for reply in replies:
            mm = dict(reply.content[P.METRICS])
            problem = content_problem(reply.content, {}, self.cfg.max_num_examples, arrays_required=False)
            client = self.client_of(reply)
            if problem:
                log(WARNING, "node %s: %s (in the sum with the weight fixed before the round; size not remembered)",
                    reply.metadata.src_node_id, problem)
                self.last_train["rejected"].append({"node-id": reply.metadata.src_node_id, "reason": problem,
                                                    P.PARTITION_ID: mm.get(P.PARTITION_ID)})
            else:
                meta.setdefault("sizes", {}).setdefault(client, float(mm[P.NUM_EXAMPLES]))
            meta.setdefault("modalities", {})[client] = [mod for mod in P.HAS if mm.get(P.HAS[mod], 1)]
            rows.append({"node-id": reply.metadata.src_node_id, "weight": weights[reply.metadata.src_node_id], **mm})
        self.last_train["clients"] = rows
        self.last_train["aggregate"] = mean_metrics([dict(r.content[P.METRICS]) for r in replies],
                                                    np.array([row["weight"] for row in rows]))
