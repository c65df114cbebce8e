"""Karpathy-split JSON (`dataset_coco.json`, `dataset_flickr30k.json`, `dataset_flickr8k.json`): MS-COCO and
Flickr30K as they are distributed for image-caption retrieval.

Layout: `data-dir` is a folder holding one `dataset_*.json` and the images (or `data-dir` is the JSON file itself).
The JSON holds `images[]`, each with `filename`, optional `filepath` (COCO: `train2014` / `val2014`), `split`
(`train`, `restval`, `val`, `test`) and `sentences[].raw`. Splits: train = train + restval (as the retrieval
papers count them), dev = val, test = test. An image file is looked up at `<folder>/<filepath>/<filename>`, else
`<folder>/images/<filepath>/<filename>`. Labels are the DERIVED concepts of the captions, as for Flickr8k.
Malformed entries get an error naming the file, the entry index and the key.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from common.data.split import SPLITS, Dataset, DatasetError, RetrievalSplit, assemble_split

SPLIT_OF = {"train": "train", "restval": "train", "val": "dev", "test": "test"}


def karpathy_file(root: Path) -> Path | None:
    """The Karpathy JSON of a data dir (the file itself, or the one `dataset_*.json` in the folder); None if none."""
    if root.is_file() and root.suffix == ".json":
        return root
    found = sorted(root.glob("dataset_*.json")) if root.is_dir() else []
    if len(found) > 1:
        raise DatasetError(f"{root}: several Karpathy JSON files {[p.name for p in found]}; point data-dir at one")
    return found[0] if found else None


@lru_cache(maxsize=4)
def read_karpathy(path: Path) -> tuple[str, dict[str, list[str]], dict[str, list[tuple[str, str]]], Path]:
    """(dataset name, split -> image names, image name -> [(caption id, caption)], image folder) of a Karpathy JSON;
    an image name is `<filepath>/<filename>` (or `<filename>`)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc})") from None
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: expected a non-empty list under key 'images'")
    splits: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    captions: dict[str, list[tuple[str, str]]] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"]:
            raise DatasetError(f"{where}: missing key 'filename'")
        if entry.get("split") not in SPLIT_OF:
            raise DatasetError(f"{where}: key 'split' is {entry.get('split')!r}, expected one of {sorted(SPLIT_OF)}")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences or not all(
                isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip() for s in sentences):
            raise DatasetError(f"{where}: key 'sentences' must be a non-empty list of {{'raw': <caption>}}")
        name = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
        if name in captions:
            raise DatasetError(f"{where}: image {name!r} listed twice")
        captions[name] = [(f"{name}#{k}", s["raw"].strip()) for k, s in enumerate(sentences)]
        splits[SPLIT_OF[entry["split"]]].append(name)
    first = next(iter(captions))
    folder = path.parent if (path.parent / first).is_file() or not (path.parent / "images").is_dir() \
        else path.parent / "images"
    return str(doc.get("dataset") or path.stem.removeprefix("dataset_")), splits, captions, folder


class KarpathyJson(Dataset):
    """A Karpathy-split JSON as a `Dataset`: `root` is the data dir, `path` its JSON (labels: the DERIVED concepts)."""

    def __init__(self, root: Path, path: Path) -> None:
        super().__init__(root)
        self.path = path

    @property
    def name(self) -> str:
        return f"karpathy-{read_karpathy(self.path)[0]}"

    def check(self) -> None:
        read_karpathy(self.path)

    def load(self, split: str, max_images: int = 0, check_images: bool = True) -> RetrievalSplit:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected train, dev or test")
        _, splits, captions, folder = read_karpathy(self.path)
        names = splits[split][:max_images] if max_images > 0 else splits[split]
        if not names:
            raise DatasetError(f"{self.path}: no images in split {split!r} (Karpathy splits: train+restval, val, test)")
        return assemble_split(split, self.path.parent, names, captions, check_images, source=self.path,
                              image_root=folder, dataset=self.name)
