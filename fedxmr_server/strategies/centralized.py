"""Centralized: one node holds the whole train split (paired) and trains with its own budget (`centralized-*`,
chosen on dev); the reference every federated method is measured against. Run it with one SuperNode.

`centralized-average` = d > 0: the model that is scored on dev, selected, tested and released is an exponential
average of the node's trained weights over rounds (a ← d·a + (1 − d)·w; the first round's weights start it), while
training continues from the raw weights, kept in the state's buffers (so a resumed run keeps both). FedAvg's mean of
locally trained models is such a weight average; without one the ceiling stays below FedAvg (docs/HASHING-CORE-
SCREEN.md, "Why Centralized stays below FedAvg")."""

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common import protocol as P
from common.config import RunConfig
from fedxmr_server.strategies.base import XmrStrategy
from fedxmr_server.strategies.replies import to_array_record

RAW = "trained/"  # buffer prefix of the raw weights training continues from


class CentralizedXmr(XmrStrategy):
    name = "centralized"
    description = "Centralized: one node with all train data; its update is the model"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        if cfg.options.average > 0:
            self.description += f"; scored: its weights averaged over rounds (decay {cfg.options.average:g})"

    def _sample(self, grid: Grid, fraction: float) -> list[int]:
        nodes, connected = sample_nodes(grid, 1, 1)
        if len(connected) != 1:
            raise RuntimeError(f"method 'centralized' needs exactly one node (num-supernodes=1), found "
                               f"{len(connected)}")
        return nodes

    def trained(self) -> dict[str, np.ndarray]:
        """The raw weights training continues from (empty until averaging has started)."""
        return {k[len(RAW):]: v for k, v in self.state.buffers.items() if k.startswith(RAW)}

    def payload(self, client: str, server_round: int, kind: str) -> RecordDict:
        content = super().payload(client, server_round, kind)
        trained = self.trained()
        if kind == "train" and trained:
            content[P.ARRAYS] = to_array_record(trained)
        return content

    def aggregate(self, server_round: int, replies: list[Message], weights: np.ndarray) -> None:
        decay, previous, started = self.cfg.options.average, self.state.arrays, bool(self.trained())
        super().aggregate(server_round, replies, weights)  # state.arrays: the node's trained weights
        if decay <= 0:
            return
        trained = self.state.arrays
        self.state.buffers.update({RAW + k: v for k, v in trained.items()})
        if started:
            self.state.arrays = {k: (decay * previous[k].astype(np.float64) + (1 - decay) * v).astype(v.dtype)
                                 if np.issubdtype(v.dtype, np.floating) else v for k, v in trained.items()}
