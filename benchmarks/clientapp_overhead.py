"""Per-message ClientApp overhead in the deployment setting, before vs after, side by side.

The Deployment Engine starts a fresh `flwr-clientapp` process for every message. Besides the work itself, that
process pays the interpreter start, Flower's runtime imports, the app's imports (torch), and in the handler the
node's shard, its cached features and the model; torch.optim imported torch._dynamo on first use. This script
runs the real handlers in fresh processes (one torch thread each), phase by phase, for one node of the default run
config (partition 0 of 10 of the full Flickr8k train split, a warm node-private feature cache, one local epoch:
the update is bit-identical before and after), for a train and an evaluate message, and for three setups:

- `baseline`: the code at `--baseline` (git ref), the node reading the full dataset folder and cutting its partition;
- `full-data`: this tree, the same full dataset folder;
- `shard`: this tree, the node reading its materialised shard directory (`common.data.shards`).

Flower's own per-message work (pulling the message and FAB from the SuperNode, installing the FAB, pushing the
reply) and its polling (the SuperNode polls the SuperLink every 3 s when idle, its SuperExec polls every 1 s) come
on top and are the same for all three.

    python -m benchmarks.clientapp_overhead --data-dir ../shared/data/flickr8k --warm-cache .cache/features
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PHASES = ("interpreter start", "flwr runtime import", "app import (torch)", "first optimizer use",
          "handler: shard + features", "handler: local training, 1 epoch", "handler: rest (model, scoring, reply)")


def probe(message: str, data_dir: str, cache_dir: str, node_config: dict, spawned: float) -> dict:
    """Run inside the fresh process: what a flwr-clientapp process does for one message, timed per phase."""
    marks = [time.time()]
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  (what `flwr-clientapp` imports first)
    marks.append(time.time())
    import fedxmr_client.app as client_app  # what Flower's app loader imports
    marks.append(time.time())
    loads: list[float] = []
    load_shard = client_app.load_shard

    def timed_load(*args: object) -> object:  # the handlers' own call, timed in place
        start = time.time()
        shard = load_shard(*args)
        loads.append(time.time() - start)
        return shard

    client_app.load_shard = timed_load
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import parse_run_config
    from common.model import XmrModel

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    optimizer = 0.0
    if message == "train":  # the optimizer local training uses (torch.optim before), on a throwaway parameter
        import torch

        import common.train

        start = time.time()
        param = torch.nn.Parameter(torch.zeros(1))
        param.grad = torch.ones(1)
        getattr(common.train, "AdamW", torch.optim.AdamW)([param]).step()
        optimizer = time.time() - start
    cfg = parse_run_config({"data-dir": data_dir, "cache-dir": cache_dir, "local-epochs": 1})
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=cfg.as_flat_dict())
    content = RecordDict({"arrays": ArrayRecord(XmrModel(cfg.model_cfg(1280, 384)).state_dict()),
                          "config": ConfigRecord({"server-round": 1})})
    if message == "evaluate":  # the shared test gallery the server sends (1000 images, 5000 captions)
        rng = np.random.default_rng(0)
        content["gallery"] = ArrayRecord({
            "img-emb": Array(rng.normal(size=(1000, cfg.embed_dim)).astype(np.float32)),
            "txt-emb": Array(rng.normal(size=(5000, cfg.embed_dim)).astype(np.float32)),
            "caption-image": Array(np.repeat(np.arange(1000), 5))})
    msg = Message(content=content, dst_node_id=1, message_type=message)
    start = time.time()
    reply = client_app.app(msg, context)
    handler = time.time() - start
    load, train = loads[0], reply.content["metrics"].get("train-seconds", 0.0)
    phases = [marks[0] - spawned, marks[1] - marks[0], marks[2] - marks[1], optimizer, load, train,
              handler - load - train]
    return {**dict(zip(PHASES, phases)), "source": client_app.__file__,
            "dynamo": "torch._dynamo" in sys.modules}


def _export(ref: str, dest: Path) -> Path:
    """The tree at git `ref` (tracked files only) in `dest`."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=PROJECT, check=True, capture_output=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def seed_node_cache(shard_root: Path, warm_cache: Path | None, private_cache: Path) -> None:
    """A node-private cache holding only this node's items: copied from a warm cache, else encoded."""
    from common.backbones import DEFAULT_BACKBONE, build_backbone
    from common.config import RunConfig
    from common.data.shards import LOCAL_SPLITS, read_shard
    from common.features import FeatureStore, split_features

    backbone = build_backbone(DEFAULT_BACKBONE, "cpu")
    for split in LOCAL_SPLITS:
        data = read_shard(shard_root, split, RunConfig()).data
        if warm_cache is None:
            split_features(data, backbone, private_cache)
            continue
        for modality, key, ids in (("img", backbone.img_key, data.images), ("txt", backbone.txt_key, data.caption_ids)):
            warm = FeatureStore(warm_cache, "flickr8k", split, modality, key)
            FeatureStore(private_cache, "flickr8k", split, modality, key).encode_missing(ids, ids, warm.load, 512)


def _run_probe(tree: Path, message: str, data_dir: str, cache_dir: Path, node_config: dict) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # one thread, so the same computation takes the same time on a busy machine
    args = json.dumps([message, data_dir, str(cache_dir), node_config, time.time()])
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", args], cwd=tree, env=env,
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    source = Path(result.pop("source"))
    if not source.is_relative_to(tree):
        raise RuntimeError(f"the probe for {tree} imported the app from {source}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDXMR_DATA_DIR", ""), help="full Flickr8k folder")
    parser.add_argument("--warm-cache", type=Path, help="a feature cache holding all of Flickr8k (else: encode)")
    parser.add_argument("--baseline", default="169345a", help="git ref of the code before (default 169345a)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cell; the median is shown")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(*json.loads(args.probe))))
        return
    from common.config import RunConfig
    from common.data.shards import materialise

    data_dir = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory(prefix="fedxmr-overhead-") as tmp:
        work = Path(tmp)
        shard = work / "shard"
        materialise(RunConfig(), 0, 10, data_dir, shard)
        seed_node_cache(shard, args.warm_cache, work / "cache")
        full = {"partition-id": 0, "num-partitions": 10}
        setups = {"baseline": (_export(args.baseline, work / "baseline"), {**full, "data-dir": data_dir}),
                  "full-data": (PROJECT, {**full, "data-dir": data_dir}),
                  "shard": (PROJECT, {"data-dir": str(shard)})}
        for message in ("train", "evaluate"):
            runs = {name: [_run_probe(tree, message, data_dir, work / "cache", node) for _ in range(args.repeats)]
                    for name, (tree, node) in setups.items()}
            print(f"\n{message} message, seconds (median of {args.repeats} fresh processes):")
            print(f"| phase | {' | '.join(setups)} |\n|---|{'---|' * len(setups)}")
            for phase in (*PHASES, "total"):
                if message == "evaluate" and ("training" in phase or "optimizer" in phase):
                    continue
                cells = [statistics.median(sum(v for k, v in r.items() if k in PHASES) if phase == "total" else r[phase]
                                           for r in runs[name]) for name in setups]
                print(f"| {phase} | {' | '.join(f'{c:.2f}' for c in cells)} |")
            print(f"| torch._dynamo imported | {' | '.join(str(runs[n][0]['dynamo']) for n in setups)} |")

if __name__ == "__main__":
    main()
