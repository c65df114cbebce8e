"""Where a warm simulated round's time goes, with the old and the new actor settings side by side in one run.

Runs the README demo config (FedAvg, 10 IID clients, 20 rounds, warm feature cache) twice through `flwr run .`:
2 Ray CPUs and 2 torch threads per ClientApp (the old default) and 1 CPU / 1 thread (the new default: as many
actors as cores). Prints, per setting, the median over warm rounds (2..N) of each phase, from `metrics.jsonl`:
train messages (send to last reply) split into the slowest client's own work (shard load + training) and the rest
(framework: scheduling, (de)serialisation, polling, waiting for a core); aggregation + server dev scoring; per-client
evaluation messages; then the wall time of all rounds and the final test rsum (the settings must not change it).

    python -m benchmarks.simulation_round --data-dir ../shared/data/flickr8k [--rounds 20 --clients 10]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from statistics import median

from scripts.simulate import simulate

SETTINGS = {"2 CPUs, 2 threads per client (old)": (2, "2"), "1 CPU, 1 thread per client (new)": (1, "1")}


def phases(run_dir: Path) -> dict[str, float]:
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warm = [r for r in rounds if r["round"] >= 2]
    client = [max(c.get("train-seconds", 0) + c.get("load-seconds", 0) for c in r["train"]["clients"]) for r in warm]
    out = {"round": median(r["round-s"] for r in warm), "train messages": median(r["train-s"] for r in warm),
           "  slowest client's work": median(client),
           "  framework": median(r["train-s"] - c for r, c in zip(warm, client)),
           "aggregate + server dev": median(r["aggregate-and-dev-s"] for r in warm),
           "client evaluation": median(r["client-eval-s"] for r in warm)}
    final = json.loads((run_dir / "final.json").read_text())
    return out | {"wall, all rounds": rounds[-1]["elapsed-s"], "test rsum": final["test"]["rsum"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--cache-dir", default=str(Path(".cache/features").resolve()))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedxmr-bench-"))
    results = {}
    for name, (cpus, threads) in SETTINGS.items():
        run = f"bench-{cpus}cpu"
        os.environ["OMP_NUM_THREADS"] = threads
        status = simulate(args.clients, f"num-server-rounds={args.rounds} data-dir='{Path(args.data_dir).resolve()}' "
                                        f"cache-dir='{args.cache_dir}' out-dir='{out}' run-name='{run}'", cpus)
        if status.get("status") != "finished:completed":
            raise SystemExit(f"{name}: run failed: {status.get('status-details', '')[-2000:]}")
        results[name] = phases(out / run)
    names = list(results)
    print(f"\nwarm round breakdown, median over rounds 2..{args.rounds}, seconds ({args.clients} clients):\n")
    print(f"| phase | {' | '.join(names)} | ratio |")
    print("|---|" + "---|" * (len(names) + 1))
    for key in results[names[0]]:
        a, b = results[names[0]][key], results[names[1]][key]
        ratio = f"{a / b:.2f}x" if key != "test rsum" and b else ("same" if a == b else f"differs by {b - a:+.2f}")
        print(f"| {key} | {a:.2f} | {b:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
