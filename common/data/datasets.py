"""Which dataset a `data-dir` holds: `open_dataset` picks the one `Dataset` (`common.data.split`) that reads it, the
entry point the federation, the shard writer, the server's evaluator and the search tool load splits through.

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
from common.data.flickr8k import Flickr8kFolder
from common.data.karpathy import KarpathyJson, karpathy_file
from common.data.precomputed import FeatureFile, is_feature_file
from common.data.split import DATA_DIR_ENV, Dataset, DatasetError, RetrievalSplit


def _root(data_dir: str | os.PathLike | None) -> Path:
    raw = str(data_dir or os.environ.get(DATA_DIR_ENV, ""))
    if not raw:
        raise DatasetError(f"no dataset given: set run-config key 'data-dir' or the environment variable "
                           f"{DATA_DIR_ENV}")
    root = Path(raw).expanduser().resolve()
    if not root.exists():
        raise DatasetError(f"data dir {root} is missing (no such folder or file)")
    return root


def open_dataset(data_dir: str | os.PathLike | None, data_keys: str = "", cache_dir: Path | None = None) -> Dataset:
    """The dataset in `data_dir` (or $FEDXMR_DATA_DIR), nothing read yet; `data_keys` maps a feature file's
    variables; a feature file without split indices gets a seeded split, one without dev indices a dev carved from
    train, both written down under `cache_dir/splits` (`common.data.precomputed`)."""
    root = _root(data_dir)
    if is_feature_file(root):
        return FeatureFile(root, data_keys, cache_dir / "splits" if cache_dir is not None else None)
    karpathy = karpathy_file(root)
    if karpathy is not None:
        return KarpathyJson(root, karpathy)
    return Flickr8kFolder(root)


def check_data_dir(data_dir: str | os.PathLike | None, data_keys: str = "") -> Path:
    """The data dir, checked (a Karpathy JSON or a feature file is read and validated); a clear error naming the
    file otherwise."""
    dataset = open_dataset(data_dir, data_keys)
    dataset.check()
    return dataset.root


def load_split(data_dir: str | os.PathLike | None, split: str, max_images: int = 0, check_images: bool = True,
               data_keys: str = "", cache_dir: Path | None = None) -> RetrievalSplit:
    """Split `split` ("train", "dev" or "test") of the dataset in `data_dir` (`open_dataset`, `Dataset.load`)."""
    return open_dataset(data_dir, data_keys, cache_dir).load(split, max_images, check_images)


def backbone_for(name: str, data_dir: str | os.PathLike | None, data_keys: str = "", device: str = "cpu") -> Backbone:
    """The backbone a run names; `identity` takes its dimensions from the feature file in `data_dir`."""
    if name != IDENTITY:
        return build_backbone(name, device)
    dataset = open_dataset(data_dir, data_keys)
    dims = dataset.feature_dims()
    if dims is None:
        raise BackboneError(f"backbone 'identity' needs a precomputed-feature dataset (.npz / .mat), not "
                            f"{dataset.root}")
    return identity_backbone(dims["img"], dims["txt"])


def concept_count(data_dir: str | os.PathLike | None, data_keys: str = "") -> int:
    """Label columns of the dataset in `data_dir` (`Dataset.label_count`). Sizes the heads and tables that are
    indexed by label (FedCAFE's memory and classifier, PLFedCMH's and FedProto's prototypes)."""
    return open_dataset(data_dir, data_keys).label_count()


def split_concepts(data: RetrievalSplit) -> int:
    """`concept_count` from a split (a node's shard, which may be a materialised directory): its own label columns
    when it came from a feature file (kept by every node), else the DERIVED concepts (an image-only view holds
    none)."""
    return data.labels.shape[1] if data.features is not None else len(CONCEPT_NAMES)
