"""Tables across results grids, shaped like a paper's: one row per method, one column per group (e.g. partition ×
code length), each entry the mean ± std over seeds of one metric at each run's selected (best-dev) round.

The numbers of one comparison often come from several grids (32-bit codes in one, 16 / 64 in another, the
Centralized reference in a third). A grid file names such tables under `[[tables]]`, and `scripts.grid` appends them
to that grid's results file, so they are read side by side in one place:

    [[tables]]
    title = "MAP@all by partition and code length"
    rows = ["centralized", "fedavg", "fedcafe"]          # method labels as the grids name them
    metrics = ["std MAP i2t", "std MAP t2i"]             # columns of scripts/results.py
    baseline = "fedavg"                                  # ▲ / ▼ against it (paired t over seeds)
    [[tables.groups]]
    title = "IID, 16 bits"
    from = ["grids/fedcafe-bits.toml:iid-16", "grids/fedcafe-bits.toml:central-16"]

A row's entry in a group comes from the first `grid:setting` in `from` that lists that label (sweeps are not
looked at: a row takes the label's cells without a swept knob).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.grid_spec import PROJECT, Cell, Grid, GridError, load_grid, read_record
from scripts.results import COLUMNS, cell_numbers, format_mean_std, paired_mark


@dataclass(frozen=True)
class Entry:
    """One row's cells in one group: the numbers of the finished seeds, and how many seeds the grid lists."""

    numbers: dict[int, dict[str, Any]]  # seed -> scripts.results.cell_numbers
    listed: int
    source: str  # "grid:setting", or "" when no source lists the row


def _source(spec: str, where: str, grids: dict[Path, Grid]) -> tuple[Grid, str]:
    path_text, sep, setting = spec.rpartition(":")
    if not sep or not path_text or not setting:
        raise GridError(f"{where}: {spec!r} is not 'grid-file:setting'")
    path = PROJECT / path_text
    if path not in grids:
        grids[path] = load_grid(path)
    if setting not in grids[path].settings:
        raise GridError(f"{where}: {spec!r}: {path_text} has no setting {setting!r}")
    return grids[path], setting


def _entry(sources: list[tuple[str, Grid, str]], label: str) -> Entry:
    for spec, grid, setting in sources:
        cells: list[Cell] = [c for c in grid.cells() if c.setting == setting and c.method == label and not c.variant]
        if cells:
            done = {c.seed: cell_numbers(grid.out_dir / c.name) for c in cells if read_record(grid.out_dir, c)}
            return Entry(done, len(cells), spec)
    return Entry({}, 0, "")


def check_table(table: dict[str, Any], where: str) -> None:
    """Refuse a table spec with a missing key or an unknown metric, naming the table."""
    for key in ("title", "rows", "metrics", "groups"):
        if not table.get(key):
            raise GridError(f"{where}: key {key!r} is missing or empty")
    unknown = [m for m in table["metrics"] if m not in COLUMNS]
    if unknown:
        raise GridError(f"{where}: unknown metrics {unknown}; known: {list(COLUMNS)}")
    for i, group in enumerate(table["groups"]):
        if not group.get("title") or not group.get("from"):
            raise GridError(f"{where}: groups[{i}] needs a 'title' and a non-empty 'from'")


def _groups(table: dict[str, Any], where: str) -> list[tuple[str, list[tuple[str, Grid, str]]]]:
    """Check a table spec and resolve its groups: (title, [(source text, grid, setting)])."""
    check_table(table, where)
    grids: dict[Path, Grid] = {}
    return [(g["title"], [(s, *_source(s, f"{where}, group {g['title']!r}", grids)) for s in g["from"]])
            for g in table["groups"]]


def table_lines(table: dict[str, Any], where: str) -> list[str]:
    """The markdown of one table spec: a heading, what the marks mean, one table per metric, and the sources."""
    groups = _groups(table, where)
    entries = {(title, label): _entry(sources, label) for title, sources in groups for label in table["rows"]}
    baseline = table.get("baseline", "fedavg")
    lines = [f"## {table['title']}", "",
             "Generated from the finished cells of the grids named under **Sources** (a table across grids, "
             "scripts/cross_table.py). Each entry: mean ± sample std over seeds at each run's best-dev round; "
             f"▲ / ▼: the paired difference to {baseline} over the same seeds is significant (two-sided paired "
             "t-test, p < 0.05); `(n/m)`: only n of the grid's m seeds have finished; –: no number (the method was "
             "not run in that group, or it has no global model to score a global-model metric).", ""]
    if table.get("note"):
        lines += [table["note"], ""]
    for metric in table["metrics"]:
        head = ["method", *(title for title, _ in groups)]
        lines += [f"### {metric}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in table["rows"]:
            row = [label]
            for title, _ in groups:
                entry, base = entries[(title, label)], entries[(title, baseline)]
                values = {seed: n[metric] for seed, n in entry.numbers.items()}
                mark = ""
                if label != baseline and base.numbers and any(v is not None for v in values.values()):
                    mark = paired_mark(values, {seed: n[metric] for seed, n in base.numbers.items()})
                text = format_mean_std(metric, list(values.values()), mark)
                if text != "–" and len(entry.numbers) < entry.listed:
                    text += f" ({len(entry.numbers)}/{entry.listed})"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["**Sources** (group: row ← grid:setting)", ""]
    for title, _ in groups:
        by_source: dict[str, list[str]] = {}
        for label in table["rows"]:
            by_source.setdefault(entries[(title, label)].source, []).append(label)
        missing = by_source.pop("", [])
        parts = [f"{', '.join(labels)} ← `{source}`" for source, labels in by_source.items()]
        lines.append(f"- {title}: " + "; ".join(parts + ([f"in no source: {', '.join(missing)}"] if missing else [])))
    return lines + [""]


def check_tables(grid: Grid) -> None:
    """Refuse a bad table spec before a grid runs (not after hours of cells)."""
    for i, table in enumerate(grid.tables):
        _groups(table, f"grid file {grid.path}, tables[{i}]")


def cross_tables(grid: Grid) -> list[str]:
    """The markdown of every table the grid file names under [[tables]] (none: no lines)."""
    return [line for i, table in enumerate(grid.tables)
            for line in table_lines(table, f"grid file {grid.path}, tables[{i}]")]
