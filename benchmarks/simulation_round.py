"""Where a warm simulated round's time goes, before and after the speed-ups, side by side in one run.

Runs the `make demo` config (FedAvg, 10 IID clients, 20 rounds, warm feature cache) through `flwr run .` with:
- "2 CPUs / 2 threads, no memo": the settings of the first release (2 Ray CPUs and 2 torch threads per ClientApp,
  every message re-reads its shard from disk, per-client dev every round);
- "1 CPU / 1 thread, no memo": as many actors as cores;
- "+ shard memo": a Ray actor keeps the shards it loaded (fedxmr_client/node.py), same metrics;
- "+ client-eval-every 4": per-client dev every 4th round (and the last); the server still scores dev every round,
  so FedAvg's selection and test numbers do not change (`make demo` uses these settings).
Prints, per setting, the median over warm rounds (2..N) of each phase, from `metrics.jsonl`: train messages (send to
last reply) split into the clients' own work (shard loads and training, summed over clients, and divided by the
cores) and the rest (framework: scheduling, (de)serialisation, polling); aggregation + server dev scoring; per-client
evaluation messages (mean over rounds: they are not every round in the last setting); then the wall time of all
rounds and the final test rsum (which must not change).

    python -m benchmarks.simulation_round --data-dir ../shared/data/flickr8k [--rounds 20 --clients 10]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from statistics import mean, median

from fedxmr_client.node import MEMO_ENV
from scripts.simulate import simulate

CORES = os.cpu_count() or 1
# name: (Ray CPUs per client, torch threads, shard memo, client-eval-every)
SETTINGS = {"2 CPUs / 2 threads, no memo": (2, "2", "0", 1), "1 CPU / 1 thread, no memo": (1, "1", "0", 1),
            "+ shard memo": (1, "1", "1", 1), "+ client-eval-every 4": (1, "1", "1", 4)}


def phases(run_dir: Path) -> dict[str, float]:
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warm = [r for r in rounds if r["round"] >= 2]
    load = [sum(c.get("load-seconds", 0) for c in r["train"]["clients"]) for r in warm]
    train = [sum(c.get("train-seconds", 0) for c in r["train"]["clients"]) for r in warm]
    work = [(a + b) / CORES for a, b in zip(load, train)]
    final = json.loads((run_dir / "final.json").read_text())
    return {"round": median(r["round-s"] for r in warm), "train messages": median(r["train-s"] for r in warm),
            "  shard loads (all clients, core-s)": median(load), "  training (all clients, core-s)": median(train),
            "  framework (train messages - work / cores)": median(r["train-s"] - w for r, w in zip(warm, work)),
            "aggregate + server dev": median(r["aggregate-and-dev-s"] for r in warm),
            "client evaluation (mean)": mean(r["client-eval-s"] for r in warm),
            "wall, all rounds": rounds[-1]["elapsed-s"], "test rsum": final["test"]["rsum"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--cache-dir", default=str(Path(".cache/features").resolve()))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedxmr-bench-"))
    results = {}
    for i, (name, (cpus, threads, memo, every)) in enumerate(SETTINGS.items()):
        run = f"bench-{i}"
        os.environ["OMP_NUM_THREADS"], os.environ[MEMO_ENV] = threads, memo
        status = simulate(args.clients, f"num-server-rounds={args.rounds} data-dir='{Path(args.data_dir).resolve()}' "
                                        f"cache-dir='{args.cache_dir}' out-dir='{out}' run-name='{run}' "
                                        f"client-eval-every={every}", cpus)
        if status.get("status") != "finished:completed":
            raise SystemExit(f"{name}: run failed: {status.get('status-details', '')[-2000:]}")
        results[name] = phases(out / run)
    names = list(results)
    print(f"\nwarm round breakdown, median over rounds 2..{args.rounds}, seconds ({args.clients} clients, "
          f"{CORES} cores):\n")
    print(f"| phase | {' | '.join(names)} | first / last |")
    print("|---|" + "---|" * (len(names) + 1))
    for key in results[names[0]]:
        values = [results[n][key] for n in names]
        first, last = values[0], values[-1]
        ratio = (f"{first / last:.2f}x" if key != "test rsum" and last else
                 "same" if len(set(values)) == 1 else "DIFFERS")
        print(f"| {key} | {' | '.join(f'{v:.2f}' for v in values)} | {ratio} |")


if __name__ == "__main__":
    main()
