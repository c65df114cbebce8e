"""`linear`'s client side: no gradient training. In the server's "statistics" phase (round 1) it sends the sufficient statistics of the node's labelled
items per modality (`common.linear.FeatureStats`: ridge onto the labels, solved on the server); in its "itq" phase it
sends, for the model it was sent, Eᵀ·sign(E·Hᵀ) (the tower's pre-normalisation embedding E against its codes) and
the quantisation loss, one ITQ iteration's share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from common import protocol as P
from common.linear import FeatureStats
from common.model import XmrModel
from fedxmr_client.methods.base import ClientMethod, Plan
from fedxmr_client.node import NodeShard
from fedxmr_client.state_store import States


@dataclass
class LinearPlan(Plan):
    statistics: bool = True  # the server's phase: feature statistics until it has solved the map, then ITQ


class LinearClient(ClientMethod):
    name = "linear"
    sends_weights = False  # the server builds the model from the statistics; the node sends no arrays

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> Plan:
        return LinearPlan(shard, statistics=content[P.CONFIG].get(P.LINEAR_PHASE, "statistics") == "statistics")

    def fit(self, model: XmrModel, plan: Plan, shared: Callable[[], dict[str, float]]) -> dict[str, float]:
        return {}  # closed form: `finish` computes what the server needs

    def finish(self, plan: Plan, model: XmrModel) -> tuple[dict[str, float], dict[str, ArrayRecord]]:
        assert isinstance(plan, LinearPlan)
        out: dict[str, np.ndarray] = {}
        metrics: dict[str, float] = {}
        device = next(model.parameters()).device  # the node's device (`device`): the towers run there
        for mod, feats, labels in _items(plan.shard):
            tower = model.tower(mod)
            with torch.no_grad():
                x = torch.as_tensor(feats, dtype=torch.float32, device=device)
                if plan.statistics:
                    if labels is not None:
                        stats = FeatureStats.of(tower.norm(x).cpu().numpy(), labels).as_arrays()
                        out |= {f"{mod}-{k}": v for k, v in stats.items()}
                    continue
                model.eval()
                emb = tower.adapter(tower.proj(tower.norm(x)))
                raw = tower.hash(emb).cpu().numpy().astype(np.float64)
            codes = np.where(raw >= 0, 1.0, -1.0)
            out[f"{mod}-etb"] = emb.cpu().numpy().astype(np.float64).T @ codes
            quant = float(((codes - raw) ** 2).sum())
            out[f"{mod}-quant"] = np.array([quant])
            metrics[f"linear-quant-{mod}"] = quant / max(raw.size, 1)
        return metrics, {P.LINEAR: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()})}


def _items(shard: NodeShard) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """Per modality the node holds: its items' frozen features and their labels (a caption has its image's
    labels; None where the node has none, e.g. image-only nodes of a dataset whose labels come from captions)."""
    labels = shard.data.labels if shard.data.labels.shape[1] > 0 else None
    out = []
    if "img" in shard.modalities:
        out.append(("img", shard.feats["img"], labels))
    if "txt" in shard.modalities:
        out.append(("txt", shard.feats["txt"], None if labels is None else labels[shard.data.caption_image]))
    return out
