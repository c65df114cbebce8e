"""Utility against ε from the privacy grid's records: test rsum and 64-bit standard Hamming MAP (i2t) per setting,
mean ± std over seeds, one point per ε (no DP drawn at the right, as ∞).

    python -m scripts.privacy_plot [docs/PRIVACY-GRID.json] [docs/PRIVACY-utility.png]

Methods are read by label: `fedavg-nodp` (ε = ∞) and `fedavg-eps<E>` (`grids/privacy.toml`).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABEL = re.compile(r"fedavg-(?:eps(?P<eps>[0-9.]+)|nodp)$")
METRICS = {"rsum": "test rsum", "hash_smap_i2t": "64-bit std MAP i2t"}


def points(records: list[dict], setting: str, metric: str) -> list[tuple[float, float, float]]:
    """(ε, mean, std) of `metric` in `setting`, ε = inf for the run without DP, in ε order."""
    out = []
    for r in records:
        m = LABEL.match(r["method"])
        if r["setting"] == setting and r["metric"] == metric and m and r["mean"] is not None:
            out.append((float(m["eps"]) if m["eps"] else float("inf"), r["mean"], r["std"] or 0.0))
    return sorted(out)


def plot(records: list[dict], out: Path) -> None:
    settings = sorted({r["setting"] for r in records if LABEL.match(r["method"])})
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
    for ax, (metric, title) in zip(axes, METRICS.items()):
        finite = sorted({p[0] for s in settings for p in points(records, s, metric) if p[0] != float("inf")})
        right = 2 * max(finite, default=1.0)  # where ∞ (no DP) is drawn, the same for every setting
        for setting in settings:
            pts = points(records, setting, metric)
            xs = [p[0] if p[0] != float("inf") else right for p in pts]
            ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=setting)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([*finite, right], [*(f"{t:g}" for t in finite), "∞ (no DP)"])
        ax.set_xlabel("ε (client level)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str]) -> None:
    src = Path(argv[0]) if argv else Path("docs/PRIVACY-GRID.json")
    out = Path(argv[1]) if len(argv) > 1 else src.with_name("PRIVACY-utility.png")
    plot(json.loads(src.read_text()), out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
