"""The ClientApp.

- `train`: local epochs on the node's shard with the loss its modalities allow (paired InfoNCE, or the unimodal
  objectives), then, if enabled, its personal adapters (kept in `context.state`). The reply carries only the
  shared arrays of the modalities it trained (`arrays`) and a MetricRecord (`metrics`) with `num-examples`,
  `has-img` / `has-txt` (so the server renormalises per modality), loss parts, timing and size figures.
- with method `rcsr`, `train` also holds out part of the shard, anchors to the global prototypes the server sent
  and replies with the node's prototypes (record `prototypes`) and consistency statistics (see `rcsr.py`).
- `evaluate`: the node's own test shard, as queries in the modalities it holds, against the shared test gallery
  the server sends (embedded by the global model): R@K for the global model and for global + personal adapters.
No state is kept in memory between messages.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.data.federation import TYPE_CODES
from common.metrics import query_recalls
from common.model import XmrModel, upload_keys
from common.prototypes import RECORD, Anchor
from common.train import TrainConfig, train_paired, train_unimodal
from fedxmr_client import rcsr
from fedxmr_client.node import NodeShard, load_shard, model_for, save_personal

app = ClientApp()


def _train(model: XmrModel, shard: NodeShard, cfg: TrainConfig, rng: np.random.Generator,
           personal: bool, anchors: dict[str, Anchor] | None = None) -> dict[str, float]:
    f, caps = shard.feats, shard.data.caption_image
    if shard.client_type == "paired":
        return train_paired(model, f["img"], f["txt"], caps, cfg, rng, personal=personal, anchors=anchors)
    if shard.client_type == "image-only":
        return train_unimodal(model, "img", f["img"], cfg, rng, personal=personal, anchors=anchors)
    return train_unimodal(model, "txt", f["txt"], cfg, rng, caption_image=caps, personal=personal, anchors=anchors)


@app.train()
def train(msg: Message, context: Context) -> Message:
    shard = load_shard(context, "train")
    model, _ = model_for(shard, msg.content["arrays"], context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    cfg = shard.cfg.train_cfg()
    if "proximal-mu" in config:
        cfg = replace(cfg, proximal_mu=float(config["proximal-mu"]))
    rng = np.random.default_rng([shard.cfg.seed, shard.partition_id, server_round])
    torch.manual_seed(int(rng.integers(2**31)))
    start = time.perf_counter()
    rcsr_round = rcsr.begin(shard, model, msg.content) if shard.cfg.method == "rcsr" else None
    local = rcsr_round.train if rcsr_round else shard
    stats = _train(model, local, cfg, rng, personal=False, anchors=rcsr_round.anchors if rcsr_round else None)
    metrics = {f"train-{k.replace('_', '-')}": float(v) for k, v in stats.items()}
    if shard.cfg.personal_adapters:
        personal_cfg = replace(cfg, epochs=shard.cfg.personal_epochs, proximal_mu=0.0)
        metrics["personal-loss"] = _train(model, local, personal_cfg, rng, personal=True)["loss"]
        save_personal(model, context)
    state = model.state_dict()
    arrays = ArrayRecord({k: state[k] for k in upload_keys(state, shard.modalities)})
    records = RecordDict({"arrays": arrays})
    if rcsr_round:
        rcsr_metrics, prototypes = rcsr.finish(rcsr_round, model)
        records[RECORD] = prototypes
        metrics |= rcsr_metrics
    metrics |= {
        "num-examples": len(local.data.images),
        "partition-id": shard.partition_id,
        "client-type": TYPE_CODES[shard.client_type],
        "has-img": int("img" in shard.modalities),
        "has-txt": int("txt" in shard.modalities),
        "train-seconds": time.perf_counter() - start,
        "load-seconds": shard.load_seconds,
        "upload-bytes": sum(a.numpy().nbytes for a in arrays.values()),
    }
    records["metrics"] = MetricRecord(metrics)
    return Message(records, reply_to=msg)


def _scores(model: XmrModel, shard: NodeShard, gallery: ArrayRecord, personal: bool) -> dict[str, float]:
    g = {k: a.numpy() for k, a in gallery.items()}
    out: dict[str, float] = {}
    if "img" in shard.modalities:
        emb, _ = model.encode("img", shard.feats["img"], personal=personal)
        out |= query_recalls(emb @ g["txt-emb"].T, shard.pool_indices, g["caption-image"], "i2t")
    if "txt" in shard.modalities:
        emb, _ = model.encode("txt", shard.feats["txt"], personal=personal)
        owner = shard.pool_indices[shard.data.caption_image]
        out |= query_recalls(emb @ g["img-emb"].T, owner, np.arange(len(g["img-emb"])), "t2i")
    out["score"] = float(np.mean(list(out.values())))  # mean R@K over the directions this client can query
    return out


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    shard = load_shard(context, "test")
    model, has_personal = model_for(shard, msg.content["arrays"], context)
    metrics: dict[str, float] = {"num-examples": len(shard.data.images), "partition-id": shard.partition_id,
                                 "client-type": TYPE_CODES[shard.client_type]}
    if not len(shard.data.images):  # a very skewed partition can leave a client without test items
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    metrics |= {f"global-{k}": v for k, v in _scores(model, shard, msg.content["gallery"], False).items()}
    if shard.cfg.personal_adapters and has_personal:
        metrics |= {f"personal-{k}": v for k, v in _scores(model, shard, msg.content["gallery"], True).items()}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
