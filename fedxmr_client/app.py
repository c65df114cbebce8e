"""The ClientApp.

- `train`: the method's plan (`methods/`: what to train on, extra loss terms), local epochs on the node's shard
  with the loss its modalities allow (paired InfoNCE, or the unimodal objectives), then, if enabled, its personal
  adapters (kept on the node's disk, one version per round: `state_store`). The reply carries the shared arrays of
  the modalities it trained (`arrays`; none for methods whose models stay on the node), the method's records, and a MetricRecord (`metrics`) with
  `num-examples`, `has-img` / `has-txt` (so the server renormalises per modality), loss parts, timing and sizes.
- `evaluate`: the node's own dev shard (every round) or test shard (once, `split` = test, with its state of the
  round selected on dev), as queries in the modalities it holds, against the shared gallery the server sends
  (embedded by the model the node was sent, or raw features the node embeds with its own model): R@K for that
  model and for it + personal adapters.
- `query`: who the node is (partition id, partitions, client type, modalities; from its configs, no data loaded), so
  that the server keys its per-client state by partition, which survives a resumed run (node ids do not).
No state is kept in memory between messages.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import protocol as P
from common.config import parse_run_config
from common.data.federation import CLIENT_TYPES, TYPE_CODES
from common.metrics import query_recalls, standard_map
from common.model import XmrModel, upload_keys
from common.parts import personal as personal_part
from common.privacy import client_noise, fresh_rng
from common.train import TrainConfig, train_paired, train_unimodal
from fedxmr_client.faults import apply_fault, fail_if_drilled, fault_of, tamper_reply
from fedxmr_client.methods import ClientMethod, client_method
from fedxmr_client.methods.base import Plan
from fedxmr_client.node import (MODEL_STATE, PERSONAL_STATE, NodeShard, load_shard, model_for, node_identity,
                                personal_state, shared_state, state_store)
from fedxmr_client.secagg import secagg_mod
from fedxmr_client.state_store import States

app = ClientApp(mods=[secagg_mod])  # SecAgg+ rounds only (fedxmr_client/secagg.py); other messages pass through


def _train(model: XmrModel, shard: NodeShard, cfg: TrainConfig, rng: np.random.Generator, personal: bool,
           plan: Plan | None = None) -> dict[str, float]:
    f, caps, labels = shard.feats, shard.data.caption_image, shard.data.labels  # image-only: no labels (0 columns)
    terms = plan.terms if plan else ()
    if shard.client_type == "paired":
        return train_paired(model, f["img"], f["txt"], caps, cfg, rng, personal=personal, terms=terms, labels=labels)
    if shard.client_type == "image-only":
        return train_unimodal(model, "img", f["img"], cfg, rng, personal=personal, terms=terms, labels=labels)
    return train_unimodal(model, "txt", f["txt"], cfg, rng, caption_image=caps, personal=personal, terms=terms,
                          labels=labels)


def _privatise(state: dict[str, torch.Tensor], received: dict[str, np.ndarray], shard: NodeShard,
               config: ConfigRecord) -> dict[str, torch.Tensor]:
    """The update clipped to `dp-clip` plus N(0, (z·C)²/m) (`common.privacy.client_noise`). z: the larger of the run
    config's and the server's; m: the server's count of sampled clients, at most the federation's size (a server that
    claims more clients would shrink each node's share of the noise)."""
    missing = [k for k in (P.DP_NOISE, P.DP_SAMPLED) if k not in config] + [k for k in state if k not in received]
    if missing:  # never send an update without its noise, or one that cannot be measured from the model it started at
        raise ValueError(f"client-side DP: the train message has no {missing[:3]}; this node sends no update "
                         "without noise")
    z = max(shard.cfg.dp_noise_multiplier, float(config[P.DP_NOISE]))
    m = min(int(config[P.DP_SAMPLED]), shard.num_partitions)
    noised, _ = client_noise({k: received[k] for k in state}, {k: v.detach().cpu().numpy() for k, v in state.items()},
                             shard.cfg.dp_clip, z, m, fresh_rng())
    return {k: torch.from_numpy(v) for k, v in noised.items()}


def _identity(partition_id: int, client_type: str) -> dict[str, int]:
    """What a node says about itself in its train and query replies: partition, client type, modalities held."""
    mods = CLIENT_TYPES[client_type]
    return {P.PARTITION_ID: partition_id, P.CLIENT_TYPE: TYPE_CODES[client_type],
            P.HAS["img"]: int("img" in mods), P.HAS["txt"]: int("txt" in mods)}


def _model(shard: NodeShard, method: ClientMethod, content: RecordDict, states: States) -> tuple[XmrModel, bool]:
    """The model this message works with (the arrays sent, the node's state), and whether it has trained personal
    adapters."""
    personal = states.get(PERSONAL_STATE)
    own = states.get(MODEL_STATE) if method.keeps_model else None
    if method.keeps_model and own is None:
        own = method.initial_model(shard)
    sent = content[P.ARRAYS] if P.ARRAYS in content.array_records else None
    return model_for(shard, sent, personal, own), personal is not None


@app.train()
def train(msg: Message, context: Context) -> Message:
    method = client_method(parse_run_config(context.run_config).method)
    shard = load_shard(context, "train", method.data_config)
    config = msg.content[P.CONFIG]
    server_round = int(config.get(P.SERVER_ROUND, 0))
    fault = fault_of(shard.cfg.faults, shard.partition_id)
    fail_if_drilled(fault)
    store = state_store(shard, context, config)
    states = store.load(as_of=server_round - 1)  # as it was before this round, even if a killed attempt saved one
    model, _ = _model(shard, method, msg.content, states)
    cfg = method.train_config(shard.cfg)
    rng = np.random.default_rng([shard.cfg.seed, shard.partition_id, server_round])
    torch.manual_seed(int(rng.integers(2**31)))
    start = time.perf_counter()
    plan = method.begin(shard, model, msg.content, states)
    records = RecordDict()
    metrics: dict[str, float] = {}
    if plan.train:
        stats = method.fit(model, plan, lambda: _train(model, plan.shard, cfg, rng, personal=False, plan=plan))
        metrics = {f"train-{k.replace('_', '-')}": float(v) for k, v in stats.items()}
        if shard.cfg.personal_adapters:
            personal_cfg = replace(cfg, epochs=shard.cfg.personal_epochs)
            metrics["personal-loss"] = _train(model, plan.shard, personal_cfg, rng, personal=True)["loss"]
            states[PERSONAL_STATE] = personal_state(model)
        if method.keeps_model or method.keeps_previous:
            states[MODEL_STATE] = shared_state(model)
        extra_metrics, extra_records = method.finish(plan, model)  # may add to `states` (PLFedCMH's class codes)
        if states:
            store.save(server_round, states, int(config.get(P.BEST_ROUND, -1)))
        metrics |= extra_metrics
        for name, record in extra_records.items():
            records[name] = record
    state = model.state_dict()
    sent = [k for k in upload_keys(state, shard.modalities) if k not in plan.frozen]
    sent = sent if (plan.train if plan.send is None else plan.send) and method.sends_weights else []
    got = P.ARRAYS in msg.content.array_records
    received = {k: a.numpy() for k, a in msg.content[P.ARRAYS].items()} if got else {}
    state, num_examples = apply_fault(fault, {k: state[k] for k in sent}, received, len(plan.shard.data.images),
                                      context.state)
    if shard.cfg.dp and shard.cfg.dp_side == "client" and state:  # clip, add this node's share of the noise
        state = _privatise(state, received, shard, config)
    arrays = ArrayRecord(state)
    records[P.ARRAYS] = arrays
    metrics |= {
        **_identity(shard.partition_id, shard.client_type),
        P.NUM_EXAMPLES: num_examples,
        P.TRAINED: int(plan.train),
        "train-seconds": time.perf_counter() - start,
        "load-seconds": shard.load_seconds,
        P.UPLOAD_BYTES: sum(a.numpy().nbytes for rec in records.array_records.values() for a in rec.values()),
        P.SENT_CHECKSUM: P.checksum({k: a.numpy() for k, a in arrays.items()}),
    }
    if got:
        metrics[P.RECEIVED_CHECKSUM] = P.checksum(received)
    tamper_reply(fault, metrics, records, P.ARRAYS)
    records[P.METRICS] = MetricRecord(metrics)
    return Message(records, reply_to=msg)


def _gallery(model: XmrModel, gallery: ArrayRecord) -> dict[str, np.ndarray]:
    """Gallery embeddings and codes: as sent, or computed here from raw features by the node's own shared towers."""
    g = {k: a.numpy() for k, a in gallery.items()}
    for mod in ("img", "txt"):
        if f"{mod}-feat" in g:
            g[f"{mod}-emb"], g[f"{mod}-code"] = model.encode(mod, g.pop(f"{mod}-feat"))
    return g


def _scores(model: XmrModel, shard: NodeShard, g: dict[str, np.ndarray], personal: bool) -> dict[str, float]:
    """R@K of the node's own queries against the gallery, their mean (`score`), and, where the node has labels
    (not image-only: labels come from captions) and the gallery has codes, the standard Hamming MAP@all
    (`smap_i2t`, `smap_t2i`)."""
    out: dict[str, float] = {}
    maps: dict[str, float] = {}
    view = personal_part.NAME if personal else None
    labelled = shard.data.labels.shape[1] > 0 and P.LABEL in g
    if "img" in shard.modalities:
        emb, code = model.encode("img", shard.feats["img"], view=view)
        out |= query_recalls(emb @ g["txt-emb"].T, shard.pool_indices, g[P.CAPTION_IMAGE], "i2t")
        if labelled and "txt-code" in g:
            maps["smap_i2t"] = standard_map(code, g["txt-code"], shard.data.labels, g[P.LABEL][g[P.CAPTION_IMAGE]])
    if "txt" in shard.modalities:
        emb, code = model.encode("txt", shard.feats["txt"], view=view)
        owner = shard.pool_indices[shard.data.caption_image]
        out |= query_recalls(emb @ g["img-emb"].T, owner, np.arange(len(g["img-emb"])), "t2i")
        if labelled and "img-code" in g:
            maps["smap_t2i"] = standard_map(code, g["img-code"], shard.data.labels[shard.data.caption_image],
                                            g[P.LABEL])
    out["score"] = float(np.mean(list(out.values())))  # mean R@K over the directions this client can query
    return out | maps


def _own_set_maps(model: XmrModel, queries: NodeShard, database: NodeShard, personal: bool) -> dict[str, float]:
    """The node's test queries against its own train set as the retrieval set (PLFedCMH's per-client protocol,
    reported for every method), hashed by the same model: `own_smap_i2t`, `own_smap_t2i`."""
    if not len(database.data.images):
        return {}
    view = personal_part.NAME if personal else None
    code = {(name, mod): model.encode(mod, shard.feats[mod], view=view)[1]
            for name, shard in (("q", queries), ("db", database)) for mod in ("img", "txt")}
    q_img, q_txt = queries.data.labels, queries.data.labels[queries.data.caption_image]
    db_img, db_txt = database.data.labels, database.data.labels[database.data.caption_image]
    return {"own_smap_i2t": standard_map(code["q", "img"], code["db", "txt"], q_img, db_txt),
            "own_smap_t2i": standard_map(code["q", "txt"], code["db", "img"], q_txt, db_img)}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    method = client_method(parse_run_config(context.run_config).method)
    config = msg.content[P.CONFIG]
    split = str(config.get(P.SPLIT_KEY, "dev"))
    shard = load_shard(context, split, method.data_config)
    # dev of round r: the state in effect in round r; test: the server sends the selected round as the round
    states = state_store(shard, context, config).load(as_of=int(config.get(P.SERVER_ROUND, 0)))
    model, has_personal = _model(shard, method, msg.content, states)
    metrics: dict[str, float] = {P.NUM_EXAMPLES: len(shard.data.images), P.PARTITION_ID: shard.partition_id,
                                 P.CLIENT_TYPE: TYPE_CODES[shard.client_type]}
    if not len(shard.data.images):  # a very skewed partition can leave a client without local dev/test items
        return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
    gallery = _gallery(model, msg.content[P.GALLERY])
    own = None  # at test, a labelled node holding both modalities is also scored against its own train set
    if split == "test" and set(shard.modalities) == {"img", "txt"} and shard.data.labels.shape[1]:
        own = load_shard(context, "train", method.data_config)
    variants = [("global", False)] + ([("personal", True)] if shard.cfg.personal_adapters and has_personal else [])
    for name, personal in variants:
        metrics |= {f"{name}-{k}": v for k, v in _scores(model, shard, gallery, personal).items()}
        if own is not None:
            metrics |= {f"{name}-{k}": v for k, v in _own_set_maps(model, shard, own, personal).items()}
    return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is (partition, partitions, client type, modalities), from its configs alone: no data is
    loaded (`node_identity`)."""
    method = client_method(parse_run_config(context.run_config).method)
    pid, nparts, client_type = node_identity(context, method.data_config)
    metrics = {**_identity(pid, client_type), P.NUM_PARTITIONS: nparts}
    return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
