"""The server's side of client-level DP: the noise multiplier for a target ε, the per-round release (clip, equal
weights, Gaussian noise; `common.privacy`), and Flower's RDP accountant over the rounds released.

Accounting: Flower's `RdpAccountant` (over Google's `dp-accounting`) with `sampling_method = no-amplification` and
neighbouring federations that differ by one client's whole data (`add-or-remove-one`), as Flower's own fixed-clipping
strategies require. No amplification by sampling is claimed: ε holds however the clients of a round were picked
(Flower samples a fixed number without replacement, which the Poisson analysis does not cover), so with
`fraction-train` < 1 it is an upper bound. Each round in which an aggregate is released is one Gaussian release; a
round with no usable update releases nothing. A run's ε covers every round it ran, not only the round selected on dev
(selection uses the server's own dev split: post-processing).

Why not wrap the strategy in Flower's `DifferentialPrivacyServerSideFixedClipping`: the wrapper needs Flower's own
round loop and `FedAvg.aggregate_train` (for accounting), while fedxmr's strategies run their own loop (selection on
dev, checkpoints, the quorum rule) and aggregate per key (a text-only client sends no image tower). The release below
is the same algorithm (clip each update to C, equal weights, noise std z·C/m on the mean) and the accountant is
Flower's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp import RdpAccountant

from common import protocol as P
from common.config import ConfigError, RunConfig
from common.privacy import Arrays, clip_update, fresh_rng, noisy_mean

ACCOUNTING = "rdp (Flower's RdpAccountant), add-or-remove-one client, no amplification by sampling"


def _accountant(delta: float, population: int) -> RdpAccountant:
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def epsilon_after(noise_multiplier: float, releases: int, delta: float, population: int, sampled: int) -> float:
    """ε after `releases` Gaussian releases with this noise multiplier (Flower's accountant)."""
    acc = _accountant(delta, population)
    acc.compose(GaussianPrivacyEvent(noise_multiplier, min(sampled, population), population), releases)
    return acc.get_epsilon(delta)


def noise_for_epsilon(target: float, releases: int, delta: float, population: int, sampled: int) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ε after `releases` rounds is at most `target`."""
    lo, hi = 1e-3, 1.0
    while epsilon_after(hi, releases, delta, population, sampled) > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"dp-target-epsilon = {target}: no noise multiplier up to 1e6 reaches it")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon_after(mid, releases, delta, population, sampled) <= target else (mid, hi)
    return hi


def default_delta(population: int) -> float:
    """δ when `dp-delta` is 0: well below 1/clients (a mechanism that publishes one random client's data outright is
    (0, 1/clients)-DP, so δ near 1/clients promises little), at most 1e-5."""
    return min(1e-5, 0.1 / population)


class ClientLevelDp:
    """The release and the ledger of one run. `start(population, sampled)` fixes δ and the noise multiplier once the
    federation's size is known (round 1); the ledger lives in `meta` (the strategy's checkpointed state), so a
    resumed run goes on spending from where it stopped."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.rng = fresh_rng()
        self.noise_multiplier = cfg.dp_noise_multiplier
        self.delta = cfg.dp_delta
        self.sampled = 0  # this round's train messages
        self.last: dict[str, Any] = {}

    def start(self, meta: dict[str, Any], population: int, sampled: int) -> None:
        book = meta.setdefault("privacy", {})
        if "noise-multiplier" not in book:
            if population < 2:
                raise ConfigError(f"client-level DP needs at least 2 clients to hide one among; this federation has "
                                  f"{population}")
            delta = self.cfg.dp_delta or default_delta(population)
            z = self.cfg.dp_noise_multiplier or noise_for_epsilon(
                self.cfg.dp_target_epsilon, self.cfg.num_server_rounds, delta, population, sampled)
            book |= {"noise-multiplier": z, "delta": delta, "population": population, "clip": self.cfg.dp_clip,
                     "side": self.cfg.dp_side, "accounting": ACCOUNTING, "releases": []}
        self.noise_multiplier, self.delta = float(book["noise-multiplier"]), float(book["delta"])
        self.sampled = sampled

    def client_config(self) -> dict[str, float | int]:
        """What a train message tells a node under client-side DP: the noise multiplier and this round's number of
        sampled clients m (the node draws N(0, (z·C)²/m) and takes m as at most its federation's size)."""
        if self.cfg.dp_side != "client":
            return {}
        return {P.DP_NOISE: self.noise_multiplier, P.DP_SAMPLED: self.sampled}

    def release(self, start: Arrays, client_arrays: list[Arrays], asked: int, meta: dict[str, Any]) -> Arrays:
        """The new global model from this round's updates, and one release in the ledger."""
        book = meta["privacy"]
        bound, z = self.cfg.dp_clip, self.noise_multiplier
        sent = [a for a in client_arrays if a]
        if not sent:  # nothing to release (every usable reply was empty): the model stays, no ε is spent
            return start
        if self.cfg.dp_side == "server":
            clipped = [clip_update(start, a, bound) for a in sent]
            deltas, norms = [d for d, _ in clipped], [n for _, n in clipped]
            effective, noise_std = z, z * bound / asked
        else:  # the clients clipped and noised; an array carries the noise of the clients that sent it
            deltas = [{k: np.asarray(v, np.float64) - np.asarray(start[k], np.float64) for k, v in a.items()}
                      for a in sent]
            norms, noise_std = [], 0.0
            senders = min(sum(k in a for a in sent) for k in set().union(*sent))
            effective = z * float(np.sqrt(senders / asked))
        out = noisy_mean(start, deltas, asked, noise_std, self.rng)
        self._ledger(book, effective, asked, norms)
        return out

    def release_sum(self, start: Arrays, summed: Arrays, fewest_senders: int, asked: int,
                    meta: dict[str, Any]) -> Arrays:
        """`release` for client-side DP under secure aggregation, where the server holds only the sum of the clients'
        clipped, noised updates per array (`summed`) and how many clients sent the array with the fewest senders."""
        if not summed:
            return start
        out = noisy_mean(start, [summed], asked, 0.0, self.rng)
        self._ledger(meta["privacy"], self.noise_multiplier * float(np.sqrt(fewest_senders / asked)), asked, [])
        return out

    def _ledger(self, book: dict[str, Any], effective: float, asked: int, norms: list[float]) -> None:
        """One release in the ledger, and this round's report (`last`)."""
        book["releases"].append({"noise-multiplier": effective, "sampled": asked})
        self.last = {"epsilon": self.epsilon(book), "delta": self.delta, "noise-multiplier": effective,
                     "clip": self.cfg.dp_clip, "denominator": asked,
                     "clipped": sum(n > self.cfg.dp_clip for n in norms) if norms else None}

    def epsilon(self, book: dict[str, Any]) -> float:
        """ε spent by the releases in the ledger, at δ."""
        acc = _accountant(self.delta, int(book["population"]))
        for r in book["releases"]:
            if r["noise-multiplier"] <= 0:
                return float("inf")
            acc.compose(GaussianPrivacyEvent(r["noise-multiplier"], min(int(r["sampled"]), int(book["population"])),
                                             int(book["population"])))
        return acc.get_epsilon(self.delta) if book["releases"] else 0.0

    def report(self, meta: dict[str, Any]) -> dict[str, Any]:
        """What final.json says about the run's privacy."""
        book = meta.get("privacy", {})
        if not book:
            return {}
        return {k: book[k] for k in ("noise-multiplier", "delta", "population", "clip", "side", "accounting")} | {
            "rounds-released": len(book["releases"]), "epsilon": self.epsilon(book)}
