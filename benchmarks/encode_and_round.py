"""Benchmark figures for the foundation, measured side by side in one run:

1. encoding throughput of the frozen default backbone (images/s, captions/s);
2. one client's train message through the real ClientApp with a warm feature cache vs a cold one (the same
   message re-encoding its shard), and their ratio: in simulation a round is the sum of such messages;
3. bytes each client sends per round (the trainable arrays; the server sends the same back) per hash width.

    python -m benchmarks.encode_and_round --data-dir ../shared/data/flickr8k [--shard-images 600]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.backbones import DEFAULT_BACKBONE, build_backbone
from common.config import parse_run_config
from common.data.datasets import load_split
from common.model import XmrModel
from fedxmr_client.app import app


def encoding_throughput(data_dir: str, n_images: int) -> tuple[float, float]:
    split = load_split(data_dir, "dev", n_images)
    backbone = build_backbone(DEFAULT_BACKBONE, "cpu")
    img, txt = backbone.image_encoder(), backbone.text_encoder()
    img.encode(split.image_paths()[:4])  # warm-up: first-call allocations are not throughput
    txt.encode(split.captions[:8])
    start = time.perf_counter()
    paths = split.image_paths()
    for i in range(0, len(paths), 32):
        img.encode(paths[i:i + 32])
    img_rate = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(split.captions), 128):
        txt.encode(split.captions[i:i + 128])
    return img_rate, len(split.captions) / (time.perf_counter() - start)


def train_message_seconds(run_config: dict, num_partitions: int) -> tuple[float, dict]:
    cfg = parse_run_config(run_config)
    model = XmrModel(cfg.model_cfg(1280, 384))
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": num_partitions},
                  state=RecordDict(), run_config=run_config)
    start = time.perf_counter()
    reply = app(msg, ctx)
    return time.perf_counter() - start, dict(reply.content["metrics"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--shard-images", type=int, default=600, help="images in the client's shard (demo: 600)")
    parser.add_argument("--throughput-images", type=int, default=256)
    args = parser.parse_args()
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    print(f"torch threads: {torch.get_num_threads()}")

    img_rate, txt_rate = encoding_throughput(args.data_dir, args.throughput_images)
    print(f"encoding ({DEFAULT_BACKBONE}): {img_rate:.1f} images/s, {txt_rate:.1f} captions/s")

    cache = Path(tempfile.mkdtemp(prefix="fedxmr-bench-"))
    try:
        base = {"data-dir": args.data_dir, "cache-dir": str(cache), "max-train-images": 2 * args.shard_images}
        cold, _ = train_message_seconds(base, 2)  # the cache is empty: the message encodes its shard
        warm, metrics = train_message_seconds(base, 2)  # the same message again: the cache is warm
        print(f"one client's train message, shard of {args.shard_images} images / {5 * args.shard_images} "
              f"captions: re-encoding {cold:.1f} s, cached {warm:.2f} s (of which training "
              f"{metrics['train-seconds']:.2f} s, cache load {metrics['load-seconds']:.2f} s); "
              f"ratio {cold / warm:.1f}x")
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    for bits in (16, 32, 64, 128):
        cfg = parse_run_config({"hash-bits": bits})
        arrays = ArrayRecord(XmrModel(cfg.model_cfg(1280, 384)).state_dict())
        n_bytes = sum(a.numpy().nbytes for a in arrays.values())
        n_params = sum(a.numpy().size for a in arrays.values())
        print(f"bytes sent per client per round, {bits}-bit heads (default dims): {n_bytes:,} "
              f"({n_params:,} float32 trainable parameters; the server sends the same to each client)")


if __name__ == "__main__":
    main()
