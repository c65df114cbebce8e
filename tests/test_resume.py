"""Checkpoint and resume (issue 12): for every registered method, a run killed during round 2 of 4 and resumed (new
node ids, fresh node contexts: only what is on disk survives) ends exactly like an uninterrupted run with the same
seed. The real ServerApp and ClientApp run in this process (`tests.inprocess`); `test_e2e` kills a real
`flwr run` once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.config import ConfigError, parse_run_config
from common.preflight import path_problems
from fedxmr_server.app import _run
from fedxmr_server.strategies import STRATEGIES
from tests.inprocess import InProcessGrid, Killed, server_context

ROUNDS = 4
# per method: node count and keys that make it exercise its state (unimodal clients, personal adapters)
SETUPS = {"centralized": (1, {"min-nodes": 1}),
          "unialign": (3, {"modality-mix": "0.34,0.33,0.33"}),
          "paired-only": (3, {"modality-mix": "0.34,0.33,0.33"}),
          "rcsr": (3, {"personal-adapters": True, "personal-epochs": 1, "modality-mix": "0.34,0.33,0.33"}),
          "moon": (3, {"modality-mix": "0.34,0.33,0.33"}),
          "fedcafe": (3, {"modality-mix": "0.34,0.33,0.33", "hash-loss": "pairwise"}),
          "plfedcmh": (3, {"modality-mix": "0.34,0.33,0.33"})}
TIMING = {"train-seconds", "load-seconds", "round-s", "elapsed-s", "train-s", "aggregate-and-dev-s",
          "client-eval-s"}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


def _config(method: str, flickr8k_dir: Path, cache: Path, out: Path, name: str, **extra) -> dict:
    keys = {"method": method, "backbone": "openclip:fedxmr-tiny", "data-dir": str(flickr8k_dir),
            "cache-dir": str(cache), "out-dir": str(out), "run-name": name, "num-server-rounds": ROUNDS,
            "max-train-images": 30, "max-eval-images": 20, "local-epochs": 1, "batch-size": 8, "embed-dim": 32,
            "adapter-dim": 8, "hash-bits": 16, "seed": 3, **SETUPS.get(method, (3, {}))[1], **extra}
    return parse_run_config(keys).as_flat_dict()


def _nodes(method: str, first: int) -> list[int]:
    return [first + 7 * i for i in range(SETUPS.get(method, (3, {}))[0])]


def _strip(value):
    """A run's record without what legitimately differs between two processes: node ids and wall times."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "node-id" and k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _outcome(run_dir: Path) -> tuple[dict, list, dict]:
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(run_dir / "weights.safetensors")) if (run_dir / "weights.safetensors").exists() else {}
    return _strip(json.loads((run_dir / "final.json").read_text())), _strip(rounds), weights


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_a_run_killed_in_round_2_and_resumed_ends_like_an_uninterrupted_one(method: str, flickr8k_dir: Path,
                                                                            tmp_path: Path) -> None:
    cache, out = tmp_path.parent / "resume-cache", tmp_path / "runs"  # features encoded once for all methods
    whole = _config(method, flickr8k_dir, cache, out, "whole")
    _run(InProcessGrid(whole, _nodes(method, 11)), server_context(whole))

    cut = _config(method, flickr8k_dir, cache, out, "cut")
    with pytest.raises(Killed):
        _run(InProcessGrid(cut, _nodes(method, 11), kill_at=(2, "train")), server_context(cut))
    assert not (out / "cut" / "final.json").exists()
    resumed = {**cut, "resume": str(out / "cut")}
    assert not path_problems(parse_run_config(resumed))
    _run(InProcessGrid(resumed, _nodes(method, 500)), server_context(resumed))  # new node ids, nothing in memory

    final, rounds, weights = _outcome(out / "cut")
    final_ref, rounds_ref, weights_ref = _outcome(out / "whole")
    assert [r["round"] for r in rounds] == list(range(0 if rounds[0]["round"] == 0 else 1, ROUNDS + 1))
    assert rounds == rounds_ref, "per-round records differ from the uninterrupted run"
    assert final == final_ref, "final dev/test metrics differ from the uninterrupted run"
    assert weights.keys() == weights_ref.keys() and all(np.array_equal(weights[k], weights_ref[k]) for k in weights)


def test_resume_refuses_a_completed_run_a_changed_config_and_a_dir_without_checkpoint(flickr8k_dir: Path,
                                                                                       tmp_path: Path) -> None:
    cache, out = tmp_path.parent / "resume-cache", tmp_path / "runs"
    cfg = _config("fedavg", flickr8k_dir, cache, out, "done", **{"num-server-rounds": 1})
    _run(InProcessGrid(cfg, _nodes("fedavg", 1)), server_context(cfg))
    problems = path_problems(parse_run_config({**cfg, "resume": str(out / "done")}))
    assert len(problems) == 1 and "has ended" in problems[0] and "resume" in problems[0]
    again = path_problems(parse_run_config(cfg))
    assert len(again) == 1 and "already holds a run" in again[0] and "resume=" in again[0]
    (out / "done" / "final.json").write_text(json.dumps({"status": "failed", "reason": "test"}))
    assert path_problems(parse_run_config({**cfg, "resume": str(out / "done")})) == []  # a failed run resumes
    changed = {**cfg, "resume": str(out / "done"), "lr": 0.5}
    with pytest.raises(ConfigError, match=r"keys that differ: lr \(was 0.001, now 0.5\)"):
        _run(InProcessGrid(changed, _nodes("fedavg", 1)), server_context(changed))
    (out / "empty").mkdir()
    (out / "empty" / "config.json").write_text("{}")
    problems = path_problems(parse_run_config({**cfg, "resume": str(out / "empty")}))
    assert len(problems) == 1 and "no checkpoint.npz" in problems[0]
