"""The one dataset interface (issue 28): `common.data` has no import cycle, and every format loads the same split
through `open_dataset` / `Dataset.load` with the same fields."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import common.data
from common.data.concepts import CONCEPT_NAMES
from common.data.datasets import load_split, open_dataset
from common.data.flickr8k import Flickr8kFolder
from common.data.karpathy import KarpathyJson
from common.data.precomputed import FeatureFile
from common.data.split import SPLITS, RetrievalSplit

DATA = Path(common.data.__file__).parent
PACKAGE = "common.data"


def _module(path: Path) -> str:
    parts = path.relative_to(DATA).with_suffix("").parts
    return ".".join((PACKAGE, *parts[:-1])) if parts[-1] == "__init__" else ".".join((PACKAGE, *parts))


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The `common.data` modules `path` imports anywhere in its body (inside functions too), relative imports
    resolved; `from pkg import name` counts `pkg.name` when that is a module."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from . import x` / `from ..split import y`: relative to the importing package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _import_graph() -> dict[str, set[str]]:
    files = sorted(DATA.rglob("*.py"))
    modules = {_module(p) for p in files}
    return {_module(p): _imports(p, modules) - {_module(p)} for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (a path that returns to its first module), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[module] = 2
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


def test_no_import_cycle_under_common_data() -> None:
    graph = _import_graph()
    # the walk sees what it should: local imports included, the CLIs' commands apart from the modules they use
    assert {"common.data.split", "common.data.concepts.__main__", "common.data.partition.__main__"} <= set(graph)
    assert "common.data.split" in graph["common.data.flickr8k"]
    assert "common.data.datasets" in graph["common.data.concepts.__main__"]
    assert graph["common.data.concepts"] == set()
    assert _cycle(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


CAPTIONS = {f"{k}.jpg": [f"a dog runs on the grass {k}", f"a dog in a field {k}", f"a man and a bike {k}",
                         f"a red ball {k}", f"water {k}"] for k in "abcdefgh"}
SPLIT = {"train": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "dev": ["e.jpg", "f.jpg"], "test": ["h.jpg", "g.jpg"]}


def _karpathy(root: Path, images: Path) -> Path:
    """The same images, captions and splits as a Karpathy JSON in `root` (its `images/`: a link to `images`)."""
    root.mkdir()
    (root / "images").symlink_to(images)
    split_of = {"train": "train", "dev": "val", "test": "test"}
    entries = [{"filename": name, "split": split_of[s], "sentences": [{"raw": c} for c in CAPTIONS[name]]}
               for s, names in SPLIT.items() for name in names]
    (root / "dataset_tiny.json").write_text(json.dumps({"dataset": "tiny", "images": entries}))
    return root


def _features(path: Path, labels: dict[str, np.ndarray]) -> Path:
    """A feature file of the same items (in split order) with the same labels."""
    all_labels = np.concatenate([labels[s] for s in SPLITS])
    n = len(all_labels)
    rng = np.random.default_rng(0)
    bounds = np.cumsum([0] + [len(labels[s]) for s in SPLITS])
    splits = {s: np.arange(bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}
    np.savez(path, img=rng.normal(size=(n, 6)).astype(np.float32), txt=rng.normal(size=(n, 4)).astype(np.float32),
             labels=all_labels, **splits)
    return path


def _check_fields(data: RetrievalSplit, split: str, dataset_name: str, label_count: int) -> None:
    assert data.name == split and data.dataset == dataset_name
    assert data.labels.shape == (len(data.images), label_count) and data.labels.dtype == np.uint8
    assert len(data.caption_ids) == len(data.captions) == len(data.caption_image)
    assert np.array_equal(np.unique(data.caption_image), np.arange(len(data.images)))


def test_every_format_loads_the_same_split_through_the_interface(tmp_path: Path,
                                                                 make_fake_flickr8k: Callable[..., Path]) -> None:
    folder = make_fake_flickr8k(tmp_path / "flickr8k", CAPTIONS, SPLIT)
    flickr8k = open_dataset(folder)
    assert isinstance(flickr8k, Flickr8kFolder) and flickr8k.splits == SPLITS
    loaded = {s: flickr8k.load(s) for s in SPLITS}
    karpathy = open_dataset(_karpathy(tmp_path / "karpathy", folder / "images"))
    assert isinstance(karpathy, KarpathyJson) and karpathy.name == "karpathy-tiny"
    features = open_dataset(_features(tmp_path / "f.npz", {s: d.labels for s, d in loaded.items()}))
    assert isinstance(features, FeatureFile) and features.name == "features-f"
    assert (flickr8k.label_count(), karpathy.label_count(), features.label_count()) == (len(CONCEPT_NAMES),) * 3
    assert flickr8k.feature_dims() is None and karpathy.feature_dims() is None
    assert features.feature_dims() == {"img": 6, "txt": 4}
    for dataset in (flickr8k, karpathy, features):
        dataset.check()
        for split in SPLITS:
            data = dataset.load(split)
            _check_fields(data, split, dataset.name, dataset.label_count())
            assert data.images == load_split(dataset.root, split).images  # the entry point gives the same split
            assert np.array_equal(data.labels, loaded[split].labels)  # same items, same order, same labels
            if dataset is features:
                first = sum(len(SPLIT[s]) for s in SPLITS[:SPLITS.index(split)])  # items are numbered in split order
                assert data.images == tuple(str(i) for i in range(first, first + len(SPLIT[split])))
                assert {m: f.shape[1] for m, f in data.features.items()} == features.feature_dims()
                assert all(len(f) == len(data.images) for f in data.features.values())
            else:
                assert data.features is None and data.images == tuple(SPLIT[split])
                assert (data.caption_ids, data.captions) == (loaded[split].caption_ids, loaded[split].captions)
                assert all(p.is_file() for p in data.image_paths())
    with pytest.raises(ValueError, match="unknown split"):
        karpathy.load("val")
