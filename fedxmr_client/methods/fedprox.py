"""FedProx's client side: the proximal term (mu/2)·||w - w_global||² over the arrays the node trains."""

from __future__ import annotations

import torch
from flwr.app import RecordDict

from common.model import XmrModel
from common.train import Batch, trainable
from fedxmr_client.methods.base import ClientMethod, Plan
from fedxmr_client.node import NodeShard
from fedxmr_client.state_store import States


class ProximalTerm:
    """(mu/2)·||w - w0||², w0 the parameters at the start of local training (the global model)."""

    def __init__(self, params: list[torch.nn.Parameter], mu: float) -> None:
        self.params, self.mu = params, mu
        self.start = [p.detach().clone() for p in params]

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        term = 0.5 * self.mu * sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.start))
        return term, {"loss_prox": term.item()}


class FedProxClient(ClientMethod):
    name = "fedprox"

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> Plan:
        return Plan(shard, [ProximalTerm(trainable(model, shard.modalities, personal=False), shard.cfg.options.mu)])
