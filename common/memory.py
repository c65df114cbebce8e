"""FedCAFE's memories (Eq. 9-10 of the paper; fedxmr_server/strategies/fedcafe.py). Pure numpy + faiss.

- Local memory (client): one row per concept, the normalised mean of the fused enhanced hash features of the
  client's items with that concept (label-indexed, so row c *is* concept c), with item counts.
- Global memory (server): K-means fusion of the clients' rows (faiss spherical K-means, one cluster per concept
  present, started from the count-weighted concept means), each cluster then matched to the concept whose rows it
  holds most of (Hungarian assignment). The released code runs K-means from random rows and reads its unordered
  centroids as label rows, so its label <-> memory-row correspondence was random every round; here row c stays
  concept c across rounds, whatever order the clients reply in.
- Similarity (Eq. 9): the pairwise negative log-likelihood between a client's rows and the global rows, S = 1 for
  the same concept, *summed* over the pairs as in the paper. Each pair adds 0.47-0.97 (unit rows, θ in ±½), so
  Sim_k grows with the number of concepts client k holds; between clients holding the same concepts, the one less
  like the global memory has the larger Sim_k. Weights (Eq. 10): the released code computes softmax(log Sim_k), i.e. α_k ∝ Sim_k, so the client
  whose memory is *less* like the global one (larger NLL) weighs more, the paper's stated intent (its "unique
  knowledge" emphasised). A literal softmax(Sim_k) over sums of hundreds of terms would give one client nearly all
  the weight. "inverse" (α_k ∝ 1/Sim_k) and "uniform" are the alternatives. Under non-IID partitions the summed Sim_k
  mostly weighs clients by how many concepts they hold (measured: see docs/MEASURED.md, FedCAFE).
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment

from common.trust import cap_columns

Weighting = Literal["nll", "inverse", "uniform"]


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > 0, x / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def local_memory(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(memory (C, bits), counts (C,)) from fused features (n, bits) and multi-hot labels (n, C): row c is the
    normalised mean of the normalised features of the items with concept c (zero, count 0, where none has it)."""
    if len(features) != len(labels):
        raise ValueError(f"local_memory: {len(features)} feature rows but {len(labels)} label rows")
    lab = labels.astype(np.float64)
    return normalise_rows(lab.T @ normalise_rows(features)), lab.sum(axis=0).astype(np.float32)


def fuse_memories(memories: list[np.ndarray], counts: list[np.ndarray], iters: int, seed: int = 0,
                  max_share: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The global memory (C, bits) and its counts (C,) from the clients' local memories; see the module docstring.
    `iters` = 0: the count-weighted concept means themselves. No client weighs more than `max_share` of a concept's
    items (`common.trust.cap_columns`), in the means and in the K-means."""
    table = np.stack(memories).astype(np.float64)  # (K, C, bits)
    weight = cap_columns(np.stack(counts).astype(np.float64), max_share)  # (K, C)
    total = weight.sum(axis=0)
    means = normalise_rows(np.einsum("kc,kcb->cb", weight, table))
    present = np.flatnonzero(total > 0)
    if iters == 0 or len(present) < 2:
        return means, total.astype(np.float32)
    k_idx, c_idx = np.nonzero(weight > 0)
    rows = np.ascontiguousarray(normalise_rows(table[k_idx, c_idx]))
    km = faiss.Kmeans(rows.shape[1], len(present), niter=iters, spherical=True, seed=seed, verbose=False,
                      min_points_per_centroid=1)
    km.train(rows, weights=weight[k_idx, c_idx].astype(np.float32),
             init_centroids=np.ascontiguousarray(means[present]))
    _, assigned = km.index.search(rows, 1)
    # co-occurrence (cluster x present concept), weighted by item counts; match to maximise it
    hold = np.zeros((len(present), len(present)))
    np.add.at(hold, (assigned[:, 0], np.searchsorted(present, c_idx)), weight[k_idx, c_idx])
    clusters, concepts = linear_sum_assignment(hold, maximize=True)
    fused = np.zeros_like(means)
    fused[present[concepts]] = normalise_rows(km.centroids[clusters])
    return fused, total.astype(np.float32)


def memory_nll(memory: np.ndarray, counts: np.ndarray, global_memory: np.ndarray, global_counts: np.ndarray) -> float:
    """Eq. 9: Σ_ij softplus(θ_ij) - S_ij θ_ij, θ_ij = ½ <P_k,i, P_g,j>, S_ij = 1 iff i = j (the same concept), over
    the client's non-empty rows i and the global memory's non-empty rows j."""
    theta = 0.5 * memory[counts > 0] @ global_memory[global_counts > 0].T
    same = np.equal.outer(np.flatnonzero(counts > 0), np.flatnonzero(global_counts > 0))
    return float((np.logaddexp(0.0, theta) - same * theta).sum())


def memory_weights(sims: np.ndarray, weighting: Weighting) -> np.ndarray:
    """Aggregation weights (a distribution over the clients) from their Sim_k (module docstring)."""
    sims = np.asarray(sims, dtype=np.float64)
    if weighting == "uniform":
        raw = np.ones_like(sims)
    elif weighting == "nll":
        raw = sims  # softmax(log Sim_k)
    elif weighting == "inverse":
        raw = 1.0 / np.maximum(sims, 1e-12)
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected nll, inverse or uniform")
    if not np.all(np.isfinite(raw)) or raw.sum() <= 0:
        raise ValueError(f"memory similarities {sims.tolist()} give no weight distribution")
    return raw / raw.sum()
