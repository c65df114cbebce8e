"""RCSR — Retrieval-Centric Semantic Routing (Zhou et al., arXiv 2604.22885), rebuilt from the paper's description
and the partial released code (see `../shared/notes/methods.md` §1 and the README).

Per round:
1. every train message carries the global image/text prototype tables (record `prototypes`; none in round 1);
2. clients anchor to them, train, and reply with their own prototypes and a *measured* retrieval consistency
   (on images they held out); see `fedxmr_client/rcsr.py`;
3. `client_weights`: per client a token of prototype means + standardised statistics (consistency, held-out pair
   recall, relative loss, size, modality mask, per-tower update norms and cosine to the node's previous update,
   both computed here from the arrays); the router (`rcsr-router`) gives r, the minimax game gives m; the weight is
   num-examples * r * m, renormalised per key by the base class over the clients that sent the key;
4. the global prototypes are fused from the clients' with those weights, once (EMA `rcsr-proto-ema`);
5. the learned router then takes `rcsr-router-steps` Adam steps on this round's set (its weights for this round
   were already fixed, with the network in eval mode).
A client whose statistics are missing or not finite gets weight 0 and is logged; the round goes on.
Fixed quirks of the released code: the prototype EMA ran twice per round; router dropout was active when weights
were produced; the image/text update-norm *ratio* exploded for unimodal clients (here: two log-norms with a
modality mask); a unimodal client's missing prototype was a copy of the global one (here: zeros + mask); absent
modalities' zero updates diluted the average (here: per-key renormalisation); the router's target already held
the current round's fusion (here: the previous global prototypes).
"""

from __future__ import annotations

from logging import WARNING
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.config import RunConfig
from common.prototypes import MODS, RECORD, fuse_prototypes
from common.router import (STAT_KEYS, Minimax, RouterNet, consistency_weights, learned_router_weights,
                           standardise, train_router)
from fedxmr_server.strategies.base import XmrStrategy, from_array_record, to_array_record


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else np.nan


class RcsrXmr(XmrStrategy):
    name = "rcsr"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.info: dict[int, dict[str, Any]] = {}

    # ---- global prototypes -------------------------------------------------------------------------------------
    def prototypes(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        b = self.state.buffers
        return {m: (b[f"proto/{m}"], b[f"proto/{m}-count"]) for m in MODS
                if f"proto/{m}" in b and b[f"proto/{m}-count"].max() > 0}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        protos = self.prototypes()
        if protos:
            record = to_array_record({k: v for m, (t, c) in protos.items() for k, v in ((m, t), (f"{m}-count", c))})
            for msg in messages:
                msg.content[RECORD] = record
        return messages

    # ---- per-client statistics -----------------------------------------------------------------------------------
    def _client_prototypes(self, msg: Message) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str | None]:
        """The reply's prototype tables for the modalities it holds, or a reason why they are unusable."""
        if RECORD not in msg.content.array_records:
            return {}, "no 'prototypes' record"
        rec = from_array_record(msg.content[RECORD])
        metrics = msg.content["metrics"]
        out = {}
        for m in MODS:
            if not metrics.get(f"has-{m}", 1):
                continue
            table, counts = rec.get(m), rec.get(f"{m}-count")
            if table is None or counts is None or table.ndim != 2 or counts.shape != (table.shape[0],):
                return {}, f"prototypes of {m!r} missing or mis-shaped"
            if not (np.all(np.isfinite(table)) and np.all(np.isfinite(counts))):
                return {}, f"prototypes of {m!r} are not finite"
            out[m] = (table, counts)
        return out, None

    def _delta_stats(self, node: str, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """Update geometry, measured here from what the client sent: per-tower log-norms and the cosine to the
        node's previous update (kept as float16 in the buffers)."""
        delta = {k: v.astype(np.float64) - self.state.arrays[k] for k, v in arrays.items()}
        out = {}
        for m in MODS:
            parts = [d.ravel() for k, d in sorted(delta.items()) if k.startswith(f"{m}.")]
            out[f"log-norm-{m}"] = float(np.log1p(np.linalg.norm(np.concatenate(parts)))) if parts else np.nan
        flat = np.concatenate([d.ravel() for _, d in sorted(delta.items())])
        prev = self.state.buffers.get(f"prev-delta/{node}")
        out["cos-prev"] = _cos(flat, prev.astype(np.float64)) if prev is not None and prev.shape == flat.shape \
            else np.nan
        self.state.buffers[f"prev-delta/{node}"] = flat.astype(np.float16)
        return out

    def _stats(self, replies: list[Message]) -> tuple[np.ndarray, list[dict], list[str | None]]:
        globals_ = self.prototypes()
        rows, protos, problems = [], [], []
        losses = np.array([float(m.content["metrics"].get("train-loss", np.nan)) for m in replies])
        groups = [(int(m.content["metrics"].get("has-img", 1)), int(m.content["metrics"].get("has-txt", 1)))
                  for m in replies]
        for i, msg in enumerate(replies):
            mm = msg.content["metrics"]
            node = str(msg.metadata.src_node_id)
            tables, problem = self._client_prototypes(msg)
            peers = [losses[j] for j in range(len(replies)) if groups[j] == groups[i] and np.isfinite(losses[j])]
            row = {"consistency": float(mm.get("rcsr-consistency", np.nan)),
                   "pair-recall": float(mm.get("rcsr-pair-recall", np.nan)),
                   "rel-loss": losses[i] / np.mean(peers) if peers and np.mean(peers) > 0 else np.nan,
                   "log-examples": float(np.log(mm["num-examples"])),
                   "has-img": float(groups[i][0]), "has-txt": float(groups[i][1]),
                   **self._delta_stats(node, from_array_record(msg.content["arrays"]))}
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
        return np.array(rows, dtype=np.float64), protos, problems

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

    def _route(self, tokens: np.ndarray, stats: np.ndarray, protos: list[dict], routed: bool) -> np.ndarray:
        """Router weights over the clean clients; uniform while no global prototypes exist (round 1)."""
        k = len(tokens)
        consistency = stats[:, STAT_KEYS.index("consistency")]
        if not routed or self.cfg.rcsr_router == "uniform" or k == 0:
            return np.full(k, 1.0 / max(k, 1))
        if self.cfg.rcsr_router == "consistency":
            return consistency_weights(consistency, self.cfg.rcsr_router_temperature)
        net = self._router_net(tokens.shape[1])
        r = learned_router_weights(net, tokens)
        means = {m: self._mean_prototypes(protos, m) for m in MODS}
        masks = {m: np.array([float(m in p) for p in protos]) for m in MODS}
        targets = {m: g[0][0] for m, g in self.prototypes().items()}
        loss = train_router(net, tokens, consistency, means, masks, {m: targets.get(m) for m in MODS},
                            self.cfg.rcsr_router_steps, self.cfg.rcsr_router_lr)
        self.state.buffers |= {f"router/{n}": v.detach().numpy().copy() for n, v in net.state_dict().items()}
        self.state.meta["router-loss"] = loss
        return r

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        self.state.meta["router-loss"] = None
        stats, protos, problems = self._stats(replies)
        clean = [i for i, p in enumerate(problems) if p is None]
        for msg, problem in zip(replies, problems):
            if problem:
                log(WARNING, "node %s: RCSR statistics unusable (%s); weight 0 this round",
                    msg.metadata.src_node_id, problem)
        tokens = self._tokens(stats[clean], [protos[i] for i in clean])
        r = self._route(tokens, stats[clean], [protos[i] for i in clean], routed=bool(self.prototypes()))
        nodes = [str(replies[i].metadata.src_node_id) for i in clean]
        minimax = Minimax(self.state.meta.get("minimax-q"), eta=self.cfg.rcsr_minimax_eta)
        m = minimax.update(nodes, stats[clean, STAT_KEYS.index("rel-loss")]) if clean else np.zeros(0)
        self.state.meta["minimax-q"] = minimax.q
        n = np.array([float(replies[i].content["metrics"]["num-examples"]) for i in clean])
        weights = np.zeros(len(replies))
        if clean:
            weights[clean] = n * r * m / (n * r * m).sum()
        self._fuse([protos[i] for i in clean], weights[clean])
        self.info = {}
        for i, msg in enumerate(replies):
            j = clean.index(i) if i in clean else None
            self.info[msg.metadata.src_node_id] = {
                "router-weight": float(r[j]) if j is not None else 0.0,
                "minimax-weight": float(m[j]) if j is not None else 0.0,
                **{f"stat-{k}": (None if np.isnan(v) else float(v)) for k, v in zip(STAT_KEYS, stats[i])},
                **({"rcsr-problem": problems[i]} if problems[i] else {})}
        return weights

    def _fuse(self, protos: list[dict], weights: np.ndarray) -> None:
        for m in MODS:
            held = [(p[m], w) for p, w in zip(protos, weights) if m in p and w > 0]
            if not held:
                continue
            shape = held[0][0][0].shape
            table = self.state.buffers.get(f"proto/{m}", np.zeros(shape, np.float32))
            counts = self.state.buffers.get(f"proto/{m}-count", np.zeros(shape[0], np.float32))
            if table.shape != shape:
                log(WARNING, "prototype tables of %r changed shape %s -> %s; restarting them", m, table.shape, shape)
                table, counts = np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)
            table, counts = fuse_prototypes(table, counts, [t for (t, _), _ in held], [c for (_, c), _ in held],
                                            np.array([w for _, w in held]), self.cfg.rcsr_proto_ema)
            self.state.buffers[f"proto/{m}"], self.state.buffers[f"proto/{m}-count"] = table, counts

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.info = {}
        out = super().aggregate_train(server_round, replies)
        for client in self.last_train.get("clients", []):
            client.update(self.info.get(client["node-id"], {}))
        self.last_train["router"] = {"kind": self.cfg.rcsr_router, "loss": self.state.meta.get("router-loss")}
        return out
