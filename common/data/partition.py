"""Partitioners: which images of the train split a client holds. Seeded and deterministic, so that simulation
and deployment (where each node computes only its own part) agree."""

from __future__ import annotations

import numpy as np


def iid_partition(num_items: int, num_partitions: int, partition_id: int, seed: int) -> np.ndarray:
    """Indices of partition `partition_id`: a seeded shuffle cut into `num_partitions` near-equal parts."""
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions - 1}], got {partition_id}")
    if num_items < num_partitions:
        raise ValueError(f"cannot split {num_items} items into {num_partitions} non-empty partitions")
    order = np.random.default_rng(seed).permutation(num_items)
    return np.sort(np.array_split(order, num_partitions)[partition_id])
