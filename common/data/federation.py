"""The simulated federation: which items and which modalities each client holds.

Client types: `paired` (images and their captions), `image-only`, `text-only`. The run config's modality mix
gives their fractions; counts are rounded by largest remainder and types are dealt to partition ids by a seeded
shuffle, so every node computes its own type. The partition itself is drawn from the pool's DERIVED labels (as an
experimenter splitting a dataset would); what a node then *loads* is restricted to its modalities (see
`node_split`): an image-only node never reads, encodes or caches a caption, and a text-only node never touches an
image file.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from common.data.split import RetrievalSplit, subset

CLIENT_TYPES: dict[str, tuple[str, ...]] = {"paired": ("img", "txt"), "image-only": ("img",),
                                            "text-only": ("txt",)}
TYPE_CODES: dict[str, int] = {name: i for i, name in enumerate(CLIENT_TYPES)}  # for numeric MetricRecords


def parse_mix(text: str) -> tuple[float, float, float]:
    """'0.5,0.25,0.25' -> fractions of paired, image-only, text-only clients (must sum to 1)."""
    try:
        mix = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"modality-mix must be three comma-separated numbers, got {text!r}") from None
    if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1.0) > 1e-6:
        raise ValueError(f"modality-mix must be 3 non-negative fractions (paired,image-only,text-only) summing to 1,"
                         f" got {text!r}")
    return mix  # type: ignore[return-value]


def client_types(num_partitions: int, mix: tuple[float, float, float], seed: int) -> list[str]:
    """The type of every partition id: largest-remainder counts, dealt by a seeded shuffle."""
    raw = np.asarray(mix) * num_partitions
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: num_partitions - counts.sum()]:
        counts[i] += 1
    types = [t for t, c in zip(CLIENT_TYPES, counts) for _ in range(c)]
    order = np.random.default_rng([seed, 7919]).permutation(num_partitions)
    return [types[i] for i in order]


def node_split(pool: RetrievalSplit, image_indices: np.ndarray, modalities: tuple[str, ...]) -> RetrievalSplit:
    """A node's view of its share of `pool`: only the modalities it holds.

    An image-only view has no captions and no labels (labels are derived from captions; a precomputed-feature
    dataset's labels come with each item and are kept); a text-only view keeps
    the captions and the image *names* only as grouping keys (which captions describe the same scene), never paths
    it would read.
    """
    shard = subset(pool, image_indices)
    if "txt" not in modalities:  # a precomputed-feature dataset's labels come with every item: kept
        labels = shard.labels if shard.features is not None else np.zeros((len(shard.images), 0), dtype=np.uint8)
        shard = replace(shard, caption_ids=(), captions=(), caption_image=np.zeros(0, dtype=np.int64), labels=labels)
    if shard.features is not None:  # given features: only those of the modalities the node holds
        shard = replace(shard, features={m: f for m, f in shard.features.items() if m in modalities})
    return shard
