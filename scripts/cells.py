"""What one finished cell of a results grid says: its table numbers (test, at the round the run selected on dev),
every metric of its final.json, the dev score it was selected on, and whether it was still improving."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import protocol as P
from scripts.grid_spec import RECORD

# (column, how to get it from a cell's outputs); test numbers are at the run's selected round
COLUMNS = {
    "test rsum": lambda f: f["test"].get("rsum"),
    "Hamming rsum": lambda f: f["test"].get("hash_rsum"),
    "Hamming / continuous %": lambda f: _ratio(f["test"].get("hash_rsum"), f["test"].get("rsum")),
    "MAP@all i2t": lambda f: f["test"].get("hash_map_i2t"),
    "MAP@all t2i": lambda f: f["test"].get("hash_map_t2i"),
    "std MAP i2t": lambda f: f["test"].get("hash_smap_i2t"),
    "std MAP t2i": lambda f: f["test"].get("hash_smap_t2i"),
    "continuous MAP i2t": lambda f: f["test"].get("emb_smap_i2t"),
    "continuous MAP t2i": lambda f: f["test"].get("emb_smap_t2i"),
    "relaxed MAP i2t": lambda f: f["test"].get("relaxed_smap_i2t"),
    "mean abs code": lambda f: f["test"].get("code_abs_mean"),
    "client mean": lambda f: _summary(f, "all-global-mean"),
    "client worst": lambda f: _summary(f, "all-global-worst"),
    "client MAP i2t": lambda f: _summary(f, "all-global-smap_i2t-mean"),
    "client MAP t2i": lambda f: _summary(f, "all-global-smap_t2i-mean"),
    "worst client MAP i2t": lambda f: _summary(f, "all-global-smap_i2t-worst"),
    "worst client MAP t2i": lambda f: _summary(f, "all-global-smap_t2i-worst"),
    # PLFedCMH's protocol: each client's test queries against its own train set
    "own-set client MAP i2t": lambda f: _summary(f, "all-global-own_smap_i2t-mean"),
    "own-set client MAP t2i": lambda f: _summary(f, "all-global-own_smap_t2i-mean"),
    "worst own-set client MAP i2t": lambda f: _summary(f, "all-global-own_smap_i2t-worst"),
    "paired": lambda f: _summary(f, "paired-global-mean"),
    "paired worst": lambda f: _summary(f, "paired-global-worst"),
    "image-only": lambda f: _summary(f, "image-only-global-mean"),
    "image-only worst": lambda f: _summary(f, "image-only-global-worst"),
    "text-only": lambda f: _summary(f, "text-only-global-mean"),
    "text-only worst": lambda f: _summary(f, "text-only-global-worst"),
    "+personal mean": lambda f: _summary(f, "all-personal-mean"),
}
# a run whose selected round is past this fraction of its rounds was still improving when it stopped
LATE = 0.8


def _ratio(a: float | None, b: float | None) -> float | None:
    return 100.0 * a / b if a is not None and b else None


def _summary(final: dict, key: str) -> float | None:
    return final.get("per-client", {}).get("summary", {}).get(key)


def _number(value: int | float) -> int | float | None:
    """A metric value as strict JSON can hold it: NaN / inf as None."""
    return value if math.isfinite(value) else None


def flat_metrics(final: dict) -> dict[str, int | float | None]:
    """Every scalar metric of final.json under its own key (per-client summary keys as they are, `dev_<key>` for the
    dev section, test keys as they are: the same names a reader finds in the file), plus `selected_round`."""
    sections = (("", final.get("per-client", {}).get("summary", {})), ("dev_", final.get("dev") or {}),
                ("", final.get("test") or {}))
    out = {prefix + k: _number(v) for prefix, section in sections for k, v in section.items()
           if not isinstance(v, bool) and isinstance(v, (int, float))}
    return {**out, "selected_round": int(final["best-round"])}


def _num_rounds(run_dir: Path, rounds: list[dict]) -> int:
    """The cell's number of server rounds: its resolved config (config.json), else its grid record, else the last
    round it logged."""
    for name, key in (("config.json", "run"), (RECORD, "run-config")):
        path = run_dir / name
        if path.exists():
            value = json.loads(path.read_text()).get(key, {}).get("num-server-rounds")
            if value:
                return int(value)
    return max((r["round"] for r in rounds), default=0)


# final.json's "selected-on" words -> where the score that chose the round is ("dev": the global model's dev scores,
# "client": the per-client dev summary), the metric's keys in both places and the words for each (what the
# convergence curves plot, so that they show what chose the round): common/protocol.py's SELECTION, read backwards
SELECTED_BY = {words: (where, dev_keys, client_keys, on_dev, on_clients)
               for dev_keys, client_keys, (on_dev, on_clients) in P.SELECTION.values()
               for words, where in ((on_dev, "dev"), (on_clients, "client"))}


def _curve(rounds: list[dict], scores: Callable[[dict], dict], keys: tuple[str, ...]) -> dict[int, float]:
    """Per round, the mean of `keys` in `scores(round)`, for the rounds that have all of them (round 0 left out)."""
    out = {}
    for r in rounds:
        values = [scores(r).get(k) for k in keys]
        if r["round"] > 0 and all(v is not None for v in values):
            out[r["round"]] = float(np.mean(values))
    return out


def selection_score(final: dict, selected: dict) -> float | None:
    """The dev value the run chose its reported round on (`select-on`), at that round (`selected`: its line of
    metrics.jsonl); runs written before `selected-on` existed chose on dev rsum (or the per-client dev score)."""
    client = selected.get("client-dev", {}).get("summary", {})
    where, dev_keys, client_keys, *_ = SELECTED_BY.get(final.get("selected-on", ""),
                                                       SELECTED_BY["dev rsum" if final.get("dev") else
                                                                   "mean per-client dev score"])
    scores, keys = ((final.get("dev") or {}), dev_keys) if where == "dev" else (client, client_keys)
    values = [scores.get(k) for k in keys]
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def cell_numbers(run_dir: Path) -> dict[str, Any]:
    """One finished cell's numbers: the table columns, its dev score, bytes per round, the convergence curves, every
    metric of final.json (`metrics`) and whether it was still improving (selected late in its rounds)."""
    final = json.loads((run_dir / "final.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r["train"] for r in rounds if r.get("train")]
    selected = next((r for r in rounds if r["round"] == final["best-round"]), {})
    num_rounds = _num_rounds(run_dir, rounds)
    _, dev_keys, client_keys, *labels = SELECTED_BY.get(final.get("selected-on", ""), SELECTED_BY["dev rsum"])
    return {
        **{name: get(final) for name, get in COLUMNS.items()},
        "dev": selection_score(final, selected),  # what chooses a swept value too: the metric the round was chosen on
        "best-round": final["best-round"],
        "MB/round": (np.mean([t.get("download-bytes", 0) + t.get("upload-bytes", 0) for t in trained]) / 1e6
                     if trained else None),
        "dev-curve": _curve(rounds, lambda r: r.get("dev") or {}, dev_keys),
        "client-curve": _curve(rounds, lambda r: r.get("client-dev", {}).get("summary", {}), client_keys),
        "curve-labels": tuple(labels),
        "rounds": num_rounds,
        "still-improving": final["best-round"] > LATE * num_rounds,
        "metrics": flat_metrics(final),
    }
