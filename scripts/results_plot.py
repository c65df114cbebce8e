"""The convergence plot of one setting of a results grid (`scripts.results` writes it beside the results file): the
dev score that selected each run's round, per round."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np


def plot_setting(chosen: dict[tuple[str, str], list], title: str, path: Path) -> Path | None:
    """Per round, the dev score each run selected its round on (`select-on`): on the global model (left) and the mean
    per-client one (right); mean over seeds with a ± std band, for each method (`chosen`: one variant per method, its
    cells over seeds). Methods selected on another metric than most (e.g. `linear` on Hamming MAP in a setting
    selected on rsum) are named under the plot instead of drawn on an axis of another metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {method: label for (method, _), cells in chosen.items()  # one select-on per method and setting
              if (label := next((n["curve-labels"] for _, _, n in cells if n), None))}
    if not labels:
        return None
    axis_labels = Counter(labels.values()).most_common(1)[0][0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn, elsewhere = False, []
    for (method, _), cells in chosen.items():
        if labels.get(method, axis_labels) != axis_labels:
            elsewhere.append(f"{method} (selected on {labels[method][0]})")
            continue
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
    axes[0].set(xlabel="round", ylabel=axis_labels[0], title="Server dev, global model")
    axes[1].set(xlabel="round", ylabel=axis_labels[1], title="Per-client dev (own model for local/fedproto)")
    if elsewhere:
        fig.text(0.5, 0.01, "not drawn: " + ", ".join(elsewhere), ha="center", fontsize=8)
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 if elsewhere else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
