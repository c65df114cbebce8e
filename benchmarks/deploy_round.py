"""Round latency under the Deployment Engine, before vs after, and deployment vs simulation on one run config.

Three runs of the same run config (default method and hyper-parameters, full Flickr8k, 2 nodes):
- `deploy-before`: the loopback deployment (deploy/ scripts: TLS, SuperNode auth, 2 SuperNodes) of the code at
  `--baseline`, its nodes reading the full dataset folder with their partition ids;
- `deploy-after`: the same deployment of this tree, each node reading its materialised shard;
- `simulation`: this tree in Flower's simulation (`scripts.simulate`, Ray).
Node caches are node-private and seeded from `--warm-cache` with exactly each node's items, so no run encodes.
Prints per-round wall time, ClientApp process seconds per message (Flower's `clientapp-seconds` over the number of
messages) and the part of them not spent in local training, and the final metrics of the three runs.

    python -m benchmarks.deploy_round --data-dir ../shared/data/flickr8k --warm-cache .cache/features --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.clientapp_overhead import _export, seed_node_cache
from common.config import RunConfig
from common.data.shards import materialise
from scripts.deploy import stop
from scripts.simulate import free_port, run_status, simulate

PROJECT = Path(__file__).resolve().parents[1]
NODES = 2


def _script(env: dict[str, str], name: str, *args: str) -> str:
    out = subprocess.run([str(PROJECT / "deploy" / f"{name}.sh"), *args], env=env, cwd=PROJECT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=7200)
    if out.returncode != 0:
        raise RuntimeError(f"deploy/{name}.sh failed:\n{out.stdout[-3000:]}")
    return out.stdout


def deploy(app: Path, work: Path, node_data: list[tuple[str, list[str]]], run_config: str, warm: Path) -> dict:
    """One loopback deployment run of the app in `app`; node k reads node_data[k] = (data dir, node-config extras).
    A node with a materialised shard (`work.parent/shards/node-k`) gets a private cache of its items; one reading
    the full dataset shares the warm cache (read only: every item is in it)."""
    env = {**os.environ, "DEPLOY_DIR": str(work / "deploy"), "SUPERLINK_PORT": str(free_port()), "APP_DIR": str(app),
           "VENV_BIN": str(Path(sys.executable).parent)}
    names = [f"node-{k}" for k in range(len(node_data))]
    try:
        _script(env, "certs", *names)
        _script(env, "superlink")
        _script(env, "register", *names)
        for name, (data, extras) in zip(names, node_data):
            cache = work / "deploy" / "nodes" / name / "cache"
            if (work.parent / "shards" / name).is_dir():
                seed_node_cache(work.parent / "shards" / name, warm, cache)
            else:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.symlink_to(warm, target_is_directory=True)
            _script(env, "supernode", name, data, *extras)
        _script(env, "run", "--run-config", run_config)
        operator = {**env, "FLWR_HOME": str(work / "deploy" / "operator"),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
        return run_status(operator, "fedxmr")  # the connection deploy/env.sh writes
    finally:
        stop(work / "deploy")


def summary(run_dir: Path, ls: dict | None) -> dict:
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    train = [c["train-seconds"] for r in rounds for c in r["train"]["clients"]]
    out = {"round-s": [r["round-s"] for r in rounds], "test": json.loads((run_dir / "final.json").read_text())["test"],
           "train-s per message": statistics.mean(train)}
    if ls is not None:
        messages = 2 * NODES * len(rounds)  # a train and an evaluate message per node and round
        clientapp = ls["compute-time"]["clientapp-seconds"]
        out |= {"clientapp-s per message": clientapp / messages,
                "clientapp-s not training, per message": (clientapp - sum(train)) / messages,
                "elapsed-s": ls["elapsed"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDXMR_DATA_DIR", ""), help="full Flickr8k folder")
    parser.add_argument("--warm-cache", type=Path, required=True, help="a feature cache holding all of Flickr8k")
    parser.add_argument("--baseline", default="169345a", help="git ref of the code before (default 169345a)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--node-threads", type=int, help="torch threads per SuperNode (deploy/supernode.sh)")
    parser.add_argument("--runs", default="deploy-before,deploy-after,simulation", help="which of the three")
    args = parser.parse_args()
    if args.node_threads:
        os.environ["NODE_THREADS"] = str(args.node_threads)
    wanted = args.runs.split(",")
    data_dir, warm = str(Path(args.data_dir).resolve()), args.warm_cache.resolve()
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedxmr-deploy-round-") as tmp:
        work = Path(tmp)
        for k in range(NODES):
            materialise(RunConfig(), k, NODES, data_dir, work / "shards" / f"node-{k}")

        def config(name: str) -> str:
            return (f"num-server-rounds={args.rounds} data-dir='{data_dir}' cache-dir='{warm}' "
                    f"out-dir='{work / 'runs'}' run-name='{name}'")

        if "deploy-before" in wanted:
            full = [(data_dir, [f"partition-id={k}", f"num-partitions={NODES}"]) for k in range(NODES)]
            ls = deploy(_export(args.baseline, work / "baseline"), work / "before", full, config("deploy-before"),
                        warm)
            results["deploy-before"] = summary(work / "runs" / "deploy-before", ls)
        if "deploy-after" in wanted:
            shards = [(str(work / "shards" / f"node-{k}"), []) for k in range(NODES)]
            ls = deploy(PROJECT, work / "after", shards, config("deploy-after"), warm)
            results["deploy-after"] = summary(work / "runs" / "deploy-after", ls)
        if "simulation" in wanted:
            status = simulate(NODES, config("simulation"))
            if status.get("status") != "finished:completed":
                raise RuntimeError(f"simulation failed: {status.get('status-details')}")
            results["simulation"] = summary(work / "runs" / "simulation", None)
    print(json.dumps(results, indent=1))
    names = list(results)
    print(f"\n| | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    rows = {"round wall s (mean of rounds 1..R)": lambda r: f"{statistics.mean(r['round-s']):.1f}",
            "round wall s, each round": lambda r: " / ".join(f"{s:.0f}" for s in r["round-s"]),
            "ClientApp s per message": lambda r: f"{r.get('clientapp-s per message', float('nan')):.2f}",
            "  of which not local training": lambda r: f"{r.get('clientapp-s not training, per message', float('nan')):.2f}",
            "local training s per train message": lambda r: f"{r['train-s per message']:.2f}",
            "test rsum (best dev round)": lambda r: f"{r['test']['rsum']:.1f}",
            "test i2t R@1/5/10": lambda r: "/".join(f"{r['test'][f'i2t_r{k}']:.1f}" for k in (1, 5, 10)),
            "test t2i R@1/5/10": lambda r: "/".join(f"{r['test'][f't2i_r{k}']:.1f}" for k in (1, 5, 10)),
            "64-bit Hamming test rsum": lambda r: f"{r['test']['hash_rsum']:.1f}"}
    for label, cell in rows.items():
        print(f"| {label} | {' | '.join(cell(results[n]) for n in names)} |")


if __name__ == "__main__":
    main()
