"""Tests for common.metrics: vectorised metrics vs plain-loop references and hand-computed cases."""
import numpy as np
import pytest

from common import metrics
from common.metrics import (
    hamming_distance,
    hamming_recalls,
    hash_maps,
    mean_average_precision,
    recall_at_k_i2t,
    recall_at_k_t2i,
    retrieval_recalls,
    standard_map,
)

KS = (1, 5, 10)


# ---------------------------------------------------------------- brute-force references
def brute_recalls(sim, cap, ks=KS):
    """Pessimistic-tie R@K by explicit loops over queries and items."""
    n_img, n_cap = sim.shape
    i2t_ranks = []
    for i in range(n_img):
        gt = [j for j in range(n_cap) if cap[j] == i]
        best = max(sim[i, j] for j in gt)
        i2t_ranks.append(1 + sum(1 for j in range(n_cap) if cap[j] != i and sim[i, j] >= best))
    t2i_ranks = []
    for j in range(n_cap):
        own = sim[cap[j], j]
        t2i_ranks.append(1 + sum(1 for i in range(n_img) if i != cap[j] and sim[i, j] >= own))
    out = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


def brute_hamming(q, db):
    return np.array([[sum(1 for a, b in zip(x, y) if a != b) for y in db] for x in q])


def brute_map(q, db, q_lab, db_lab, at_r):
    """Sort by distance, walk tie groups; relevant items get the precision at the group's end."""
    dist = brute_hamming(q, db)
    aps = []
    for qi in range(len(q)):
        rel = [bool(np.any(q_lab[qi] * db_lab[j])) for j in range(len(db))]
        n_rel = sum(rel)
        if n_rel == 0:
            continue
        order = sorted(range(len(db)), key=lambda j: dist[qi, j])
        ap, cum_all, cum_rel, pos = 0.0, 0, 0, 0
        while pos < len(order):
            d = dist[qi, order[pos]]
            group = [j for j in order[pos:] if dist[qi, j] == d]
            g_rel = sum(rel[j] for j in group)
            before = cum_all
            cum_all += len(group)
            cum_rel += g_rel
            w = min(max((n_rel - before) / len(group), 0.0), 1.0) if at_r else 1.0
            ap += w * g_rel * cum_rel / cum_all
            pos += len(group)
        aps.append(ap / n_rel)
    return sum(aps) / len(aps) if aps else float("nan")


def brute_standard_map(q, db, q_lab, db_lab):
    """calc_map-style AP: explicit stable sort by (distance, db index), precision at every relevant rank."""
    dist = brute_hamming(q, db)
    aps = []
    for qi in range(len(q)):
        rel = [bool(np.any(q_lab[qi] * db_lab[j])) for j in range(len(db))]
        if not any(rel):
            continue
        order = sorted(range(len(db)), key=lambda j: (dist[qi, j], j))
        hits, precisions = 0, []
        for rank, j in enumerate(order, start=1):
            if rel[j]:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / len(precisions))
    return sum(aps) / len(aps) if aps else float("nan")


def flickr_caps(n_img, per=5):
    return np.repeat(np.arange(n_img), per)


@pytest.fixture(params=[1024, 7], ids=["chunk1024", "chunk7"])
def chunk(request, monkeypatch):
    """Run vectorised code both in one block and across many small blocks."""
    monkeypatch.setattr(metrics, "CHUNK", request.param)


# ---------------------------------------------------------------- recall on real scores
@pytest.mark.parametrize("seed", range(4))
def test_recalls_random_vs_brute(seed, chunk):
    rng = np.random.default_rng(seed)
    cap = rng.permutation(flickr_caps(37))
    sim = rng.normal(size=(37, 185)) + 1.5 * (cap[None, :] == np.arange(37)[:, None])
    got = retrieval_recalls(sim, cap, prefix="x_")
    ref = brute_recalls(sim, cap)
    assert set(got) == {f"x_{k}" for k in ref}
    np.testing.assert_allclose([got[f"x_{k}"] for k in ref], list(ref.values()))
    i2t, t2i = recall_at_k_i2t(sim, cap, ks=(2,)), recall_at_k_t2i(sim, cap, ks=(3,))
    assert i2t == pytest.approx({"i2t_r2": brute_recalls(sim, cap, (2,))["i2t_r2"]})
    assert t2i == pytest.approx({"t2i_r3": brute_recalls(sim, cap, (3,))["t2i_r3"]})


def test_recalls_quantised_ties_vs_brute(chunk):
    rng = np.random.default_rng(11)
    cap = np.array([0, 1, 1, 2, 2, 2, 3, 4, 4, 5] * 3)
    sim = rng.integers(0, 3, size=(6, 30)).astype(float)
    got = retrieval_recalls(sim, cap, ks=(1, 2, 3))
    ref = brute_recalls(sim, cap, ks=(1, 2, 3))
    np.testing.assert_allclose([got[k] for k in ref], list(ref.values()))


def test_all_equal_scores_are_pessimistic():
    cap = flickr_caps(3, per=2)
    got = retrieval_recalls(np.zeros((3, 6)), cap, ks=(1, 3, 5))
    # i2t: 4 foreign captions tie with the own ones -> rank 5; t2i: 2 foreign images -> rank 3.
    assert got == {"i2t_r1": 0.0, "i2t_r3": 0.0, "i2t_r5": 100.0,
                   "t2i_r1": 0.0, "t2i_r3": 100.0, "t2i_r5": 100.0, "rsum": 300.0}


def test_hand_computed_ties():
    cap = np.array([0, 0, 1, 1, 2, 2])
    sim = np.array([
        [0.9, 0.2, 0.9, 0.1, 0.1, 0.1],  # best own 0.9, caption 2 ties -> rank 2
        [0.0, 0.0, 0.5, 0.7, 0.7, 0.0],  # best own 0.7 (cap 3), caption 4 ties -> rank 2
        [0.3, 0.0, 0.0, 0.0, 0.4, 0.1],  # best own 0.4 -> rank 1
    ])
    # t2i ranks per caption: 1, 1, 2 (0.9 > 0.5), 1, 2 (0.7 > 0.4), 2 (tie 0.1 = 0.1)
    got = retrieval_recalls(sim, cap, ks=(1, 2))
    expected = {"i2t_r1": 100 / 3, "i2t_r2": 100.0, "t2i_r1": 50.0, "t2i_r2": 100.0}
    expected["rsum"] = sum(expected.values())
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()))


def test_perfect_retrieval():
    rng = np.random.default_rng(3)
    cap = rng.permutation(flickr_caps(20))
    sim = rng.uniform(0, 0.5, size=(20, 100))
    sim[cap, np.arange(100)] = 1.0
    got = retrieval_recalls(sim, cap)
    assert all(got[f"{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in KS)
    assert got["rsum"] == 600.0


def test_recall_validation():
    sim, cap = np.zeros((3, 6)), flickr_caps(3, per=2)
    with pytest.raises(ValueError, match="caption_image has 5 entries but sim has 6 columns"):
        retrieval_recalls(sim, cap[:5])
    with pytest.raises(ValueError, match="caption_image values"):
        retrieval_recalls(sim, np.array([0, 0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_recalls(sim, np.array([0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="caption_image must be a 1-D integer"):
        retrieval_recalls(sim, cap.astype(float))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recalls(np.full((3, 6), np.nan), cap)
    with pytest.raises(ValueError, match="ks"):
        retrieval_recalls(sim, cap, ks=(0, 1))


# ---------------------------------------------------------------- hamming
def test_hamming_distance_vs_loop():
    rng = np.random.default_rng(0)
    q = rng.choice([-1, 1], size=(9, 13)).astype(np.int8)
    db = rng.choice([-1.0, 1.0], size=(11, 13))
    d = hamming_distance(q, db)
    assert d.shape == (9, 11) and np.issubdtype(d.dtype, np.integer)
    np.testing.assert_array_equal(d, brute_hamming(q, db))


def test_hamming_validation():
    good = np.ones((2, 8))
    with pytest.raises(ValueError, match="query_codes"):
        hamming_distance(np.zeros((2, 8)), good)
    with pytest.raises(ValueError, match="db_codes"):
        hamming_distance(good, np.array([[1, -1, 1, 1, 1, 1, 1, 2]]))
    with pytest.raises(ValueError, match="8 bits but db_codes has 16"):
        hamming_distance(good, np.ones((2, 16)))
    with pytest.raises(ValueError, match="txt_codes"):
        hamming_recalls(good, np.zeros((2, 8)), np.array([0, 1]))


@pytest.mark.parametrize("seed", range(3))
def test_hamming_recalls_vs_brute(seed, chunk):
    rng = np.random.default_rng(seed)
    cap = rng.permutation(flickr_caps(30))
    img_emb = rng.normal(size=(30, 8))
    txt_emb = img_emb[cap] + 0.8 * rng.normal(size=(150, 8))
    img_codes = np.where(img_emb >= 0, 1, -1).astype(np.int8)
    txt_codes = np.where(txt_emb >= 0, 1.0, -1.0)
    got = hamming_recalls(img_codes, txt_codes, cap, prefix="hash_")
    ref = brute_recalls(-brute_hamming(img_codes, txt_codes).astype(float), cap)
    assert set(got) == {f"hash_{k}" for k in ref}
    np.testing.assert_allclose([got[f"hash_{k}"] for k in ref], list(ref.values()))


# ---------------------------------------------------------------- MAP
def random_hash_data(rng, n_q, n_db, bits=8, n_labels=5):
    q = rng.choice([-1, 1], size=(n_q, bits))
    db = rng.choice([-1, 1], size=(n_db, bits))
    q_lab = (rng.random((n_q, n_labels)) < 0.25).astype(int)
    db_lab = (rng.random((n_db, n_labels)) < 0.25).astype(int)
    q_lab[:3] = 0  # some queries without any relevant db item
    return q, db, q_lab, db_lab


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("at_r", [False, True])
def test_map_random_vs_brute(seed, at_r, chunk):
    q, db, q_lab, db_lab = random_hash_data(np.random.default_rng(seed), 25, 60)
    got = mean_average_precision(q, db, q_lab, db_lab, at_r=at_r)
    assert 0.0 <= got <= 1.0
    np.testing.assert_allclose(got, brute_map(q, db, q_lab, db_lab, at_r))


def distinct_distance_db(bits=16):
    """One all-ones query and db items with 0, 1, ..., bits flipped bits (distinct distances)."""
    q = np.ones((1, bits))
    db = np.ones((bits + 1, bits))
    for d in range(bits + 1):
        db[d, :d] = -1
    return q, db


def test_map_no_ties_equals_textbook():
    q, db = distinct_distance_db()
    relevant = [0, 2, 3, 7, 10]  # distances = ranks - 1 -> ranks 1, 3, 4, 8, 11
    db_lab = np.zeros((17, 2), dtype=int)
    db_lab[:, 1] = 1
    db_lab[relevant] = [1, 0]
    q_lab = np.array([[1, 0]])
    # textbook AP = (1/1 + 2/3 + 3/4 + 4/8 + 5/11) / 5 = 0.674242...
    np.testing.assert_allclose(mean_average_precision(q, db, q_lab, db_lab), 0.6742424242424242)
    # MAP@R, R = 5: relevant within the top 5 ranks are 1, 3, 4 -> (1 + 2/3 + 3/4) / 5 = 0.483333...
    np.testing.assert_allclose(mean_average_precision(q, db, q_lab, db_lab, at_r=True), 0.48333333333333334)


def test_map_hand_computed_ties():
    q = np.ones((1, 4))
    db = np.array([[1, 1, 1, 1], [-1, 1, 1, 1], [1, -1, 1, 1], [-1, -1, 1, 1]])  # distances 0, 1, 1, 2
    db_lab = np.array([[0], [1], [0], [1]])
    q_lab = np.array([[1]])
    # groups: d0 (0 rel / 1), d1 (1 rel / 2, P = 1/3), d2 (1 rel / 1, P = 2/4); R = 2
    np.testing.assert_allclose(mean_average_precision(q, db, q_lab, db_lab), (1 / 3 + 2 / 4) / 2)
    # MAP@R: d1 straddles rank R=2 -> w = (2 - 1) / 2 = 0.5; d2 lies beyond -> (0.5 * 1/3) / 2
    np.testing.assert_allclose(mean_average_precision(q, db, q_lab, db_lab, at_r=True), 1 / 12)


def test_map_no_relevant_is_nan_and_validation():
    q, db, q_lab, db_lab = random_hash_data(np.random.default_rng(0), 4, 10)
    assert np.isnan(mean_average_precision(q, db, np.zeros_like(q_lab), db_lab))
    with pytest.raises(ValueError, match="query_labels must be 2-D with 4 rows"):
        mean_average_precision(q, db, q_lab[:3], db_lab)
    with pytest.raises(ValueError, match="db_labels must be multi-hot"):
        mean_average_precision(q, db, q_lab, db_lab * 2)
    with pytest.raises(ValueError, match="query_labels has 5 labels but db_labels has 4"):
        mean_average_precision(q, db, q_lab, db_lab[:, :4])
    with pytest.raises(ValueError, match="img_labels"):
        hash_maps(q, db, q_lab[:3], db_lab)


def test_hash_maps_keys_and_values():
    rng = np.random.default_rng(5)
    img, txt, img_lab, txt_lab = random_hash_data(rng, 12, 40)
    got = hash_maps(img, txt, img_lab, txt_lab, prefix="hash_")
    expected = {
        "hash_map_i2t": brute_map(img, txt, img_lab, txt_lab, False),
        "hash_map_t2i": brute_map(txt, img, txt_lab, img_lab, False),
        "hash_mapr_i2t": brute_map(img, txt, img_lab, txt_lab, True),
        "hash_mapr_t2i": brute_map(txt, img, txt_lab, img_lab, True),
        "hash_smap_i2t": brute_standard_map(img, txt, img_lab, txt_lab),
        "hash_smap_t2i": brute_standard_map(txt, img, txt_lab, img_lab),
    }
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()))


# ---------------------------------------------------------------- standard (stable-argsort) MAP
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bits", [4, 16])
def test_standard_map_random_vs_brute(seed, bits, chunk):
    q, db, q_lab, db_lab = random_hash_data(np.random.default_rng(seed), 25, 60, bits=bits)
    got = standard_map(q, db, q_lab, db_lab)
    assert 0.0 < got <= 1.0
    np.testing.assert_allclose(got, brute_standard_map(q, db, q_lab, db_lab), rtol=1e-12)
    # 4 bits -> 60 items over 5 distances, many ties: the two definitions must actually differ
    if bits == 4:
        assert abs(got - mean_average_precision(q, db, q_lab, db_lab)) > 1e-6


def test_standard_map_hand_computed_ties():
    q = np.ones((1, 4))
    db = np.array([[1, 1, 1, 1], [-1, 1, 1, 1], [1, -1, 1, 1], [-1, -1, 1, 1]])  # distances 0, 1, 1, 2
    db_lab = np.array([[0], [1], [0], [1]])
    q_lab = np.array([[1]])
    # stable order 0, 1, 2, 3 -> relevant at ranks 2 and 4: (1/2 + 2/4) / 2 = 0.5
    assert standard_map(q, db, q_lab, db_lab) == pytest.approx(0.5, abs=1e-15)
    # tie-aware: both relevant items of the d1 group get P at the group end (1/3): (1/3 + 2/4) / 2 = 5/12
    assert mean_average_precision(q, db, q_lab, db_lab) == pytest.approx(5 / 12, abs=1e-15)
    # swap the two tied db items: the standard MAP follows the db order (ranks 3 and 4 -> (1/3 + 2/4) / 2),
    # the tie-aware MAP does not change
    perm = [0, 2, 1, 3]
    assert standard_map(q, db[perm], q_lab, db_lab[perm]) == pytest.approx(5 / 12, abs=1e-15)
    assert mean_average_precision(q, db[perm], q_lab, db_lab[perm]) == pytest.approx(5 / 12, abs=1e-15)


def test_standard_map_no_ties_equals_tie_aware():
    q, db = distinct_distance_db()
    relevant = [0, 2, 3, 7, 10]
    db_lab = np.zeros((17, 2), dtype=int)
    db_lab[:, 1] = 1
    db_lab[relevant] = [1, 0]
    q_lab = np.array([[1, 0]])
    rng = np.random.default_rng(0)
    perm = rng.permutation(17)  # db order is irrelevant without ties
    for d, lab in ((db, db_lab), (db[perm], db_lab[perm])):
        np.testing.assert_allclose(standard_map(q, d, q_lab, lab), 0.6742424242424242, rtol=1e-12)
        np.testing.assert_allclose(mean_average_precision(q, d, q_lab, lab), 0.6742424242424242, rtol=1e-12)


def test_standard_map_excludes_queries_without_relevant_and_nan():
    q = np.ones((2, 4))
    db = np.array([[1, 1, 1, 1], [-1, 1, 1, 1], [1, -1, 1, 1], [-1, -1, 1, 1]])
    db_lab = np.array([[0, 0], [1, 0], [0, 0], [1, 0]])
    q_lab = np.array([[1, 0], [0, 1]])  # second query has no relevant db item -> excluded, not counted as 0
    assert standard_map(q, db, q_lab, db_lab) == pytest.approx(0.5, abs=1e-15)
    assert np.isnan(standard_map(q, db, np.zeros_like(q_lab), db_lab))


def test_standard_map_validation():
    q, db, q_lab, db_lab = random_hash_data(np.random.default_rng(0), 4, 10)
    with pytest.raises(ValueError, match="query_codes"):
        standard_map(np.zeros_like(q), db, q_lab, db_lab)
    with pytest.raises(ValueError, match="db_labels must be multi-hot"):
        standard_map(q, db, q_lab, db_lab * 2)
    with pytest.raises(ValueError, match="query_labels must be 2-D with 4 rows"):
        standard_map(q, db, q_lab[:3], db_lab)
    with pytest.raises(ValueError, match="query_labels has 5 labels but db_labels has 4"):
        standard_map(q, db, q_lab, db_lab[:, :4])
