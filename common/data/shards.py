"""A node's share of the data: cut from the full dataset by partition id, or read from a node-private directory.

In simulation every node cuts its own shard from the full dataset (`cut_shard`, through `open_dataset`): that is
what a simulation is. In a deployment an institution holds only its own data. `materialise` writes one node's
shard into a directory once (run by whoever holds the full dataset), and the node then reads only that directory
(`read_shard`):

    <dir>/shard.json           manifest: partition, client type, modalities, the partition keys of the run config,
                               the source split indices of each local split (train, dev, test) and a content hash
    <dir>/images/*.jpg         the node's images, only if it holds images (hard links where possible, else copies)
    <dir>/Flickr8k.token.txt   the node's captions, only if it holds text (Flickr8k token format)
    <dir>/features.npz         instead of both, for a precomputed-feature dataset (`common.data.precomputed`):
                               per local split `<split>-img` / `<split>-txt` (only the modalities the node holds)
                               and `<split>-labels`; the manifest's `feature-dims` give the identity backbone both
                               towers' input sizes

A node reading its directory gets exactly the samples (and so the cached features: the cache is keyed by item id)
that the simulated partition of the same run config gets. The directory says which run config it was cut for; a
run whose partition keys, partition or client type disagree is refused, naming the key and the file.

    python -m common.data.shards --data-dir FLICKR8K --out DIR --partition-id K --num-partitions N \\
        [--partitioner dirichlet --partition-beta 0.1 --modality-mix 0.5,0.25,0.25 --seed 0 ...]
        [--data-keys img=data.X1,txt=data.X2,...]   # a feature file's variables, as the run config names them
    python -m common.data.shards --verify DIR      # recompute the content hash
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig, parse_run_config
from common.backbones import IDENTITY, Backbone, build_backbone, identity_backbone
from common.data.datasets import open_dataset
from common.data.federation import CLIENT_TYPES, client_types, node_split
from common.data.flickr8k import TOKEN_FILE, read_captions
from common.data.partition import dominant_class, follow_partition, partition
from common.data.split import DATA_DIR_ENV, DatasetError, RetrievalSplit, assemble_split, feature_split
from common.features import resolve_cache_dir

MANIFEST = "shard.json"
FEATURES = "features.npz"
FORMAT = "fedxmr-shard/1"
# a node trains on one; its per-client queries come from dev (every round) and test (once, at the selected round)
LOCAL_SPLITS: tuple[str, ...] = ("train", "dev", "test")
# Run-config keys that decide which items a partition id gets (and, for max-eval-images, what its test indices
# point at in the server's gallery).
PARTITION_KEYS: tuple[str, ...] = ("partitioner", "partition-beta", "partition-ways", "partition-shots",
                                   "modality-mix", "seed", "max-train-images", "max-eval-images")


class ShardError(DatasetError):
    """A shard directory is malformed or was cut for another node or run config; the message names file and key."""


@dataclass(frozen=True)
class Shard:
    partition_id: int
    num_partitions: int
    client_type: str
    pool_indices: np.ndarray  # the shard's images as indices into the split's pool (what the server's gallery holds)
    data: RetrievalSplit  # only the modalities of `client_type`


def partitioned_split(cfg: RunConfig, num_partitions: int, data_dir: str | os.PathLike,
                      split: str) -> tuple[RetrievalSplit, list[np.ndarray]]:
    """The whole pool of `split` and every partition's indices into it: what each node's shard is cut from. The
    same for every node of a run, so a process serving many nodes computes it once (`fedxmr_client.node`); a dev or
    test pool follows each node's train class mix."""
    # image files are checked per node (`cut_shard`): one missing file fails the node holding it, not the federation
    dataset = open_dataset(data_dir, cfg.data_keys, resolve_cache_dir(cfg.cache_dir))
    train = dataset.load("train", cfg.max_train_images, check_images=False)
    parts = partition(cfg.partitioner, len(train.images), num_partitions, cfg.seed, labels=train.labels,
                      beta=cfg.partition_beta, ways=cfg.partition_ways, shots=cfg.partition_shots)
    if split == "train":
        return train, parts
    pool = dataset.load(split, cfg.max_eval_images, check_images=False)
    return pool, follow_partition(dominant_class(train.labels), parts, dominant_class(pool.labels, train.labels),
                                  cfg.seed)


def cut_shard(cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str | os.PathLike, split: str,
              partitioned: tuple[RetrievalSplit, list[np.ndarray]] | None = None) -> Shard:
    """Partition `partition_id` of `split` from the full dataset (`partitioned`: `partitioned_split`'s result for
    these arguments, when the caller already has it)."""
    client_type = client_types(num_partitions, cfg.mix(), cfg.seed)[partition_id]
    modalities = CLIENT_TYPES[client_type]
    pool, parts = partitioned or partitioned_split(cfg, num_partitions, data_dir, split)
    idx = parts[partition_id]
    if "img" in modalities and pool.features is None:
        missing = [p for p in pool.image_paths(idx) if not p.is_file()]
        if missing:
            raise DatasetError(f"partition {partition_id} ({split}): {len(missing)} image file(s) of this node do "
                               f"not exist, e.g. {[str(p) for p in missing[:3]]}")
    return Shard(partition_id, num_partitions, client_type, idx, node_split(pool, idx, modalities))


def shard_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The directory if `data_dir` (or $FEDXMR_DATA_DIR) is a materialised shard, else None (a full dataset)."""
    raw = str(data_dir or os.environ.get(DATA_DIR_ENV, ""))
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    return path if (path / MANIFEST).is_file() else None


def _partition_keys(cfg: RunConfig) -> dict[str, Any]:
    flat = cfg.as_flat_dict()
    return {k: flat[k] for k in PARTITION_KEYS}


def _content_hash(root: Path) -> str:
    """sha256 over every file of the shard except the manifest (relative path and bytes, in path order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)  # Karpathy image names carry a folder (COCO's `val2014/...`)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copy2(src, dst)


def materialise(cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str | os.PathLike,
                out: str | os.PathLike) -> dict[str, Any]:
    """Write node `partition_id`'s train, dev and test shards (only its modalities) into the empty or new directory
    `out`; return the manifest."""
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise ShardError(f"shard output directory {out} is not empty; materialise into a new directory")
    shards = {split: cut_shard(cfg, partition_id, num_partitions, data_dir, split) for split in LOCAL_SPLITS}
    client_type = shards["train"].client_type
    modalities = CLIENT_TYPES[client_type]
    out.mkdir(parents=True, exist_ok=True)
    dims = open_dataset(data_dir, cfg.data_keys, resolve_cache_dir(cfg.cache_dir)).feature_dims()
    extra = {}
    if dims is not None:  # given features: the node's arrays, and both towers' sizes for its identity backbone
        _write_features(shards, out)
        extra = {"feature-dims": dims}
    elif "img" in modalities:
        (out / "images").mkdir()
        for shard in shards.values():
            for src, name in zip(shard.data.image_paths(), shard.data.images):
                _place(src, out / "images" / name)
    if "txt" in modalities and not extra:
        lines = [f"{cid}\t{cap}\n" for s in shards.values() for cid, cap in zip(s.data.caption_ids, s.data.captions)]
        (out / TOKEN_FILE).write_text("".join(lines), encoding="utf-8")
    manifest = {
        "format": FORMAT, "dataset": shards["train"].data.dataset, "partition-id": partition_id, "num-partitions": num_partitions,
        "client-type": client_type, "modalities": list(modalities), "run-config": _partition_keys(cfg),
        "splits": {split: {"indices": s.pool_indices.tolist(), "images": list(s.data.images)}
                   for split, s in shards.items()},
        **extra, "content-sha256": _content_hash(out),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _write_features(shards: dict[str, Shard], out: Path) -> None:
    """The node's features and labels of every local split into `out/FEATURES`."""
    arrays = {f"{split}-{m}": f for split, s in shards.items() for m, f in s.data.features.items()}
    arrays.update({f"{split}-labels": s.data.labels for split, s in shards.items()})
    np.savez(out / FEATURES, **arrays)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"cannot read shard manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: key 'format' is {manifest.get('format') if isinstance(manifest, dict) else None!r},"
                         f" expected {FORMAT!r}")
    missing = [k for k in ("partition-id", "num-partitions", "client-type", "run-config", "splits") if k not in manifest]
    if missing:
        raise ShardError(f"{path}: missing key(s) {missing}")
    return manifest


def read_shard(root: Path, split: str, cfg: RunConfig, partition_id: int | None = None,
               num_partitions: int | None = None) -> Shard:
    """Load a materialised shard's `split` after checking it was cut for this node (`partition_id` and
    `num_partitions` from the node config, when it gives them) and for this run config's partition keys."""
    manifest, path = read_manifest(root), root / MANIFEST
    for key, given in (("partition-id", partition_id), ("num-partitions", num_partitions)):
        if given is not None and given != manifest[key]:
            raise ShardError(f"node config key '{key}' is {given}, but {path} was materialised for {key} "
                             f"{manifest[key]}")
    wanted = _partition_keys(cfg)
    for key, value in wanted.items():
        if manifest["run-config"].get(key) != value:
            raise ShardError(f"run config key '{key}' is {value!r}, but {path} was materialised with "
                             f"{key}={manifest['run-config'].get(key)!r}; materialise again for this run config")
    pid, nparts = int(manifest["partition-id"]), int(manifest["num-partitions"])
    client_type = client_types(nparts, cfg.mix(), cfg.seed)[pid]
    if manifest["client-type"] != client_type:
        raise ShardError(f"{path}: key 'client-type' is {manifest['client-type']!r}, but this run config makes "
                         f"partition {pid} of {nparts} a {client_type!r} node")
    if split not in manifest["splits"]:
        raise ShardError(f"{path}: no split {split!r} (has {sorted(manifest['splits'])})")
    entry = manifest["splits"][split]
    modalities = CLIENT_TYPES[client_type]
    dataset = str(manifest.get("dataset", "flickr8k"))
    if "feature-dims" in manifest:
        data = _read_features(root, split, entry["images"], modalities, dataset, manifest["feature-dims"])
    else:
        captions = read_captions(root) if "txt" in modalities else None
        data = assemble_split(split, root, entry["images"], captions, check_images="img" in modalities, source=path,
                              dataset=dataset)
    return Shard(pid, nparts, client_type, np.asarray(entry["indices"], dtype=np.int64), data)


def _read_features(root: Path, split: str, items: list[str], modalities: tuple[str, ...], dataset: str,
                   dims: dict[str, int]) -> RetrievalSplit:
    path = root / FEATURES
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ShardError(f"cannot read {path}: {exc}") from exc
    keys = [f"{split}-{m}" for m in modalities] + [f"{split}-labels"]
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ShardError(f"{path}: missing key(s) {missing}")
    wrong = [k for k in keys if len(arrays[k]) != len(items)]
    if wrong:
        raise ShardError(f"{path}: key(s) {wrong} do not have one row per item of split {split!r} ({len(items)})")
    narrow = [f"{split}-{m}" for m in modalities
              if arrays[f"{split}-{m}"].ndim != 2 or arrays[f"{split}-{m}"].shape[1] != dims.get(m)]
    if narrow:
        raise ShardError(f"{path}: key(s) {narrow} are not (items, feature-dims) with feature-dims {dims} of "
                         f"{root / MANIFEST}")
    data = feature_split(split, root, dataset, np.asarray([int(i) for i in items], dtype=np.int64),
                         arrays[f"{split}-labels"], {m: arrays[f"{split}-{m}"] for m in modalities})
    return node_split(data, np.arange(len(items)), modalities)


def shard_backbone(root: Path, name: str, device: str = "cpu") -> Backbone:
    """The backbone a node reading shard `root` uses: `identity` takes both towers' sizes from the manifest (a
    unimodal node holds one modality's features only)."""
    manifest = read_manifest(root)
    if name != IDENTITY:
        if "feature-dims" in manifest:
            raise ShardError(f"{root / MANIFEST}: a shard of a precomputed-feature dataset needs run config key "
                             f"'backbone' = 'identity', not {name!r}")
        return build_backbone(name, device)
    dims = manifest.get("feature-dims")
    if not isinstance(dims, dict) or not all(isinstance(dims.get(m), int) for m in ("img", "txt")):
        raise ShardError(f"{root / MANIFEST}: key 'feature-dims' is {dims!r}; backbone 'identity' needs a shard of a "
                         f"precomputed-feature dataset, with both towers' input sizes")
    return identity_backbone(dims["img"], dims["txt"])


def verify(root: Path) -> str:
    """Recompute the content hash; raise ShardError naming the manifest when the files changed."""
    manifest = read_manifest(root)
    actual = _content_hash(root)
    if actual != manifest.get("content-sha256"):
        raise ShardError(f"{root / MANIFEST}: key 'content-sha256' is {manifest.get('content-sha256')!r}, but the "
                         f"files hash to {actual!r}")
    return actual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify", metavar="DIR", help="check a shard directory against its content hash")
    parser.add_argument("--data-dir", default="", help="the full dataset (default: $FEDXMR_DATA_DIR)")
    parser.add_argument("--out", help="new shard directory")
    parser.add_argument("--partition-id", type=int)
    parser.add_argument("--num-partitions", type=int)
    parser.add_argument("--data-keys", default="", help="a feature file's variables (run-config key 'data-keys')")
    defaults = RunConfig().as_flat_dict()
    for key in PARTITION_KEYS:
        parser.add_argument(f"--{key}", type=type(defaults[key]), default=defaults[key],
                            help=f"run-config key (default {defaults[key]!r})")
    args = parser.parse_args()
    if args.verify:
        print(f"{args.verify}: ok, sha256 {verify(Path(args.verify).resolve())}")
        return
    if args.out is None or args.partition_id is None or args.num_partitions is None:
        parser.error("--out, --partition-id and --num-partitions are required (or --verify DIR)")
    cfg = parse_run_config({**{k: getattr(args, k.replace("-", "_")) for k in PARTITION_KEYS},
                            "data-keys": args.data_keys})
    try:
        manifest = materialise(cfg, args.partition_id, args.num_partitions, args.data_dir, args.out)
    except DatasetError as exc:  # names the file and key; a traceback would only bury that
        parser.exit(2, f"error: {exc}\n")
    sizes = ", ".join(f"{s}: {len(v['images'])} images" for s, v in manifest["splits"].items())
    print(f"{args.out}: partition {args.partition_id}/{args.num_partitions}, {manifest['client-type']} "
          f"({'+'.join(manifest['modalities'])}), {sizes}")


if __name__ == "__main__":
    main()
