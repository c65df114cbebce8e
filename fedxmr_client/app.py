"""The ClientApp: `train` runs local epochs on the node's shard, `evaluate` scores the global model on it.

Replies carry the trainable arrays (`arrays`) and a MetricRecord (`metrics`) with `num-examples` (images of the
shard), the loss parts, and timing/size figures. No state is kept in memory between messages.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.evaluate import evaluate_retrieval
from common.model import load_numpy_state
from common.train import train_paired
from fedxmr_client.node import NodeShard, load_shard

app = ClientApp()


def _global_model(shard: NodeShard, msg: Message):
    model = shard.new_model()
    arrays = msg.content["arrays"]
    load_numpy_state(model, {k: a.numpy() for k, a in arrays.items()})
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    shard = load_shard(context)
    model = _global_model(shard, msg)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    cfg = shard.cfg.train_cfg()
    if "proximal-mu" in config:
        cfg = replace(cfg, proximal_mu=float(config["proximal-mu"]))
    rng = np.random.default_rng([shard.cfg.seed, shard.partition_id, server_round])
    torch.manual_seed(int(rng.integers(2**31)))
    start = time.perf_counter()
    stats = train_paired(model, shard.feats["img"], shard.feats["txt"], shard.data.caption_image, cfg, rng)
    arrays = ArrayRecord(model.state_dict())
    metrics = {
        "num-examples": len(shard.data.images),
        "partition-id": shard.partition_id,
        "train-seconds": time.perf_counter() - start,
        "load-seconds": shard.load_seconds,
        "upload-bytes": sum(a.numpy().nbytes for a in arrays.values()),
        **{f"train-{k.replace('_', '-')}": float(v) for k, v in stats.items()},
    }
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Retrieval within the node's own shard (its training data: a fit measure, not a held-out score)."""
    shard = load_shard(context)
    model = _global_model(shard, msg)
    res = evaluate_retrieval(model, shard.feats["img"], shard.feats["txt"], shard.data.caption_image,
                             shard.data.labels)
    metrics = {"num-examples": len(shard.data.images), "local-rsum": res["rsum"],
               "local-hash-rsum": res["hash_rsum"], "local-i2t-r1": res["i2t_r1"], "local-t2i-r1": res["t2i_r1"]}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
