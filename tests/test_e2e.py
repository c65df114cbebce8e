"""End to end through `flwr run .` (local simulation, Ray), on a small real Flickr8k subset with the offline
default backbone: the federated model must learn, the run outputs must be complete, nothing may be left running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.simulate import processes_matching, simulate

ROUNDS = 3


@pytest.fixture(scope="module")
def finished_run(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    base = tmp_path_factory.mktemp("e2e")
    config = (f"num-server-rounds={ROUNDS} max-train-images=240 max-eval-images=100 batch-size=32 "
              f"data-dir='{flickr8k_dir}' cache-dir='{base / 'cache'}' out-dir='{base / 'runs'}' run-name='e2e'")
    status = simulate(clients=2, run_config=config, timeout=900, flwr_home=base / "flwr-home")
    return status, base / "runs" / "e2e", base / "flwr-home"


def test_run_completes(finished_run: tuple[dict, Path, Path]) -> None:
    status, _, _ = finished_run
    assert status["status"] == "finished:completed", status.get("status-details")


def test_the_federated_model_learns(finished_run: tuple[dict, Path, Path]) -> None:
    """Best dev rsum beats the untrained global model (round 0) by a wide margin; chance is about 32 here."""
    _, run_dir, _ = finished_run
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    untrained = rounds[0]["dev"]["rsum"]
    best = max(r["dev"]["rsum"] for r in rounds[1:])
    assert best > untrained + 60, (untrained, best)
    assert max(r["dev"]["hash_rsum"] for r in rounds[1:]) > rounds[0]["dev"]["hash_rsum"] + 20
    for r in rounds[1:]:
        assert r["train"]["usable"] == 2 and len(r["train"]["clients"]) == 2
        assert {c["partition-id"] for c in r["train"]["clients"]} == {0, 1}
        per_client = r["client-evaluate"]
        assert [c["partition-id"] for c in per_client["clients"]] == [0, 1]
        assert 0 < per_client["summary"]["all-global-mean"] <= 100


def test_run_outputs_are_complete(finished_run: tuple[dict, Path, Path]) -> None:
    _, run_dir, _ = finished_run
    from safetensors.numpy import load_file

    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["num-server-rounds"] == ROUNDS and config["run"]["max-train-images"] == 240
    weights = load_file(str(run_dir / "weights.safetensors"))
    assert "img.proj.weight" in weights and weights["img.proj.weight"].shape == (256, 1280)
    final = json.loads((run_dir / "final.json").read_text())
    assert 1 <= final["best-round"] <= ROUNDS and final["test"]["rsum"] > 0
    assert "| test | continuous |" in (run_dir / "summary.md").read_text()
    assert (run_dir / "convergence.png").stat().st_size > 1000
    assert (run_dir / "clients.png").stat().st_size > 1000
    assert "Per-client test score" in (run_dir / "summary.md").read_text()
    assert (run_dir / "strategy-state.npz").stat().st_size > 0


def test_nothing_is_left_running(finished_run: tuple[dict, Path, Path]) -> None:
    _, _, flwr_home = finished_run
    assert processes_matching(str(flwr_home)) == []


def test_a_failing_run_is_reported_as_failed(tmp_path: Path) -> None:
    """`flwr run` exits 0 on a failed run; the launcher must read the real status."""
    status = simulate(clients=2, run_config=f"num-server-rounds=1 data-dir='{tmp_path / 'nowhere'}' "
                                            f"out-dir='{tmp_path / 'runs'}'", timeout=600,
                      flwr_home=tmp_path / "flwr-home")
    assert status["status"] == "finished:failed"
    assert processes_matching(str(tmp_path / "flwr-home")) == []
