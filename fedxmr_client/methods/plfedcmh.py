"""PLFedCMH's client side (prototype-based layered federated cross-modal hashing, ICASSP 2023).

The node trains the personalized model the server generated for it (`fedxmr_server/strategies/plfedcmh.py`) with
the shared objective plus, per modality, on the relaxed codes F = tanh(hash head) of its labelled items (labels:
multi-hot, a feature file's own or, on Flickr8k and Karpathy JSON, the DERIVED concepts; c = bits):
- instance-class similarity to its own class codes Y ∈ {±1}^{C×c}: mean((c·T - F Yᵀ)² / c²) (`plfedcmh-class-weight`),
  T the item's label row: the paper's indicator L (`plfedcmh-class-target = "indicator"`) asks F·y_j = c for every
  label j of the item, which no F can meet for an item of two labels with different codes (Flickr8k's DERIVED
  concepts: 2.7 per item); "split" (the default) asks c / k for each of its k labels, L / |L|, met by the mean of its
  labels' codes when the codes are orthogonal (for one-label items both are the same);
- the same toward the global prototypes P of that modality (rows of concepts nobody holds yet left out)
  (`plfedcmh-global-weight`);
- the distance of F to the mean global prototype of the item's concepts, per bit (`plfedcmh-proto-weight`).
After training, Y gets the released code's discrete update (cyclic coordinate descent over the bits, at most 3
sweeps), kept on the node's disk between rounds, and the node sends its per-concept prototypes (class means of F)
with item counts. Prototypes are class means of the *relaxed codes* (bounded), not of the pre-tanh outputs as in the
released code, so the two instance-class terms compare like with like. Image-only nodes on Flickr8k have no labels
(they come from captions): they train the shared objective only and send no prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from common import protocol as P
from common.model import XmrModel
from common.train import Batch
from fedxmr_client.methods.base import ClientMethod, Plan
from fedxmr_client.node import NodeShard
from fedxmr_client.state_store import States

CLASS_CODES = "plfedcmh-class-codes"


def class_prototypes(codes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, bits) class means of the relaxed codes (an item with several concepts feeds each) and (C,) counts."""
    counts = labels.sum(axis=0).astype(np.float64)
    sums = labels.T.astype(np.float64) @ codes
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), counts.astype(np.float32)


def class_targets(labels: np.ndarray, kind: str) -> np.ndarray:
    """T of the instance-class terms from multi-hot labels (module docstring): L itself, or L / |L| ("split")."""
    lab = labels.astype(np.float32)
    return lab if kind == "indicator" else lab / np.maximum(lab.sum(axis=1, keepdims=True), 1.0)


def update_class_codes(codes: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]], sweeps: int = 3) -> np.ndarray:
    """Discrete cyclic coordinate descent on Σ ||c·T - F Yᵀ||² over Y ∈ {±1}^{C×c}, bit by bit:
    y_k = sign(c·Tᵀ F_k - Y_¬k F_¬kᵀ F_k) (a zero keeps the old sign); `pairs` = (F (n, c), T (n, C)) per modality."""
    y = codes.astype(np.float64).copy()
    bits = y.shape[1]
    q = sum(bits * f.T.astype(np.float64) @ lab for f, lab in pairs)  # (c, C)
    ff = sum(f.T.astype(np.float64) @ f for f, _ in pairs)  # (c, c)
    for _ in range(sweeps):
        before = y.copy()
        for k in range(bits):
            rest = np.arange(bits) != k
            new = np.sign(q[k] - y[:, rest] @ ff[rest, k])
            y[:, k] = np.where(new == 0, y[:, k], new)
        if np.linalg.norm(y - before) < 1e-6 * np.linalg.norm(before):
            break
    return y.astype(np.float32)


@dataclass(frozen=True)
class InstanceClassTerms:
    model: XmrModel
    labels: torch.Tensor  # (n_items, C) the class targets T (`class_targets`), zero rows for items without labels
    codes: torch.Tensor  # the node's class codes Y (C, bits)
    protos: dict[str, tuple[torch.Tensor, torch.Tensor]]  # mod -> global prototypes (C, bits), row valid (C,)
    class_weight: float
    global_weight: float
    proto_weight: float

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict] | None:
        lab = self.labels[torch.as_tensor(batch.items, device=self.labels.device)]
        has = lab.sum(dim=1) > 0
        if not batch.embs or not bool(has.any()):
            return None
        parts: dict[str, list[torch.Tensor]] = {"loss_class": [], "loss_global": [], "loss_proto": []}
        for mod, emb in batch.embs.items():
            f = torch.tanh(self.model.tower(mod).code(emb[has]).feature)
            target, bits = lab[has], f.shape[1]
            parts["loss_class"].append((((bits * target - f @ self.codes.t()) / bits) ** 2).mean())
            if mod in self.protos:
                table, valid = self.protos[mod]
                parts["loss_global"].append((((bits * target - f @ table.t()) / bits) ** 2)[:, valid].mean())
                mass = target * valid
                near = mass.sum(dim=1) > 0
                if bool(near.any()):
                    centre = mass[near] @ table / mass[near].sum(dim=1, keepdim=True)
                    parts["loss_proto"].append(((f[near] - centre) ** 2).mean())
        means = {k: sum(v) / len(v) for k, v in parts.items() if v}
        weight = {"loss_class": self.class_weight, "loss_global": self.global_weight, "loss_proto": self.proto_weight}
        total = sum(weight[k] * v for k, v in means.items())
        return total, {k: float(v.item()) for k, v in means.items()}


@dataclass
class PlFedCmhPlan(Plan):
    states: States | None = None
    codes: np.ndarray | None = None


def received_tables(content: RecordDict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if P.PROTOTYPES not in content.array_records:
        return {}
    rec = {k: a.numpy() for k, a in content[P.PROTOTYPES].items()}
    return {m: (rec[m], rec[f"{m}-count"]) for m in ("img", "txt") if m in rec and f"{m}-count" in rec}


class PlFedCmhClient(ClientMethod):
    name = "plfedcmh"

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> PlFedCmhPlan:
        labels = shard.data.labels
        if not labels.shape[1]:  # a Flickr8k image-only node: no labels
            return PlFedCmhPlan(shard)
        stored = states.get(CLASS_CODES)
        if stored is None:
            rng = np.random.default_rng([shard.cfg.seed, shard.partition_id, 31])
            codes = np.where(rng.standard_normal((labels.shape[1], shard.cfg.hash_bits)) >= 0, 1.0, -1.0)
        else:
            codes = stored["codes"]
        dev, opts = shard.device, shard.cfg.options
        protos = {m: (torch.as_tensor(t, device=dev), torch.as_tensor(c > 0, device=dev))
                  for m, (t, c) in received_tables(content).items() if c.max() > 0}
        targets = class_targets(labels, opts.class_target)
        term = InstanceClassTerms(model, torch.as_tensor(targets, dtype=torch.float32, device=dev),
                                  torch.as_tensor(codes, dtype=torch.float32, device=dev), protos,
                                  opts.class_weight, opts.global_weight, opts.proto_weight)
        return PlFedCmhPlan(shard, [term], states=states, codes=codes.astype(np.float32))

    def finish(self, plan: PlFedCmhPlan, model: XmrModel) -> tuple[dict[str, float], dict[str, ArrayRecord]]:
        if plan.codes is None or plan.states is None:
            return {}, {}
        shard, labels = plan.shard, plan.shard.data.labels
        tables, pairs = {}, []
        for mod in shard.modalities:
            codes = np.tanh(model.hash_features(mod, shard.feats[mod])[0])
            lab = labels if mod == "img" else labels[shard.data.caption_image]
            tables[mod], tables[f"{mod}-count"] = class_prototypes(codes, lab)
            pairs.append((codes, class_targets(lab, shard.cfg.options.class_target)))
        new = update_class_codes(plan.codes, pairs)
        plan.states[CLASS_CODES] = {"codes": new}
        flipped = float((new != plan.codes).mean())
        return ({"class-codes-flipped": flipped},
                {P.PROTOTYPES: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tables.items()})})
