"""Server-side evaluation on the shared dev and test splits (the public benchmark the server holds).

Every round the global model is scored on dev; the strategy keeps the round with the best dev score, and only that
model is scored on test, once, at the end (model selection never looks at test).

Run config key `gallery` sets the database of the test split's label MAPs (hash_map*, hash_mapr*, hash_smap*):
- "test": the test split itself (test queries vs test items);
- "retrieval": the hashing papers' retrieval set, test queries vs the train split's items followed by the test
  split's (train as the run trains on it, capped by max-train-images; test by max-eval-images). i2t ranks the
  captions of both splits, t2i their images, so Flickr8k and Karpathy data work as feature files do. The standard
  MAP breaks Hamming ties by database index: train items rank before test items at equal distance.
R@K stays test vs test (its ground truth is the query's own item), and dev is always scored within dev.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.backbones import Backbone, resolve_device
from common.config import RunConfig
from common.data.datasets import concept_count, load_split
from common.data.split import RetrievalSplit
from common.evaluate import evaluate_retrieval
from common.features import resolve_cache_dir, split_features
from common.metrics import mean_average_precision, standard_map
from common.model import XmrModel, load_numpy_state


@dataclass
class _Split:
    data: RetrievalSplit
    feats: dict[str, np.ndarray]


@dataclass
class Database:
    """The retrieval set's codes and labels (one row per image / per caption), in database order."""

    img_code: np.ndarray
    txt_code: np.ndarray
    img_labels: np.ndarray
    txt_labels: np.ndarray


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
            cap = self.cfg.max_train_images if name == "train" else self.cfg.max_eval_images  # as the run trains
            data = load_split(self.cfg.data_dir, name, cap, data_keys=self.cfg.data_keys,
                              cache_dir=resolve_cache_dir(self.cfg.cache_dir))
            feats = split_features(data, self.backbone, resolve_cache_dir(self.cfg.cache_dir),
                                   batch_size=self.cfg.encode_batch_size)
            self._splits[name] = _Split(data, feats)
        return self._splits[name]

    def _model(self, arrays: dict[str, np.ndarray]) -> XmrModel:
        model = XmrModel(self.cfg.model_cfg(self.backbone.img_dim, self.backbone.txt_dim, concepts=self.concepts))
        load_numpy_state(model, arrays)
        return model.to(resolve_device(self.cfg.device))  # the run's device: scoring is the server's heavy part

    def score(self, arrays: dict[str, np.ndarray], split: str) -> dict[str, float]:
        """All metrics of `split`, the standard MAPs included on dev too (about half the scoring time), since
        `select-on` may select on them. With `gallery` "retrieval", test's Hamming label MAPs rank the retrieval set
        (module docstring); the continuous and relaxed MAPs stay test against test."""
        s = self._split(split)
        model = self._model(arrays)
        out = evaluate_retrieval(model, s.feats["img"], s.feats["txt"], s.data.caption_image, s.data.labels,
                                 standard_map=True)
        if split == "test" and self.cfg.gallery == "retrieval":
            out |= self._retrieval_maps(model, s)
        return out

    def database(self, model: XmrModel) -> Database:
        """The retrieval set (train then test items) hashed by `model`; codes are encoded split by split, so the
        train split's features are never concatenated."""
        parts = [self._split("train"), self._split("test")]
        img = [model.encode("img", p.feats["img"])[1] for p in parts]
        txt = [model.encode("txt", p.feats["txt"])[1] for p in parts]
        return Database(np.concatenate(img), np.concatenate(txt), np.concatenate([p.data.labels for p in parts]),
                        np.concatenate([p.data.labels[p.data.caption_image] for p in parts]))

    def _retrieval_maps(self, model: XmrModel, test: _Split) -> dict[str, float]:
        """hash_map*, hash_mapr*, hash_smap* of the test queries (images for i2t, captions for t2i) against the
        retrieval set: the keys of `common.metrics.hash_maps`, replacing their test-vs-test values."""
        db = self.database(model)
        img, txt = model.encode("img", test.feats["img"])[1], model.encode("txt", test.feats["txt"])[1]
        img_lab, txt_lab = test.data.labels, test.data.labels[test.data.caption_image]
        i2t, t2i = (img, db.txt_code, img_lab, db.txt_labels), (txt, db.img_code, txt_lab, db.img_labels)
        return {"hash_map_i2t": mean_average_precision(*i2t), "hash_map_t2i": mean_average_precision(*t2i),
                "hash_mapr_i2t": mean_average_precision(*i2t, at_r=True),
                "hash_mapr_t2i": mean_average_precision(*t2i, at_r=True),
                "hash_smap_i2t": standard_map(*i2t), "hash_smap_t2i": standard_map(*t2i)}

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
