"""The ServerApp: validate the run config, run the selected strategy, score dev every round, checkpoint every round
(`resume` continues a stopped run), test once at the end.

`flwr run .` (simulation) or `flwr run . <superlink>` (deployment) both enter `main`.
"""

from __future__ import annotations

import random
import time
from logging import INFO

import flwr
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from threadpoolctl import threadpool_limits

from common import protocol as P
from common.data.datasets import backbone_for, concept_count
from common.config import ConfigError, parse_run_config
from common.preflight import CHECKPOINT, path_problems
from common.model import XmrModel
from fedxmr_server.evaluator import ServerEvaluator
from fedxmr_server.report import RunRecorder
from fedxmr_server.strategies import build_strategy
from fedxmr_server.strategies.base import RunFailed, from_array_record
from fedxmr_server.strategies.state import Checkpoint

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
    problems = path_problems(cfg)  # before anything is encoded or a run dir is made
    if problems:
        raise ConfigError("; ".join(problems))
    strategy = build_strategy(cfg)
    backbone = backbone_for(cfg.backbone, cfg.data_dir, cfg.data_keys, cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)  # the nodes each round samples (Flower's `sample_nodes` draws from Python's RNG) repeat
    strategy.concepts = concept_count(cfg.data_dir, cfg.data_keys)
    model = XmrModel(cfg.model_cfg(backbone.img_dim, backbone.txt_dim, concepts=strategy.concepts))
    recorder = RunRecorder(cfg, {"model": model.cfg.to_dict(), "flwr": flwr.__version__, "torch": torch.__version__,
                                 "strategy": strategy.description,
                                 "trainable-params": sum(v.numel() for v in model.state_dict().values())})
    checkpoint_path = recorder.dir / CHECKPOINT
    resume = Checkpoint.load(checkpoint_path) if cfg.resume else None
    if resume is not None:
        recorder.resume_rounds(resume.round)
    evaluator = ServerEvaluator(cfg, backbone)
    strategy.gallery_fn = evaluator.gallery
    strategy.run_key = recorder.run_key
    log(INFO, "fedxmr: run dir %s%s", recorder.dir, f" (resumed after round {resume.round})" if resume else "")
    round_start = [time.time()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        dev = evaluator.score(from_array_record(arrays), "dev")
        log(INFO, "fedxmr: round %d dev rsum %.1f (hash %.1f)", server_round, dev["rsum"], dev["hash_rsum"])
        return MetricRecord({k: float(v) for k, v in dev.items()})

    def round_fn(server_round: int, dev: dict[str, float] | None) -> None:
        now = time.time()
        recorder.log_round({"round": server_round, "round-s": round(now - round_start[0], 2), "dev": dev or {},
                            "train": strategy.last_train if server_round else {},
                            "client-dev": strategy.last_evaluate if server_round else {},
                            "best-round": strategy.best.round, **(strategy.timings if server_round else {})})
        if server_round:  # logged first: a round logged but not checkpointed is cut and run again on resume
            strategy.checkpoint().save(checkpoint_path)
        round_start[0] = now

    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_server_rounds,
                       timeout=cfg.round_timeout, evaluate_fn=evaluate_fn, round_fn=round_fn, resume=resume)
    except RunFailed as exc:  # the run ends failed (Flower: finished:failed, the wrapper exits 1), marked on disk
        recorder.fail(str(exc))
        raise

    best = strategy.best
    dev = next((r["dev"] for r in recorder.rounds if r["round"] == best.round), {})
    test = evaluator.score(best.arrays, "test") if strategy.has_global_model else {}
    clients = strategy.final_test(grid, cfg.round_timeout)  # per-client test, once, at the selected round
    recorder.save_weights(best.arrays if strategy.has_global_model else
                          {f"{node}/{k}": v for node, arrays in best.clients.items() for k, v in arrays.items()})
    strategy.state.save(recorder.dir / "strategy-state.npz")
    recorder.plot()
    recorder.plot_clients(clients.get("clients", []))
    recorder.plot_router()
    recorder.plot_layer_weights(best.round)
    n_clients = max((r["train"].get("replies", 0) for r in recorder.rounds if r.get("train")), default=0)
    privacy = {"privacy": strategy.privacy.report(strategy.state.meta)} if strategy.privacy is not None else {}
    text = recorder.summary(best.round, dev, test, {"clients": n_clients, "per-client": clients,
                                                    "selected-on": _selected_on(cfg.selection_metric(),
                                                                                strategy.has_global_model), **privacy})
    print(text, flush=True)
    log(INFO, "fedxmr: outputs in %s", recorder.dir)


def _selected_on(metric: str, global_model: bool) -> str:
    """How the reported round was chosen, in words for the summary (and for scripts reading final.json)."""
    return P.SELECTION[metric][2][0 if global_model else 1]
