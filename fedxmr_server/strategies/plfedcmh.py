"""PLFedCMH (prototype-based layered federated cross-modal hashing, ICASSP 2023) on fedxmr's towers.

Personalized: every client receives its *own* parameters, generated layer by layer by a server hypernetwork
(`common.hypernet`, pFedLA-style) as a weighted sum of all clients' current parameters (the per-client model store
`state.clients`; the common initialisation for a client that has not trained yet). Per round:
1. each client gets θ̄_i and the global per-concept prototypes of its relaxed codes (one table per modality);
2. it trains with the instance-class terms (`fedxmr_client/methods/plfedcmh.py`) and sends its parameters and
   prototypes;
3. the server fuses the prototypes (count-weighted mean per concept row, no client above max-client-share of a row), takes one hypernetwork step from every
   reply (descent with θ̄_i - θ_i: toward the trained parameters; see `common.hypernet` for the sign), and stores
   θ_i as the client's current parameters (the keys it trained; the others stay as generated).
Clients run in parallel (the released code updates them one after another within a round, so later clients saw
earlier ones' updates). The per-layer weights α are masked to the clients that hold the layer's modality, and
logged per client and round; the report draws them at the selected round (`layer-weights.png`). No global model:
each client is evaluated with its own trained model, and the round is selected on the mean per-client dev score.
The hypernetwork, the prototypes and every client's model live in the strategy state (resumable).
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.common.logger import log

from common import protocol as P
from common.config import RunConfig
from common.data.federation import CLIENT_TYPES, client_types
from common.hypernet import LayerHypernet, alpha_entropy, hypernet_step, layer_of, personalized
from common.method_config import PlFedCmhSection
from common.trust import bounded_counts, cap_columns, clip_entries
from fedxmr_server.strategies.base import Arrays, XmrStrategy, from_array_record, to_array_record

HN, PROTO = "hn/", "proto/"
MODS = ("img", "txt")


class PlFedCmhXmr(XmrStrategy):
    name = "plfedcmh"
    description = ("PLFedCMH: per-client parameters generated layer by layer by a server hypernetwork over all "
                   "clients' parameters, with global concept prototypes of the codes")
    has_global_model = False

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.opts: PlFedCmhSection = cfg.options  # type: ignore[assignment]
        self._net: LayerHypernet | None = None

    # ---- the hypernetwork and the clients' parameters ----------------------------------------------------------------
    def _index(self, client: str) -> int | None:
        """A client's row in the hypernetwork: its partition id (None, logged, for a node that never said it or
        that was not identified when the rows were fixed: it keeps its own parameters)."""
        pid = int(client.split("-", 1)[1]) if client.startswith("client-") else None
        if pid is None or pid >= self._num_clients():
            log(WARNING, "PLFedCMH: %s has no hypernetwork row (rows fixed at %d clients); it is not personalised",
                client, self._num_clients())
            return None
        return pid

    def _num_clients(self) -> int:
        meta = self.state.meta
        if "num-clients" not in meta:  # fixed at first use: the partitions of the federation, as the nodes said
            said = max(self._partition_of.values(), default=-1) + 1
            meta["num-clients"] = max(int(meta.get("num-partitions", 0)), said)
        return int(meta["num-clients"])

    def net(self) -> LayerHypernet:
        if self._net is None:
            layers = sorted({layer_of(k) for k in self.state.arrays})
            width = self.opts.hn_embed_dim
            self._net = LayerHypernet(self._num_clients(), layers, width, width, seed=self.cfg.seed,
                                      max_share=self.cfg.max_client_share)
            saved = {k[len(HN):]: torch.as_tensor(v) for k, v in self.state.buffers.items() if k.startswith(HN)}
            if saved:
                self._net.load_state_dict(saved)
        return self._net

    def _save_net(self) -> None:
        for key, value in self.net().state_dict().items():
            self.state.buffers[HN + key] = value.detach().numpy().copy()

    def _mask(self) -> dict[str, torch.Tensor]:
        """Per layer, 1 for the clients that hold its modality (both, for the pair's temperature). A client not heard
        from yet holds what the run config makes its partition (`client_types`, as the nodes derive it), so the mask
        does not depend on when a client is first sampled."""
        known, n = self.state.meta.get("modalities", {}), self._num_clients()
        types = client_types(n, self.cfg.mix(), self.cfg.seed) if n else []
        held = [known.get(f"client-{j}", list(CLIENT_TYPES[types[j]])) for j in range(n)]
        out = {}
        for layer in self.net().layers:
            need = [layer.split(".", 1)[0]] if layer.split(".", 1)[0] in MODS else list(MODS)
            out[layer] = torch.tensor([float(all(m in mods for m in need)) for mods in held])
        return out

    def _params(self) -> list[dict[str, torch.Tensor]]:
        return [{k: torch.as_tensor(v) for k, v in self.state.clients.get(f"client-{j}", self.state.arrays).items()}
                for j in range(self._num_clients())]

    def generated(self, client: str) -> Arrays:
        """θ̄ of `client` (its own stored parameters, or the initialisation, for a node without a row)."""
        i = self._index(client)
        if i is None:
            return self.state.clients.get(client, self.state.arrays)
        with torch.no_grad():
            theta = personalized(self.net().weights(i, self._mask()), self._params(), list(self.state.arrays))
        return {k: v.numpy().astype(self.state.arrays[k].dtype) for k, v in theta.items()}

    # ---- hooks -------------------------------------------------------------------------------------------------------
    def model_for(self, client: str, selected: bool = False) -> Arrays:
        """For evaluation: the client's own trained model (of the selected round for test)."""
        source = self.best if selected else self.state
        return source.clients.get(client, source.arrays)

    def payload(self, client: str, server_round: int, kind: str) -> RecordDict:
        content = super().payload(client, server_round, kind)
        if kind == "train":
            content[P.ARRAYS] = to_array_record(self.generated(client))
            tables = {k[len(PROTO):]: v for k, v in self.state.buffers.items() if k.startswith(PROTO)}
            if tables:
                content[P.PROTOTYPES] = to_array_record(tables)
        return content

    def reply_problem(self, msg: Message) -> str | None:
        problem = super().reply_problem(msg)
        if problem or P.PROTOTYPES not in msg.content.array_records:
            return problem
        rec = from_array_record(msg.content[P.PROTOTYPES])
        shape = (self.concepts, self.cfg.hash_bits)
        for mod in MODS:
            if mod in rec or f"{mod}-count" in rec:
                table, count = rec.get(mod), rec.get(f"{mod}-count")
                if table is None or count is None or table.shape != shape or count.shape != shape[:1]:
                    return f"prototypes of {mod!r} missing or mis-shaped (expected {shape} and counts)"
                if not (np.all(np.isfinite(table)) and np.all(np.isfinite(count))) or np.any(count < 0):
                    return f"prototypes of {mod!r} are not finite or have negative counts"
        return None

    def client_weights(self, replies: list[Message]) -> np.ndarray:
        return np.ones(len(replies))  # no averaging: the hypernetwork weighs the clients, per client and layer

    def update_state(self, server_round: int, replies: list[Message], weights: np.ndarray) -> dict[str, dict]:
        """Fuse the prototypes; report each client's layer weights (those it was sent this round), their normalised
        entropy (1: uniform, the hypernetwork then acts as FedAvg) and the client's own weight, mean over layers."""
        records = [(from_array_record(m.content[P.PROTOTYPES]), self.size_of(m)) for m in replies
                   if P.PROTOTYPES in m.content.array_records]
        for mod in MODS:
            # as the server uses them: means of relaxed codes within [-1, 1], counts within the client's size, and
            # no client above max-client-share of a row (`common.trust`)
            held = [(clip_entries(r[mod]), bounded_counts(r[f"{mod}-count"], n, mod)) for r, n in records if mod in r]
            if held:
                weight = cap_columns(np.stack([c for _, c in held]), self.cfg.max_client_share)  # (K, C)
                sums = np.einsum("kc,kcb->cb", weight, np.stack([t for t, _ in held]))
                counts = weight.sum(axis=0)
                self.state.buffers[PROTO + mod] = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
                self.state.buffers[PROTO + f"{mod}-count"] = counts.astype(np.float32)
        info = {}
        mask = self._mask()
        for msg in replies:
            client = self.client_of(msg)
            i = self._index(client)
            if i is not None:
                with torch.no_grad():
                    alpha = self.net().weights(i, mask)
                info[client] = {"layer-weights": {layer: [round(float(a), 4) for a in w] for layer, w in alpha.items()},
                                "alpha-entropy": round(alpha_entropy(alpha), 4),
                                "alpha-self": round(float(np.mean([float(w[i]) for w in alpha.values()])), 4)}
        return info

    def aggregate(self, server_round: int, replies: list[Message], weights: np.ndarray) -> None:
        """One hypernetwork step from every reply (`common.hypernet.hypernet_step`), then each client's trained
        parameters are stored (the keys it did not train: as generated for it)."""
        trained: dict[str, Arrays] = {self.client_of(m): from_array_record(m.content[P.ARRAYS]) for m in replies}
        rows = {self._index(c): {k: torch.as_tensor(v) for k, v in a.items()} for c, a in trained.items()
                if self._index(c) is not None}
        generated = hypernet_step(self.net(), self.opts.hn_lr, self._mask(), self._params(), rows)
        for client, arrays in trained.items():
            i = self._index(client)
            base = ({k: v.numpy().astype(self.state.arrays[k].dtype) for k, v in generated[i].items()}
                    if i is not None else self.model_for(client))
            self.state.clients[client] = base | arrays
        self._save_net()
