"""Tests for common.features: the per-node feature cache (FeatureStore) and split_features, with fake encoders."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from common.backbones import Backbone
from common.data.split import RetrievalSplit
from common.features import FeatureStore, split_features

DIM = 4


def fake_feats(items: Sequence) -> np.ndarray:
    """A deterministic, item-specific feature row per item (works for ints, strings and paths)."""
    rows = []
    for it in items:
        s = str(it)
        rows.append([len(s), sum(map(ord, s)) % 997, sum((k + 1) * ord(c) for k, c in enumerate(s)) % 1009, 0.5])
    return np.asarray(rows, dtype=np.float32)


class CountingEncoder:
    """Records every batch it sees; optionally raises on the `fail_on`-th call (1-based)."""

    key = "counting"
    dim = DIM

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls = 0
        self.items: list = []
        self.fail_on = fail_on

    def encode(self, batch: Sequence) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError(f"encoder died on batch {self.calls}")
        self.items.extend(batch)
        return fake_feats(batch)


def _ids(n: int, start: int = 0) -> list[str]:
    return [f"id{i}" for i in range(start, start + n)]


def _store(tmp_path: Path, split: str = "train", modality: str = "img", key: str = "enc") -> FeatureStore:
    return FeatureStore(tmp_path, "flickr8k", split, modality, key)


def _chunk_ids(store: FeatureStore) -> dict[Path, list[str]]:
    out = {}
    for chunk in sorted(store.dir.glob("chunk-*.npz")):
        with np.load(chunk, allow_pickle=False) as z:
            out[chunk] = z["ids"].tolist()
    return out


def test_encode_then_load_in_requested_order(tmp_path: Path) -> None:
    """Guards that load returns exactly the encoder's rows, in the caller's id order, across chunks."""
    store, enc = _store(tmp_path), CountingEncoder()
    ids, items = _ids(10), [f"item-{i}" for i in range(10)]
    assert store.encode_missing(ids, items, enc.encode, batch_size=3, chunk_size=4) == 10
    expected = fake_feats(items)
    np.testing.assert_array_equal(store.load(ids), expected)
    perm = np.random.default_rng(0).permutation(10)
    np.testing.assert_array_equal(store.load([ids[i] for i in perm]), expected[perm])
    np.testing.assert_array_equal(store.load(["id7", "id2"]), expected[[7, 2]])
    assert store.load(ids).dtype == np.float32


def test_cached_ids_are_not_re_encoded(tmp_path: Path) -> None:
    """Guards the cache contract: known ids cost zero encoder calls; overlaps encode only the new ids."""
    store = _store(tmp_path)
    store.encode_missing(_ids(10), list(range(10)), CountingEncoder().encode, batch_size=4)
    again = CountingEncoder()
    assert store.encode_missing(_ids(10), list(range(10)), again.encode) == 0
    assert again.calls == 0
    overlap = CountingEncoder()
    assert store.encode_missing(_ids(10, start=5), list(range(5, 15)), overlap.encode, batch_size=4) == 5
    assert overlap.items == [10, 11, 12, 13, 14]
    np.testing.assert_array_equal(store.load(_ids(15)), fake_feats(range(15)))


def test_chunking_writes_one_file_per_chunk(tmp_path: Path) -> None:
    """Guards that every `chunk_size` items produce one chunk file and no temporary files remain."""
    store, enc = _store(tmp_path), CountingEncoder()
    store.encode_missing(_ids(7), list(range(7)), enc.encode, batch_size=2, chunk_size=3)
    chunks = _chunk_ids(store)
    assert len(chunks) == 3
    assert sorted(len(v) for v in chunks.values()) == [1, 3, 3]
    assert sorted(i for v in chunks.values() for i in v) == sorted(_ids(7))
    assert enc.calls == 5  # batches of 2 inside chunks of 3: 2+1, 2+1, 1
    assert not list(store.dir.glob("*.tmp"))


@pytest.mark.parametrize(("fail_on", "done"), [(3, 3), (4, 3), (5, 6)])
def test_interrupted_encoding_keeps_completed_chunks(tmp_path: Path, fail_on: int, done: int) -> None:
    """Guards resumability: a crash keeps only whole chunks (no partial chunk), and a rerun encodes the rest."""
    store, ids, items = _store(tmp_path), _ids(7), list(range(7))
    with pytest.raises(RuntimeError, match="encoder died"):
        store.encode_missing(ids, items, CountingEncoder(fail_on=fail_on).encode, batch_size=2, chunk_size=3)
    chunks = _chunk_ids(store)
    assert len(chunks) == done // 3
    assert sorted(i for v in chunks.values() for i in v) == sorted(ids[:done])
    loadable = [i for i in ids if i not in store.missing(ids)]
    assert loadable == ids[:done]
    np.testing.assert_array_equal(store.load(ids[:done]), fake_feats(items[:done]))
    assert not list(store.dir.glob("*.tmp"))
    rerun = CountingEncoder()
    assert store.encode_missing(ids, items, rerun.encode, batch_size=2, chunk_size=3) == 7 - done
    assert rerun.items == items[done:]
    np.testing.assert_array_equal(store.load(ids), fake_feats(items))


def _corrupt_one_chunk(store: FeatureStore, payload: bytes | None) -> tuple[Path, list[str]]:
    """Overwrite one chunk (garbage bytes, or its first half when payload is None); return it and its ids."""
    chunk, ids = next((c, v) for c, v in _chunk_ids(store).items() if len(v) == 3)
    chunk.write_bytes(payload if payload is not None else chunk.read_bytes()[: chunk.stat().st_size // 2])
    return chunk, ids


def test_corrupt_chunk_is_quarantined_and_re_encoded(tmp_path: Path) -> None:
    """Guards recovery from an unreadable chunk: moved to *.corrupt, only its items re-encoded, nothing else lost."""
    store, ids, items = _store(tmp_path), _ids(7), list(range(7))
    store.encode_missing(ids, items, CountingEncoder().encode, chunk_size=3)
    chunk, lost = _corrupt_one_chunk(store, b"this is definitely not an npz file")
    assert store.missing(ids) == lost
    assert chunk.with_suffix(".corrupt").is_file() and not chunk.exists()
    rerun = CountingEncoder()
    assert store.encode_missing(ids, items, rerun.encode, chunk_size=3) == 3
    assert sorted(f"id{i}" for i in rerun.items) == sorted(lost)
    np.testing.assert_array_equal(store.load(ids), fake_feats(items))
    assert len(_chunk_ids(store)) == 3


@pytest.mark.parametrize("payload", [None, b""], ids=["truncated", "empty"])
def test_truncated_or_empty_chunk_is_quarantined(tmp_path: Path, payload: bytes | None) -> None:
    """Guards recovery from a half-written or zero-byte chunk (disk full, copied cache): same as garbage bytes."""
    store, ids, items = _store(tmp_path), _ids(7), list(range(7))
    store.encode_missing(ids, items, CountingEncoder().encode, chunk_size=3)
    chunk, lost = _corrupt_one_chunk(store, payload)
    assert store.missing(ids) == lost
    assert chunk.with_suffix(".corrupt").is_file()


def test_load_unknown_id_names_it(tmp_path: Path) -> None:
    """Guards that a cache miss on load is a KeyError naming the id, not garbage rows."""
    store = _store(tmp_path)
    store.encode_missing(_ids(3), list(range(3)), CountingEncoder().encode)
    with pytest.raises(KeyError, match="id99"):
        store.load(["id0", "id99"])
    with pytest.raises(KeyError, match="id0"):
        _store(tmp_path, split="dev").load(["id0"])


def test_keys_splits_modalities_do_not_collide(tmp_path: Path) -> None:
    """Guards cache isolation: features of another encoder, split or modality are never served."""
    variants = [("train", "img", "enc-a"), ("train", "img", "enc-b"), ("dev", "img", "enc-a"), ("train", "txt", "enc-a")]
    stores = [_store(tmp_path, *v) for v in variants]
    assert len({s.dir for s in stores}) == len(stores)
    for k, store in enumerate(stores):
        store.encode_missing(["x", "y"], [f"v{k}-x", f"v{k}-y"], CountingEncoder().encode)
    for k, store in enumerate(stores):
        np.testing.assert_array_equal(store.load(["x", "y"]), fake_feats([f"v{k}-x", f"v{k}-y"]))


def test_encoder_key_is_one_safe_folder(tmp_path: Path) -> None:
    """Guards that keys with ':' or '/' (open_clip names, paths) become a single folder under the modality."""
    store = _store(tmp_path, key="openclip:m/../../x@pre")
    assert store.dir.parent == tmp_path / "flickr8k" / "train" / "img"
    assert "/" not in store.dir.name and ":" not in store.dir.name


# ------------------------------------------------------------------------------------------ split_features
def _toy_split(root: Path) -> RetrievalSplit:
    images = ("a.jpg", "b.jpg", "c.jpg")
    caption_ids = ("a.jpg#0", "a.jpg#1", "b.jpg#0", "c.jpg#0", "c.jpg#1")
    return RetrievalSplit("train", root, images, caption_ids, tuple(f"caption {c}" for c in caption_ids),
                          np.array([0, 0, 1, 2, 2]), np.zeros((3, 2), dtype=np.uint8))


class _Factories:
    """Lazy encoder factories for a fake Backbone that count how often each modality is built."""

    def __init__(self) -> None:
        self.img_built = self.txt_built = 0
        self.img_enc, self.txt_enc = CountingEncoder(), CountingEncoder()

    def backbone(self) -> Backbone:
        def image() -> CountingEncoder:
            self.img_built += 1
            return self.img_enc

        def text() -> CountingEncoder:
            self.txt_built += 1
            return self.txt_enc

        return Backbone(name="fake", img_dim=DIM, txt_dim=DIM, img_key="fake-img@v1", txt_key="fake-txt@v1",
                        _image=image, _text=text)


def test_split_features_image_only_never_touches_text(tmp_path: Path) -> None:
    """Guards the lazy contract: an image-only node never builds the text encoder nor creates a txt cache."""
    data, fac = _toy_split(tmp_path / "data"), _Factories()
    out = split_features(data, fac.backbone(), tmp_path / "cache", modalities=("img",))
    assert set(out) == {"img"}
    assert fac.txt_built == 0 and fac.txt_enc.calls == 0
    assert not (tmp_path / "cache" / "flickr8k" / "train" / "txt").exists()
    assert (tmp_path / "cache" / "flickr8k" / "train" / "img").is_dir()
    assert fac.img_enc.items == data.image_paths()
    np.testing.assert_array_equal(out["img"], fake_feats(data.image_paths()))


def test_split_features_both_modalities_and_cache_hit(tmp_path: Path) -> None:
    """Guards per-modality outputs aligned with images/captions, and that a warm cache builds no encoder."""
    data, fac = _toy_split(tmp_path / "data"), _Factories()
    out = split_features(data, fac.backbone(), tmp_path / "cache")
    assert out["img"].shape == (3, DIM) and out["txt"].shape == (5, DIM)
    np.testing.assert_array_equal(out["txt"], fake_feats(data.captions))
    warm = _Factories()
    again = split_features(data, warm.backbone(), tmp_path / "cache")
    assert warm.img_built == warm.txt_built == 0
    np.testing.assert_array_equal(again["img"], out["img"])
    np.testing.assert_array_equal(again["txt"], out["txt"])
