"""Centralized's client side: the one node loads the whole train split, paired, and trains with the
`centralized-*` budget (chosen on dev)."""

from __future__ import annotations

from dataclasses import replace

from common.config import ConfigError, RunConfig
from common.train import TrainConfig
from fedxmr_client.methods.base import ClientMethod


class CentralizedClient(ClientMethod):
    name = "centralized"

    def data_config(self, cfg: RunConfig, num_partitions: int) -> RunConfig:
        if num_partitions != 1:
            raise ConfigError(f"method 'centralized' runs on exactly one node holding all data; this node is one of "
                              f"num-partitions={num_partitions} (use num-supernodes=1)")
        return cfg.model_copy(update={"partitioner": "iid", "modality_mix": "1,0,0"})

    def train_config(self, cfg: RunConfig) -> TrainConfig:
        return replace(cfg.train_cfg(), epochs=cfg.options.local_epochs, lr=cfg.options.lr)
