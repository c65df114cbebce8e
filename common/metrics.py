"""Retrieval metrics for image-text retrieval: Recall@K on real-valued or hash
similarities, and mean average precision (MAP@all, MAP@R, and the hashing papers'
standard MAP@all) over Hamming ranking.

Recall@K (Flickr protocol, every image has >= 1 captions, usually 5)
    ``sim`` is an (n_images, n_captions) score matrix, higher = more similar;
    ``caption_image[j]`` is the image caption ``j`` belongs to.
    * image->text: each image ranks all captions; a hit at K if ANY of its own
      captions is in the top K.
    * text->image: each caption ranks all images; a hit at K if its own image
      is in the top K.
    R@K is the percentage (0..100) of queries with a hit. Keys: ``i2t_r{k}``,
    ``t2i_r{k}`` and, from ``retrieval_recalls``/``hamming_recalls``, ``rsum``
    (sum of all i2t and t2i R@K values), all preceded by ``prefix``.

    Ties are counted against the query (pessimistic): the rank of a query is
    ``1 + #(non-ground-truth items scoring >= the best ground-truth score)``.
    Other ground-truth items (the image's other captions) never push the rank
    down. A constant score matrix therefore gives R@1 = 0 for every query that
    has any non-ground-truth item, so degenerate models cannot score by luck.
    ``hamming_recalls`` applies the same rule with score = -Hamming distance,
    where ties are common.

Hash codes are (n, bits) arrays of +-1 (any numeric dtype; 0/1 codes are
rejected). Hamming distance is ``(bits - q . d) / 2``, exact integers (float32
matmul, exact for bits < 2**24).

Mean average precision (returned as a fraction in [0, 1])
    Relevance: query and db item share at least one label (multi-hot 0/1
    labels). Items are ranked by Hamming distance; all items at one distance d
    form a tie group, and every relevant item of that group gets the precision
    at the END of the group, ``P_d = #relevant(dist <= d) / #items(dist <= d)``.
    AP thus does not depend on the (arbitrary) order inside ties and equals the
    textbook AP when there are no ties. With R = #relevant db items of a query,
    rel_d / n_d = relevant / all items at distance d, and n_<d = #items closer:
    * MAP@all: ``AP = (1/R) * sum_d rel_d * P_d``.
    * MAP@R (Musgrave et al., 2020): only the top R ranks count,
      ``AP@R = (1/R) * sum_d w_d * rel_d * P_d`` with
      ``w_d = clip((R - n_<d) / n_d, 0, 1)``, the expected fraction of the group
      that falls inside the top R under a random order within the group.
    * Standard MAP@all (``standard_map``, keys ``smap_*``): the variant reported
      by the hashing papers (DCMH, SSAH, ...), i.e. the per-position AP of their
      evaluation code ``calc_map``. The db is sorted by Hamming distance with a
      STABLE argsort, so ties are broken by ascending db index, and every
      relevant item gets the precision at its own position:
      ``AP = (1/R) * sum_{k: item k relevant} #relevant(rank <= k) / k``.
      Unlike the tie-aware MAP above, this value depends on the database order
      inside tie groups (permuting the db can change it); the two agree when
      there are no ties among a query's distances. Two deliberate differences
      from the original ``calc_map``: it calls ``np.argsort`` with the default
      (unstable) kind, so its order inside ties is implementation-defined, here
      it is fixed to db index order for reproducibility; and it divides by ALL
      queries, while here queries without a relevant item are excluded (as for
      the tie-aware MAP), which gives a higher value when such queries exist.
    Queries with no relevant db item are excluded from the mean; if no query
    has a relevant item the result is NaN.

All functions are vectorised and process queries in blocks of ``CHUNK`` rows
to bound memory; invalid input raises ValueError naming the argument.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CHUNK = 1024

Ks = Sequence[int]


def _check_ks(ks: Ks) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive integers, got {ks}")
    return ks


def _check_sim(sim: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate the protocol inputs; a silent mismatch would give plausible but wrong recalls."""
    sim = np.asarray(sim)
    cap = np.asarray(caption_image)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"sim must be a non-empty 2-D (n_images, n_captions) array, got shape {sim.shape}")
    if not np.all(np.isfinite(sim)):
        raise ValueError("sim contains NaN or infinite values")
    if cap.ndim != 1 or not np.issubdtype(cap.dtype, np.integer):
        raise ValueError(f"caption_image must be a 1-D integer array, got {cap.shape} {cap.dtype}")
    n_img, n_cap = sim.shape
    if cap.shape[0] != n_cap:
        raise ValueError(f"caption_image has {cap.shape[0]} entries but sim has {n_cap} columns")
    if cap.min() < 0 or cap.max() >= n_img:
        raise ValueError(f"caption_image values must lie in [0, {n_img}) (sim has {n_img} rows)")
    if np.any(np.bincount(cap, minlength=n_img) == 0):
        raise ValueError("caption_image leaves some image (row of sim) without any caption")
    return sim, cap.astype(np.int64)


def _pessimistic_ranks(scores: np.ndarray, query_ids: np.ndarray, db_ids: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best ground-truth item (gt: query_ids[q] == db_ids[d]),
    counting every non-gt item with score >= that best score as ranked ahead."""
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    for a in range(0, scores.shape[0], CHUNK):
        s = np.asarray(scores[a:a + CHUNK], dtype=np.float64)
        gt = query_ids[a:a + CHUNK, None] == db_ids[None, :]
        best = np.where(gt, s, -np.inf).max(axis=1)
        ranks[a:a + CHUNK] = 1 + ((s >= best[:, None]) & ~gt).sum(axis=1)
    return ranks


def _recalls(ranks: np.ndarray, ks: tuple[int, ...], name: str) -> dict[str, float]:
    return {f"{name}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in ks}


def recall_at_k_i2t(sim: np.ndarray, caption_image: np.ndarray, ks: Ks = (1, 5, 10)) -> dict[str, float]:
    """Image->text R@K in percent, keys ``i2t_r{k}``."""
    sim, cap = _check_sim(sim, caption_image)
    ranks = _pessimistic_ranks(sim, np.arange(sim.shape[0]), cap)
    return _recalls(ranks, _check_ks(ks), "i2t")


def recall_at_k_t2i(sim: np.ndarray, caption_image: np.ndarray, ks: Ks = (1, 5, 10)) -> dict[str, float]:
    """Text->image R@K in percent, keys ``t2i_r{k}``."""
    sim, cap = _check_sim(sim, caption_image)
    ranks = _pessimistic_ranks(sim.T, cap, np.arange(sim.shape[0]))
    return _recalls(ranks, _check_ks(ks), "t2i")


def query_recalls(scores: np.ndarray, query_ids: np.ndarray, db_ids: np.ndarray, name: str,
                  ks: Ks = (1, 5, 10)) -> dict[str, float]:
    """R@K (percent, keys ``{name}_r{k}``) for any queries against a gallery: item d is a hit for query q when
    ``query_ids[q] == db_ids[d]``; ties count against the query. Used for a client's own queries against the
    shared test gallery."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape != (len(query_ids), len(db_ids)):
        raise ValueError(f"scores has shape {scores.shape}, expected ({len(query_ids)}, {len(db_ids)})")
    return _recalls(_pessimistic_ranks(scores, np.asarray(query_ids), np.asarray(db_ids)), _check_ks(ks), name)


def retrieval_recalls(sim: np.ndarray, caption_image: np.ndarray, ks: Ks = (1, 5, 10),
                      prefix: str = "") -> dict[str, float]:
    """Both directions plus ``rsum`` (sum of all R@K), each key prefixed with ``prefix``."""
    out = {**recall_at_k_i2t(sim, caption_image, ks), **recall_at_k_t2i(sim, caption_image, ks)}
    out["rsum"] = float(sum(out.values()))
    return {f"{prefix}{k}": v for k, v in out.items()}


def _check_codes(codes: np.ndarray, name: str) -> np.ndarray:
    """Return codes as float32 (exact for +-1 and dot products below 2**24); reject
    non-+-1 values because 0/1 codes would silently give wrong distances."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D (n, bits) array with bits >= 1, got shape {codes.shape}")
    if not np.all((codes == 1) | (codes == -1)):
        raise ValueError(f"{name} must contain only +1 and -1")
    return codes.astype(np.float32)


def _check_pair(q: np.ndarray, db: np.ndarray, q_name: str, db_name: str) -> tuple[np.ndarray, np.ndarray]:
    q, db = _check_codes(q, q_name), _check_codes(db, db_name)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"{q_name} has {q.shape[1]} bits but {db_name} has {db.shape[1]} bits")
    return q, db


def _hamming(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    return np.rint((q.shape[1] - q @ db.T) / 2).astype(np.int64)


def hamming_distance(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Exact (n_q, n_db) int64 Hamming distances between +-1 codes."""
    q, db = _check_pair(query_codes, db_codes, "query_codes", "db_codes")
    return _hamming(q, db)


def hamming_recalls(img_codes: np.ndarray, txt_codes: np.ndarray, caption_image: np.ndarray,
                    ks: Ks = (1, 5, 10), prefix: str = "") -> dict[str, float]:
    """``retrieval_recalls`` with score = -Hamming distance (ties pessimistic)."""
    img, txt = _check_pair(img_codes, txt_codes, "img_codes", "txt_codes")
    return retrieval_recalls(-_hamming(img, txt), caption_image, ks, prefix)


def _check_map_inputs(q_codes: np.ndarray, db_codes: np.ndarray, q_labels: np.ndarray,
                      db_labels: np.ndarray, names: tuple[str, str, str, str]) -> tuple[np.ndarray, ...]:
    """Validate codes and multi-hot labels; labels are returned as float32 (exact 0/1 dot products)."""
    q, db = _check_pair(q_codes, db_codes, names[0], names[1])
    labs = []
    for lab, n, name, codes_name in ((q_labels, q.shape[0], names[2], names[0]),
                                     (db_labels, db.shape[0], names[3], names[1])):
        lab = np.asarray(lab)
        if lab.ndim != 2 or lab.shape[0] != n:
            raise ValueError(f"{name} must be 2-D with {n} rows (as {codes_name}), got shape {lab.shape}")
        if not np.all((lab == 0) | (lab == 1)):
            raise ValueError(f"{name} must be multi-hot with values 0/1")
        labs.append(lab.astype(np.float32))
    if labs[0].shape[1] != labs[1].shape[1]:
        raise ValueError(f"{names[2]} has {labs[0].shape[1]} labels but {names[3]} has {labs[1].shape[1]}")
    return q, db, labs[0], labs[1]


def _map(q: np.ndarray, db: np.ndarray, q_lab: np.ndarray, db_lab: np.ndarray, at_r: bool) -> float:
    """Tie-group MAP from per-query histograms over the bits+1 possible distances."""
    nb = q.shape[1] + 1
    ap_sum, n_valid = 0.0, 0
    for a in range(0, q.shape[0], CHUNK):
        dist = _hamming(q[a:a + CHUNK], db)
        rel = (q_lab[a:a + CHUNK] @ db_lab.T) > 0
        m = dist.shape[0]
        idx = (dist + nb * np.arange(m)[:, None]).ravel()
        n_d = np.bincount(idx, minlength=m * nb).reshape(m, nb).astype(np.float64)
        rel_d = np.bincount(idx, weights=rel.ravel(), minlength=m * nb).reshape(m, nb)
        cum_all, cum_rel = np.cumsum(n_d, axis=1), np.cumsum(rel_d, axis=1)
        r = cum_rel[:, -1]
        contrib = rel_d * cum_rel / np.maximum(cum_all, 1.0)  # rel_d = 0 wherever cum_all = 0
        if at_r:
            contrib *= np.clip((r[:, None] - (cum_all - n_d)) / np.maximum(n_d, 1.0), 0.0, 1.0)
        valid = r > 0
        ap_sum += float((contrib.sum(axis=1)[valid] / r[valid]).sum())
        n_valid += int(valid.sum())
    return ap_sum / n_valid if n_valid else float("nan")


def _sorted_ap(rel_sorted: np.ndarray) -> tuple[float, int]:
    """Sum of the per-query APs of ranked relevance rows (precision at each relevant position) and how many queries
    have a relevant item (the others are left out of the mean)."""
    pos = np.arange(1, rel_sorted.shape[1] + 1, dtype=np.float64)
    cum_rel = np.cumsum(rel_sorted, axis=1, dtype=np.float64)
    r = cum_rel[:, -1]
    valid = r > 0
    prec_sum = np.where(rel_sorted, cum_rel / pos, 0.0).sum(axis=1)
    return float((prec_sum[valid] / r[valid]).sum()), int(valid.sum())


def _smap(q: np.ndarray, db: np.ndarray, q_lab: np.ndarray, db_lab: np.ndarray) -> float:
    """Standard MAP@all: stable argsort on Hamming distance (ties by db index), precision at each relevant rank."""
    # small-integer distances let numpy's stable sort use radix sort; the order is the same for any int dtype
    dtype = np.int16 if q.shape[1] < np.iinfo(np.int16).max else np.int64
    ap_sum, n_valid = 0.0, 0
    for a in range(0, q.shape[0], CHUNK):
        dist = _hamming(q[a:a + CHUNK], db).astype(dtype)
        rel = (q_lab[a:a + CHUNK] @ db_lab.T) > 0
        order = np.argsort(dist, axis=1, kind="stable")
        ap, n = _sorted_ap(np.take_along_axis(rel, order, axis=1))
        ap_sum, n_valid = ap_sum + ap, n_valid + n
    return ap_sum / n_valid if n_valid else float("nan")


def standard_map(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                 db_labels: np.ndarray) -> float:
    """Standard MAP@all of the hashing papers (``calc_map``), in [0, 1]: stable argsort on Hamming distance
    (ties broken by ascending db index), AP = mean precision at the relevant positions. Depends on the db order
    inside ties; see the module docstring."""
    args = _check_map_inputs(query_codes, db_codes, query_labels, db_labels,
                             ("query_codes", "db_codes", "query_labels", "db_labels"))
    return _smap(*args)


def mean_average_precision(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                           db_labels: np.ndarray, at_r: bool = False) -> float:
    """MAP@all (or MAP@R if ``at_r``) over Hamming ranking, tie-group precision, in [0, 1]."""
    args = _check_map_inputs(query_codes, db_codes, query_labels, db_labels,
                             ("query_codes", "db_codes", "query_labels", "db_labels"))
    return _map(*args, at_r=at_r)


def hash_maps(img_codes: np.ndarray, txt_codes: np.ndarray, img_labels: np.ndarray,
              txt_labels: np.ndarray, prefix: str = "", standard: bool = True) -> dict[str, float]:
    """Tie-aware MAP@all (``map_*``), MAP@R (``mapr_*``) and, with ``standard``, the standard stable-argsort MAP@all
    (``smap_*``; it sorts every query's whole database, about half the cost), in both directions (``*_i2t``: image
    queries vs text db, ``*_t2i``: the reverse), keys preceded by ``prefix``."""
    img, txt, img_lab, txt_lab = _check_map_inputs(img_codes, txt_codes, img_labels, txt_labels,
                                                   ("img_codes", "txt_codes", "img_labels", "txt_labels"))
    out = {
        f"{prefix}map_i2t": _map(img, txt, img_lab, txt_lab, at_r=False),
        f"{prefix}map_t2i": _map(txt, img, txt_lab, img_lab, at_r=False),
        f"{prefix}mapr_i2t": _map(img, txt, img_lab, txt_lab, at_r=True),
        f"{prefix}mapr_t2i": _map(txt, img, txt_lab, img_lab, at_r=True),
    }
    if standard:
        out |= {f"{prefix}smap_i2t": _smap(img, txt, img_lab, txt_lab),
                f"{prefix}smap_t2i": _smap(txt, img, txt_lab, img_lab)}
    return out


def ranked_map(scores: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray) -> float:
    """Standard MAP@all over a real-valued ranking (higher score = earlier; ties by ascending db index, as
    ``standard_map``): the label MAP of continuous embeddings or relaxed codes, the ceiling their sign codes are
    measured against. ``scores`` is (n_q, n_db)."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (queries x database), got shape {scores.shape}")
    q_lab = np.asarray(query_labels, dtype=np.float32)
    db_lab = np.asarray(db_labels, dtype=np.float32)
    if q_lab.shape[0] != scores.shape[0] or db_lab.shape[0] != scores.shape[1] or q_lab.shape[1] != db_lab.shape[1]:
        raise ValueError(f"labels {q_lab.shape} / {db_lab.shape} do not fit scores {scores.shape}")
    ap_sum, n_valid = 0.0, 0
    for a in range(0, scores.shape[0], CHUNK):
        rel = (q_lab[a:a + CHUNK] @ db_lab.T) > 0
        order = np.argsort(-scores[a:a + CHUNK], axis=1, kind="stable")
        ap, n = _sorted_ap(np.take_along_axis(rel, order, axis=1))
        ap_sum, n_valid = ap_sum + ap, n_valid + n
    return ap_sum / n_valid if n_valid else float("nan")
