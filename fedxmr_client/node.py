"""What a node holds: its type (paired / image-only / text-only), its shards of the train, dev and test pools
restricted to its modalities, their cached features, and its node state (personal adapters; a method's own model).

Stateless by design: the Deployment Engine starts a fresh process per message, so everything is rebuilt from the
run config, the node config, the node's on-disk feature cache and its on-disk state (`state_store`: one version per
round, so the once-only test scores the state of the round selected on dev, and a resumed run sees the state of the
round it resumes from).
"""

from __future__ import annotations

import json
from collections import OrderedDict
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from common.backbones import Backbone, resolve_device
from common.config import RunConfig, parse_node_config, parse_run_config
from common.data.datasets import backbone_for, split_concepts
from common.data.federation import CLIENT_TYPES, client_types
from common.data.split import DATA_DIR_ENV, RetrievalSplit
from common.data.shards import cut_shard, partitioned_split, read_manifest, read_shard, shard_backbone, shard_dir
from common.features import resolve_cache_dir, split_features
from common.model import XmrModel, load_numpy_state
from common.parts import is_private
from common import protocol as P
from fedxmr_client.state_store import NodeStateStore

PERSONAL_STATE = "personal-adapters"  # the node's personal adapters, never uploaded
MODEL_STATE = "node-model"  # a method's own model of the node (FedProto), never uploaded


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
    feats: Mapping[str, np.ndarray]
    load_seconds: float

    @property
    def modalities(self) -> tuple[str, ...]:
        return CLIENT_TYPES[self.client_type]

    @property
    def concepts(self) -> int:
        return split_concepts(self.data)

    def new_model(self) -> XmrModel:
        cfg = self.cfg.model_cfg(self.backbone.img_dim, self.backbone.txt_dim, personal=self.cfg.personal_adapters,
                                 concepts=self.concepts)
        return XmrModel(cfg).to(self.device)


def node_identity(context: Context,
                  data_config: Callable[[RunConfig, int], RunConfig] | None = None) -> tuple[int, int, str]:
    """(partition id, number of partitions, client type) from the node's configs alone: a materialised shard's
    manifest, else the node config. Reads no data, so that asking a node who it is costs next to nothing (the server
    asks each node once, when it first samples it); a node that cannot load its data says so in its first reply."""
    cfg, node = parse_run_config(context.run_config), parse_node_config(context.node_config)
    pid, nparts = node.partition_id, node.num_partitions
    private = shard_dir(node.data_dir or cfg.data_dir)
    if private is not None:
        manifest = read_manifest(private)
        pid, nparts = int(manifest["partition-id"]), int(manifest["num-partitions"])
    if data_config is not None:  # as `load_shard` calls it
        cfg = data_config(cfg, node.num_partitions)
    return pid, nparts, client_types(nparts, cfg.mix(), cfg.seed)[pid]


def load_shard(context: Context, split: str = "train",
               data_config: Callable[[RunConfig, int], RunConfig] | None = None) -> NodeShard:
    """This node's shard of `split` (see `_load_shard`), from a per-process memo when the process already loaded it
    with the same configs and unchanged files on disk.

    Why: in simulation one Ray actor process serves message after message, and re-reading and re-deriving the shard
    took about as long as a round's training (0.45 s per message). The memo holds only what the disk holds (never
    trained state), so results do not depend on it; a fresh process per message (Deployment Engine) just misses.
    """
    start = time.perf_counter()
    cfg, node = parse_run_config(context.run_config), parse_node_config(context.node_config)
    if data_config is not None:  # what the node loads, as the method sees it (centralized: the whole split)
        cfg = data_config(cfg, node.num_partitions)
    node_config = dict(context.node_config)
    data = _disk_fingerprint(node.data_dir or cfg.data_dir, None)
    key = (json.dumps(cfg.as_flat_dict(), sort_keys=True), json.dumps(node_config, sort_keys=True, default=str), split,
           data, _disk_fingerprint("", node.cache_dir or cfg.cache_dir))
    if os.environ.get(MEMO_ENV, "1") == "0":  # benchmarks/simulation_round.py measures the loads without it
        _MEMO.clear()
        _PARTITIONS.clear()
    if key not in _MEMO:
        shard = _load_shard(cfg, node_config, split, data)
        _MEMO[key] = replace(shard, feats=MappingProxyType(shard.feats))  # shared between callers: read-only
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    _MEMO.move_to_end(key)
    return replace(_MEMO[key], load_seconds=time.perf_counter() - start)


# the per-process memo of `load_shard`: (effective run config, node config, split, disk fingerprint) -> shard
_MEMO: OrderedDict[tuple, NodeShard] = OrderedDict()
_MEMO_SIZE = 32  # 10 simulated nodes x (train, dev, test) fit
# and of the whole split with every partition (`partitioned_split`), shared by all the nodes a process serves: with
# thousands of simulated nodes a sampled node is mostly new to its actor, and re-deriving the partition per node
# made a round's cost grow with the federation (docs/SCALE.md)
_PARTITIONS: OrderedDict[tuple, tuple[RetrievalSplit, list[np.ndarray]]] = OrderedDict()
_PARTITIONS_SIZE = 3  # train, dev, test of one run
MEMO_ENV = "FEDXMR_SHARD_MEMO"  # "0": load from disk every message (the behaviour before the memo)
IMAGE_FILES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # never part of the fingerprint


def _disk_fingerprint(data_dir: str, cache_dir: str | None) -> tuple:
    """Size and mtime of every file a shard can be read from (split lists, captions, shard files, feature chunks;
    not the image files): a changed, added or removed file means a new load. `cache_dir` None: the data dir's
    files only (what a partition is derived from)."""
    out = []
    roots = (data_dir or os.environ.get(DATA_DIR_ENV, ""),
             str(resolve_cache_dir(cache_dir)) if cache_dir is not None else "")
    for root in filter(None, roots):
        path = Path(root).expanduser().resolve()
        if path.is_file():  # a Karpathy JSON given as the data dir
            st = path.stat()
            out.append((str(path.parent), path.name, st.st_size, st.st_mtime_ns))
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d != "images")
            for name in sorted(files):
                if name.lower().endswith(IMAGE_FILES):  # images in other folders (COCO's train2014/, val2014/)
                    continue
                st = os.stat(os.path.join(folder, name))
                out.append((folder, name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _partitioned(cfg: RunConfig, num_partitions: int, data_dir: str, split: str,
                 disk: tuple) -> tuple[RetrievalSplit, list[np.ndarray]]:
    """`partitioned_split`, from the per-process memo when this process already derived it (same run config,
    federation size, data dir and data files: `disk`; the feature cache does not decide a partition, and new nodes
    write to it)."""
    key = (json.dumps(cfg.as_flat_dict(), sort_keys=True), num_partitions, str(data_dir), split, disk)
    if key not in _PARTITIONS:
        _PARTITIONS[key] = partitioned_split(cfg, num_partitions, data_dir, split)
        while len(_PARTITIONS) > _PARTITIONS_SIZE:
            _PARTITIONS.popitem(last=False)
    _PARTITIONS.move_to_end(key)
    return _PARTITIONS[key]


def _load_shard(cfg: RunConfig, node_config: dict, split: str, data_files: tuple | None = None) -> NodeShard:
    """Find this node's shard of `split` and load (encoding once) its features; `cfg` is the run config as the
    method sees it (`data_config`: centralized loads the whole split, paired).

    Node config (`flower-supernode --node-config`) wins over the run config for `data-dir`, `cache-dir` and
    `device`, so that each institution points at its own disk and hardware. A `data-dir` holding a materialised
    shard (`common.data.shards`) is read as is: the node needs no other data, and the shard must have been cut for
    this node and this run config. Otherwise (simulation) the node cuts its partition from the full dataset.
    """
    start = time.perf_counter()
    node = parse_node_config(node_config)
    data_dir = node.data_dir or cfg.data_dir
    private = shard_dir(data_dir)
    if private is not None:
        given = node.model_fields_set  # the node config may leave its partition to the manifest
        shard = read_shard(private, split, cfg, node.partition_id if "partition_id" in given else None,
                           node.num_partitions if "num_partitions" in given else None)
    else:
        data_files = data_files if data_files is not None else _disk_fingerprint(data_dir, None)
        shard = cut_shard(cfg, node.partition_id, node.num_partitions, data_dir, split,
                          _partitioned(cfg, node.num_partitions, data_dir, split, data_files))
    device = node.device or cfg.device
    backbone = (shard_backbone(private, cfg.backbone, device) if private is not None
                else backbone_for(cfg.backbone, data_dir, cfg.data_keys, device))
    feats = split_features(shard.data, backbone, resolve_cache_dir(node.cache_dir or cfg.cache_dir),
                           modalities=CLIENT_TYPES[shard.client_type], batch_size=cfg.encode_batch_size)
    return NodeShard(cfg=cfg, partition_id=shard.partition_id, num_partitions=shard.num_partitions,
                     client_type=shard.client_type, backbone=backbone, device=resolve_device(device),
                     pool_indices=shard.pool_indices, data=shard.data, feats=feats,
                     load_seconds=time.perf_counter() - start)


def state_store(shard: NodeShard, context: Context, config: ConfigRecord) -> NodeStateStore:
    """Where this node keeps its state for this run: its own cache dir (node config wins), under the run key the
    server sends (the same for a resumed run)."""
    node = parse_node_config(context.node_config)
    run_key = str(config.get(P.RUN_KEY, "")) or f"run-{context.run_id}"
    return NodeStateStore.of(resolve_cache_dir(node.cache_dir or shard.cfg.cache_dir), run_key, shard.partition_id)


def model_for(shard: NodeShard, global_arrays: ArrayRecord | None, personal: dict[str, np.ndarray] | None,
              node_model: dict[str, np.ndarray] | None = None) -> XmrModel:
    """The model a node uses: the arrays it was sent (or its own model, `node_model`, for methods whose models
    stay on the node; a fresh model seeded like the server's when it has none yet), plus its personal adapters
    (zero-initialised, i.e. the identity, before it first trained them; seeded per node, without touching the
    training RNG, so that runs repeat)."""
    with torch.random.fork_rng():
        torch.manual_seed(shard.cfg.seed * 1_000_003 + shard.partition_id)
        model = shard.new_model()
    sent = {k: a.numpy() for k, a in global_arrays.items()} if global_arrays is not None else None
    for arrays in (sent, node_model, personal if shard.cfg.personal_adapters else None):
        if arrays is not None:
            load_numpy_state(model, arrays, partial=True)
    return model


def shared_state(model: XmrModel) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if not is_private(k)}


def personal_state(model: XmrModel) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if is_private(k)}
