"""What a round costs as the federation grows, with the same 10 clients sampled per round: simulated federations of
10 to 5,000 clients (Flower's simulation, Ray), and a deployment of SuperNode processes on loopback (TLS, node auth).

    python -m benchmarks.scale --data-dir ../shared/data/flickr8k --cache-dir .cache/features \
        [--sizes 10,100,1000,5000] [--rounds 5] [--sampled 10] [--deploy-nodes 20] [--deploy-rounds 2]

Each simulated run: FedAvg, IID, `fraction-train` = `fraction-evaluate` = sampled / clients, per-client dev
evaluation in the last round only, `test-clients` = sampled, warm feature cache, `--items-per-client` train images
per client (the first images of the split), so that the sampled clients' local work is the same in every row
(Flickr8k's 6,000 train images give 5,000 clients 1.2 each: there some hold one image, too few to train, and their
replies are left out; the table's "usable" says how many). Per run it prints:
- boot s: `flwr run` start until the ServerApp starts (Flower, the managed SuperLink, Ray with its actors);
- start s: ServerApp start until round 1 begins (its dev/test features, the initial model's dev score);
- round s: median wall time of rounds 1..R (train messages, aggregation, dev scoring);
- end s: the last round's end until final.json (final per-client test of the sampled clients, reports);
- peak RSS MB of the process that runs the ServerApp and of the largest process that runs ClientApps (a Ray actor;
  under the Deployment Engine a ClientApp process), sampled every 0.5 s from /proc: an idle machine is assumed;
- MB per round: the train messages' arrays, down + up;
- the nodes that received any message (`query` replies counted by the server: each node is asked once).
Run it on an otherwise idle machine: the rows are compared with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from scripts.simulate import simulate

# process roles by command line: the process that runs the ServerApp, and one that runs ClientApps (a Ray actor in
# simulation, a per-message process under the Deployment Engine)
ROLES = {"server": ("flwr-simulation", "flower-simulation", "flwr-serverapp"),
         "client": ("ClientAppActor", "flwr-clientapp")}


class PeakRss:
    """Samples every process's resident memory and keeps the largest per role (by command line)."""

    def __init__(self, period: float = 0.5) -> None:
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    cmd += " " + Path(f"/proc/{pid}/comm").read_text()
                    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                               if line.startswith("VmRSS:")) / 1024
                except (OSError, StopIteration):
                    continue
                for role, marks in ROLES.items():
                    if any(mark in cmd for mark in marks):
                        self.peak[role] = max(self.peak.get(role, 0.0), rss)


def phases(run_dir: Path, launched: float) -> dict:
    """Boot, start, rounds and end of one run from its files (config.json is written when the ServerApp starts,
    final.json when it ends; metrics.jsonl's `elapsed-s` counts from the ServerApp's start)."""
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    began = (run_dir / "config.json").stat().st_mtime
    trained = [r for r in rounds if r["round"] > 0]
    final = json.loads((run_dir / "final.json").read_text())
    return {"boot-s": began - launched, "start-s": rounds[0]["elapsed-s"],
            "round-s": statistics.median(r["round-s"] for r in trained),
            # the round's phases: train messages (send to last reply), aggregation + server dev scoring; and per
            # train message, the client's own work (shard load, local training)
            "train-msgs-s": statistics.median(r["train-s"] for r in trained),
            "aggregate-dev-s": statistics.median(r["aggregate-and-dev-s"] for r in trained),
            "client-load-s": statistics.median(c["load-seconds"] for r in trained for c in r["train"]["clients"]),
            "client-train-s": statistics.median(c["train-seconds"] for r in trained for c in r["train"]["clients"]),
            "end-s": (run_dir / "final.json").stat().st_mtime - began - rounds[-1]["elapsed-s"],
            "MB/round": statistics.mean(r["train"]["download-bytes"] + r["train"]["upload-bytes"]
                                        for r in trained) / 1e6,
            "sampled": statistics.mean(r["train"]["replies"] for r in trained),
            "usable": statistics.mean(r["train"]["usable"] for r in trained),
            "left out": sorted({x["reason"][:60] for r in trained for x in r["train"].get("rejected", [])}),
            "tested": len(final["per-client"]["clients"]), "test-rsum": final["test"]["rsum"]}


def simulated(clients: int, args: argparse.Namespace, out: Path) -> dict:
    fraction = min(1.0, args.sampled / clients)
    name = f"scale-{clients}"
    config = (f"num-server-rounds={args.rounds} fraction-train={fraction} fraction-evaluate={fraction} "
              f"test-clients={args.sampled} client-eval-every={args.rounds} min-nodes=1 "
              f"max-train-images={args.items_per_client * clients if args.items_per_client else 0} "
              f"data-dir='{Path(args.data_dir).resolve()}' cache-dir='{Path(args.cache_dir).resolve()}' "
              f"out-dir='{out}' run-name='{name}'")
    launched = time.time()
    with PeakRss() as rss:
        status = simulate(clients, config, log_path=out / f"{name}.log")
    if status.get("status") != "finished:completed":
        raise RuntimeError(f"{name}: {status.get('status')} {status.get('status-details', '')[-1500:]}")
    return {"clients": clients, **phases(out / name, launched), "wall-s": time.time() - launched,
            "server MB": rss.peak.get("server"), "client MB": rss.peak.get("client")}


def deployed(nodes: int, args: argparse.Namespace, out: Path) -> dict:
    """A loopback deployment (deploy/ scripts) of `nodes` SuperNodes reading the full dataset by partition id."""
    from benchmarks.deploy_round import deploy

    data = str(Path(args.data_dir).resolve())
    name = f"deploy-{nodes}"
    config = (f"num-server-rounds={args.deploy_rounds} client-eval-every={args.deploy_rounds} "
              f"data-dir='{data}' cache-dir='{Path(args.cache_dir).resolve()}' out-dir='{out}' run-name='{name}'")
    launched = time.time()
    node_data = [(data, [f"partition-id={k}", f"num-partitions={nodes}"]) for k in range(nodes)]
    with PeakRss() as rss:
        ls = deploy(Path(__file__).resolve().parents[1], out / "work", node_data, config,
                    Path(args.cache_dir).resolve())
    if ls.get("status") != "finished:completed":
        raise RuntimeError(f"{name}: {ls.get('status')} {ls.get('status-details', '')[-1500:]}")
    return {"clients": f"{nodes} SuperNodes", **phases(out / name, launched), "wall-s": time.time() - launched,
            "server MB": rss.peak.get("server"), "client MB": rss.peak.get("client")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDXMR_DATA_DIR", ""), help="full Flickr8k folder")
    parser.add_argument("--cache-dir", required=True, help="a warm feature cache of the whole dataset")
    parser.add_argument("--sizes", default="10,100,1000,5000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sampled", type=int, default=10, help="clients per round, per evaluation and in the test")
    parser.add_argument("--items-per-client", type=int, default=6,
                        help="train images per client (max-train-images = this x clients, at most the whole split), "
                             "so that every row's clients do the same local work; 0: the whole split")
    parser.add_argument("--deploy-nodes", type=int, default=20, help="0: no deployment run")
    parser.add_argument("--deploy-rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedxmr-scale-") as tmp:
        for clients in (int(s) for s in args.sizes.split(",") if s):
            rows.append(simulated(clients, args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
        if args.deploy_nodes:
            rows.append(deployed(args.deploy_nodes, args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| clients | boot s | start s | round s (median) | of which train messages s | aggregation + dev s "
          "| per client: load s / train s | end s | server peak MB | client peak MB | MB/round "
          "| trained per round (usable) | tested | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mb = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"| {r['clients']} | {r['boot-s']:.1f} | {r['start-s']:.1f} | {r['round-s']:.1f} | {r['train-msgs-s']:.1f} "
              f"| {r['aggregate-dev-s']:.1f} | {r['client-load-s']:.2f} / {r['client-train-s']:.2f} | {r['end-s']:.1f} | "
              f"{mb(r['server MB'])} | {mb(r['client MB'])} | {r['MB/round']:.1f} | {r['sampled']:.0f} ({r['usable']:.1f}) | "
              f"{r['tested']} | {r['wall-s']:.0f} |")


if __name__ == "__main__":
    main()
