"""FedProto's client side (Tan et al., AAAI 2022, adapted to retrieval): the node's model never leaves it.

Round 1 starts from a model initialised like the server's (same seed); afterwards the node's own model is kept in
its state. Before training, each item gets concept targets (`concepts.py`) and a prototype-distance term pulls its
shared embedding toward its concepts' centre in the global tables: per concept, the normalised mean of the global
image and text prototypes the server sent (one point per concept in the shared space, so that image-only and
text-only nodes land where the other modality does). After training, the node sends its per-concept prototypes,
nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from common import protocol as P
from common.model import XmrModel
from common.train import Batch
from fedxmr_client.methods.base import ClientMethod, Plan
from fedxmr_client.methods.concepts import Tables, concept_targets, prototype_record, received_prototypes
from fedxmr_client.node import NodeShard
from fedxmr_client.state_store import States


def concept_centres(globals_: Tables) -> tuple[np.ndarray, np.ndarray] | None:
    """(C, d) per-concept centres over the modalities that have the concept, and a (C,) validity mask."""
    rows = [(table[1:], counts[1:] > 0) for table, counts in globals_.values()]
    if not rows:
        return None
    total = sum(t * v[:, None] for t, v in rows)
    valid = np.any([v for _, v in rows], axis=0)
    norm = np.linalg.norm(total, axis=1, keepdims=True)
    return np.where(norm > 0, total / np.maximum(norm, 1e-12), 0.0).astype(np.float32), valid


@dataclass(frozen=True)
class PrototypeDistance:
    """weight · mean over labelled items of ||emb - target||², target = the normalised mean of the centres of the
    item's concepts (FedProto's regulariser)."""

    targets: torch.Tensor  # (n_items, d)
    has: torch.Tensor  # (n_items,) bool: the item has at least one concept with a centre
    weight: float

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict] | None:
        idx = torch.as_tensor(batch.items, device=self.targets.device)
        has = self.has[idx]
        if not batch.embs or not bool(has.any()):
            return None
        terms = [((emb[has] - self.targets[idx][has]) ** 2).sum(dim=1).mean() for emb in batch.embs.values()]
        term = self.weight * sum(terms) / len(terms)
        return term, {"loss_proto": term.item()}


def distance_term(targets: np.ndarray, globals_: Tables, weight: float, device: str) -> PrototypeDistance | None:
    centres = concept_centres(globals_)
    if centres is None or weight <= 0:
        return None
    table, valid = centres
    mass = targets.astype(np.float32) * valid[None, :]
    has = mass.sum(axis=1) > 0
    item = mass @ table
    norm = np.linalg.norm(item, axis=1, keepdims=True)
    item = np.where(norm > 0, item / np.maximum(norm, 1e-12), 0.0)
    return PrototypeDistance(torch.as_tensor(item, dtype=torch.float32, device=device),
                             torch.as_tensor(has, device=device), weight)


@dataclass
class FedProtoPlan(Plan):
    targets: np.ndarray | None = None


class FedProtoClient(ClientMethod):
    name = "fedproto"
    sends_weights = False
    keeps_model = True

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> FedProtoPlan:
        globals_ = received_prototypes(content)
        targets = concept_targets(shard, model, globals_)
        term = distance_term(targets, globals_, shard.cfg.options.weight, shard.device)
        return FedProtoPlan(shard, [term] if term else [], targets=targets)

    def finish(self, plan: FedProtoPlan, model: XmrModel) -> tuple[dict[str, float], dict[str, ArrayRecord]]:
        return {}, {P.PROTOTYPES: prototype_record(plan.shard, model, plan.targets)}
