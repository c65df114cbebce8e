"""Concept targets and prototype tables on a node, for the methods that exchange prototypes (RCSR, FedProto).

Targets per item: the dataset's labels where the node has them (a feature file's own; on Flickr8k and Karpathy
JSON the DERIVED concepts, which come from captions); pseudo-labels (nearest global image prototype) for Flickr8k
image-only nodes, whose labels would need captions.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common import protocol as P
from common.data.concepts import CONCEPT_NAMES
from common.data.split import caption_rows, subset
from common.model import XmrModel
from common.prototypes import compute_prototypes, pseudo_labels
from fedxmr_client.node import NodeShard

Tables = dict[str, tuple[np.ndarray, np.ndarray]]
OTHER = {"img": "txt", "txt": "img"}


def take(shard: NodeShard, image_idx: np.ndarray) -> NodeShard:
    """The part of a shard at `image_idx` (images, their captions, their features)."""
    feats = dict(shard.feats)
    if "img" in feats:
        feats["img"] = shard.feats["img"][image_idx]
    if "txt" in feats:
        feats["txt"] = shard.feats["txt"][caption_rows(shard.data, image_idx)]
    return replace(shard, data=subset(shard.data, image_idx), feats=feats, pool_indices=shard.pool_indices[image_idx])


def received_prototypes(content: RecordDict) -> Tables:
    if P.PROTOTYPES not in content.array_records:
        return {}
    rec = {k: a.numpy() for k, a in content[P.PROTOTYPES].items()}
    return {m: (rec[m], rec[f"{m}-count"]) for m in ("img", "txt") if m in rec and f"{m}-count" in rec}


def concept_targets(shard: NodeShard, model: XmrModel, globals_: Tables) -> np.ndarray:
    """(n_images, C) multi-hot targets: derived labels, or pseudo-labels for image-only nodes (none before the
    first global image prototypes exist)."""
    if shard.data.labels.shape[1]:  # derived from captions, or a feature file's labels (every node keeps those)
        return shard.data.labels
    if "img" not in globals_:
        return np.zeros((len(shard.data.images), len(CONCEPT_NAMES)), dtype=np.uint8)
    emb, _ = model.encode("img", shard.feats["img"])
    return pseudo_labels(emb, *globals_["img"])


def item_targets(shard: NodeShard, mod: str, targets: np.ndarray) -> np.ndarray:
    """Targets per embedded item: per image, or per caption (its image's)."""
    return targets if mod == "img" else targets[shard.data.caption_image]


def prototype_record(shard: NodeShard, model: XmrModel, targets: np.ndarray) -> ArrayRecord:
    """This node's prototype tables (global mean + one row per concept, with counts) of its shared towers."""
    tables: dict[str, np.ndarray] = {}
    for mod in shard.modalities:
        emb, _ = model.encode(mod, shard.feats[mod])
        tables[mod], tables[f"{mod}-count"] = compute_prototypes(emb, item_targets(shard, mod, targets))
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tables.items()})
