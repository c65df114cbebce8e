"""Precomputed-feature datasets, the way the cross-modal hashing benchmarks (MIRFlickr-25K, NUS-WIDE, Wikipedia,
IAPR TC-12) are passed around: one file with image features, text features and multi-hot labels, one text per
image (R@K is 1:1; MAP@all over the labels is the main metric). The backbone is the identity (`backbone =
"identity"`): the towers train on the given features, nothing is encoded.

Files (`data-dir` points at the file):
- `.npz`: arrays `img` (n × d_img), `txt` (n × d_txt), `labels` (n × C, 0/1), optional `train`, `dev`, `test`
  (item indices);
- MATLAB `.mat`: v5 through scipy, v7.3 (HDF5) through h5py. Variable names differ between repositories, so
  `data-keys` maps them, fields of a MATLAB struct included: `"img=data.X1,txt=data.X2,labels=L,train=idx_tr"`.
  Unmapped roles are looked up under common names (`img`/`I`/`X`/`image`..., `txt`/`T`/`Y`/`text`..., `labels`/
  `L`/`label`..., `train`/`dev`/`val`/`test`).
Detected, not configured: item-by-feature vs feature-by-item (the axis of length n, the one dimension all three
arrays share; MATLAB v7.3 files store matrices transposed, so this matters), 0- or 1-based split indices (1-based
when no index is 0 and some index is n), sparse label matrices (densified). Indices that hold neither 0 nor n leave
the base open: `data-keys` then says `base=0` or `base=1`. Every malformed case is an error naming the file and the
key.

Splits, seed 0 throughout (not the run's `seed`: every node and the server must cut the same splits):
- train, dev and test indices: used as given (0-based, in range, disjoint);
- train and test but no dev (the Wikipedia and MIRFlickr releases): a dev split is carved from train, 10 % of it
  (at least 1, at most 2,000 items, as for the seeded split below), and train keeps the rest; test is untouched, so
  published test sets stay comparable. Written down in `<cache>/splits/<file stem>-<digest>-dev.json` (the digest
  covers the file's version and its train/test indices);
- no split indices: a seeded split (10 % dev, 10 % test, at most 2,000 each), written down in
  `<cache>/splits/<file stem>-<digest>.json`;
- any other subset (dev without train, train without test, ...) is an error.
A written-down split is reused after (written to a temporary file and renamed: nodes cutting their shards at once
never read half a file), so a later numpy with another permutation algorithm cannot move items between splits.
Without a cache dir the split is recomputed (the same, from the same seed).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.data.split import Dataset, DatasetError, RetrievalSplit, feature_split

SUFFIXES = (".npz", ".mat")
ROLES = ("img", "txt", "labels")
SPLIT_ROLES = ("train", "dev", "test")
DEV_SHARE, MAX_DEV = 10, 2000  # seeded and carved dev (and seeded test): 1/10 of the items, at most 2,000
BASE = "base"  # data-keys "base=0" / "base=1": the split indices' base, when the indices cannot tell
COMMON_NAMES = {
    "img": ("img", "image", "images", "I", "X", "X1", "I_all", "IAll", "img_feats", "image_features"),
    "txt": ("txt", "text", "texts", "T", "Y", "X2", "T_all", "TAll", "YAll", "txt_feats", "text_features"),
    "labels": ("labels", "label", "L", "L_all", "LAll", "gnd", "y"),
    "train": ("train", "train_idx", "idx_train", "tr_idx"),
    "dev": ("dev", "val", "valid", "dev_idx", "val_idx", "idx_val"),
    "test": ("test", "test_idx", "idx_test", "te_idx", "query_idx"),
}


@dataclass(frozen=True)
class FeatureData:
    path: Path
    img: np.ndarray  # (n, d_img) float32
    txt: np.ndarray  # (n, d_txt) float32
    labels: np.ndarray  # (n, C) uint8
    splits: dict[str, np.ndarray]  # 0-based item indices


def is_feature_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def parse_keys(text: str) -> dict[str, str]:
    """`"img=data.X1,txt=Y"` -> {"img": "data.X1", "txt": "Y"}; unknown roles are an error."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, sep, name = part.partition("=")
        if not sep or role.strip() not in ROLES + SPLIT_ROLES + (BASE,) or not name.strip():
            raise DatasetError(f"run config key 'data-keys': {part!r} is not <role>=<variable> with role one of "
                               f"{ROLES + SPLIT_ROLES} (or base=0 / base=1)")
        if role.strip() == BASE and name.strip() not in ("0", "1"):
            raise DatasetError(f"run config key 'data-keys': {part!r}: the index base is 0 or 1")
        out[role.strip()] = name.strip()
    return out


def _read_variables(path: Path) -> dict[str, object]:
    """Top-level variables (MATLAB structs as dicts of their fields, h5py objects as arrays)."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        import scipy.io

        try:
            raw = scipy.io.loadmat(str(path), squeeze_me=False, struct_as_record=False)
            return {k: v for k, v in raw.items() if not k.startswith("__")}
        except NotImplementedError:  # MATLAB v7.3 is HDF5
            import h5py

            with h5py.File(path, "r") as f:
                return {k: _h5(f[k]) for k in f.keys() if not k.startswith("#")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # a bad zip, pickled objects, not HDF5 / MATLAB
        raise DatasetError(f"{path}: not a readable {path.suffix} file ({exc})") from None


def _h5(node) -> object:
    import h5py

    if isinstance(node, h5py.Group):
        if "ir" in node and "jc" in node and "data" in node:  # a sparse matrix
            import scipy.sparse

            shape = (int(node.attrs.get("MATLAB_sparse", 0)), len(node["jc"]) - 1)
            return scipy.sparse.csc_matrix((node["data"][()], node["ir"][()], node["jc"][()]), shape=shape).T
        return {k: _h5(node[k]) for k in node.keys()}
    return node[()]


def _lookup(variables: dict, name: str, path: Path, role: str):
    value: object = variables
    for part in name.split("."):
        if isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
            value = value.item()  # a 1 x 1 MATLAB struct array
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif hasattr(value, "_fieldnames") and part in value._fieldnames:
            value = getattr(value, part)
        else:
            raise DatasetError(f"{path}: no variable {name!r} for {role!r} (top-level: {sorted(variables)})")
    return value


def _dense(value, path: Path, key: str) -> np.ndarray:
    if hasattr(value, "toarray"):
        value = value.toarray()
    arr = np.asarray(value)
    if arr.dtype == object or arr.ndim > 2 or arr.size == 0:
        raise DatasetError(f"{path}: key {key!r} is not a numeric matrix (shape {arr.shape}, dtype {arr.dtype})")
    return arr


def _items_first(arr: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    """Rows = items: transpose a feature-by-item matrix (the axis of length n is the item axis)."""
    arr = arr.reshape(-1, 1) if arr.ndim == 1 else arr
    if arr.shape[0] == n:
        return arr
    if arr.shape[1] == n:
        return arr.T
    raise DatasetError(f"{path}: key {key!r} has shape {arr.shape}; no axis of length {n} (the number of items)")


def _item_count(shapes: list[tuple[int, ...]], path: Path, keys: list[str]) -> int:
    common = set(shapes[0]).intersection(*map(set, shapes[1:]))
    if not common:
        raise DatasetError(f"{path}: keys {keys} have shapes {shapes}; no item count they share (mismatched sizes)")
    firsts = [s[0] for s in shapes]
    return firsts[0] if len(set(firsts)) == 1 and firsts[0] in common else max(common)


def _indices(value, path: Path, key: str) -> np.ndarray:
    idx = _dense(value, path, key).ravel()
    if not np.all(np.isfinite(idx)) or not np.all(idx == np.round(idx)):
        raise DatasetError(f"{path}: split indices {key!r} are not integers")
    return idx.astype(np.int64)


def _zero_based(splits: dict[str, np.ndarray], names: dict[str, str], n: int, path: Path,
                base: str | None) -> dict[str, np.ndarray]:
    """All splits 0-based. The base is decided over all splits together: 0 if one holds a 0, 1 (MATLAB) if one holds
    n; neither: `data-keys` must say (`base=0` / `base=1`). Every index must then be in range, and the splits
    disjoint."""
    every = np.concatenate(list(splits.values()))
    if base is not None:
        shift = int(base)
    elif len(every) and every.min() == 0:
        shift = 0
    elif len(every) and every.max() == n:
        shift = 1
    else:
        raise DatasetError(f"{path}: cannot tell whether split indices {sorted(names.values())} are 0- or 1-based "
                           f"(none is 0 and none is {n}); say it in run config key 'data-keys' (base=0 or base=1)")
    out = {}
    for role, idx in splits.items():
        idx = idx - shift
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise DatasetError(f"{path}: split indices {names[role]!r} out of range for {n} items "
                               f"({'1' if shift else '0'}-based: min {idx.min() + shift}, max {idx.max() + shift})")
        out[role] = idx
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        if a in out and b in out and np.intersect1d(out[a], out[b]).size:
            raise DatasetError(f"{path}: split indices {names[a]!r} and {names[b]!r} share items")
    return out


@lru_cache(maxsize=4)
def read_feature_file(path: Path, data_keys: str = "", splits_dir: Path | None = None) -> FeatureData:
    variables = _read_variables(path)
    mapping = parse_keys(data_keys)

    def name_of(role: str) -> str | None:
        if role in mapping:
            return mapping[role]
        return next((k for k in COMMON_NAMES[role] if k in variables), None)

    names = {role: name_of(role) for role in ROLES}
    missing = [role for role, name in names.items() if name is None]
    if missing:
        raise DatasetError(f"{path}: no variable for {missing} (has {sorted(variables)}); map them with run config "
                           f"key 'data-keys', e.g. \"img=I_tr,txt=T_tr,labels=L_tr\"")
    raw = {role: _dense(_lookup(variables, names[role], path, role), path, names[role]) for role in ROLES}
    n = _item_count([a.shape if a.ndim == 2 else (a.shape[0],) for a in raw.values()], path, list(names.values()))
    img, txt, labels = (_items_first(raw[r], n, path, names[r]) for r in ROLES)
    if not np.isin(labels, (0, 1)).all():
        raise DatasetError(f"{path}: labels {names['labels']!r} are not 0/1 (values {np.unique(labels)[:5]})")
    for role, arr in (("img", img), ("txt", txt)):
        if not np.all(np.isfinite(arr)):
            raise DatasetError(f"{path}: features {names[role]!r} are not finite")
    split_names = {role: name_of(role) for role in SPLIT_ROLES if name_of(role) is not None}
    splits = {role: _indices(_lookup(variables, name, path, role), path, name) for role, name in split_names.items()}
    if splits and not {"train", "test"} <= set(splits):
        raise DatasetError(f"{path}: split indices for {sorted(splits)} but not "
                           f"{sorted(set(SPLIT_ROLES) - set(splits))} (train and test are needed; a missing dev is "
                           f"carved from train); map them with run config key 'data-keys'")
    if not splits:
        splits = _seeded_split(path, n, splits_dir)
    else:
        splits = _zero_based(splits, split_names, n, path, mapping.get(BASE))
        if "dev" not in splits:
            splits = _carved_dev(path, splits, split_names["train"], splits_dir)
    return FeatureData(path, img.astype(np.float32), txt.astype(np.float32), labels.astype(np.uint8), splits)


def _dev_size(n: int) -> int:
    return max(1, min(MAX_DEV, n // DEV_SHARE))


def _record(path: Path, splits_dir: Path | None, suffix: str = "", *indices: np.ndarray) -> Path | None:
    """Where a seeded split of `path` is written down: named by the file's version (path, size, mtime: known without
    reading a large file) and by the `indices` it was cut from."""
    if splits_dir is None:
        return None
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for idx in indices:
        digest.update(np.ascontiguousarray(idx, dtype=np.int64).tobytes() + b"|")
    return splits_dir / f"{path.stem}-{digest.hexdigest()[:16]}{suffix}.json"


def _recorded(record: Path | None, cut: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The split written down in `record`, or `cut()` written down there (temp file + rename: nodes cutting their
    shards at once never read half a file)."""
    if record is not None and record.is_file():
        return {k: np.asarray(v, dtype=np.int64) for k, v in json.loads(record.read_text()).items()}
    splits = cut()
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: v.tolist() for k, v in splits.items()}))
        os.replace(tmp, record)
    return splits


def _seeded_split(path: Path, n: int, splits_dir: Path | None) -> dict[str, np.ndarray]:
    """10 % dev, 10 % test (at most 2,000 each, at least 1), seed 0; written down (and reused) in `splits_dir`."""
    def cut() -> dict[str, np.ndarray]:
        order = np.random.default_rng(0).permutation(n)
        k = _dev_size(n)
        return {"dev": np.sort(order[:k]), "test": np.sort(order[k:2 * k]), "train": np.sort(order[2 * k:])}

    return _recorded(_record(path, splits_dir), cut)


def _carved_dev(path: Path, splits: dict[str, np.ndarray], train_name: str,
                splits_dir: Path | None) -> dict[str, np.ndarray]:
    """A file with train and test only: dev = 10 % of train (at least 1, at most 2,000), seed 0, train the rest, test
    as given; written down (and reused) in `splits_dir`."""
    train, test = splits["train"], splits["test"]
    if len(train) < 2:
        raise DatasetError(f"{path}: split indices {train_name!r} hold {len(train)} item(s), too few to carve a dev "
                           f"split from; give dev indices in run config key 'data-keys'")

    def cut() -> dict[str, np.ndarray]:
        pick = np.zeros(len(train), dtype=bool)
        pick[np.random.default_rng(0).permutation(len(train))[:_dev_size(len(train))]] = True
        return {"train": np.sort(train[~pick]), "dev": np.sort(train[pick]), "test": np.asarray(test, np.int64)}

    return _recorded(_record(path, splits_dir, "-dev", train, test), cut)


class FeatureFile(Dataset):
    """A feature file as a `Dataset`: `data_keys` maps its variables; a split cut here (no split indices, or no dev)
    is written down under `splits_dir` (None: recomputed, the same, on every read). Labels are the file's own."""

    def __init__(self, root: Path, data_keys: str = "", splits_dir: Path | None = None) -> None:
        super().__init__(root)
        self.data_keys, self.splits_dir = data_keys, splits_dir

    @property
    def name(self) -> str:
        return f"features-{self.root.stem}"

    def _read(self) -> FeatureData:
        return read_feature_file(self.root, self.data_keys, self.splits_dir)

    def check(self) -> None:
        self._read()

    def load(self, split: str, max_images: int = 0, check_images: bool = True) -> RetrievalSplit:
        data = self._read()
        if split not in data.splits:
            raise DatasetError(f"{data.path}: unknown split {split!r}; expected one of {SPLIT_ROLES}")
        idx = data.splits[split][:max_images] if max_images > 0 else data.splits[split]
        if not len(idx):
            raise DatasetError(f"{data.path}: split {split!r} is empty")
        return feature_split(split, data.path.parent, self.name, idx, data.labels[idx],
                             {"img": data.img[idx], "txt": data.txt[idx]})

    def label_count(self) -> int:
        return int(self._read().labels.shape[1])

    def feature_dims(self) -> dict[str, int]:
        data = self._read()
        return {"img": int(data.img.shape[1]), "txt": int(data.txt.shape[1])}
