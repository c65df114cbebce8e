"""Karpathy-split JSON datasets (issue 16): a tiny `dataset_flickr8k.json` over real Flickr8k images, in the exact
layout MS-COCO and Flickr30K are distributed in (images under a `filepath` folder, `restval` counted as train), its
splits, the errors for malformed files, and a 2-round federated run on it (real ServerApp and ClientApp, in
process) that also materialises a node's shard from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.config import parse_run_config
from common.data.datasets import check_data_dir, load_split
from common.data.flickr8k import read_captions
from common.data.split import DatasetError
from common.data.karpathy import read_karpathy
from common.data.shards import materialise
from fedxmr_server.app import _run
from tests.inprocess import InProcessGrid, server_context

SPLITS = {"train": 16, "restval": 4, "val": 6, "test": 6}


@pytest.fixture(scope="module")
def karpathy_dir(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("karpathy")
    (root / "flickr8k_imgs").mkdir()
    captions = read_captions(flickr8k_dir)
    names = (flickr8k_dir / "Flickr_8k.trainImages.txt").read_text().split()[:sum(SPLITS.values())]
    entries, start = [], 0
    for split, n in SPLITS.items():
        for name in names[start:start + n]:
            os.link(flickr8k_dir / "images" / name, root / "flickr8k_imgs" / name)
            entries.append({"filename": name, "filepath": "flickr8k_imgs", "split": split, "imgid": len(entries),
                            "sentences": [{"raw": cap, "tokens": cap.lower().split()} for _, cap in captions[name]]})
        start += n
    (root / "dataset_flickr8k.json").write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    return root


def test_splits_count_restval_as_train_and_find_the_images(karpathy_dir: Path) -> None:
    train, dev, test = (load_split(karpathy_dir, s) for s in ("train", "dev", "test"))
    assert (len(train.images), len(dev.images), len(test.images)) == (20, 6, 6)
    assert len(train.captions) == 5 * 20 and train.caption_image.max() == 19
    assert train.images[0].startswith("flickr8k_imgs/") and all(p.is_file() for p in train.image_paths())
    assert train.dataset == "karpathy-flickr8k" and train.labels.shape[0] == 20 and train.labels.sum() > 0
    assert load_split(karpathy_dir / "dataset_flickr8k.json", "test").images == test.images
    assert check_data_dir(karpathy_dir) == karpathy_dir


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("filename"), "images[3]: missing key 'filename'"),
    (lambda e: e.update(split="holdout"), "images[3]: key 'split' is 'holdout'"),
    (lambda e: e.update(sentences=[]), "images[3]: key 'sentences' must be a non-empty list"),
    (lambda e: e.update(sentences=[{"tokens": ["a"]}]), "images[3]: key 'sentences' must be a non-empty list"),
])
def test_a_malformed_entry_is_named(karpathy_dir: Path, tmp_path: Path, change, message: str) -> None:
    doc = json.loads((karpathy_dir / "dataset_flickr8k.json").read_text())
    change(doc["images"][3])
    bad = tmp_path / "dataset_bad.json"
    bad.write_text(json.dumps(doc))
    read_karpathy.cache_clear()
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_split(bad, "train")
    assert str(bad) in str(err.value)


def test_missing_images_key_two_json_files_and_a_missing_image_are_named(karpathy_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "dataset_a.json").write_text(json.dumps({"dataset": "a"}))
    with pytest.raises(DatasetError, match="non-empty list under key 'images'"):
        load_split(tmp_path, "train")
    (tmp_path / "dataset_b.json").write_text("{}")
    with pytest.raises(DatasetError, match="several Karpathy JSON files"):
        check_data_dir(tmp_path)
    doc = json.loads((karpathy_dir / "dataset_flickr8k.json").read_text())
    doc["images"][0]["filename"] = "nowhere.jpg"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "dataset_c.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="nowhere.jpg does not exist"):
        load_split(tmp_path / "c", "train")


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


def test_a_two_round_federated_run_and_a_materialised_shard(karpathy_dir: Path, tmp_path: Path) -> None:
    keys = {"backbone": "openclip:fedxmr-tiny", "data-dir": str(karpathy_dir), "cache-dir": str(tmp_path / "cache"),
            "out-dir": str(tmp_path / "runs"), "run-name": "k", "num-server-rounds": 2, "local-epochs": 1,
            "batch-size": 4, "embed-dim": 32, "adapter-dim": 8, "hash-bits": 16, "modality-mix": "1,0,0"}
    cfg = parse_run_config(keys).as_flat_dict()
    _run(InProcessGrid(cfg, [5, 9]), server_context(cfg))
    final = json.loads((tmp_path / "runs" / "k" / "final.json").read_text())
    assert final["best-round"] in (0, 1, 2) and final["test"]["rsum"] > 0 and "hash_map_i2t" in final["test"]
    assert final["per-client"]["summary"]["all-global-clients"] == 2
    assert any((tmp_path / "cache").rglob("*karpathy-flickr8k*")), "features cached under the dataset's own name"
    manifest = materialise(parse_run_config(keys), 1, 2, karpathy_dir, tmp_path / "shard")
    assert manifest["dataset"] == "karpathy-flickr8k"
    assert all((tmp_path / "shard" / "images" / name).is_file() for name in manifest["splits"]["train"]["images"])
