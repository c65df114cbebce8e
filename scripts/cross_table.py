"""Tables across results grids, shaped like a paper's: one row per method, one column per group (e.g. partition ×
code length), each entry the mean ± std over seeds of one metric at each run's selected (best-dev) round.

The numbers of one comparison often come from several grids (32-bit codes in one, 16 / 64 in another, the
Centralized reference in a third). A grid file names such tables under `[[tables]]`, and `scripts.grid` appends them
to that grid's results file, so they are read side by side in one place:

    [[tables]]
    title = "MAP@all by partition and code length"
    rows = ["centralized", "fedavg", "fedcafe"]          # method labels as the grids name them
    metrics = ["std MAP i2t", "std MAP t2i"]             # columns of scripts/cells.py (COLUMNS)
    baseline = "fedavg"                                  # optional (default: the grid's): ▲ / ▼ against it
    note = "..."                                         # optional: a paragraph under the heading
    [[tables.groups]]
    title = "IID, 16 bits"
    from = ["grids/fedcafe-bits.toml:iid-16", "grids/fedcafe-bits.toml:central-16"]  # relative to the project

A row's entry in a group comes from the first `grid:setting` in `from` that lists that label. A label swept in that
setting is refused (a table shows one value per method), unless the method is screened (`sweep-seeds`): then the
entry is the value its screen chose on dev, over all seeds (no number until the screen has finished). Marks are paired
t-tests over seeds, so they are drawn only where the row and the baseline come from the same setting: there the seed
also draws the same partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.grid_spec import PROJECT, Cell, Grid, GridError, cell_dir, load_grid, read_record
from scripts.cells import COLUMNS, cell_numbers
from scripts.results import format_mean_std, improving_mark, paired_mark, screen_choices


TABLE_KEYS = {"title", "rows", "metrics", "baseline", "note", "groups"}


@dataclass(frozen=True)
class Entry:
    """One row's cells in one group, from its first source that lists the label ("" and none if no source does)."""

    source: str
    grid: Grid | None
    cells: tuple[Cell, ...]

    def numbers(self) -> dict[int, dict[str, Any]]:
        """seed -> scripts.cells.cell_numbers of the finished cells (read when the table is written)."""
        if self.grid is None:
            return {}
        grid = self.grid
        return {c.seed: cell_numbers(cell_dir(grid, c)) for c in self.cells if read_record(grid, c)}

    def codes(self) -> set[str]:
        """The code versions of the finished cells (a table has no cell list of its own)."""
        if self.grid is None:
            return set()
        return {r["code"] for c in self.cells if (r := read_record(self.grid, c))}


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def check_table(table: dict[str, Any], where: str) -> None:
    """Refuse a table spec of the wrong shape (missing or unknown keys, unknown metrics, duplicate rows or group
    titles, a baseline that is not a row), naming the table."""
    for key in ("title", "rows", "metrics", "groups"):
        if not table.get(key):
            raise GridError(f"{where}: key {key!r} is missing or empty")
    unknown_keys = sorted(set(table) - TABLE_KEYS)
    if unknown_keys:
        raise GridError(f"{where}: unknown keys {unknown_keys}; known: {sorted(TABLE_KEYS)}")
    for key in ("rows", "metrics"):
        if not _strings(table[key]):
            raise GridError(f"{where}: {key!r} must be a non-empty list of strings, got {table[key]!r}")
    if len(set(table["rows"])) < len(table["rows"]):
        raise GridError(f"{where}: 'rows' names a label twice: {table['rows']}")
    unknown = [m for m in table["metrics"] if m not in COLUMNS]
    if unknown:
        raise GridError(f"{where}: unknown metrics {unknown}; known: {list(COLUMNS)}")
    if table.get("baseline") is not None and table["baseline"] not in table["rows"]:
        raise GridError(f"{where}: baseline {table['baseline']!r} is not one of the rows {table['rows']}")
    groups = table["groups"]
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        raise GridError(f"{where}: 'groups' must be an array of tables ([[tables.groups]])")
    for i, group in enumerate(groups):
        if not isinstance(group.get("title"), str) or not group["title"] or not _strings(group.get("from")):
            raise GridError(f"{where}: groups[{i}] needs a 'title' and 'from', a non-empty list of 'grid:setting'")
    titles = [g["title"] for g in groups]
    if len(set(titles)) < len(titles):
        raise GridError(f"{where}: two groups have the same title: {titles}")


def _source(spec: str, where: str, grids: dict[Path, Grid]) -> tuple[Grid, str]:
    path_text, sep, setting = spec.rpartition(":")
    if not sep or not path_text or not setting:
        raise GridError(f"{where}: {spec!r} is not 'grid-file:setting'")
    path = (PROJECT / path_text).resolve()
    if path not in grids:
        try:
            grids[path] = load_grid(path)
        except GridError as exc:
            raise GridError(f"{where}: {spec!r}: {exc}") from None
    if setting not in grids[path].settings:
        raise GridError(f"{where}: {spec!r}: {path_text} has no setting {setting!r}")
    return grids[path], setting


def _entry(sources: list[tuple[str, Grid, str]], label: str, where: str) -> Entry:
    for spec, grid, setting in sources:
        cells = [c for c in grid.cells() if c.setting == setting and c.method == label]
        if cells and cells[0].screen_seeds:  # screened: the value its screen chose on dev, over all seeds
            choices = screen_choices(grid)
            chosen = choices.get((setting, label))
            return Entry(spec, grid, tuple(c for c in grid.cells(choices)
                                           if c.setting == setting and c.method == label and c.variant == chosen)
                         if chosen is not None else ())
        if any(c.variant for c in cells):
            raise GridError(f"{where}: {label!r} is swept in {spec!r}; a table shows one value per method (give "
                            "the value a label of its own in that grid)")
        if cells:
            return Entry(spec, grid, tuple(cells))
    return Entry("", None, ())


def _entries(table: dict[str, Any], where: str) -> list[tuple[str, dict[str, Entry]]]:
    """Check a table spec and resolve it: per group, (title, {row label: Entry}), nothing read from the runs yet."""
    check_table(table, where)
    grids: dict[Path, Grid] = {}
    out = []
    for group in table["groups"]:
        at = f"{where}, group {group['title']!r}"
        sources = [(s, *_source(s, at, grids)) for s in group["from"]]
        out.append((group["title"], {label: _entry(sources, label, at) for label in table["rows"]}))
    return out


def _entry_text(metric: str, entry: Entry, numbers: dict[int, dict], base: Entry, base_numbers: dict[int, dict],
                mark_it: bool) -> str:
    """One table entry: mean ± std, a mark only against the baseline's cells of the same setting (seeds pair up
    only there), (n/m) while seeds are missing, and † k/n where k of the n finished runs were still improving."""
    values = {seed: n[metric] for seed, n in numbers.items()}
    mark = ""
    if mark_it and entry.source == base.source and any(v is not None for v in values.values()):
        mark = paired_mark(values, {seed: n[metric] for seed, n in base_numbers.items()})
    text = format_mean_std(metric, list(values.values()), mark)
    text += f" ({len(numbers)}/{len(entry.cells)})" if entry.cells and len(numbers) < len(entry.cells) else ""
    late = improving_mark(list(numbers.values()))
    return f"{text} {late}" if late else text


def table_lines(table: dict[str, Any], where: str, default_baseline: str = "fedavg",
                refresh: str = "") -> list[str]:
    """The markdown of one table spec: a heading, what the marks mean, one table per metric, and the sources."""
    baseline = table.get("baseline", default_baseline)
    groups = _entries({**table, "baseline": baseline}, where)
    numbers = {(title, label): entry.numbers() for title, entries in groups for label, entry in entries.items()}
    lines = [f"## {table['title']}", "",
             "Generated from the finished cells of the grids named under **Sources** (a table across grids, "
             f"scripts/cross_table.py){'; refresh with `' + refresh + '`' if refresh else ''}. Each entry: mean ± "
             "sample std over seeds at each run's best-dev round; ▲ / ▼: the paired difference to "
             f"{baseline} over the same seeds is significant (two-sided paired t-test, p < 0.05), drawn only where "
             f"the row and {baseline} come from the same grid setting; ?: fewer than 2 common seeds; `(n/m)`: only "
             "n of the m seeds the grid lists have finished; † k/n: in k of the n finished seeds the selected round "
             "was in the last fifth of the rounds (still improving); –: no number (the label is in no source of that "
             "group, see Sources; or none of its seeds has finished; or the method has no global model to score a "
             "global-model metric).", ""]
    if table.get("note"):
        lines += [table["note"], ""]
    for metric in table["metrics"]:
        head = ["method", *(title for title, _ in groups)]
        lines += [f"### {metric}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in table["rows"]:
            lines.append("| " + " | ".join([label, *(
                _entry_text(metric, entries[label], numbers[(title, label)], entries[baseline],
                            numbers[(title, baseline)], label != baseline) for title, entries in groups)]) + " |")
        lines.append("")
    lines += ["**Sources** (group: rows ← grid:setting, code versions of the finished cells)", ""]
    for title, entries in groups:
        by_source: dict[str, list[str]] = {}
        for label, entry in entries.items():
            by_source.setdefault(entry.source, []).append(label)
        missing = by_source.pop("", [])
        parts = []
        for source, labels in by_source.items():
            codes = sorted(set().union(*(entries[label].codes() for label in labels)))
            parts.append(f"{', '.join(labels)} ← `{source}` ({', '.join(codes) or 'none finished'})")
        lines.append(f"- {title}: " + "; ".join(parts + ([f"in no source: {', '.join(missing)}"] if missing else [])))
    return lines + [""]


def check_tables(grid: Grid) -> None:
    """Refuse a bad table spec before a grid runs (not after hours of cells)."""
    for i, table in enumerate(grid.tables):
        _entries({**table, "baseline": table.get("baseline", grid.baseline)},
                 f"grid file {grid.path}, tables[{i}]")


def cross_tables(grid: Grid) -> list[str]:
    """The markdown of every table the grid file names under [[tables]] (none: no lines)."""
    refresh = f"python -m scripts.grid {grid.path} --results-only"
    return [line for i, table in enumerate(grid.tables)
            for line in table_lines(table, f"grid file {grid.path}, tables[{i}]", grid.baseline, refresh)]
