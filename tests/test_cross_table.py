"""Tables across results grids (scripts/cross_table.py) on two tiny fixture grids: entries from the first source
that lists a row, the fallback source for a row the first lacks, marks only within one setting, unfinished seeds
counted, paths relative to the project, and bad specs refused (named) before any cell runs. No simulation runs: a
fake runner writes what a run leaves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import scripts.cross_table
import scripts.grid
import scripts.simulate
from scripts.cross_table import check_tables, cross_tables
from scripts.grid import run_grid
from scripts.grid_spec import Grid, GridError, load_grid
from scripts.results import write_results

BITS = """
title = "bits grid"
clients = 2
seeds = [0, 1, 2]
out-dir = "{out}"
results = "{out}/BITS.md"
[settings.b16]
run-config = {{ hash-bits = 16 }}
[settings.central]
run-config = {{ hash-bits = 16 }}
[[methods]]
name = "fedavg"
settings = ["b16"]
[[methods]]
name = "fedcafe"
settings = ["b16"]
[[methods]]
name = "moon"
settings = ["b16"]
[[methods]]
name = "centralized"
settings = ["central"]
clients = 1
"""

MAIN = """
title = "main grid"
clients = 2
seeds = [0, 1, 2]
out-dir = "{out}"
results = "{out}/RESULTS.md"
[settings.b32]
run-config = {{ hash-bits = 32 }}
[[methods]]
name = "fedavg"
[[methods]]
name = "fedcafe"
[[tables]]
title = "MAP by code length"
rows = ["centralized", "fedavg", "fedcafe", "moon", "plfedcmh"]
metrics = ["std MAP i2t"]
[[tables.groups]]
title = "16 bits"
from = ["{bits}:b16", "{bits}:central"]
[[tables.groups]]
title = "32 bits"
from = ["{main}:b32", "{bits}:b16"]
"""

# std MAP i2t per (method, bits, seed): fedcafe is above fedavg at 16 bits on every seed, within the noise at 32
MAP = {("fedavg", 16): [0.50, 0.52, 0.51], ("fedcafe", 16): [0.55, 0.571, 0.56], ("centralized", 16): [0.7, 0.7, 0.7],
       ("fedavg", 32): [0.60, 0.62, 0.61], ("fedcafe", 32): [0.63, 0.59, 0.62]}


def fake_runner(skip: frozenset[str] = frozenset(),
                improving: frozenset[str] = frozenset()) -> Callable[..., tuple[str, str]]:
    """Cells selected at round 1 of 5; those in `improving` at round 5 of 5 (still improving)."""

    def run(cell, run_dir: Path) -> tuple[str, str]:
        if cell.name in skip or cell.method == "moon":  # moon: listed, never finishes
            return "failed", "left unfinished by the test"
        value = MAP[(cell.method, cell.run_config["hash-bits"])][cell.seed]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "final.json").write_text(json.dumps({
            "best-round": 5 if cell.name in improving else 1, "dev": {"rsum": 1.0},
            "test": {"rsum": 100.0, "hash_smap_i2t": value}}))
        (run_dir / "config.json").write_text(json.dumps({"run": {"num-server-rounds": 5}}))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "dev": {"rsum": 1.0}}) + "\n")
        return "finished:completed", ""

    return run


def _grids(tmp_path: Path, main_text: str = MAIN) -> tuple[Grid, Grid]:
    bits_path, main_path = tmp_path / "bits.toml", tmp_path / "main.toml"
    bits_path.write_text(BITS.format(out=tmp_path / "runs-bits"))
    main_path.write_text(main_text.format(out=tmp_path / "runs-main", bits=bits_path, main=main_path))
    return load_grid(bits_path), load_grid(main_path)


def _row(text: str, label: str) -> list[str]:
    """The label's row of the cross table (the grid's own tables come before it)."""
    table = text[text.index("## MAP by code length"):]
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [part.strip() for part in line.strip("|").split("|")]


def test_entries_come_from_the_named_grids_with_marks_and_the_fallback_source(tmp_path: Path) -> None:
    bits, main = _grids(tmp_path)
    run_grid(bits, code="v1", commit="c1", runner=fake_runner(frozenset({"b16.fedcafe.seed2"})), log=lambda _: None)
    run_grid(main, code="v2", commit="c2", runner=fake_runner(), log=lambda _: None)
    text = write_results(main, appendix=cross_tables(main)).read_text()

    assert text.index("## MAP by code length") < text.index("## Cells")
    assert f"refresh with `python -m scripts.grid {main.path} --results-only`" in text
    fedavg16 = MAP[("fedavg", 16)]
    # 32 bits: main:b32 is the first source, so its cells win over bits:b16, which lists fedavg too
    assert _row(text, "fedavg")[1:] == [f"{np.mean(fedavg16):.3f} ± {np.std(fedavg16, ddof=1):.3f}",
                                        f"{np.mean(MAP[('fedavg', 32)]):.3f} ± 0.010"]
    fedcafe16 = MAP[("fedcafe", 16)][:2]  # seed 2 did not finish: two seeds, counted, still paired with fedavg
    assert _row(text, "fedcafe")[1] == (f"{np.mean(fedcafe16):.3f} ± {np.std(fedcafe16, ddof=1):.3f} ▲ (2/3)")
    assert "▲" not in _row(text, "fedcafe")[2] and "▼" not in _row(text, "fedcafe")[2]  # within the noise at 32
    # from the fallback source, another setting than fedavg's: no paired mark; absent at 32 bits
    assert _row(text, "centralized")[1:] == ["0.700 ± 0.000", "–"]
    assert _row(text, "moon")[1:] == ["– (0/3)", "– (0/3)"]  # listed in bits:b16 (the 32-bit fallback too)
    assert _row(text, "plfedcmh")[1:] == ["–", "–"]  # in no source
    assert (f"- 16 bits: centralized ← `{bits.path}:central` (v1); fedavg, fedcafe, moon ← `{bits.path}:b16` (v1); "
            "in no source: plfedcmh") in text
    assert (f"- 32 bits: fedavg, fedcafe ← `{main.path}:b32` (v2); moon ← `{bits.path}:b16` (none finished); "
            "in no source: centralized, plfedcmh") in text


def test_an_entry_with_a_run_still_improving_is_marked(tmp_path: Path) -> None:
    bits, main = _grids(tmp_path)
    run_grid(bits, code="v1", commit="c1", runner=fake_runner(improving=frozenset({"b16.fedcafe.seed0"})),
             log=lambda _: None)
    run_grid(main, code="v2", commit="c2", runner=fake_runner(), log=lambda _: None)
    text = write_results(main, appendix=cross_tables(main)).read_text()
    assert _row(text, "fedcafe")[1].endswith(" ▲ † 1/3")  # 16 bits: seed 0 selected at round 5 of 5
    assert "†" not in _row(text, "fedcafe")[2] and "†" not in "".join(_row(text, "fedavg"))
    assert "† k/n: in k of the n finished seeds the selected round was in the last fifth" in text
    assert "† n/m: the selected round" not in text  # the grid's own tables have no mark: no footnote of theirs


def test_a_screened_row_shows_the_value_its_screen_chose_over_all_seeds(tmp_path: Path) -> None:
    """fedcafe screened on seed 0 over two learning rates: lr 1e-3, the first value listed, wins on dev, so its entry
    is lr 1e-3 on all three seeds (the losing value's seed-0 cell is left out); before the screen has finished there is
    no number."""
    bits_text = BITS.replace('name = "fedcafe"\nsettings = ["b16"]', 'name = "fedcafe"\nsettings = ["b16"]\n'
                             'sweep = {{ lr = [0.001, 0.0003] }}\nsweep-seeds = [0]')
    bits, main = _grids(tmp_path)
    bits.path.write_text(bits_text.format(out=tmp_path / "runs-bits"))
    bits = load_grid(bits.path)
    base = fake_runner()

    def lr_matters(cell, run_dir: Path) -> tuple[str, str]:
        status = base(cell, run_dir)
        if cell.variant.get("lr") == 0.001:  # better on dev, and 0.1 higher on test
            final = json.loads((run_dir / "final.json").read_text())
            final["dev"]["rsum"], final["test"]["hash_smap_i2t"] = 2.0, final["test"]["hash_smap_i2t"] + 0.1
            (run_dir / "final.json").write_text(json.dumps(final))
        return status

    assert _row("\n".join(cross_tables(main)), "fedcafe")[1] == "–", "screen not run: no number, no error"
    run_grid(bits, code="v1", commit="c1", runner=lr_matters, log=lambda _: None)
    text = "\n".join(cross_tables(load_grid(main.path)))
    chosen = [v + 0.1 for v in MAP[("fedcafe", 16)]]
    assert _row(text, "fedcafe")[1] == f"{np.mean(chosen):.3f} ± {np.std(chosen, ddof=1):.3f} ▲"  # paired with fedavg


def test_sources_are_relative_to_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scripts.cross_table, "PROJECT", tmp_path)
    bits, main = _grids(tmp_path, MAIN.replace("{bits}", "bits.toml").replace("{main}", "main.toml"))
    run_grid(bits, code="v1", commit="c1", runner=fake_runner(), log=lambda _: None)
    text = "\n".join(cross_tables(main))
    assert "centralized ← `bits.toml:central` (v1)" in text and "0.700 ± 0.000" in text


def test_a_grid_without_tables_adds_nothing(tmp_path: Path) -> None:
    bits, _ = _grids(tmp_path)
    assert bits.tables == [] and cross_tables(bits) == []


@pytest.mark.parametrize(("change", "message"), [
    (('metrics = ["std MAP i2t"]', 'metrics = ["MAP@64"]'), "tables\\[0\\]: unknown metrics \\['MAP@64'\\]"),
    (('metrics = ["std MAP i2t"]', 'metrics = "std MAP i2t"'), "'metrics' must be a non-empty list of strings"),
    (('"{bits}:central"', '"{bits}:nowhere"'), "group '16 bits'.*has no setting 'nowhere'"),
    (('"{bits}:central"', '"{bits}"'), "is not 'grid-file:setting'"),
    (('"{bits}:central"', '"{main}.missing:central"'), "group '16 bits'.*main.toml.missing.*No such file"),
    (('rows = ["centralized", "fedavg", "fedcafe", "moon", "plfedcmh"]\n', ''), "key 'rows' is missing"),
    (('"moon", "plfedcmh"]', '"moon", "moon"]'), "'rows' names a label twice"),
    (('title = "32 bits"', 'title = "16 bits"'), "two groups have the same title"),
    (('metrics = ["std MAP i2t"]', 'metrics = ["std MAP i2t"]\nbaseline = "fedprox"'),
     "baseline 'fedprox' is not one of the rows"),
    (('metrics = ["std MAP i2t"]', 'metrics = ["std MAP i2t"]\nbasline = "moon"'), "unknown keys \\['basline'\\]"),
    (('[[tables.groups]]\ntitle = "32 bits"\nfrom = ["{main}:b32", "{bits}:b16"]\n', ''), None),  # fine alone
])
def test_a_bad_table_is_refused_before_any_cell_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    change: tuple[str, str], message: str | None) -> None:
    _, main = _grids(tmp_path, MAIN.replace(*change))
    monkeypatch.setattr("sys.argv", ["scripts.grid", str(main.path)])
    monkeypatch.setattr(scripts.simulate, "exit_on_signals", lambda _: None)

    def no_cells(*args: object, **kwargs: object) -> dict[str, int]:
        raise AssertionError("a cell ran")

    monkeypatch.setattr(scripts.grid, "run_grid", no_cells)
    if message is None:  # a good spec reaches the cells
        with pytest.raises(AssertionError, match="a cell ran"):
            scripts.grid.main()
        return
    with pytest.raises(SystemExit, match=message):
        scripts.grid.main()


def test_a_swept_row_and_single_group_table_are_refused(tmp_path: Path) -> None:
    _, main = _grids(tmp_path, MAIN.replace('[[tables.groups]]\ntitle = "32 bits"', '[tables.groups.x]\ntitle = "x"')
                     .replace('[[tables.groups]]', '[tables.groups]', 1))
    with pytest.raises(GridError, match="'groups' must be an array of tables"):
        check_tables(main)
    bits_text = BITS.replace('name = "fedcafe"\nsettings = ["b16"]', 'name = "fedcafe"\nsettings = ["b16"]\n'
                             'sweep = {{ fedcafe-afe = [true, false] }}')
    bits, main = _grids(tmp_path)
    bits.path.write_text(bits_text.format(out=tmp_path / "runs-bits"))
    with pytest.raises(GridError, match="group '16 bits': 'fedcafe' is swept in .*bits.toml:b16"):
        check_tables(load_grid(main.path))


def test_tables_must_be_an_array_of_tables(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('title = "t"\nseeds = [0]\ntables = "x"\n[settings.a]\n[[methods]]\nname = "fedavg"\n')
    with pytest.raises(GridError, match="'tables' must be an array of tables"):
        load_grid(path)
