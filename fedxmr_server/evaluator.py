"""Server-side evaluation on the shared dev and test splits (the public benchmark the server holds).

Every round the global model is scored on dev; the round with the best dev rsum is kept, and only that model is
scored on test, once, at the end (model selection never looks at test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from common.backbones import Backbone
from common.config import RunConfig
from common.data.flickr8k import RetrievalSplit, load_split
from common.evaluate import evaluate_retrieval
from common.features import resolve_cache_dir, split_features
from common.model import XmrModel, load_numpy_state

SELECT_KEY = "rsum"


@dataclass
class _Split:
    data: RetrievalSplit
    feats: dict[str, np.ndarray]


@dataclass
class ServerEvaluator:
    cfg: RunConfig
    backbone: Backbone
    best_round: int = -1
    best_score: float = -math.inf
    best_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    best_dev: dict[str, float] = field(default_factory=dict)
    _splits: dict[str, _Split] = field(default_factory=dict)

    def _split(self, name: str) -> _Split:
        if name not in self._splits:
            data = load_split(self.cfg.data_dir, name, self.cfg.max_eval_images)
            feats = split_features(data, self.backbone, resolve_cache_dir(self.cfg.cache_dir),
                                   batch_size=self.cfg.encode_batch_size)
            self._splits[name] = _Split(data, feats)
        return self._splits[name]

    def _model(self, arrays: dict[str, np.ndarray]) -> XmrModel:
        model = XmrModel(self.cfg.model_cfg(self.backbone.img_dim, self.backbone.txt_dim))
        load_numpy_state(model, arrays)
        return model

    def score(self, arrays: dict[str, np.ndarray], split: str) -> dict[str, float]:
        s = self._split(split)
        return evaluate_retrieval(self._model(arrays), s.feats["img"], s.feats["txt"], s.data.caption_image,
                                  s.data.labels)

    def gallery(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The shared test gallery embedded by the global model, for per-client evaluation on the nodes (reported
        per client; never used for model selection)."""
        s, model = self._split("test"), self._model(arrays)
        return {"img-emb": model.encode("img", s.feats["img"])[0], "txt-emb": model.encode("txt", s.feats["txt"])[0],
                "caption-image": s.data.caption_image}

    def dev_round(self, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """Score on dev and remember the model if it is the best so far (ties keep the earlier round)."""
        metrics = self.score(arrays, "dev")
        if metrics[SELECT_KEY] > self.best_score:
            self.best_round, self.best_score = server_round, metrics[SELECT_KEY]
            self.best_arrays = {k: v.copy() for k, v in arrays.items()}
            self.best_dev = metrics
        return metrics

    def test_best(self) -> dict[str, float]:
        if not self.best_arrays:
            raise RuntimeError("no round was evaluated on dev, so there is no model to test")
        return self.score(self.best_arrays, "test")
