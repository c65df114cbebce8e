"""Client-level differential privacy for the weight-sharing methods: DP-FedAvg with fixed clipping.

The server-side release is the algorithm of Flower's `DifferentialPrivacyServerSideFixedClipping` (McMahan et al.,
ICLR 2018): every sampled client's update Δ_i = w_i − w (all the arrays it sends, as one vector) is clipped to L2
norm C, the clipped updates are averaged with equal weights over the m clients asked this round (a fixed denominator:
a client that sends nothing adds a zero update), and Gaussian noise N(0, (z·C/m)²) is added to every entry of the
mean that some client sent. Adding or removing one client's whole data changes the sum of clipped updates by at most
C, so one round is the Gaussian mechanism with noise multiplier z; the accountant (`fedxmr_server.privacy`) composes
the rounds.

Where the noise is drawn:
- server side (`dp-side = server`): the server clips and adds all the noise. The server sees exact updates; the
  guarantee holds for everyone who sees the model afterwards (other clients, users of the search index).
- client side (`dp-side = client`, distributed noise; unlike Flower's client-side variant, where the clients only
  clip and the server still adds the noise): each client clips its own update and adds N(0, (z·C)²/m), so that the
  sum over m clients carries N(0, (z·C)²). The guarantee is then for neighbouring federations in which one client's
  data is replaced by none while the client still takes part and adds its noise ("zero-out" neighbours, as in
  distributed DP, Kairouz et al. 2021); with k of the m clients sending a given array, that array carries z·√(k/m).
  Alone, one client's update carries only 1/√m of the noise: against the server the guarantee needs secure
  aggregation, which shows the server only the sum.

Noise comes from the operating system's entropy, never from the run's seed: noise that can be regenerated from a
seed in the run config can be subtracted. Runs under DP therefore do not repeat bit for bit.
No Flower here.
"""

from __future__ import annotations

import secrets

import numpy as np

from common.robust import update_norms

Arrays = dict[str, np.ndarray]


def fresh_rng() -> np.random.Generator:
    """A generator seeded from the operating system's entropy (see the module docstring)."""
    return np.random.default_rng(secrets.randbits(128))


def update_norm(start: Arrays, arrays: Arrays) -> float:
    """L2 norm of the update `arrays` − `start` over every key the client sent, as one vector (the per-tower norms
    of `common.robust.update_norms`, combined)."""
    return float(np.sqrt(sum(n * n for n in update_norms(start, arrays).values())))


def clip_update(start: Arrays, arrays: Arrays, bound: float) -> tuple[Arrays, float]:
    """(the update of `arrays` from `start` scaled to norm ≤ `bound`, as a delta per key; its norm before)."""
    delta = {k: np.asarray(arrays[k], np.float64) - np.asarray(start[k], np.float64) for k in arrays}
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values())))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: d * scale for k, d in delta.items()}, norm


def noisy_mean(start: Arrays, deltas: list[Arrays], denominator: int, noise_std: float,
               rng: np.random.Generator) -> Arrays:
    """`start` + (Σ deltas + N(0, noise_std² · denominator²)) / denominator, key by key: the noise on the mean has
    std `noise_std` (z·C/m server side, 0 when the clients added it). A key a client did not send counts as a zero
    update (the denominator never depends on who replied); a key no client sent is released unchanged, without
    noise."""
    if denominator < 1:
        raise ValueError(f"the DP mean needs a positive fixed denominator, got {denominator}")
    out = {}
    for key, base in start.items():
        if not any(key in delta for delta in deltas):
            out[key] = base
            continue
        total = np.zeros(base.shape, np.float64)
        for delta in deltas:
            if key in delta:
                total += delta[key]
        mean = total / denominator
        if noise_std > 0:
            mean = mean + rng.normal(0.0, noise_std, size=base.shape)
        out[key] = (np.asarray(base, np.float64) + mean).astype(base.dtype)
    return out


def client_noise(start: Arrays, arrays: Arrays, bound: float, noise_multiplier: float, expected_clients: int,
                 rng: np.random.Generator) -> tuple[Arrays, float]:
    """What a client sends under client-side DP: `start` + its update clipped to `bound` + its share of the noise,
    N(0, (z·bound)² / m) per entry (m = `expected_clients`); and the update's norm before clipping (kept on the
    node: the norm itself says something about the data)."""
    delta, norm = clip_update(start, arrays, bound)
    std = noise_multiplier * bound / np.sqrt(max(expected_clients, 1))
    return {k: (np.asarray(start[k], np.float64) + d + rng.normal(0.0, std, size=d.shape)).astype(
        np.asarray(arrays[k]).dtype) for k, d in delta.items()}, norm
