"""The convergence curves of a results grid show the dev score each run chose its round on, not another metric."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.cells import cell_numbers
from scripts.results_plot import plot_setting


def _run(run_dir: Path, selected_on: str, dev: list[dict], client: list[dict] | None = None) -> Path:
    """A finished run's final.json and metrics.jsonl: round 0, then one line per entry of `dev`."""
    run_dir.mkdir(parents=True)
    (run_dir / "final.json").write_text(json.dumps({"best-round": 2, "dev": dev[1], "test": {"rsum": 1.0},
                                                    "selected-on": selected_on}))
    rounds = [{"round": 0, "dev": {"rsum": 1.0, "hash_smap_i2t": 0.1, "hash_smap_t2i": 0.1}}]
    rounds += [{"round": r + 1, "dev": d, "client-dev": {"summary": (client or [{}] * len(dev))[r]}}
               for r, d in enumerate(dev)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds) + "\n")
    return run_dir


def test_a_run_selected_on_hamming_map_plots_hamming_map(tmp_path: Path) -> None:
    dev = [{"rsum": 150.0, "hash_smap_i2t": 0.50, "hash_smap_t2i": 0.40},
           {"rsum": 140.0, "hash_smap_i2t": 0.60, "hash_smap_t2i": 0.50}]  # rsum falls while the selected MAP rises
    client = [{"all-global-smap_i2t-mean": 0.3, "all-global-smap_t2i-mean": 0.1, "all-global-mean": 20.0},
              {"all-global-smap_i2t-mean": 0.4, "all-global-smap_t2i-mean": 0.2, "all-global-mean": 10.0}]
    numbers = cell_numbers(_run(tmp_path / "map", "dev Hamming label MAP", dev, client))
    assert numbers["dev-curve"] == {1: 0.45, 2: 0.55}  # the mean of i2t and t2i; round 0 left out
    assert numbers["client-curve"] == {1: 0.2, 2: 0.30000000000000004}
    assert numbers["curve-labels"] == ("dev Hamming label MAP", "mean per-client dev Hamming MAP")


def test_a_run_selected_on_rsum_plots_rsum_and_an_old_run_without_the_key_too(tmp_path: Path) -> None:
    dev = [{"rsum": 150.0, "hash_smap_i2t": 0.5, "hash_smap_t2i": 0.4}, {"rsum": 140.0}]
    for name, words in (("rsum", "dev rsum"), ("old", "")):
        numbers = cell_numbers(_run(tmp_path / name, words, dev))
        assert numbers["dev-curve"] == {1: 150.0, 2: 140.0}
        assert numbers["client-curve"] == {}
        assert numbers["curve-labels"] == ("dev rsum", "mean per-client dev score")


def test_a_method_selected_on_another_metric_is_named_not_drawn(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.axes
    import matplotlib.figure

    rsum = [{"rsum": 100.0 + r} for r in range(3)]
    hamming = [{"hash_smap_i2t": 0.5, "hash_smap_t2i": 0.5}] * 3
    chosen = {("fedavg", ""): [(0, None, cell_numbers(_run(tmp_path / "a0", "dev rsum", rsum))),
                               (1, None, cell_numbers(_run(tmp_path / "a1", "dev rsum", rsum)))],
              ("linear", ""): [(0, None, cell_numbers(_run(tmp_path / "l0", "dev Hamming label MAP", hamming)))]}
    drawn: list[str] = []
    texts: list[str] = []
    plot, text = matplotlib.axes.Axes.plot, matplotlib.figure.Figure.text
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, *a, label=None, **kw: drawn.append(label) or plot(ax, *a, label=label, **kw))
    monkeypatch.setattr(matplotlib.figure.Figure, "text",
                        lambda fig, x, y, s, **kw: texts.append(s) or text(fig, x, y, s, **kw))
    path = plot_setting(chosen, "a setting", tmp_path / "plot.png")
    assert path is not None and path.stat().st_size > 0
    assert drawn == ["fedavg (2 seeds)"]  # no client curve; linear not drawn on the rsum axis
    assert "not drawn: linear (selected on dev Hamming label MAP)" in texts
    assert not plot_setting({("linear", ""): [(0, None, None)]}, "nothing", tmp_path / "none.png")
