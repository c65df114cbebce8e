"""Tests for common.data: Flickr8k loading (real and fake folders), derived concept labels, partitions, subsets."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from common.data import flickr8k
from common.data.concepts import CONCEPT_NAMES, MIN_CAPTIONS, caption_concepts, image_labels
from common.data.flickr8k import load_split, resolve_data_dir
from common.data.split import DATA_DIR_ENV, DatasetError, RetrievalSplit, subset
from common.data.partition import iid_partition

EXPECTED_SIZES = {"train": 6000, "dev": 1000, "test": 1000}
FakeMaker = Callable[..., Path]


@pytest.fixture(scope="module")
def real_splits(flickr8k_dir: Path) -> dict[str, RetrievalSplit]:
    return {s: load_split(flickr8k_dir, s) for s in EXPECTED_SIZES}


def _concepts(caption: str) -> set[str]:
    return {name for name, on in zip(CONCEPT_NAMES, caption_concepts(caption)) if on}


# ------------------------------------------------------------------------------------------ real Flickr8k
@pytest.mark.parametrize("split", list(EXPECTED_SIZES))
def test_real_split_structure(real_splits: dict[str, RetrievalSplit], split: str) -> None:
    """Guards the standard split sizes, 5 captions per image grouped in image order, and consistent ids."""
    data = real_splits[split]
    n = EXPECTED_SIZES[split]
    assert data.name == split and len(data.images) == n and len(set(data.images)) == n
    assert len(data.captions) == len(data.caption_ids) == len(data.caption_image) == 5 * n
    assert np.array_equal(np.bincount(data.caption_image, minlength=n), np.full(n, 5))
    assert np.all(np.diff(data.caption_image) >= 0), "captions must be grouped by image, in image order"
    for cid, owner in zip(data.caption_ids, data.caption_image):
        assert cid.split("#")[0] == data.images[owner], cid
    assert all(c.strip() for c in data.captions)
    assert all(p.is_file() for p in data.image_paths(np.array([0, n - 1])))


@pytest.mark.parametrize("split", list(EXPECTED_SIZES))
def test_real_split_labels(real_splits: dict[str, RetrievalSplit], split: str) -> None:
    """Guards the derived labels: (n, n_concepts) uint8 0/1 and computed from exactly the image's own captions."""
    data = real_splits[split]
    assert data.labels.shape == (len(data.images), len(CONCEPT_NAMES))
    assert data.labels.dtype == np.uint8 and set(np.unique(data.labels)) <= {0, 1}
    grouped = [[data.captions[j] for j in np.flatnonzero(data.caption_image == i)] for i in range(20)]
    assert np.array_equal(data.labels[:20], image_labels(grouped))


def test_real_splits_disjoint_and_labels_plausible(real_splits: dict[str, RetrievalSplit]) -> None:
    """Guards against overlapping splits and degenerate labels (Flickr8k is dog- and person-heavy)."""
    train, dev, test = (set(real_splits[s].images) for s in ("train", "dev", "test"))
    assert not (train & dev) and not (train & test) and not (dev & test)
    counts = dict(zip(CONCEPT_NAMES, real_splits["train"].labels.sum(axis=0)))
    assert counts["dog"] > 1000 and counts["man"] > 1000
    assert all(c > 0 for c in counts.values()), counts


def test_real_labels_deterministic(flickr8k_dir: Path, real_splits: dict[str, RetrievalSplit]) -> None:
    """Guards reproducibility: re-reading the token file gives the same captions and label counts."""
    flickr8k.read_captions.cache_clear()
    again = load_split(flickr8k_dir, "test")
    first = real_splits["test"]
    assert again.caption_ids == first.caption_ids and again.captions == first.captions
    assert np.array_equal(again.labels, first.labels)
    assert np.array_equal(again.labels.sum(axis=0), first.labels.sum(axis=0))


def test_max_images_keeps_first_n(flickr8k_dir: Path, real_splits: dict[str, RetrievalSplit]) -> None:
    """Guards that max_images truncates to the first N split entries with their captions and labels."""
    full = real_splits["dev"]
    small = load_split(flickr8k_dir, "dev", max_images=7)
    assert small.images == full.images[:7]
    assert small.caption_ids == full.caption_ids[:35] and small.captions == full.captions[:35]
    assert np.array_equal(small.caption_image, full.caption_image[:35])
    assert np.array_equal(small.labels, full.labels[:7])


def test_data_dir_from_env(monkeypatch: pytest.MonkeyPatch, flickr8k_dir: Path) -> None:
    """Guards the $FEDXMR_DATA_DIR fallback when no explicit data-dir is given."""
    monkeypatch.setenv(DATA_DIR_ENV, str(flickr8k_dir))
    assert resolve_data_dir("") == flickr8k_dir.resolve()
    assert len(load_split("", "test", max_images=2).images) == 2


# ------------------------------------------------------------------------------------------ errors
def test_resolve_data_dir_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the message when neither data-dir nor the env var is set."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DatasetError) as err:
        resolve_data_dir("")
    assert "data-dir" in str(err.value) and "FEDXMR_DATA_DIR" in str(err.value)


def test_resolve_data_dir_missing_token_file(tmp_path: Path, make_fake_flickr8k: FakeMaker) -> None:
    """Guards that an incomplete folder is rejected with the missing file named."""
    root = make_fake_flickr8k(tmp_path / "ds", {"a.jpg": ["a dog"]}, {"train": ["a.jpg"]})
    assert resolve_data_dir(root) == root.resolve()
    (root / "Flickr8k.token.txt").unlink()
    with pytest.raises(DatasetError, match="Flickr8k.token.txt"):
        resolve_data_dir(root)


def test_unknown_split(tmp_path: Path, make_fake_flickr8k: FakeMaker) -> None:
    """Guards that a typo in the split name is an error, not an empty split."""
    root = make_fake_flickr8k(tmp_path, {"a.jpg": ["a dog"]}, {"train": ["a.jpg"]})
    with pytest.raises(DatasetError, match="validation"):
        load_split(root, "validation")


def test_fake_folder_caption_order(tmp_path: Path, make_fake_flickr8k: FakeMaker) -> None:
    """Guards that captions are ordered by caption number even when the token file is not."""
    caps = {"a.jpg": ["a0", "a1", "a2"], "b.jpg": ["b0", "b1"]}
    lines = ["b.jpg#1\tb1", "a.jpg#2\ta2", "a.jpg#0\ta0", "", "b.jpg#0\tb0", "a.jpg#1\ta1"]
    root = make_fake_flickr8k(tmp_path, caps, {"dev": ["b.jpg", "a.jpg"]}, token_lines=lines)
    data = load_split(root, "dev")
    assert data.images == ("b.jpg", "a.jpg")
    assert data.caption_ids == ("b.jpg#0", "b.jpg#1", "a.jpg#0", "a.jpg#1", "a.jpg#2")
    assert data.captions == ("b0", "b1", "a0", "a1", "a2")
    assert data.caption_image.tolist() == [0, 0, 1, 1, 1]


def test_malformed_token_line(tmp_path: Path, make_fake_flickr8k: FakeMaker) -> None:
    """Guards that a bad token line is reported with its file and line number."""
    lines = ["a.jpg#0\ta dog", "a.jpg#1\ta brown dog", "a.jpg 2 no tab or hash here", "a.jpg#3\tx"]
    root = make_fake_flickr8k(tmp_path, {"a.jpg": ["x"]}, {"train": ["a.jpg"]}, token_lines=lines)
    with pytest.raises(DatasetError) as err:
        load_split(root, "train")
    assert "Flickr8k.token.txt:3" in str(err.value)


def test_split_image_without_captions(tmp_path: Path, make_fake_flickr8k: FakeMaker) -> None:
    """Guards that a split entry with no caption is an error naming the image (not silently dropped)."""
    root = make_fake_flickr8k(tmp_path, {"a.jpg": ["a dog"]}, {"test": ["a.jpg", "orphan.jpg"]})
    (root / "images" / "orphan.jpg").write_bytes((root / "images" / "a.jpg").read_bytes())
    with pytest.raises(DatasetError, match="orphan.jpg"):
        load_split(root, "test")


def test_split_image_file_missing(tmp_path: Path, make_fake_flickr8k: FakeMaker) -> None:
    """Guards that a captioned split entry whose JPEG is absent is an error naming the image."""
    root = make_fake_flickr8k(tmp_path, {"a.jpg": ["a dog"], "b.jpg": ["a cat"]}, {"train": ["a.jpg", "b.jpg"]})
    (root / "images" / "b.jpg").unlink()
    with pytest.raises(DatasetError, match="b.jpg"):
        load_split(root, "train")


# ------------------------------------------------------------------------------------------ concepts
def test_caption_concepts() -> None:
    """Guards whole-word, case-insensitive concept matching including inflected forms."""
    found = _concepts("A black dog runs on the beach")
    assert {"dog", "black", "run", "beach"} <= found
    assert "snow" not in found and "man" not in found
    assert _concepts("TWO PUPPIES") == {"dog"}
    assert "dog" not in _concepts("a hotdog stand"), "substring matches must not count"
    assert _concepts("") == set()


def test_image_labels_need_min_captions() -> None:
    """Guards the >= MIN_CAPTIONS vote: one mention is noise, two make a label."""
    assert MIN_CAPTIONS == 2
    dog, car = CONCEPT_NAMES.index("dog"), CONCEPT_NAMES.index("vehicle")
    labels = image_labels([
        ["a dog", "a cat", "a car"],  # dog once, car once -> nothing
        ["a dog", "two dogs play", "a car"],  # dog twice -> dog
        [],
    ])
    assert labels.shape == (3, len(CONCEPT_NAMES)) and labels.dtype == np.uint8
    assert labels[0].sum() == 0
    assert labels[1, dog] == 1 and labels[1, car] == 0 and labels[1].sum() == 1
    assert labels[2].sum() == 0


# ------------------------------------------------------------------------------------------ partitions
@pytest.mark.parametrize(("n", "k", "seed"), [(10, 1, 0), (10, 3, 0), (101, 7, 3), (6000, 10, 42), (5, 5, 1)])
def test_iid_partition_cover(n: int, k: int, seed: int) -> None:
    """Guards that partitions are disjoint, cover every index once, are balanced, and are seed-deterministic."""
    parts = [iid_partition(n, k, p, seed) for p in range(k)]
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(n)), "every index exactly once"
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert all(np.array_equal(p, iid_partition(n, k, i, seed)) for i, p in enumerate(parts))
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_iid_partition_seed_matters() -> None:
    """Guards that a different seed gives a different split (the seed is actually used)."""
    assert not np.array_equal(iid_partition(100, 4, 0, seed=0), iid_partition(100, 4, 0, seed=1))


@pytest.mark.parametrize(("n", "k", "pid"), [(10, 0, 0), (10, 3, 3), (10, 3, -1), (2, 3, 0)])
def test_iid_partition_invalid(n: int, k: int, pid: int) -> None:
    """Guards that bad partition arguments fail loudly instead of returning empty shards."""
    with pytest.raises(ValueError):
        iid_partition(n, k, pid, seed=0)


# ------------------------------------------------------------------------------------------ subset
def _toy_split() -> RetrievalSplit:
    per_image = {"a.jpg": 2, "b.jpg": 1, "c.jpg": 3, "d.jpg": 2}
    ids = [f"{img}#{k}" for img, n in per_image.items() for k in range(n)]
    owner = [i for i, n in enumerate(per_image.values()) for _ in range(n)]
    labels = np.arange(4 * len(CONCEPT_NAMES)).reshape(4, -1).astype(np.uint8) % 2
    return RetrievalSplit("train", Path("/nowhere"), tuple(per_image), tuple(ids), tuple(f"cap {i}" for i in ids),
                          np.asarray(owner, dtype=np.int64), labels)


def test_subset_toy_permuted() -> None:
    """Guards that subset keeps all and only the chosen images' captions, remapped, in the chosen order."""
    data = _toy_split()
    sub = subset(data, np.array([3, 0, 2]))
    assert sub.images == ("d.jpg", "a.jpg", "c.jpg")
    assert sub.caption_ids == ("d.jpg#0", "d.jpg#1", "a.jpg#0", "a.jpg#1", "c.jpg#0", "c.jpg#1", "c.jpg#2")
    assert sub.captions == tuple(f"cap {i}" for i in sub.caption_ids)
    assert sub.caption_image.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert np.array_equal(sub.labels, data.labels[[3, 0, 2]])


def test_subset_real_partition(real_splits: dict[str, RetrievalSplit]) -> None:
    """Guards subset on a real partition: caption ownership survives the remap for every caption."""
    data = real_splits["dev"]
    idx = iid_partition(len(data.images), 3, 1, seed=0)
    sub = subset(data, idx)
    assert len(sub.images) == len(idx) and len(sub.caption_ids) == 5 * len(idx)
    chosen = set(sub.images)
    assert set(sub.caption_ids) == {c for c, o in zip(data.caption_ids, data.caption_image) if data.images[o] in chosen}
    for cid, owner in zip(sub.caption_ids, sub.caption_image):
        assert cid.split("#")[0] == sub.images[owner]
    assert np.array_equal(sub.labels, data.labels[idx])


@pytest.mark.parametrize("name", ["iid", "dirichlet", "nway", "quantity"])
@pytest.mark.parametrize("seed", [0, 3])
def test_every_partitioner_covers_each_item_exactly_once(name: str, seed: int) -> None:
    from common.data.partition import partition

    rng = np.random.default_rng(42)
    labels = (rng.random((400, 6)) < 0.25).astype(np.uint8)
    parts = partition(name, 400, 7, seed, labels=labels, beta=0.3, ways=2)
    assert len(parts) == 7 and min(len(p) for p in parts) >= 2
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(400))
    again = partition(name, 400, 7, seed, labels=labels, beta=0.3, ways=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_skews_classes_and_nway_limits_them() -> None:
    """Small beta concentrates each class on few clients; nway with 1 way gives most clients few classes."""
    from common.data.partition import dominant_class, partition

    rng = np.random.default_rng(1)
    labels = np.eye(5, dtype=np.uint8)[rng.integers(0, 5, 1000)]
    classes = dominant_class(labels)

    def top_share(parts):  # mean over clients of the share of their most common class
        return np.mean([np.bincount(classes[p], minlength=6).max() / len(p) for p in parts])

    iid = partition("iid", 1000, 10, 0)
    assert top_share(partition("dirichlet", 1000, 10, 0, labels=labels, beta=0.1)) > top_share(iid) + 0.3
    nway = partition("nway", 1000, 10, 0, labels=labels, ways=1)
    assert all(len(np.unique(classes[p])) == 1 for p in nway)


def test_dominant_class_is_the_rarest_label() -> None:
    from common.data.partition import dominant_class

    labels = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 0]], dtype=np.uint8)  # counts 3, 1, 1
    assert dominant_class(labels).tolist() == [1, 0, 2, 3]


@pytest.mark.parametrize(("n", "mix", "expected"), [(10, (0.5, 0.25, 0.25), (5, 3, 2)), (4, (1, 0, 0), (4, 0, 0)),
                                                    (3, (0, 0.5, 0.5), (0, 2, 1))])
def test_client_types_follow_the_mix(n: int, mix: tuple, expected: tuple) -> None:
    from common.data.federation import CLIENT_TYPES, client_types

    types = client_types(n, mix, seed=0)
    assert tuple(types.count(t) for t in CLIENT_TYPES) == expected
    assert types == client_types(n, mix, seed=0)


def test_test_shards_follow_each_clients_train_class_mix() -> None:
    """A client's local test shard must have its train shard's classes (else personalisation cannot be judged)."""
    from common.data.partition import dominant_class, follow_partition, partition

    rng = np.random.default_rng(2)
    train_labels = np.eye(5, dtype=np.uint8)[rng.integers(0, 5, 1000)]
    test_labels = np.eye(5, dtype=np.uint8)[rng.integers(0, 5, 200)]
    train_cls, test_cls = dominant_class(train_labels), dominant_class(test_labels)
    parts = partition("nway", 1000, 10, 0, labels=train_labels, ways=1)
    test_parts = follow_partition(train_cls, parts, test_cls, seed=0)
    assert np.array_equal(np.sort(np.concatenate(test_parts)), np.arange(200))
    for train_part, test_part in zip(parts, test_parts):
        assert set(test_cls[test_part]) <= set(train_cls[train_part])
    again = follow_partition(train_cls, parts, test_cls, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(test_parts, again))


def test_another_pool_takes_its_classes_from_the_train_rarity() -> None:
    """An item labelled {a, b} belongs to the class rarer *in train*: a test pool where b is rarer locally must
    still give it class a when a is the rarer one in train (the partition was drawn with train's classes)."""
    from common.data.partition import dominant_class

    train = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], bool)  # a is rare in train
    pool = np.array([[1, 1], [1, 0], [1, 0], [1, 0]], bool)  # b is rare in the pool
    assert dominant_class(pool)[0] == 1
    assert dominant_class(pool, train)[0] == 0
