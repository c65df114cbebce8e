"""Node-private shard directories: a node reading its materialised shard gets exactly what the simulated partition
gets (samples, indices, features), its directory holds nothing of other nodes, and a shard cut for another node
or run config is refused naming the key and the file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from common.config import parse_run_config
from common.data.flickr8k import TOKEN_FILE
from common.data.shards import MANIFEST, ShardError, cut_shard, main, materialise, read_shard, verify
from fedxmr_client.node import load_shard

NUM = 4
# 2 paired, 1 image-only, 1 text-only; label-skewed partitions, so the test shards follow each train class mix
RUN = {"backbone": "openclip:fedxmr-tiny", "max-train-images": 120, "max-eval-images": 60, "partitioner": "dirichlet",
       "partition-beta": 0.5, "modality-mix": "0.5,0.25,0.25", "seed": 3, "embed-dim": 32, "adapter-dim": 8}


@pytest.fixture(scope="module")
def shards(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("shards")
    cfg = parse_run_config({**RUN, "data-dir": str(flickr8k_dir)})
    for pid in range(NUM):
        materialise(cfg, pid, NUM, flickr8k_dir, base / f"node-{pid}")
    return {pid: base / f"node-{pid}" for pid in range(NUM)}


def _cfg(flickr8k_dir: Path, **overrides: object):
    return parse_run_config({**RUN, "data-dir": str(flickr8k_dir), **overrides})


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_a_materialised_shard_holds_exactly_the_simulated_partition(shards: dict[int, Path], flickr8k_dir: Path,
                                                                    split: str) -> None:
    cfg = _cfg(flickr8k_dir)
    types = set()
    for pid, root in shards.items():
        cut, read = cut_shard(cfg, pid, NUM, flickr8k_dir, split), read_shard(root, split, cfg, pid, NUM)
        types.add(read.client_type)
        assert (read.partition_id, read.num_partitions, read.client_type) == (pid, NUM, cut.client_type)
        np.testing.assert_array_equal(read.pool_indices, cut.pool_indices)
        assert read.data.images == cut.data.images and len(read.data.images) > 0
        assert read.data.caption_ids == cut.data.caption_ids and read.data.captions == cut.data.captions
        np.testing.assert_array_equal(read.data.caption_image, cut.data.caption_image)
        np.testing.assert_array_equal(read.data.labels, cut.data.labels)
        assert read.data.root == root
    assert types == {"paired", "image-only", "text-only"}


def test_a_shard_directory_holds_nothing_of_other_nodes(shards: dict[int, Path], flickr8k_dir: Path) -> None:
    cfg = _cfg(flickr8k_dir)
    for pid, root in shards.items():
        own = {s: cut_shard(cfg, pid, NUM, flickr8k_dir, s).data for s in ("train", "dev", "test")}
        kind = json.loads((root / MANIFEST).read_text())["client-type"]
        files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        images = {f"images/{name}" for d in own.values() for name in d.images}
        expected = {MANIFEST} | (images if kind != "text-only" else set()) | ({TOKEN_FILE} if kind != "image-only"
                                                                              else set())
        assert files == expected, (pid, kind, files ^ expected)
        if kind != "image-only":
            lines = (root / TOKEN_FILE).read_text(encoding="utf-8").splitlines()
            assert [ln.split("\t")[0] for ln in lines] == [c for d in own.values() for c in d.caption_ids]


def test_a_node_reading_its_shard_gets_the_simulated_features(shards: dict[int, Path], flickr8k_dir: Path,
                                                              tmp_path: Path) -> None:
    """Each side encodes into its own cache (the node from its private image copies): same ids, same features."""
    run_config = _cfg(flickr8k_dir, **{"cache-dir": str(tmp_path / "sim-cache")}).as_flat_dict()
    for pid, root in shards.items():
        simulated = load_shard(_context(run_config, {"partition-id": pid, "num-partitions": NUM}), "test")
        node_config = {"data-dir": str(root), "cache-dir": str(tmp_path / f"node-{pid}-cache")}
        deployed = load_shard(_context(run_config, node_config), "test")  # the partition comes from the manifest
        assert (deployed.partition_id, deployed.num_partitions) == (pid, NUM)
        assert set(deployed.feats) == set(simulated.feats)
        for modality, feats in simulated.feats.items():
            np.testing.assert_allclose(deployed.feats[modality], feats, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(deployed.pool_indices, simulated.pool_indices)


def _context(run_config: dict, node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


@pytest.mark.parametrize(("node", "run", "key"), [
    ({"partition-id": 1, "num-partitions": NUM}, {}, "'partition-id'"),
    ({"partition-id": 0, "num-partitions": NUM + 1}, {}, "'num-partitions'"),
    ({}, {"seed": 4}, "'seed'"),
    ({}, {"max-eval-images": 50}, "'max-eval-images'"),
    ({}, {"partitioner": "iid"}, "'partitioner'"),
])
def test_a_shard_cut_for_another_node_or_run_is_refused(shards: dict[int, Path], flickr8k_dir: Path, node: dict,
                                                        run: dict, key: str) -> None:
    run_config = _cfg(flickr8k_dir, **run).as_flat_dict()
    with pytest.raises(ShardError, match=key) as err:
        load_shard(_context(run_config, {**node, "data-dir": str(shards[0])}), "train")
    assert str(shards[0] / MANIFEST) in str(err.value)


def test_a_tampered_manifest_or_file_is_caught(shards: dict[int, Path], flickr8k_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(flickr8k_dir)
    paired = next(r for r in shards.values() if json.loads((r / MANIFEST).read_text())["client-type"] == "paired")
    copy = tmp_path / "copy"
    materialise(cfg, json.loads((paired / MANIFEST).read_text())["partition-id"], NUM, flickr8k_dir, copy)
    assert verify(copy) == json.loads((paired / MANIFEST).read_text())["content-sha256"]
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "client-type": "text-only"}))
    with pytest.raises(ShardError, match="'client-type'"):
        read_shard(copy, "train", cfg)
    with (copy / TOKEN_FILE).open("a", encoding="utf-8") as fh:
        fh.write("someone_else.jpg#0\ta caption of another node\n")
    with pytest.raises(ShardError, match="content-sha256"):
        verify(copy)
    with pytest.raises(ShardError, match="not empty"):
        materialise(cfg, 0, NUM, flickr8k_dir, copy)


def test_the_command_line_writes_a_shard(flickr8k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["shards", "--data-dir", str(flickr8k_dir), "--out", str(tmp_path / "n1"), "--partition-id", "1",
            "--num-partitions", "2", "--max-train-images", "40", "--max-eval-images", "20", "--modality-mix",
            "0,1,0"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    expected = "partition 1/2, image-only (img), train: 20 images, dev: 12 images, test: 10 images"
    assert expected in capsys.readouterr().out
    assert not (tmp_path / "n1" / TOKEN_FILE).exists()
    cfg = parse_run_config({"max-train-images": 40, "max-eval-images": 20, "modality-mix": "0,1,0"})
    assert read_shard(tmp_path / "n1", "train", cfg, 1, 2).data.captions == ()
