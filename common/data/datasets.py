"""Which dataset a `data-dir` holds, and its splits: the one entry point the federation, the server's evaluator and
the search tool load splits through.

- a folder with one `dataset_*.json` (or the JSON file itself): Karpathy-split JSON (`common.data.karpathy`:
  MS-COCO, Flickr30K, Flickr8k as distributed for retrieval);
- otherwise the Flickr8k folder layout (`common.data.flickr8k`).
"""

from __future__ import annotations

import os
from pathlib import Path

from common.data.flickr8k import DATA_DIR_ENV, DatasetError, RetrievalSplit, resolve_data_dir
from common.data.flickr8k import load_split as load_flickr8k_split
from common.data.karpathy import karpathy_file, load_karpathy_split, read_karpathy


def _root(data_dir: str | os.PathLike | None) -> Path:
    raw = str(data_dir or os.environ.get(DATA_DIR_ENV, ""))
    if not raw:
        raise DatasetError(f"no dataset given: set run-config key 'data-dir' or the environment variable "
                           f"{DATA_DIR_ENV}")
    root = Path(raw).expanduser().resolve()
    if not root.exists():
        raise DatasetError(f"data dir {root} does not exist")
    return root


def check_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data dir, checked (a Karpathy JSON is read and validated); a clear error naming the file otherwise."""
    root = _root(data_dir)
    karpathy = karpathy_file(root)
    if karpathy is not None:
        read_karpathy(karpathy)
        return root
    return resolve_data_dir(root)


def load_split(data_dir: str | os.PathLike | None, split: str, max_images: int = 0,
               check_images: bool = True) -> RetrievalSplit:
    """Split `split` ("train", "dev" or "test") of the dataset in `data_dir`; `max_images` > 0 keeps its first N
    images; `check_images=False` does not look for the image files (a text-only node never reads them)."""
    root = _root(data_dir)
    karpathy = karpathy_file(root)
    if karpathy is not None:
        if split not in ("train", "dev", "test"):
            raise DatasetError(f"unknown split {split!r}; expected train, dev or test")
        return load_karpathy_split(karpathy, split, max_images, check_images)
    return load_flickr8k_split(root, split, max_images, check_images)
