"""Evaluate a model on a split's cached features: continuous Recall@K, Hamming Recall@K and hashing MAP."""

from __future__ import annotations

import numpy as np

from common.metrics import hamming_recalls, hash_maps, retrieval_recalls
from common.model import XmrModel


def evaluate_retrieval(model: XmrModel, img: np.ndarray, txt: np.ndarray, caption_image: np.ndarray,
                       labels: np.ndarray | None = None, standard_map: bool = True) -> dict[str, float]:
    """All retrieval metrics of one split.

    Keys: i2t_r{1,5,10}, t2i_r{1,5,10}, rsum (cosine ranking); hash_* the same on Hamming ranking of the sign
    codes (ties count against the query); with `labels` (DERIVED concept labels; a caption has its image's labels)
    also hash_map_i2t/t2i (MAP@all) and hash_mapr_i2t/t2i (MAP@R), both tie-aware (independent of the order inside
    Hamming-distance ties), and hash_smap_i2t/t2i: the standard MAP@all of the hashing papers (per-position AP of
    their `calc_map`, stable argsort with ties broken by database index), comparable to published numbers but
    dependent on the database order inside ties (see common.metrics).
    """
    img_emb, img_code = model.encode("img", img)
    txt_emb, txt_code = model.encode("txt", txt)
    out = retrieval_recalls(img_emb @ txt_emb.T, caption_image)
    out |= hamming_recalls(img_code, txt_code, caption_image, prefix="hash_")
    if labels is not None:
        out |= hash_maps(img_code, txt_code, labels, labels[caption_image], prefix="hash_", standard=standard_map)
    return out


def client_summary(clients: list[dict], types: dict[int, str]) -> dict[str, float]:
    """Per-client scores summarised overall and by client type: mean, worst (min) and std over clients, for the
    global model (`global-score`) and, where present, global + personal adapters (`personal-score`); mean and
    worst of the per-client Hamming MAP (`global-smap_i2t`, ...) over the clients that report it."""
    out: dict[str, float] = {}
    groups = {"all": clients} | {t: [c for c in clients if types.get(int(c["client-type"])) == t]
                                 for t in types.values()}
    for group, members in groups.items():
        for variant in ("global", "personal"):
            scores = np.array([c[f"{variant}-score"] for c in members if f"{variant}-score" in c])
            if len(scores):
                out |= {f"{group}-{variant}-mean": float(scores.mean()), f"{group}-{variant}-worst": float(scores.min()),
                        f"{group}-{variant}-std": float(scores.std()), f"{group}-{variant}-clients": float(len(scores))}
            for key in ("smap_i2t", "smap_t2i"):  # per-client Hamming MAP, over the clients with labels
                maps = np.array([c[f"{variant}-{key}"] for c in members if f"{variant}-{key}" in c])
                if len(maps):
                    out |= {f"{group}-{variant}-{key}-mean": float(maps.mean()),
                            f"{group}-{variant}-{key}-worst": float(maps.min())}
    return out
