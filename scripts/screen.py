"""A dev screen through the real ServerApp and ClientApp in one process (no Ray, no SuperLink): the nodes' messages
are delivered by the tests' in-process grid (`tests/inprocess.py`), so a screen runs exactly the code a
`flwr run .` cell runs, with every round's dev scores in `<out-dir>/<name>/metrics.jsonl`.

    python -m scripts.screen NAME [clients=10] key=value ...   (run-config overrides)

Defaults: Flickr8k beside the project, the pairwise hash loss, per-client evaluation only in the last round. A screen
chooses on dev; its test numbers (scored once, at the round selected on dev) are not results: those come from the
harness (`scripts/grid.py`), several seeds each.
"""

from __future__ import annotations

import sys
import time

import torch


def main() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import parse_run_config
    from fedxmr_server.app import _run
    from scripts.inproc import _value
    from tests.inprocess import InProcessGrid, server_context

    torch.set_num_threads(1)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # as the tests set it
    name, *pairs = sys.argv[1:]
    overrides = {k: _value(v) for k, v in (p.split("=", 1) for p in pairs)}
    clients = int(overrides.pop("clients", 10))
    keys = {"data-dir": "../shared/data/flickr8k", "cache-dir": ".cache/features", "out-dir": "runs/screens",
            "run-name": name, "hash-loss": "pairwise", "client-eval-every": 10_000} | overrides
    cfg = parse_run_config(keys).as_flat_dict()
    start = time.perf_counter()
    _run(InProcessGrid(cfg, [10 + i for i in range(clients)]), server_context(cfg))
    print(f"screen {name}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
