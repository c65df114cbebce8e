"""Local training on cached features: the same loop serves every client and the centralized baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.losses import LossWeights, retrieval_loss
from common.model import XmrModel


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    proximal_mu: float = 0.0  # FedProx term weight; 0 disables it
    weights: LossWeights = LossWeights()


def train_paired(model: XmrModel, img: np.ndarray, txt: np.ndarray, caption_image: np.ndarray, cfg: TrainConfig,
                 rng: np.random.Generator) -> dict[str, float]:
    """Train on image-caption pairs for `cfg.epochs` passes over the images.

    Each pass visits every image once, paired with one of its captions drawn at random, so a batch never holds
    two captions of one image (which would be false negatives for InfoNCE). A fresh AdamW per call: the ClientApp
    keeps no optimizer state between rounds.
    """
    if len(img) < 2:
        raise ValueError(f"need at least 2 images to train with in-batch negatives, got {len(img)}")
    device = next(model.parameters()).device
    img_t = torch.as_tensor(img, dtype=torch.float32, device=device)
    txt_t = torch.as_tensor(txt, dtype=torch.float32, device=device)
    captions_of = [np.flatnonzero(caption_image == i) for i in range(len(img))]
    if any(len(c) == 0 for c in captions_of):
        raise ValueError("every image of the shard needs at least one caption")
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.epochs):
        order = rng.permutation(len(img))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:
                continue
            cap = np.array([rng.choice(captions_of[i]) for i in idx])
            img_emb, img_code = model.img(img_t[idx])
            txt_emb, txt_code = model.txt(txt_t[cap])
            loss, parts = retrieval_loss(img_emb, txt_emb, img_code, txt_code, model.scale(), cfg.weights)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                loss = loss + 0.5 * cfg.proximal_mu * prox
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {steps}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            for key, value in {"loss": loss.item(), **parts}.items():
                totals[key] = totals.get(key, 0.0) + value
    return {k: v / max(steps, 1) for k, v in totals.items()} | {"steps": float(steps)}
