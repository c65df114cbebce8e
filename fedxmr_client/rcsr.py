"""The client side of RCSR, around the ordinary local training of `app.train`.

Before training (`begin`): hold out a share of the node's images (fixed per node, never trained on) to measure
retrieval consistency; read the global prototypes the server sent; give every item concept targets (the DERIVED
labels for nodes that hold captions, pseudo-labels — nearest global image prototype — for image-only nodes, whose
labels would need captions); build the anchors (each tower toward the other modality's global prototypes).
After training (`finish`): the node's prototypes of its updated shared towers (uploaded, record `prototypes`) and
the consistency statistics for the server's router (metrics `rcsr-*`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common.data.concepts import CONCEPT_NAMES
from common.data.flickr8k import caption_rows, subset
from common.metrics import query_recalls
from common.model import XmrModel
from common.prototypes import RECORD, Anchor, compute_prototypes, make_anchor, prototype_accuracy, pseudo_labels
from fedxmr_client.node import NodeShard

OTHER = {"img": "txt", "txt": "img"}


def take(shard: NodeShard, image_idx: np.ndarray) -> NodeShard:
    """The part of a shard at `image_idx` (images, their captions, their features)."""
    feats = dict(shard.feats)
    if "img" in feats:
        feats["img"] = shard.feats["img"][image_idx]
    if "txt" in feats:
        feats["txt"] = shard.feats["txt"][caption_rows(shard.data, image_idx)]
    return replace(shard, data=subset(shard.data, image_idx), feats=feats, pool_indices=shard.pool_indices[image_idx])


def received_prototypes(content: RecordDict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if RECORD not in content.array_records:
        return {}
    rec = {k: a.numpy() for k, a in content[RECORD].items()}
    return {m: (rec[m], rec[f"{m}-count"]) for m in ("img", "txt") if m in rec and f"{m}-count" in rec}


@dataclass(frozen=True)
class RcsrRound:
    train: NodeShard
    holdout: NodeShard | None
    globals: dict[str, tuple[np.ndarray, np.ndarray]]
    targets: np.ndarray  # (n_train_images, C) concept targets of the training part
    holdout_targets: np.ndarray
    anchors: dict[str, Anchor]


def _targets(shard: NodeShard, model: XmrModel, globals_: dict) -> np.ndarray:
    if "txt" in shard.modalities:
        return shard.data.labels
    if "img" not in globals_:
        return np.zeros((len(shard.data.images), len(CONCEPT_NAMES)), dtype=np.uint8)
    emb, _ = model.encode("img", shard.feats["img"])
    return pseudo_labels(emb, *globals_["img"])


def begin(shard: NodeShard, model: XmrModel, content: RecordDict) -> RcsrRound:
    cfg = shard.cfg
    n = len(shard.data.images)
    order = np.random.default_rng([cfg.seed, shard.partition_id, 7]).permutation(n)  # same split every round
    n_hold = int(cfg.rcsr_holdout * n)
    n_hold = n_hold if n_hold >= 2 and n - n_hold >= 2 else 0
    train = take(shard, np.sort(order[n_hold:])) if n_hold else shard
    holdout = take(shard, np.sort(order[:n_hold])) if n_hold else None
    globals_ = received_prototypes(content)
    targets = _targets(train, model, globals_)
    holdout_targets = _targets(holdout, model, globals_) if holdout else targets
    paired = len(shard.modalities) == 2
    weight = cfg.rcsr_align_weight if paired else cfg.rcsr_anchor_weight
    anchors = {}
    for mod in shard.modalities:
        if OTHER[mod] in globals_:
            anchor = make_anchor(targets, *globals_[OTHER[mod]], weight, cfg.rcsr_anchor_temperature,
                                 device=shard.device)
            if anchor is not None:
                anchors[mod] = anchor
    return RcsrRound(train, holdout, globals_, targets, holdout_targets, anchors)


def _item_targets(shard: NodeShard, mod: str, targets: np.ndarray) -> np.ndarray:
    """Targets per embedded item: per image, or per caption (its image's)."""
    return targets if mod == "img" else targets[shard.data.caption_image]


def finish(rr: RcsrRound, model: XmrModel) -> tuple[dict[str, float], ArrayRecord]:
    """This node's prototypes (from its training part) and its consistency statistics (from the held-out part,
    or the training part if the shard is too small to hold any out)."""
    tables: dict[str, np.ndarray] = {}
    for mod in rr.train.modalities:
        emb, _ = model.encode(mod, rr.train.feats[mod])
        tables[mod], tables[f"{mod}-count"] = compute_prototypes(emb, _item_targets(rr.train, mod, rr.targets))
    probe, probe_targets = (rr.holdout, rr.holdout_targets) if rr.holdout else (rr.train, rr.targets)
    embs = {mod: model.encode(mod, probe.feats[mod])[0] for mod in probe.modalities}
    metrics: dict[str, float] = {"rcsr-holdout-images": len(rr.holdout.data.images) if rr.holdout else 0,
                                 "rcsr-anchored": len(rr.anchors)}
    scores = [prototype_accuracy(emb, _item_targets(probe, mod, probe_targets), *rr.globals[OTHER[mod]])
              for mod, emb in embs.items() if OTHER[mod] in rr.globals]
    scores = [s for s in scores if np.isfinite(s)]
    if scores:
        metrics["rcsr-consistency"] = float(np.mean(scores))
    if len(embs) == 2:  # paired: in-shard cross-modal retrieval of the held-out pairs
        caps, images = probe.data.caption_image, np.arange(len(probe.data.images))
        i2t = query_recalls(embs["img"] @ embs["txt"].T, images, caps, "i2t", ks=(1,))
        t2i = query_recalls(embs["txt"] @ embs["img"].T, caps, images, "t2i", ks=(1,))
        metrics["rcsr-pair-recall"] = (i2t["i2t_r1"] + t2i["t2i_r1"]) / 200.0
    return metrics, ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tables.items()})
