"""An in-process federation for studies: the same shards, local training and per-key weighted mean as a Flower run,
without Ray or messages, so that a study can look inside a round (every client's update, counterfactual aggregates).

Not a replacement for `flwr run .` (no validation, no per-client evaluation, no node state): the numbers a study
reports as results come from the harness (`scripts/grid.py`); this is for diagnosis and quick dev-only screening.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import RecordDict

from common.config import RunConfig, parse_run_config
from common.data.datasets import backbone_for, concept_count, load_split
from common.features import resolve_cache_dir, split_features
from common.metrics import hamming_recalls, retrieval_recalls
from common.model import XmrModel, load_numpy_state, state_to_numpy, upload_keys
from common.unimodal import agreement_weights
from fedxmr_client.app import _train
from fedxmr_client.methods import client_method
from fedxmr_client.node import NodeShard, _load_shard

Arrays = dict[str, np.ndarray]


@dataclass
class Update:
    """One client's reply: the arrays it trained (the keys of its modalities) and its weight (num-examples)."""

    partition_id: int
    client_type: str
    arrays: Arrays
    weight: float
    stats: dict = field(default_factory=dict)


class Federation:
    """Shards of every node (train) and the dev split, loaded once; `round` runs one round of local training."""

    def __init__(self, run_config: dict, num_partitions: int = 10) -> None:
        torch.set_num_threads(1)
        self.cfg: RunConfig = parse_run_config(run_config)
        self.method = client_method(self.cfg.method)
        self.shards: list[NodeShard] = [
            _load_shard(self.method.data_config(self.cfg, num_partitions),
                        {"partition-id": k, "num-partitions": num_partitions}, "train")
            for k in range(num_partitions)]
        self.backbone = backbone_for(self.cfg.backbone, self.cfg.data_dir, self.cfg.data_keys)
        self.dev = load_split(self.cfg.data_dir, "dev", self.cfg.max_eval_images, data_keys=self.cfg.data_keys,
                              cache_dir=resolve_cache_dir(self.cfg.cache_dir))
        self.dev_feats = split_features(self.dev, self.backbone, resolve_cache_dir(self.cfg.cache_dir))
        torch.manual_seed(self.cfg.seed)  # as the ServerApp initialises the global model
        self.initial: Arrays = state_to_numpy(self.model())

    def model(self, arrays: Arrays | None = None) -> XmrModel:
        model = XmrModel(self.cfg.model_cfg(self.backbone.img_dim, self.backbone.txt_dim,
                                            concepts=concept_count(self.cfg.data_dir, self.cfg.data_keys)))
        if arrays is not None:
            load_numpy_state(model, arrays, partial=True)
        return model

    def local_update(self, k: int, global_arrays: Arrays, server_round: int,
                     content: RecordDict | None = None) -> Update:
        """What node `k` would send: seeded as `fedxmr_client.app.train`, trained by the run's method."""
        shard = self.shards[k]
        model = self.model(global_arrays)
        rng = np.random.default_rng([shard.cfg.seed, shard.partition_id, server_round])
        torch.manual_seed(int(rng.integers(2**31)))
        plan = self.method.begin(shard, model, content if content is not None else RecordDict(), {})
        if not plan.train:
            return Update(k, shard.client_type, {}, float(len(shard.data.images)))
        stats = self.method.fit(model, plan, lambda: _train(model, plan.shard, self.method.train_config(shard.cfg), rng,
                                                             personal=False, plan=plan))
        state = model.state_dict()
        arrays = {key: state[key].detach().numpy().copy() for key in upload_keys(state, shard.modalities)
                  if key not in plan.frozen}
        return Update(k, shard.client_type, arrays, float(len(plan.shard.data.images)), stats)

    def dev_scores(self, arrays: Arrays, hashing: bool = False) -> dict[str, float]:
        """rsum (and hash rsum) of `arrays` on dev, embeddings only: what the server selects on."""
        model = self.model(arrays)
        (ie, ic), (te, tc) = (model.encode(m, self.dev_feats[m]) for m in ("img", "txt"))
        out = retrieval_recalls(ie @ te.T, self.dev.caption_image)
        if hashing:
            out["hash_rsum"] = hamming_recalls(ic, tc, self.dev.caption_image)["rsum"]
        return out


def weighted_mean(global_arrays: Arrays, updates: list[Update],
                  weight_of: Callable[[Update, str], float] = lambda u, key: u.weight) -> Arrays:
    """The per-key weighted mean of the base strategy: over the clients that sent the key (weights renormalised per
    key); a key nobody sent keeps its global value. `weight_of(update, key)` allows per-key counterfactuals."""
    out = {}
    for key, old in global_arrays.items():
        pairs = [(weight_of(u, key), u.arrays[key]) for u in updates if key in u.arrays]
        total = sum(w for w, _ in pairs)
        out[key] = old if total <= 0 else sum(w * a for w, a in pairs) / total
    return out


def agreement_weighted(global_arrays: Arrays, updates: list[Update]) -> Arrays:
    """`unialign`'s server aggregation (agreement weighting), for the in-process screen."""
    weights, _ = agreement_weights(global_arrays, [u.arrays for u in updates], np.array([u.weight for u in updates]),
                                   np.array([u.client_type == "paired" for u in updates]))
    by_id = {u.partition_id: w for u, w in zip(updates, weights)}
    return weighted_mean(global_arrays, updates, lambda u, key: by_id[u.partition_id])


def _untrained(fed: Federation, k: int, g: Arrays) -> Update:
    shard = fed.shards[k]
    return Update(k, shard.client_type, {key: g[key] for key in upload_keys(g, shard.modalities)},
                  float(len(shard.data.images)))


def screen(run_config: dict, rounds: int, frozen_unimodal: bool = False,
           hash_curve: list[float] | None = None) -> list[float]:
    """Dev rsum of the global model after each of `rounds` rounds of the run config's method (FedAvg aggregation,
    or `unialign`'s agreement weighting); `hash_curve`, if given, gets the dev Hamming rsum of each round.
    `frozen_unimodal`: a control, unimodal clients send the global arrays of their tower back untrained (they weigh
    in the mean but move nothing: a smaller server step on each tower)."""
    fed = Federation(run_config)
    agreement = fed.cfg.method == "unialign" and fed.cfg.options.weighting == "agreement"
    g, curve = fed.initial, []
    for r in range(1, rounds + 1):
        updates = [_untrained(fed, k, g) if frozen_unimodal and fed.shards[k].client_type != "paired"
                   else fed.local_update(k, g, r) for k in range(len(fed.shards))]
        g = agreement_weighted(g, updates) if agreement else weighted_mean(g, updates)
        scores = fed.dev_scores(g, hashing=hash_curve is not None)
        curve.append(scores["rsum"])
        if hash_curve is not None:
            hash_curve.append(scores["hash_rsum"])
    return curve


def _value(text: str) -> object:
    """A command-line value: a JSON number or boolean, else the text itself (e.g. "1,0,0")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    """python -m scripts.inproc ROUNDS OUT.json [--frozen-unimodal] key=value ... (run-config overrides; dev
    only)."""
    rounds, out, *pairs = sys.argv[1:]
    frozen = "--frozen-unimodal" in pairs
    pairs = [p for p in pairs if p != "--frozen-unimodal"]
    overrides = {k: _value(v) for k, v in (p.split("=", 1) for p in pairs)}
    run_config = {"partitioner": "dirichlet", "partition-beta": 0.1, "modality-mix": "0.5,0.25,0.25",
                  "data-dir": "../shared/data/flickr8k", "cache-dir": ".cache/features"} | overrides
    start, hashed = time.perf_counter(), []
    curve = screen(run_config, int(rounds), frozen, hashed)
    best = int(np.argmax(curve))
    result = {"run-config": run_config, "frozen-unimodal": frozen, "dev-rsum": curve, "dev-hash-rsum": hashed,
              "best": max(curve), "best-round": best + 1, "hash-at-best": hashed[best],
              "seconds": time.perf_counter() - start}
    Path(out).write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
