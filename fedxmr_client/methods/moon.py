"""MOON's client side (model-contrastive federated learning, Li, He & Song, CVPR 2021), on the towers' embeddings.

MOON's term for an item with local representation z: -log(e^{cos(z, z_glob)/τ} / (e^{cos(z, z_glob)/τ} +
e^{cos(z, z_prev)/τ})), z_glob from the round's global model (the model as it arrived) and z_prev from this
node's own model after its previous round, both frozen and run on the very same tower inputs. It pulls the local
representation toward the global one and away from where the node drifted last time. MOON puts it on the
projection head's output; here that is the shared embedding of every modality the node trains. The previous model
lives in the node's state (`keeps_previous`); before the node's first round there is none and the term is off, as
in MOON's released code, whose first-round previous model is the global one (the two logits are then equal and
the term is the constant log 2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import RecordDict

from common.model import XmrModel, load_numpy_state
from common.train import Batch
from fedxmr_client.methods.base import ClientMethod, Plan
from fedxmr_client.node import MODEL_STATE, NodeShard
from fedxmr_client.state_store import States


def frozen_copy(model: XmrModel, arrays: dict | None = None) -> XmrModel:
    """A copy of `model` (with `arrays` loaded, if given) in eval mode and without gradients: a teacher."""
    teacher = copy.deepcopy(model)
    if arrays is not None:
        load_numpy_state(teacher, arrays, partial=True)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def model_contrast(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, temperature: float) -> torch.Tensor:
    """MOON's loss, mean over the batch: cross-entropy of picking the global representation (positive) over the
    previous local one (negative) by cosine similarity / τ."""
    logits = torch.stack([F.cosine_similarity(z, z_glob, dim=-1), F.cosine_similarity(z, z_prev, dim=-1)], dim=1)
    return F.cross_entropy(logits / temperature, torch.zeros(len(z), dtype=torch.long, device=z.device))


@dataclass(frozen=True)
class ModelContrastTerm:
    glob: XmrModel
    prev: XmrModel
    mu: float
    temperature: float

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict] | None:
        if not batch.embs:
            return None
        losses = []
        for mod, z in batch.embs.items():
            with torch.no_grad():
                z_glob = self.glob.tower(mod).embed(batch.inputs[mod])
                z_prev = self.prev.tower(mod).embed(batch.inputs[mod])
            losses.append(model_contrast(z, z_glob, z_prev, self.temperature))
        term = sum(losses) / len(losses)
        return self.mu * term, {"loss_moon": term.item()}


class MoonClient(ClientMethod):
    name = "moon"
    keeps_previous = True

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> Plan:
        previous = states.get(MODEL_STATE)
        opts = shard.cfg.options
        if previous is None or opts.mu <= 0:
            return Plan(shard)
        term = ModelContrastTerm(frozen_copy(model), frozen_copy(model, previous), opts.mu, opts.temperature)
        return Plan(shard, [term])
