"""The closed-form floor of every hashing table: ridge regression onto the labels, then ITQ, solved federated.

Clients send sufficient statistics, never items (`FeatureStats`, one message round): the count n, the feature sum
Σf, the Gram matrix Σffᵀ, the feature-label cross moment ΣfYᵀ and the label sum ΣY of their labelled items. Summed
over clients they are exactly the statistics of the pooled data, so the server's ridge solution (`solve_ridge`)
equals the centralized one. Features are the tower's input after its LayerNorm (the model's own first step);
they are standardised per dimension with the pooled mean and standard deviation, and the ridge map
W = (F̃ᵀF̃ + λI)⁻¹ F̃ᵀY (F̃ standardised and centred) sends an item to the label space (C dimensions, zero mean).

Codes: sign(z·P·R). P maps the label space to `bits` dimensions (bits ≤ C: the top principal directions of the
pooled label-space embeddings, from the same statistics; bits > C: a seeded random matrix with orthonormal rows),
R is a bits × bits rotation. R starts random (the random-hyperplane control) and ITQ (Gong & Lazebnik 2011) then
alternates B = sign(V·R) and the orthogonal Procrustes step R = Ŝ·Sᵀ from the SVD BᵀV = S·Ω·Ŝᵀ, which lowers
‖B − V·R‖². Federated: each client sends Eᵀ·sign(E·H) for its items (E the tower's pre-normalisation embedding,
H the hash weight), the server turns the sum into BᵀV (`itq_rotation`).

What the statistics reveal about a client: its feature mean and covariance, its label counts and the mean feature
of each label (ΣfYᵀ / ΣY); with fewer items than feature dimensions the Gram matrix spans exactly the client's items.
The ITQ messages reveal Eᵀ·B, a bits-wide summary of the same. They carry no per-item rows, but they are not private.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAT_KEYS: tuple[str, ...] = ("n", "sum", "gram", "xy", "ysum")


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of one modality's labelled items (float64: sums over many items)."""

    n: float
    sum: np.ndarray  # (d,)
    gram: np.ndarray  # (d, d)
    xy: np.ndarray  # (d, C)
    ysum: np.ndarray  # (C,)

    @staticmethod
    def of(feats: np.ndarray, labels: np.ndarray) -> "FeatureStats":
        if len(feats) != len(labels):
            raise ValueError(f"{len(feats)} feature rows but {len(labels)} label rows")
        f = np.asarray(feats, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        return FeatureStats(float(len(f)), f.sum(axis=0), f.T @ f, f.T @ y, y.sum(axis=0))

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {key: np.atleast_1d(np.asarray(getattr(self, key), dtype=np.float64)) for key in STAT_KEYS}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> "FeatureStats":
        missing = [k for k in STAT_KEYS if k not in arrays]
        if missing:
            raise KeyError(f"feature statistics lack {missing}")
        n = np.asarray(arrays["n"], dtype=np.float64).ravel()
        d, c = arrays["xy"].shape
        shapes = {"n": (1,), "sum": (d,), "gram": (d, d), "ysum": (c,)}
        bad = [k for k, shape in shapes.items() if np.asarray(arrays[k]).shape != shape]
        if bad or n[0] < 0:
            raise ValueError(f"feature statistics of inconsistent shapes or a negative count: {bad}")
        return FeatureStats(float(n[0]), *(np.asarray(arrays[k], dtype=np.float64) for k in STAT_KEYS[1:]))

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.gram + other.gram, self.xy + other.xy,
                            self.ysum + other.ysum)


@dataclass(frozen=True)
class RidgeMap:
    """z = f·weight + bias: a modality's map to the (centred) label space."""

    weight: np.ndarray  # (d, C)
    bias: np.ndarray  # (C,)
    cov: np.ndarray  # (C, C) covariance of z over the pooled items, for P


def solve_ridge(stats: FeatureStats, lam: float) -> RidgeMap:
    """Ridge regression of standardised, centred features onto the labels, from summed statistics alone."""
    if stats.n < 2:
        raise ValueError(f"ridge needs at least 2 labelled items, got {stats.n:g}")
    mean = stats.sum / stats.n
    centred_gram = stats.gram - stats.n * np.outer(mean, mean)  # Σ(f−μ)(f−μ)ᵀ
    var = np.diag(centred_gram) / stats.n
    std = np.sqrt(np.maximum(var, 1e-9 * max(float(var.mean()), 1e-30)))  # near-constant dims: no blow-up
    gram_std = centred_gram / np.outer(std, std)
    xy_std = (stats.xy - np.outer(mean, stats.ysum)) / std[:, None]  # Σ f̃ yᵀ
    w_std = np.linalg.solve(gram_std + lam * np.eye(len(mean)), xy_std)
    weight = w_std / std[:, None]
    return RidgeMap(weight, -mean @ weight, w_std.T @ gram_std @ w_std / stats.n)


def label_to_bits(cov: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """P (C × bits): the top principal directions of the label-space embeddings when bits ≤ C, else a random
    matrix with orthonormal rows (the label space has only C directions to give)."""
    c = cov.shape[0]
    if bits <= c:
        values, vectors = np.linalg.eigh(cov)
        return vectors[:, np.argsort(values)[::-1][:bits]]
    q, _ = np.linalg.qr(rng.standard_normal((bits, c)))
    return q.T


def random_rotation(bits: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((bits, bits)))
    return q * np.sign(np.diag(r))


def itq_rotation(btv: np.ndarray) -> np.ndarray:
    """The orthogonal Procrustes step of ITQ: with BᵀV = S·Ω·Ŝᵀ, R = Ŝ·Sᵀ minimises ‖B − V·R‖² over rotations."""
    s, _, sh_t = np.linalg.svd(btv)
    return sh_t.T @ s.T


def quantisation_loss(v: np.ndarray, rotation: np.ndarray) -> float:
    """‖sign(V·R) − V·R‖², the loss ITQ lowers."""
    projected = v @ rotation
    return float(((np.where(projected >= 0, 1.0, -1.0) - projected) ** 2).sum())
