"""The real Deployment Engine on loopback, driven by the deploy/ scripts (deploy/README.md): a SuperLink with TLS
and SuperNode authentication, two registered SuperNodes each reading only its materialised shard, 2 rounds of the
default method on a small subset, then one round with secure aggregation (SecAgg+). An unregistered SuperNode must
be refused, and everything that was started must be stopped, also when a step fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import parse_run_config
from common.data.shards import materialise
from scripts.deploy import deploy_processes, stop
from scripts.simulate import free_port

PROJECT = Path(__file__).resolve().parents[1]
ROUNDS = 2
SUBSET = {"max-train-images": 240, "max-eval-images": 100}
pytestmark = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                                reason="the deployment test needs openssl and ssh-keygen for certificates and keys")


def _script(env: dict[str, str], name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run deploy/<name>.sh in its own session; on timeout its whole process group (e.g. `flwr run`) is killed."""
    proc = subprocess.Popen([str(PROJECT / "deploy" / f"{name}.sh"), *args], env=env, cwd=PROJECT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"deploy/{name}.sh timed out after {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _signalled_run(env: dict[str, str], run_config: str, log: Path) -> dict:
    """deploy/run.sh sent SIGTERM once its run started: its exit code and output."""
    import time

    with open(log, "w") as out:
        proc = subprocess.Popen([str(PROJECT / "deploy" / "run.sh"), "--run-config", run_config], env=env, cwd=PROJECT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and "Successfully started run" not in log.read_text():
            time.sleep(0.5)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = None
    return {"code": code, "output": log.read_text()}


def _checked(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{' '.join(result.args)} failed ({result.returncode}):\n{result.stdout[-3000:]}"
    return result.stdout


def _tls_probe(port: int, ca: Path) -> dict:
    """The SuperLink's certificate as verified against our CA for 127.0.0.1, and what plain HTTP gets back."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cert = tls.getpeercert()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            plain = raw.recv(64)
        except (ConnectionResetError, TimeoutError):
            plain = b""
    return {"san": cert.get("subjectAltName", ()), "plain-http-reply": plain}


@pytest.fixture(scope="module")
def deployment(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Set up, run and stop the whole deployment; the tests assert on what it left."""
    base = tmp_path_factory.mktemp("deploy")
    deploy_dir = base / "deploy"
    env = {**os.environ, "DEPLOY_DIR": str(deploy_dir), "SUPERLINK_PORT": str(free_port()),
           "VENV_BIN": str(Path(sys.executable).parent), "NODE_THREADS": "1"}  # 2 nodes share the cores
    cfg = parse_run_config({**SUBSET, "data-dir": str(flickr8k_dir)})
    result: dict = {"deploy-dir": deploy_dir, "run-dir": base / "runs" / "deploy"}
    try:
        _checked(_script(env, "certs", "node-0", "node-1", "rogue"))
        _checked(_script(env, "superlink"))
        _checked(_script(env, "register", "node-0", "node-1"))
        for pid in (0, 1):
            materialise(cfg, pid, 2, flickr8k_dir, base / "shards" / f"node-{pid}")
            _checked(_script(env, "supernode", f"node-{pid}", str(base / "shards" / f"node-{pid}")))
        _checked(_script(env, "supernode", "rogue", str(base / "shards" / "node-1")))  # key never registered
        run_config = " ".join(f"{k}={v}" for k, v in SUBSET.items()) + (
            f" num-server-rounds={ROUNDS} batch-size=32 data-dir='{flickr8k_dir}' cache-dir='{base / 'server-cache'}'"
            f" out-dir='{base / 'runs'}' run-name='deploy'")
        result["run"] = _script(env, "run", "--run-config", run_config, timeout=900)
        listing = _checked(_script(env, "status"))
        result["status"] = json.JSONDecoder().raw_decode(listing[listing.index("{"):])[0]
        result["tls"] = _tls_probe(int(env["SUPERLINK_PORT"]), deploy_dir / "certs" / "ca.crt")
        secure = run_config.replace(f"num-server-rounds={ROUNDS}", "num-server-rounds=1 secure-aggregation=true")
        result["secure"] = _script(env, "run", "--run-config", secure.replace("'deploy'", "'secagg'"), timeout=600)
        long = run_config.replace(f"num-server-rounds={ROUNDS}", "num-server-rounds=200").replace("'deploy'",
                                                                                                "'signalled'")
        result["signalled"] = _signalled_run(env, long, base / "signalled.log")
        listing = _script(env, "status").stdout
        result["status-after-signal"] = json.JSONDecoder().raw_decode(listing[listing.index("{"):])[0]
        result["logs"] = {p.stem: p.read_text() for p in (deploy_dir / "logs").glob("*.log")}
    finally:
        result["stop"] = _script(env, "stop", timeout=120)
        if result["stop"].returncode != 0:  # the script failed: stop from here, then report it in the test
            stop(deploy_dir)
    return result


def test_the_run_completes_over_tls_with_node_auth(deployment: dict) -> None:
    """`flwr run` exits 0 even on failure: run.sh's status comes from `flwr ls --format json`."""
    assert deployment["run"].returncode == 0, deployment["run"].stdout[-4000:]
    (run,) = deployment["status"]["runs"]
    assert run["status"] == "finished:completed", run.get("status-details")
    assert ("IP Address", "127.0.0.1") in deployment["tls"]["san"] and ("DNS", "localhost") in deployment["tls"]["san"]
    assert not deployment["tls"]["plain-http-reply"].startswith(b"HTTP/"), "the SuperLink answered plain HTTP"
    assert deployment["logs"]["superlink"].count("[Fleet.ActivateNode] Activated node_id") == 2


def test_metrics_were_written_from_both_private_shards(deployment: dict) -> None:
    run_dir = deployment["run-dir"]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for r in rounds[1:]:
        clients = r["train"]["clients"]
        assert sorted(c["partition-id"] for c in clients) == [0, 1]
        assert all(c["num-examples"] == SUBSET["max-train-images"] // 2 for c in clients)
        assert [c["partition-id"] for c in r["client-dev"]["clients"]] == [0, 1]
    assert max(r["dev"]["rsum"] for r in rounds[1:]) > rounds[0]["dev"]["rsum"] + 60
    final = json.loads((run_dir / "final.json").read_text())
    assert final["test"]["rsum"] > 0


def test_a_secagg_round_runs_over_tls(deployment: dict) -> None:
    """One round with SecAgg+: the four stages reach both SuperNodes, their masked vectors are summed and unmasked,
    and no train reply carried arrays (the strategy saw the mean only)."""
    assert deployment["secure"].returncode == 0, deployment["secure"].stdout[-4000:]
    rounds = [json.loads(line) for line in (deployment["run-dir"].parent / "secagg" / "metrics.jsonl").read_text()
              .splitlines()]
    train = rounds[1]["train"]
    assert train["usable"] == 2 and sorted(c["partition-id"] for c in train["clients"]) == [0, 1]
    assert [s["replies"] for s in train["secagg"]["stages"]] == [2, 2, 2, 2]
    assert rounds[1]["dev"]["rsum"] > rounds[0]["dev"]["rsum"]


def test_sigterm_to_run_sh_stops_its_run(deployment: dict) -> None:
    """What `timeout`, a CI cancel or a closed terminal sends: the run must not go on unattended."""
    signalled = deployment["signalled"]
    assert signalled["code"] == 128 + signal.SIGTERM, signalled["output"][-3000:]
    stopped = re.search(r"stopping run (\d+)", signalled["output"])
    assert stopped, signalled["output"][-3000:]
    (run,) = [r for r in deployment["status-after-signal"]["runs"] if str(r["run-id"]) == stopped.group(1)]
    assert run["status"] == "finished:stopped", run


def test_an_unregistered_supernode_is_refused(deployment: dict) -> None:
    rogue, link = deployment["logs"]["supernode-rogue"], deployment["logs"]["superlink"]
    assert "Failed to activate SuperNode" in rogue, rogue[-2000:]
    assert "No SuperNode found with the given public key" in link


def test_everything_is_stopped(deployment: dict) -> None:
    stopped = deployment["stop"]
    assert stopped.returncode == 0, stopped.stdout
    assert "none left" in stopped.stdout
    assert deploy_processes(deployment["deploy-dir"]) == []
    assert not list((deployment["deploy-dir"] / "pids").glob("*.pid"))
