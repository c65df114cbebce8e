"""FedProx (Li et al. 2020): FedAvg aggregation; clients add (mu/2)·||w - w_global||² to their loss."""

from typing import Any

from common.config import ConfigError, RunConfig
from fedxmr_server.strategies.base import XmrStrategy


class FedProxXmr(XmrStrategy):
    name = "fedprox"

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.proximal_mu <= 0:
            raise ConfigError("run config key 'proximal-mu': must be > 0 for method 'fedprox' (0 is plain FedAvg)")
        super().__init__(cfg)

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {"proximal-mu": float(self.cfg.proximal_mu)}
