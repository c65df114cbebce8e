"""Checks of a run's paths before anything is encoded or created (issue 12): the dataset folder, the feature cache,
the output folder and the run's own folder (an existing run is never written over; `resume` names a run dir with
a checkpoint that has not completed). Each problem is one line naming the key and the path; the ServerApp and `scripts.simulate`
refuse to start on any."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common.config import RunConfig
from common.data.datasets import check_data_dir
from common.data.split import DatasetError
from common.features import resolve_cache_dir

CHECKPOINT = "checkpoint.npz"  # in the run dir, rewritten after every round (fedxmr_server/strategies/state.py)


def _writable_dir(key: str, path: Path) -> str | None:
    """None if `path` is (or could be made) a directory we can write a file into; it is created if missing."""
    if path.exists() and not path.is_dir():
        return f"run config key {key!r}: {path} exists and is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"run config key {key!r}: cannot create or write into {path} ({exc.strerror or exc})"
    return None


def path_problems(cfg: RunConfig) -> list[str]:
    """Everything wrong with the run's paths, one line each (empty: good to go)."""
    problems = []
    try:
        check_data_dir(cfg.data_dir, cfg.data_keys)
    except DatasetError as exc:
        problems.append(f"run config key 'data-dir': {exc}")
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    problems += filter(None, [_writable_dir("cache-dir", resolve_cache_dir(cfg.cache_dir)),
                              _writable_dir("out-dir", out_dir)])
    if cfg.resume:
        return problems + resume_problems(Path(cfg.resume).expanduser().resolve(), cfg)
    run_dir = out_dir / cfg.run_name if cfg.run_name else None
    if run_dir is not None and any((run_dir / name).exists() for name in ("metrics.jsonl", "final.json")):
        problems.append(f"run config key 'run-name': {run_dir} already holds a run; pick another name, or continue "
                        f"it with resume='{run_dir}' (a run is never written over)")
    return problems


def resume_problems(run_dir: Path, cfg: RunConfig) -> list[str]:
    """Why `run_dir` cannot be resumed with `cfg` (empty: it can): it must hold a run's config (the same as `cfg`,
    but for `resume`) and a checkpoint, and must not have completed."""
    if not (run_dir / "config.json").is_file():
        return [f"run config key 'resume': {run_dir} holds no run (no config.json)"]
    if not (run_dir / CHECKPOINT).is_file():
        return [f"run config key 'resume': {run_dir} has no {CHECKPOINT} (it stopped before its first round "
                f"completed, or predates checkpoints); start it afresh under a new run-name"]
    saved = json.loads((run_dir / "config.json").read_text()).get("run", {})
    now = cfg.as_flat_dict()
    changed = sorted(k for k, v in now.items() if k != "resume" and saved.get(k) != v)
    if changed:
        return [f"run config key 'resume': {run_dir} was run with another config; keys that differ: "
                + ", ".join(f"{k} (was {saved.get(k)!r}, now {now[k]!r})" for k in changed[:6])]
    final = run_dir / "final.json"
    status = _status(final) if final.is_file() else "running"
    if status not in ("running", "failed"):
        return [f"run config key 'resume': {run_dir} has ended with status {status!r} (final.json); nothing to "
                f"resume"]
    return []


def _status(final: Path) -> str:
    try:
        return str(json.loads(final.read_text()).get("status", "completed"))
    except (OSError, ValueError):
        return "unreadable"
