"""The one dataset interface and the shape every format loads into: a `Dataset` (Flickr8k folder, Karpathy JSON,
feature file; `common.data.datasets.open_dataset` picks one) loads each of its splits as a `RetrievalSplit` of items
with their captions (or texts), labels and either image paths or given features; the helpers here cut such a split.
Every other module of `common.data` builds on this one; it imports only the concept labeller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.data.concepts import CONCEPT_NAMES, image_labels

DATA_DIR_ENV = "FEDXMR_DATA_DIR"
SPLITS: tuple[str, ...] = ("train", "dev", "test")


class DatasetError(ValueError):
    """The dataset folder is missing or malformed; the message names the file or item."""


@dataclass(frozen=True)
class RetrievalSplit:
    """One split: items (images, or a feature file's item numbers), their captions (grouped by item, in item order),
    labels (DERIVED from the captions, or a feature file's own) and, for a feature file, the given features."""

    name: str
    root: Path
    images: tuple[str, ...]
    caption_ids: tuple[str, ...]
    captions: tuple[str, ...]
    caption_image: np.ndarray  # (n_captions,) index into `images`
    labels: np.ndarray  # (n_images, n_labels): derived from captions (common.data.concepts) or given
    image_root: Path | None = None  # where image names resolve; None: `root/images` (the Flickr8k layout)
    dataset: str = "flickr8k"  # names the feature cache's namespace (common.features)
    features: Mapping[str, np.ndarray] | None = None  # given features (precomputed datasets: per image / caption)

    def image_paths(self, indices: np.ndarray | None = None) -> list[Path]:
        idx = range(len(self.images)) if indices is None else indices
        folder = self.image_root or self.root / "images"
        return [folder / self.images[i] for i in idx]


class Dataset(ABC):
    """A dataset on disk, whatever its format: what a node's shard (cut for the partitioner, or written to its
    directory), the server's evaluator and the search tool load through, so none of them branches on the format."""

    splits: tuple[str, ...] = SPLITS

    def __init__(self, root: Path) -> None:
        self.root = root  # the resolved data dir (a folder, or the JSON / feature file itself)

    @property
    @abstractmethod
    def name(self) -> str:
        """The feature cache's namespace of the dataset's items (`RetrievalSplit.dataset`)."""

    @abstractmethod
    def check(self) -> None:
        """Read and validate the dataset; a DatasetError naming the file otherwise."""

    @abstractmethod
    def load(self, split: str, max_images: int = 0, check_images: bool = True) -> RetrievalSplit:
        """Split `split`; `max_images` > 0 keeps its first N items; `check_images=False` does not look for the image
        files (a text-only node never reads them)."""

    def label_count(self) -> int:
        """Label columns: the DERIVED concepts of the captions, unless the format carries its own labels."""
        return len(CONCEPT_NAMES)

    def feature_dims(self) -> dict[str, int] | None:
        """Both towers' input sizes when the items come as given features (backbone `identity`); None for images
        and captions, which a backbone encodes."""
        return None


def assemble_split(name: str, root: Path, images: Sequence[str], captions: Mapping[str, list[tuple[str, str]]] | None,
                   check_images: bool, source: Path, image_root: Path | None = None,
                   dataset: str = "flickr8k") -> RetrievalSplit:
    """A split of `images` (files under `image_root`, default `root/images`) with their captions in image order and
    DERIVED labels.

    `captions=None` builds the caption-free view of an image-only node: no captions and no labels (labels are
    derived from captions). Errors name `source`, the file that listed the images.
    """
    folder = image_root or root / "images"
    caption_ids: list[str] = []
    texts: list[str] = []
    owner: list[int] = []
    for i, image in enumerate(images):
        if captions is not None and image not in captions:
            raise DatasetError(f"{source}: image {image!r} has no caption")
        if check_images and not (folder / image).is_file():
            raise DatasetError(f"{source}: image file {folder / image} does not exist")
        for cid, cap in captions[image] if captions is not None else ():
            caption_ids.append(cid)
            texts.append(cap)
            owner.append(i)
    if captions is None:
        labels = np.zeros((len(images), 0), dtype=np.uint8)
    else:
        labels = image_labels([[cap for _, cap in captions[image]] for image in images])
    return RetrievalSplit(
        name=name,
        root=root,
        images=tuple(images),
        caption_ids=tuple(caption_ids),
        captions=tuple(texts),
        caption_image=np.asarray(owner, dtype=np.int64),
        labels=labels,
        image_root=image_root,
        dataset=dataset,
    )


def caption_rows(data: RetrievalSplit, image_indices: np.ndarray) -> np.ndarray:
    """Indices of the captions of the images at `image_indices`, grouped in that image order (the caption order of
    `subset`, so caption features can be cut the same way)."""
    image_indices = np.asarray(image_indices, dtype=np.int64)
    if len(np.unique(image_indices)) != len(image_indices):
        raise ValueError("subset(): image indices must be unique")
    remap = np.full(len(data.images), -1, dtype=np.int64)
    remap[image_indices] = np.arange(len(image_indices))
    keep = np.flatnonzero(remap[data.caption_image] >= 0)
    return keep[np.argsort(remap[data.caption_image[keep]], kind="stable")]


def subset(data: RetrievalSplit, image_indices: np.ndarray) -> RetrievalSplit:
    """The images at `image_indices` with all their captions (a client's shard)."""
    image_indices = np.asarray(image_indices, dtype=np.int64)
    keep = caption_rows(data, image_indices)
    remap = np.full(len(data.images), -1, dtype=np.int64)
    remap[image_indices] = np.arange(len(image_indices))
    return RetrievalSplit(
        name=data.name,
        root=data.root,
        images=tuple(data.images[i] for i in image_indices),
        caption_ids=tuple(data.caption_ids[j] for j in keep),
        captions=tuple(data.captions[j] for j in keep),
        caption_image=remap[data.caption_image[keep]],
        labels=data.labels[image_indices],
        image_root=data.image_root,
        dataset=data.dataset,
        features=None if data.features is None else {
            m: f[image_indices] if m == "img" else f[keep] for m, f in data.features.items()},
    )


def feature_split(name: str, root: Path, dataset: str, items: np.ndarray, labels: np.ndarray,
                  features: dict[str, np.ndarray]) -> RetrievalSplit:
    """A split of a feature dataset: one text per item, both named by the item's index in the file (`features` may
    hold one modality: a node's materialised shard)."""
    ids = tuple(str(int(i)) for i in items)
    return RetrievalSplit(name=name, root=root, images=ids, caption_ids=tuple(f"{i}#0" for i in ids), captions=ids,
                          caption_image=np.arange(len(ids)), labels=labels, dataset=dataset, features=features)
