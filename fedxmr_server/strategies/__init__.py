"""The one registry of aggregation methods, selected by the run-config key `method`."""

from __future__ import annotations

from common.config import ConfigError, RunConfig
from fedxmr_server.strategies.base import XmrStrategy
from fedxmr_server.strategies.fedavg import FedAvgXmr
from fedxmr_server.strategies.fedprox import FedProxXmr
from fedxmr_server.strategies.rcsr import RcsrXmr

STRATEGIES: dict[str, type[XmrStrategy]] = {cls.name: cls for cls in (FedAvgXmr, FedProxXmr, RcsrXmr)}


def build_strategy(cfg: RunConfig) -> XmrStrategy:
    if cfg.method not in STRATEGIES:
        raise ConfigError(f"run config key 'method': unknown {cfg.method!r}; available: {sorted(STRATEGIES)}")
    return STRATEGIES[cfg.method](cfg)
