"""Run a results grid (`grids/*.toml`, see scripts/grid_spec.py) and write its results file.

    python -m scripts.grid grids/flickr8k.toml [--jobs 1] [--only dirichlet] [--missing-only] [--results-only]

Each cell is one `flwr run .` simulation (scripts/simulate.py). A cell already finished with the same code version
and config is skipped, so an interrupted grid resumes where it stopped (a half-written cell is run again from
scratch); `--missing-only` runs only the cells with no finished record of their config at any code version (a grid filled over
several sessions; each record names the code it ran). A grid with a `records` folder copies each finished cell's small
files there, to be committed. Cells run `--jobs` at a time; one progress line per finished cell (done / total, elapsed, estimated
remaining). A failed cell is reported and the grid goes on; the exit status says whether every cell finished. At the
end, `scripts.results` writes the results file from every finished cell, with the grid's tables across grids
(`scripts.cross_table`), and its JSON twin beside it (`docs/NAME.json`, the same rows for scripts). SIGTERM and
SIGHUP stop the running cells and everything they started, as Ctrl-C does (exit 128 + the signal).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from scripts.grid_spec import (RECORD, Cell, Grid, GridError, code_version, has_result, head_commit, is_done, keep,
                               load_grid, run_config_text)
from scripts.results import screen_choices, undecided_screens

# (cell, run directory) -> (status, details): "finished:completed" on success
Runner = Callable[[Cell, Path], tuple[str, str]]


def simulate_cell(cell: Cell, run_dir: Path) -> tuple[str, str]:
    """Run one cell as a local simulation (one CPU and one thread per simulated client); its log goes to
    `<run dir>.log`."""
    from scripts.simulate import simulate

    config = {**cell.run_config, "out-dir": str(run_dir.parent), "run-name": run_dir.name}
    status = simulate(cell.clients, run_config_text(config), cpus_per_client=1,
                      log_path=run_dir.with_name(run_dir.name + ".log"))
    return status.get("status", "unknown"), status.get("status-details", "")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_grid(grid: Grid, code: str, commit: str, runner: Runner = simulate_cell, jobs: int = 1,
             only: str = "", missing_only: bool = False, log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every unfinished cell of `grid` (with `missing_only`: every cell without a finished record at any code
    version); returns counts of skipped, finished and failed cells. Methods with `sweep-seeds` run in two passes:
    their screen, then their other seeds at the value chosen on the screen's dev scores."""
    finished = (lambda c: has_result(grid, c)) if missing_only else (lambda c: is_done(grid, c, code))
    counts, tried = {"cells": 0, "skipped": 0, "finished": 0, "failed": 0}, set()
    while True:  # screens are chosen on cells finished by this run's rule (at this code version, unless missing-only)
        cells = [c for c in grid.cells(screen_choices(grid, finished)) if only in c.name]
        # seed by seed: an interrupted grid has every method with the same number of seeds
        todo = sorted((c for c in cells if not finished(c) and c.name not in tried), key=lambda c: c.seed)
        counts |= {"cells": len(cells), "skipped": sum(c.name not in tried for c in cells) - len(todo)}
        if not todo:
            break
        tried |= {c.name for c in todo}
        _run_cells(grid, code, commit, todo, runner, jobs, missing_only, counts, log)
    stuck = [name for name in undecided_screens(grid, finished) if only in name]
    if stuck:  # their other seeds cannot be listed: say so, and fail the grid's exit status
        log(f"screens without a dev score of their select-on metric in some cell, other seeds not run: {stuck}")
        counts["failed"] += len(stuck)
    return counts


def _run_cells(grid: Grid, code: str, commit: str, todo: list[Cell], runner: Runner, jobs: int, missing_only: bool,
               counts: dict[str, int], log: Callable[[str], None]) -> None:
    done_at = "with this config at any code version" if missing_only else f"at code {code}"
    log(f"grid {grid.path.name}: {counts['cells']} cells, {counts['skipped']} already finished {done_at}, "
        f"{len(todo)} to run, {jobs} at a time")
    start, durations = time.time(), []

    def one(cell: Cell) -> tuple[Cell, str, str, float]:
        run_dir = grid.out_dir / cell.name
        shutil.rmtree(run_dir, ignore_errors=True)  # a cell killed half-way starts again from nothing
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        status, details = runner(cell, run_dir)
        wall = time.time() - t0
        record = {"status": "finished" if status == "finished:completed" else "failed", "key": cell.key(code),
                  "code": code, "commit": commit, "cell": cell.name, "clients": cell.clients,
                  "run-config": cell.run_config, "wall-s": round(wall, 1), "flower-status": status}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECORD).write_text(json.dumps(record, indent=2))
        if record["status"] == "finished":
            keep(grid, cell)
        return cell, status, details, wall

    queue, running, done = list(todo), set(), 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while queue or running:
            while queue and len(running) < max(1, jobs):  # submit lazily: after Ctrl-C no new cell starts
                running.add(pool.submit(one, queue.pop(0)))
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                cell, status, details, wall = future.result()
                done += 1
                durations.append(wall)
                ok = status == "finished:completed"
                counts["finished" if ok else "failed"] += 1
                left = (len(todo) - done) * (sum(durations) / len(durations)) / max(1, min(jobs, len(todo)))
                log(f"[{counts['skipped'] + counts['finished'] + counts['failed']}/{counts['cells']}] {cell.name}: "
                    f"{'done' if ok else 'FAILED (' + status + ')'} in {wall:.0f} s · "
                    f"elapsed {_clock(time.time() - start)} · ~{_clock(left)} left")
                if not ok:
                    log(f"  {cell.name}: {details[-1500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="the grid file, e.g. grids/flickr8k.toml")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at the same time (default 1: on 2 cores one "
                        "10-client simulation already keeps both busy)")
    parser.add_argument("--only", default="", help="run only the cells whose name contains this text")
    parser.add_argument("--missing-only", action="store_true",
                        help="run only the cells with no finished record, whatever code version finished the others")
    parser.add_argument("--results-only", action="store_true",
                        help="only (re)write the results file and its JSON twin")
    args = parser.parse_args()
    from scripts.cross_table import check_tables, cross_tables
    from scripts.results import results_json, write_results
    from scripts.simulate import descendants, exit_on_signals, kill_tree

    # SIGTERM/SIGHUP: the cells' simulations run in worker threads, which unwinding the main thread does not reach:
    # stop every process this grid started (each cell's `flwr run` and what it started), then exit 128 + signal.
    exit_on_signals(lambda: kill_tree(descendants([os.getpid()])[1:], grace=5.0))

    try:
        grid = load_grid(args.grid)
        check_tables(grid)
        counts = {"failed": 0}
        if not args.results_only:
            counts = run_grid(grid, code_version(), head_commit(), jobs=args.jobs, only=args.only,
                                missing_only=args.missing_only)
            print(f"grid done: {counts}", flush=True)
        path = write_results(grid, appendix=cross_tables(grid))
    except GridError as exc:
        sys.exit(f"error: {exc}")
    print(f"results: {path}, {results_json(grid)}")
    sys.exit(1 if counts["failed"] else 0)


if __name__ == "__main__":
    main()
