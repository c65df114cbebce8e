"""Local training on cached features: the same loops serve every client type and the centralized baseline.

- paired clients: image-caption InfoNCE (+ hashing terms), `train_paired`;
- unimodal clients, `train_unimodal`: text-only clients contrast two captions of the same scene; image-only
  clients contrast two dropout views of the same image (SimCSE-style) — the only signal they have without pairs;
- personal adapters: the same losses with `personal=True`, optimising only the personal adapters (the shared
  towers stay fixed, so the uploaded update is the same with or without personalisation). A client uses them to
  query a gallery embedded by the *global* model, so they are trained that way: the personal side of each pair
  is contrasted with the global embedding of its counterpart.
- method terms: a method adds its own terms to the shared objective as `LossTerm`s (FedProx's proximal term,
  RCSR's prototype anchoring, FedProto's prototype distance, MOON's model contrast, FedCAFE's enhancement terms);
  the trainer knows none of them. They see the batch (`Batch`: embeddings, items, tower inputs) and apply to
  shared training only, not to the personal phase.
- labels: with `labels` (multi-hot per item), the pairwise hash loss (`hash-loss = "pairwise"`) counts two items
  sharing a label as similar; without them only an item and its own counterpart are.
A fresh AdamW per call (`common.optim`, not torch.optim: see there why): the ClientApp keeps no optimizer
state between rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.losses import LossWeights, retrieval_loss
from common.model import XmrModel, upload_keys
from common.parts import personal as personal_part
from common.optim import AdamW, decays

INPUT_DROPOUT = 0.1  # extra feature dropout that makes the two views of an image differ


@dataclass(frozen=True)
class Batch:
    """What a loss term sees of one batch: the shared embeddings per modality (with gradient), the batch's item
    indices (images, or scenes for text-only training) into the shard, and the tower inputs per modality (frozen
    features as fed to the towers), so that a term can run a teacher model on the very same inputs."""

    embs: dict[str, torch.Tensor]
    items: np.ndarray
    inputs: dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    weights: LossWeights = LossWeights()


class LossTerm(Protocol):
    """An extra term of a method, added to each batch's loss. Returns None where it does not apply to the batch."""

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict] | None: ...


BatchLoss = Callable[[np.ndarray], tuple[torch.Tensor, dict, Batch]]


def trainable(model: XmrModel, modalities: tuple[str, ...], personal: bool) -> list[torch.nn.Parameter]:
    """Shared parameters of `modalities` (+ temperature if paired), or only their personal adapters."""
    named = dict(model.named_parameters())
    if personal:
        keys = [k for k in named if any(k.startswith(f"{m}.{personal_part.NAME}.") for m in modalities)]
    else:
        keys = upload_keys(named, modalities)
    return [named[k] for k in keys if named[k].requires_grad]


def _optimise(model: XmrModel, params: list[torch.nn.Parameter], n_items: int, cfg: TrainConfig,
              rng: np.random.Generator, batch_loss: BatchLoss, terms: Sequence[LossTerm]) -> dict:
    if n_items < 2:
        raise ValueError(f"need at least 2 training items for in-batch negatives, got {n_items}")
    opt = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, decay=decays(params))
    model.train()
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.epochs):
        order = rng.permutation(n_items)
        for start in range(0, n_items, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:
                continue
            loss, parts, batch = batch_loss(idx)
            for term in terms:
                extra = term(batch)
                if extra is not None:
                    loss, parts = loss + extra[0], parts | extra[1]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {steps}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.clamp_temperature()
            steps += 1
            for key, value in {"loss": loss.item(), **parts}.items():
                totals[key] = totals.get(key, 0.0) + value
    return {k: v / max(steps, 1) for k, v in totals.items()} | {"steps": float(steps)}


def labels_of(labels: np.ndarray | None, items: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """The batch's multi-hot label rows (float), for the label-aware hash terms; None without labels."""
    if labels is None or labels.shape[1] == 0:
        return None
    return torch.as_tensor(labels[items], dtype=torch.float32, device=device)


def _captions_of(caption_image: np.ndarray, n_images: int) -> list[np.ndarray]:
    groups = [np.flatnonzero(caption_image == i) for i in range(n_images)]
    if any(len(g) == 0 for g in groups):
        raise ValueError("every image of the shard needs at least one caption")
    return groups


def train_paired(model: XmrModel, img: np.ndarray, txt: np.ndarray, caption_image: np.ndarray, cfg: TrainConfig,
                 rng: np.random.Generator, personal: bool = False, terms: Sequence[LossTerm] = (),
                 labels: np.ndarray | None = None) -> dict[str, float]:
    """Image-caption pairs, `cfg.epochs` passes over the images; each pass pairs every image with one of its
    captions at random, so a batch never holds two captions of one image (false negatives for InfoNCE).
    `labels`: per image, for the pairwise hash loss."""
    device = next(model.parameters()).device
    img_t = torch.as_tensor(img, dtype=torch.float32, device=device)
    txt_t = torch.as_tensor(txt, dtype=torch.float32, device=device)
    groups = _captions_of(caption_image, len(img))

    def batch_loss(idx: np.ndarray) -> tuple[torch.Tensor, dict, Batch]:
        cap = np.array([rng.choice(groups[i]) for i in idx])
        img, txt = img_t[idx], txt_t[cap]
        lab = labels_of(labels, idx, device)
        if not personal:
            (img_e, img_c), (txt_e, txt_c) = model.img(img), model.txt(txt)
            loss, parts = retrieval_loss(img_e, txt_e, img_c, txt_c, model.scale(), cfg.weights, lab)
            return loss, parts, Batch({"img": img_e, "txt": txt_e}, idx, {"img": img, "txt": txt})
        # personal image queries vs global captions, and personal caption queries vs global images
        with torch.no_grad():
            img_g, txt_g = model.img(img), model.txt(txt)
        (img_p, img_pc), (txt_p, txt_pc) = model.img(img, personal_part.NAME), model.txt(txt, personal_part.NAME)
        loss_i, parts_i = retrieval_loss(img_p, txt_g[0], img_pc, txt_g[1], model.scale(), cfg.weights, lab)
        loss_t, parts_t = retrieval_loss(img_g[0], txt_p, img_g[1], txt_pc, model.scale(), cfg.weights, lab)
        return 0.5 * (loss_i + loss_t), {k: 0.5 * (parts_i[k] + parts_t[k]) for k in parts_i}, Batch({}, idx, {})

    return _optimise(model, trainable(model, ("img", "txt"), personal), len(img), cfg, rng, batch_loss,
                     () if personal else terms)


def train_unimodal(model: XmrModel, modality: str, feats: np.ndarray, cfg: TrainConfig, rng: np.random.Generator,
                   caption_image: np.ndarray | None = None, personal: bool = False,
                   terms: Sequence[LossTerm] = (), labels: np.ndarray | None = None) -> dict[str, float]:
    """One modality only. Text: two different captions of a scene are a positive pair (`caption_image` groups
    them; with one text per scene, two dropout views of it). Images: two dropout views of one image are a positive
    pair. With `personal`, the first view goes
    through the personal adapter and the second is the fixed global embedding. `labels`: per scene (image), for
    the pairwise hash loss."""
    device = next(model.parameters()).device
    x = torch.as_tensor(feats, dtype=torch.float32, device=device)
    tower = model.tower(modality)
    if modality == "txt" and caption_image is None:
        raise ValueError("text-only training needs caption_image to know which captions share a scene")
    all_groups = _captions_of(caption_image, int(caption_image.max()) + 1) if modality == "txt" else []
    if any(len(g) >= 2 for g in all_groups):
        scenes = np.array([i for i, g in enumerate(all_groups) if len(g) >= 2], dtype=np.int64)
        groups = [all_groups[i] for i in scenes]
        n_items = len(groups)

        def views(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            pairs = np.array([rng.choice(groups[i], size=2, replace=False) for i in idx])
            return x[pairs[:, 0]], x[pairs[:, 1]]
    else:  # images, or one text per scene (precomputed-feature datasets): two dropout views of each item
        n_items = len(feats)
        scenes = caption_image if modality == "txt" else np.arange(n_items)

        def views(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            return F.dropout(x[idx], INPUT_DROPOUT), F.dropout(x[idx], INPUT_DROPOUT)

    def batch_loss(idx: np.ndarray) -> tuple[torch.Tensor, dict, Batch]:
        a, b = views(idx)
        a_emb, a_code = tower(a, personal_part.NAME if personal else None)
        with torch.set_grad_enabled(not personal):  # personal: the second view is the global embedding
            b_emb, b_code = tower(b)
        loss, parts = retrieval_loss(a_emb, b_emb, a_code, b_code, model.scale().detach(), cfg.weights,
                                     labels_of(labels, scenes[idx], device))
        if personal:
            return loss, parts, Batch({}, scenes[idx], {})
        return loss, parts, Batch({modality: a_emb}, scenes[idx], {modality: a})

    return _optimise(model, trainable(model, (modality,), personal), n_items, cfg, rng, batch_loss,
                     () if personal else terms)
