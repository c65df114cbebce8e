"""FedCAFE's client side (ACM MM 2024): the enhancement terms during training, the local memory after it.

The model arrives with the global memory in its towers (`<mod>.fedcafe.memory`, read by the adaptive feature
enhancement, FedCAFE's model part `common.parts.fedcafe`). On top of the shared objective (whose hash term is
FedCAFE's pairwise likelihood when `hash-loss = "pairwise"`, as for every method in the comparison), per modality
the node trains:
- L_E = 1 - cos(V_E, O): the enhanced feature stays near the raw one (`fedcafe-enhance-weight`);
- L_C = 1 - cos(V_E, teacher V_E): the global model as it arrived (frozen) is the teacher; for a pair, the
  student's V_E is pulled toward the teacher's V_E of *both* the image and the caption of that pair
  (`fedcafe-teacher-weight`);
- L_P = KL(multi-hot labels ‖ L̂) averaged over items × concepts, as the released code's `KLDivLoss(reduction=
  'mean')`: −mean(Y ⊙ log L̂) over the B × C entries (`class_loss`; items without labels are skipped). Summing over
  the concepts instead (a cross-entropy per item) made the term ~C / (labels per item) ≈ 12× the reference's
  scale on Flickr8k at the paper's weight 1 (`fedcafe-class-weight`).
After training it sends its local memory (`common.memory.local_memory`) of the fused enhanced features: per item,
the normalised mean of its image's V_E and its captions' V_E (the modalities it holds).
Unimodal nodes (the paper has none): a text-only node's memory comes from its captions alone, with their labels;
an image-only node on Flickr8k has no labels (they come from captions; on a feature file it keeps the file's
labels and is treated as labelled), so it trains no L_P and labels its items for the
memory by its classifier's prediction (the global classifier's, trained by the labelled nodes), or without AFE by
the nearest global memory row; before either exists it sends no memory rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, RecordDict

from common import protocol as P
from common.memory import local_memory, normalise_rows
from common.model import XmrModel
from common.train import Batch
from fedxmr_client.methods.base import ClientMethod, Plan
from fedxmr_client.methods.moon import frozen_copy
from fedxmr_client.node import NodeShard
from fedxmr_client.state_store import States


def cos_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(a, b, dim=-1)).mean()


@dataclass(frozen=True)
class EnhancementTerms:
    """L_E, L_C and L_P of one batch (module docstring), with their weights."""

    model: XmrModel
    teacher: XmrModel
    targets: torch.Tensor | None  # (n_items, C) multi-hot labels; None: the node has no labels
    enhance_weight: float
    teacher_weight: float
    class_weight: float

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict] | None:
        if not batch.embs:
            return None
        with torch.no_grad():
            taught = {mod: self.teacher.tower(mod).code(self.teacher.tower(mod).embed(x)).feature
                      for mod, x in batch.inputs.items()}
        l_e, l_c, l_p = [], [], []
        for mod, emb in batch.embs.items():
            raw, logits, v_e = self.model.tower(mod).code(emb)
            if logits is not None:  # without AFE, V_E = O and L_E is 0
                l_e.append(cos_distance(v_e, raw))
            l_c.append(sum(cos_distance(v_e, t) for t in taught.values()) / len(taught))
            if logits is not None and self.targets is not None:
                term = class_loss(logits, self.targets[torch.as_tensor(batch.items, device=self.targets.device)])
                if term is not None:
                    l_p.append(term)
        parts = {"loss_teacher": sum(l_c) / len(l_c)}
        if l_e:
            parts["loss_enhance"] = sum(l_e) / len(l_e)
        if l_p:
            parts["loss_class"] = sum(l_p) / len(l_p)
        total = (self.teacher_weight * parts["loss_teacher"] + self.enhance_weight * parts.get("loss_enhance", 0.0)
                 + self.class_weight * parts.get("loss_class", 0.0))
        return total, {k: float(v.item()) for k, v in parts.items()}


@dataclass
class FedCafePlan(Plan):
    memory: np.ndarray | None = None  # the global memory the node was sent (C, bits)


def class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """FedCAFE's L_P: PyTorch's KL divergence of the softmax prediction from the multi-hot labels, mean over the
    labelled rows × concepts (with 0/1 targets, −mean(Y ⊙ log L̂)); None when no row of the batch has a label."""
    has = labels.sum(dim=1) > 0
    if not bool(has.any()):
        return None
    # the elementwise mean, spelled out: reduction="mean" gives the same value but warns on every batch
    return F.kl_div(F.log_softmax(logits[has], dim=-1), labels[has], reduction="none").mean()


def fused_items(shard: NodeShard, model: XmrModel) -> tuple[np.ndarray, np.ndarray | None]:
    """Per image of the shard: the normalised mean of its modalities' normalised V_E, and the image's concept
    logits (None without AFE or without images)."""
    parts, logits = [], None
    if "img" in shard.modalities:
        v_img, logits = model.hash_features("img", shard.feats["img"])
        parts.append(normalise_rows(v_img))
    if "txt" in shard.modalities:
        v_txt = normalise_rows(model.hash_features("txt", shard.feats["txt"])[0])
        per_image = np.zeros((len(shard.data.images), v_txt.shape[1]), np.float64)
        np.add.at(per_image, shard.data.caption_image, v_txt)
        parts.append(normalise_rows(per_image))
    return normalise_rows(sum(parts)), logits


def memory_labels(shard: NodeShard, fused: np.ndarray, logits: np.ndarray | None,
                  memory: np.ndarray | None) -> np.ndarray:
    """Multi-hot labels of the shard's images for the local memory: the dataset's labels where the node has them;
    otherwise one-hot pseudo-labels (module docstring), all zero when nothing to label by exists yet."""
    if shard.data.labels.shape[1]:
        return shard.data.labels
    n, concepts = len(fused), len(memory) if memory is not None else 0
    out = np.zeros((n, concepts), dtype=np.uint8)
    if logits is not None and memory is not None and np.abs(memory).sum() > 0:
        out[np.arange(n), logits.argmax(axis=1)] = 1
    elif logits is None and memory is not None and np.abs(memory).sum() > 0:
        out[np.arange(n), (fused @ memory.T).argmax(axis=1)] = 1
    return out


class FedCafeClient(ClientMethod):
    name = "fedcafe"

    def begin(self, shard: NodeShard, model: XmrModel, content: RecordDict, states: States) -> FedCafePlan:
        opts = shard.cfg.options
        memory = None
        if P.MEMORY in content.array_records:
            memory = content[P.MEMORY]["memory"].numpy()
        labels = shard.data.labels
        targets = (torch.as_tensor(labels, dtype=torch.float32, device=shard.device) if labels.shape[1] else None)
        term = EnhancementTerms(model, frozen_copy(model), targets, opts.enhance_weight, opts.teacher_weight,
                                opts.class_weight)
        return FedCafePlan(shard, [term], memory=memory)

    def finish(self, plan: FedCafePlan, model: XmrModel) -> tuple[dict[str, float], dict[str, ArrayRecord]]:
        fused, logits = fused_items(plan.shard, model)
        labels = memory_labels(plan.shard, fused, logits, plan.memory)
        if labels.shape[1] == 0:  # an image-only node before any global memory exists
            return {"memory-rows": 0.0}, {}
        memory, counts = local_memory(fused, labels)
        record = ArrayRecord({"memory": Array(memory), "count": Array(counts)})
        return {"memory-rows": float((counts > 0).sum())}, {P.MEMORY: record}
