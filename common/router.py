"""RCSR's server-side weighting of client updates: the semantic router and the minimax fairness weights.

Each replying client is summarised by a token: its prototype means (zeros for a modality it lacks, never a copy of
the global prototype), and standardised scalar statistics (`STAT_KEYS`), among them the *measured* retrieval
consistency of its updated towers on its own held-out items. Routers turn the set of tokens into a distribution:
- `consistency`: closed form, softmax(consistency / temperature);
- `learned`: a small permutation-equivariant set network (token MLP -> self-attention over clients -> logit),
  trained online on the server, a few Adam steps per round, always *after* its weights for the round were used;
- `uniform`: router off.
The minimax weights (`Minimax`) up-weight clients whose local loss, relative to clients of the same modalities, has
been high (exponentiated-gradient ascent on the mixture, flattened each round). Pure torch/numpy.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("learned", "consistency", "uniform")
STAT_KEYS = ("consistency", "pair-recall", "rel-loss", "log-examples", "has-img", "has-txt", "log-norm-img",
             "log-norm-txt", "cos-prev", "cos-global-img", "cos-global-txt")


def standardise(stats: np.ndarray) -> np.ndarray:
    """Column-wise z-scores over the clients of the round; constant columns and NaN (not applicable) -> 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: nanmean warns, we map it to 0 anyway
        mean, std = np.nanmean(stats, axis=0), np.nanstd(stats, axis=0)
    mean = np.nan_to_num(mean)
    std = np.where(np.nan_to_num(std) > 1e-8, np.nan_to_num(std), 1.0)
    return np.nan_to_num((stats - mean) / std, nan=0.0).astype(np.float32)


class RouterNet(nn.Module):
    """Token MLP -> one post-norm self-attention block over the clients (no positions: permutation-equivariant)
    -> one logit per client. No dropout, so the weights it gives are deterministic."""

    def __init__(self, token_dim: int, hidden: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(token_dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                   nn.Linear(hidden, hidden))
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).unsqueeze(0)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h).squeeze(0).squeeze(-1)


def router_loss(weights: torch.Tensor, consistency: torch.Tensor, protos: dict[str, torch.Tensor],
                masks: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], proto_weight: float,
                entropy_weight: float) -> torch.Tensor:
    """What the learned router is trained for: high expected consistency of the clients it weights, per-modality
    weighted prototype means close to the previous global prototypes (renormalised over the clients that hold
    the modality), and spread-out weights (entropy bonus)."""
    loss = -(weights * consistency).sum()
    for mod, p in protos.items():
        if targets.get(mod) is None or not bool(masks[mod].any()):
            continue
        w = weights * masks[mod]
        fused = F.normalize((w[:, None] * p).sum(0) / w.sum().clamp_min(1e-8), dim=0)
        loss = loss + proto_weight * (1 - fused @ targets[mod])
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum()
    return loss - entropy_weight * entropy


def learned_router_weights(net: RouterNet, tokens: np.ndarray) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return torch.softmax(net(torch.as_tensor(tokens)), dim=0).numpy().astype(np.float64)


def train_router(net: RouterNet, tokens: np.ndarray, consistency: np.ndarray, protos: dict[str, np.ndarray],
                 masks: dict[str, np.ndarray], targets: dict[str, np.ndarray | None], steps: int, lr: float,
                 proto_weight: float = 1.0, entropy_weight: float = 0.1) -> float:
    """A few Adam steps on this round's client set (a fresh optimizer each round: the state to persist is the
    network only). Returns the last loss."""
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x = torch.as_tensor(tokens)
    c = torch.as_tensor(np.nan_to_num(consistency), dtype=torch.float32)
    p = {m: torch.as_tensor(v, dtype=torch.float32) for m, v in protos.items()}
    mk = {m: torch.as_tensor(v, dtype=torch.float32) for m, v in masks.items()}
    tg = {m: None if v is None else torch.as_tensor(v, dtype=torch.float32) for m, v in targets.items()}
    value = float("nan")
    for _ in range(steps):
        loss = router_loss(torch.softmax(net(x), dim=0), c, p, mk, tg, proto_weight, entropy_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = float(loss.detach())
    net.eval()
    return value


def consistency_weights(consistency: np.ndarray, temperature: float) -> np.ndarray:
    z = np.nan_to_num(consistency, nan=0.0) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


class Minimax:
    """Adversarial mixture q over all clients seen so far (by id): q_k <- q_k * exp(eta * loss_k) for the clients
    of the round, then q <- q^(1/(1+tau)) (flattening, keeps every client in play), renormalised. A new client
    enters with the mean mass. The round's weights are q restricted to its clients, renormalised."""

    def __init__(self, q: dict[str, float] | None = None, eta: float = 0.1, tau: float = 0.1) -> None:
        self.q = dict(q or {})
        self.eta, self.tau = eta, tau

    def update(self, clients: list[str], losses: np.ndarray) -> np.ndarray:
        mean = float(np.mean(list(self.q.values()))) if self.q else 1.0
        for c in clients:
            self.q.setdefault(c, mean)
        for c, loss in zip(clients, losses):
            self.q[c] *= float(np.exp(self.eta * np.nan_to_num(loss)))
        flat = {c: v ** (1.0 / (1.0 + self.tau)) for c, v in self.q.items()}
        total = sum(flat.values())
        self.q = {c: v / total for c, v in flat.items()}
        w = np.array([self.q[c] for c in clients])
        return w / w.sum()
