"""RCSR — Retrieval-Centric Semantic Routing (Zhou et al., arXiv 2604.22885), rebuilt from the paper's description
and the partial released code (see `../shared/notes/methods.md` §1 and docs/METHODS.md).

Per round:
1. every train message carries the global image/text prototype tables (record `prototypes`; none in round 1);
2. clients anchor to them, train, and reply with their own prototypes and a *measured* retrieval consistency
   (on images they held out); see `fedxmr_client/methods/rcsr.py`;
3. `client_weights` (no side effects): per client a token of prototype means + standardised statistics
   (consistency, held-out pair recall, relative loss, size, modality mask, per-tower update norms and cosine to the
   node's previous update, both computed here from the arrays); the router (`rcsr-router`) gives r, the minimax game gives m; the weight is
   num-examples * r * m, renormalised per key by the base class over the clients that sent the key;
4. `update_state`, once the weights are accepted: the global prototypes are fused from the clients' with weights
   r * m (the row counts already carry the clients' sizes; EMA `rcsr-proto-ema`), the minimax mixture and each node's previous update are stored, and the learned
   router takes `rcsr-router-steps` Adam steps on this round's set (its weights for this round were already fixed,
   with the network in eval mode).
A client whose statistics are missing or not finite gets weight 0 and is logged; the round goes on.
Fixed quirks of the released code: the prototype EMA ran twice per round; router dropout was active when weights
were produced; the image/text update-norm *ratio* exploded for unimodal clients (here: two log-norms with a
modality mask); a unimodal client's missing prototype was a copy of the global one (here: zeros + mask); absent
modalities' zero updates diluted the average (here: per-key renormalisation); the router's target already held
the current round's fusion (here: the previous global prototypes).
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.common.logger import log

from common import protocol as P
from common.config import RunConfig
from common.method_config import RcsrSection
from common.prototypes import MODS
from common.router import (STAT_KEYS, Minimax, RouterNet, consistency_weights, learned_router_weights,
                           standardise, train_router)
from common.trust import REL_LOSS_MAX, bounded_fraction, bounded_loss
from fedxmr_server.strategies.base import XmrStrategy, from_array_record
from fedxmr_server.strategies.prototypes import (Tables, client_prototypes, fuse_into, global_prototypes,
                                                  prototype_record, table_rows)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else np.nan


@dataclass(frozen=True)
class _Plan:
    """Everything one round's weighting computes from the replies and the state, before anything is stored."""

    weights: np.ndarray
    stats: np.ndarray
    protos: list[dict]
    problems: list[str | None]
    clean: list[int]
    tokens: np.ndarray
    router: np.ndarray
    minimax: np.ndarray
    minimax_q: dict[str, float]
    deltas: dict[str, np.ndarray]
    losses: np.ndarray  # per reply, bounded by the client's own previous loss


class RcsrXmr(XmrStrategy):
    name = "rcsr"
    description = ("RCSR: prototype exchange, measured consistency, semantic-router x minimax weighting, "
                   "per-key renormalised aggregation")

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.opts: RcsrSection = cfg.options  # type: ignore[assignment]

    def prototypes(self) -> Tables:
        return global_prototypes(self.state.buffers)

    def payload(self, client: str, server_round: int, kind: str) -> RecordDict:
        content = super().payload(client, server_round, kind)
        protos = self.prototypes()
        if kind == "train" and protos:
            content[P.PROTOTYPES] = prototype_record(protos)
        return content

    # ---- per-client statistics -----------------------------------------------------------------------------------
    def _delta_stats(self, client: str, arrays: dict[str, np.ndarray]) -> tuple[dict[str, float], np.ndarray]:
        """Update geometry, measured here from what the client sent: per-tower log-norms and the cosine to the
        client's previous update (kept as float16 in the buffers by `update_state`). Returns the stats and the
        flat update."""
        delta = {k: v.astype(np.float64) - self.state.arrays[k] for k, v in arrays.items()}
        out = {}
        for m in MODS:
            parts = [d.ravel() for k, d in sorted(delta.items()) if k.startswith(f"{m}.")]
            out[f"log-norm-{m}"] = float(np.log1p(np.linalg.norm(np.concatenate(parts)))) if parts else np.nan
        flat = np.concatenate([d.ravel() for _, d in sorted(delta.items())])
        prev = self.state.buffers.get(f"prev-delta/{client}")
        out["cos-prev"] = _cos(flat, prev.astype(np.float64)) if prev is not None and prev.shape == flat.shape \
            else np.nan
        return out, flat

    def _stats(self, replies: list[Message]) -> tuple[np.ndarray, list[dict], list[str | None], dict, np.ndarray]:
        globals_ = self.prototypes()
        rows, protos, problems, deltas = [], [], [], {}
        history = self.state.meta.get("losses", {})  # each client's last bounded loss (`common.trust.bounded_loss`)
        losses = np.array([bounded_loss(float(m.content[P.METRICS].get("train-loss", np.nan)),
                                        history.get(self.client_of(m))) for m in replies])
        groups = [(int(m.content[P.METRICS].get("has-img", 1)), int(m.content[P.METRICS].get("has-txt", 1)))
                  for m in replies]
        for i, msg in enumerate(replies):
            mm = msg.content[P.METRICS]
            client = self.client_of(msg)
            tables, problem = client_prototypes(msg, self.cfg.embed_dim, table_rows(self.state.buffers),
                                                self.size_of(msg))
            geometry, deltas[client] = self._delta_stats(client, from_array_record(msg.content[P.ARRAYS]))
            peers = [losses[j] for j in range(len(replies)) if groups[j] == groups[i] and np.isfinite(losses[j])]
            rel = losses[i] / np.mean(peers) if peers and np.mean(peers) > 0 else np.nan
            row = {"consistency": bounded_fraction(float(mm.get("rcsr-consistency", np.nan))),
                   "pair-recall": bounded_fraction(float(mm.get("rcsr-pair-recall", np.nan))),
                   "rel-loss": min(rel, REL_LOSS_MAX), "log-examples": float(np.log(self.size_of(msg))),
                   "has-img": float(groups[i][0]), "has-txt": float(groups[i][1]), **geometry}
            for m in MODS:
                own, glob = tables.get(m), globals_.get(m)
                row[f"cos-global-{m}"] = _cos(own[0][0], glob[0][0]) if own and glob else np.nan
            if problem is None and not np.isfinite(losses[i]):
                problem = "train-loss is not finite"
            if problem is None and globals_ and "rcsr-consistency" in mm and not np.isfinite(row["consistency"]):
                problem = "rcsr-consistency is not finite"
            if problem is None and globals_ and "rcsr-consistency" not in mm:
                problem = "no rcsr-consistency although global prototypes were sent"
            rows.append([row[k] for k in STAT_KEYS])
            protos.append(tables)
            problems.append(problem)
        return np.array(rows, dtype=np.float64), protos, problems, deltas, losses

    # ---- weighting ------------------------------------------------------------------------------------------------
    def _router_net(self, token_dim: int) -> RouterNet:
        """The router from the state buffers; the first time a seeded fresh one (without touching the global RNG)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            net = RouterNet(token_dim)
        saved = {k[len("router/"):]: v for k, v in self.state.buffers.items() if k.startswith("router/")}
        if saved:
            net.load_state_dict({k: torch.as_tensor(v) for k, v in saved.items()})
        return net

    def _mean_prototypes(self, protos: list[dict], m: str) -> np.ndarray:
        """(K, d) the clients' global-mean prototype of modality `m`; zeros (not a copy of the global prototype)
        for a client without it."""
        return np.stack([p[m][0][0] if m in p else np.zeros(self.cfg.embed_dim, np.float32) for p in protos]) \
            if protos else np.zeros((0, self.cfg.embed_dim), np.float32)

    def _tokens(self, stats: np.ndarray, protos: list[dict]) -> np.ndarray:
        """Router input per client: both prototype means, the standardised statistics, the raw modality mask."""
        mask = stats[:, [STAT_KEYS.index("has-img"), STAT_KEYS.index("has-txt")]]
        return np.concatenate([*(self._mean_prototypes(protos, m) for m in MODS), standardise(stats), mask],
                              axis=1).astype(np.float32)

    def _route(self, tokens: np.ndarray, stats: np.ndarray, routed: bool) -> np.ndarray:
        """Router weights over the clean clients; uniform while no global prototypes exist (round 1)."""
        k = len(tokens)
        if not routed or self.opts.router == "uniform" or k == 0:
            return np.full(k, 1.0 / max(k, 1))
        if self.opts.router == "consistency":
            return consistency_weights(stats[:, STAT_KEYS.index("consistency")], self.opts.router_temperature)
        return learned_router_weights(self._router_net(tokens.shape[1]), tokens)

    def _plan(self, replies: list[Message]) -> _Plan:
        """The round's weights and what they came from; pure (reads the state, changes nothing)."""
        stats, protos, problems, deltas, losses = self._stats(replies)
        clean = [i for i, p in enumerate(problems) if p is None]
        tokens = self._tokens(stats[clean], [protos[i] for i in clean])
        r = self._route(tokens, stats[clean], routed=bool(self.prototypes()))
        clients = [self.client_of(replies[i]) for i in clean]
        minimax = Minimax(self.state.meta.get("minimax-q"), eta=self.opts.minimax_eta)
        m = minimax.update(clients, stats[clean, STAT_KEYS.index("rel-loss")]) if clean else np.zeros(0)
        n = np.array([self.size_of(replies[i]) for i in clean])
        weights = np.zeros(len(replies))
        if clean:
            weights[clean] = n * r * m / (n * r * m).sum()
        return _Plan(weights, stats, protos, problems, clean, tokens, r, m, minimax.q, deltas, losses)

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        return self._plan(replies).weights

    def update_state(self, server_round: int, replies: list[Message], weights: np.ndarray) -> dict[str, dict]:
        plan = self._plan(replies)
        for msg, problem in zip(replies, plan.problems):
            if problem:
                log(WARNING, "node %s: RCSR statistics unusable (%s); weight 0 this round",
                    msg.metadata.src_node_id, problem)
        clean_protos = [plan.protos[i] for i in plan.clean]
        self.state.meta["router-loss"] = self._train_router(plan, clean_protos)  # toward the previous prototypes
        # the row counts already carry each client's size: fuse with router x minimax, not with n x r x m (n²)
        table_share = fuse_into(self.state.buffers, clean_protos, plan.router * plan.minimax, self.opts.proto_ema,
                                self.cfg.max_client_share)
        self.state.meta["minimax-q"] = plan.minimax_q
        self.state.meta["losses"] = self.state.meta.get("losses", {}) | {
            self.client_of(replies[i]): float(plan.losses[i]) for i in plan.clean}
        self.state.buffers |= {f"prev-delta/{c}": d.astype(np.float16) for c, d in plan.deltas.items()}
        self.last_train["router"] = {"kind": self.opts.router, "loss": self.state.meta["router-loss"]}
        info = {}
        for i, msg in enumerate(replies):
            j = plan.clean.index(i) if i in plan.clean else None
            info[self.client_of(msg)] = {
                "router-weight": float(plan.router[j]) if j is not None else 0.0,
                "minimax-weight": float(plan.minimax[j]) if j is not None else 0.0,
                "table-share": float(table_share[j]) if j is not None else 0.0,
                **{f"stat-{k}": (None if np.isnan(v) else float(v)) for k, v in zip(STAT_KEYS, plan.stats[i])},
                **({"rcsr-problem": plan.problems[i]} if plan.problems[i] else {})}
        return info

    def _train_router(self, plan: _Plan, clean_protos: list[dict]) -> float | None:
        """`rcsr-router-steps` Adam steps of the learned router on this round's clients, after its weights were
        used; the network is kept in the state buffers. Returns the last loss (None when it did not train)."""
        if self.opts.router != "learned" or not len(plan.tokens) or not self.prototypes():
            return None
        net = self._router_net(plan.tokens.shape[1])
        means = {m: self._mean_prototypes(clean_protos, m) for m in MODS}
        masks = {m: np.array([float(m in p) for p in clean_protos]) for m in MODS}
        targets = {m: g[0][0] for m, g in self.prototypes().items()}
        loss = train_router(net, plan.tokens, plan.stats[plan.clean, STAT_KEYS.index("consistency")], means, masks,
                            {m: targets.get(m) for m in MODS}, self.opts.router_steps, self.opts.router_lr)
        self.state.buffers |= {f"router/{n}": v.detach().numpy().copy() for n, v in net.state_dict().items()}
        return loss
