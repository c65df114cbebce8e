"""The client side of a method: what a node does around the shared local training, in clear steps.

`app.train` calls, in order: `data_config` (what the node loads), `train_config` (the local budget), `begin` (read
the server's records, decide what to train on, add `LossTerm`s to the shared objective), `fit` (the shared trainer,
or a method's own: `linear` has none), then `finish` (extra metrics and records to send back). The defaults are
FedAvg's: train on the whole shard, no extra terms, send the shared arrays of the modalities trained. Methods
subclass this in one file each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from common.config import RunConfig
from common.model import XmrModel
from common.train import LossTerm, TrainConfig
from fedxmr_client.node import NodeShard, shared_state
from fedxmr_client.state_store import States


@dataclass
class Plan:
    """One train message's plan: the items to train on, the method's extra loss terms, whether to train at all,
    and which shared arrays stay frozen (the method sets `requires_grad` off on them in `begin`)."""

    shard: NodeShard
    terms: list[LossTerm] = field(default_factory=list)
    train: bool = True  # False: the node does not train and sends nothing this round (paired-only's unimodal nodes)
    send: bool | None = None  # None: send iff trained; True without training: send the arrays as they arrived
    frozen: frozenset[str] = frozenset()  # shared keys the node neither trains nor sends (their global value stays)


class ClientMethod:
    name = "fedavg"
    sends_weights = True  # False: the node's model never leaves it (FedProto)
    keeps_model = False  # True: the node's model lives in its state between rounds instead of arriving each round
    keeps_previous = False  # True: the node's trained model is kept in its state too, but the next round starts from
    # the global model it is sent (MOON's previous local model, read from `states` in `begin`)

    def data_config(self, cfg: RunConfig, num_partitions: int) -> RunConfig:
        return cfg

    def train_config(self, cfg: RunConfig) -> TrainConfig:
        return cfg.train_cfg()

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> Plan:
        return Plan(shard)

    def fit(self, model: XmrModel, plan: Plan, shared: Callable[[], dict[str, float]]) -> dict[str, float]:
        """The local training of a train message; `shared()` runs the shared trainer (every gradient method)."""
        return shared()

    def finish(self, plan: Plan, model: XmrModel) -> tuple[dict[str, float], dict[str, ArrayRecord]]:
        """Extra metrics and records (name -> ArrayRecord) of the reply."""
        return {}, {}

    def initial_model(self, shard: NodeShard) -> dict[str, np.ndarray]:
        """For `keeps_model` methods, before the node has a model: initialised as the server initialises the
        global one (same seed), without touching the training RNG."""
        with torch.random.fork_rng():
            torch.manual_seed(shard.cfg.seed)
            model = XmrModel(shard.cfg.model_cfg(shard.backbone.img_dim, shard.backbone.txt_dim,
                                                 concepts=shard.concepts))
        return shared_state(model)
