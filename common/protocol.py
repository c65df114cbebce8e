"""The message protocol between the ServerApp and the ClientApps: record names, config and metric keys.

One place for the record names and the config and metric keys both sides rely on (a method's own metric keys, e.g.
`rcsr-consistency`, live with that method).
No Flower here.
"""

from __future__ import annotations

import numpy as np

# what selects the reported round (run config `select-on`): per metric, the dev keys of the global model and the
# per-client dev summary keys that stand in without one (the score is their mean), and how final.json's
# "selected-on" words each case (global model, per-client)
SELECTION = {
    "rsum": (("rsum",), ("all-global-mean",), ("dev rsum", "mean per-client dev score")),
    "map": (("emb_smap_i2t", "emb_smap_t2i"), ("all-global-smap_i2t-mean", "all-global-smap_t2i-mean"),
            ("dev continuous label MAP", "mean per-client dev Hamming MAP")),
    "hash-map": (("hash_smap_i2t", "hash_smap_t2i"), ("all-global-smap_i2t-mean", "all-global-smap_t2i-mean"),
                 ("dev Hamming label MAP", "mean per-client dev Hamming MAP")),
}

# records of a RecordDict
ARRAYS = "arrays"  # ArrayRecord: model arrays (server -> node: the node's model; node -> server: what it trained)
CONFIG = "config"  # ConfigRecord, server -> node
METRICS = "metrics"  # MetricRecord, node -> server
GALLERY = "gallery"  # ArrayRecord, server -> node (evaluate): the shared dev/test gallery
PROTOTYPES = "prototypes"  # ArrayRecord, both ways: {mod: (1 + C, d) table, f"{mod}-count": (1 + C,) counts}
MEMORY = "memory"  # ArrayRecord, both ways (FedCAFE): {"memory": (C, bits) rows, "count": (C,) items per row}
LINEAR = "linear"  # ArrayRecord, node -> server (method linear): feature statistics (round 1), ITQ sums after

# config keys (server -> node)
SERVER_ROUND = "server-round"
BEST_ROUND = "best-round"  # the round selected on dev so far (-1: none); nodes keep their state of that round
LINEAR_PHASE = "linear-phase"  # method linear: "statistics" until the ridge map is solved, then "itq"
DP_NOISE = "dp-noise-multiplier"  # client-side DP (common/privacy.py): the noise multiplier z of this run
DP_SAMPLED = "dp-sampled"  # ... and the number m of clients asked this round (each adds 1/m of the noise variance)
SECAGG_KEYS = "secagg-keys"  # secure aggregation (fedxmr_client/secagg.py): the names of the model's arrays, in the
# order the FitIns carries them, space-separated
SECAGG_UPLOAD = "secagg-upload"  # ... the arrays every node's masked vector holds, in order (one it did not train is
# zeros, and a 0 in the indicator vector that closes the list)
SECAGG_WEIGHT = "secagg-weight"  # ... and the node's weight in the mean, an integer in 1..SECAGG_MAX_WEIGHT
SECAGG_MAX_WEIGHT = 2**16
# the metrics a node sends in the clear beside its masked vector: who it is, its size, losses and timings (never a
# statistic of its model, such as SENT_CHECKSUM)
SECAGG_CLEAR_METRICS = ("num-examples", "partition-id", "client-type", "has-img", "has-txt", "trained",
                        "train-seconds", "load-seconds")
RUN_KEY = "run-key"  # names the run for the nodes' on-disk state: the same for a resumed run, new for a new one
SPLIT_KEY = "split"  # which local split an evaluate message scores: "dev" every round, "test" once at the end
SPLIT = {"train": "train", "evaluate": "dev", "test": "test"}  # message kind -> split

# gallery keys: embeddings and ±1 codes (`<mod>-emb`, `<mod>-code`) of the model the node was sent, or raw backbone
# features (`<mod>-feat`) for nodes that embed them, the caption -> image index and the DERIVED labels per image
CAPTION_IMAGE = "caption-image"
LABEL = "label"

# message kinds beyond Flower's train/evaluate: `query` asks a node who it is, once per node and server process, before
# its first message (node ids are new in a resumed run); the reply's metrics carry PARTITION_ID, NUM_PARTITIONS,
# CLIENT_TYPE and HAS, read from the node's configs (no data loaded)

# metric keys (node -> server)
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
CLIENT_TYPE = "client-type"
HAS = {"img": "has-img", "txt": "has-txt"}
UPLOAD_BYTES = "upload-bytes"
TRAINED = "trained"  # 0: by its method's plan the node did not train this round (and sent nothing, or its arrays as
# they arrived: unialign-train-parts = none)
RECEIVED_CHECKSUM = "received-checksum"  # checksum() of the arrays a node was sent
SENT_CHECKSUM = "sent-checksum"  # checksum() of the arrays a node sends
NOT_AVERAGED = (PARTITION_ID, CLIENT_TYPE, RECEIVED_CHECKSUM, SENT_CHECKSUM, TRAINED)  # per-client facts, not means


def checksum(arrays: dict) -> float:
    """A cheap fingerprint of a set of arrays (float64 sum of every value, key by key in sorted order): two nodes
    sent different models have different checksums; the same arrays give the same value on both ends."""
    return float(sum(np.asarray(arrays[k], dtype=np.float64).sum() for k in sorted(arrays)))
