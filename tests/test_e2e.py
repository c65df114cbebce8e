"""End to end through `flwr run .` (local simulation, Ray), on a small real Flickr8k subset with the offline
default backbone: the federated model must learn, the run outputs must be complete and reproducible, the reported
test must be the selected model's, per-client payloads must reach their nodes, nothing may be left running."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.simulate import descendants, processes_matching, simulate

ROUNDS = 3


def _run(flickr8k_dir: Path, base: Path, name: str, extra: str = "", rounds: int = ROUNDS) -> tuple[dict, Path]:
    config = (f"num-server-rounds={rounds} max-train-images=240 max-eval-images=100 batch-size=32 "
              f"data-dir='{flickr8k_dir}' cache-dir='{base.parent / 'e2e-cache'}' out-dir='{base / 'runs'}' "
              f"run-name='{name}' {extra}")
    status = simulate(clients=2, run_config=config, timeout=900, flwr_home=base / "flwr-home",
                      cpus_per_client=1)
    return status, base / "runs" / name


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    base = tmp_path_factory.mktemp("e2e")
    status, run_dir = _run(flickr8k_dir, base, "e2e")
    return status, run_dir, base / "flwr-home"


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
        per_client = r["client-dev"]
        assert [c["partition-id"] for c in per_client["clients"]] == [0, 1]
        assert 0 < per_client["summary"]["all-global-mean"] <= 100


def test_the_selected_round_is_the_best_on_dev_and_test_is_its_model(finished_run: tuple[dict, Path, Path]) -> None:
    """The reported test must come from the round with the highest dev rsum (the earliest of ties), and recomputing
    it from the saved weights must give the reported numbers."""
    from safetensors.numpy import load_file

    from common.backbones import build_backbone
    from common.config import parse_run_config
    from fedxmr_server.evaluator import ServerEvaluator

    _, run_dir, _ = finished_run
    rounds = _rounds(run_dir)
    final = json.loads((run_dir / "final.json").read_text())
    dev = [r["dev"]["rsum"] for r in rounds]
    assert final["best-round"] == dev.index(max(dev)) and final["dev"]["rsum"] == max(dev)
    assert rounds[-1]["best-round"] == final["best-round"]
    cfg = parse_run_config(json.loads((run_dir / "config.json").read_text())["run"])
    recomputed = ServerEvaluator(cfg, build_backbone(cfg.backbone, "cpu")).score(
        load_file(str(run_dir / "weights.safetensors")), "test")
    # rankings by float cosine (emb_/relaxed_ MAPs) may swap near-ties under another BLAS summation order
    cosine = {k for k in recomputed if k.startswith(("emb_smap", "relaxed_smap"))}
    assert {k: v for k, v in recomputed.items() if k not in cosine} == pytest.approx(
        {k: v for k, v in final["test"].items() if k not in cosine}, rel=1e-9, abs=1e-12)
    assert {k: recomputed[k] for k in cosine} == pytest.approx({k: final["test"][k] for k in cosine}, abs=1e-4)
    clients = final["per-client"]["clients"]
    assert [c["partition-id"] for c in clients] == [0, 1] and all("global-score" in c for c in clients)


def test_same_seed_same_metrics(finished_run: tuple[dict, Path, Path], flickr8k_dir: Path,
                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """A second run of the same config gives identical dev, client-dev and test numbers."""
    _, first, _ = finished_run
    status, again = _run(flickr8k_dir, tmp_path_factory.mktemp("e2e-again"), "e2e")
    assert status["status"] == "finished:completed", status.get("status-details")
    for a, b in zip(_rounds(first), _rounds(again), strict=True):
        assert a["dev"] == b["dev"]
        assert [c.get("global-score") for c in a["client-dev"].get("clients", [])] == \
            [c.get("global-score") for c in b["client-dev"].get("clients", [])]
    final = [json.loads((run / "final.json").read_text()) for run in (first, again)]
    assert final[0]["test"] == final[1]["test"]


def test_each_node_receives_its_own_model(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Method `local` sends different arrays to different nodes: in round 2 each node must receive exactly the
    model it sent in round 1 (checksums computed by the nodes on both ends), and the two nodes' models differ."""
    status, run_dir = _run(flickr8k_dir, tmp_path_factory.mktemp("e2e-local"), "local", "method='local'", rounds=2)
    assert status["status"] == "finished:completed", status.get("status-details")
    rounds = _rounds(run_dir)
    sent = {c["partition-id"]: c["sent-checksum"] for c in rounds[0]["train"]["clients"]}
    received = {c["partition-id"]: c["received-checksum"] for c in rounds[1]["train"]["clients"]}
    assert received == sent and len(set(sent.values())) == 2
    final = json.loads((run_dir / "final.json").read_text())
    assert final["test"] == {} and final["per-client"]["summary"]["all-global-clients"] == 2


def test_plfedcmh_sends_each_node_its_own_generated_parameters(flickr8k_dir: Path,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """Through `flwr run`: in round 2 the two nodes receive different parameters, neither of them the model either
    node sent in round 1 (each is a layer-weighted mix; `test_plfedcmh` checks the mix exactly in-process), and the
    layer weights are drawn at the selected round."""
    status, run_dir = _run(flickr8k_dir, tmp_path_factory.mktemp("e2e-plfedcmh"), "plfedcmh",
                           "method='plfedcmh' hash-bits=16", rounds=2)
    assert status["status"] == "finished:completed", status.get("status-details")
    rounds = _rounds(run_dir)
    sent = {c["partition-id"]: c["sent-checksum"] for c in rounds[0]["train"]["clients"]}
    received = {c["partition-id"]: c["received-checksum"] for c in rounds[1]["train"]["clients"]}
    assert len(received) == 2 and len(set(received.values())) == 2
    assert not set(received.values()) & set(sent.values())
    assert (run_dir / "layer-weights.png").exists()
    final = json.loads((run_dir / "final.json").read_text())
    assert final["per-client"]["summary"]["all-global-clients"] == 2


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


def test_failing_and_nan_clients_are_recorded_and_the_run_completes(flickr8k_dir: Path,
                                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fault drills: partition 1 raises in every train message, partition 2 always sends NaN; the other two train."""
    base = tmp_path_factory.mktemp("faults")
    config = (f"num-server-rounds=2 max-train-images=240 max-eval-images=100 batch-size=32 local-epochs=1 "
              f"data-dir='{flickr8k_dir}' cache-dir='{base.parent / 'e2e-cache'}' out-dir='{base / 'runs'}' "
              f"run-name='faults' faults='1:raise,2:nan' client-eval-every=2")
    status = simulate(clients=4, run_config=config, timeout=900, flwr_home=base / "flwr-home", cpus_per_client=1)
    assert status["status"] == "finished:completed", status.get("status-details")
    rounds = _rounds(base / "runs" / "faults")[1:]
    for r in rounds:
        reasons = {rej["partition-id"]: rej["reason"] for rej in r["train"]["rejected"]}
        assert set(reasons) == {None, 2} or set(reasons) == {1, 2}, reasons  # a failed node sends no metrics
        assert "non-finite" in reasons[2] and any("fault drill" in v for v in reasons.values())
        assert r["train"]["usable"] == 2 and not r["train"]["under-quorum"]
    assert "Train replies left out: 4" in (base / "runs" / "faults" / "summary.md").read_text()


def test_a_run_in_which_every_client_fails_ends_failed(flickr8k_dir: Path, tmp_path: Path) -> None:
    config = (f"num-server-rounds=2 max-train-images=240 max-eval-images=100 data-dir='{flickr8k_dir}' "
              f"cache-dir='{tmp_path.parent / 'e2e-cache'}' out-dir='{tmp_path / 'runs'}' run-name='all-fail' "
              f"faults='0:raise,1:raise'")
    status = simulate(clients=2, run_config=config, timeout=900, flwr_home=tmp_path / "flwr-home")
    assert status["status"] == "finished:failed"
    final = json.loads((tmp_path / "runs" / "all-fail" / "final.json").read_text())
    assert final["status"] == "failed" and "no client ever sent a usable train reply" in final["reason"]
    assert processes_matching(str(tmp_path / "flwr-home")) == []


def test_sigterm_stops_the_wrapper_and_everything_it_started(flickr8k_dir: Path, tmp_path: Path) -> None:
    """What `timeout`, a CI cancel or a service manager sends: the run must not go on unattended."""
    import signal
    import subprocess
    import sys
    import time

    home = tmp_path / "flwr-home"
    config = (f"num-server-rounds=50 max-train-images=240 max-eval-images=100 data-dir='{flickr8k_dir}' "
              f"cache-dir='{tmp_path.parent / 'e2e-cache'}' out-dir='{tmp_path / 'runs'}'")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.simulate", "--clients", "2", "--flwr-home", str(home),
                             "--run-config", config], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not processes_matching(str(home / "local-superlink")):
        time.sleep(1)
    assert processes_matching(str(home / "local-superlink")), "the managed SuperLink never started"
    time.sleep(5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert processes_matching(str(home)) == []


def test_a_serverapp_killed_mid_run_resumes_to_the_uninterrupted_result(finished_run: tuple[dict, Path, Path],
                                                                        flickr8k_dir: Path, tmp_path: Path) -> None:
    """`kill -9` of the ServerApp process (`flwr-simulation`) once round 1 is logged, then `resume`: the run ends
    with the same final metrics and weights as the uninterrupted run of the same config (`finished_run`)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.numpy import load_file

    _, reference, _ = finished_run
    base = tmp_path / "base"
    base.mkdir()
    config = (f"num-server-rounds={ROUNDS} max-train-images=240 max-eval-images=100 batch-size=32 "
              f"data-dir='{flickr8k_dir}' cache-dir='{tmp_path.parent / 'e2e-cache'}' out-dir='{base / 'runs'}' "
              f"run-name='cut'")
    run_dir = base / "runs" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "scripts.simulate", "--clients", "2", "--flwr-home",
                             str(base / "home-1"), "--run-config", config], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # killed once round 1 is logged and checkpointed (the checkpoint follows the log line: waiting for the log
    # line alone raced the checkpoint's write)
    while time.time() < deadline and proc.poll() is None and not (
            (run_dir / "metrics.jsonl").exists() and '"round": 1,' in (run_dir / "metrics.jsonl").read_text()
            and (run_dir / "checkpoint.npz").exists()):
        time.sleep(0.05)
    server = [p for p in descendants([proc.pid]) if p in processes_matching("flwr-simulation")]
    assert len(server) == 1, "the ServerApp process was not found"
    os.kill(server[0], signal.SIGKILL)
    proc.send_signal(signal.SIGTERM)  # the wrapper stops what is left (else Flower waits ~60 s for a heartbeat)
    proc.wait(timeout=120)
    assert not (run_dir / "final.json").exists() and (run_dir / "checkpoint.npz").exists()

    status = simulate(clients=2, run_config=config + f" resume='{run_dir}'", timeout=900,
                      flwr_home=base / "home-2", cpus_per_client=1)
    assert status["status"] == "finished:completed", status.get("status-details")
    assert [r["round"] for r in _rounds(run_dir)] == [r["round"] for r in _rounds(reference)]
    strip = lambda final: {k: v for k, v in final.items() if k != "per-client"}  # noqa: E731 (node ids differ)
    final, final_ref = (json.loads((d / "final.json").read_text()) for d in (run_dir, reference))
    assert strip(final) == strip(final_ref)
    assert final["per-client"]["summary"] == final_ref["per-client"]["summary"]
    weights, weights_ref = (load_file(str(d / "weights.safetensors")) for d in (run_dir, reference))
    assert all(np.array_equal(weights[k], weights_ref[k]) for k in weights_ref)
    assert processes_matching(str(base)) == []


def test_sigterm_stops_a_results_grid_and_the_simulation_it_runs(flickr8k_dir: Path, tmp_path: Path) -> None:
    """The grid runs its cells' simulations in worker threads: SIGTERM must still stop them all."""
    import signal
    import subprocess
    import sys
    import time

    grid = tmp_path / "grid.toml"
    grid.write_text(f"""title = "sigterm"
clients = 2
seeds = [0]
out-dir = "{tmp_path / 'runs'}"
results = "{tmp_path / 'RESULTS.md'}"

[run-config]
data-dir = "{flickr8k_dir}"
cache-dir = "{tmp_path.parent / 'e2e-cache'}"
num-server-rounds = 50
max-train-images = 240
max-eval-images = 100

[settings.iid]
title = "iid"
run-config = {{ partitioner = "iid" }}

[[methods]]
name = "fedavg"
settings = ["iid"]
""")
    log = tmp_path / "grid.log"  # says why when the grid stops early (e.g. it refuses uncommitted code changes)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "scripts.grid", str(grid)],
                                cwd=Path(__file__).resolve().parents[1], stdout=out, stderr=subprocess.STDOUT)
    deadline, started = time.time() + 300, []
    while time.time() < deadline and not started and proc.poll() is None:
        started = [p for p in descendants([proc.pid]) if p in processes_matching("local-superlink")]
        time.sleep(1)
    assert started, f"the grid's simulation never started (grid exit {proc.poll()}): {log.read_text()[-1500:]}"
    time.sleep(5)
    tree = descendants([proc.pid])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    time.sleep(1)
    assert [p for p in tree if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)] == []


def _state(pid: int) -> str:
    try:
        return "zombie" if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" else "alive"
    except OSError:
        return "gone"
