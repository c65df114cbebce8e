"""Run fedxmr in Flower's local simulation (`flwr run .`) and fail loudly when the run fails.

What it adds around `flwr run . --stream`: a private FLWR_HOME and free ports (runs never meet a stale managed
SuperLink), Flower's runtime dependency installation, telemetry and update check switched off, the run's final
status read from `flwr ls --format json` (`flwr run` exits 0 even when the run fails), and the managed SuperLink
(with everything it started) stopped afterwards, also on error, Ctrl-C, SIGTERM or SIGHUP (what `timeout`, a CI
cancel or a service manager sends): the exit code is then 128 + the signal number.

    python -m scripts.simulate --clients 10 --run-config "num-server-rounds=20 data-dir='/abs/flickr8k'"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PROJECT = Path(__file__).resolve().parents[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per process: two per actor on 2 cores made rounds far slower
    bin_dir = str(Path(sys.executable).parent)  # flower-superlink / flower-superexec are found on PATH
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def processes_matching(text: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def descendants(roots: list[int]) -> list[int]:
    """`roots` and every process under them, depth-first."""
    tree, pids, stack = _children(), [], list(roots)
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(tree.get(pid, []))
    return pids


def kill_tree(roots: list[int], grace: float = 10.0) -> None:
    """SIGTERM every process under `roots` (depth-first), then SIGKILL what is left after `grace` seconds."""
    pids = descendants(roots)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


def run_status(env: dict[str, str], connection: str | None = None) -> dict:
    """The latest run's `flwr ls` entry on `connection` (default: the managed local SuperLink)."""
    out = subprocess.run(["flwr", "ls", *([connection] if connection else []), "--format", "json"], cwd=PROJECT,
                         env=env, capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return {"status": "unknown", "status-details": out.stdout[-2000:] + out.stderr[-2000:]}
    return runs[-1] if runs else {"status": "unknown", "status-details": "flwr ls listed no run"}


def federation_config(clients: int, cpus_per_client: int = 1, gpus_per_client: float = 0.0) -> str:
    """Flower's simulation options: the SuperNodes and each ClientApp's Ray resources (a GPU share: Ray places
    1 / share ClientApps on each GPU; the ClientApp's `device` 'auto' then picks CUDA)."""
    fed = f"num-supernodes={clients} client-resources-num-cpus={cpus_per_client}"
    return fed + (f" client-resources-num-gpus={gpus_per_client}" if gpus_per_client > 0 else "")


def simulate(clients: int, run_config: str, cpus_per_client: int = 1, timeout: float = 7200,
             flwr_home: Path | None = None, log_path: Path | None = None, gpus_per_client: float = 0.0) -> dict:
    """Run one simulation; return the run's `flwr ls` entry (status 'finished:completed' on success). The run's
    stream goes to `log_path` if given, else to this process's stdout."""
    home = Path(flwr_home or tempfile.mkdtemp(prefix="fedxmr-flwr-"))
    env = flower_env(home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    fed = federation_config(clients, cpus_per_client, gpus_per_client)
    cmd = ["flwr", "run", ".", "--stream", "--federation-config", fed]
    if run_config:
        cmd += ["--run-config", run_config]
    try:
        if log_path is None:
            subprocess.run(cmd, cwd=PROJECT, env=env, timeout=timeout, check=False)
        else:
            with open(log_path, "w", encoding="utf-8") as log:
                subprocess.run(cmd, cwd=PROJECT, env=env, timeout=timeout, check=False, stdout=log,
                               stderr=subprocess.STDOUT)
        return run_status(env)
    finally:
        kill_tree(processes_matching(str(home / "local-superlink")))
        if flwr_home is None:
            shutil.rmtree(home, ignore_errors=True)


def preflight(run_config: str) -> list[str]:
    """What would fail the run, found before Flower starts (one line each): unknown keys, bad values, unusable
    paths (relative ones taken from the project, as the simulation sees them)."""
    from flwr.common.config import flatten_dict, get_project_config, parse_config_args

    from common.config import ConfigError, parse_run_config
    from common.preflight import path_problems

    defaults = flatten_dict(get_project_config(PROJECT)["tool"]["flwr"]["app"]["config"])
    try:
        overrides = parse_config_args([run_config]) if run_config.strip() else {}
    except Exception as exc:  # Flower's parser raises bare ValueErrors and TOML errors alike
        return [f"--run-config {run_config!r} cannot be parsed: {exc}"]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        return [f"unknown run config keys {unknown} (every key has a default in pyproject.toml)"]
    here = os.getcwd()
    os.chdir(PROJECT)
    try:
        return path_problems(parse_run_config(defaults | overrides))
    except ConfigError as exc:
        return [str(exc).replace("\n", " ")]
    finally:
        os.chdir(here)


def exit_on_signals(before_exit: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C (every `finally` runs: `subprocess.run` kills its child, `simulate`
    stops the managed SuperLink) and exit with 128 + the signal number. Without this, Python dies at once.
    `before_exit`: clean-up the main thread cannot reach by unwinding (e.g. simulations run by worker threads)."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
        if before_exit is not None:
            before_exit()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def main() -> None:
    exit_on_signals()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10, help="simulated SuperNodes (default 10)")
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="Ray CPUs (and torch threads) per ClientApp (default 1: as many actors as cores)")
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="Ray GPUs per ClientApp, e.g. 0.25: four ClientApps share a GPU (default 0: CPU only)")
    parser.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=5 lr=0.001"')
    parser.add_argument("--timeout", type=float, default=7200, help="seconds before the run is abandoned")
    parser.add_argument("--flwr-home", type=Path, default=None,
                        help="Flower's home for this run (default: a temporary directory, removed afterwards)")
    args = parser.parse_args()
    problems = preflight(args.run_config)
    if problems:
        print("\n".join(f"fedxmr: {p}" for p in problems), file=sys.stderr)
        sys.exit(2)
    status = simulate(args.clients, args.run_config, args.cpus_per_client, args.timeout, flwr_home=args.flwr_home,
                      gpus_per_client=args.gpus_per_client)
    print(f"run {status.get('run-id', '?')}: {status.get('status')}", flush=True)
    if status.get("status") != "finished:completed":
        print(status.get("status-details", ""), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
