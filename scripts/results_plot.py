"""The convergence plot of one setting of a results grid (`scripts.results` writes it beside the results file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_setting(chosen: dict[tuple[str, str], list], title: str, path: Path) -> Path | None:
    """Dev rsum of the global model (left) and mean per-client dev score (right) per round: mean over seeds with
    a ± std band, for each method (`chosen`: one variant per method, its cells over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = False
    for (method, _), cells in chosen.items():
        for ax, curve in zip(axes, ("dev-curve", "client-curve")):
            curves = [n[curve] for _, _, n in cells if n and n[curve]]
            rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not rounds:
                continue
            values = np.array([[c[r] for r in rounds] for c in curves])
            mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(rounds))
            ax.plot(rounds, mean, "o-", ms=3, label=f"{method} ({len(curves)} seeds)")
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(xlabel="round", ylabel="dev rsum (global model)", title="Server dev, global model")
    axes[1].set(xlabel="round", ylabel="mean per-client dev score", title="Per-client dev (own model for local/fedproto)")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
