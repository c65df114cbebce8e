"""The ServerApp: validate the run config, run the selected strategy, score dev every round, test once at the end.

`flwr run .` (simulation) or `flwr run . <superlink>` (deployment) both enter `main`.
"""

from __future__ import annotations

import time
from logging import INFO

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from threadpoolctl import threadpool_limits

from common.backbones import build_backbone
from common.config import parse_run_config
from common.model import XmrModel
from fedxmr_server.evaluator import ServerEvaluator
from fedxmr_server.report import RunRecorder
from fedxmr_server.strategies import build_strategy
from fedxmr_server.strategies.base import from_array_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # In simulation the ServerApp runs in a thread while Flower's main thread forks Ray's processes. OpenBLAS's
    # at-fork handler waits for its worker threads; if those are busy with a numpy matmul of ours, the fork never
    # returns (seen: py-spy showed `blas_thread_shutdown_` in the main thread, our `_hamming` matmul in this one,
    # and the run failed with "No heartbeat received"). One BLAS thread has no workers to wait for.
    with threadpool_limits(limits=1, user_api="blas"):
        _run(grid, context)


def _run(grid: Grid, context: Context) -> None:
    cfg = parse_run_config(context.run_config)  # fails before round 1, naming the bad key
    strategy = build_strategy(cfg)
    backbone = build_backbone(cfg.backbone, cfg.device)
    torch.manual_seed(cfg.seed)
    model = XmrModel(cfg.model_cfg(backbone.img_dim, backbone.txt_dim))
    recorder = RunRecorder(cfg, {"model": model.cfg.to_dict(), "flwr": flwr.__version__, "torch": torch.__version__,
                                 "trainable-params": sum(v.numel() for v in model.state_dict().values())})
    evaluator = ServerEvaluator(cfg, backbone)
    strategy.gallery_fn = lambda arrays: evaluator.gallery(from_array_record(arrays))
    log(INFO, "fedxmr: run dir %s", recorder.dir)
    round_start = [time.time()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        dev = evaluator.dev_round(server_round, from_array_record(arrays))
        now = time.time()
        recorder.log_round({"round": server_round, "round-s": round(now - round_start[0], 2), "dev": dev,
                            "train": strategy.last_train, "client-evaluate": strategy.last_evaluate})
        round_start[0] = now
        log(INFO, "fedxmr: round %d dev rsum %.1f (hash %.1f)", server_round, dev["rsum"], dev["hash_rsum"])
        return MetricRecord({f"dev-{k}": float(v) for k, v in dev.items()})

    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_server_rounds,
                   timeout=cfg.round_timeout, train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
                   evaluate_fn=evaluate_fn)

    test = evaluator.test_best()
    recorder.save_weights(evaluator.best_arrays)
    strategy.state.save(recorder.dir / "strategy-state.npz")
    recorder.plot()
    recorder.plot_clients(strategy.last_evaluate.get("clients", []))
    recorder.plot_router()
    clients = max((r["train"].get("replies", 0) for r in recorder.rounds if r.get("train")), default=0)
    text = recorder.summary(evaluator.best_round, evaluator.best_dev, test,
                            {"clients": clients, "per-client": strategy.last_evaluate})
    print(text, flush=True)
    log(INFO, "fedxmr: outputs in %s", recorder.dir)
