"""A fast dev screen of the hashing objective: one model trained on the whole train split, no Flower, no clients.

    python -m scripts.screen_centralized hash-bits=16 hash-temperature=0.3 [rounds=8] [KEY=VALUE ...]

The keys are run-config keys (`common.config`); the model and loss are the ones every method trains
(`common.model`, `common.losses`, `common.train.train_paired`) on the cached features of `cache-dir`. After every
`local-epochs` passes (2 here unless given) it scores dev (images vs captions, DERIVED concepts): standard Hamming
MAP both ways, the mean |bit mean| over items (1: every bit constant, the collapse the 16-bit grid cells showed) and
the continuous MAP.
A screen, not a result: one seed, centralized, dev only; it took ~3 s per 2 epochs on 2 cores, which is what made a
temperature sweep over 16 / 32 / 64 bits possible in minutes (docs/HASHING-CORE-SCREEN.md).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from common.backbones import Backbone
from common.config import RunConfig, parse_run_config
from common.data.datasets import backbone_for, load_split
from common.features import resolve_cache_dir, split_features
from common.metrics import ranked_map, standard_map
from common.model import XmrModel
from common.train import train_paired
from scripts.inproc import _value


def split(cfg: RunConfig, backbone: Backbone, name: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Features per modality, caption -> image index and the multi-hot labels of one split."""
    data = load_split(cfg.data_dir, name, data_keys=cfg.data_keys, cache_dir=resolve_cache_dir(cfg.cache_dir))
    feats = split_features(data, backbone, resolve_cache_dir(cfg.cache_dir))
    return feats, data.caption_image, data.labels.astype(np.float32)


def main(argv: list[str]) -> None:
    pairs = dict(a.split("=", 1) for a in argv)
    rounds = int(pairs.pop("rounds", 8))
    overrides = {"data-dir": "../shared/data/flickr8k", "cache-dir": ".cache/features", "hash-loss": "infonce",
                 "label-positives": 0.9, "hash-scale": 16.0, "hash-straight-through": True, "embed-dim": 512,
                 "adapter-dim": 256, "local-epochs": 2} | {k: _value(v) for k, v in pairs.items()}
    cfg = parse_run_config(overrides)
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    backbone = backbone_for(cfg.backbone, cfg.data_dir, cfg.data_keys)
    (train, train_caps, train_labels), (dev, dev_caps, dev_labels) = (split(cfg, backbone, "train"),
                                                                      split(cfg, backbone, "dev"))
    model = XmrModel(cfg.model_cfg(train["img"].shape[1], train["txt"].shape[1]))
    train_cfg = cfg.train_cfg()
    cap_labels = dev_labels[dev_caps]
    for r in range(1, rounds + 1):
        train_paired(model, train["img"], train["txt"], train_caps, train_cfg, rng, labels=train_labels)
        emb_i, code_i = model.encode("img", dev["img"])
        emb_t, code_t = model.encode("txt", dev["txt"])
        i2t, t2i = standard_map(code_i, code_t, dev_labels, cap_labels), standard_map(code_t, code_i, cap_labels,
                                                                                      dev_labels)
        print(f"round {r} ({r * cfg.local_epochs} epochs): dev Hamming MAP {i2t:.3f} / {t2i:.3f}, "
              f"|bit mean| {np.abs(code_i.mean(axis=0)).mean():.2f}, "
              f"continuous MAP {ranked_map(emb_i @ emb_t.T, dev_labels, cap_labels):.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
