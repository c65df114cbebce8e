"""Per-node cache of frozen-backbone features.

A node encodes each of its items once; every later message reads only the cache. The cache is a folder per
(dataset, split, modality, encoder key), where the encoder key names the weights and the preprocessing:
`<cache-dir>/<dataset>/<split>/<modality>/<encoder key>/chunk-*.npz`. Each chunk holds `ids` and `feats` for
a batch of items and is written atomically (temporary file, fsync, rename), so a killed run leaves at worst a
stray `*.tmp` that is ignored, never a corrupt chunk. Items are keyed by id, so shards of different partitions
(or a centralized run after a federated one) reuse what is already encoded. A chunk that cannot be read is
renamed `*.corrupt` (kept for inspection) and its items are encoded again.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)
CACHE_DIR_ENV = "FEDXMR_CACHE_DIR"
_SAFE = re.compile(r"[^A-Za-z0-9@._+-]")
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def resolve_cache_dir(value: str | os.PathLike | None) -> Path:
    """An explicit folder, else $FEDXMR_CACHE_DIR, else ~/.cache/fedxmr."""
    raw = str(value or os.environ.get(CACHE_DIR_ENV, "") or Path.home() / ".cache" / "fedxmr")
    return Path(raw).expanduser().resolve()


def _quarantine(chunk: Path, exc: BaseException) -> None:
    bad = chunk.with_suffix(".corrupt")
    log.warning("feature cache chunk %s is unreadable (%s); moved to %s, its items will be re-encoded", chunk, exc, bad)
    os.replace(chunk, bad)


class CorruptChunk(RuntimeError):
    """A chunk's features could not be read; it was quarantined, so encoding again repairs the cache."""


class MissingItems(KeyError):
    """Some requested items are not in the cache (yet); encoding them fills it."""


def _read(chunk: Path, member: str) -> np.ndarray:
    """One member (`ids` or `feats`) of a chunk, from a per-process memo keyed by path, size and mtime.

    Why: a simulation actor serves many nodes, each new one reading the same chunks to find its items; with thousands
    of nodes that re-read cost most of a train message (docs/SCALE.md). Chunks are written once under a fresh name
    (never changed in place), so the key identifies the content; the arrays handed out are read-only.
    """
    st = chunk.stat()
    key = (str(chunk), member, st.st_size, st.st_mtime_ns)
    if key not in _CHUNKS:
        with np.load(chunk, allow_pickle=False) as z:
            array = z[member]
        array.setflags(write=False)
        _CHUNKS[key] = array
        while sum(a.nbytes for a in _CHUNKS.values()) > _CHUNKS_BYTES and len(_CHUNKS) > 1:
            _CHUNKS.popitem(last=False)
    _CHUNKS.move_to_end(key)
    return _CHUNKS[key]


_CHUNKS: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CHUNKS_BYTES = 512 << 20  # Flickr8k's whole cache of the default backbone is about 110 MB


class FeatureStore:
    """Features of one (dataset, split, modality, encoder) on this node's disk."""

    def __init__(self, cache_dir: Path, dataset: str, split: str, modality: str, encoder_key: str) -> None:
        self.dir = Path(cache_dir) / dataset / split / modality / _SAFE.sub("_", encoder_key)

    def _chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.npz")) if self.dir.is_dir() else []

    def _index(self) -> dict[str, tuple[Path, int]]:
        """id -> (chunk, row), reading only the `ids` member of each chunk."""
        index: dict[str, tuple[Path, int]] = {}
        for chunk in self._chunks():
            try:
                ids = _read(chunk, "ids")
            except _UNREADABLE as exc:
                _quarantine(chunk, exc)
                continue
            for row, item in enumerate(ids.tolist()):
                index.setdefault(item, (chunk, row))
        return index

    def missing(self, ids: Sequence[str]) -> list[str]:
        index = self._index()
        return [i for i in ids if i not in index]

    def _write_chunk(self, ids: Sequence[str], feats: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"chunk-{uuid.uuid4().hex}.npz"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.asarray(ids, dtype=str), feats=np.asarray(feats, dtype=np.float32))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    def encode_missing(self, ids: Sequence[str], items: Sequence, encode: Callable[[Sequence], np.ndarray],
                       batch_size: int = 32, chunk_size: int = 512, desc: str = "encode") -> int:
        """Encode the items whose ids are not cached yet, in batches; return how many were encoded.

        A chunk is written every `chunk_size` items, so an interrupted run keeps what it finished.
        """
        if len(ids) != len(items):
            raise ValueError(f"{len(ids)} ids but {len(items)} items to encode")
        index = self._index()
        todo = [(i, it) for i, it in zip(ids, items) if i not in index]
        if not todo:
            return 0
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"{desc} ({self.dir.parent.name})", unit="item", file=sys.stderr,
                   mininterval=5.0)
        for start in range(0, len(todo), chunk_size):
            part = todo[start:start + chunk_size]
            feats = []
            for b in range(0, len(part), batch_size):
                batch = [it for _, it in part[b:b + batch_size]]
                feats.append(np.asarray(encode(batch), dtype=np.float32))
                bar.update(len(batch))
            self._write_chunk([i for i, _ in part], np.concatenate(feats))
        bar.close()
        return len(todo)

    def load(self, ids: Sequence[str]) -> np.ndarray:
        """Features of `ids` in that order; a missing id is an error that names it."""
        index = self._index()
        missing = [i for i in ids if i not in index]
        if missing:
            raise MissingItems(f"{len(missing)} items not in feature cache {self.dir}, e.g. {missing[:3]}")
        by_chunk: dict[Path, list[tuple[int, int]]] = {}
        for pos, item in enumerate(ids):
            chunk, row = index[item]
            by_chunk.setdefault(chunk, []).append((pos, row))
        out: np.ndarray | None = None
        for chunk, pairs in by_chunk.items():
            try:
                feats = _read(chunk, "feats")
            except _UNREADABLE as exc:
                _quarantine(chunk, exc)
                raise CorruptChunk(f"feature cache chunk {chunk} was unreadable and has been quarantined") from exc
            if out is None:
                out = np.empty((len(ids), feats.shape[1]), dtype=np.float32)
            pos, rows = map(np.asarray, zip(*pairs))
            out[pos] = feats[rows]
        return out if out is not None else np.empty((0, 0), dtype=np.float32)


def split_features(data, backbone, cache_dir: Path, modalities: Sequence[str] = ("img", "txt"),
                   batch_size: int = 32) -> dict[str, np.ndarray]:
    """Features of a split (or a client's shard of it) per modality, encoding only what the cache lacks.

    `data` is a `common.data.split.RetrievalSplit` (its `dataset` names the cache's namespace), `backbone` a
    `common.backbones.Backbone`. A modality not in `modalities` is neither read, encoded nor cached.
    """
    if data.features is not None:  # a precomputed-feature dataset: nothing to encode or cache
        return {m: np.asarray(data.features[m]) for m in modalities}
    jobs = {
        "img": (backbone.img_key, data.images, data.image_paths, backbone.image_encoder, batch_size, "images"),
        "txt": (backbone.txt_key, data.caption_ids, lambda: data.captions, backbone.text_encoder, batch_size * 4,
                "captions"),
    }
    out: dict[str, np.ndarray] = {}
    for modality in modalities:
        key, ids, items, encoder, batch, desc = jobs[modality]
        store = FeatureStore(cache_dir, data.dataset, data.name, modality, key)
        # A warm cache is read in one pass. Items never encoded, or lost with a chunk found corrupt (it is
        # quarantined), are encoded and the load is retried.
        for attempt in range(3):
            try:
                out[modality] = store.load(ids)
                break
            except (MissingItems, CorruptChunk):
                if attempt == 2:
                    raise
                store.encode_missing(ids, items(), encoder().encode, batch, desc=desc)
    return out
