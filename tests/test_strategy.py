"""Strategies on constructed replies: weighting, robustness to failing clients, config, state round-trip."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.config import parse_run_config
from fedxmr_server.strategies import STRATEGIES, build_strategy
from fedxmr_server.strategies.state import StrategyState
from tests.messages import grid as mock_grid

GLOBAL = {"img.w": np.zeros((2, 3), np.float32), "txt.b": np.zeros(3, np.float32)}


def reply(node: int, value: float, n: int, arrays: dict | None = None, error: str | None = None) -> Message:
    """A Mock reply as in Flower's own strategy tests: content, metadata.src_node_id and has_error()."""
    msg = Mock(spec=Message)
    msg.metadata = Mock(src_node_id=node)
    msg.has_error = Mock(return_value=error is not None)
    msg.error = Error(code=0, reason=error) if error else None
    arrays = arrays if arrays is not None else {k: np.full_like(v, value) for k, v in GLOBAL.items()}
    msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": n, "train-loss": value})})
    return msg


def fedavg():
    strategy = build_strategy(parse_run_config({"method": "fedavg", "max-client-share": 1.0}))  # uncapped: FedAvg
    strategy.state.arrays = {k: v.copy() for k, v in GLOBAL.items()}
    return strategy


def test_fedavg_is_the_example_weighted_mean() -> None:
    arrays, metrics = fedavg().aggregate_train(1, [reply(1, 1.0, 10), reply(2, 4.0, 30)])
    expected = (1.0 * 10 + 4.0 * 30) / 40
    np.testing.assert_allclose(arrays["img.w"].numpy(), np.full((2, 3), expected))
    assert metrics["train-loss"] == pytest.approx(expected)
    assert metrics["num-examples"] == 40


@pytest.mark.parametrize("bad", [
    reply(3, 0.0, 10, error="ClientApp crashed: out of memory"),
    reply(3, np.nan, 10),
    reply(3, 5.0, 10, arrays={"img.w": np.ones((2, 3), np.float32), "img.extra": np.ones(2, np.float32)}),
    reply(3, 5.0, 10, arrays={}),
    reply(3, 5.0, 10, arrays={"img.w": np.ones((3, 3), np.float32), "txt.b": np.ones(3, np.float32)}),
    reply(3, 5.0, 0),
])
def test_a_failing_client_is_left_out_and_the_round_goes_on(bad: Message, caplog: pytest.LogCaptureFixture) -> None:
    strategy = fedavg()
    arrays, _ = strategy.aggregate_train(1, [reply(1, 1.0, 10), bad, reply(2, 3.0, 10)])
    np.testing.assert_allclose(arrays["txt.b"].numpy(), np.full(3, 2.0))
    assert strategy.last_train["usable"] == 2 and strategy.last_train["replies"] == 3
    assert [c["node-id"] for c in strategy.last_train["clients"]] == [1, 2]


def test_each_modality_is_renormalised_over_the_clients_that_trained_it() -> None:
    """Paired (n=10) sends both towers, image-only (n=30) only img.*, text-only (n=60) only txt.*."""
    strategy = fedavg()
    strategy.state.arrays["pair.t"] = np.full(1, 7.0, np.float32)  # a key nobody sends keeps its value
    paired = reply(1, 1.0, 10)
    image_only = reply(2, 3.0, 30, arrays={"img.w": np.full((2, 3), 3.0, np.float32)})
    text_only = reply(3, 5.0, 60, arrays={"txt.b": np.full(3, 5.0, np.float32)})
    arrays, _ = strategy.aggregate_train(1, [paired, image_only, text_only])
    np.testing.assert_allclose(arrays["img.w"].numpy(), (1.0 * 10 + 3.0 * 30) / 40)
    np.testing.assert_allclose(arrays["txt.b"].numpy(), (1.0 * 10 + 5.0 * 60) / 70)
    np.testing.assert_array_equal(arrays["pair.t"].numpy(), [7.0])


def test_no_usable_reply_keeps_the_model() -> None:
    strategy = fedavg()
    assert strategy.aggregate_train(1, [reply(1, 0.0, 5, error="boom")]) == (None, None)
    np.testing.assert_array_equal(strategy.state.arrays["img.w"], GLOBAL["img.w"])


def test_every_node_gets_its_own_payload_object() -> None:
    """configure_train builds one RecordDict per node (never one shared object a method could mutate for all)."""
    strategy = fedavg()
    grid = mock_grid([11, 12])
    msgs = list(strategy.configure_train(3, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                         ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]
    assert msgs[0].content is not msgs[1].content
    assert msgs[0].content["arrays"] is not msgs[1].content["arrays"]
    assert all(m.content["config"]["server-round"] == 3 and m.content["config"]["best-round"] == -1 for m in msgs)


def test_every_method_has_a_server_and_a_client_side() -> None:
    from common.method_config import SECTIONS
    from fedxmr_client.methods import CLIENT_METHODS

    assert set(STRATEGIES) == set(SECTIONS) == set(CLIENT_METHODS)


def test_state_round_trips_through_bytes_and_disk(tmp_path) -> None:
    state = StrategyState(round=7, arrays={"a.w": np.arange(6, dtype=np.float32).reshape(2, 3)},
                          buffers={"protos": np.eye(3)}, meta={"clients": [{"node-id": 1, "weight": 0.5}]})
    state.save(tmp_path / "state.npz")
    back = StrategyState.load(tmp_path / "state.npz")
    assert back.round == 7 and back.meta == state.meta
    np.testing.assert_array_equal(back.arrays["a.w"], state.arrays["a.w"])
    np.testing.assert_array_equal(back.buffers["protos"], state.buffers["protos"])
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_centralized_scores_an_average_of_its_weights_and_trains_on_the_raw_ones(decay: float) -> None:
    """`centralized-average`: the model scored, selected and sent for evaluation is the exponential average of the
    node's trained weights (started by round 1's), while the next train message carries the raw weights; the raw
    weights are strategy state, so a checkpoint keeps them. Off (0): the node's update is the model."""
    strategy = build_strategy(parse_run_config({"method": "centralized", "centralized-average": decay,
                                                "min-nodes": 1}))
    strategy.state.arrays = {k: v.copy() for k, v in GLOBAL.items()}
    weights = lambda: strategy.state.arrays["img.w"][0, 0]  # noqa: E731
    sent = lambda kind: strategy.payload("client-1", 3, kind)["arrays"]["img.w"].numpy()[0, 0]  # noqa: E731
    strategy.aggregate_train(1, [reply(1, 2.0, 10)])
    assert weights() == pytest.approx(2.0), "the first trained weights start the average"
    strategy.aggregate_train(2, [reply(1, 4.0, 10)])
    assert weights() == pytest.approx(decay * 2.0 + (1 - decay) * 4.0)
    assert sent("train") == pytest.approx(4.0), "training continues from the raw weights"
    assert sent("evaluate") == pytest.approx(weights())
    restored = StrategyState.from_bytes(strategy.state.to_bytes())
    assert {k: v[0, 0] for k, v in restored.buffers.items() if k.endswith("img.w")} == \
        ({"trained/img.w": pytest.approx(4.0)} if decay else {})
