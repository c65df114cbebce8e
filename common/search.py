"""Search over a gallery with a trained model's outputs: exact continuous search, Hamming search over packed binary
codes, and two-stage search (Hamming top-C candidates re-ranked by the continuous embeddings). faiss does the
scans (`IndexBinaryFlat`: XOR + popcount over packed codes; `IndexFlatIP`: inner products); nothing here knows
about Flower.

Codes are ±1 arrays (the model's `sign` output, 0 -> +1) packed 8 bits per byte, bit i of a code = (code[i] > 0);
the Hamming distance of two packed codes equals `common.metrics.hamming_distance` of the ±1 codes (tested).
Ties: hits with equal distances are ordered by ascending gallery id (as a stable sort would); which of the items tied
at the k-th distance make the top k is faiss's choice. The R@K of `recall_of` does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n, bits) ±1 codes -> (n, bits / 8) uint8, bit i set where code[i] > 0 (bits a multiple of 8)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % 8:
        raise ValueError(f"codes must be (n, bits) with bits a multiple of 8, got shape {codes.shape}")
    return np.packbits(codes > 0, axis=1)


@dataclass(frozen=True)
class Hits:
    """Top-k per query: gallery ids (n_queries, k) and their scores (higher is better: inner product, or minus
    the Hamming distance)."""

    ids: np.ndarray
    scores: np.ndarray


class ExactIndex:
    """Exact inner-product search over L2-normalised embeddings (cosine)."""

    def __init__(self, embeddings: np.ndarray) -> None:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.index = faiss.IndexFlatIP(emb.shape[1])
        self.index.add(emb)

    def search(self, queries: np.ndarray, k: int) -> Hits:
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.index.ntotal))
        return Hits(ids, scores)


class HammingIndex:
    """Exact Hamming search over packed codes (`faiss.IndexBinaryFlat`)."""

    def __init__(self, codes: np.ndarray) -> None:
        packed = pack_codes(codes)
        self.bits = packed.shape[1] * 8
        self.index = faiss.IndexBinaryFlat(self.bits)
        self.index.add(packed)

    def search(self, query_codes: np.ndarray, k: int) -> Hits:
        dist, ids = self.index.search(pack_codes(query_codes), min(k, self.index.ntotal))
        order = np.lexsort((ids, dist), axis=1)  # by distance, then id
        return Hits(np.take_along_axis(ids, order, axis=1), -np.take_along_axis(dist, order, axis=1).astype(np.int32))


class TwoStageIndex:
    """Hamming top-`candidates` by codes, then those re-ranked by the continuous embeddings: the speed of a binary
    scan with (for a large enough C) the ranking of exact search."""

    def __init__(self, codes: np.ndarray, embeddings: np.ndarray) -> None:
        self.hamming = HammingIndex(codes)
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)

    def search(self, query_codes: np.ndarray, query_emb: np.ndarray, k: int, candidates: int) -> Hits:
        cand = np.ascontiguousarray(self.hamming.search(query_codes, max(candidates, k)).ids)  # (n, C)
        queries = np.ascontiguousarray(query_emb, dtype=np.float32)
        scores = np.empty(cand.shape, dtype=np.float32)  # the candidates' inner products, without a gathered copy
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(scores), faiss.swig_ptr(queries),
                                         faiss.swig_ptr(self.embeddings), faiss.swig_ptr(cand),
                                         self.embeddings.shape[1], cand.shape[0], cand.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return Hits(np.take_along_axis(cand, order, axis=1), np.take_along_axis(scores, order, axis=1))


def numpy_hamming_topk(packed_queries: np.ndarray, packed_gallery: np.ndarray, k: int) -> Hits:
    """The plain-numpy baseline of the benchmark: XOR + popcount over uint64 words, then argpartition."""
    q = packed_queries.view(np.uint64) if packed_queries.shape[1] % 8 == 0 else packed_queries
    g = packed_gallery.view(np.uint64) if packed_gallery.shape[1] % 8 == 0 else packed_gallery
    ids, dists = [], []
    for row in q:
        dist = np.bitwise_count(np.bitwise_xor(g, row)).sum(axis=1, dtype=np.int32)
        top = np.argpartition(dist, k - 1)[:k]
        top = top[np.lexsort((top, dist[top]))]
        ids.append(top)
        dists.append(dist[top])
    return Hits(np.array(ids), -np.array(dists))


def recall_of(hits: Hits, relevant: list[set[int]], ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """R@K (%) of a search with the evaluation's tie rule (`common.metrics`): the rank of a query's best relevant
    item is 1 + the number of non-relevant items scoring at least as high. `hits` must hold at least max(ks) +
    (relevant items per query) + 1 columns (or the whole gallery), so that every tie that matters is seen."""
    out = {}
    for k in ks:
        found = 0
        for rel, ids, scores in zip(relevant, hits.ids, hits.scores):
            first = next((j for j, i in enumerate(ids) if int(i) in rel), None)
            if first is not None and first < k:
                ahead = sum(1 for i, sc in zip(ids, scores) if int(i) not in rel and sc >= scores[first])
                found += ahead + 1 <= k
        out[k] = 100.0 * found / len(relevant)
    return out
