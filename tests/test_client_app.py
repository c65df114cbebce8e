"""The ClientApp on constructed messages: real Flickr8k subset, the tiny random-init open_clip backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from common.config import ConfigError, parse_run_config
from common.model import XmrModel, state_to_numpy
from fedxmr_client.app import app

BACKBONE = "openclip:fedxmr-tiny"


@pytest.fixture()
def run_config(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cache = tmp_path_factory.getbasetemp() / "client-app-cache"  # shared across tests: encode once
    return parse_run_config({"backbone": BACKBONE, "data-dir": str(flickr8k_dir), "cache-dir": str(cache),
                             "max-train-images": 40, "local-epochs": 1, "batch-size": 8,
                             "embed-dim": 32, "adapter-dim": 8, "hash-bits": 16}).as_flat_dict()


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


def _global_arrays(run_config: dict) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    model = XmrModel(parse_run_config(run_config).model_cfg(64, 64))
    return ArrayRecord(model.state_dict()), state_to_numpy(model)


def _context(run_config: dict, pid: int = 0) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": 2}, state=RecordDict(),
                   run_config=run_config)


def _message(arrays: ArrayRecord, kind: str, server_round: int = 1) -> Message:
    return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                   dst_node_id=1, message_type=kind)


def test_train_returns_updated_arrays_and_metrics(run_config: dict) -> None:
    arrays, before = _global_arrays(run_config)
    ctx = _context(run_config)
    reply = app(_message(arrays, MessageType.TRAIN), ctx)
    assert not reply.has_error(), reply.error
    after = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert set(after) == set(before)
    assert any(not np.array_equal(after[k], before[k]) for k in before), "training changed nothing"
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 20  # 40 images, 2 partitions
    assert metrics["partition-id"] == 0
    assert metrics["upload-bytes"] == sum(v.nbytes for v in before.values())
    assert np.isfinite(metrics["train-loss"]) and metrics["train-steps"] >= 2
    assert len(ctx.state) == 0, "the ClientApp must keep no state between messages"


def test_train_is_deterministic_per_partition_and_round(run_config: dict) -> None:
    arrays, _ = _global_arrays(run_config)
    first = app(_message(arrays, MessageType.TRAIN), _context(run_config))
    again = app(_message(arrays, MessageType.TRAIN), _context(run_config))
    other = app(_message(arrays, MessageType.TRAIN), _context(run_config, pid=1))
    key = "txt.proj.weight"
    assert np.array_equal(first.content["arrays"][key].numpy(), again.content["arrays"][key].numpy())
    assert not np.array_equal(first.content["arrays"][key].numpy(), other.content["arrays"][key].numpy())


def test_evaluate_reports_local_metrics(run_config: dict) -> None:
    arrays, _ = _global_arrays(run_config)
    reply = app(_message(arrays, MessageType.EVALUATE), _context(run_config, pid=1))
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 20
    assert 0.0 <= metrics["local-rsum"] <= 600.0 and 0.0 <= metrics["local-hash-rsum"] <= 600.0


def test_bad_run_config_fails_naming_the_key(run_config: dict) -> None:
    """Raised inside the handler; Flower's runtime turns it into the error reply the strategy skips."""
    arrays, _ = _global_arrays(run_config)
    with pytest.raises(ConfigError, match="'hash-bits'"):
        app(_message(arrays, MessageType.TRAIN), _context({**run_config, "hash-bits": 12}))


def test_mismatched_global_arrays_fail_naming_the_key(run_config: dict) -> None:
    arrays, _ = _global_arrays({**run_config, "embed-dim": 48})
    with pytest.raises(ValueError, match="img.proj.weight"):
        app(_message(arrays, MessageType.TRAIN), _context(run_config))
