"""Secure aggregation (Flower's SecAgg+, fedxmr_server/strategies/secagg.py, fedxmr_client/secagg.py): the mean the
server gets equals the weighted per-array mean of the clients' clear updates within quantisation, no reply carries
a client's update in the clear, a failing client does not stop the round, and what cannot run under it is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedxmr_client.secagg as client_secagg
from flwr.common import parameters_to_ndarrays
from common.config import ConfigError, parse_run_config
from common.method_config import SECTIONS, secagg_refusal
from fedxmr_server.app import _run
from fedxmr_server.strategies import build_strategy
from fedxmr_server.strategies.secagg import SecureAggregation
from tests.inprocess import InProcessGrid, server_context
from tests.test_precomputed import _config, write_npz


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # what Flower's Message constructor needs


class _Watch(InProcessGrid):
    """Keeps every train reply the server receives, and the errors."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.train_replies: list = []
        self.errors: list[str] = []

    def send_and_receive(self, messages, timeout=None):  # type: ignore[no-untyped-def]
        replies = super().send_and_receive(messages, timeout)
        for r in replies:
            if r.has_error():
                self.errors.append(r.error.reason)
            elif r.metadata.message_type == "train":
                self.train_replies.append(r)
        return replies


def _secure_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodes: list[int], **keys: object):
    """Run with SecAgg+, capturing each client's clear FitRes (on the node) and, per round, the array names and the
    means the server decoded."""
    clear: list = []
    rounds: list = []
    real_fitres, real_round = client_secagg.fitres_to_recorddict, SecureAggregation.round

    def keep_fitres(fitres, keep_input):  # type: ignore[no-untyped-def]
        clear.append((parameters_to_ndarrays(fitres.parameters), fitres.num_examples))  # before it is consumed
        return real_fitres(fitres, keep_input)

    def keep_round(self, grid, messages, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_round(self, grid, messages, *args, **kwargs)
        rounds.append((sorted(messages[0].content["arrays"].keys()), out))
        return out

    monkeypatch.setattr(client_secagg, "fitres_to_recorddict", keep_fitres)
    monkeypatch.setattr(SecureAggregation, "round", keep_round)
    path = write_npz(tmp_path / "data.npz")
    flat = _config(tmp_path, path, **{"secure-aggregation": True, "min-nodes": 2, **keys}).as_flat_dict()
    grid = _Watch(flat, nodes)
    _run(grid, server_context(flat))
    return grid, clear, rounds


def test_the_server_gets_the_weighted_per_array_mean_and_no_single_update(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    grid, clear, rounds = _secure_run(tmp_path, monkeypatch, [3, 4, 5, 6], **{"num-server-rounds": 2})
    assert not grid.errors and len(rounds) == 2 and len(clear) == 8
    for rnd, (keys, out) in enumerate(rounds):
        vectors = [v for v, _ in clear[4 * rnd: 4 * rnd + 4]]
        weights = np.array([w for _, w in clear[4 * rnd: 4 * rnd + 4]], dtype=np.float64)
        indicator = np.stack([v[-1] for v in vectors])  # clients x arrays: which client trained which array
        assert 0 < indicator.sum() < indicator.size  # image-only and text-only clients leave a tower out
        for j, key in enumerate(keys):
            senders = indicator[:, j] > 0
            if not senders.any():
                assert key not in out.means
                continue
            expected = sum(w * v[j] for w, v, s in zip(weights, vectors, senders) if s) / weights[senders].sum()
            np.testing.assert_allclose(out.means[key], expected, atol=1e-4)
        assert out.cost["up-bytes"] > 0 and [s["sent"] for s in out.cost["stages"]] == [4, 4, 4, 4]
    assert len(grid.train_replies) == 2 * 4 * 4  # 4 stages a round, 4 nodes
    for reply in grid.train_replies:  # every train reply the server ever held: no array in the clear
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "f" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["usable"] for r in metrics if r["round"] > 0] == [4, 4]
    assert all("secagg" in r["train"] for r in metrics if r["round"] > 0)


def test_a_failing_client_drops_out_and_the_others_are_still_summed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Partition 1 raises while training (stage 2): SecAgg+ rebuilds its masks from its neighbours' shares."""
    grid, clear, rounds = _secure_run(tmp_path, monkeypatch, [3, 4, 5, 6], **{"num-server-rounds": 1,
                                                                               "faults": "1:raise", "modality-mix": "1,0,0"})
    assert len(grid.errors) == 1 and len(clear) == 3
    keys, out = rounds[0]
    assert out.means and len(out.replies) == 3
    indicator = np.stack([v[-1] for v, _ in clear])
    j = next(j for j in range(len(keys)) if indicator[:, j].sum() == len(clear))  # an array all three sent
    expected = sum(w * v[j] for v, w in clear) / sum(w for _, w in clear)
    np.testing.assert_allclose(out.means[keys[j]], expected, atol=1e-4)
    metrics = json.loads((tmp_path / "runs" / "f" / "metrics.jsonl").read_text().splitlines()[1])
    assert [r["node-id"] for r in metrics["train"]["rejected"]] == [4]


def test_a_node_refuses_values_secagg_would_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_npz(tmp_path / "data.npz")
    flat = _config(tmp_path, path, **{"secure-aggregation": True, "secagg-clip": 1e-3,
                                      "num-server-rounds": 1, "max-failed-rounds": 5}).as_flat_dict()
    grid = _Watch(flat, [3, 4, 5])
    with pytest.raises(Exception, match="no client ever sent a usable train reply"):
        _run(grid, server_context(flat))
    assert len(grid.errors) == 3 and all("outside [-0.001, 0.001] (secagg-clip)" in e for e in grid.errors)


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_a_method_runs_with_secure_aggregation_or_is_refused_saying_why(method: str) -> None:
    flat = {"method": method, "secure-aggregation": True}
    refusal = secagg_refusal(method, parse_run_config({"method": method}).options)
    if refusal:
        with pytest.raises(ConfigError, match=f"'method' = '{method}' cannot run with 'secure-aggregation'"):
            parse_run_config(flat)
    else:  # its strategy keeps the base's model, payload and aggregation hooks, which the secure round replaces
        assert build_strategy(parse_run_config(flat)).secure is not None


def test_secure_aggregation_refuses_a_robust_rule_and_server_side_dp() -> None:
    with pytest.raises(ConfigError, match="aggregation' = 'median'"):
        parse_run_config({"secure-aggregation": True, "aggregation": "median"})
    with pytest.raises(ConfigError, match="'dp-side' = 'server'"):
        parse_run_config({"secure-aggregation": True, "dp-noise-multiplier": 1.0})
    parse_run_config({"secure-aggregation": True, "dp-noise-multiplier": 1.0, "dp-side": "client"})


def test_client_side_dp_inside_the_secure_sum_releases_what_the_plain_release_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Distributed DP: the clients clip and noise, SecAgg+ sums, the server divides by the clients asked (a fixed
    denominator) and books one release per round, with the noise of the fewest senders of an array."""
    start: list = []
    real = SecureAggregation.round

    def keep_start(self, grid, messages, *args, **kwargs):  # type: ignore[no-untyped-def]
        start.append({k: a.numpy().copy() for k, a in messages[0].content["arrays"].items()})
        return real(self, grid, messages, *args, **kwargs)

    monkeypatch.setattr(SecureAggregation, "round", keep_start)
    grid, clear, rounds = _secure_run(tmp_path, monkeypatch, [3, 4, 5, 6], **{
        "num-server-rounds": 2, "dp-noise-multiplier": 1.0, "dp-clip": 1e-3, "dp-side": "client",
        "modality-mix": "1,0,0", "faults": "1:raise"})
    assert len(grid.errors) == 2 and len(rounds) == 2  # partition 1 fails in both rounds
    assert {w for _, w in clear} == {1000}  # equal weights under DP
    keys, _ = rounds[0]
    for j, key in enumerate(keys):  # round 2 starts from start + Σ of the 3 noised updates / 4 clients asked
        expected = start[0][key] + sum(v[j] - start[0][key] for v, _ in clear[:3]) / 4
        np.testing.assert_allclose(start[1][key], expected, atol=1e-4)
    run = tmp_path / "runs" / "f"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["privacy"]["denominator"] for r in records[1:]] == [4, 4]
    # every array was sent by 3 of the 4 clients asked: each carries z·√(3/4) of the noise
    assert records[1]["train"]["privacy"]["noise-multiplier"] == pytest.approx(np.sqrt(3 / 4))
    privacy = json.loads((run / "final.json").read_text())["privacy"]
    assert privacy["rounds-released"] == 2 and privacy["side"] == "client"
