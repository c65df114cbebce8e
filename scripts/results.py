"""The results file of a grid (e.g. docs/RESULTS.md), generated from its finished cells.

Per setting, one table of methods: mean ± std over seeds (sample std, ddof=1) of the test numbers at each run's
selected (best-dev) round, a mark for differences to the grid's baseline (FedAvg unless it names another) larger
than the seed noise (paired t-test over seeds,
two-sided, p < 0.05; the seed fixes the partition, so seeds pair up), bytes per round and wall time; a method with
a swept knob is shown with the value of best mean dev score (the others in a table of their own); convergence plots
with a ± std band over seeds beside the file; the grid's tables across grids (scripts/cross_table.py); and a list of
every cell with its commit, config and wall time. A row whose runs selected a round in the last fifth of their rounds
is marked † n/m (still improving: its numbers may understate the method). Beside the file, `<name>.json` holds the
same rows for scripts: one record per (setting, method, metric) with the per-seed values (see `result_records`).

    python -m scripts.grid grids/flickr8k.toml --results-only      # also run at the end of every grid run
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from scripts.cells import COLUMNS, cell_numbers
from scripts.grid_spec import PROJECT, Cell, Grid, cell_dir, read_record, run_config_text
from scripts.results_plot import plot_setting

DIGITS = {"MAP@all i2t": 3, "MAP@all t2i": 3, "std MAP i2t": 3, "std MAP t2i": 3, "client MAP i2t": 3,
          "client MAP t2i": 3, "worst client MAP i2t": 3, "worst client MAP t2i": 3,
          "own-set client MAP i2t": 3, "own-set client MAP t2i": 3, "worst own-set client MAP i2t": 3,
          "continuous MAP i2t": 3, "continuous MAP t2i": 3, "relaxed MAP i2t": 3, "mean abs code": 2, "dev MAP": 3}
# marked against the grid's baseline
SIGNIFICANCE = ("test rsum", "Hamming rsum", "client mean", "image-only", "text-only", "std MAP i2t", "std MAP t2i",
                "client MAP i2t", "own-set client MAP i2t", "worst client MAP i2t", "worst own-set client MAP i2t")
IMPROVING = "†"
FOOTNOTE = (f"{IMPROVING} n/m: the selected round was in the last fifth of the rounds in n of m seeds: the run was "
            "still improving (selected round > 0.8 × its rounds), so its numbers may understate the method.")


def improving_mark(numbers: list[dict[str, Any] | None]) -> str:
    """'† n/m' if n of the m finished cells were still improving, '' if none was."""
    done = [n for n in numbers if n]
    late = sum(bool(n["still-improving"]) for n in done)
    return f"{IMPROVING} {late}/{len(done)}" if late else ""


def _marked(text: str, numbers: list[dict[str, Any] | None]) -> str:
    mark = improving_mark(numbers)
    return f"{text} {mark}" if mark else text


def _label(method: str, variant: str) -> str:
    return method + (f" ({variant}, chosen on dev)" if variant else "")


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    """Mean and sample std (ddof=1; 0 for one value) over the values present; nan if none."""
    xs = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not len(xs):
        return math.nan, math.nan, 0
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0, len(xs)


def _present(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def paired_stats(ours: dict[int, float | None], base: dict[int, float | None]) -> tuple[float, float, float, int]:
    """Mean paired difference (ours − base) over the seeds where both have a number, its t value and two-sided p
    value (paired t-test) and the number of seeds; nan where fewer than 2 seeds pair up. Differences without spread
    have no t-test: all zero gives t 0, p 1; all the same nonzero value gives t ±inf, p 0 (every seed agrees)."""
    from scipy.stats import ttest_1samp

    seeds = sorted(s for s in ours if s in base and _present(ours[s]) and _present(base[s]))
    if len(seeds) < 2:
        return math.nan, math.nan, math.nan, len(seeds)
    diffs = np.array([ours[s] for s in seeds]) - np.array([base[s] for s in seeds])
    mean, n = float(diffs.mean()), len(seeds)
    if np.ptp(diffs) <= 1e-12:  # no spread: the t-test is undefined
        return (mean, 0.0, 1.0, n) if abs(mean) <= 1e-12 else (mean, math.copysign(math.inf, mean), 0.0, n)
    test = ttest_1samp(diffs, 0.0)  # the paired t-test is a one-sample test of the differences
    return mean, float(test.statistic), float(test.pvalue), n


def paired_mark(ours: dict[int, float | None], base: dict[int, float | None], alpha: float = 0.05) -> str:
    """▲ / ▼ if the paired difference over common seeds is significant (two-sided paired t-test, p < alpha),
    '' if not, '?' if fewer than 2 common seeds."""
    diff, _, p, n = paired_stats(ours, base)
    if n < 2:
        return "?"
    return ("▲" if diff > 0 else "▼") if p < alpha else ""


def format_mean_std(name: str, values: list[float | None], mark: str = "") -> str:
    """'mean ± std [mark]' over the values present, with the column's digits; '–' if none."""
    mean, std, n = mean_std(values)
    if not n:
        return "–"
    d = DIGITS.get(name, 1)
    text = f"{mean:.{d}f} ± {std:.{d}f}" if n > 1 else f"{mean:.{d}f}"
    if n < len(values):  # cells that do not report it (e.g. run before the metric existed)
        text += f" ({n}/{len(values)})"
    return f"{text}{(' ' + mark) if mark else ''}"


def _screen_dev(cells: list[tuple[Cell, dict | None, dict | None]]) -> list[float]:
    """The dev scores a swept value is chosen on: its cells on the method's `sweep-seeds` (all seeds if none)."""
    return [n["dev"] for c, _, n in cells
            if n and n["dev"] is not None and (not c.screen_seeds or c.seed in c.screen_seeds)]


def _screens(grid: Grid, finished: Callable[[Cell], bool] | None) -> dict[tuple[str, str], dict[str, list]]:
    """(setting, method label) -> swept values (JSON) -> their screen's dev scores (None: the cell has none), for
    every screened method whose screening cells have all finished (`finished`: the caller's rule, e.g. at this code
    version; default: any finished record)."""
    screens: dict[tuple[str, str], dict[str, list]] = {}
    running: set[tuple[str, str]] = set()
    for cell in grid.cells():  # without choices: a screened method's screening cells only
        if not cell.screen_seeds:
            continue
        key = (cell.setting, cell.method)
        if not (read_record(grid, cell) is not None if finished is None else finished(cell)):
            running.add(key)
            continue
        dev = cell_numbers(cell_dir(grid, cell))["dev"]
        screens.setdefault(key, {}).setdefault(json.dumps(cell.variant, sort_keys=True), []).append(dev)
    return {key: variants for key, variants in screens.items() if key not in running}


def screen_choices(grid: Grid, finished: Callable[[Cell], bool] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """(setting, method label) -> the swept values with the best mean dev score on the method's `sweep-seeds`, for
    every screened method whose screen has finished with a dev score in every cell (`Grid.cells` then lists its
    other seeds)."""
    return {key: json.loads(max(variants, key=lambda v: float(np.mean(variants[v]))))
            for key, variants in _screens(grid, finished).items()
            if all(d is not None for ds in variants.values() for d in ds)}


def undecided_screens(grid: Grid, finished: Callable[[Cell], bool] | None = None) -> list[str]:
    """Screens that finished but cannot choose: a cell without a dev score of its `select-on` metric."""
    return [f"{setting}.{label}" for (setting, label), variants in _screens(grid, finished).items()
            if any(d is None for ds in variants.values() for d in ds)]


def _groups(grid: Grid) -> dict[str, dict[tuple[str, str], list[tuple[Cell, dict | None, dict | None]]]]:
    """setting -> (method, variant text) -> [(cell, record, numbers)] over seeds, in grid order."""
    out: dict[str, dict[tuple[str, str], list]] = {}
    for cell in grid.cells(screen_choices(grid)):
        record = read_record(grid, cell)
        numbers = cell_numbers(cell_dir(grid, cell)) if record else None
        variant = ", ".join(f"{k}={v}" for k, v in sorted(cell.variant.items()))
        out.setdefault(cell.setting, {}).setdefault((cell.method, variant), []).append((cell, record, numbers))
    return out


def _chosen(rows: dict[tuple[str, str], list]) -> dict[tuple[str, str], list]:
    """Per method, the variant with the best mean dev score (on its `sweep-seeds` if it has them; methods without a
    sweep have one variant)."""
    best: dict[str, tuple[str, str]] = {}
    for key, cells in rows.items():
        dev = mean_std(_screen_dev(cells))[0]
        if key[0] not in best or dev > mean_std(_screen_dev(rows[best[key[0]]]))[0]:
            best[key[0]] = key
    return {key: rows[key] for key in best.values()}


def setting_table(rows: dict[tuple[str, str], list], baseline: str,
                  columns: tuple[str, ...] | None = None) -> list[str]:
    chosen = _chosen(rows)
    base = next((cells for (method, _), cells in chosen.items() if method == baseline), [])
    base_by = {name: _by_seed(base, name) for name in SIGNIFICANCE}
    columns = columns or tuple(COLUMNS)
    head = ["method", "seeds", *columns, "MB/round", "wall s", "best round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, variant), cells in chosen.items():
        done = [(c, r, n) for c, r, n in cells if n]
        row = [_marked(_label(method, variant), [n for _, _, n in done]), f"{len(done)}/{len(cells)}"]
        for name in columns:
            mark = (paired_mark({c.seed: n[name] for c, _, n in done}, base_by[name])
                    if name in SIGNIFICANCE and method != baseline and base else "")
            row.append(format_mean_std(name, [n[name] for _, _, n in done], mark))
        mb = mean_std([n["MB/round"] for _, _, n in done])[0]  # the same every seed: the mean alone
        row += ["–" if math.isnan(mb) else f"{mb:.1f}",
                format_mean_std("wall", [r["wall-s"] for _, r, _ in done]),
                ", ".join(str(n["best-round"]) for _, _, n in done)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def paired_table(rows: dict[tuple[str, str], list], baseline: str, columns: tuple[str, ...] | None = None) -> list[str]:
    """Each chosen method's paired difference to the baseline over the seeds both finished: mean difference, its t
    value and the number of seeds, for the marked columns the table shows (the numbers behind ▲ / ▼)."""
    chosen = _chosen(rows)
    base = next((cells for (method, _), cells in chosen.items() if method == baseline), [])
    names = [name for name in (columns or tuple(COLUMNS)) if name in SIGNIFICANCE]
    others = [(key, cells) for key, cells in chosen.items() if key[0] != baseline]
    if not base or not names or not others:
        return []
    lines = [f"Paired differences to {baseline} (method − {baseline} over the seeds both finished; t: paired t "
             "value; p < 0.05 needs |t| > 2.78 at 5 seeds, 4.30 at 3):", "",
             "| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for (method, _), cells in others:
        row = [method]
        for name in names:
            diff, t, _, n = paired_stats(_by_seed(cells, name), _by_seed(base, name))
            d = DIGITS.get(name, 1)
            row.append("–" if n < 2 else f"{diff:+.{d}f} (t {t:.1f}, {n})")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _by_seed(cells: list, name: str = "test rsum") -> dict[int, float]:
    return {c.seed: n[name] for c, _, n in cells if n and n[name] is not None}


def gap_table(rows: dict[tuple[str, str], list], reference: list, start: str, ref_name: str) -> list[str]:
    """How much of the test-rsum gap from method `start` to the reference run (`reference`, same seeds) each method
    closes: (method - start) / (reference - start), on the seeds all three share; per-seed differences beside."""
    chosen = _chosen(rows)
    base = next((_by_seed(cells) for (m, _), cells in chosen.items() if m == start), {})
    ref = _by_seed(reference)
    if not base or not ref:
        return []
    lines = [f"Gap from {start} to {ref_name} (test rsum, same seeds) closed by each method:", "",
             f"| method | seeds | {ref_name} − {start} | method − {start}, per seed | gap closed |",
             "|---|---|---|---|---|"]
    for (method, _), cells in chosen.items():
        ours = _by_seed(cells)
        seeds = sorted(set(ours) & set(base) & set(ref))
        if method == start or not seeds:
            continue
        gap = np.mean([ref[s] - base[s] for s in seeds])
        diffs = [ours[s] - base[s] for s in seeds]
        closed = f"{100 * np.mean(diffs) / gap:.0f}%" if gap > 0 else "–"
        label = _marked(method, [n for _, _, n in cells])
        lines.append(f"| {label} | {len(seeds)} | {gap:.1f} | {', '.join(f'{d:+.1f}' for d in diffs)} | {closed} |")
    return lines + [""]


def sweep_table(rows: dict[tuple[str, str], list]) -> list[str]:
    swept = {k: v for k, v in rows.items() if k[1]}
    if not swept:
        return []
    lines = ["Swept knobs (the row above is the value with the best mean dev score; a method with `sweep-seeds` is "
             "compared on those seeds, and its dev score here is theirs):", "",
             "| method | value | seeds | dev score | test rsum |", "|---|---|---|---|---|"]
    for (method, variant), cells in swept.items():
        done = [n for _, _, n in cells if n]
        scores = _screen_dev(cells)
        dev = format_mean_std("dev MAP" if scores and max(scores) <= 1 else "dev", scores)
        lines.append(f"| {method} | {_marked(variant, done)} | {len(done)}/{len(cells)} | {dev} | "
                     f"{format_mean_std('test rsum', [n['test rsum'] for n in done])} |")
    return lines + [""]


def _shown(path: Path) -> Path:
    """A path as a reader of the project would type it (relative to the project when inside it)."""
    try:
        return path.resolve().relative_to(PROJECT)
    except ValueError:
        return path


def result_records(groups: dict[str, dict[tuple[str, str], list]]) -> list[dict[str, Any]]:
    """The rows of the setting tables for scripts, one record per (setting, method, metric), in table order, metrics
    sorted: {setting, method (the table's label), metric (final.json's name, see `scripts.cells.flat_metrics`),
    mean, std (None if no seed has it), seeds (per seed, None where missing), seed_ids, still_improving,
    still_improving_seeds}."""
    records = []
    for setting, rows in groups.items():
        for (method, variant), cells in _chosen(rows).items():
            numbers = [n for _, _, n in cells]
            late = sum(bool(n["still-improving"]) for n in numbers if n)
            for metric in sorted({"selected_round"}.union(*(n["metrics"] for n in numbers if n))):
                seeds = [n["metrics"].get(metric) if n else None for n in numbers]
                mean, std, count = mean_std(seeds)
                records.append({"setting": setting, "method": _label(method, variant), "metric": metric,
                                "mean": mean if count else None, "std": std if count else None, "seeds": seeds,
                                "seed_ids": [c.seed for c, _, _ in cells], "still_improving": late > 0,
                                "still_improving_seeds": late})
    return records


def results_json(grid: Grid) -> Path:
    """Where the machine-readable twin of the results file goes: beside it, `<name>.json`."""
    return grid.results.with_suffix(".json")


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a reader (or a killed grid) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_results(grid: Grid, appendix: list[str] | None = None) -> Path:
    """Write the grid's results file and its JSON twin (`results_json`); `appendix` (markdown lines, e.g. its tables
    across grids) goes before the list of cells."""
    groups = _groups(grid)
    out = grid.results
    lines = [f"# {grid.title}", "",
             f"Generated by `python -m scripts.grid {_shown(grid.path)}`"
             " from its finished cells; do not edit by hand.", "",
             "Every number is the mean ± sample std (ddof=1) over seeds (the seed also draws the partition). Test is "
             "scored once per run, at the round selected on dev. ▲ / ▼: the paired difference to "
             f"{grid.baseline} over the same seeds is significant (two-sided paired t-test, p < 0.05); no mark: "
             "within the seed noise; ?: fewer than 2 common seeds. Per-client columns: mean R@1/5/10 of each "
             "client's own test queries (global model; `local`/`fedproto`/`plfedcmh`: the client's own model), "
             "mean over clients and by client type; `+personal mean` with the client's personal adapters; `client "
             "MAP` (and its worst client): the standard Hamming MAP@all of each labelled client's own test queries "
             "against the shared test gallery, hashed by the same model. Hamming columns: the codes of the cell's "
             "`hash-bits` (64 unless the run config says otherwise); MAP@all (tie-aware) and std MAP (the hashing "
             "papers' convention), Hamming ranking over DERIVED concept labels; continuous MAP: the same standard MAP "
             "ranked by cosine of the embeddings, relaxed MAP: by cosine of the tanh codes (what the sign loses is "
             "relaxed − std MAP), mean abs code: of the relaxed codes (1: binary). (k/n) after a value: only k of "
             "the n finished seeds report that metric (cells run before it existed); a value without ± is one seed. "
             "MB/round: arrays of the train messages, down + up, all clients (evaluation galleries not counted). "
             "Wall: the whole simulation on 2 cores, one cell at a time.", ""]
    all_cells = []
    for setting, rows in groups.items():
        spec = grid.settings[setting]
        lines += [f"## {spec.get('title', setting)}", "",
                  f"Run config of the setting: `{run_config_text(spec.get('run-config', {}))}`", ""]
        if spec.get("note"):  # what the grid file says the table cannot (e.g. why a reference misses its target)
            lines += [str(spec["note"]).strip(), ""]
        lines += setting_table(rows, grid.baseline, grid.columns) + [""]
        lines += paired_table(rows, grid.baseline, grid.columns) + sweep_table(rows)
        if grid.gap and setting != grid.gap[1]:
            reference = groups.get(grid.gap[1], {}).get((grid.gap[2], ""), [])
            lines += gap_table(rows, reference, grid.gap[0], f"{grid.gap[1]}/{grid.gap[2]}")
        png = plot_setting(_chosen(rows), spec.get("title", setting), out.parent / f"{out.stem}-{setting}.png")
        if png:
            lines += [f"![convergence, {setting}]({png.name})", ""]
        all_cells += [c for cells in rows.values() for c in cells]
    if any(line.startswith("|") and IMPROVING in line for line in lines):  # under the grid's own tables; the
        lines += [FOOTNOTE, ""]                                               # cross tables explain it themselves
    lines += appendix or []
    shared = {k: v for k, v in grid.run_config.items() if k not in ("data-dir", "cache-dir")}
    lines += ["## Cells", "", f"Shared run config: `{run_config_text(shared)}`, "
              f"{grid.clients} simulated clients unless noted.", "",
              "| cell | status | commit | code | clients | wall s |", "|---|---|---|---|---|---|"]
    for cell, record, _ in all_cells:
        lines.append(f"| {cell.name} | {record['status'] if record else 'missing'} | "
                     f"{record['commit'] if record else '–'} | {record['code'] if record else '–'} | {cell.clients} | "
                     f"{record['wall-s'] if record else '–'} |")
    total = sum(r["wall-s"] for _, r, _ in all_cells if r)
    lines += ["", f"Total wall time of the finished cells: {total / 60:.0f} min.", ""]
    _write_atomic(out, "\n".join(lines))
    records = [json.dumps(r, allow_nan=False) for r in result_records(groups)]  # one a line: diffs stay readable
    _write_atomic(results_json(grid), "[\n" + ",\n".join(records) + "\n]\n")
    return out

