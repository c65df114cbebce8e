"""The results grid: cells from a grid file, finished cells skipped on a rerun (resume), and the results writer on a
tiny fixture grid (mean ± std, the dev-chosen sweep value, significance marks, † for runs still improving, the JSON
twin of the tables). No simulation runs: a fake runner writes the files a run leaves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import scripts.grid
import scripts.simulate
from scripts.grid import run_grid
from scripts.grid_spec import Cell, GridError, load_grid, run_config_text
from scripts.cells import cell_numbers
from scripts.results import FOOTNOTE, format_mean_std, results_json, write_results

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
note = "Why the ceiling misses its target, in the grid file's words."
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


def fake_runner(calls: list[str], best: Callable[[Cell], int] = lambda cell: 2, num_rounds: int | None = None,
                extra: dict[str, Any] | None = None):
    """Writes what a finished run leaves: final.json and metrics.jsonl with known numbers, selected at round
    `best(cell)`; config.json with `num_rounds` rounds if given (else the rounds are the grid record's)."""

    def run(cell, run_dir: Path) -> tuple[str, str]:
        calls.append(cell.name)
        key = cell.method if not cell.variant else f"{cell.method}-{cell.variant['fedprox-mu']}"
        rsum = TEST_RSUM[(key, cell.seed)]
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = {"all-global-mean": rsum / 10, "all-global-worst": rsum / 20, "paired-global-mean": rsum / 10}
        (run_dir / "final.json").write_text(json.dumps({
            "best-round": best(cell), "dev": {"rsum": rsum - 10},
            "test": {"rsum": rsum, "hash_rsum": rsum - 50, "hash_map_i2t": 0.5, "hash_map_t2i": 0.4, **(extra or {})},
            "per-client": {"summary": summary}, "selected-on": "dev rsum"}))
        if num_rounds is not None:
            (run_dir / "config.json").write_text(json.dumps({"run": {"num-server-rounds": num_rounds}}))
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


def test_relative_data_and_cache_dirs_are_taken_from_the_project_wherever_the_grid_sets_them(tmp_path: Path) -> None:
    path = tmp_path / "paths.toml"
    text = GRID.format(out=tmp_path / "runs", results=tmp_path / "docs" / "RESULTS.md")
    text = text.replace('num-server-rounds = 2', 'num-server-rounds = 2\ncache-dir = ".cache/features"')
    text = text.replace('partitioner = "iid"', 'partitioner = "iid", data-dir = "../shared/data/flickr8k"')
    path.write_text(text)
    project = Path(scripts.grid.__file__).resolve().parents[1]
    for cell in load_grid(path).cells():
        assert cell.run_config["cache-dir"] == str(project / ".cache" / "features")
        assert cell.run_config["data-dir"] == str((project / "../shared/data/flickr8k").resolve())


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


def test_kept_records_outlive_the_run_directories_and_missing_only_runs_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "fixture.toml"
    text = GRID.format(out=tmp_path / "runs", results=tmp_path / "docs" / "RESULTS.md")
    path.write_text(text.replace('clients = 3', f'clients = 3\nrecords = "{tmp_path / "kept"}"'))
    grid = load_grid(path)
    calls: list[str] = []
    runner = fake_runner(calls)
    run_grid(grid, code="v1", commit="c1", runner=runner, only="fedavg", log=lambda _: None)
    kept = sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert kept == sorted(c.name for c in grid.cells() if c.method == "fedavg")
    assert {p.name for p in (tmp_path / "kept" / kept[0]).iterdir()} == {"cell.json", "final.json", "metrics.jsonl"}
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: no run directories, only the tracked records
    write_results(grid)
    rows = [r for r in json.loads((tmp_path / "docs" / "RESULTS.json").read_text())
            if r["method"] == "fedavg" and r["metric"] == "rsum"]
    assert rows and rows[0]["seeds"] == [200.0, 210.0, 205.0], "the table is written from the kept records"
    calls.clear()
    counts = run_grid(grid, code="v2", commit="c2", runner=runner, missing_only=True, log=lambda _: None)
    assert counts["skipped"] == 3 and sorted(calls) == sorted(c.name for c in grid.cells() if c.method != "fedavg"), \
        "missing-only keeps the cells finished at another code version and runs only those without a record"
    assert run_grid(grid, code="v2", commit="c2", runner=runner, log=lambda _: None)["finished"] == 3, \
        "without it, cells of another code version run again"
    path.write_text(path.read_text().replace("num-server-rounds = 2", "num-server-rounds = 3"))
    changed = run_grid(load_grid(path), code="v2", commit="c2", runner=runner, missing_only=True, log=lambda _: None)
    assert changed["skipped"] == 0, "a kept record of another config is no result for the changed cell"


def test_results_file_has_mean_and_sample_std_the_dev_chosen_sweep_value_and_marks(grid) -> None:
    run_grid(grid, code="v1", commit="c1", runner=fake_runner([]), log=lambda _: None)
    text = write_results(grid).read_text()
    fedavg = next(line for line in text.splitlines() if line.startswith("| fedavg † 3/3 |"))  # round 2 of 2
    assert "| 3/3 | 205.0 ± 5.0 |" in fedavg  # mean of 200, 210, 205; sample std 5.0
    assert "| 155.0 ± 5.0 |" in fedavg and "| 3.0 |" in fedavg  # 64-bit rsum; MB/round = (2e6 + 1e6) / 1e6
    prox = next(line for line in text.splitlines() if line.startswith("| fedprox ("))
    assert "fedprox-mu=0.1, chosen on dev" in prox
    assert f"{np.mean([230, 241, 236]):.1f} ± {np.std([230, 241, 236], ddof=1):.1f} ▲" in prox
    assert "| fedprox | fedprox-mu=0.01 † 3/3 | 3/3 |" in text  # the sweep table lists the other value
    diffs = np.array([230.0 - 200.0, 241.0 - 210.0, 236.0 - 205.0])  # the numbers behind fedprox's ▲
    t = diffs.mean() / (diffs.std(ddof=1) / np.sqrt(3))
    assert _table_row(text, "fedprox |")["test rsum"] == f"{diffs.mean():+.1f} (t {t:.1f}, 3)"
    assert (grid.results.parent / "RESULTS-a.png").exists()
    assert "| a.fedavg.seed0 | finished | c1 | v1 | 3 |" in text
    note = text.index("Why the ceiling misses its target, in the grid file's words.")
    assert text.index("## setting A") < note < text.index("| method |")  # the setting's note, above its table


def _table_row(text: str, prefix: str) -> dict[str, str]:
    """The first setting-table row whose label starts with `prefix`, as {column: entry}."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {prefix}"))
    head = next(lines[j] for j in range(i, -1, -1) if lines[j].startswith("| method |"))
    cells = lambda line: [part.strip() for part in line.strip("|").split("|")]  # noqa: E731
    return dict(zip(cells(head), cells(lines[i])))


def _records(grid) -> list[dict[str, Any]]:
    def strict(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(results_json(grid).read_text(), parse_constant=strict)


def test_results_json_records_match_the_table(grid) -> None:
    failed = "a.fedavg.seed2"
    runner = fake_runner([], extra={"hash_mapr_i2t": float("nan")})
    run_grid(grid, code="v1", commit="c1", log=lambda _: None,
             runner=lambda cell, run_dir: ("failed", "boom") if cell.name == failed else runner(cell, run_dir))
    text = write_results(grid).read_text()
    assert results_json(grid) == grid.results.parent / "RESULTS.json"
    records = _records(grid)
    assert [p.name for p in grid.results.parent.iterdir() if p.name.endswith(".tmp")] == []  # written atomically
    keys = {"setting", "method", "metric", "mean", "std", "seeds", "seed_ids", "still_improving",
            "still_improving_seeds"}
    assert all(set(r) == keys for r in records)
    # one record per table row (the chosen sweep value) and final.json metric, in table order, metrics sorted
    rows = list(dict.fromkeys((r["setting"], r["method"]) for r in records))
    assert rows == [("a", "fedavg"), ("a", "fedprox (fedprox-mu=0.1, chosen on dev)")]
    for row in rows:
        metrics = [r["metric"] for r in records if (r["setting"], r["method"]) == row]
        assert metrics == sorted(metrics) and {"rsum", "hash_rsum", "hash_map_i2t", "dev_rsum", "all-global-mean",
                                               "all-global-worst", "selected_round"} <= set(metrics)
    by = {(r["method"].split()[0], r["metric"]): r for r in records}
    assert by[("fedavg", "rsum")]["seeds"] == [200.0, 210.0, None] and by[("fedavg", "rsum")]["seed_ids"] == [0, 1, 2]
    assert by[("fedavg", "rsum")]["mean"] == 205.0 and by[("fedavg", "rsum")]["std"] == pytest.approx(np.sqrt(50))
    assert by[("fedprox", "rsum")]["seeds"] == [230.0, 241.0, 236.0]
    assert by[("fedprox", "hash_mapr_i2t")]["seeds"] == [None] * 3 and by[("fedprox", "hash_mapr_i2t")]["mean"] is None
    assert by[("fedavg", "selected_round")]["seeds"] == [2, 2, None]
    # the table's entries are the records' mean ± std over the same per-seed values
    columns = {"rsum": "test rsum", "hash_rsum": "Hamming rsum", "hash_map_i2t": "MAP@all i2t",
               "all-global-mean": "client mean", "all-global-worst": "client worst", "paired-global-mean": "paired"}
    for label in ("fedavg", "fedprox"):
        row = _table_row(text, label)
        for metric, column in columns.items():
            record = by[(label, metric)]
            assert row[column].startswith(f"{record['mean']:.{3 if 'MAP' in column else 1}f} ± ")
            finished = [v for v in record["seeds"] if v is not None]  # the JSON lists unfinished seeds as None
            assert row[column].split(" ▲")[0] == format_mean_std(column, finished)
    assert _table_row(text, "fedavg")["seeds"] == "2/3"
    before = results_json(grid).read_bytes()
    write_results(grid)
    assert results_json(grid).read_bytes() == before  # deterministic


def test_a_cell_selected_in_the_last_fifth_of_its_rounds_is_marked(tmp_path: Path) -> None:
    path = tmp_path / "late.toml"
    path.write_text(GRID.format(out=tmp_path / "runs", results=tmp_path / "docs" / "LATE.md")
                    .replace("num-server-rounds = 2", "num-server-rounds = 10"))
    grid = load_grid(path)
    # fedprox mu=0.1 (the chosen value): round 9 of 10 is late, 8 of 10 (= 0.8 x 10) and 5 of 10 are not
    late = {("fedprox", 0.1): [9, 5, 8], ("fedprox", 0.01): [10, 10, 10], ("fedavg", None): [5, 5, 5]}
    best = lambda cell: late[(cell.method, cell.variant.get("fedprox-mu"))][cell.seed]  # noqa: E731
    run_grid(grid, code="v1", commit="c1", runner=fake_runner([], best, num_rounds=10), log=lambda _: None)
    numbers = {c.name: cell_numbers(grid.out_dir / c.name) for c in grid.cells()}
    assert numbers["a.fedprox.fedprox-mu-0.1.seed0"]["still-improving"] is True  # round 9 of 10
    assert numbers["a.fedavg.seed0"]["still-improving"] is False  # round 5 of 10
    assert numbers["a.fedprox.fedprox-mu-0.1.seed2"]["still-improving"] is False  # round 8 of 10
    text = write_results(grid).read_text()
    assert "| fedavg | 3/3 |" in text
    assert "| fedprox (fedprox-mu=0.1, chosen on dev) † 1/3 | 3/3 |" in text
    assert "| fedprox | fedprox-mu=0.01 † 3/3 | 3/3 |" in text  # the sweep table too
    assert text.count(FOOTNOTE) == 1 and FOOTNOTE.startswith("† n/m: the selected round was in the last fifth")
    records = _records(grid)
    assert {(r["method"], r["still_improving"], r["still_improving_seeds"]) for r in records} == {
        ("fedavg", False, 0), ("fedprox (fedprox-mu=0.1, chosen on dev)", True, 1)}
    assert next(r for r in records if r["method"] == "fedavg" and r["metric"] == "selected_round")["seeds"] == [5] * 3

    # no run selected late: no mark, no footnote; without config.json the rounds are the grid record's (10)
    run_grid(grid, code="v2", commit="c2", runner=fake_runner([], lambda cell: 8), log=lambda _: None)
    assert not (grid.out_dir / "a.fedavg.seed0" / "config.json").exists()
    text = write_results(grid).read_text()
    assert "†" not in text and not any(r["still_improving"] for r in _records(grid))


def test_results_only_rewrites_the_json(grid, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run_grid(grid, code="v1", commit="c1", runner=fake_runner([]), log=lambda _: None)
    results_json(grid).parent.mkdir(parents=True, exist_ok=True)
    results_json(grid).write_text("stale {")
    monkeypatch.setattr("sys.argv", ["scripts.grid", str(grid.path), "--results-only"])
    monkeypatch.setattr(scripts.simulate, "exit_on_signals", lambda _: None)

    def no_cells(*args: object, **kwargs: object) -> dict[str, int]:
        raise AssertionError("a cell ran")

    monkeypatch.setattr(scripts.grid, "run_grid", no_cells)
    with pytest.raises(SystemExit) as exit_info:
        scripts.grid.main()
    assert exit_info.value.code == 0
    assert str(results_json(grid)) in capsys.readouterr().out
    records = _records(grid)
    assert len({(r["setting"], r["method"]) for r in records}) == 2 and all(r["seed_ids"] == [0, 1, 2] for r in records)
    assert grid.results.exists()


def test_run_config_text_and_bad_grids(tmp_path: Path) -> None:
    assert run_config_text({"a": 1, "b": "x y", "c": True, "d": 0.1}) == "a=1 b='x y' c=true d=0.1"
    bad = tmp_path / "bad.toml"
    bad.write_text('title = "t"\nseeds = [0]\n[settings.a]\n[[methods]]\nname = "fedavg"\nsettings = ["b"]\n')
    with pytest.raises(GridError, match="unknown settings"):
        load_grid(bad)
    bad.write_text('title = "t"\nseeds = [0]\n[run-config]\nseed = 3\n[settings.a]\n[[methods]]\nname = "x"\n')
    with pytest.raises(GridError, match="'seed' is set by the grid"):
        load_grid(bad)
    bad.write_text('title = "t"\nseeds = [0]\n[settings.a]\n[[methods]]\nname = "fedavg"\nlabel = "fedavg ε=8"\n')
    with pytest.raises(GridError, match="only letters, digits"):  # a label becomes a run name: refused before a run
        load_grid(bad)


def test_sweep_seeds_screen_each_value_then_run_the_other_seeds_at_the_value_chosen_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fixture.toml"
    text = GRID.format(out=tmp_path / "runs", results=tmp_path / "docs" / "RESULTS.md")
    path.write_text(text + "sweep-seeds = [0]\n")
    grid = load_grid(path)
    # mu=0.01 wins the screen (seed 0) but would lose a mean over all the seeds it then runs (210 against 230)
    monkeypatch.setitem(TEST_RSUM, ("fedprox-0.01", 0), 250.0)
    assert sorted(c.name for c in grid.cells() if c.method == "fedprox") == [
        "a.fedprox.fedprox-mu-0.01.seed0", "a.fedprox.fedprox-mu-0.1.seed0"], "before the screen: only the screen"
    calls: list[str] = []
    counts = run_grid(grid, code="v1", commit="c1", runner=fake_runner(calls), log=lambda _: None)
    prox = [name for name in calls if ".fedprox." in name]
    assert prox[:2] == ["a.fedprox.fedprox-mu-0.01.seed0", "a.fedprox.fedprox-mu-0.1.seed0"]
    assert sorted(prox[2:]) == ["a.fedprox.fedprox-mu-0.01.seed1", "a.fedprox.fedprox-mu-0.01.seed2"]
    assert counts == {"cells": 3 + 4, "skipped": 0, "finished": 7, "failed": 0}
    assert run_grid(grid, code="v1", commit="c1", runner=fake_runner(calls), log=lambda _: None)["skipped"] == 7
    row = next(line for line in write_results(grid).read_text().splitlines() if line.startswith("| fedprox ("))
    assert "fedprox-mu=0.01, chosen on dev" in row and "| 3/3 |" in row


def test_sweep_seeds_must_be_seeds_of_a_swept_method(tmp_path: Path) -> None:
    path = tmp_path / "fixture.toml"
    text = GRID.format(out=tmp_path / "runs", results=tmp_path / "docs" / "RESULTS.md")
    for bad in ("sweep-seeds = [7]\n", "sweep-seeds = []\n"):
        path.write_text(text + bad)
        with pytest.raises(GridError, match="sweep-seeds"):
            load_grid(path)
    path.write_text(text.replace('name = "fedavg"\n', 'name = "fedavg"\nsweep-seeds = [0]\n'))
    with pytest.raises(GridError, match="needs a sweep"):
        load_grid(path)


def test_a_value_reported_by_fewer_seeds_than_finished_says_so() -> None:
    assert format_mean_std("test rsum", [200.0, 210.0, 205.0]) == "205.0 ± 5.0"
    assert format_mean_std("test rsum", [200.0, None, 210.0], "▲") == "205.0 ± 7.1 (2/3) ▲"
    assert format_mean_std("client MAP i2t", [None, None, 0.5891]) == "0.589 (1/3)", "one seed: no ± 0.000"
    assert format_mean_std("test rsum", [None, None]) == "–"


@pytest.mark.parametrize("metric", ["rsum", "map", "hash-map"])
@pytest.mark.parametrize("global_model", [True, False])
def test_a_swept_value_is_chosen_on_the_metric_the_run_selected_its_round_on(metric: str, global_model: bool) -> None:
    from fedxmr_server.app import _selected_on
    from scripts.cells import SELECTED_BY, selection_score

    words = _selected_on(metric, global_model)
    assert words in SELECTED_BY, "every way the server words its selection must be readable here"
    dev = {"rsum": 150.0, "emb_smap_i2t": 0.66, "emb_smap_t2i": 0.64, "hash_smap_i2t": 0.62, "hash_smap_t2i": 0.60}
    summary = {"all-global-mean": 15.0, "all-global-smap_i2t-mean": 0.58, "all-global-smap_t2i-mean": 0.56}
    final = {"selected-on": words, "dev": dev if global_model else {}}
    score = selection_score(final, {"client-dev": {"summary": summary}})
    expected = ({"rsum": 150.0, "map": 0.65, "hash-map": 0.61} if global_model
                else {"rsum": 15.0, "map": 0.57, "hash-map": 0.57})[metric]
    assert score == pytest.approx(expected)
    assert selection_score({"dev": dev}, {}) == 150.0, "records from before `selected-on`: dev rsum"


def _screened_grid(tmp_path: Path):
    path = tmp_path / "fixture.toml"
    path.write_text(GRID.format(out=tmp_path / "runs", results=tmp_path / "docs" / "RESULTS.md") + "sweep-seeds = [0]\n")
    return load_grid(path)


def test_a_new_code_version_screens_again_before_it_runs_any_other_seed(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    grid = _screened_grid(tmp_path)
    run_grid(grid, code="v1", commit="c1", runner=fake_runner([]), log=lambda _: None)  # v1 chooses mu=0.1
    monkeypatch.setitem(TEST_RSUM, ("fedprox-0.01", 0), 250.0)  # at v2 the screen flips to mu=0.01
    calls: list[str] = []
    counts = run_grid(grid, code="v2", commit="c2", runner=fake_runner(calls), log=lambda _: None)
    prox = [name for name in calls if ".fedprox." in name]
    assert sorted(prox) == sorted(["a.fedprox.fedprox-mu-0.01.seed0", "a.fedprox.fedprox-mu-0.1.seed0",
                                   "a.fedprox.fedprox-mu-0.01.seed1", "a.fedprox.fedprox-mu-0.01.seed2"]), \
        "no other seed may run at the old code's choice"
    assert counts == {"cells": 7, "skipped": 0, "finished": 7, "failed": 0}


def test_a_screen_cell_without_a_dev_score_fails_the_grid_and_the_results_still_write(tmp_path: Path) -> None:
    grid = _screened_grid(tmp_path)
    runner = fake_runner([])

    def no_dev_for_mu_01(cell, run_dir):
        status = runner(cell, run_dir)
        if cell.variant.get("fedprox-mu") == 0.1:
            final = json.loads((run_dir / "final.json").read_text())
            (run_dir / "final.json").write_text(json.dumps({**final, "dev": {}, "selected-on": "dev Hamming label MAP"}))
        return status

    lines: list[str] = []
    counts = run_grid(grid, code="v1", commit="c1", runner=no_dev_for_mu_01, log=lines.append)
    assert counts["failed"] == 1 and any("a.fedprox" in line and "not run" in line for line in lines)
    from scripts.results import screen_choices
    assert not any(c.method == "fedprox" and c.seed > 0 for c in grid.cells(screen_choices(grid))), "no choice made"
    write_results(grid)  # a None dev score must not break the tables
