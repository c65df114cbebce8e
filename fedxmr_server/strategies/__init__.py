"""The registry of server strategies, one per method name of `common.method_config.SECTIONS`."""

from __future__ import annotations

from common.config import ConfigError, RunConfig
from fedxmr_server.strategies.base import XmrStrategy
from fedxmr_server.strategies.centralized import CentralizedXmr
from fedxmr_server.strategies.fedavg import FedAvgXmr
from fedxmr_server.strategies.fedcafe import FedCafeXmr
from fedxmr_server.strategies.fedprox import FedProxXmr
from fedxmr_server.strategies.fedproto import FedProtoXmr
from fedxmr_server.strategies.linear import LinearXmr
from fedxmr_server.strategies.local import LocalXmr
from fedxmr_server.strategies.moon import MoonXmr
from fedxmr_server.strategies.paired_only import PairedOnlyXmr
from fedxmr_server.strategies.plfedcmh import PlFedCmhXmr
from fedxmr_server.strategies.rcsr import RcsrXmr
from fedxmr_server.strategies.unialign import UniAlignXmr

STRATEGIES: dict[str, type[XmrStrategy]] = {
    cls.name: cls for cls in (FedAvgXmr, FedProxXmr, RcsrXmr, LocalXmr, PairedOnlyXmr, CentralizedXmr, FedProtoXmr,
                               UniAlignXmr, MoonXmr, FedCafeXmr, PlFedCmhXmr, LinearXmr)}


def build_strategy(cfg: RunConfig) -> XmrStrategy:
    if cfg.method not in STRATEGIES:
        raise ConfigError(f"run config key 'method': no server strategy for {cfg.method!r}; "
                          f"available: {sorted(STRATEGIES)}")
    return STRATEGIES[cfg.method](cfg)
