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
from common.data.federation import CLIENT_TYPES
from common.data.flickr8k import RetrievalSplit
from common.data.shards import cut_shard, read_shard, shard_dir
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
    """Validate the configs, find this node's shard of `split` and load (encoding once) its features.

    Node config (`flower-supernode --node-config`) wins over the run config for `data-dir`, `cache-dir` and
    `device`, so that each institution points at its own disk and hardware. A `data-dir` holding a materialised
    shard (`common.data.shards`) is read as is: the node needs no other data, and the shard must have been cut for
    this node and this run config. Otherwise (simulation) the node cuts its partition from the full dataset.
    """
    start = time.perf_counter()
    cfg = parse_run_config(context.run_config)
    node = parse_node_config(context.node_config)
    data_dir = node.data_dir or cfg.data_dir
    private = shard_dir(data_dir)
    if private is not None:
        given = node.model_fields_set  # the node config may leave its partition to the manifest
        shard = read_shard(private, split, cfg, node.partition_id if "partition_id" in given else None,
                           node.num_partitions if "num_partitions" in given else None)
    else:
        shard = cut_shard(cfg, node.partition_id, node.num_partitions, data_dir, split)
    device = node.device or cfg.device
    backbone = build_backbone(cfg.backbone, device)
    feats = split_features(shard.data, backbone, resolve_cache_dir(node.cache_dir or cfg.cache_dir),
                           modalities=CLIENT_TYPES[shard.client_type], batch_size=cfg.encode_batch_size)
    return NodeShard(cfg=cfg, partition_id=shard.partition_id, num_partitions=shard.num_partitions,
                     client_type=shard.client_type, backbone=backbone, device=resolve_device(device),
                     pool_indices=shard.pool_indices, data=shard.data, feats=feats,
                     load_seconds=time.perf_counter() - start)


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
