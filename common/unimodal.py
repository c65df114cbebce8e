"""Keeping unimodal clients inside the shared image-text space (issue 11; method `unialign`). Pure numpy/torch.

Why (measured by `scripts/diagnose_unimodal.py`, docs/MEASURED.md): under FedAvg an image-only client's
update, applied alone to the global image tower, cost about 70 dev rsum and lowered the matched image-caption cosine
by 0.11. Its self-supervised objective (two dropout views of an image) moves the tower about 2.4x as far as the
paired clients' mean update does, against it (cosine -0.12), and the text tower does not follow. The damage sits in
the projection layer. Two remedies, each a knob of the method:
- `DistillTerm` (client): the unimodal client keeps its own items' embeddings where the round's global model put
  them (embedding-level: 1 - cos to the teacher; relational: the teacher's similarity distribution over the other
  items of the batch). Its update may sharpen its tower but not move it away from the other modality;
- `agreement_weights` (server): a unimodal client's aggregation weight is scaled by the cosine between its update of
  its tower and the paired clients' weighted mean update of that tower (0 when opposed). A damaging update then
  counts for nothing and does not dilute the paired clients' step either. Measured on dev, it reduces the method
  to paired-only: every unimodal update is near-orthogonal to the paired mean, distilled or not. So it is an
  ablation, not the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.train import Batch

DistillKind = Literal["embedding", "relational"]
DISTILL_KINDS: tuple[str, ...] = ("embedding", "relational")


@dataclass(frozen=True)
class DistillTerm:
    """weight * distance between the batch's embeddings of modality `mod` and the teacher's (the global model at
    the start of the round) of the same items; `teacher[i]` is item i's unit-norm teacher embedding."""

    mod: str
    teacher: torch.Tensor
    weight: float
    kind: DistillKind = "embedding"
    temperature: float = 0.05  # relational: softmax temperature of the in-batch cosine similarities

    def __post_init__(self) -> None:
        if self.kind not in DISTILL_KINDS:
            raise ValueError(f"distillation kind {self.kind!r}; expected one of {DISTILL_KINDS}")

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict] | None:
        if self.mod not in batch.embs:
            return None
        items = batch.items
        student, teacher = batch.embs[self.mod], self.teacher[torch.as_tensor(items, device=self.teacher.device)]
        if self.kind == "embedding":
            term = (1.0 - (student * teacher).sum(-1)).mean()
        else:
            # each item's similarity distribution over the *other* items of the batch (its self-similarity, 1 for
            # both, would dominate the softmax and hide the structure)
            off = ~torch.eye(len(items), dtype=torch.bool, device=student.device)
            n = len(items)
            t_logits = (teacher @ teacher.t() / self.temperature)[off].view(n, n - 1)
            s_logits = (student @ student.t() / self.temperature)[off].view(n, n - 1)
            term = F.kl_div(F.log_softmax(s_logits, dim=-1), F.softmax(t_logits, dim=-1), reduction="batchmean")
        return self.weight * term, {f"loss_distill_{self.mod}": term.item()}


def scene_teacher(caption_emb: np.ndarray, caption_image: np.ndarray, n_scenes: int) -> np.ndarray:
    """Text-only training batches are scenes (two captions each): a scene's teacher is the normalised mean of the
    teacher embeddings of its captions."""
    sums = np.zeros((n_scenes, caption_emb.shape[1]), dtype=np.float64)
    np.add.at(sums, caption_image, caption_emb)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("scene_teacher: a scene without captions")
    return (sums / norms).astype(np.float32)


def _flat(arrays: dict[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


def tower_of(keys: Sequence[str]) -> str | None:
    """The one tower ('img' / 'txt') all `keys` belong to, else None (a paired client's update, or nothing)."""
    towers = {k.split(".", 1)[0] for k in keys if "." in k}
    return towers.pop() if len(towers) == 1 and all("." in k for k in keys) else None


def agreement_weights(global_arrays: dict[str, np.ndarray], client_arrays: list[dict[str, np.ndarray]],
                      sizes: np.ndarray, paired: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weights, cosines): paired clients keep their size; a unimodal client's weight is its size times
    max(0, cos(its update, the paired clients' size-weighted mean update of its tower)). Cosines are NaN for paired
    clients, and for unimodal ones when no paired client sent that tower (their weight is then their size)."""
    sizes, paired = np.asarray(sizes, dtype=np.float64), np.asarray(paired, dtype=bool)
    weights, cosines = sizes.copy(), np.full(len(sizes), np.nan)
    for i, arrays in enumerate(client_arrays):
        if paired[i]:
            continue
        mod = tower_of(list(arrays))
        if mod is None:
            continue
        keys = sorted(arrays)
        donors = [j for j in np.flatnonzero(paired) if all(k in client_arrays[j] for k in keys)]
        if not donors or sizes[donors].sum() <= 0:
            continue
        ref = _flat(global_arrays, keys)
        mean = sum(sizes[j] * _flat(client_arrays[j], keys) for j in donors) / sizes[donors].sum() - ref
        own = _flat(arrays, keys) - ref
        denom = np.linalg.norm(own) * np.linalg.norm(mean)
        cosines[i] = float(own @ mean / denom) if denom > 0 else 0.0
        weights[i] = sizes[i] * max(0.0, cosines[i])
    return weights, cosines
