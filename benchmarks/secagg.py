"""What secure aggregation (SecAgg+) costs per round: the same FedAvg run with and without it, side by side.

    python -m benchmarks.secagg --data-dir ../shared/data/flickr8k --cache-dir .cache/features \
        [--clients 10] [--rounds 3] [--pairs 2]

Each pair runs the plain and the secure run one after the other (same seed, the demo model, IID, every client every
round, per-client evaluation in the last round only), so load on the machine hits both alike. Per run it prints the
median over rounds of: the train phase's wall seconds (messages out to the mean in hand; under SecAgg+ its four
stages), and the MB per round down (server -> nodes) and up. Plain rounds count the arrays the messages carry
(configs and metrics are a few kB); secure rounds count every record, since SecAgg+'s keys, shares and masked vectors
travel in configs. Last: the dev rsum of the final round (SecAgg+ quantises; the two should agree to noise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from scripts.simulate import simulate


def _run(clients: int, rounds: int, secure: bool, data_dir: str, cache_dir: str, out: Path, name: str) -> dict:
    config = (f"num-server-rounds={rounds} client-eval-every={rounds} secure-aggregation={str(secure).lower()} "
              f"data-dir='{data_dir}' cache-dir='{cache_dir}' out-dir='{out}' run-name='{name}'")
    status = simulate(clients, config, log_path=out / f"{name}.log")
    if status.get("status") != "finished:completed":
        raise SystemExit(f"{name} failed: {status} (log: {out / name}.log)")
    rounds_ = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()][1:]
    row = {"run": name, "train-s": statistics.median(r["train-s"] for r in rounds_),
           "down-MB": statistics.median(r["train"]["download-bytes"] for r in rounds_) / 1e6,
           "up-MB": statistics.median(r["train"]["upload-bytes"] for r in rounds_) / 1e6,
           "dev-rsum": rounds_[-1]["dev"]["rsum"]}
    if secure:
        stages = [r["train"]["secagg"]["stages"] for r in rounds_]
        row["stage-s"] = [round(statistics.median(s[i]["seconds"] for s in stages), 2) for i in range(4)]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    data_dir, cache_dir = str(Path(args.data_dir).resolve()), str(Path(args.cache_dir).resolve())
    out = Path(tempfile.mkdtemp(prefix="fedxmr-secagg-"))
    rows = []
    for pair in range(args.pairs):
        for secure in (False, True):
            rows.append(_run(args.clients, args.rounds, secure, data_dir, cache_dir, out,
                             f"{'secagg' if secure else 'plain'}-{pair}"))
            print(json.dumps(rows[-1]), flush=True)
    plain = statistics.median(r["train-s"] for r in rows if r["run"].startswith("plain"))
    secure = statistics.median(r["train-s"] for r in rows if r["run"].startswith("secagg"))
    print(f"\n{args.clients} clients, {args.rounds} rounds x {args.pairs} pairs; train phase median: "
          f"plain {plain:.2f} s, SecAgg+ {secure:.2f} s (x{secure / plain:.2f})")
    print("| run | train s / round | MB down / round | MB up / round | stage s (setup, keys, masked, unmask) | "
          "dev rsum, last round |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['train-s']:.2f} | {r['down-MB']:.2f} | {r['up-MB']:.2f} | "
              f"{', '.join(map(str, r.get('stage-s', []))) or '–'} | {r['dev-rsum']:.1f} |")


if __name__ == "__main__":
    main()
