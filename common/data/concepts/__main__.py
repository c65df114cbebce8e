"""`python -m common.data.concepts --data-dir DIR`: how many images carry each DERIVED concept label, per split."""

from __future__ import annotations

import argparse

import numpy as np

from common.data.concepts import CONCEPT_NAMES, MIN_CAPTIONS
from common.data.datasets import open_dataset


def label_report(labels: np.ndarray) -> str:
    """A table of per-concept image counts, plus how many images have no label at all."""
    counts = labels.sum(axis=0)
    rows = [f"{name:<11}{int(n):>6}" for name, n in zip(CONCEPT_NAMES, counts)]
    none = int((labels.sum(axis=1) == 0).sum())
    return "\n".join(rows + [f"{'(no label)':<11}{none:>6}", f"{'images':<11}{len(labels):>6}"])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m common.data.concepts",
                                     description="Counts of the DERIVED Flickr8k concept labels per split.")
    parser.add_argument("--data-dir", default="", help="Flickr8k folder or Karpathy JSON (default: $FEDXMR_DATA_DIR)")
    args = parser.parse_args()
    dataset = open_dataset(args.data_dir)
    if dataset.feature_dims() is not None:
        parser.error(f"{dataset.root}: a feature file's labels are its own, not derived concepts")
    for split in dataset.splits:
        data = dataset.load(split)
        print(f"== {split} (derived labels, >= {MIN_CAPTIONS} of 5 captions)\n{label_report(data.labels)}")


if __name__ == "__main__":
    main()
