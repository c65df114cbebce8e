"""Precomputed-feature datasets (issue 16): tiny fixtures written in each real layout (`.npz`; MATLAB v5 with a
struct, sparse labels, 1-based split indices; MATLAB v7.3 through HDF5, stored feature-by-item, without split
indices), read back item-by-feature with 0-based splits, a 2-round federated run on each (backbone `identity`, real
ServerApp and ClientApp in process), and an error naming the file and key for every malformed case. Issue 25: a file
with train and test indices only (the Wikipedia / MIRFlickr layout) gets a seeded dev carved from train, and
`gallery = "retrieval"` scores test queries against train + test. The feature values are SYNTHETIC (format tests, not
results)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch

from common.config import RunConfig, parse_run_config
from common.method_config import SECTIONS
from common.data.datasets import backbone_for, check_data_dir, load_split
from common.data.split import DatasetError
from common.data.federation import CLIENT_TYPES
from common.data.precomputed import MAX_DEV, read_feature_file
from common.data.shards import (FEATURES, LOCAL_SPLITS, MANIFEST, ShardError, cut_shard, materialise, read_shard,
                                shard_backbone, verify)
from common.metrics import mean_average_precision, standard_map
from common.model import XmrModel, state_to_numpy
from fedxmr_server.app import _run
from fedxmr_server.evaluator import ServerEvaluator
from tests.inprocess import InProcessGrid, server_context

N, D_IMG, D_TXT, C = 60, 12, 9, 5


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((N, C)) < 0.3).astype(np.uint8)
    labels[np.arange(N), rng.integers(0, C, N)] = 1
    img = labels @ rng.normal(size=(C, D_IMG)) + 0.3 * rng.normal(size=(N, D_IMG))
    txt = labels @ rng.normal(size=(C, D_TXT)) + 0.3 * rng.normal(size=(N, D_TXT))
    return img.astype(np.float32), txt.astype(np.float32), labels


SPLIT = {"train": np.arange(0, 40), "dev": np.arange(40, 50), "test": np.arange(50, 60)}


def write_npz(path: Path) -> Path:
    img, txt, labels = _data()
    np.savez(path, img=img, txt=txt, labels=labels, **SPLIT)
    return path


def write_mat_v5(path: Path) -> Path:
    """A struct `data` with X1 / X2 (item-by-feature), sparse labels `L`, 1-based indices as MATLAB writes them."""
    img, txt, labels = _data()
    scipy.io.savemat(path, {"data": {"X1": img, "X2": txt}, "L": scipy.sparse.csr_matrix(labels.astype(float)),
                            "idx_tr": SPLIT["train"] + 1, "idx_val": SPLIT["dev"] + 1, "idx_te": SPLIT["test"] + 1})
    return path


def write_mat_v73(path: Path) -> Path:
    """MATLAB v7.3: HDF5 behind MATLAB's 512-byte header; MATLAB stores an n x d matrix as d x n (column-major),
    so the arrays are written feature-by-item. No split indices."""
    img, txt, labels = _data()
    with h5py.File(path, "w", userblock_size=512) as f:
        f["I_all"], f["T_all"], f["L_all"] = img.T, txt.T, labels.T.astype(float)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Nov 26 2026 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")
    return path


FORMATS = {"npz": (write_npz, "data.npz", ""),
           "mat-v5": (write_mat_v5, "data.mat", "img=data.X1,txt=data.X2,labels=L,train=idx_tr,dev=idx_val,"
                                                "test=idx_te"),
           "mat-v7.3": (write_mat_v73, "data73.mat", "")}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_layout_reads_back_item_by_feature_with_zero_based_splits(fmt: str, tmp_path: Path) -> None:
    write, name, keys = FORMATS[fmt]
    path = write(tmp_path / name)
    img, txt, labels = _data()
    read_feature_file.cache_clear()
    splits = {s: load_split(path, s, data_keys=keys, cache_dir=tmp_path / "cache") for s in ("train", "dev", "test")}
    if fmt != "mat-v7.3":
        for s, data in splits.items():
            rows = SPLIT[s]
            np.testing.assert_allclose(data.features["img"], img[rows], rtol=1e-6)
            np.testing.assert_allclose(data.features["txt"], txt[rows], rtol=1e-6)
            np.testing.assert_array_equal(data.labels, labels[rows])
    else:  # no split indices: a seeded split, written down and reused
        rows = {s: np.asarray([int(i) for i in d.images]) for s, d in splits.items()}
        assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(N))
        assert (len(rows["dev"]), len(rows["test"])) == (6, 6)
        record = json.loads(next((tmp_path / "cache" / "splits").glob("data73-*.json")).read_text())
        assert record["test"] == rows["test"].tolist()
        np.testing.assert_allclose(splits["test"].features["img"], img[rows["test"]], rtol=1e-6)
    train = splits["train"]
    assert len(train.captions) == len(train.images) and list(train.caption_image) == list(range(len(train.images)))
    assert backbone_for("identity", path, keys).img_dim == D_IMG and check_data_dir(path, keys) == path
    if fmt == "npz":  # indices holding neither 0 nor n: the base is given
        shifted = tmp_path / "shifted.npz"
        np.savez(shifted, img=img, txt=txt, labels=labels, train=np.arange(1, 40), dev=np.arange(40, 50),
                 test=np.arange(50, 59))
        one_based = load_split(shifted, "train", data_keys="base=1")
        np.testing.assert_array_equal(one_based.features["img"], img[0:39])
    with pytest.raises(DatasetError, match="unknown split"):
        load_split(path, "val", data_keys=keys)


TRAIN_TEST = {"train": np.arange(0, 40), "test": np.arange(50, 60)}  # items 40..49 in no split


def write_train_test(path: Path, one_based: bool = False) -> Path:
    """Train and test indices, no dev: the Wikipedia / MIRFlickr releases (`.mat`: 1-based, as MATLAB writes)."""
    img, txt, labels = _data()
    if path.suffix == ".mat":
        scipy.io.savemat(path, {"I": img, "T": txt, "L": labels.astype(float),
                                **{k: v + int(one_based) for k, v in TRAIN_TEST.items()}})
    else:
        np.savez(path, img=img, txt=txt, labels=labels, **TRAIN_TEST)
    return path


def _rows(path: Path, cache: Path | None) -> dict[str, list[int]]:
    read_feature_file.cache_clear()
    return {s: [int(i) for i in load_split(path, s, cache_dir=cache).images] for s in ("train", "dev", "test")}


@pytest.mark.parametrize("name", ["wiki.npz", "mirflickr.mat"])
def test_a_file_without_dev_gets_a_seeded_dev_carved_from_train(name: str, tmp_path: Path) -> None:
    path = write_train_test(tmp_path / name, one_based=name.endswith(".mat"))
    cache = tmp_path / "cache"
    rows = _rows(path, cache)
    train, dev, test = (set(rows[s]) for s in ("train", "dev", "test"))
    assert len(dev) == 4 and not dev & train and not dev & test and not train & test, "10 % of train, disjoint"
    assert dev | train == set(TRAIN_TEST["train"].tolist()) and rows["test"] == TRAIN_TEST["test"].tolist()
    assert len(rows["train"]) == len(train) == 36
    record = next((cache / "splits").glob(f"{path.stem}-*-dev.json"))
    assert json.loads(record.read_text()) == rows, "written down in the cache"
    assert _rows(path, cache) == rows == _rows(path, None), "same file, same seed: the same dev, cached or not"
    record.write_text(json.dumps({**rows, "dev": rows["dev"][:2], "train": rows["train"] + rows["dev"][2:]}))
    assert _rows(path, cache)["dev"] == rows["dev"][:2], "a written-down split is reused, not cut again"
    assert MAX_DEV == 2000  # the documented cap


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


def _config(tmp_path: Path, path: Path, **keys: object) -> RunConfig:
    """A tiny 2-round run on the feature file `path`: a paired, an image-only and a text-only node."""
    return parse_run_config({
        "backbone": "identity", "data-dir": str(path), "cache-dir": str(tmp_path / "cache"),
        "out-dir": str(tmp_path / "runs"), "run-name": "f", "num-server-rounds": 2, "local-epochs": 1, "batch-size": 8,
        "embed-dim": 16, "adapter-dim": 4, "hash-bits": 16, "modality-mix": "0.34,0.33,0.33", **keys})


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_two_round_federated_run_on_each_layout(fmt: str, tmp_path: Path) -> None:
    write, name, keys = FORMATS[fmt]
    path = write(tmp_path / name)
    read_feature_file.cache_clear()
    cfg = _config(tmp_path, path, **{"data-keys": keys}).as_flat_dict()
    _run(InProcessGrid(cfg, [3, 4, 5]), server_context(cfg))
    final = json.loads((tmp_path / "runs" / "f" / "final.json").read_text())
    assert 0.0 < final["test"]["hash_smap_i2t"] <= 1.0 and final["test"]["rsum"] > 0
    rounds = [json.loads(line) for line in (tmp_path / "runs" / "f" / "metrics.jsonl").read_text().splitlines()]
    trained = {c["partition-id"]: c["client-type"] for c in rounds[-1]["train"]["clients"]}
    assert sorted(trained.values()) == [0, 1, 2], "a paired, an image-only and a text-only node all trained"
    client_maps = final["per-client"]["summary"]
    assert client_maps["image-only-global-smap_i2t-mean"] > 0, "image-only nodes keep the dataset's labels"


@pytest.mark.parametrize("method", sorted(set(SECTIONS) - {"fedavg", "fedcafe", "plfedcmh", "fedproto"}))
def test_every_other_method_runs_on_a_feature_file(method: str, tmp_path: Path) -> None:
    """The remaining methods (FedAvg: the layout test above; label-indexed ones: below), 2 in-process rounds with a
    paired, an image-only and a text-only node (centralized: its one node)."""
    path = write_npz(tmp_path / "data.npz")
    read_feature_file.cache_clear()
    cfg = _config(tmp_path, path, method=method).as_flat_dict()
    nodes = [3] if method == "centralized" else [3, 4, 5]
    _run(InProcessGrid(cfg, nodes), server_context(cfg))
    rounds = [json.loads(line) for line in (tmp_path / "runs" / "f" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["replies"] for r in rounds if r["round"]] == [len(nodes)] * 2
    assert (tmp_path / "runs" / "f" / "final.json").is_file()


@pytest.mark.parametrize("method", ["fedcafe", "plfedcmh", "fedproto"])
def test_label_indexed_methods_size_their_tables_by_the_files_labels(method: str, tmp_path: Path) -> None:
    """FedCAFE's memory, PLFedCMH's and FedProto's prototypes have one row per label of the file (C = 5 here, not
    Flickr8k's 32 derived concepts), on paired and unimodal nodes alike."""
    path = write_npz(tmp_path / "data.npz")
    read_feature_file.cache_clear()
    cfg = _config(tmp_path, path, method=method, **{"client-eval-every": 1}).as_flat_dict()
    _run(InProcessGrid(cfg, [3, 4, 5]), server_context(cfg))
    run = tmp_path / "runs" / "f"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["replies"] for r in rounds if r["round"]] == [3, 3], "every node's reply was accepted"
    with np.load(run / "strategy-state.npz") as state:
        tables = {k: state[k].shape for k in state.files if "memory" in k or "proto" in k}
    rows = C + 1 if method == "fedproto" else C  # FedProto's tables: the global mean, then one row per label
    assert tables and all(shape[0] == rows for shape in tables.values()), tables
    final = json.loads((run / "final.json").read_text())
    maps = [v for k, v in final["per-client"]["summary"].items() if k.startswith("all-") and "smap_i2t-mean" in k]
    assert maps and all(v > 0 for v in maps)


def test_a_nodes_materialised_feature_shard_is_its_simulated_partition_and_runs(tmp_path: Path) -> None:
    """`common.data.shards` on a feature file (MATLAB v5, struct fields, 1-based indices): each node's directory
    holds its partition's features of only the modalities it holds, reads back as the simulated partition, and a
    2-round run whose nodes read only their own directories trains every node."""
    path = write_mat_v5(tmp_path / "data.mat")
    read_feature_file.cache_clear()
    cfg = _config(tmp_path, path, partitioner="dirichlet",
                  **{"data-keys": FORMATS["mat-v5"][2], "partition-beta": 1.0})
    roots = [tmp_path / f"node-{pid}" for pid in range(3)]
    kinds = []
    for pid, root in enumerate(roots):
        manifest = materialise(cfg, pid, 3, path, root)
        kinds.append(manifest["client-type"])
        mods = CLIENT_TYPES[manifest["client-type"]]
        assert manifest["feature-dims"] == {"img": D_IMG, "txt": D_TXT}
        assert {p.name for p in root.iterdir()} == {MANIFEST, FEATURES}
        with np.load(root / FEATURES) as z:
            assert set(z.files) == {f"{s}-{k}" for s in LOCAL_SPLITS for k in (*mods, "labels")}
        for split in LOCAL_SPLITS:
            cut, read = cut_shard(cfg, pid, 3, path, split), read_shard(root, split, cfg)
            np.testing.assert_array_equal(read.pool_indices, cut.pool_indices)
            assert read.data.images == cut.data.images and read.data.captions == cut.data.captions
            np.testing.assert_array_equal(read.data.labels, cut.data.labels)
            assert set(read.data.features) == set(mods) == set(cut.data.features)
            for m in mods:
                np.testing.assert_array_equal(read.data.features[m], cut.data.features[m])
        verify(root)
    assert sorted(kinds) == ["image-only", "paired", "text-only"]
    flat = cfg.as_flat_dict()
    _run(InProcessGrid(flat, [3, 4, 5], node_configs=[{"data-dir": str(r)} for r in roots]), server_context(flat))
    final = json.loads((tmp_path / "runs" / "f" / "final.json").read_text())
    assert final["test"]["hash_smap_i2t"] > 0
    assert sorted(c["client-type"] for c in final["per-client"]["clients"]) == [0, 1, 2]
    with np.load(roots[0] / FEATURES) as z:  # a damaged feature file: the error names file and key
        kept = {k: z[k] for k in z.files if k != "dev-labels"}
    np.savez(roots[0] / FEATURES, **kept)
    with pytest.raises(ShardError, match=r"features.npz: missing key\(s\) \['dev-labels'\]"):
        read_shard(roots[0], "dev", cfg)
    with pytest.raises(ShardError, match="'backbone' = 'identity'"):  # features given: nothing to encode
        shard_backbone(roots[1], "openclip:fedxmr-tiny")
    backbone = shard_backbone(roots[1], "identity")
    assert (backbone.img_dim, backbone.txt_dim) == (D_IMG, D_TXT)


def _npz(tmp_path: Path, **change) -> Path:
    img, txt, labels = _data()
    arrays = {"img": img, "txt": txt, "labels": labels, **SPLIT, **change}
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in arrays.items() if v is not None})
    read_feature_file.cache_clear()
    return tmp_path / "bad.npz"


@pytest.mark.parametrize("change, keys, message", [
    ({"labels": None}, "", "no variable for ['labels']"),
    ({}, "labels=Lab", "no variable 'Lab' for 'labels'"),
    ({"txt": np.zeros((50, D_TXT), np.float32)}, "", "no item count they share"),
    ({"labels": np.full((N, C), 2, np.uint8)}, "", "labels 'labels' are not 0/1"),
    ({"test": np.arange(55, 61)}, "", "split indices 'test' out of range for 60 items"),
    ({"test": None}, "", "split indices for ['dev', 'train'] but not ['test']"),
    ({"dev": None, "train": np.arange(0, 1)}, "", "hold 1 item(s), too few to carve a dev split"),
    ({}, "image=img", "'image=img' is not <role>=<variable>"),
    ({"train": np.arange(1, 40), "dev": np.arange(40, 50), "test": np.arange(50, 59)}, "",
     "cannot tell whether split indices"),
    ({"dev": np.arange(35, 50)}, "", "split indices 'train' and 'dev' share items"),
])
def test_a_malformed_file_is_an_error_naming_file_and_key(tmp_path: Path, change: dict, keys: str,
                                                          message: str) -> None:
    path = _npz(tmp_path, **change)
    with pytest.raises(DatasetError) as err:
        load_split(path, "train", data_keys=keys)
    assert message in str(err.value)
    assert "data-keys" in str(err.value) or str(path) in str(err.value)


def test_gallery_retrieval_scores_test_queries_against_train_plus_test(tmp_path: Path) -> None:
    """`gallery = "retrieval"`: the test label MAPs rank a database of |train| + |test| items (train first); R@K and
    dev are scored as with `gallery = "test"`."""
    path = write_train_test(tmp_path / "wiki.npz")
    read_feature_file.cache_clear()
    backbone = backbone_for("identity", path)
    evaluators = {g: ServerEvaluator(_config(tmp_path, path, gallery=g), backbone) for g in ("test", "retrieval")}
    arrays = state_to_numpy(XmrModel(evaluators["test"].cfg.model_cfg(D_IMG, D_TXT, concepts=C)))
    ours = evaluators["retrieval"]
    model = ours._model(arrays)
    db = ours.database(model)
    train, test = ours._split("train").data, ours._split("test").data
    assert len(db.img_code) == len(db.txt_code) == len(train.images) + len(test.images) == 36 + 10
    _, _, labels = _data()
    items = [int(i) for i in train.images + test.images]
    np.testing.assert_array_equal(db.img_labels, labels[items])
    scores = {g: e.score(arrays, "test") for g, e in evaluators.items()}
    assert set(scores["test"]) == set(scores["retrieval"])
    codes = {m: model.encode(m, test.features[m])[1] for m in ("img", "txt")}
    assert scores["retrieval"]["hash_map_i2t"] == pytest.approx(
        mean_average_precision(codes["img"], db.txt_code, test.labels, db.txt_labels))
    assert scores["retrieval"]["hash_smap_t2i"] == pytest.approx(
        standard_map(codes["txt"], db.img_code, test.labels, db.img_labels))
    for key in scores["test"]:
        same = scores["test"][key] == pytest.approx(scores["retrieval"][key], nan_ok=True)
        assert same == ("map" not in key or not key.startswith("hash_")), key  # only the label hash MAPs move
    assert evaluators["test"].score(arrays, "dev") == ours.score(arrays, "dev"), "dev is scored within dev"


def test_each_labelled_paired_client_is_also_scored_against_its_own_train_set(tmp_path: Path) -> None:
    """PLFedCMH's protocol beside the shared gallery: at test, a client's queries retrieve from its own train set,
    hashed by the same (selected) model; the reported value is that standard MAP, recomputed here."""
    from safetensors.numpy import load_file

    from fedxmr_client.node import _load_shard

    path = write_npz(tmp_path / "data.npz")
    read_feature_file.cache_clear()
    cfg = _config(tmp_path, path, **{"modality-mix": "1,0,0"})
    flat = cfg.as_flat_dict()
    _run(InProcessGrid(flat, [3, 4]), server_context(flat))
    final = json.loads((tmp_path / "runs" / "f" / "final.json").read_text())
    model = XmrModel(cfg.model_cfg(D_IMG, D_TXT, concepts=C))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in load_file(str(tmp_path / "runs" / "f" /
                                                                          "weights.safetensors")).items()})
    for client in final["per-client"]["clients"]:
        node = {"partition-id": client["partition-id"], "num-partitions": 2}
        test, train = (_load_shard(cfg, node, split) for split in ("test", "train"))
        q = model.encode("img", test.feats["img"])[1]
        db = model.encode("txt", train.feats["txt"])[1]
        expected = standard_map(q, db, test.data.labels, train.data.labels[train.data.caption_image])
        assert client["global-own_smap_i2t"] == pytest.approx(expected)
        assert 0.0 < client["global-own_smap_t2i"] <= 1.0
    summary = final["per-client"]["summary"]
    assert summary["all-global-own_smap_i2t-worst"] <= summary["all-global-own_smap_i2t-mean"]
