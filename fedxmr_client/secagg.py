"""The node side of secure aggregation: a ClientApp mod that runs Flower's `secaggplus_mod` on the train messages of
a SecAgg+ round (those carrying its config record) and passes every other message through unchanged, unless the
node's own config says `require-secure-aggregation = true`: then it refuses a train message in the clear.

Flower's mod speaks the legacy FitIns / FitRes; the ClientApp speaks fedxmr's records. So inside the round the mod
calls `_as_fedxmr`: the FitIns (the model as an ordered list, its names in `P.SECAGG_KEYS`) becomes the usual train
message, the ClientApp trains, and the reply becomes a FitRes: the arrays of `P.SECAGG_UPLOAD` in that order (zeros
for one the node did not train), then an indicator vector (1 per array it trained), weighted by the server-assigned
`P.SECAGG_WEIGHT`. The mod masks that vector; the arrays never leave the node in the clear (the mod clears them), and
of the metrics only `P.SECAGG_CLEAR_METRICS` and the losses do. A value outside [-secagg-clip, secagg-clip] would be
clipped by SecAgg+'s quantisation without a word: the node refuses to send it instead, naming the array. In the
unmask stage the node refuses a request that names a client both alive and dead, or itself dead: answering both
would hand the server that client's mask and key shares together.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from common import protocol as P
from common.config import parse_node_config


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for the train messages of a secure round; everything else goes straight to the ClientApp."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if parse_node_config(context.node_config).require_secure_aggregation:
            raise PermissionError("this node's config requires secure aggregation (require-secure-aggregation); it "
                                  "sends no update in the clear")
        return call_next(msg, context)
    _check_unmask(msg.content.config_records[RECORD_KEY_CONFIGS], msg.metadata.dst_node_id)
    return secaggplus_mod(msg, context, lambda m, c: _as_fedxmr(m, c, call_next))


def _check_unmask(configs: ConfigRecord, node: int) -> None:
    """Refuse an unmask request that lists a client as both alive and dead, or this node as dead."""
    if configs.get(Key.STAGE) != Stage.UNMASK:
        return
    active, dead = set(configs.get(Key.ACTIVE_NODE_ID_LIST, [])), set(configs.get(Key.DEAD_NODE_ID_LIST, []))
    named = sorted(active & dead | {node} & dead)
    if named:
        raise PermissionError(f"secure aggregation: the unmask request lists nodes {named} as both alive and dead "
                              "(or this node as dead); answering would unmask them")


def _as_fedxmr(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train on a FitIns as on a fedxmr train message; answer the vector SecAgg+ masks, as a FitRes."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys, upload = str(config.pop(P.SECAGG_KEYS)).split(), str(config.pop(P.SECAGG_UPLOAD)).split()
    weight = int(config.pop(P.SECAGG_WEIGHT))
    model = parameters_to_ndarrays(fitins.parameters)
    if len(model) != len(keys) or not set(upload) <= set(keys) or not 1 <= weight <= P.SECAGG_MAX_WEIGHT:
        raise ValueError(f"secure aggregation: {len(model)} arrays for {len(keys)} names, an upload list not in the "
                         f"model, or weight {weight} outside 1..{P.SECAGG_MAX_WEIGHT}; this node sends nothing")
    arrays = ArrayRecord({k: Array(a) for k, a in zip(keys, model)})
    msg.content = RecordDict({P.CONFIG: ConfigRecord(config), P.ARRAYS: arrays})
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(f"train failed: {reply.error.reason}")
    extra = set(reply.content.array_records) - {P.ARRAYS}
    if extra:  # a method that sends more than weights is refused at parse time; never send it unmasked
        raise ValueError(f"secure aggregation: the reply has records {sorted(extra)} that SecAgg+ does not cover")
    trained = {k: a.numpy() for k, a in reply.content[P.ARRAYS].items()}
    clip = float(context.state.config_records[RECORD_KEY_STATE]["clipping_range"])
    shapes = dict(zip(keys, model))
    vector = [np.asarray(trained.get(k, np.zeros_like(shapes[k])), dtype=np.float32) for k in upload]
    for key, arr in zip(upload, vector):
        if not np.all(np.isfinite(arr)) or np.abs(arr).max(initial=0.0) > clip:
            raise ValueError(f"secure aggregation: array {key!r} has values outside [-{clip}, {clip}] (secagg-clip) "
                             "or not finite; SecAgg+ would clip them silently, so this node sends nothing")
    vector.append(np.array([float(k in trained) for k in upload], dtype=np.float32))
    metrics = {k: v for k, v in reply.content[P.METRICS].items() if _in_clear(k) and isinstance(v, (int, float))}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), weight, metrics)
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _in_clear(key: str) -> bool:
    """Whether a metric may travel beside the masked vector: identity, size, timings, losses."""
    return key in P.SECAGG_CLEAR_METRICS or key.startswith("train-loss") or key == "personal-loss"
