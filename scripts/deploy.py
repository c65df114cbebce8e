"""Helpers of the deploy scripts (`deploy/*.sh`) that are easier in Python: a run's real status, and stopping
every process a deployment started, checking that none is left.

Every process the scripts start runs with FEDXMR_DEPLOY_DIR=<deploy dir> in its environment, and so does
everything it spawns (SuperExecs, ServerApp and ClientApp processes; the SuperLink starts its SuperExec in a new
session, so neither process groups nor a process tree whose root died catch them all). `stop` signals the process
ids in `<deploy dir>/pids` (SuperNodes first, then the SuperLink), waits, then SIGKILLs whatever still carries the
marker, and fails if anything is left.

    python -m scripts.deploy status --connection fedxmr      # exit 0 only if the latest run completed
    python -m scripts.deploy stop --deploy-dir .deploy
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from scripts.simulate import run_status

MARKER = "FEDXMR_DEPLOY_DIR"


def deploy_processes(deploy_dir: Path) -> list[int]:
    """Ids of the live processes started from `deploy_dir` (their environment carries the marker)."""
    tag = f"{MARKER}={Path(deploy_dir).resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(found)


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (exited, waiting for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait(deploy_dir: Path, pids: list[int], seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and (any(_alive(p) for p in pids) or deploy_processes(deploy_dir)):
        time.sleep(0.2)


def stop(deploy_dir: Path, grace: float = 15.0) -> list[int]:
    """Stop the deployment started from `deploy_dir`; return the ids that were signalled. Raises RuntimeError
    naming the processes that are still alive afterwards."""
    pid_dir = Path(deploy_dir) / "pids"
    files = sorted(pid_dir.glob("*.pid"), key=lambda f: f.name.startswith("superlink"))  # nodes first
    roots = []
    for pid_file in files:
        try:
            roots.append(int(pid_file.read_text().strip()))
        except ValueError:
            continue
    everything = sorted(p for p in set(roots) | set(deploy_processes(deploy_dir)) if _alive(p))
    for pid in roots:  # graceful: a node leaves the federation, the SuperLink stops its SuperExec
        _signal([pid], signal.SIGTERM)
    _wait(deploy_dir, roots, grace)
    _signal(deploy_processes(deploy_dir), signal.SIGTERM)  # orphans of a root that died earlier
    _wait(deploy_dir, [], grace / 3)
    _signal(deploy_processes(deploy_dir), signal.SIGKILL)
    _wait(deploy_dir, [], 5.0)
    left = [p for p in set(roots) | set(deploy_processes(deploy_dir)) if _alive(p)]
    if left:
        raise RuntimeError(f"still running after SIGKILL: {sorted(left)}")
    for pid_file in files:
        pid_file.unlink()
    return everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    status_p = sub.add_parser("status", help="print the latest run's status; exit 0 only if it completed")
    status_p.add_argument("--connection", required=True)
    status_p.add_argument("--wait", action="store_true",
                          help="poll until the run has finished (Flower's log stream can end while a run goes on)")
    stop_p = sub.add_parser("stop", help="stop every process started from a deploy directory")
    stop_p.add_argument("--deploy-dir", type=Path, required=True)
    stop_p.add_argument("--grace", type=float, default=15.0, help="seconds before SIGKILL (default 15)")
    args = parser.parse_args()
    if args.command == "status":
        run = run_status(dict(os.environ), args.connection)
        while args.wait and not str(run.get("status", "")).startswith("finished") and run.get("status") != "unknown":
            time.sleep(5)
            run = run_status(dict(os.environ), args.connection)
        print(json.dumps(run, indent=1))
        print(f"run {run.get('run-id', '?')}: {run.get('status')}", flush=True)
        sys.exit(0 if run.get("status") == "finished:completed" else 1)
    try:
        stopped = stop(args.deploy_dir, args.grace)
    except RuntimeError as exc:
        sys.exit(f"deploy stop: {exc}")
    print(f"stopped {len(stopped)} processes {stopped}; none left")


if __name__ == "__main__":
    main()
