"""Run outputs under `<out-dir>/<run-id>/`: config.json (resolved config), metrics.jsonl (one line per round),
weights.safetensors (the trainable weights of the best-dev round: the reported model; per-client models as
`<client>/<key>` for methods without a global model), strategy-state.npz (the strategy's state after the last round),
checkpoint.npz (rewritten after every round: what `resume` continues from),
convergence.png, clients.png (per-client test scores at the selected round),
router.png (RCSR: per-client router and aggregation weights per round),
summary.md (also printed) and final.json."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig
from common.data.federation import CLIENT_TYPES

_TABLE_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first plot (start-up stays light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class RunRecorder:
    """A new run dir (`config.json` with a fresh `run-key`, empty `metrics.jsonl`), or, for `resume`, the resumed
    one (see `resume_rounds`)."""

    def __init__(self, cfg: RunConfig, info: dict[str, Any]) -> None:
        self.cfg = cfg
        self.start = time.time()
        self.rounds: list[dict[str, Any]] = []
        if cfg.resume:  # common.preflight checked that it holds this config's run, with a checkpoint
            self.dir = Path(cfg.resume).expanduser().resolve()
            self.run_key = str(json.loads((self.dir / "config.json").read_text())["run-key"])
            return
        run_id = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.method}"
        self.dir = Path(cfg.out_dir).expanduser().resolve() / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_key = f"{run_id}-{secrets.token_hex(4)}"  # the nodes' state of this run, never of a namesake
        (self.dir / "config.json").write_text(json.dumps({"run": cfg.as_flat_dict(), "run-key": self.run_key,
                                                          **info}, indent=2))
        (self.dir / "metrics.jsonl").write_text("")

    def resume_rounds(self, last_round: int) -> None:
        """Keep the logged rounds up to the checkpoint's (a round logged after it is run again), and take them
        as this run's; a failed marker of the stopped run goes."""
        path = self.dir / "metrics.jsonl"
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        self.rounds = [r for r in map(json.loads, lines) if r["round"] <= last_round]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rounds))
        tmp.replace(path)
        (self.dir / "final.json").unlink(missing_ok=True)

    def log_round(self, record: dict[str, Any]) -> None:
        record = {"round": record.pop("round"), "elapsed-s": round(time.time() - self.start, 2), **record}
        self.rounds.append(record)
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def save_weights(self, arrays: dict[str, np.ndarray]) -> Path | None:
        """The reported model's weights; none when the models stay on the nodes (FedProto)."""
        from safetensors.numpy import save_file

        if not arrays:
            return None
        path = self.dir / "weights.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
        return path

    def _save(self, fig, name: str) -> Path:
        fig.tight_layout()
        path = self.dir / name
        fig.savefig(path, dpi=100)
        _pyplot().close(fig)
        return path

    def plot(self) -> Path:
        plt = _pyplot()

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        scored = [r for r in self.rounds if r.get("dev")]
        if scored:
            rounds = [r["round"] for r in scored]
            ax1.plot(rounds, [r["dev"]["rsum"] for r in scored], "o-", label="continuous")
            ax1.plot(rounds, [r["dev"]["hash_rsum"] for r in scored], "s-", label=f"{self.cfg.hash_bits}-bit Hamming")
            ax1.set(xlabel="round", ylabel="dev rsum", title="Dev retrieval (rsum of 6 recalls)")
        else:  # no global model: the mean per-client dev score selects the round
            clients = [r for r in self.rounds if r.get("client-dev", {}).get("summary")]
            ax1.plot([r["round"] for r in clients], [r["client-dev"]["summary"]["all-global-mean"] for r in clients],
                     "o-", label="mean client")
            ax1.set(xlabel="round", ylabel="per-client dev score", title="Per-client dev (mean R@1/5/10)")
        ax1.legend()
        trained = [r for r in self.rounds if r.get("train", {}).get("aggregate")]
        ax2.plot([r["round"] for r in trained], [r["train"]["aggregate"].get("train-loss", np.nan) for r in trained],
                 "o-")
        ax2.set(xlabel="round", ylabel="mean client train loss", title="Training loss")
        fig.suptitle(f"{self.dir.name}: {self.cfg.method}")
        return self._save(fig, "convergence.png")

    def plot_clients(self, clients: list[dict[str, Any]]) -> Path | None:
        """Bars per client (selected round): global model vs global + personal adapters, grouped by client type."""
        clients = [c for c in clients if "global-score" in c]
        if not clients:
            return None
        plt = _pyplot()

        types = list(CLIENT_TYPES)
        x = np.arange(len(clients))
        fig, ax = plt.subplots(figsize=(max(6, len(clients) * 0.7), 4))
        ax.bar(x - 0.2, [c["global-score"] for c in clients], 0.4, label="global")
        if all("personal-score" in c for c in clients):
            ax.bar(x + 0.2, [c["personal-score"] for c in clients], 0.4, label="global + personal")
        ax.set_xticks(x, [f"{int(c['partition-id'])}\n{types[int(c['client-type'])]}" for c in clients], fontsize=7)
        ax.set(ylabel="mean R@1/5/10 over own queries (%)", title=f"{self.dir.name}: per-client test (selected round)")
        ax.legend(loc="lower right")
        return self._save(fig, "clients.png")

    def plot_router(self) -> Path | None:
        """Heatmaps (client x round) of the router's weights and of the final aggregation weights, for strategies
        that report `router-weight` per client (RCSR)."""
        rows = [(r["round"], c) for r in self.rounds for c in r.get("train", {}).get("clients", [])
                if "router-weight" in c]
        if not rows:
            return None
        plt = _pyplot()

        rounds = sorted({rnd for rnd, _ in rows})
        clients = sorted({(int(c["partition-id"]), int(c["client-type"])) for _, c in rows})
        types = list(CLIENT_TYPES)
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.4 * len(clients) + 2))
        for ax, key, title in zip(axes, ("router-weight", "weight"), ("router weight r", "aggregation weight")):
            grid = np.full((len(clients), len(rounds)), np.nan)
            for rnd, c in rows:
                grid[clients.index((int(c["partition-id"]), int(c["client-type"]))), rounds.index(rnd)] = c[key]
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(clients)), [f"{pid} {types[t]}" for pid, t in clients], fontsize=7)
            ax.set_xticks(range(len(rounds)), rounds, fontsize=7)
            ax.set(xlabel="round", title=title)
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"{self.dir.name}: per-client weights ({self.cfg.options.router} router)")
        return self._save(fig, "router.png")

    def plot_layer_weights(self, selected_round: int) -> Path | None:
        """Heatmaps (client x client, one per layer) of the per-layer aggregation weights each client was sent in
        the selected round, for strategies that report `layer-weights` per client (PLFedCMH)."""
        rows = [c for r in self.rounds if r["round"] == selected_round for c in r.get("train", {}).get("clients", [])
                if "layer-weights" in c]
        if not rows:
            return None
        plt = _pyplot()
        rows.sort(key=lambda c: int(c["partition-id"]))
        layers = sorted(rows[0]["layer-weights"])
        n = len(rows[0]["layer-weights"][layers[0]])
        cols = min(4, len(layers))
        lines = (len(layers) + cols - 1) // cols
        fig, axes = plt.subplots(lines, cols, figsize=(3.2 * cols, 3.0 * lines), squeeze=False)
        for ax, layer in zip(axes.ravel(), layers):
            grid = np.full((n, n), np.nan)
            for c in rows:
                grid[int(c["partition-id"])] = c["layer-weights"][layer]
            im = ax.imshow(grid, vmin=0.0, cmap="viridis")
            ax.set(title=layer, xlabel="from client", ylabel="to client")
            fig.colorbar(im, ax=ax, fraction=0.046)
        for ax in axes.ravel()[len(layers):]:
            ax.axis("off")
        fig.suptitle(f"{self.dir.name}: per-layer aggregation weights at the selected round {selected_round}")
        return self._save(fig, "layer-weights.png")

    def fail(self, reason: str) -> None:
        """Mark the run dir failed (`final.json` status and `summary.md`), with the rounds that were logged."""
        (self.dir / "final.json").write_text(json.dumps({"status": "failed", "reason": reason,
                                                         "rounds-logged": len(self.rounds)}, indent=2))
        (self.dir / "summary.md").write_text("\n".join([f"# {self.dir.name}", "", f"**Run failed**: {reason}",
                                                        *_rejection_lines(self.rounds), ""]))

    def summary(self, best_round: int, dev: dict[str, float], test: dict[str, float], extra: dict[str, Any]) -> str:
        bits = self.cfg.hash_bits
        head = "| split | ranking | " + " | ".join(k.replace("_", " ") for k in _TABLE_KEYS) + " |"
        lines = [head, "|" + "---|" * (len(_TABLE_KEYS) + 2)]
        for split, m in (("dev", dev), ("test", test)) if test else ():
            for label, prefix in (("continuous", ""), (f"{bits}-bit Hamming", "hash_")):
                lines.append(f"| {split} | {label} | " + " | ".join(f"{m[prefix + k]:.1f}" for k in _TABLE_KEYS) + " |")
        map_keys = ("map_i2t", "map_t2i", "mapr_i2t", "mapr_t2i", "smap_i2t", "smap_t2i")
        maps = [f"| {split} | " + " | ".join(f"{m['hash_' + k]:.3f}" if "hash_" + k in m else "–"
                                               for k in map_keys) + " |"
                for split, m in ((("dev", dev), ("test", test)) if test else ())]
        # a precomputed-feature dataset (backbone identity) brings its own labels
        labels = "the dataset's labels" if self.cfg.backbone == "identity" else "DERIVED concept labels"
        text = "\n".join([
            f"# {self.dir.name}",
            "",
            f"method {self.cfg.method}, backbone {self.cfg.backbone}, {extra.get('clients', '?')} clients, "
            f"{self.cfg.num_server_rounds} rounds, wall {time.time() - self.start:.0f} s; "
            f"test evaluated once, at the best dev round ({best_round}, by {extra.get('selected-on', 'dev rsum')}).",
            "",
            *(lines if test else ["No global model: every client is scored with its own model (below)."]),
            "",
            *([f"{bits}-bit Hamming-ranking MAP over {labels} (relevant = shares >= 1 label; tie-aware "
               "MAP@all and MAP@R, and the standard MAP@all of the hashing papers, ties in database order):", "",
               "| split | MAP@all i2t | MAP@all t2i | MAP@R i2t | MAP@R t2i | std MAP i2t | std MAP t2i |",
               "|---|---|---|---|---|---|---|", *maps, ""] if test else []),
            *_privacy_lines(extra.get("privacy", {})),
            *_client_lines(extra.get("per-client", {}).get("summary", {})),
            *_rejection_lines(self.rounds),
        ])
        (self.dir / "summary.md").write_text(text)
        (self.dir / "final.json").write_text(json.dumps(
            {"best-round": best_round, "dev": dev, "test": test, **extra}, indent=2))
        return text


def _privacy_lines(privacy: dict[str, Any]) -> list[str]:
    """The run's client-level DP in one line (fedxmr_server/privacy.py), if it ran under DP."""
    if not privacy:
        return []
    return [f"Client-level DP ({privacy['side']} side): (ε = {privacy['epsilon']:.2f}, δ = {privacy['delta']:.2g}) "
            f"after {privacy['rounds-released']} released rounds; noise multiplier {privacy['noise-multiplier']:.3f}, "
            f"update clip {privacy['clip']:g}; accounting: {privacy['accounting']}.", ""]


def _rejection_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """Train replies left out (failed nodes, screened-out updates), per node: in how many rounds and why."""
    by_node: dict[Any, list[tuple[int, str]]] = {}
    for r in rounds:
        for rej in r.get("train", {}).get("rejected", []):
            by_node.setdefault(rej["node-id"], []).append((r["round"], rej["reason"]))
    if not by_node:
        return ["", "Train replies left out: none."]
    total = sum(len(v) for v in by_node.values())
    lines = ["", f"Train replies left out: {total} (node, rounds, first reason; every one is in metrics.jsonl):", "",
             "| node | rounds | first reason |", "|---|---|---|"]
    for node, items in sorted(by_node.items(), key=lambda kv: str(kv[0])):
        reason = items[0][1][:200].replace("|", "/")
        lines.append(f"| {node} | {', '.join(str(rnd) for rnd, _ in items)} | {reason} |")
    return lines


def _client_lines(summary: dict[str, float]) -> list[str]:
    """Per-client test scores (selected round) by client type: mean / worst / std over clients."""
    if not summary:
        return []
    lines = ["Per-client test score (mean R@1/5/10 of each client's own test queries against the shared test gallery "
             "embedded by its model, at the selected round):", "",
             "| clients | n | global mean | worst | std | +personal mean | worst | std |",
             "|---|---|---|---|---|---|---|---|"]
    for group in ("all", *CLIENT_TYPES):
        if f"{group}-global-mean" not in summary:
            continue
        row = [group, f"{summary[f'{group}-global-clients']:.0f}"]
        for variant in ("global", "personal"):
            row += [f"{summary[f'{group}-{variant}-{s}']:.1f}" if f"{group}-{variant}-mean" in summary else "-"
                    for s in ("mean", "worst", "std")]
        lines.append("| " + " | ".join(row) + " |")
    maps = [group for group in ("all", *CLIENT_TYPES) if f"{group}-global-smap_i2t-mean" in summary
            or f"{group}-global-smap_t2i-mean" in summary]
    if maps:
        lines += ["", "Per-client standard Hamming MAP@all (clients whose queries have labels: a Flickr8k "
                  "image-only client has none, its labels would come from captions):", "",
                  "| clients | MAP i2t mean | worst | MAP t2i mean | worst |", "|---|---|---|---|---|"]
        for group in maps:
            cells = [f"{summary[k]:.3f}" if k in summary else "-" for d in ("i2t", "t2i")
                     for k in (f"{group}-global-smap_{d}-mean", f"{group}-global-smap_{d}-worst")]
            lines.append("| " + " | ".join([group, *cells]) + " |")
    return lines + [""]
