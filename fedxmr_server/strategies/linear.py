"""`linear`: the closed-form floor every hashing table carries (`common/linear.py`), through the same app.

Round 1: the nodes send sufficient statistics of their labelled items; the server sums them and solves ridge
regression onto the labels per modality (exactly the centralized solution, unless a client holds more than
`max-client-share` of a modality's items: its sums are then scaled down to that share), maps the label space to the
code length (P) and starts from a random rotation R: round 1's model is the random-hyperplane control. Every later
round is one ITQ iteration: the nodes send Eᵀ·sign(E·Hᵀ) for the current codes, the server takes the orthogonal
Procrustes step.
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
from common.trust import TEXTS_PER_IMAGE, cap_shares
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
        size = self.size_of(msg)
        if P_KEY in self.state.buffers:
            return self._itq_problem(record, size)
        return self._statistics_problem(record, size)

    def _item_bound(self, mod: str, size: float) -> tuple[float, float]:
        """(the most items of `mod` a client of `size` can hold, the largest squared norm one item's normalised
        feature can have under the model the client was sent): LayerNorm output z has |z|² <= d, so the tower
        input w ⊙ z + b has norm <= max|w|·√d + |b|."""
        w, b = self.state.arrays[f"{mod}.norm.weight"], self.state.arrays[f"{mod}.norm.bias"]
        items = size * (TEXTS_PER_IMAGE if mod == "txt" else 1)
        return items, float((np.abs(w).max() * np.sqrt(w.size) + np.linalg.norm(b)) ** 2)

    def _statistics_problem(self, record: dict[str, np.ndarray], size: float) -> str | None:
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
            problem = self._implausible(mod, stats, *self._item_bound(mod, size))
            if problem:
                return problem
        return None

    @staticmethod
    def _implausible(mod: str, stats: FeatureStats, items: float, sq_norm: float) -> str | None:
        """What in `stats` no set of `items` items of squared norm <= `sq_norm` with 0/1 labels can give (the
        bounds are Cauchy-Schwarz: |Σx|² <= n·Σ|x|², |Σ y_c x|² <= Σy_c · Σ|x|²)."""
        trace, tol = float(np.trace(stats.gram)), 1 + 1e-6
        if stats.n > items:
            return f"{mod} statistics over {stats.n:g} items, more than the client's {items:g}"
        if trace > stats.n * sq_norm * tol or np.any(stats.ysum < 0) or np.any(stats.ysum > stats.n * tol):
            return f"{mod} statistics beyond what {stats.n:g} items can sum to (feature norms or label counts)"
        xy_norms = (stats.xy ** 2).sum(axis=0)
        if stats.sum @ stats.sum > stats.n * trace * tol or np.any(xy_norms > stats.ysum * trace * tol):
            return f"{mod} statistics inconsistent with their own second moments"
        return None

    def _itq_problem(self, record: dict[str, np.ndarray], size: float) -> str | None:
        sent = [mod for mod in MODALITIES if f"{mod}-etb" in record]
        if not sent:
            return "no ITQ sums (<mod>-etb) in the ITQ phase"
        for mod in sent:
            want = self.state.arrays[f"{mod}.hash.weight"].shape[::-1]
            if record[f"{mod}-etb"].shape != want:
                return f"{mod}-etb of shape {record[f'{mod}-etb'].shape}, expected {want}"
            if record.get(f"{mod}-quant", np.zeros(0)).shape != (1,):
                return f"{mod}-quant must hold one value"
            items, sq_norm = self._item_bound(mod, size)
            proj = self.state.arrays[f"{mod}.proj.weight"], self.state.arrays[f"{mod}.proj.bias"]
            emb_norm = np.linalg.norm(proj[0], 2) * np.sqrt(sq_norm) + np.linalg.norm(proj[1])
            if np.linalg.norm(record[f"{mod}-etb"]) > items * np.sqrt(want[1]) * emb_norm * (1 + 1e-6):
                return f"{mod}-etb larger than {items:g} items' embeddings against ±1 codes can sum to"
        return None

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        return np.array([self.size_of(m) for m in replies])  # the share of the items, capped by the base class

    def aggregate(self, server_round: int, replies: list[Message], weights: np.ndarray) -> None:
        """Sums of the clients' records, per modality each scaled by its capped share over its share of the sizes of
        the clients that sent that modality (scale 1, exactly, when none is above max-client-share: the sums are then
        the centralized ones)."""
        records = [from_array_record(m.content[P.LINEAR]) for m in replies]
        sizes = self.client_weights(replies)
        for mod in MODALITIES:  # per modality, over the clients that sent its sums
            held = np.array([any(k.startswith(f"{mod}-") for k in r) for r in records])
            if held.any():
                share = sizes * held / (sizes * held).sum()
                scale = np.divide(cap_shares(share, self.cfg.max_client_share), share, out=np.ones_like(share),
                                  where=share > 0)
                for r, f in zip(records, scale):
                    if f != 1.0:
                        r.update({k: v * f for k, v in r.items() if k.startswith(f"{mod}-")})
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
