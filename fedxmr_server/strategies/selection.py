"""Mixin of `XmrStrategy`: which round is reported (the best dev value of the `select-on` metric, with copies of
that round's models) and the checkpoint that holds it beside the strategy's state."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common import protocol as P
from fedxmr_server.strategies.state import Checkpoint, StrategyState, capture_rng, restore_rng

Arrays = dict[str, np.ndarray]


@dataclass
class Selection:
    """The best round so far and copies of its models (global and per-client)."""

    round: int = -1
    score: float = -np.inf
    arrays: Arrays = field(default_factory=dict)
    clients: dict[str, Arrays] = field(default_factory=dict)


class SelectsOnDev:
    """Expects `self.cfg`, `self.state` (StrategyState), `self.best` (Selection), `self.has_global_model` and
    `self.last_evaluate` (the round's per-client dev evaluation)."""

    def selection_score(self, dev: dict[str, float] | None) -> float:
        """The dev value that selects the reported round (`select-on`; MAPs: the mean of i2t and t2i). Without a
        global model the per-client dev evaluation stands in (mean R@K score, or mean per-client Hamming MAP)."""
        metric = self.cfg.selection_metric()
        dev_keys, client_keys, _ = P.SELECTION[metric]
        if not self.has_global_model:  # `last_evaluate` is reset every round, so a stale per-client score never counts
            summary, keys = self.last_evaluate.get("summary", {}), list(client_keys)
        else:
            summary, keys = dev or {}, list(dev_keys)
        missing = [k for k in keys if k not in summary]
        if summary and missing:
            raise ValueError(f"run config key 'select-on' = {metric!r}: the dev scores have no {missing} (labels?)")
        return float(np.mean([summary[k] for k in keys])) if summary else -np.inf

    def _select(self, server_round: int, dev: dict[str, float] | None) -> None:
        """Keep the round if its dev score (`selection_score`) is the best so far (ties keep the earlier round); a
        round without a dev score this round (`eval-every` / `client-eval-every`) is never selected."""
        score = self.selection_score(dev)
        if score > self.best.score:
            self.best = Selection(server_round, float(score), {k: v.copy() for k, v in self.state.arrays.items()},
                                  {n: {k: v.copy() for k, v in a.items()} for n, a in self.state.clients.items()})

    def checkpoint(self) -> Checkpoint:
        """The run as of the last completed round (state, selection, RNG states): `start(resume=...)` continues
        from it."""
        best = StrategyState(self.best.round, self.best.arrays, self.best.clients, meta={"score": self.best.score})
        return Checkpoint(self.state.round, self.state, best, capture_rng())

    def _restore(self, ckpt: Checkpoint) -> None:
        self.state = ckpt.state
        self.best = Selection(ckpt.best.round, float(ckpt.best.meta["score"]), ckpt.best.arrays, ckpt.best.clients)
        restore_rng(ckpt.rng)
