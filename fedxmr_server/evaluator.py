"""Server-side evaluation on the shared dev and test splits (the public benchmark the server holds).

Every round the global model is scored on dev; the strategy keeps the round with the best dev score, and only that
model is scored on test, once, at the end (model selection never looks at test).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.backbones import Backbone
from common.config import RunConfig
from common.data.datasets import concept_count, load_split
from common.data.flickr8k import RetrievalSplit
from common.evaluate import evaluate_retrieval
from common.features import resolve_cache_dir, split_features
from common.model import XmrModel, load_numpy_state


@dataclass
class _Split:
    data: RetrievalSplit
    feats: dict[str, np.ndarray]


@dataclass
class ServerEvaluator:
    """Scores models on the shared splits and builds the galleries sent for per-client evaluation."""

    cfg: RunConfig
    backbone: Backbone
    _splits: dict[str, _Split] = field(default_factory=dict)
    _last_gallery: tuple[object, str, dict[str, np.ndarray]] | None = None

    @property
    def concepts(self) -> int:
        return concept_count(self.cfg.data_dir, self.cfg.data_keys)  # the feature file is read once (lru_cache)

    def _split(self, name: str) -> _Split:
        if name not in self._splits:
            data = load_split(self.cfg.data_dir, name, self.cfg.max_eval_images, data_keys=self.cfg.data_keys,
                              cache_dir=resolve_cache_dir(self.cfg.cache_dir))
            feats = split_features(data, self.backbone, resolve_cache_dir(self.cfg.cache_dir),
                                   batch_size=self.cfg.encode_batch_size)
            self._splits[name] = _Split(data, feats)
        return self._splits[name]

    def _model(self, arrays: dict[str, np.ndarray]) -> XmrModel:
        model = XmrModel(self.cfg.model_cfg(self.backbone.img_dim, self.backbone.txt_dim, concepts=self.concepts))
        load_numpy_state(model, arrays)
        return model

    def score(self, arrays: dict[str, np.ndarray], split: str) -> dict[str, float]:
        """All metrics of `split`; the standard MAP (half the scoring time) only on test, which is scored once."""
        s = self._split(split)
        return evaluate_retrieval(self._model(arrays), s.feats["img"], s.feats["txt"], s.data.caption_image,
                                  s.data.labels, standard_map=split == "test")

    def gallery(self, arrays: dict[str, np.ndarray] | None, split: str) -> dict[str, np.ndarray]:
        """The shared gallery of `split` for per-client evaluation: its labels per image (`label`: DERIVED on
        Flickr8k), embedded and hashed by `arrays` (`img-emb`, `txt-emb`, `img-code`, `txt-code`), or, for methods
        whose models stay on the nodes (`arrays` None), the raw frozen features (`img-feat`, `txt-feat`)
        that each node embeds itself.
        Never used for model selection on the server. The last gallery is cached, so that every node of a round is
        sent the same one without re-embedding it."""
        if self._last_gallery is not None and self._last_gallery[0] is arrays and self._last_gallery[1] == split:
            return self._last_gallery[2]
        s = self._split(split)
        out = {"caption-image": s.data.caption_image, "label": s.data.labels}
        if arrays is None:
            out |= {"img-feat": s.feats["img"], "txt-feat": s.feats["txt"]}
        else:
            model = self._model(arrays)
            for mod in ("img", "txt"):
                out[f"{mod}-emb"], out[f"{mod}-code"] = model.encode(mod, s.feats[mod])
        self._last_gallery = (arrays, split, out)
        return out
