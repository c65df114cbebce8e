"""A results grid as data: the TOML file that names settings, methods (with swept knobs) and seeds, expanded into
cells, and the record each finished cell leaves beside its run directory.

A grid file (`grids/*.toml`):

    title = "..."                        # heading of the generated results file
    clients = 10                         # simulated SuperNodes per cell
    seeds = [0, 1, 2]
    out-dir = "runs/grid-flickr8k"       # run directories, relative to the project
    results = "docs/RESULTS.md"          # the generated file (plots and RESULTS.json, its rows for scripts, beside it)
    records = "grids/records/flickr8k"   # optional: a tracked folder that keeps each finished cell's small files
                                         # (record, final.json, metrics.jsonl, config.json), so a grid run over
                                         # several sessions or clones keeps its finished cells
    baseline = "fedavg"                  # optional: the method the ▲/▼ marks compare with (default fedavg)
    gap = ["paired-only", "all-paired/fedavg"]  # optional: report how much of the gap from a method to a
                                         # reference (setting/method) each method recovers, per setting
    columns = ["test rsum", ...]         # optional: the metric columns of the tables (default: all)
    [run-config]                         # keys every cell shares (a relative data-dir / cache-dir, here or in
                                         # any run-config or sweep below: to the project)
    [settings.<name>]                    # title and run-config of one setting (partition x modality mix x ...);
                                         # optional note: a paragraph printed above its table
    [[methods]]                          # name; optional: sweep = {key = [values]} (chosen on dev),
                                         # sweep-seeds = [...] (screen: every swept value runs on these seeds
                                         # only, the other seeds at the value with the best mean dev score there),
                                         # run-config, settings = [...], seeds = [...], clients, label
    [[tables]]                           # optional: tables across grids at the end of the results file
                                         # (scripts/cross_table.py)

A cell is one run: setting x method x swept values x seed. Its record (`cell.json`) holds the code version and the
full config; a cell whose record matches both is finished and is skipped when the grid runs again. A cell's files are
read from its run directory, else from the grid's `records` folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

PROJECT = Path(__file__).resolve().parents[1]
# what decides a cell's numbers: a change here reruns the grid; a change elsewhere (docs, scripts) does not
CODE_PATHS = ("common", "fedxmr_client", "fedxmr_server", "pyproject.toml", "requirements.lock")
RECORD = "cell.json"
KEPT = (RECORD, "final.json", "metrics.jsonl", "config.json")  # what `records` keeps of a finished cell


class GridError(ValueError):
    """A grid file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    setting: str
    method: str  # the method's label (its name, unless the grid gives one)
    variant: dict[str, Any]  # swept keys of this cell (e.g. {"fedprox-mu": 0.1}); {} if none
    seed: int
    clients: int
    run_config: dict[str, Any]  # the whole run config of the cell, run-name and out-dir excepted
    screen_seeds: tuple[int, ...] = ()  # the method's `sweep-seeds`: where its swept values are compared; (): all

    @property
    def name(self) -> str:
        """Also the run directory's name (Flower's run-name: letters, digits, '.', '_', '-')."""
        parts = [self.setting, self.method, *(f"{k}-{v}" for k, v in sorted(self.variant.items())), f"seed{self.seed}"]
        return ".".join(parts)

    def key(self, code: str) -> str:
        """What makes a finished cell reusable: the code version and the exact config."""
        text = json.dumps({"code": code, "clients": self.clients, "run-config": self.run_config}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Grid:
    path: Path
    title: str
    clients: int
    seeds: list[int]
    out_dir: Path
    results: Path
    settings: dict[str, dict[str, Any]]  # name -> {"title": ..., "run-config": {...}}
    methods: list[dict[str, Any]]
    run_config: dict[str, Any] = field(default_factory=dict)
    baseline: str = "fedavg"
    gap: tuple[str, str, str] | None = None  # (from method, reference setting, reference method)
    columns: tuple[str, ...] | None = None  # the results table's metric columns (scripts/cells.py); None: all
    tables: list[dict[str, Any]] = field(default_factory=list)  # tables across grids (scripts/cross_table.py)
    records: Path | None = None  # tracked copies of finished cells' small files (KEPT); None: run directories only

    def cells(self, choices: Mapping[tuple[str, str], dict[str, Any]] | None = None) -> list[Cell]:
        """Every cell. A method with `sweep-seeds` runs each swept value on those seeds only, and its other seeds at
        the value `choices` names for (setting, label), chosen on the screen's dev scores (`scripts.results.
        screen_choices`); until its screen has finished those cells are not listed."""
        out = []
        for method in self.methods:
            sweep, label = method.get("sweep", {}), method.get("label", method["name"])
            screen = tuple(method.get("sweep-seeds", ()))
            for setting in method.get("settings", list(self.settings)):
                chosen = (choices or {}).get((setting, label))
                for values in itertools.product(*sweep.values()):
                    variant = dict(zip(sweep, values))
                    for seed in method.get("seeds", self.seeds):
                        if screen and seed not in screen and variant != chosen:
                            continue
                        config = _resolve_paths({**self.run_config, **self.settings[setting].get("run-config", {}),
                                                 **method.get("run-config", {}), "method": method["name"], **variant,
                                                 "seed": seed})
                        out.append(Cell(setting, label, variant, seed, method.get("clients", self.clients), config,
                                        screen))
        return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "'" in value:
            raise GridError(f"run-config value {value!r} contains a single quote")
        return f"'{value}'"
    return repr(value)


def run_config_text(config: dict[str, Any]) -> str:
    """A flat run config as Flower's `--run-config` string."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


def _resolve(value: Any) -> Any:
    return str((PROJECT / value).resolve()) if isinstance(value, str) and value and not value.startswith("/") else value


def _resolve_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A cell's run config with relative `data-dir` / `cache-dir` taken from the project root, wherever the grid set
    them (top-level run-config, a setting, a method or a sweep): the runs start in other working directories."""
    return {k: _resolve(v) if k in ("data-dir", "cache-dir") else v for k, v in config.items()}


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid file; relative paths are taken from the project root."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise GridError(f"grid file {path}: {exc}") from None
    for key in ("title", "seeds", "settings", "methods"):
        if key not in raw:
            raise GridError(f"grid file {path}: key {key!r} is missing")
    run_config = dict(raw.get("run-config", {}))
    for key in ("run-name", "out-dir", "seed", "method"):
        if key in run_config:
            raise GridError(f"grid file {path}: run-config key {key!r} is set by the grid itself")
    settings = raw["settings"]
    for i, method in enumerate(raw["methods"]):
        if "name" not in method:
            raise GridError(f"grid file {path}: methods[{i}] has no 'name'")
        unknown = [s for s in method.get("settings", []) if s not in settings]
        if unknown:
            raise GridError(f"grid file {path}: method {method['name']!r} names unknown settings {unknown}")
        names = [str(method.get("label", method["name"])), *settings]
        if not all(_RUN_NAME.fullmatch(n) for n in names):  # they become run names (`run-name`): fail before any run
            raise GridError(f"grid file {path}: method label / setting names {names} must use only letters, digits, "
                            "'.', '_' and '-' (they name the cells' run directories)")
        bad = [k for k, v in method.get("sweep", {}).items() if not isinstance(v, list) or not v]
        if bad:
            raise GridError(f"grid file {path}: method {method['name']!r} sweep keys {bad} need a non-empty list")
        screen = method.get("sweep-seeds")
        if screen is not None and not (method.get("sweep") and isinstance(screen, list) and screen
                                       and set(screen) <= set(method.get("seeds", raw["seeds"]))):
            raise GridError(f"grid file {path}: method {method['name']!r} 'sweep-seeds' {screen!r} needs a sweep and "
                            "a non-empty list of the method's seeds")
    gap = raw.get("gap")
    if gap is not None:
        if not (isinstance(gap, list) and len(gap) == 2 and gap[1].count("/") == 1):
            raise GridError(f"grid file {path}: 'gap' must be [method, 'setting/method'], got {gap!r}")
        if gap[1].split("/")[0] not in settings:
            raise GridError(f"grid file {path}: 'gap' names an unknown setting {gap[1].split('/')[0]!r}")
        gap = (gap[0], *gap[1].split("/"))
    tables = raw.get("tables", [])
    if not (isinstance(tables, list) and all(isinstance(t, dict) for t in tables)):
        raise GridError(f"grid file {path}: 'tables' must be an array of tables ([[tables]])")
    return Grid(path=path, title=raw["title"], clients=int(raw.get("clients", 10)), seeds=list(raw["seeds"]),
                out_dir=Path(_resolve(raw.get("out-dir", f"runs/grid-{path.stem}"))),
                results=Path(_resolve(raw.get("results", f"docs/RESULTS-{path.stem}.md"))),
                settings=settings, methods=raw["methods"], run_config=run_config,
                baseline=str(raw.get("baseline", "fedavg")), gap=gap,
                columns=tuple(raw["columns"]) if "columns" in raw else None, tables=tables,
                records=Path(_resolve(raw["records"])) if "records" in raw else None)


_RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")  # common/config.py: run-name


def code_version(root: Path = PROJECT) -> str:
    """The git tree ids of the paths that decide the numbers (`CODE_PATHS`); refuses uncommitted changes there, so a
    cell's record always names code that can be checked out again."""
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE_PATHS], cwd=root, capture_output=True,
                           text=True, check=True).stdout.strip()
    if dirty:
        raise GridError(f"uncommitted changes in {CODE_PATHS}: commit them first (a cell must name its code):\n"
                        f"{dirty}")
    ids = [subprocess.run(["git", "rev-parse", f"HEAD:{p}"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip() for p in CODE_PATHS]
    return hashlib.sha256(" ".join(ids).encode()).hexdigest()[:12]


def head_commit(root: Path = PROJECT) -> str:
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def cell_dir(grid: Grid, cell: Cell) -> Path:
    """Where the cell's files are: its run directory if it holds a record, else its kept copy (if the grid keeps
    records and one exists), else the run directory."""
    run_dir, kept = grid.out_dir / cell.name, (grid.records / cell.name if grid.records is not None else None)
    if kept is not None and (kept / RECORD).exists() and not _finished(run_dir / RECORD):
        return kept
    return run_dir


def _finished(path: Path) -> bool:
    return path.exists() and json.loads(path.read_text()).get("status") == "finished"


def keep(grid: Grid, cell: Cell) -> None:
    """Copy a finished cell's small files (KEPT) into the grid's `records` folder, if it has one."""
    if grid.records is None:
        return
    target = grid.records / cell.name
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (grid.out_dir / cell.name / name).exists():
            (target / name).write_bytes((grid.out_dir / cell.name / name).read_bytes())


def read_record(grid: Grid, cell: Cell) -> dict[str, Any] | None:
    """The cell's record if it finished (whatever the code version), else None."""
    path = cell_dir(grid, cell) / RECORD
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("status") == "finished" else None


def is_done(grid: Grid, cell: Cell, code: str) -> bool:
    record = read_record(grid, cell)
    return record is not None and record.get("key") == cell.key(code)


def has_result(grid: Grid, cell: Cell) -> bool:
    """A finished record of this exact config, at whatever code version (`--missing-only`)."""
    record = read_record(grid, cell)
    return record is not None and record.get("run-config") == cell.run_config and record.get("clients") == cell.clients
