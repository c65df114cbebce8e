"""RCSR: prototypes, anchoring, the router and minimax weights, and the strategy on constructed replies."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import parse_run_config
from common.data.federation import TYPE_CODES
from common.prototypes import (Anchor, compute_prototypes, fuse_prototypes, make_anchor, prototype_accuracy,
                               pseudo_labels)
from common.router import Minimax, consistency_weights, standardise
from fedxmr_client.methods.rcsr import rotating_holdout
from fedxmr_server.strategies import build_strategy
from fedxmr_server.strategies.state import StrategyState
from tests.messages import grid as mock_grid

D, C = 8, 3  # embedding dim and concepts of the constructed cases
GLOBAL = {"img.w": np.zeros((2, 3), np.float32), "txt.b": np.zeros(3, np.float32), "logit_scale": np.zeros(1)}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def table(seed: int) -> tuple[np.ndarray, np.ndarray]:
    return unit(np.random.default_rng(seed).normal(size=(1 + C, D))), np.full(1 + C, 5.0, np.float32)


# ---- prototypes --------------------------------------------------------------------------------------------------
def test_prototypes_are_normalised_means_per_concept() -> None:
    emb = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]], np.uint8)
    protos, counts = compute_prototypes(emb, labels)
    np.testing.assert_array_equal(counts, [3, 2, 2, 0])
    np.testing.assert_allclose(protos[0], unit(np.array([2.0, 2.0])), atol=1e-6)
    np.testing.assert_allclose(protos[1], unit(np.array([1.0, 1.0])), atol=1e-6)
    np.testing.assert_allclose(protos[2], unit(np.array([1.0, 2.0])), atol=1e-6)
    np.testing.assert_array_equal(protos[3], [0, 0])  # nobody has concept 3: an empty row


def test_fusion_takes_a_new_row_as_is_then_applies_one_ema_step() -> None:
    old, old_counts = np.zeros((2, 2), np.float32), np.array([0, 0], np.float32)
    a = (unit(np.array([[1, 0], [1, 0]], np.float32)), np.array([4, 0], np.float32))
    b = (unit(np.array([[0, 1], [0, 1]], np.float32)), np.array([4, 0], np.float32))
    new, counts = fuse_prototypes(old, old_counts, [a[0], b[0]], [a[1], b[1]], np.array([0.75, 0.25]), ema=0.5)
    np.testing.assert_allclose(new[0], unit(np.array([0.75, 0.25])), atol=1e-6)  # first sight: the average
    np.testing.assert_array_equal(new[1], [0, 0])  # no client fed row 1: kept
    again, _ = fuse_prototypes(new, counts, [b[0]], [b[1]], np.array([1.0]), ema=0.5)
    np.testing.assert_allclose(again[0], unit(0.5 * new[0] + 0.5 * np.array([0, 1])), atol=1e-6)  # one EMA step


def test_pseudo_labels_pick_the_nearest_non_empty_concept() -> None:
    protos = np.array([[0, 0], [1, 0], [0, 1], [-1, 0]], np.float32)
    counts = np.array([3, 1, 1, 0], np.float32)  # concept 3 is empty, although closest to the first item
    labels = pseudo_labels(np.array([[-1, 0.1], [0.1, 1]], np.float32), protos, counts)
    np.testing.assert_array_equal(labels, [[0, 1, 0], [0, 1, 0]])


def test_anchoring_pulls_each_item_toward_the_other_modalitys_prototype_of_its_concept() -> None:
    """Constructed case: three orthogonal text prototypes; images start near the *wrong* ones. Minimising only the
    anchoring loss moves every image to its own concept's text prototype."""
    text_protos = np.vstack([np.zeros(D), np.eye(D)[:C]]).astype(np.float32)
    targets = np.eye(C, dtype=np.uint8)[[0, 1, 2, 0]]
    anchor = make_anchor(targets, text_protos, np.array([4, 2, 1, 1], np.float32), weight=1.0, temperature=0.1)
    assert isinstance(anchor, Anchor)
    wrong = np.eye(D)[[1, 2, 0, 2]] + 0.1  # each item starts closest to another concept
    x = torch.nn.Parameter(torch.tensor(wrong, dtype=torch.float32))
    opt = torch.optim.SGD([x], lr=0.5)
    before = prototype_accuracy(unit(wrong), targets, text_protos, np.array([4, 2, 1, 1], np.float32))
    for _ in range(100):
        loss = anchor.loss(torch.nn.functional.normalize(x, dim=1), np.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    emb = unit(x.detach().numpy())
    after = prototype_accuracy(emb, targets, text_protos, np.array([4, 2, 1, 1], np.float32))
    assert before == 0.0 and after == 1.0
    assert np.all((emb @ text_protos[1:].T)[np.arange(4), targets.argmax(1)] > 0.9)


def test_no_anchor_without_weight_prototypes_or_labels() -> None:
    protos, counts = table(0)
    labelled = np.eye(C, dtype=np.uint8)[[0, 1]]
    assert make_anchor(labelled, protos, counts, weight=0.0, temperature=0.1) is None
    assert make_anchor(labelled, protos, np.zeros(1 + C, np.float32), weight=1.0, temperature=0.1) is None
    assert make_anchor(np.zeros((2, C), np.uint8), protos, counts, weight=1.0, temperature=0.1) is None


# ---- router pieces -------------------------------------------------------------------------------------------------
def test_standardise_maps_constant_and_missing_columns_to_zero() -> None:
    z = standardise(np.array([[1.0, 5.0, np.nan], [3.0, 5.0, np.nan]]))
    np.testing.assert_allclose(z, [[-1, 0, 0], [1, 0, 0]])


def test_consistency_softmax_prefers_consistent_clients() -> None:
    w = consistency_weights(np.array([0.9, 0.5, np.nan]), temperature=0.1)
    assert w.sum() == pytest.approx(1.0) and w[0] > w[1] > w[2] > 0


def test_minimax_upweights_high_relative_loss_and_stays_a_distribution() -> None:
    game = Minimax(eta=1.0, tau=0.1)
    for _ in range(3):
        w = game.update(["a", "b", "c"], np.array([1.5, 1.0, 0.5]))
    assert w.sum() == pytest.approx(1.0) and w[0] > w[1] > w[2] > 0
    w = game.update(["c", "d"], np.array([1.0, 1.0]))  # a newcomer enters with the mean mass
    assert w.sum() == pytest.approx(1.0) and sum(game.q.values()) == pytest.approx(1.0)


# ---- the strategy on constructed replies -----------------------------------------------------------------------------
def reply(node: int, kind: str, value: float, consistency: float | None = 0.5, protos: dict | None = None,
          loss: float = 1.0) -> Message:
    mods = {"paired": ("img", "txt"), "image-only": ("img",), "text-only": ("txt",)}[kind]
    arrays = {k: np.full_like(v, value) for k, v in GLOBAL.items()
              if k.split(".")[0] in mods or ("." not in k and len(mods) == 2)}
    metrics = {"num-examples": 10, "train-loss": loss, "has-img": int("img" in mods), "has-txt": int("txt" in mods),
               "partition-id": node, "client-type": TYPE_CODES[kind]}
    if consistency is not None:
        metrics["rcsr-consistency"] = consistency
    protos = protos if protos is not None else {m: table(node) for m in mods}
    rec = {k: v for m, (t, c) in protos.items() for k, v in ((m, t), (f"{m}-count", c))}
    msg = Mock(spec=Message)
    msg.metadata = Mock(src_node_id=node)
    msg.has_error = Mock(return_value=False)
    msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "prototypes": ArrayRecord({k: Array(v) for k, v in rec.items()}),
                              "metrics": MetricRecord(metrics)})
    return msg


def rcsr(router: str = "learned", with_globals: bool = True, **extra: object):
    strategy = build_strategy(parse_run_config({"method": "rcsr", "rcsr-router": router, "embed-dim": D,
                                                "max-client-share": 1.0, **extra}))  # uncapped (test_attacks.py)
    strategy.state.arrays = {k: v.copy() for k, v in GLOBAL.items()}
    if with_globals:
        for m, seed in (("img", 100), ("txt", 101)):
            strategy.state.buffers[f"proto/{m}"], strategy.state.buffers[f"proto/{m}-count"] = table(seed)
    return strategy


def mixed_replies(shift: float = 0.0) -> list[Message]:
    """Four clients of each kind; `shift` moves every upload (a client resending last round's arrays is a replay)."""
    return [reply(1, "paired", 1.0 + shift, 0.8), reply(2, "paired", 2.0 + shift, 0.4, loss=2.0),
            reply(3, "image-only", 3.0 + shift, 0.6), reply(4, "text-only", 4.0 + shift, 0.7)]


@pytest.mark.parametrize("router", ["learned", "consistency", "uniform"])
def test_router_weights_are_a_distribution_over_the_replying_clients(router: str) -> None:
    strategy = rcsr(router)
    arrays, _ = strategy.aggregate_train(2, mixed_replies())
    clients = strategy.last_train["clients"]
    assert [c["node-id"] for c in clients] == [1, 2, 3, 4]
    r = np.array([c["router-weight"] for c in clients])
    w = np.array([c["weight"] for c in clients])
    for dist in (r, w):
        assert np.all(dist > 0) and dist.sum() == pytest.approx(1.0)
    if router == "uniform":
        np.testing.assert_allclose(r, 0.25)
    if router == "consistency":
        assert r[0] > r[3] > r[2] > r[1]  # ordered by measured consistency 0.8 > 0.7 > 0.6 > 0.4
    img = w[[0, 1, 2]] / w[[0, 1, 2]].sum()  # the image tower averages paired + image-only, renormalised
    np.testing.assert_allclose(arrays["img.w"].numpy(), np.full((2, 3), img @ [1.0, 2.0, 3.0]), rtol=1e-5)


def test_round_one_routes_uniformly_and_creates_the_global_prototypes() -> None:
    strategy = rcsr(with_globals=False)
    strategy.aggregate_train(1, [reply(1, "paired", 1.0, None), reply(3, "image-only", 3.0, None)])
    assert [c["router-weight"] for c in strategy.last_train["clients"]] == [0.5, 0.5]
    assert set(strategy.prototypes()) == {"img", "txt"}


@pytest.mark.parametrize("corrupt", [
    {"consistency": float("nan")},
    {"loss": float("nan")},
    {"protos": {"img": (np.full((1 + C, D), np.nan, np.float32), np.ones(1 + C, np.float32)), "txt": table(9)}},
    {"protos": {"img": table(9)}},  # a paired client without its text prototypes
    {"consistency": None},  # global prototypes were sent but no consistency came back
])
def test_corrupted_statistics_get_zero_weight_and_the_round_goes_on(corrupt: dict) -> None:
    strategy = rcsr(**{"update-norm-limit": 0.0})  # RCSR's own check, not the base's update-norm screen
    bad = reply(9, "paired", 100.0, **{"consistency": 0.9, **corrupt})
    arrays, metrics = strategy.aggregate_train(2, [*mixed_replies(), bad])
    assert arrays is not None and metrics is not None
    clients = {c["node-id"]: c for c in strategy.last_train["clients"]}
    assert clients[9]["weight"] == 0.0 and clients[9]["router-weight"] == 0.0 and "rcsr-problem" in clients[9]
    assert sum(c["weight"] for c in clients.values()) == pytest.approx(1.0)
    assert np.all(arrays["img.w"].numpy() < 4.0), "the corrupted client's update leaked into the average"


def test_router_and_prototypes_survive_a_state_round_trip(tmp_path) -> None:
    strategy = rcsr()
    strategy.aggregate_train(2, mixed_replies())
    strategy.state.save(tmp_path / "state.npz")
    resumed = rcsr()
    resumed.state = StrategyState.load(tmp_path / "state.npz")
    assert any(k.startswith("router/") for k in resumed.state.buffers)
    np.testing.assert_array_equal(resumed.prototypes()["img"][0], strategy.prototypes()["img"][0])
    resumed.state.arrays = strategy.state.arrays = {k: v.copy() for k, v in GLOBAL.items()}
    a, b = strategy.client_weights(mixed_replies()), resumed.client_weights(mixed_replies())
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_train_messages_carry_the_global_prototypes() -> None:
    grid = mock_grid([11, 12])
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    assert all("prototypes" not in m.content.array_records
               for m in rcsr(with_globals=False).configure_train(1, arrays, ConfigRecord(), grid))
    msgs = list(rcsr().configure_train(2, arrays, ConfigRecord(), grid))
    assert len(msgs) == 2
    for msg in msgs:
        sent = msg.content["prototypes"]
        np.testing.assert_array_equal(sent["img"].numpy(), table(100)[0])
        assert set(sent.keys()) == {"img", "img-count", "txt", "txt-count"}


def test_router_heatmap_is_written_from_the_round_records(tmp_path) -> None:
    from fedxmr_server.report import RunRecorder

    recorder = RunRecorder(parse_run_config({"method": "rcsr", "out-dir": str(tmp_path), "run-name": "r"}), {})
    recorder.rounds = [{"round": 0, "dev": {}}]
    assert recorder.plot_router() is None  # nothing routed yet
    strategy = rcsr()
    for rnd in (1, 2):
        strategy.aggregate_train(rnd, mixed_replies(shift=rnd / 10))
        recorder.log_round({"round": rnd, "train": strategy.last_train})
    path = recorder.plot_router()
    assert path is not None and path.stat().st_size > 1000
    logged = [c["router-weight"] for c in recorder.rounds[-1]["train"]["clients"]]
    assert sum(logged) == pytest.approx(1.0)


def test_prototype_fusion_weighs_each_item_once_not_size_squared() -> None:
    """Row counts already carry a client's size; fusing with num-examples x counts weighted clients by n²."""
    strategy = rcsr("uniform", with_globals=False, **{"rcsr-minimax-eta": 0.0})
    (t1, _), (t2, _) = table(1), table(2)
    small, big = reply(1, "image-only", 1.0), reply(2, "image-only", 2.0)
    for msg, t, n in ((small, t1, 10), (big, t2, 30)):
        msg.content["metrics"]["num-examples"] = n
        msg.content["prototypes"] = ArrayRecord({"img": Array(t), "img-count": Array(np.full(1 + C, n, np.float32))})
    strategy.aggregate_train(1, [small, big])
    expected = unit(10 * t1.astype(np.float64) + 30 * t2)  # item-weighted: each item counts once
    np.testing.assert_allclose(strategy.state.buffers["proto/img"], expected, rtol=1e-5, atol=1e-6)


def test_the_consistency_holdout_rotates_so_no_image_is_lost_to_training() -> None:
    """Each round holds out a fresh slice of about `share` of the node's images (disjoint from that round's training
    part by construction); over 1/share rounds every image was held out once and trained on in all other rounds."""
    n, share = 53, 0.1
    rounds = [rotating_holdout(n, share, seed=0, partition_id=3, server_round=r) for r in range(1, 11)]
    assert all(len(h) == 5 and len(np.unique(h)) == 5 for h in rounds)
    assert not np.array_equal(rounds[0], rounds[1])
    held_count = np.bincount(np.concatenate(rounds), minlength=n)
    assert held_count.max() == 1 and held_count.sum() == 50  # 10 slices of 5 from one permutation: no image twice
    trained = np.zeros(n, dtype=int)
    for h in rounds:
        trained[np.setdiff1d(np.arange(n), h)] += 1
    assert trained.min() >= 8, "every image is trained on in at least 8 of 10 rounds"
    np.testing.assert_array_equal(rotating_holdout(n, share, 0, 3, 4), rounds[3])  # reproducible per round
    assert len(rotating_holdout(12, share, 0, 3, 1)) == 0, "too small to hold 2 images out"
