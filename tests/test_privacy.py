"""Client-level DP (common/privacy.py, fedxmr_server/privacy.py): the accountant agrees with the library, a clipped
update never exceeds the bound, the noise has the stated scale, every record a method's clients send is covered or
the method is refused naming it, and a run under DP reports the ε its ledger implies."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from dp_accounting import rdp

from common.config import ConfigError, parse_run_config
from common.method_config import SECTIONS, dp_refusal
from common.privacy import clip_update, client_noise, noisy_mean, update_norm
from common import protocol as P
from fedxmr_server.app import _run
from fedxmr_server.privacy import ClientLevelDp, epsilon_after, noise_for_epsilon
from fedxmr_server.strategies.base import RunFailed
from tests.inprocess import InProcessGrid, server_context
from tests.test_precomputed import _config, write_npz


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # what Flower's Message constructor needs


def _library_epsilon(z: float, rounds: int, delta: float) -> float:
    """dp-accounting's own RDP accountant, called directly: `rounds` Gaussian releases, no sampling."""
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("z,rounds,delta", [(0.8, 20, 0.1), (2.0, 50, 1e-5), (5.0, 3, 0.01)])
def test_the_accountant_matches_the_library(z: float, rounds: int, delta: float) -> None:
    assert epsilon_after(z, rounds, delta, population=10, sampled=10) == pytest.approx(
        _library_epsilon(z, rounds, delta), rel=1e-9)


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_the_noise_for_a_target_epsilon_is_the_smallest_that_reaches_it(target: float) -> None:
    z = noise_for_epsilon(target, releases=20, delta=0.1, population=10, sampled=10)
    assert _library_epsilon(z, 20, 0.1) <= target
    assert _library_epsilon(z * 0.99, 20, 0.1) > target  # not needlessly noisy


def _arrays(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {"a": (scale * rng.normal(size=(7, 5))).astype(np.float32), "b": (scale * rng.normal(size=11)).astype(
        np.float32)}


@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 30.0])
def test_a_clipped_update_never_exceeds_the_bound_and_a_short_one_is_unchanged(scale: float) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        start, moved = _arrays(rng, 1.0), _arrays(rng, 1.0)
        moved = {k: start[k] + scale * (moved[k] - start[k]) for k in start}
        delta, norm = clip_update(start, moved, bound=1.0)
        clipped = float(np.sqrt(sum(np.sum(d ** 2) for d in delta.values())))
        assert clipped <= 1.0 + 1e-9
        assert norm == pytest.approx(update_norm(start, moved))
        if norm <= 1.0:
            assert all(np.allclose(delta[k], moved[k] - start[k], atol=1e-6) for k in start)


def test_the_mean_has_a_fixed_denominator_and_noise_of_the_stated_scale() -> None:
    rng = np.random.default_rng(1)
    start = {"w": np.zeros(200_000, np.float64)}
    deltas = [{"w": np.full(200_000, 0.5)}, {}]  # the second client sent nothing: a zero update, same denominator
    assert noisy_mean(start, deltas, 4, 0.0, rng)["w"] == pytest.approx(np.full(200_000, 0.125))
    noisy = noisy_mean(start, deltas, 4, 0.3, rng)["w"] - 0.125
    assert noisy.std() == pytest.approx(0.3, rel=0.01)
    shared, _ = client_noise(start, {"w": np.zeros(200_000)}, bound=2.0, noise_multiplier=1.5, expected_clients=9,
                             rng=rng)
    assert shared["w"].std() == pytest.approx(1.5 * 2.0 / 3.0, rel=0.01)  # z·C/√m: m shares sum to z·C


class _Recorder(InProcessGrid):
    """Keeps the record names of every train reply."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.records: set[str] = set()
        self.errors: list[str] = []

    def send_and_receive(self, messages, timeout=None):  # type: ignore[no-untyped-def]
        replies = super().send_and_receive(messages, timeout)
        for r in replies:
            if r.has_error():
                self.errors.append(r.error.reason)
            elif r.metadata.message_type == "train":
                self.records |= set(r.content.array_records) | set(r.content.metric_records)
        return replies


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_every_record_a_method_sends_is_covered_or_the_method_is_refused_naming_it(method: str,
                                                                                   tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz")
    nodes = [3] if method == "centralized" else [3, 4, 5]
    keys = {"method": method, "num-server-rounds": 1, "modality-mix": "1,0,0", "min-nodes": 1}
    flat = _config(tmp_path, path, **keys).as_flat_dict()
    grid = _Recorder(flat, nodes)
    _run(grid, server_context(flat))  # without DP: what the method's clients send
    assert not grid.errors
    extra = grid.records - {P.ARRAYS, P.METRICS}
    refusal = dp_refusal(method, parse_run_config(flat).options)
    for record in extra:
        assert f"'{record}'" in refusal, f"{method} sends record {record!r}, which DP neither covers nor refuses"
    if refusal:
        with pytest.raises(ConfigError, match=f"method' = '{method}' cannot run under client-level DP"):
            parse_run_config(flat | {"dp-noise-multiplier": 1.0})
    else:
        parse_run_config(flat | {"dp-noise-multiplier": 1.0})


def test_dp_refuses_a_robust_rule_and_two_ways_of_setting_the_noise() -> None:
    with pytest.raises(ConfigError, match="aggregation' = 'median'"):
        parse_run_config({"dp-noise-multiplier": 1.0, "aggregation": "median"})
    with pytest.raises(ConfigError, match="both set"):
        parse_run_config({"dp-noise-multiplier": 1.0, "dp-target-epsilon": 4.0})


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_run_under_dp_reports_the_epsilon_its_ledger_implies(side: str, tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz")
    flat = _config(tmp_path, path, **{"num-server-rounds": 3, "modality-mix": "1,0,0", "dp-target-epsilon": 4.0,
                                      "dp-clip": 1e-3, "dp-side": side}).as_flat_dict()
    grid = _Recorder(flat, [3, 4, 5, 6])
    _run(grid, server_context(flat))
    assert not grid.errors
    run = tmp_path / "runs" / "f"
    privacy = json.loads((run / "final.json").read_text())["privacy"]
    z = noise_for_epsilon(4.0, 3, 1e-5, 4, 4)
    assert privacy["noise-multiplier"] == pytest.approx(z) and privacy["delta"] == 1e-5  # min(1e-5, 0.1 / clients)
    assert privacy["rounds-released"] == 3 and privacy["side"] == side
    assert privacy["epsilon"] == pytest.approx(_library_epsilon(z, 3, 1e-5), rel=1e-9)
    assert privacy["epsilon"] <= 4.0
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    spent = [r["train"]["privacy"]["epsilon"] for r in rounds if r["round"] > 0]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(privacy["epsilon"])
    if side == "server":  # the updates of 1 local epoch are longer than 0.5: the server clipped them
        assert all(r["train"]["privacy"]["clipped"] >= 1 for r in rounds if r["round"] > 0)
    assert "Client-level DP" in (run / "summary.md").read_text()


def test_a_client_never_sends_an_update_without_its_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that does not tell client-side nodes the noise gets no update, only failed replies."""
    path = write_npz(tmp_path / "data.npz")
    flat = _config(tmp_path, path, **{"num-server-rounds": 1, "modality-mix": "1,0,0", "dp-noise-multiplier": 1.0,
                                      "dp-side": "client"}).as_flat_dict()
    grid = _Recorder(flat, [3, 4])
    monkeypatch.setattr(ClientLevelDp, "client_config", lambda self: {})
    with pytest.raises(RunFailed):  # no usable reply in the only round: the run fails, it is not "completed"
        _run(grid, server_context(flat))
    assert grid.errors and all("sends no update without noise" in e for e in grid.errors)


def test_client_side_noise_is_accounted_per_array_by_its_fewest_senders() -> None:
    """An image-only client sends no text tower: the text tower's sum then carries the noise of fewer clients, and the
    ledger must record that (not z)."""
    cfg = parse_run_config({"dp-noise-multiplier": 2.0, "dp-side": "client"})
    dp = ClientLevelDp(cfg)
    meta: dict = {}
    dp.start(meta, population=3, sampled=3)
    start = {"img.w": np.zeros(4, np.float32), "txt.w": np.zeros(4, np.float32)}
    paired = {k: v + 0.1 for k, v in start.items()}
    dp.release(start, [paired, paired, {"img.w": start["img.w"] + 0.1}], asked=3, meta=meta)
    assert meta["privacy"]["releases"][-1]["noise-multiplier"] == pytest.approx(2.0 * np.sqrt(2 / 3))


def test_a_strategy_with_its_own_aggregation_cannot_run_under_dp() -> None:
    from fedxmr_server.strategies.fedavg import FedAvgXmr

    class Sneaky(FedAvgXmr):
        def aggregate(self, server_round, replies, weights):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(ConfigError, match="own \\['aggregate'\\]"):
        Sneaky(parse_run_config({"dp-noise-multiplier": 1.0}))
    FedAvgXmr(parse_run_config({"dp-noise-multiplier": 1.0}))  # the plain one can


def test_a_client_side_node_sends_nothing_without_the_model_it_started_from(tmp_path: Path) -> None:
    from fedxmr_client.app import _privatise

    shard = type("Shard", (), {"cfg": parse_run_config({"dp-noise-multiplier": 1.0, "dp-side": "client"}),
                               "num_partitions": 3})()
    state = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="no update without noise"):
        _privatise(state, {}, shard, ConfigRecord({P.DP_NOISE: 1.0, P.DP_SAMPLED: 3}))
    noised = _privatise(state, {"w": np.zeros(3, np.float32)}, shard, ConfigRecord({P.DP_NOISE: 1.0, P.DP_SAMPLED: 3}))
    assert not torch.equal(noised["w"], state["w"])


def test_a_round_under_quorum_releases_nothing(tmp_path: Path) -> None:
    """Partition 0 fails every round: 1 usable reply of 2 asked, below the quorum of 2, so the model is kept and no
    ε is spent."""
    path = write_npz(tmp_path / "data.npz")
    flat = _config(tmp_path, path, **{"num-server-rounds": 2, "modality-mix": "1,0,0", "dp-noise-multiplier": 1.0,
                                      "faults": "0:raise"}).as_flat_dict()
    _run(_Recorder(flat, [3, 4]), server_context(flat))
    run = tmp_path / "runs" / "f"
    assert json.loads((run / "final.json").read_text())["privacy"]["rounds-released"] == 0
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train"]["under-quorum"] and "privacy" not in r["train"] for r in rounds if r["round"] > 0)


def test_the_utility_plot_reads_epsilon_from_the_labels(tmp_path: Path) -> None:
    from scripts.privacy_plot import plot, points

    rec = [{"setting": "demo", "method": m, "metric": "rsum", "mean": v, "std": 1.0}
           for m, v in (("fedavg-nodp", 270.0), ("fedavg-eps8", 10.0), ("fedavg-eps1", 4.0), ("linear", 99.0))]
    assert points(rec, "demo", "rsum") == [(1.0, 4.0, 1.0), (8.0, 10.0, 1.0), (float("inf"), 270.0, 1.0)]
    plot(rec + [{**r, "metric": "hash_smap_i2t", "mean": 0.3} for r in rec], tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 0
