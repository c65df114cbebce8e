"""The new baselines and the base hooks on constructed messages: local, paired-only, centralized, FedProto;
selection, metric aggregation and per-tower weights."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.config import parse_run_config
from common.prototypes import fuse_prototypes
from fedxmr_server.strategies import build_strategy
from tests.messages import grid, identities, reply

GLOBAL = {"img.w": np.zeros((2, 3), np.float32), "txt.b": np.zeros(3, np.float32), "logit_scale": np.zeros(1)}
PAIRED = {"num-examples": 10, "has-img": 1, "has-txt": 1, "train-loss": 1.0}
IMAGE_ONLY = {"num-examples": 30, "has-img": 1, "has-txt": 0, "train-loss": 2.0}
TEXT_ONLY = {"num-examples": 60, "has-img": 0, "has-txt": 1}


def strategy(method: str, **keys):
    # FedAvg's weights as they are: the cap on a client's share (common/trust.py) has its own tests (test_attacks.py)
    s = build_strategy(parse_run_config({"method": method, "max-client-share": 1.0, **keys}))
    s.state.arrays = {k: v.copy() for k, v in GLOBAL.items()}
    return s


def full(value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in GLOBAL.items()}


# ---- base hooks --------------------------------------------------------------------------------------------------
def test_train_metrics_average_over_the_clients_that_report_them() -> None:
    """A key missing from a reply is not a 0 (the old code took keys from the first reply and filled with 0)."""
    s = strategy("fedavg")
    _, metrics = s.aggregate_train(1, [reply(1, {"txt.b": GLOBAL["txt.b"]}, TEXT_ONLY), reply(2, full(1.0), PAIRED),
                                       reply(3, {"img.w": GLOBAL["img.w"]}, IMAGE_ONLY)])
    assert metrics["train-loss"] == pytest.approx((1.0 * 10 + 2.0 * 30) / 40)
    assert metrics["num-examples"] == 100


def test_logged_weights_show_each_clients_share_of_each_tower() -> None:
    s = strategy("fedavg")
    s.aggregate_train(1, [reply(1, full(1.0), PAIRED), reply(2, {"img.w": GLOBAL["img.w"]}, IMAGE_ONLY),
                          reply(3, {"txt.b": GLOBAL["txt.b"]}, TEXT_ONLY)])
    rows = {c["node-id"]: c for c in s.last_train["clients"]}
    assert rows[1]["weight"] == pytest.approx(0.1)  # before per-key renormalisation
    assert rows[1]["weight-img"] == pytest.approx(10 / 40) and rows[1]["weight-txt"] == pytest.approx(10 / 70)
    assert "weight-txt" not in rows[2] or rows[2]["weight-txt"] == 0.0
    assert rows[3]["weight-txt"] == pytest.approx(60 / 70)


def test_aggregation_does_not_depend_on_reply_order() -> None:
    replies = [reply(i, full(v), {**PAIRED, "partition-id": i, "num-examples": 3 + i})
               for i, v in enumerate([0.1, 0.7, 1e-3, 5.0])]
    a, b = strategy("fedavg"), strategy("fedavg")
    a.aggregate_train(1, replies)
    b.aggregate_train(1, replies[::-1])
    assert all(np.array_equal(a.state.arrays[k], b.state.arrays[k]) for k in GLOBAL)


def test_selection_keeps_the_best_dev_round_and_the_earlier_of_ties() -> None:
    s = strategy("fedavg")
    for rnd, rsum in [(1, 10.0), (2, 30.0), (3, 30.0), (4, 20.0)]:
        s.state.arrays = full(float(rnd))
        s._select(rnd, {"rsum": rsum})
    assert s.best.round == 2 and s.best.arrays["img.w"][0, 0] == 2.0
    s.state.arrays["img.w"][:] = 99  # the kept copy is not an alias of the live model
    assert s.best.arrays["img.w"][0, 0] == 2.0


def test_methods_without_a_global_model_select_on_the_mean_client_dev_score() -> None:
    s = strategy("local")
    for rnd, score in [(1, 5.0), (2, 9.0), (3, 7.0)]:
        s.last_evaluate = {"summary": {"all-global-mean": score}}
        s._select(rnd, None)
    assert s.best.round == 2


DEV_ROUNDS = [{"rsum": 250.0, "emb_smap_i2t": 0.60, "emb_smap_t2i": 0.60, "hash_smap_i2t": 0.50, "hash_smap_t2i": 0.50},
              {"rsum": 270.0, "emb_smap_i2t": 0.55, "emb_smap_t2i": 0.57, "hash_smap_i2t": 0.52, "hash_smap_t2i": 0.50},
              {"rsum": 260.0, "emb_smap_i2t": 0.58, "emb_smap_t2i": 0.58, "hash_smap_i2t": 0.55, "hash_smap_t2i": 0.56}]


@pytest.mark.parametrize("select_on,expected", [("rsum", 2), ("map", 1), ("hash-map", 3), ("auto", 2)])
def test_select_on_selects_the_round_with_the_best_dev_value_of_that_metric(select_on: str, expected: int) -> None:
    """`auto` on Flickr8k captions (not a feature file) is rsum."""
    s = strategy("fedavg", **{"select-on": select_on})
    for rnd, dev in enumerate(DEV_ROUNDS, start=1):
        s._select(rnd, dev)
    assert s.best.round == expected


def test_select_on_a_map_without_labels_is_a_named_error_and_auto_is_hash_map_on_a_feature_file(tmp_path) -> None:
    s = strategy("fedavg", **{"select-on": "hash-map"})
    with pytest.raises(ValueError, match="select-on"):
        s._select(1, {"rsum": 1.0})
    features = tmp_path / "data.npz"
    features.write_bytes(b"")
    assert parse_run_config({"data-dir": str(features)}).selection_metric() == "hash-map"
    assert parse_run_config({"data-dir": str(tmp_path)}).selection_metric() == "rsum"


def test_methods_without_a_global_model_select_on_the_mean_client_hamming_map() -> None:
    s = strategy("local", **{"select-on": "hash-map"})
    for rnd, (score, smap) in enumerate([(5.0, 0.4), (9.0, 0.3), (7.0, 0.5)], start=1):
        s.last_evaluate = {"summary": {"all-global-mean": score, "all-global-smap_i2t-mean": smap,
                                       "all-global-smap_t2i-mean": smap}}
        s._select(rnd, None)
    assert s.best.round == 3


# ---- local ---------------------------------------------------------------------------------------------------------
def test_local_keeps_one_model_per_client_and_sends_each_node_its_own() -> None:
    """Per-client models are keyed by partition (node ids change when a run is resumed)."""
    s = strategy("local")
    s.aggregate_train(1, [reply(1, full(1.0), {**PAIRED, "partition-id": 5}),
                          reply(2, {"img.w": np.full((2, 3), 3.0, np.float32)}, {**IMAGE_ONLY, "partition-id": 7})])
    assert s.state.arrays["img.w"].max() == 0, "local never aggregates into the initial model"
    assert s.state.clients["client-5"]["img.w"].max() == 1.0 and s.state.clients["client-7"]["img.w"].max() == 3.0
    assert s.state.clients["client-7"]["txt.b"].max() == 0.0, "keys a node does not train stay at the initialisation"
    msgs = s.configure_train(2, ArrayRecord(), None, grid([1, 2, 3]))
    sent = {m.metadata.dst_node_id: m.content["arrays"]["img.w"].numpy().max() for m in msgs}
    assert sent == {1: 1.0, 2: 3.0, 3: 0.0}  # node 3 never trained: the common initialisation


def test_local_evaluates_each_node_against_the_gallery_of_its_own_model() -> None:
    s = strategy("local")
    s.aggregate_train(1, [reply(1, full(1.0), {**PAIRED, "partition-id": 1}),
                          reply(2, full(2.0), {**PAIRED, "partition-id": 2})])
    s.gallery_fn = lambda arrays, split: {"caption-image": np.zeros(2, np.int64),
                                          "img-emb": np.full((1, 1), arrays["img.w"].max()),
                                          "txt-emb": np.full((2, 1), arrays["img.w"].max())}
    msgs = s.configure_evaluate(1, ArrayRecord(), None, grid([1, 2]))
    assert {m.metadata.dst_node_id: m.content["gallery"]["img-emb"].numpy().max() for m in msgs} == {1: 1.0, 2: 2.0}
    assert all(m.content["config"]["split"] == "dev" for m in msgs)


# ---- paired-only ---------------------------------------------------------------------------------------------------
def test_paired_only_averages_the_paired_clients_and_accepts_silent_unimodal_ones() -> None:
    s = strategy("paired-only")
    arrays, _ = s.aggregate_train(1, [reply(1, full(1.0), PAIRED), reply(2, {}, IMAGE_ONLY),
                                      reply(3, {}, TEXT_ONLY), reply(4, full(4.0), {**PAIRED, "num-examples": 30})])
    assert s.last_train["usable"] == 4
    np.testing.assert_allclose(arrays["img.w"].numpy(), (1.0 * 10 + 4.0 * 30) / 40)
    assert {c["node-id"]: c["weight"] for c in s.last_train["clients"]}[2] == 0.0


def test_paired_only_rejects_arrays_from_a_unimodal_client() -> None:
    s = strategy("paired-only")
    s.aggregate_train(1, [reply(1, full(1.0), PAIRED), reply(2, {"img.w": np.ones((2, 3), np.float32)},
                                                               IMAGE_ONLY)])
    assert s.last_train["usable"] == 1
    assert s.state.arrays["img.w"].max() == 1.0


# ---- centralized ---------------------------------------------------------------------------------------------------
def test_centralized_needs_exactly_one_node() -> None:
    s = strategy("centralized")
    assert [m.metadata.dst_node_id for m in s.configure_train(1, ArrayRecord(), None, grid([7]))] == [7]
    with pytest.raises(RuntimeError, match="exactly one node"):
        list(s.configure_train(1, ArrayRecord(), None, grid([7, 8])))


# ---- FedProto ------------------------------------------------------------------------------------------------------
def _tables(seed: int, counts: list[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(len(counts), 8))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.array(counts, np.float32)


def test_fedproto_exchanges_prototypes_only_and_fuses_them_by_counts() -> None:
    s = strategy("fedproto", **{"embed-dim": 8})
    (ta, ca), (tb, cb) = _tables(0, [4, 1, 3]), _tables(1, [6, 3, 0])
    tt, ct = _tables(2, [5, 5, 5])
    replies = [reply(1, None, PAIRED, records={"prototypes": {"img": ta, "img-count": ca, "txt": tt,
                                                             "txt-count": ct}}),
               reply(2, None, IMAGE_ONLY, records={"prototypes": {"img": tb, "img-count": cb}})]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is None or len(arrays) == len(GLOBAL)
    expected, _ = fuse_prototypes(np.zeros_like(ta), np.zeros(3, np.float32), [ta, tb], [ca, cb], np.ones(2), 0.0)
    np.testing.assert_allclose(s.state.buffers["proto/img"], expected, rtol=1e-6)
    np.testing.assert_allclose(s.state.buffers["proto/txt"], tt, rtol=1e-6)
    msgs = s.configure_train(2, ArrayRecord(), None, grid([1, 2]))
    for m in msgs:
        assert "arrays" not in m.content.array_records, "FedProto never sends weights"
        assert set(m.content["prototypes"].keys()) == {"img", "img-count", "txt", "txt-count"}


def test_fedproto_rejects_weights_and_bad_or_missing_prototypes() -> None:
    s = strategy("fedproto", **{"embed-dim": 8})
    good = {"prototypes": {"img": _tables(0, [1, 1, 1])[0], "img-count": np.ones(3, np.float32)}}
    wide = {"prototypes": {"img": np.ones((3, 5), np.float32), "img-count": np.ones(3, np.float32)}}
    negative = {"prototypes": {"img": _tables(0, [1, 1, 1])[0], "img-count": -np.ones(3, np.float32)}}
    s.aggregate_train(1, [reply(1, {"img.w": GLOBAL["img.w"]}, IMAGE_ONLY, records=good), reply(2, None, IMAGE_ONLY),
                          reply(3, None, IMAGE_ONLY, records=good), reply(4, None, IMAGE_ONLY, records=wide),
                          reply(5, None, IMAGE_ONLY, records=negative)])
    assert s.last_train["usable"] == 1
    more_rows = {"prototypes": {"img": _tables(1, [1, 1, 1, 1])[0], "img-count": np.ones(4, np.float32)}}
    s.aggregate_train(2, [reply(3, None, IMAGE_ONLY, records=good), reply(6, None, IMAGE_ONLY, records=more_rows)])
    assert s.last_train["usable"] == 1, "after the first fusion, tables must keep the global row count"


def test_a_reply_with_arrays_of_a_modality_it_does_not_hold_is_left_out() -> None:
    s = strategy("fedavg")
    s.aggregate_train(1, [reply(1, full(1.0), PAIRED), reply(2, full(5.0), IMAGE_ONLY)])
    assert s.last_train["usable"] == 1 and s.state.arrays["txt.b"].max() == 1.0


def test_fedproto_evaluation_sends_raw_gallery_features() -> None:
    s = strategy("fedproto")
    s.gallery_fn = lambda arrays, split: ({"caption-image": np.zeros(2, np.int64), "img-feat": np.ones((1, 5)),
                                           "txt-feat": np.ones((2, 3))} if arrays is None else pytest.fail("embedded"))
    for msg in s.configure_evaluate(1, ArrayRecord(), None, grid([1, 2])):
        assert set(msg.content["gallery"].keys()) == {"caption-image", "img-feat", "txt-feat"}
        assert "arrays" not in msg.content.array_records


def test_a_run_without_any_dev_score_reports_its_last_round() -> None:
    """If no round can be scored (every per-client dev reply failed), `local` must not crash or test the initial
    models: it reports the last round and says so."""
    s = strategy("local")
    g = grid([1, 2])

    def send_and_receive(messages, timeout):
        messages = list(messages)
        if identities(messages):
            return identities(messages)
        if messages[0].metadata.message_type == "train":
            return [reply(m.metadata.dst_node_id, full(float(m.metadata.dst_node_id)),
                          {**PAIRED, "partition-id": m.metadata.dst_node_id}) for m in messages]
        return [reply(m.metadata.dst_node_id, None, {}, error="dev evaluation failed") for m in messages]

    g.send_and_receive.side_effect = send_and_receive
    s.gallery_fn = lambda arrays, split: {"caption-image": np.zeros(1, np.int64), "img-emb": np.ones((1, 1)),
                                          "txt-emb": np.ones((1, 1))}
    s.start(grid=g, initial_arrays=ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), num_rounds=2)
    assert s.best.round == 2
    assert {n: a["img.w"].max() for n, a in s.best.clients.items()} == {"client-1": 1.0, "client-2": 2.0}


def _scripted_grid(client_scores: dict[int, float]) -> tuple:
    """A grid whose train replies echo the node id and whose per-client dev score is `client_scores[round]`;
    returns it and the list of rounds that sent evaluation messages."""
    g, evaluated = grid([1, 2]), []

    def send_and_receive(messages, timeout):
        messages = list(messages)
        if identities(messages):
            return identities(messages)
        rnd = int(messages[0].content["config"]["server-round"])
        if messages[0].metadata.message_type == "train":
            return [reply(m.metadata.dst_node_id, full(float(rnd)), {**PAIRED, "partition-id": m.metadata.dst_node_id})
                    for m in messages]
        evaluated.append(rnd)
        return [reply(m.metadata.dst_node_id, None, {"num-examples": 1, "partition-id": m.metadata.dst_node_id,
                                                     "client-type": 0, "global-score": client_scores[rnd]})
                for m in messages]

    g.send_and_receive.side_effect = send_and_receive
    return g, evaluated


def test_eval_every_scores_only_due_rounds_and_the_last_and_selects_among_them() -> None:
    s = strategy("fedavg", **{"eval-every": 3, "client-eval-every": 2})
    g, evaluated = _scripted_grid({r: 1.0 for r in range(6)})
    s.gallery_fn = lambda arrays, split: {"caption-image": np.zeros(1, np.int64), "img-emb": np.ones((1, 1)),
                                          "txt-emb": np.ones((1, 1))}
    dev_rounds = []

    def evaluate_fn(rnd, arrays):
        dev_rounds.append(rnd)
        return {"rsum": {0: 0.0, 3: 5.0, 5: 4.0}[rnd]}

    s.start(grid=g, initial_arrays=ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), num_rounds=5,
            evaluate_fn=evaluate_fn)
    assert dev_rounds == [0, 3, 5] and evaluated == [2, 4, 5]
    assert s.best.round == 3 and s.best.arrays["img.w"].max() == 3.0


def test_a_round_without_client_evaluation_never_reuses_the_previous_score() -> None:
    """`local` selects on the mean per-client dev score; with client-eval-every=2 round 3 has no score and must not
    inherit round 2's (the better one here is round 2, then round 4 is worse)."""
    s = strategy("local", **{"client-eval-every": 2})
    g, evaluated = _scripted_grid({2: 50.0, 4: 40.0})
    s.gallery_fn = lambda arrays, split: {"caption-image": np.zeros(1, np.int64), "img-emb": np.ones((1, 1)),
                                          "txt-emb": np.ones((1, 1))}
    s.start(grid=g, initial_arrays=ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), num_rounds=4)
    assert evaluated == [2, 4] and s.best.round == 2 and s.best.score == 50.0
    assert {n: a["img.w"].max() for n, a in s.best.clients.items()} == {"client-1": 2.0, "client-2": 2.0}
