"""The results grid: cells from a grid file, finished cells skipped on a rerun (resume), and the results writer on a
tiny fixture grid (mean ± std, the dev-chosen sweep value, significance marks). No simulation runs: a fake runner
writes the files a run leaves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.grid import run_grid
from scripts.grid_spec import GridError, load_grid, run_config_text
from scripts.results import mean_std, paired_mark, write_results

GRID = """
title = "fixture grid"
clients = 3
seeds = [0, 1, 2]
out-dir = "{out}"
results = "{results}"
[run-config]
num-server-rounds = 2
[settings.a]
title = "setting A"
run-config = {{ partitioner = "iid" }}
[[methods]]
name = "fedavg"
[[methods]]
name = "fedprox"
sweep = {{ fedprox-mu = [0.01, 0.1] }}
"""

# test rsum per (method, variant, seed); dev = test - 10 (fedprox mu=0.1 has the better dev)
TEST_RSUM = {("fedavg", 0): 200.0, ("fedavg", 1): 210.0, ("fedavg", 2): 205.0,
             ("fedprox-0.01", 0): 190.0, ("fedprox-0.01", 1): 195.0, ("fedprox-0.01", 2): 185.0,
             ("fedprox-0.1", 0): 230.0, ("fedprox-0.1", 1): 241.0, ("fedprox-0.1", 2): 236.0}


@pytest.fixture()
def grid(tmp_path: Path):
    path = tmp_path / "fixture.toml"
    path.write_text(GRID.format(out=tmp_path / "runs", results=tmp_path / "docs" / "RESULTS.md"))
    return load_grid(path)


def fake_runner(calls: list[str]):
    """Writes what a finished run leaves: final.json and metrics.jsonl with known numbers."""

    def run(cell, run_dir: Path) -> tuple[str, str]:
        calls.append(cell.name)
        key = cell.method if not cell.variant else f"{cell.method}-{cell.variant['fedprox-mu']}"
        rsum = TEST_RSUM[(key, cell.seed)]
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = {"all-global-mean": rsum / 10, "all-global-worst": rsum / 20, "paired-global-mean": rsum / 10}
        (run_dir / "final.json").write_text(json.dumps({
            "best-round": 2, "dev": {"rsum": rsum - 10}, "test": {"rsum": rsum, "hash_rsum": rsum - 50,
                                                                  "hash_map_i2t": 0.5, "hash_map_t2i": 0.4},
            "per-client": {"summary": summary}}))
        rounds = [{"round": r, "dev": {"rsum": rsum - 10 * (3 - r)}, "train": {"download-bytes": 2e6,
                                                                               "upload-bytes": 1e6}}
                  for r in (1, 2)]
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds) + "\n")
        return "finished:completed", ""

    return run


def test_cells_cover_methods_sweeps_and_seeds(grid) -> None:
    cells = grid.cells()
    assert len(cells) == 3 + 2 * 3
    prox = [c for c in cells if c.method == "fedprox"]
    assert {(c.variant["fedprox-mu"], c.seed) for c in prox} == {(m, s) for m in (0.01, 0.1) for s in (0, 1, 2)}
    assert prox[0].run_config == {"num-server-rounds": 2, "partitioner": "iid", "method": "fedprox",
                                  "fedprox-mu": 0.01, "seed": 0}
    assert len({c.name for c in cells}) == len(cells)


def test_a_rerun_skips_finished_cells_and_resumes_an_interrupted_grid(grid) -> None:
    calls: list[str] = []
    runner = fake_runner(calls)

    interrupted = []

    def dies_after_four(cell, run_dir):
        if len(calls) == 4 and not interrupted:
            interrupted.append(cell.name)
            raise KeyboardInterrupt  # killed mid-grid, after 4 cells finished
        return runner(cell, run_dir)

    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, code="v1", commit="c1", runner=dies_after_four, log=lambda _: None)
    assert len(calls) == 4, "no cell may start after the interrupt"
    counts = run_grid(grid, code="v1", commit="c1", runner=runner, log=lambda _: None)
    assert counts == {"cells": 9, "skipped": 4, "finished": 5, "failed": 0} and len(calls) == 9
    assert run_grid(grid, code="v1", commit="c2", runner=runner, log=lambda _: None)["skipped"] == 9
    assert run_grid(grid, code="v2", commit="c3", runner=runner, log=lambda _: None)["finished"] == 9, \
        "a new code version reruns every cell"


def test_a_failed_cell_is_not_finished_and_runs_again(grid) -> None:
    calls: list[str] = []
    runner = fake_runner(calls)
    fail_once = {grid.cells()[0].name}

    def flaky(cell, run_dir):
        if cell.name in fail_once:
            fail_once.clear()
            return "finished:failed", "boom"
        return runner(cell, run_dir)

    assert run_grid(grid, code="v1", commit="c1", runner=flaky, log=lambda _: None)["failed"] == 1
    assert run_grid(grid, code="v1", commit="c1", runner=runner, log=lambda _: None)["finished"] == 1


def test_results_file_has_mean_and_sample_std_the_dev_chosen_sweep_value_and_marks(grid) -> None:
    run_grid(grid, code="v1", commit="c1", runner=fake_runner([]), log=lambda _: None)
    text = write_results(grid).read_text()
    fedavg = next(line for line in text.splitlines() if line.startswith("| fedavg |"))
    assert "| 3/3 | 205.0 ± 5.0 |" in fedavg  # mean of 200, 210, 205; sample std 5.0
    assert "| 155.0 ± 5.0 |" in fedavg and "| 3.0 |" in fedavg  # 64-bit rsum; MB/round = (2e6 + 1e6) / 1e6
    prox = next(line for line in text.splitlines() if line.startswith("| fedprox ("))
    assert "fedprox-mu=0.1, chosen on dev" in prox
    assert f"{np.mean([230, 241, 236]):.1f} ± {np.std([230, 241, 236], ddof=1):.1f} ▲" in prox
    assert "| fedprox | fedprox-mu=0.01 | 3/3 |" in text  # the sweep table lists the other value
    assert (grid.results.parent / "RESULTS-a.png").exists()
    assert "| a.fedavg.seed0 | finished | c1 | v1 | 3 |" in text


def test_mean_std_and_paired_mark() -> None:
    assert mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(np.sqrt(2)), 2)
    assert mean_std([4.0])[1:] == (0.0, 1)
    assert paired_mark({0: 10.0, 1: 20.0, 2: 30.0}, {0: 9.0, 1: 19.2, 2: 28.9}) == "▲"  # consistently above
    assert paired_mark({0: 10.0, 1: 20.0, 2: 30.0}, {0: 12.0, 1: 17.0, 2: 31.0}) == ""  # within the noise
    assert paired_mark({0: 1.0}, {0: 2.0}) == "?"


def test_run_config_text_and_bad_grids(tmp_path: Path) -> None:
    assert run_config_text({"a": 1, "b": "x y", "c": True, "d": 0.1}) == "a=1 b='x y' c=true d=0.1"
    bad = tmp_path / "bad.toml"
    bad.write_text('title = "t"\nseeds = [0]\n[settings.a]\n[[methods]]\nname = "fedavg"\nsettings = ["b"]\n')
    with pytest.raises(GridError, match="unknown settings"):
        load_grid(bad)
    bad.write_text('title = "t"\nseeds = [0]\n[run-config]\nseed = 3\n[settings.a]\n[[methods]]\nname = "x"\n')
    with pytest.raises(GridError, match="'seed' is set by the grid"):
        load_grid(bad)
