"""The node side of secure aggregation: a ClientApp mod that runs Flower's `secaggplus_mod` on the train messages of
a SecAgg+ round (those carrying its config record) and passes every other message through unchanged.

Flower's mod speaks the legacy FitIns / FitRes; the ClientApp speaks fedxmr's records. So inside the round the mod
calls `_as_fedxmr`: the FitIns (the model as an ordered list, its names in `P.SECAGG_KEYS`) becomes the usual train
message, the ClientApp trains, and the reply becomes a FitRes: every array of the model in that order (zeros for one
the node did not train), then an indicator vector (1 per array it trained), weighted by the server-assigned
`P.SECAGG_WEIGHT`. The mod masks that vector; the arrays never leave the node in the clear (the mod clears them), only
the metrics do. A value outside [-secagg-clip, secagg-clip] would be clipped by SecAgg+'s quantisation without a
word: the node refuses to send it instead, naming the array.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from common import protocol as P


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for the train messages of a secure round; everything else goes straight to the ClientApp."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _as_fedxmr(m, c, call_next))


def _as_fedxmr(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train on a FitIns as on a fedxmr train message; answer the vector SecAgg+ masks, as a FitRes."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config.pop(P.SECAGG_KEYS)).split()
    weight = int(config.pop(P.SECAGG_WEIGHT))
    model = parameters_to_ndarrays(fitins.parameters)
    if len(model) != len(keys) or not 1 <= weight <= P.SECAGG_MAX_WEIGHT:
        raise ValueError(f"secure aggregation: {len(model)} arrays for {len(keys)} names, or weight {weight} outside "
                         f"1..{P.SECAGG_MAX_WEIGHT}; this node sends nothing")
    msg.content = RecordDict({P.CONFIG: ConfigRecord(config), P.ARRAYS: ArrayRecord({k: Array(a) for k, a in zip(keys, model)})})
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(f"train failed: {reply.error.reason}")
    extra = set(reply.content.array_records) - {P.ARRAYS}
    if extra:  # a method that sends more than weights is refused at parse time; never send it unmasked
        raise ValueError(f"secure aggregation: the reply has records {sorted(extra)} that SecAgg+ does not cover")
    trained = {k: a.numpy() for k, a in reply.content[P.ARRAYS].items()}
    clip = float(context.state.config_records[RECORD_KEY_STATE]["clipping_range"])
    vector = [np.asarray(trained.get(k, np.zeros_like(sent)), dtype=np.float32) for k, sent in zip(keys, model)]
    for key, arr in zip(keys, vector):
        if not np.all(np.isfinite(arr)) or np.abs(arr).max(initial=0.0) > clip:
            raise ValueError(f"secure aggregation: array {key!r} has values outside [-{clip}, {clip}] (secagg-clip) "
                             "or not finite; SecAgg+ would clip them silently, so this node sends nothing")
    vector.append(np.array([float(k in trained) for k in keys], dtype=np.float32))
    metrics = {k: v for k, v in reply.content[P.METRICS].items() if isinstance(v, (int, float))}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), weight, metrics)
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
