"""The client side of `unialign` (see `common/unimodal.py`): paired nodes train as in FedAvg; a unimodal node adds a
distillation term toward the round's global model on its own items and, if `unialign-train-parts` says so, trains
and sends only part of its tower (or, as a control, none of it, sending its tower back untouched)."""

from __future__ import annotations

import torch
from flwr.app import RecordDict

from common.model import XmrModel
from common.parts import is_private
from common.unimodal import DistillTerm, scene_teacher
from fedxmr_client.methods.base import ClientMethod, Plan
from fedxmr_client.node import NodeShard
from fedxmr_client.state_store import States

TRAINED_PARTS = {"all": ("norm", "proj", "adapter", "hash"), "adapter-hash": ("adapter", "hash")}


def part_of(key: str) -> str:
    """'img.proj.weight' -> 'proj' (the layer of a tower a shared key belongs to)."""
    return key.split(".")[1]


class UniAlignClient(ClientMethod):
    name = "unialign"

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> Plan:
        if len(shard.modalities) == 2:
            return Plan(shard)
        opts, mod = shard.cfg.options, shard.modalities[0]
        if opts.train_parts == "none":  # the control: weigh in without moving anything
            return Plan(shard, train=False, send=True)
        terms = []
        if opts.distill_weight > 0:  # the teacher: the model as it arrived, i.e. the round's global model
            emb = model.encode(mod, shard.feats[mod])[0]
            if mod == "txt":  # text-only batches are scenes (see common.train.train_unimodal)
                emb = scene_teacher(emb, shard.data.caption_image, len(shard.data.images))
            teacher = torch.as_tensor(emb, device=shard.device)
            terms.append(DistillTerm(mod, teacher, opts.distill_weight, opts.distill_kind))
        frozen = frozenset(k for k, p in model.named_parameters() if k.startswith(f"{mod}.") and not is_private(k)
                           and part_of(k) not in TRAINED_PARTS[opts.train_parts])
        for key, param in model.named_parameters():
            if key in frozen:
                param.requires_grad_(False)
        return Plan(shard, terms, frozen=frozen)
