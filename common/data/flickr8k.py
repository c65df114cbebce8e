"""Flickr8k: 8,091 images, 5 captions each, standard 6k/1k/1k train/dev/test splits.

The folder layout is the one of `shared/data/flickr8k/` (see its README): `images/*.jpg`,
`Flickr8k.token.txt` (`<image>#<k>\t<caption>`), `Flickr_8k.{train,dev,test}Images.txt`.
The folder comes from the run config (`data-dir`) or `$FEDXMR_DATA_DIR`; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from common.data.split import DATA_DIR_ENV, SPLITS, Dataset, DatasetError, RetrievalSplit, assemble_split

_SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
TOKEN_FILE = "Flickr8k.token.txt"


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


class Flickr8kFolder(Dataset):
    """The Flickr8k folder layout as a `Dataset` (labels: the DERIVED concepts)."""

    @property
    def name(self) -> str:
        return "flickr8k"

    def check(self) -> None:
        resolve_data_dir(self.root)

    def load(self, split: str, max_images: int = 0, check_images: bool = True) -> RetrievalSplit:
        return load_split(self.root, split, max_images, check_images)
