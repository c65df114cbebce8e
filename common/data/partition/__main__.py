"""`python -m common.data.partition ...`: a summary of one partition of a dataset's split."""

from __future__ import annotations

import argparse

import numpy as np

from common.data.concepts import CONCEPT_NAMES
from common.data.datasets import open_dataset
from common.data.partition import PARTITIONERS, partition


def summary(parts: list[np.ndarray], labels: np.ndarray, names: tuple[str, ...]) -> str:
    """Per client: item count and the histogram of (derived) labels, most frequent first."""
    lines = []
    for i, p in enumerate(parts):
        hist = labels[p].sum(axis=0).astype(np.int64)
        top = ", ".join(f"{names[j]} {int(hist[j])}" for j in np.argsort(-hist)[:6] if hist[j] > 0)
        lines.append(f"client {i:>3}: {len(p):>5} items | {top}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m common.data.partition",
                                     description="Summary of a partition of a dataset's split (by its labels).")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--data-keys", default="", help="a feature file's variables (run-config key 'data-keys')")
    parser.add_argument("--split", default="train")
    parser.add_argument("--partitioner", default="dirichlet", choices=PARTITIONERS)
    parser.add_argument("--num-partitions", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--ways", type=int, default=2)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dataset = open_dataset(args.data_dir, args.data_keys)
    data = dataset.load(args.split)
    parts = partition(args.partitioner, len(data.images), args.num_partitions, args.seed, data.labels,
                      beta=args.beta, ways=args.ways, shots=args.shots)
    if dataset.feature_dims() is None:
        names, source = CONCEPT_NAMES, "labels are DERIVED from captions"
    else:
        names, source = tuple(f"label{j}" for j in range(data.labels.shape[1])), "the file's own labels"
    print(f"{args.partitioner} over {len(data.images)} {args.split} images ({source})")
    print(summary(parts, data.labels, names))


if __name__ == "__main__":
    main()
