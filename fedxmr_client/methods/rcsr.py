"""The client side of RCSR, around the ordinary local training of `app.train`.

Before training (`begin`): hold out a share of the node's images to measure retrieval consistency, a different
slice every round (`rotating_holdout`), so no item is lost to training for good (the statistics need a probe the
round's training did not see); read the global prototypes the server sent; give every item concept targets (see
`concepts.py`); build the anchors (each tower toward the other modality's global prototypes) as loss terms.
After training (`finish`): the node's prototypes of its updated shared towers (uploaded, record `prototypes`) and
the consistency statistics for the server's router (metrics `rcsr-*`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from common import protocol as P
from common.metrics import query_recalls
from common.model import XmrModel
from common.prototypes import Anchor, make_anchor, prototype_accuracy
from common.train import Batch
from fedxmr_client.methods.base import ClientMethod, Plan
from fedxmr_client.methods.concepts import (OTHER, Tables, concept_targets, item_targets, prototype_record,
                                            received_prototypes, take)
from fedxmr_client.node import NodeShard
from fedxmr_client.state_store import States


@dataclass(frozen=True)
class AnchorTerm:
    """RCSR's prototype anchoring of one modality's shared embeddings, as a loss term of the trainer."""

    mod: str
    anchor: Anchor

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict] | None:
        if self.mod not in batch.embs:
            return None
        term = self.anchor.loss(batch.embs[self.mod], batch.items)
        return term, {f"loss_anchor_{self.mod}": term.item()}


def rotating_holdout(n: int, share: float, seed: int, partition_id: int, server_round: int) -> np.ndarray:
    """Indices of the images held out in `server_round`: consecutive slices of one fixed per-node permutation, the
    next slice each round (wrapping), so every image is trained on in all but about `share` of the rounds. Empty
    when the shard is too small to keep 2 images on each side."""
    n_hold = int(share * n)
    if n_hold < 2 or n - n_hold < 2:
        return np.zeros(0, dtype=np.int64)
    order = np.random.default_rng([seed, partition_id, 7]).permutation(n)
    start = (max(server_round, 1) - 1) * n_hold % n
    return np.sort(np.take(order, np.arange(start, start + n_hold), mode="wrap"))


@dataclass
class RcsrPlan(Plan):
    holdout: NodeShard | None = None
    globals: Tables | None = None
    targets: np.ndarray | None = None  # (n_train_images, C) concept targets of the training part
    holdout_targets: np.ndarray | None = None


class RcsrClient(ClientMethod):
    name = "rcsr"

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> RcsrPlan:
        opts = shard.cfg.options
        n = len(shard.data.images)
        server_round = int(content[P.CONFIG].get(P.SERVER_ROUND, 0)) if P.CONFIG in content.config_records else 0
        held = rotating_holdout(n, opts.holdout, shard.cfg.seed, shard.partition_id, server_round)
        train = take(shard, np.setdiff1d(np.arange(n), held)) if len(held) else shard
        holdout = take(shard, held) if len(held) else None
        globals_ = received_prototypes(content)
        targets = concept_targets(train, model, globals_)
        holdout_targets = concept_targets(holdout, model, globals_) if holdout else targets
        weight = opts.align_weight if len(shard.modalities) == 2 else opts.anchor_weight
        terms = []
        for mod in shard.modalities:
            if OTHER[mod] in globals_:
                anchor = make_anchor(targets, *globals_[OTHER[mod]], weight, opts.anchor_temperature,
                                     device=shard.device)
                if anchor is not None:
                    terms.append(AnchorTerm(mod, anchor))
        return RcsrPlan(train, terms, holdout=holdout, globals=globals_, targets=targets,
                        holdout_targets=holdout_targets)

    def finish(self, plan: RcsrPlan, model: XmrModel) -> tuple[dict[str, float], dict[str, ArrayRecord]]:
        """This node's prototypes (from its training part) and its consistency statistics (from the held-out part,
        or the training part if the shard is too small to hold any out)."""
        record = prototype_record(plan.shard, model, plan.targets)
        probe, probe_targets = (plan.holdout, plan.holdout_targets) if plan.holdout else (plan.shard, plan.targets)
        embs = {mod: model.encode(mod, probe.feats[mod])[0] for mod in probe.modalities}
        metrics: dict[str, float] = {"rcsr-holdout-images": len(plan.holdout.data.images) if plan.holdout else 0,
                                     "rcsr-anchored": len(plan.terms)}
        scores = [prototype_accuracy(emb, item_targets(probe, mod, probe_targets), *plan.globals[OTHER[mod]])
                  for mod, emb in embs.items() if OTHER[mod] in plan.globals]
        scores = [s for s in scores if np.isfinite(s)]
        if scores:
            metrics["rcsr-consistency"] = float(np.mean(scores))
        if len(embs) == 2:  # paired: in-shard cross-modal retrieval of the held-out pairs
            caps, images = probe.data.caption_image, np.arange(len(probe.data.images))
            i2t = query_recalls(embs["img"] @ embs["txt"].T, images, caps, "i2t", ks=(1,))
            t2i = query_recalls(embs["txt"] @ embs["img"].T, caps, images, "t2i", ks=(1,))
            metrics["rcsr-pair-recall"] = (i2t["i2t_r1"] + t2i["t2i_r1"]) / 200.0
        return metrics, {P.PROTOTYPES: record}
