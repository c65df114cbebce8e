"""Centralized: one node holds the whole train split (paired) and trains with its own budget (`centralized-*`,
chosen on dev); the reference every federated method is measured against. Run it with one SuperNode."""

from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedxmr_server.strategies.base import XmrStrategy


class CentralizedXmr(XmrStrategy):
    name = "centralized"
    description = "Centralized: one node with all train data; its update is the model"

    def _sample(self, grid: Grid, fraction: float) -> list[int]:
        nodes, connected = sample_nodes(grid, 1, 1)
        if len(connected) != 1:
            raise RuntimeError(f"method 'centralized' needs exactly one node (num-supernodes=1), found "
                               f"{len(connected)}")
        return nodes
