"""Paired-only FedAvg: image-only and text-only clients send nothing; the global model is the FedAvg of the paired
clients. The honest bar for any method that claims to use unimodal data. Every client is still evaluated."""

import numpy as np
from flwr.app import Message

from common import protocol as P
from fedxmr_server.strategies.base import XmrStrategy
from fedxmr_server.strategies.replies import is_paired


class PairedOnlyXmr(XmrStrategy):
    name = "paired-only"
    description = "FedAvg over paired clients only; unimodal clients train nothing and send no arrays"

    def reply_problem(self, msg: Message) -> str | None:
        paired = P.METRICS not in msg.content.metric_records or is_paired(msg)
        problem = self._base_problem(msg, arrays_required=paired)
        if problem is None and not paired and P.ARRAYS in msg.content.array_records and len(msg.content[P.ARRAYS]):
            return "a unimodal client sent arrays under method 'paired-only'"
        return problem

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        return np.array([float(m.content[P.METRICS][P.NUM_EXAMPLES]) * is_paired(m) for m in replies])

    def would_send(self, client: str) -> list[str]:
        paired = set(self.state.meta.get("modalities", {}).get(client, P.HAS)) >= set(P.HAS)
        return super().would_send(client) if paired else []
