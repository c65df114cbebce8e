"""What a node holds: its type (paired / image-only / text-only), its shards of the train and test pools restricted
to its modalities, their cached features, and its personal adapters.

Stateless by design: the Deployment Engine starts a fresh process per message, so everything is rebuilt from the
run config, the node config, the node's on-disk feature cache and `context.state` (personal adapters).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Context

from common.backbones import Backbone, build_backbone, resolve_device
from common.config import RunConfig, parse_node_config, parse_run_config
from common.data.federation import CLIENT_TYPES, client_types, node_split
from common.data.flickr8k import RetrievalSplit, load_split
from common.data.partition import dominant_class, follow_partition, partition
from common.features import resolve_cache_dir, split_features
from common.model import XmrModel, is_personal, load_numpy_state

PERSONAL_STATE = "personal-adapters"


@dataclass(frozen=True)
class NodeShard:
    cfg: RunConfig
    partition_id: int
    num_partitions: int
    client_type: str
    backbone: Backbone
    device: str
    pool_indices: np.ndarray  # this shard's images, as indices into the split's pool
    data: RetrievalSplit
    feats: dict[str, np.ndarray]
    load_seconds: float

    @property
    def modalities(self) -> tuple[str, ...]:
        return CLIENT_TYPES[self.client_type]

    def new_model(self) -> XmrModel:
        cfg = self.cfg.model_cfg(self.backbone.img_dim, self.backbone.txt_dim, personal=self.cfg.personal_adapters)
        return XmrModel(cfg).to(self.device)


def load_shard(context: Context, split: str = "train") -> NodeShard:
    """Validate the configs, pick this node's type and partition of `split`, load (encoding once) its features.

    Node config (`flower-supernode --node-config`) wins over the run config for `data-dir`, `cache-dir` and
    `device`, so that each institution points at its own disk and hardware.
    """
    start = time.perf_counter()
    cfg = parse_run_config(context.run_config)
    node = parse_node_config(context.node_config)
    client_type = client_types(node.num_partitions, cfg.mix(), cfg.seed)[node.partition_id]
    modalities = CLIENT_TYPES[client_type]
    device = node.device or cfg.device
    backbone = build_backbone(cfg.backbone, device)
    data_dir = node.data_dir or cfg.data_dir
    train = load_split(data_dir, "train", cfg.max_train_images, check_images="img" in modalities)
    parts = partition(cfg.partitioner, len(train.images), node.num_partitions, cfg.seed, labels=train.labels,
                      beta=cfg.partition_beta, ways=cfg.partition_ways)
    pool = train
    if split != "train":  # the local test shard follows this client's train class mix
        pool = load_split(data_dir, split, cfg.max_eval_images, check_images="img" in modalities)
        parts = follow_partition(dominant_class(train.labels), parts, dominant_class(pool.labels), cfg.seed)
    idx = parts[node.partition_id]
    shard = node_split(pool, idx, modalities)
    feats = split_features(shard, backbone, resolve_cache_dir(node.cache_dir or cfg.cache_dir),
                           modalities=modalities, batch_size=cfg.encode_batch_size)
    return NodeShard(cfg=cfg, partition_id=node.partition_id, num_partitions=node.num_partitions,
                     client_type=client_type, backbone=backbone, device=resolve_device(device), pool_indices=idx,
                     data=shard, feats=feats, load_seconds=time.perf_counter() - start)


def model_for(shard: NodeShard, global_arrays: ArrayRecord, context: Context) -> tuple[XmrModel, bool]:
    """The global model plus this node's personal adapters from `context.state` (zero-initialised, i.e. the
    identity, before the node first trained them). Returns (model, whether trained personal adapters exist)."""
    model = shard.new_model()
    load_numpy_state(model, {k: a.numpy() for k, a in global_arrays.items()}, partial=True)
    saved = context.state.array_records.get(PERSONAL_STATE)
    if saved is not None and shard.cfg.personal_adapters:
        load_numpy_state(model, {k: a.numpy() for k, a in saved.items()}, partial=True)
    return model, saved is not None


def save_personal(model: XmrModel, context: Context) -> None:
    """Keep the personal adapters on the node (context.state), never in a reply."""
    context.state[PERSONAL_STATE] = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()
                                                 if is_personal(k)})
