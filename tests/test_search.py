"""The search engine (`common.search`) against brute force and against the evaluation's metrics."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import hamming_distance, hamming_recalls
from common.search import (ExactIndex, HammingIndex, TwoStageIndex, numpy_hamming_topk, pack_codes, recall_of)


def _codes(n: int, bits: int, seed: int) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random((n, bits)) < 0.5, -1.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("bits", [16, 32, 64, 128])
def test_packed_codes_and_faiss_distances_equal_brute_force_hamming(bits: int) -> None:
    q, g = _codes(7, bits, 0), _codes(300, bits, 1)
    brute = hamming_distance(q, g)
    hits = HammingIndex(g).search(q, k=300)
    assert pack_codes(g).shape == (300, bits // 8)
    np.testing.assert_array_equal(-hits.scores, np.take_along_axis(brute, hits.ids, axis=1))
    np.testing.assert_array_equal(hits.ids, np.argsort(brute, axis=1, kind="stable"))  # ties by ascending id
    top = HammingIndex(g).search(q, k=20)
    plain = numpy_hamming_topk(pack_codes(q), pack_codes(g), k=20)
    np.testing.assert_array_equal(plain.scores, top.scores)
    np.testing.assert_array_equal(top.scores, hits.scores[:, :20])
    for row in range(len(q)):  # below the 20th distance the sets agree exactly (at it, ties may be cut anywhere)
        inside = hits.ids[row][-hits.scores[row] < -top.scores[row, -1]]
        assert set(inside) <= set(top.ids[row]) and set(inside) <= set(plain.ids[row])


def test_identical_codes_are_at_distance_zero_and_a_bad_width_is_refused() -> None:
    g = _codes(10, 64, 2)
    hits = HammingIndex(g).search(g[3:4], k=1)
    assert hits.ids[0, 0] == 3 and hits.scores[0, 0] == 0
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(np.ones((2, 12)))


def test_two_stage_with_the_whole_gallery_as_candidates_is_exact_search() -> None:
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(200, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    queries = emb[:5] + 0.1 * rng.normal(size=(5, 16)).astype(np.float32)
    codes = np.where(emb @ rng.normal(size=(16, 32)) > 0, 1.0, -1.0)
    q_codes = np.where(queries @ rng.normal(size=(16, 32)) > 0, 1.0, -1.0)
    exact = ExactIndex(emb).search(queries, k=10)
    two = TwoStageIndex(codes, emb).search(q_codes, queries, k=10, candidates=200)
    np.testing.assert_array_equal(two.ids, exact.ids)
    np.testing.assert_allclose(two.scores, exact.scores, rtol=1e-5)
    few = TwoStageIndex(codes, emb).search(q_codes, queries, k=10, candidates=20)
    assert few.ids.shape == (5, 10) and np.all(np.diff(few.scores, axis=1) <= 1e-6)


def test_the_search_path_gives_the_evaluations_hamming_recalls() -> None:
    """Image -> text and text -> image over 16-bit codes (many ties): R@K from the faiss search equals
    `common.metrics.hamming_recalls` on the same codes."""
    img, txt = _codes(40, 16, 4), _codes(200, 16, 5)
    txt[::5] = img  # caption 5i is a copy of image i: some exact matches, plus many ties elsewhere
    txt[1::5] = img  # and so is caption 5i + 1: relevant items tied with each other
    caption_image = np.repeat(np.arange(40), 5)
    ref = hamming_recalls(img, txt, caption_image)
    i2t = recall_of(HammingIndex(txt).search(img, k=16), [set(np.flatnonzero(caption_image == i)) for i in range(40)])
    t2i = recall_of(HammingIndex(img).search(txt, k=12), [{int(i)} for i in caption_image])
    for k in (1, 5, 10):
        assert i2t[k] == pytest.approx(ref[f"i2t_r{k}"]) and t2i[k] == pytest.approx(ref[f"t2i_r{k}"])
