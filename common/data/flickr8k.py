"""Flickr8k: 8,091 images, 5 captions each, standard 6k/1k/1k train/dev/test splits.

The folder layout is the one of `shared/data/flickr8k/` (see its README): `images/*.jpg`,
`Flickr8k.token.txt` (`<image>#<k>\t<caption>`), `Flickr_8k.{train,dev,test}Images.txt`.
The folder comes from the run config (`data-dir`) or `$FEDXMR_DATA_DIR`; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.data.concepts import image_labels

SPLITS: tuple[str, ...] = ("train", "dev", "test")
_SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
TOKEN_FILE = "Flickr8k.token.txt"
DATA_DIR_ENV = "FEDXMR_DATA_DIR"


class DatasetError(ValueError):
    """The dataset folder is missing or malformed; the message names the file or item."""


@dataclass(frozen=True)
class RetrievalSplit:
    """One split: images, their captions (grouped by image, in image order) and DERIVED labels."""

    name: str
    root: Path
    images: tuple[str, ...]
    caption_ids: tuple[str, ...]
    captions: tuple[str, ...]
    caption_image: np.ndarray  # (n_captions,) index into `images`
    labels: np.ndarray  # (n_images, n_concepts) derived from captions, see common.data.concepts
    image_root: Path | None = None  # where image names resolve; None: `root/images` (the Flickr8k layout)
    dataset: str = "flickr8k"  # names the feature cache's namespace (common.features)
    features: Mapping[str, np.ndarray] | None = None  # given features (precomputed datasets: per image / caption)

    def image_paths(self, indices: np.ndarray | None = None) -> list[Path]:
        idx = range(len(self.images)) if indices is None else indices
        folder = self.image_root or self.root / "images"
        return [folder / self.images[i] for i in idx]


def resolve_data_dir(value: str | os.PathLike | None) -> Path:
    """The dataset folder from an explicit value or $FEDXMR_DATA_DIR, with a clear error when absent."""
    raw = str(value or os.environ.get(DATA_DIR_ENV, ""))
    if not raw:
        raise DatasetError(
            f"no Flickr8k folder given: set run-config key 'data-dir' or the environment variable {DATA_DIR_ENV}"
        )
    root = Path(raw).expanduser().resolve()
    for name in (TOKEN_FILE, *_SPLIT_FILES.values(), "images"):
        if not (root / name).exists():
            raise DatasetError(f"Flickr8k folder {root} is missing '{name}' (expected the layout of Flickr8k)")
    return root


@lru_cache(maxsize=4)
def read_captions(root: Path) -> dict[str, list[tuple[str, str]]]:
    """image name -> [(caption id, caption)] in caption-number order, from `root/Flickr8k.token.txt`; malformed
    lines name their line number."""
    by_image: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    path = root / TOKEN_FILE
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            image, hash_, k = key.partition("#")
            if not sep or not hash_ or not k.isdigit():
                raise DatasetError(f"{path}:{lineno}: expected '<image>#<k>\\t<caption>', got {line[:80]!r}")
            by_image[image].append((int(k), key, caption.strip()))
    return {img: [(cid, cap) for _, cid, cap in sorted(rows)] for img, rows in by_image.items()}


def load_split(data_dir: str | os.PathLike | None, split: str, max_images: int = 0,
               check_images: bool = True) -> RetrievalSplit:
    """Load a standard split; `max_images > 0` keeps the first N images of the split file (small test subsets).

    `check_images=False` skips checking that the image files exist (a text-only node never touches them).
    """
    if split not in _SPLIT_FILES:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = resolve_data_dir(data_dir)
    split_file = root / _SPLIT_FILES[split]
    names = [ln.strip() for ln in split_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if max_images > 0:
        names = names[:max_images]
    return assemble_split(split, root, names, read_captions(root), check_images, source=split_file)


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
