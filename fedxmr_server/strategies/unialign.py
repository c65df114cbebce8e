"""`unialign`: FedAvg in which unimodal clients stay inside the shared image-text space (issue 11).

Clients: see `fedxmr_client/methods/unialign.py` (distillation toward the round's global model, optional partial
towers). Server: FedAvg's weights (`unialign-weighting = size`, the default chosen on dev), or (`agreement`) a
unimodal client's size times the positive part of the cosine between its tower update and the paired clients'
size-weighted mean update of that tower (`common.unimodal.agreement_weights`). The cosines are reported per client
either way.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from common import protocol as P
from common.unimodal import agreement_weights
from fedxmr_server.strategies.base import XmrStrategy, from_array_record
from fedxmr_server.strategies.replies import is_paired


class UniAlignXmr(XmrStrategy):
    name = "unialign"
    description = "FedAvg whose unimodal clients distil from the round's global model on their own items"

    def _agreement(self, replies: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        sizes = np.array([float(m.content[P.METRICS][P.NUM_EXAMPLES]) for m in replies])
        return agreement_weights(self.state.arrays, [from_array_record(m.content[P.ARRAYS]) for m in replies],
                                 sizes, np.array([is_paired(m) for m in replies]))

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        if self.cfg.options.weighting == "size":
            return super().client_weights(replies)
        return self._agreement(replies)[0]

    def update_state(self, server_round: int, replies: list[Message], weights: np.ndarray) -> dict[str, dict]:
        _, cosines = self._agreement(replies)
        return {self.client_of(m): {"agreement-cos": None if np.isnan(c) else float(c)}
                for m, c in zip(replies, cosines)}
