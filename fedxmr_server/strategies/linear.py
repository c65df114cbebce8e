"""`linear`: the closed-form floor every hashing table carries (`common/linear.py`), through the same app.

Round 1: the nodes send sufficient statistics of their labelled items; the server sums them and solves ridge
regression onto the labels per modality (exactly the centralized solution), maps the label space to the code length
(P) and starts from a random rotation R: round 1's model is the random-hyperplane control. Every later round is one
ITQ iteration: the nodes send Eᵀ·sign(E·Hᵀ) for the current codes, the server takes the orthogonal Procrustes step.
`num-server-rounds` = 1 + the ITQ iterations; the reported round is selected on dev like every method's.
The model is an ordinary `XmrModel`: the towers' projection holds the ridge map (label space in the first C
dimensions, the adapter left at the identity) and the hash head holds (P·R)ᵀ, so evaluation, search and export need
nothing of their own.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log

from common import protocol as P
from common.linear import FeatureStats, itq_rotation, label_to_bits, random_rotation, solve_ridge
from common.model import MODALITIES
from fedxmr_server.strategies.base import XmrStrategy, from_array_record

P_KEY, R_KEY = "linear-p", "linear-r"
MAX_VALUE = 1e30  # a sum beyond this is no honest statistic of float32 features, and would overflow the total


class LinearXmr(XmrStrategy):
    name = "linear"
    description = ("linear: ridge regression onto the labels from the clients' summed statistics (round 1), then one "
                   "federated ITQ iteration per round; codes sign(x·W·P·R)")

    def payload(self, client: str, server_round: int, kind: str) -> RecordDict:
        """The base payload, plus the phase: the nodes follow the server's state, not the round number, so a first
        round without usable replies is simply asked again."""
        content = super().payload(client, server_round, kind)
        content[P.CONFIG][P.LINEAR_PHASE] = "itq" if P_KEY in self.state.buffers else "statistics"
        return content

    def reply_problem(self, msg: Message) -> str | None:
        problem = self._base_problem(msg, arrays_required=False)
        if problem:
            return problem
        if P.LINEAR not in msg.content.array_records:
            return f"no '{P.LINEAR}' record"
        record = from_array_record(msg.content[P.LINEAR])
        bad = sorted(k for k, v in record.items() if v.dtype.kind != "f" or not np.all(np.isfinite(v))
                     or np.abs(v).max(initial=0.0) > MAX_VALUE)
        if bad:
            return f"not finite floats below {MAX_VALUE:g} in {bad}"
        return self._itq_problem(record) if P_KEY in self.state.buffers else self._statistics_problem(record)

    def _statistics_problem(self, record: dict[str, np.ndarray]) -> str | None:
        sent = [mod for mod in MODALITIES if f"{mod}-n" in record]
        if not sent and not any(k.endswith("-etb") for k in record):
            return None  # a node without labelled items (image-only on captions' labels) has nothing to add
        if not sent:
            return "ITQ sums sent while the server asked for feature statistics"
        for mod in sent:
            try:
                stats = FeatureStats.from_arrays({k[len(mod) + 1:]: v for k, v in record.items()
                                                  if k.startswith(f"{mod}-")})
            except (KeyError, ValueError) as exc:
                return f"{mod} statistics: {exc}"
            want = (self.state.arrays[f"{mod}.proj.weight"].shape[1], self.concepts)
            if stats.xy.shape != want:
                return f"{mod} statistics of shape {stats.xy.shape}, expected {want} (features x labels)"
        return None

    def _itq_problem(self, record: dict[str, np.ndarray]) -> str | None:
        sent = [mod for mod in MODALITIES if f"{mod}-etb" in record]
        if not sent:
            return "no ITQ sums (<mod>-etb) in the ITQ phase"
        for mod in sent:
            want = self.state.arrays[f"{mod}.hash.weight"].shape[::-1]
            if record[f"{mod}-etb"].shape != want:
                return f"{mod}-etb of shape {record[f'{mod}-etb'].shape}, expected {want}"
            if record.get(f"{mod}-quant", np.zeros(0)).shape != (1,):
                return f"{mod}-quant must hold one value"
        return None

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        return np.ones(len(replies))  # sums, not means: every reply counts by the items it summed over

    def aggregate(self, server_round: int, replies: list[Message], weights: np.ndarray) -> None:
        records = [from_array_record(m.content[P.LINEAR]) for m in replies]
        if P_KEY not in self.state.buffers:
            self._solve(records)
        else:
            self._rotate(records)

    def _solve(self, records: list[dict[str, np.ndarray]]) -> None:
        arrays, covs, counts = dict(self.state.arrays), [], []
        embed_dim = arrays["img.proj.weight"].shape[0]
        if embed_dim < self.concepts:
            raise ValueError(f"run config key 'embed-dim' = {embed_dim}: method linear needs at least the number of "
                             f"labels ({self.concepts})")
        maps = {}
        for mod in MODALITIES:
            parts = [FeatureStats.from_arrays({k[len(mod) + 1:]: v for k, v in r.items() if k.startswith(f"{mod}-")})
                     for r in records if f"{mod}-n" in r]
            if not parts:  # the model is kept; the next round asks for statistics again
                log(WARNING, "linear: no usable reply holds labelled %s items; statistics are asked for again", mod)
                return
            total = sum(parts[1:], parts[0])
            maps[mod] = solve_ridge(total, self.cfg.options.ridge)
            covs.append(maps[mod].cov * total.n)
            counts.append(total.n)
        rng = np.random.default_rng(self.cfg.seed)
        p = label_to_bits(sum(covs) / sum(counts), self.cfg.hash_bits, rng)
        rotation = random_rotation(self.cfg.hash_bits, rng)
        for mod, ridge in maps.items():
            weight = np.zeros_like(arrays[f"{mod}.proj.weight"])
            weight[:self.concepts] = ridge.weight.T
            bias = np.zeros_like(arrays[f"{mod}.proj.bias"])
            bias[:self.concepts] = ridge.bias
            arrays |= {f"{mod}.proj.weight": weight.astype(np.float32), f"{mod}.proj.bias": bias.astype(np.float32),
                       f"{mod}.norm.weight": np.ones_like(arrays[f"{mod}.norm.weight"]),
                       f"{mod}.norm.bias": np.zeros_like(arrays[f"{mod}.norm.bias"]),
                       f"{mod}.adapter.up.weight": np.zeros_like(arrays[f"{mod}.adapter.up.weight"]),
                       f"{mod}.adapter.up.bias": np.zeros_like(arrays[f"{mod}.adapter.up.bias"]),
                       f"{mod}.hash.bias": np.zeros_like(arrays[f"{mod}.hash.bias"])}
        self.state.buffers |= {P_KEY: p, R_KEY: rotation}
        self.state.arrays = arrays
        self._set_rotation(rotation)
        log(INFO, "linear: ridge solved over %s labelled items (img, txt); random rotation", counts)

    def _rotate(self, records: list[dict[str, np.ndarray]]) -> None:
        p = self.state.buffers[P_KEY]
        btv = sum(r[f"{mod}-etb"][:self.concepts].T @ p for r in records for mod in MODALITIES if f"{mod}-etb" in r)
        quant = sum(float(r[f"{mod}-quant"][0]) for r in records for mod in MODALITIES if f"{mod}-quant" in r)
        self.state.meta.setdefault("linear-quantisation", []).append(quant)
        log(INFO, "linear: ITQ step, quantisation loss of the codes sent %.1f", quant)
        rotation = itq_rotation(np.asarray(btv))
        self.state.buffers[R_KEY] = rotation
        self._set_rotation(rotation)

    def _set_rotation(self, rotation: np.ndarray) -> None:
        """A new arrays dict, never the old one changed in place: the evaluator caches a gallery by the dict's
        identity."""
        h = (self.state.buffers[P_KEY] @ rotation).T  # bits x C
        arrays = dict(self.state.arrays)
        for mod in MODALITIES:
            weight = np.zeros_like(arrays[f"{mod}.hash.weight"])
            weight[:, :self.concepts] = h
            arrays[f"{mod}.hash.weight"] = weight.astype(np.float32)
        self.state.arrays = arrays
