"""A large federation's cost follows the sampled clients (issue: thousands of clients): 200 in-process nodes, 5
sampled per round for training, per-client dev evaluation and the final test. Only the sampled nodes ever receive a
message (each is asked who it is once, when first sampled); the report names the clients the final test scored; a
run killed in round 2 and resumed on new node ids ends exactly like the uninterrupted one."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.config import parse_run_config
from common.data.precomputed import read_feature_file
from fedxmr_server.app import _run
from tests.inprocess import InProcessGrid, Killed, server_context
from tests.test_resume import _outcome

NODES, SAMPLED, ROUNDS = 200, 5, 3


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


class CountingGrid(InProcessGrid):
    """Counts the messages each node receives, by message type."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: Counter[tuple[int, str]] = Counter()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.received.update((m.metadata.dst_node_id, m.metadata.message_type) for m in messages)
        return super().send_and_receive(messages, timeout)

    def nodes_of(self, kind: str) -> set[int]:
        return {node for (node, mtype) in self.received if mtype == kind}


def _features(path: Path) -> Path:
    """2 train items per node, 40 dev and 40 test items, 4 labels."""
    rng = np.random.default_rng(0)
    n = 2 * NODES + 80
    labels = (rng.random((n, 4)) < 0.4).astype(np.uint8)
    labels[np.arange(n), rng.integers(0, 4, n)] = 1
    img = (labels @ rng.normal(size=(4, 8)) + 0.3 * rng.normal(size=(n, 8))).astype(np.float32)
    txt = (labels @ rng.normal(size=(4, 6)) + 0.3 * rng.normal(size=(n, 6))).astype(np.float32)
    np.savez(path, img=img, txt=txt, labels=labels, train=np.arange(2 * NODES),
             dev=np.arange(2 * NODES, 2 * NODES + 40), test=np.arange(2 * NODES + 40, n))
    read_feature_file.cache_clear()
    return path


def _config(tmp_path: Path, name: str, **extra: object) -> dict:
    return parse_run_config({
        "backbone": "identity", "data-dir": str(_features(tmp_path / "data.npz")), "cache-dir": str(tmp_path / "cache"),
        "out-dir": str(tmp_path / "runs"), "run-name": name, "num-server-rounds": ROUNDS, "local-epochs": 1,
        "batch-size": 8, "embed-dim": 16, "adapter-dim": 4, "hash-bits": 16, "seed": 1, "min-nodes": 2,
        "fraction-train": SAMPLED / NODES, "fraction-evaluate": SAMPLED / NODES, "test-clients": SAMPLED,
        "client-eval-every": 1, **extra}).as_flat_dict()


def test_only_sampled_nodes_receive_messages_and_the_report_names_the_tested_clients(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "big")
    grid = CountingGrid(cfg, list(range(1000, 1000 + NODES)))
    _run(grid, server_context(cfg))
    train, dev, queried = grid.nodes_of("train"), grid.nodes_of("evaluate"), grid.nodes_of("query")
    assert sum(grid.received[(n, "train")] for n in train) == ROUNDS * SAMPLED
    assert queried == {node for (node, _) in grid.received}, "every messaged node was asked who it is"
    assert all(grid.received[(n, "query")] == 1 for n in queried), "each node is asked once"
    assert len(queried) <= 2 * ROUNDS * SAMPLED + SAMPLED < NODES
    final = json.loads((tmp_path / "runs" / "big" / "final.json").read_text())
    sampled = final["per-client"]["sampled"]
    assert sampled["nodes"] == NODES and sampled["asked"] == SAMPLED
    tested = sorted(c["partition-id"] for c in final["per-client"]["clients"])
    assert sampled["scored-partitions"] == tested and len(tested) == SAMPLED
    rounds = [json.loads(line) for line in (tmp_path / "runs" / "big" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train"]["replies"] == SAMPLED for r in rounds if r["round"])
    assert dev, "per-client dev evaluation asked its sample"


def test_a_sampled_run_resumed_on_new_node_ids_ends_like_the_uninterrupted_one(tmp_path: Path) -> None:
    whole = _config(tmp_path, "whole")
    _run(CountingGrid(whole, list(range(1000, 1000 + NODES))), server_context(whole))
    cut = _config(tmp_path, "cut")
    with pytest.raises(Killed):
        _run(CountingGrid(cut, list(range(1000, 1000 + NODES)), kill_at=(2, "train")), server_context(cut))
    resumed = {**cut, "resume": str(tmp_path / "runs" / "cut")}
    # new node ids, listed in the same partition order (the sample draws positions from the restored RNG)
    _run(CountingGrid(resumed, list(range(5000, 5000 + NODES))), server_context(resumed))
    final, rounds, weights = _outcome(tmp_path / "runs" / "cut")
    final_ref, rounds_ref, weights_ref = _outcome(tmp_path / "runs" / "whole")
    assert rounds == rounds_ref and final == final_ref
    assert weights.keys() == weights_ref.keys() and all(np.array_equal(weights[k], weights_ref[k]) for k in weights)


def test_a_gpu_share_per_client_reaches_flowers_federation_config() -> None:
    from scripts.simulate import federation_config

    assert federation_config(10) == "num-supernodes=10 client-resources-num-cpus=1"
    assert federation_config(10, 2, 0.25) == ("num-supernodes=10 client-resources-num-cpus=2 "
                                              "client-resources-num-gpus=0.25")
