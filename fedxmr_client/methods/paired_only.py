"""Paired-only FedAvg's client side: image-only and text-only nodes train nothing and send nothing."""

from __future__ import annotations

from flwr.app import RecordDict

from common.model import XmrModel
from fedxmr_client.methods.base import ClientMethod, Plan
from fedxmr_client.node import NodeShard
from fedxmr_client.state_store import States


class PairedOnlyClient(ClientMethod):
    name = "paired-only"

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> Plan:
        return Plan(shard, train=len(shard.modalities) == 2)
