"""The GPU check: the same work on the CPU and on CUDA, side by side in one run, without Ray or network; under 8
minutes on one GPU. Not run on a GPU yet (docs/SCALE.md says so until it has been).

    # where the data is: a Flickr8k-layout subset small enough to carry (300 + 50 + 50 images, about 10 MB)
    python -m benchmarks.gpu_check --make-subset .gpu-subset --data-dir ../shared/data/flickr8k
    # on the GPU machine (the project installed, `make install`):
    python -m benchmarks.gpu_check --data-dir .gpu-subset [--devices cpu,cuda]

Per device it prints:
1. encode: the default backbone (EfficientNet-Lite0 + MiniLM, fp32) encodes the subset's images and captions into
   a fresh cache: items per second. CUDA features must match the CPU's (cosine >= 0.999 per item).
2. train: 2 rounds of the real ServerApp and ClientApp in this process (`tests.inprocess`: Flower messages, no
   Ray), 2 paired clients, `device` set in the run config: wall time per round, and a check that every parameter
   each local training optimised, and every model the server scored, was on the device.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common.train as train_module
import fedxmr_server.evaluator as evaluator_module
from common.backbones import DEFAULT_BACKBONE, build_backbone
from common.config import parse_run_config
from common.data.datasets import load_split
from common.features import split_features

SUBSET = {"train": 300, "dev": 50, "test": 50}
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
TOKENS = "Flickr8k.token.txt"


def make_subset(source: Path, dest: Path) -> None:
    """The first images of each split of a Flickr8k folder, their captions and the split files, in `dest`."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    keep: set[str] = set()
    for split, n in SUBSET.items():
        names = [line.strip() for line in (source / SPLIT_FILES[split]).read_text().splitlines() if line.strip()][:n]
        (dest / SPLIT_FILES[split]).write_text("\n".join(names) + "\n")
        keep.update(names)
    for name in keep:
        shutil.copy(source / "images" / name, dest / "images" / name)
    lines = [line for line in (source / TOKENS).read_text().splitlines() if line.split("#", 1)[0] in keep]
    (dest / TOKENS).write_text("\n".join(lines) + "\n")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 1e6
    print(f"subset: {len(keep)} images, {len(lines)} captions, {size:.1f} MB in {dest}")


def encode(data_dir: Path, device: str, cache: Path) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    backbone = build_backbone(DEFAULT_BACKBONE, device)
    data = load_split(data_dir, "train")
    start = time.perf_counter()
    feats = split_features(data, backbone, cache, modalities=("img",))
    img_s = time.perf_counter() - start
    start = time.perf_counter()
    feats |= split_features(data, backbone, cache, modalities=("txt",))
    txt_s = time.perf_counter() - start
    return {"images/s": len(data.images) / img_s, "captions/s": len(data.captions) / txt_s}, dict(feats)


class DeviceWatch:
    """Records the devices of the parameters every local training optimises and of every model the server scores."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._optimise, self._model = train_module._optimise, evaluator_module.ServerEvaluator._model

    def __enter__(self) -> "DeviceWatch":
        def optimise(model, params, *args, **kwargs):
            self.seen.update(p.device.type for p in params)
            return self._optimise(model, params, *args, **kwargs)

        def scored(evaluator, arrays):
            model = self._model(evaluator, arrays)
            self.seen.update(p.device.type for p in model.parameters())
            return model

        train_module._optimise, evaluator_module.ServerEvaluator._model = optimise, scored
        return self

    def __exit__(self, *exc: object) -> None:
        train_module._optimise, evaluator_module.ServerEvaluator._model = self._optimise, self._model


def federate(data_dir: Path, device: str, cache: Path, out: Path) -> dict:
    from fedxmr_server.app import _run
    from tests.inprocess import InProcessGrid, server_context

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    cfg = parse_run_config({"data-dir": str(data_dir), "cache-dir": str(cache), "out-dir": str(out),
                            "run-name": device, "device": device, "num-server-rounds": 2,
                            "client-eval-every": 2}).as_flat_dict()
    with DeviceWatch() as watch:
        _run(InProcessGrid(cfg, [1, 2]), server_context(cfg))
    rounds = [json.loads(line) for line in (out / device / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / device / "final.json").read_text())
    return {"round-s": [r["round-s"] for r in rounds if r["round"] > 0], "devices": sorted(watch.seen),
            "test rsum": final["test"]["rsum"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--make-subset", type=Path, help="write the carried subset of --data-dir here and stop")
    parser.add_argument("--devices", default="cpu,cuda")
    args = parser.parse_args()
    if args.make_subset:
        make_subset(args.data_dir, args.make_subset)
        return
    devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False)")
    results, feats = {}, {}
    with tempfile.TemporaryDirectory(prefix="fedxmr-gpu-check-") as tmp:
        for device in devices:
            speed, feats[device] = encode(args.data_dir, device, Path(tmp) / f"cache-{device}")
            run = federate(args.data_dir, device, Path(tmp) / f"cache-{device}", Path(tmp) / "runs")
            results[device] = {**speed, **run}
            print(device, json.dumps(results[device]), flush=True)
    problems = [f"{d}: trained or scored on {r['devices']}" for d, r in results.items() if r["devices"] != [d]]
    if "cpu" in feats and "cuda" in feats:
        for mod in ("img", "txt"):
            a, b = feats["cpu"][mod], feats["cuda"][mod]
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            print(f"{mod} features, CUDA vs CPU: min cosine {cos.min():.5f}")
            if cos.min() < 0.999:
                problems.append(f"{mod} features differ between CUDA and CPU (min cosine {cos.min():.5f})")
    print(f"\n| | {' | '.join(devices)} |\n|---|{'---|' * len(devices)}")
    for label, cell in {"images/s (encode)": lambda r: f"{r['images/s']:.1f}",
                        "captions/s (encode)": lambda r: f"{r['captions/s']:.1f}",
                        "round s (2 clients)": lambda r: " / ".join(f"{s:.2f}" for s in r["round-s"]),
                        "test rsum": lambda r: f"{r['test rsum']:.1f}"}.items():
        print(f"| {label} | {' | '.join(cell(results[d]) for d in devices)} |")
    if problems:
        raise SystemExit("gpu_check FAILED: " + "; ".join(problems))
    print("gpu_check: every device check passed")


if __name__ == "__main__":
    main()
