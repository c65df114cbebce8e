"""What a node holds: its shard of the train split and that shard's cached features.

Stateless by design: the Deployment Engine starts a fresh process per message, so everything is rebuilt from the
run config, the node config and the node's on-disk feature cache (which makes a warm rebuild cheap).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Context

from common.backbones import Backbone, build_backbone, resolve_device
from common.config import RunConfig, parse_node_config, parse_run_config
from common.data.flickr8k import RetrievalSplit, load_split, subset
from common.data.partition import iid_partition
from common.features import resolve_cache_dir, split_features
from common.model import XmrModel


@dataclass(frozen=True)
class NodeShard:
    cfg: RunConfig
    partition_id: int
    num_partitions: int
    backbone: Backbone
    device: str
    data: RetrievalSplit
    feats: dict[str, np.ndarray]
    load_seconds: float

    def new_model(self) -> XmrModel:
        model = XmrModel(self.cfg.model_cfg(self.backbone.img_dim, self.backbone.txt_dim))
        return model.to(self.device)


def load_shard(context: Context) -> NodeShard:
    """Validate the configs, pick this node's partition, and load (encoding once) its features.

    Node config (`flower-supernode --node-config`) wins over the run config for `data-dir`, `cache-dir` and
    `device`, so that each institution points at its own disk and hardware.
    """
    start = time.perf_counter()
    cfg = parse_run_config(context.run_config)
    node = parse_node_config(context.node_config)
    device = node.device or cfg.device
    backbone = build_backbone(cfg.backbone, device)
    train = load_split(node.data_dir or cfg.data_dir, "train", cfg.max_train_images)
    idx = iid_partition(len(train.images), node.num_partitions, node.partition_id, cfg.seed)
    shard = subset(train, idx)
    feats = split_features(shard, backbone, resolve_cache_dir(node.cache_dir or cfg.cache_dir),
                           batch_size=cfg.encode_batch_size)
    return NodeShard(cfg=cfg, partition_id=node.partition_id, num_partitions=node.num_partitions,
                     backbone=backbone, device=resolve_device(device), data=shard, feats=feats,
                     load_seconds=time.perf_counter() - start)
