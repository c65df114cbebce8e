"""PLFedCMH's server hypernetwork: layer-wise personalized aggregation (pFedLA, Ma et al., CVPR 2022). Pure torch.

For client i and each layer l (a parameter block: a parameter name without its last part, e.g. `img.proj`), the
hypernetwork produces non-negative weights α_i^(l) over the clients, from a client embedding through a small
per-client MLP and one head per layer: α_i^(l) = ReLU(head_il(MLP_i(E[i]))), masked to the clients that hold the
layer's modality, normalised to sum to 1 (by the sum, as pFedLA; a client whose weights are all zero falls back to
its own parameters); no other client weighs more than `max-client-share` in it (`capped_others`). Client i is sent
θ̄_i^(l) = Σ_j α_ij^(l) θ_j^(l) over all clients' current parameters.

The update after client i trained (θ_i = θ̄_i + Δθ_i): local training approximates a descent step on the client's
loss, so Δθ_i ≈ -lr ∂L_i/∂θ̄_i, and the chain rule gives ∂L_i/∂φ ≈ (∂θ̄_i/∂φ)^T (θ̄_i - θ_i) / lr: the hypernetwork
takes a descent step with the vector (old - new). To first order that moves the generated θ̄_i *toward* the
client's trained parameters, which is pFedLA's intent (its Eq. for ∇φ) and pFedHN's sign. The released pFedLA and
PLFedCMH code passes (new - old) instead, which moves θ̄_i away from the update; tests/test_plfedcmh.py checks the
direction taken here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.trust import cap_shares

Arrays = dict[str, np.ndarray]


def layer_of(key: str) -> str:
    """'img.adapter.down.weight' -> 'img.adapter.down'; a top-level key ('logit_scale') is its own layer."""
    return key.rsplit(".", 1)[0] if "." in key else key


class LayerHypernet(nn.Module):
    """Client embeddings, a per-client MLP and per-client, per-layer heads (pFedLA's shapes)."""

    def __init__(self, num_clients: int, layers: list[str], embed_dim: int = 32, hidden: int = 32,
                 seed: int = 0, max_share: float = 1.0) -> None:
        super().__init__()
        self.max_share = max_share
        gen = torch.Generator().manual_seed(seed)
        self.layers = list(layers)
        self.embedding = nn.Embedding(num_clients, embed_dim)
        nn.init.normal_(self.embedding.weight, generator=gen)
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                                nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
                                  for _ in range(num_clients))
        self.heads = nn.ModuleList(nn.ModuleList(nn.Linear(hidden, num_clients) for _ in self.layers)
                                   for _ in range(num_clients))
        for heads in self.heads:  # non-negative start, as pFedLA: ReLU must not zero every weight
            for head in heads:
                nn.init.uniform_(head.weight, 0.0, 1.0, generator=gen)
                nn.init.zeros_(head.bias)
        for mlp in self.mlps:
            for mod in mlp:
                if isinstance(mod, nn.Linear):
                    nn.init.kaiming_uniform_(mod.weight, a=5 ** 0.5, generator=gen)
                    nn.init.zeros_(mod.bias)

    def weights(self, client: int, mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """layer -> (num_clients,) α of `client`, normalised over the clients `mask[layer]` allows; no other client
        weighs more than `max_share` in it (the excess is the client's own weight: a client may personalise toward
        itself, but no one client can take over another's model)."""
        h = self.mlps[client](self.embedding.weight[client])
        out = {}
        for layer, head in zip(self.layers, self.heads[client]):
            raw = torch.relu(head(h)) * mask[layer]
            total = raw.sum()
            own = torch.zeros_like(raw)
            own[client] = 1.0
            out[layer] = capped_others(raw / total if total > 0 else own, client, mask[layer], self.max_share)
        return out


def capped_others(alpha: torch.Tensor, client: int, allowed: torch.Tensor, cap: float) -> torch.Tensor:
    """α with no other client above max(cap, 1 / allowed clients); unchanged where none is. The excess stays with
    the client itself when the layer's mask allows it (differentiably: a client may personalise toward itself);
    otherwise it is spread over the other allowed clients (water-filling, `common.trust.cap_shares`, as a
    straight-through value: the gradient is α's)."""
    limit = max(cap, 1.0 / max(int((allowed > 0).sum()), 1))
    own = torch.zeros_like(alpha)
    own[client] = 1.0
    if float((alpha.detach() * (1 - own)).max()) <= limit:
        return alpha
    if float(allowed[client]) > 0:
        others = torch.clamp(alpha, max=limit) * (1 - own)
        return others + own * (1 - others.sum())
    target = torch.as_tensor(cap_shares(alpha.detach().double().numpy(), limit), dtype=alpha.dtype)
    return alpha + (target - alpha).detach()


def alpha_entropy(alpha: dict[str, torch.Tensor]) -> float:
    """Mean over layers of the entropy of α divided by log(number of clients with weight > 0 allowed): 1 is uniform
    (the hypernetwork then acts as FedAvg), 0 a client taking one client's layer. A layer over one client is 0."""
    values = []
    for a in (a.detach() for a in alpha.values()):
        n = int((a > 0).sum())
        p = a[a > 0]
        values.append(float(-(p * p.log()).sum() / np.log(n)) if n > 1 else 0.0)
    return float(np.mean(values)) if values else 0.0


def personalized(alpha: dict[str, torch.Tensor], params: list[dict[str, torch.Tensor]],
                 keys: list[str]) -> dict[str, torch.Tensor]:
    """θ̄^(l) = Σ_j α_j^(l) θ_j^(l) for every key (its layer's α), differentiable in α."""
    return {k: sum(alpha[layer_of(k)][j] * p[k] for j, p in enumerate(params)) for k in keys}


def hypernet_step(net: LayerHypernet, lr: float, mask: dict[str, torch.Tensor], params: list[dict[str, torch.Tensor]],
                  trained: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """One SGD step of the hypernetwork from the clients' trained parameters (`trained`: client index -> the keys
    it trained), the clients' losses summed (each client's MLP and heads get its own gradient, the shared embedding
    table the sum): descent with the vector θ̄_i - θ_i (module docstring). Returns every client's θ̄_i as generated
    before the step (detached), for all keys of `params`."""
    keys = list(params[0])
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    optimizer.zero_grad()
    outputs, directions, generated = [], [], {}
    for client, new in trained.items():
        theta = personalized(net.weights(client, mask), params, keys)
        for key, value in new.items():
            if theta[key].requires_grad:  # not a client whose weights fell back to its own parameters
                outputs.append(theta[key])
                directions.append(theta[key].detach() - value)
        generated[client] = {k: v.detach() for k, v in theta.items()}
    if outputs:
        torch.autograd.backward(outputs, directions)
        optimizer.step()
    return generated
