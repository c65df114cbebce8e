"""Which dataset a `data-dir` holds, and its splits: the one entry point the federation, the server's evaluator and
the search tool load splits through.

- a folder with one `dataset_*.json` (or the JSON file itself): Karpathy-split JSON (`common.data.karpathy`:
  MS-COCO, Flickr30K, Flickr8k as distributed for retrieval);
- a `.npz` or `.mat` file: precomputed features and labels (`common.data.precomputed`; backbone `identity`);
- otherwise the Flickr8k folder layout (`common.data.flickr8k`).
"""

from __future__ import annotations

import os
from pathlib import Path

from common.backbones import IDENTITY, Backbone, BackboneError, build_backbone, identity_backbone
from common.data.concepts import CONCEPT_NAMES
from common.data.flickr8k import resolve_data_dir
from common.data.flickr8k import load_split as load_flickr8k_split
from common.data.karpathy import karpathy_file, load_karpathy_split, read_karpathy
from common.data.precomputed import is_feature_file, load_feature_split, read_feature_file
from common.data.split import DATA_DIR_ENV, DatasetError, RetrievalSplit


def _root(data_dir: str | os.PathLike | None) -> Path:
    raw = str(data_dir or os.environ.get(DATA_DIR_ENV, ""))
    if not raw:
        raise DatasetError(f"no dataset given: set run-config key 'data-dir' or the environment variable "
                           f"{DATA_DIR_ENV}")
    root = Path(raw).expanduser().resolve()
    if not root.exists():
        raise DatasetError(f"data dir {root} is missing (no such folder or file)")
    return root


def check_data_dir(data_dir: str | os.PathLike | None, data_keys: str = "") -> Path:
    """The data dir, checked (a Karpathy JSON or a feature file is read and validated); a clear error naming the
    file otherwise."""
    root = _root(data_dir)
    if is_feature_file(root):
        read_feature_file(root, data_keys)
        return root
    karpathy = karpathy_file(root)
    if karpathy is not None:
        read_karpathy(karpathy)
        return root
    return resolve_data_dir(root)


def load_split(data_dir: str | os.PathLike | None, split: str, max_images: int = 0, check_images: bool = True,
               data_keys: str = "", cache_dir: Path | None = None) -> RetrievalSplit:
    """Split `split` ("train", "dev" or "test") of the dataset in `data_dir`; `max_images` > 0 keeps its first N
    images; `check_images=False` does not look for the image files (a text-only node never reads them);
    `data_keys` maps a feature file's variables; a feature file without split indices gets a seeded split, one
    without dev indices a dev carved from train, both written down under `cache_dir/splits`
    (`common.data.precomputed`)."""
    root = _root(data_dir)
    if is_feature_file(root):
        splits_dir = cache_dir / "splits" if cache_dir is not None else None
        return load_feature_split(read_feature_file(root, data_keys, splits_dir), split, max_images)
    karpathy = karpathy_file(root)
    if karpathy is not None:
        if split not in ("train", "dev", "test"):
            raise DatasetError(f"unknown split {split!r}; expected train, dev or test")
        return load_karpathy_split(karpathy, split, max_images, check_images)
    return load_flickr8k_split(root, split, max_images, check_images)


def backbone_for(name: str, data_dir: str | os.PathLike | None, data_keys: str = "", device: str = "cpu") -> Backbone:
    """The backbone a run names; `identity` takes its dimensions from the feature file in `data_dir`."""
    if name != IDENTITY:
        return build_backbone(name, device)
    root = _root(data_dir)
    if not is_feature_file(root):
        raise BackboneError(f"backbone 'identity' needs a precomputed-feature dataset (.npz / .mat), not {root}")
    data = read_feature_file(root, data_keys)
    return identity_backbone(data.img.shape[1], data.txt.shape[1])


def concept_count(data_dir: str | os.PathLike | None, data_keys: str = "") -> int:
    """Label columns of the dataset in `data_dir`: a feature file's own labels, else the DERIVED Flickr8k concepts
    (Flickr8k and Karpathy JSON: labels come from captions). Sizes the heads and tables that are indexed by label
    (FedCAFE's memory and classifier, PLFedCMH's and FedProto's prototypes)."""
    root = _root(data_dir)
    return read_feature_file(root, data_keys).labels.shape[1] if is_feature_file(root) else len(CONCEPT_NAMES)


def split_concepts(data: RetrievalSplit) -> int:
    """`concept_count` from a split (a node's shard, which may be a materialised directory): its own label columns
    when it came from a feature file (kept by every node), else the DERIVED concepts (an image-only view holds
    none)."""
    return data.labels.shape[1] if data.features is not None else len(CONCEPT_NAMES)
