"""FedProto (Tan et al., AAAI 2022), adapted to cross-modal retrieval: only prototypes are exchanged, never weights.

Each node keeps its own model on its disk/state (`fedxmr_client/methods/fedproto.py`) and sends, per modality it
holds, a table of per-concept prototypes (the dataset's labels; pseudo-labels for Flickr8k image-only nodes)
with item counts. The server fuses them into global tables, row by row weighted by item counts
(`fedproto-proto-ema` 0: this round's mean), and sends them back; clients add a prototype-distance term to their loss.
No global model: nodes are
evaluated with their own models (they embed the shared gallery's raw features themselves), and the round is
selected on the mean per-client dev score.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message, RecordDict

from common import protocol as P
from common.config import RunConfig
from common.method_config import FedProtoSection
from fedxmr_server.strategies.base import Arrays, XmrStrategy
from fedxmr_server.strategies.prototypes import (client_prototypes, fuse_into, global_prototypes, prototype_record,
                                                  table_rows)


class FedProtoXmr(XmrStrategy):
    name = "fedproto"
    description = "FedProto: per-concept prototypes are the only thing exchanged; models stay on the nodes"
    has_global_model = False

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.opts: FedProtoSection = cfg.options  # type: ignore[assignment]

    def model_for(self, client: str, selected: bool = False) -> Arrays | None:
        return None

    def payload(self, client: str, server_round: int, kind: str) -> RecordDict:
        content = super().payload(client, server_round, kind)
        protos = global_prototypes(self.state.buffers)
        if kind == "train" and protos:
            content[P.PROTOTYPES] = prototype_record(protos)
        return content

    def reply_problem(self, msg: Message) -> str | None:
        problem = self._base_problem(msg, arrays_required=False)
        if problem is None and P.ARRAYS in msg.content.array_records and len(msg.content[P.ARRAYS]):
            return "a FedProto reply carries model arrays; only prototypes are exchanged"
        return problem or client_prototypes(msg, self.cfg.embed_dim, table_rows(self.state.buffers))[1]

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        return np.ones(len(replies))  # the item counts of each prototype row weight the fusion

    def aggregate(self, server_round: int, replies: list[Message], weights: np.ndarray) -> None:
        """No model to aggregate."""

    def update_state(self, server_round: int, replies: list[Message], weights: np.ndarray) -> dict[str, dict]:
        tables = [client_prototypes(m, self.cfg.embed_dim, None, self.size_of(m))[0] for m in replies]
        shares = fuse_into(self.state.buffers, tables, weights, self.opts.proto_ema, self.cfg.max_client_share)
        return {self.client_of(m): {"table-share": float(share)} for m, share in zip(replies, shares)}
