"""Secure aggregation (Flower's SecAgg+, fedxmr_server/strategies/secagg.py, fedxmr_client/secagg.py): the mean the
server gets equals the weighted per-array mean of the clients' clear updates within quantisation, no reply carries
a client's update or a statistic of it in the clear, a client lost at any stage does not stop the round, client-side
DP inside the sum releases what the plain release would, and what cannot run under it is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

import fedxmr_client.secagg as client_secagg
from common import protocol as P
from common.config import ConfigError, parse_run_config
from common.method_config import SECTIONS, secagg_refusal
from fedxmr_server.app import _run
from fedxmr_server.strategies.base import RunFailed
from fedxmr_server.strategies.secagg import SecureAggregation, quantisation_range
from tests.inprocess import InProcessGrid, server_context
from tests.test_precomputed import _config, write_npz


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # what Flower's Message constructor needs


class _Watch(InProcessGrid):
    """Keeps every train reply the server receives and the errors; `drop` = (stage, node): in round 1 that node's
    message of that SecAgg+ stage (0 setup .. 3 unmask) is lost before it reaches the node."""

    def __init__(self, *args: object, drop: tuple[int, int] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.train_replies: list[Message] = []
        self.errors: list[str] = []
        self.drop, self.train_batches = drop, 0

    def send_and_receive(self, messages, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        lost = []
        if messages and messages[0].metadata.message_type == "train":
            if self.drop and self.train_batches == self.drop[0]:
                lost = [m for m in messages if m.metadata.dst_node_id == self.drop[1]]
            self.train_batches += 1
        replies = super().send_and_receive([m for m in messages if m not in lost], timeout)
        replies += [Message(Error(code=2, reason="node unreachable"), reply_to=m) for m in lost]
        for r in replies:
            if r.has_error():
                self.errors.append(r.error.reason)
            elif r.metadata.message_type == "train":
                self.train_replies.append(r)
        return replies


def _secure_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodes: list[int], drop: tuple[int, int] | None = None,
                **keys: object):
    """Run with SecAgg+, capturing each client's clear FitRes (on the node) and, per round, the upload list, the
    weights fixed before the round and what the server decoded."""
    clear: list = []
    rounds: list = []
    real_fitres, real_round = client_secagg.fitres_to_recorddict, SecureAggregation.round

    def keep_fitres(fitres, keep_input):  # type: ignore[no-untyped-def]
        clear.append((parameters_to_ndarrays(fitres.parameters), fitres.num_examples))  # before it is consumed
        return real_fitres(fitres, keep_input)

    def keep_round(self, grid, messages, weights, upload, *args):  # type: ignore[no-untyped-def]
        out = real_round(self, grid, messages, weights, upload, *args)
        rounds.append((upload, out, weights))
        return out

    monkeypatch.setattr(client_secagg, "fitres_to_recorddict", keep_fitres)
    monkeypatch.setattr(SecureAggregation, "round", keep_round)
    path = write_npz(tmp_path / "data.npz")
    flat = _config(tmp_path, path, **{"secure-aggregation": True, "min-nodes": 2, **keys}).as_flat_dict()
    grid = _Watch(flat, nodes, drop=drop)
    _run(grid, server_context(flat))
    return grid, clear, rounds


def _expected(upload: list[str], clear: list) -> dict[str, np.ndarray]:
    """The clear per-array weighted mean over the clients that sent each array."""
    out = {}
    for j, key in enumerate(upload):
        sent = [(v[j], w) for v, w in clear if v[-1][j] > 0]
        if sent:
            out[key] = sum(w * v for v, w in sent) / sum(w for _, w in sent)
    return out


def test_the_server_gets_the_weighted_per_array_mean_and_no_single_update(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    grid, clear, rounds = _secure_run(tmp_path, monkeypatch, [3, 4, 5, 6],
                                      **{"num-server-rounds": 2, "modality-mix": "0.5,0.25,0.25",
                                         "max-client-share": 1.0, "partitioner": "dirichlet", "partition-beta": 5.0})
    assert not grid.errors and len(rounds) == 2 and len(clear) == 8
    for rnd, (upload, out, _) in enumerate(rounds):
        indicator = np.stack([v[-1] for v, _ in clear[4 * rnd: 4 * rnd + 4]])  # clients x arrays
        assert 0 < indicator.sum() < indicator.size  # image-only and text-only clients leave a tower out
        expected = _expected(upload, clear[4 * rnd: 4 * rnd + 4])
        assert set(out.means) == set(expected)
        for key, mean in expected.items():
            np.testing.assert_allclose(out.means[key], mean, atol=1e-5)
        assert out.cost["up-bytes"] > 0 and [s["sent"] for s in out.cost["stages"]] == [4, 4, 4, 4]
    records = [json.loads(line) for line in (tmp_path / "runs" / "f" / "metrics.jsonl").read_text().splitlines()]
    sizes = {c["node-id"]: c["num-examples"] for c in records[1]["train"]["clients"]}
    total = sum(sizes.values())  # round 2 weighs the sizes declared in round 1 (as shares)
    assert len(set(sizes.values())) > 1 and rounds[1][2] == pytest.approx({n: v / total for n, v in sizes.items()})
    assert [r["train"]["usable"] for r in records if r["round"] > 0] == [4, 4]
    assert len(grid.train_replies) == 2 * 4 * 4  # 4 stages a round, 4 nodes
    for reply in grid.train_replies:  # every train reply the server ever held: no array and no model statistic
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        for record in reply.content.config_records.values():
            assert P.SENT_CHECKSUM not in record and P.RECEIVED_CHECKSUM not in record
        if "fitres.metrics" in reply.content.config_records:
            assert all(client_secagg._in_clear(k) for k in reply.content["fitres.metrics"].keys())


def test_an_array_with_one_sender_is_not_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One paired client among 3: the temperature (paired clients only) would be its own value; it is withheld."""
    grid, clear, rounds = _secure_run(tmp_path, monkeypatch, [3, 4, 5], **{"num-server-rounds": 1})
    upload, out, _ = rounds[0]
    assert "logit_scale" not in upload and "logit_scale" not in out.means
    assert any(k.startswith("img.") for k in upload) and any(k.startswith("txt.") for k in upload)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_client_lost_at_any_stage_leaves_the_others_summed(stage: int, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Lost in setup or key sharing: dropped from the round; lost before its masked vector: its masks are rebuilt
    from its neighbours' shares; lost in unmask: its vector is in the sum, its shares are not needed."""
    grid, clear, rounds = _secure_run(tmp_path, monkeypatch, [3, 4, 5, 6], drop=(stage, 4),
                                      **{"num-server-rounds": 1, "modality-mix": "1,0,0"})
    upload, out, _ = rounds[0]
    assert len(clear) == (4 if stage == 3 else 3) and len(out.replies) == len(clear)
    for key, mean in _expected(upload, clear).items():
        np.testing.assert_allclose(out.means[key], mean, atol=1e-5)
    record = json.loads((tmp_path / "runs" / "f" / "metrics.jsonl").read_text().splitlines()[1])
    rejected = record["train"]["rejected"]
    assert [r["node-id"] for r in rejected] == ([] if stage == 3 else [4])
    assert all("node unreachable" in r["reason"] for r in rejected)


def test_a_node_refuses_values_secagg_would_clip(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz")
    flat = _config(tmp_path, path, **{"secure-aggregation": True, "secagg-clip": 1.0, "modality-mix": "1,0,0",
                                      "num-server-rounds": 1}).as_flat_dict()
    grid = _Watch(flat, [3, 4, 5])
    with pytest.raises(RunFailed, match="no client ever sent a usable train reply"):
        _run(grid, server_context(flat))  # e.g. the temperature log(1 / 0.07) = 2.66 is outside [-1, 1]
    assert len(grid.errors) == 3
    assert all(re.search(r"array '[\w.]+' has values outside \[-1.0, 1.0\]", e) for e in grid.errors)
    record = json.loads((tmp_path / "runs" / "f" / "metrics.jsonl").read_text().splitlines()[1])
    assert all("secagg-clip" in r["reason"] for r in record["train"]["rejected"])  # the node's reason, kept


def test_a_node_that_requires_secure_aggregation_sends_nothing_in_the_clear(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz")
    flat = _config(tmp_path, path, **{"num-server-rounds": 1, "modality-mix": "1,0,0"}).as_flat_dict()
    configs = [{"partition-id": p, "num-partitions": 2, "require-secure-aggregation": True} for p in (0, 1)]
    grid = _Watch(flat, [3, 4], node_configs=configs)
    with pytest.raises(RunFailed):
        _run(grid, server_context(flat))
    assert grid.errors and all("requires secure aggregation" in e for e in grid.errors)


def test_a_node_refuses_an_unmask_request_naming_a_client_alive_and_dead() -> None:
    ok = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [3, 4], Key.DEAD_NODE_ID_LIST: [5]})
    client_secagg._check_unmask(ok, 3)
    for active, dead in (([3, 4], [4]), ([4], [3])):
        bad = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})
        with pytest.raises(PermissionError, match="both alive and dead"):
            client_secagg._check_unmask(bad, 3)


@pytest.mark.parametrize("clients", [1, 2, 10, 1023, 1024, 5000, 10**6])
def test_the_quantisation_range_keeps_the_sum_below_the_modulus(clients: int) -> None:
    q = quantisation_range(clients)
    assert clients * q < 2**32 and q >= 2**11


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_a_method_runs_with_secure_aggregation_or_is_refused_saying_why(method: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    refusal = secagg_refusal(method, parse_run_config({"method": method}).options)
    if refusal:
        with pytest.raises(ConfigError, match=f"'method' = '{method}' cannot run with 'secure-aggregation'"):
            parse_run_config({"method": method, "secure-aggregation": True})
        return
    grid, clear, rounds = _secure_run(tmp_path, monkeypatch, [3, 4, 5, 6],
                                      **{"method": method, "num-server-rounds": 1, "modality-mix": "0.5,0.25,0.25"})
    assert not grid.errors and rounds[0][1].means
    upload, out, _ = rounds[0]
    for key, mean in _expected(upload, clear).items():
        np.testing.assert_allclose(out.means[key], mean, atol=1e-5)


def test_secure_aggregation_refuses_what_needs_individual_updates() -> None:
    for keys, match in (({"aggregation": "median"}, "aggregation' = 'median'"),
                        ({"dp-noise-multiplier": 1.0}, "'dp-side' = 'server'"),
                        ({"min-nodes": 1}, "'min-nodes' = 1"),
                        ({"secagg-clip": 0.5}, "secagg-clip"),
                        ({"secagg-threshold": 0.5}, "secagg-threshold")):
        with pytest.raises(ConfigError, match=match):
            parse_run_config({"secure-aggregation": True, **keys})
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
    assert {w for _, w in clear} == {P.SECAGG_MAX_WEIGHT}  # equal weights under DP
    upload = rounds[0][0]
    for j, key in enumerate(upload):  # round 2 starts from start + Σ of the 3 noised updates / 4 clients asked
        expected = start[0][key] + sum(v[j] - start[0][key] for v, _ in clear[:3]) / 4
        np.testing.assert_allclose(start[1][key], expected, atol=1e-5)
    run = tmp_path / "runs" / "f"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["privacy"]["denominator"] for r in records[1:]] == [4, 4]
    # every array was sent by 3 of the 4 clients asked: each carries z·√(3/4) of the noise
    assert records[1]["train"]["privacy"]["noise-multiplier"] == pytest.approx(np.sqrt(3 / 4))
    privacy = json.loads((run / "final.json").read_text())["privacy"]
    assert privacy["rounds-released"] == 2 and privacy["side"] == "client"
