"""Evaluate a model on a split's cached features: continuous Recall@K, Hamming Recall@K and hashing MAP."""

from __future__ import annotations

import numpy as np

from common.metrics import hamming_recalls, hash_maps, ranked_map, retrieval_recalls
from common.model import XmrModel


def evaluate_retrieval(model: XmrModel, img: np.ndarray, txt: np.ndarray, caption_image: np.ndarray,
                       labels: np.ndarray | None = None, standard_map: bool = True) -> dict[str, float]:
    """All retrieval metrics of one split.

    Keys: i2t_r{1,5,10}, t2i_r{1,5,10}, rsum (cosine ranking); hash_* the same on Hamming ranking of the sign
    codes (ties count against the query); code_abs_mean and code_sat_frac (mean |relaxed code| and the share of
    entries with |code| > 0.9: how binary the codes are before the sign). With `labels` (a caption has its image's
    labels; DERIVED concepts on Flickr8k) also hash_map_i2t/t2i (MAP@all) and hash_mapr_i2t/t2i (MAP@R), both
    tie-aware (independent of the order inside Hamming-distance ties), and, with `standard_map`, hash_smap_i2t/t2i:
    the standard MAP@all of the hashing papers (per-position AP of their `calc_map`, stable argsort with ties broken
    by database index), comparable to published numbers but dependent on the database order inside ties (see
    common.metrics); beside it emb_smap_i2t/t2i, the same MAP of the continuous embeddings (cosine ranking), and
    relaxed_smap_i2t/t2i, of the relaxed codes (cosine): what the sign loses is relaxed_smap - hash_smap.
    """
    img_emb, img_relaxed = model.encode_relaxed("img", img)
    txt_emb, txt_relaxed = model.encode_relaxed("txt", txt)
    img_code, txt_code = (np.where(c >= 0, 1, -1).astype(np.int8) for c in (img_relaxed, txt_relaxed))
    sim = img_emb @ txt_emb.T
    out = retrieval_recalls(sim, caption_image)
    out |= hamming_recalls(img_code, txt_code, caption_image, prefix="hash_")
    both = np.abs(np.concatenate([img_relaxed.ravel(), txt_relaxed.ravel()]))
    out |= {"code_abs_mean": float(both.mean()), "code_sat_frac": float((both > 0.9).mean())}
    if labels is not None:
        out |= hash_maps(img_code, txt_code, labels, labels[caption_image], prefix="hash_", standard=standard_map)
        if standard_map:
            txt_labels = labels[caption_image]
            relaxed = _unit(img_relaxed) @ _unit(txt_relaxed).T
            out |= {"emb_smap_i2t": ranked_map(sim, labels, txt_labels),
                    "emb_smap_t2i": ranked_map(sim.T, txt_labels, labels),
                    "relaxed_smap_i2t": ranked_map(relaxed, labels, txt_labels),
                    "relaxed_smap_t2i": ranked_map(relaxed.T, txt_labels, labels)}
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def client_summary(clients: list[dict], types: dict[int, str]) -> dict[str, float]:
    """Per-client scores summarised overall and by client type: mean, worst (min) and std over clients, for the
    global model (`global-score`) and, where present, global + personal adapters (`personal-score`); mean and
    worst of the per-client Hamming MAP (`global-smap_i2t`, ...; `global-own_smap_i2t`, ...: against the client's
    own train set) over the clients that report it."""
    out: dict[str, float] = {}
    groups = {"all": clients} | {t: [c for c in clients if types.get(int(c["client-type"])) == t]
                                 for t in types.values()}
    for group, members in groups.items():
        for variant in ("global", "personal"):
            scores = np.array([c[f"{variant}-score"] for c in members if f"{variant}-score" in c])
            if len(scores):
                out |= {f"{group}-{variant}-mean": float(scores.mean()), f"{group}-{variant}-worst": float(scores.min()),
                        f"{group}-{variant}-std": float(scores.std()), f"{group}-{variant}-clients": float(len(scores))}
            # per-client Hamming MAP over the clients with labels: against the shared gallery, and (test) against the
            # client's own train set (PLFedCMH's protocol)
            for key in ("smap_i2t", "smap_t2i", "own_smap_i2t", "own_smap_t2i"):
                maps = np.array([c[f"{variant}-{key}"] for c in members if f"{variant}-{key}" in c])
                if len(maps):
                    out |= {f"{group}-{variant}-{key}-mean": float(maps.mean()),
                            f"{group}-{variant}-{key}-worst": float(maps.min())}
    return out
