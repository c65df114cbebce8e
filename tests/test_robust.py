"""What the server trusts (docs/TRUST.md): reply screening and robust aggregation, on constructed replies."""

from __future__ import annotations

import numpy as np
import pytest

from common.robust import combine, norm_outliers, update_norms
from tests.messages import reply
from tests.test_methods import strategy

G = {"img.w": np.zeros((2, 3), np.float32), "txt.b": np.zeros(3, np.float32), "logit_scale": np.zeros(1, np.float32)}
PAIRED = {"has-img": 1, "has-txt": 1}


def full(value: float, dtype=np.float32) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, dtype=dtype) for k, v in G.items()}


def honest(node: int, value: float = 1.0, n: float = 10) -> object:
    return reply(node, full(value), {**PAIRED, "num-examples": n, "partition-id": node})


def _rejected(s) -> dict[int, str]:
    return {r["node-id"]: r["reason"] for r in s.last_train["rejected"]}


# ---- screening ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arrays,reason", [
    (full(1e300, np.float64), "non-finite values (as float32)"),
    (full(1, np.int8), "dtype int8"),
    (full(1, bool), "dtype bool"),
    ({k: np.full(v.shape, 1 + 2j) for k, v in G.items()}, "dtype complex128"),
])
def test_arrays_are_checked_as_the_global_model_would_store_them(arrays: dict, reason: str) -> None:
    s = strategy("fedavg")
    s.aggregate_train(1, [honest(1), honest(2, 3.0), reply(3, arrays, {**PAIRED, "num-examples": 10})])
    assert reason in _rejected(s)[3]
    np.testing.assert_allclose(s.state.arrays["img.w"], 2.0)


@pytest.mark.parametrize("n,reason", [(1e15, "exceeds max-num-examples"), (float("inf"), "positive finite"),
                                      (0, "positive finite"), (-3, "positive finite")])
def test_num_examples_must_be_a_plausible_count(n: object, reason: str) -> None:
    s = strategy("fedavg")
    s.aggregate_train(1, [honest(1), honest(2, 3.0), reply(3, full(1e3), {**PAIRED, "num-examples": n})])
    assert reason in _rejected(s)[3]
    np.testing.assert_allclose(s.state.arrays["txt.b"], 2.0)


def test_an_update_far_longer_than_the_rounds_median_is_screened_out_and_recorded() -> None:
    s = strategy("fedavg")
    replies = [honest(1, 1.0), honest(2, 1.2), honest(3, 0.9), reply(4, full(1e3), {**PAIRED, "num-examples": 10,
                                                                                   "partition-id": 7})]
    s.aggregate_train(1, replies)
    assert "update norm" in _rejected(s)[4] and s.last_train["rejected"][0]["partition-id"] == 7
    assert s.last_train["usable"] == 3
    assert float(s.state.arrays["img.w"].max()) < 2
    off = strategy("fedavg", **{"update-norm-limit": 0.0})
    off.aggregate_train(1, replies)
    assert off.last_train["rejected"] == [] and float(off.state.arrays["img.w"].max()) > 100


def test_a_failing_node_is_recorded_with_its_reason() -> None:
    s = strategy("fedavg")
    s.aggregate_train(1, [honest(1), reply(2, None, {}, error="ClientApp raised ValueError: bad image x.jpg")])
    assert _rejected(s) == {2: "the node failed: ClientApp raised ValueError: bad image x.jpg"}


def test_list_valued_metrics_do_not_crash_the_round() -> None:
    s = strategy("fedavg")
    odd = reply(2, full(3.0), {**PAIRED, "num-examples": 10, "partition-id": [1, 2], "train-loss": [0.5, 0.7]})
    arrays, metrics = s.aggregate_train(1, [honest(1), odd])
    np.testing.assert_allclose(arrays["img.w"].numpy(), 2.0)
    assert "train-loss" not in metrics or np.isfinite(metrics["train-loss"])


def test_norm_outliers_need_company_and_look_per_tower() -> None:
    clients = [{"img.w": np.full((2, 3), 1.0)}, {"img.w": np.full((2, 3), 50.0)}]
    assert norm_outliers(G, clients, 10.0) == [None, None]  # two updates: no median to speak of
    clients += [{"img.w": np.full((2, 3), 1.1)}, {"txt.b": np.full(3, 100.0)}]
    reasons = norm_outliers(G, clients, 10.0)
    assert reasons[1] and "img update norm" in reasons[1] and reasons[0] is None and reasons[3] is None
    assert update_norms(G, {"img.w": np.ones((2, 3)), "logit_scale": np.full(1, 2.0)}) == {
        "img": pytest.approx(np.sqrt(6)), "shared": pytest.approx(2.0)}


# ---- robust aggregation ------------------------------------------------------------------------------------------
def _clients(values: list[float]) -> list[dict[str, np.ndarray]]:
    return [{"img.w": np.full((2, 3), v, np.float32)} for v in values]


def test_mean_is_fedavg_and_trim_zero_is_the_mean_over_clients() -> None:
    clients, w = _clients([1.0, 2.0, 10.0]), np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(combine(G, clients, w)["img.w"], 0.5 + 0.5 + 2.5)
    np.testing.assert_allclose(combine(G, clients, w, "trimmed-mean", trim=0.0)["img.w"], 13 / 3, rtol=1e-6)
    np.testing.assert_array_equal(combine(G, clients, w)["txt.b"], G["txt.b"])  # nobody sent it


def test_median_and_trimmed_mean_resist_one_poisoned_client() -> None:
    clients, w = _clients([1.0, 1.2, 0.8, 1e6]), np.full(4, 0.25)
    assert combine(G, clients, w)["img.w"].max() > 1e5
    np.testing.assert_allclose(combine(G, clients, w, "median")["img.w"], 1.0)
    np.testing.assert_allclose(combine(G, clients, w, "trimmed-mean", trim=0.25)["img.w"], 1.1, rtol=1e-6)
    # one vote per client: a poisoned client claiming most of the examples does not carry the median
    np.testing.assert_allclose(combine(G, clients, np.array([0.01, 0.01, 0.01, 0.97]), "median")["img.w"], 1.0)
    np.testing.assert_allclose(combine(G, clients, np.array([0.01, 0.01, 0.01, 0.97]), "trimmed-mean",
                                       trim=0.25)["img.w"], 1.1, rtol=1e-6)


def test_norm_clip_bounds_each_update_by_the_rounds_median_norm() -> None:
    clients, w = _clients([1.0, 2.0, 100.0]), np.full(3, 1 / 3)
    out = combine(G, clients, w, "norm-clip")["img.w"]
    np.testing.assert_allclose(out, (1.0 + 2.0 + 2.0) / 3, rtol=1e-6)  # the 100 update is clipped to norm of 2


def test_every_aggregation_works_under_every_weight_sharing_method() -> None:
    for method in ("fedavg", "fedprox", "paired-only", "unialign"):
        for aggregation in ("mean", "trimmed-mean", "median", "norm-clip"):
            s = strategy(method, aggregation=aggregation)
            arrays, _ = s.aggregate_train(1, [honest(1, 1.0), honest(2, 2.0), honest(3, 3.0)])
            assert 1.0 <= float(arrays["img.w"].numpy().mean()) <= 3.0, (method, aggregation)


def test_bad_aggregation_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        combine(G, _clients([1.0]), np.ones(1), "mode")
    with pytest.raises(ValueError, match="trim"):
        combine(G, _clients([1.0]), np.ones(1), "trimmed-mean", trim=0.5)


def test_the_run_summary_counts_the_replies_left_out() -> None:
    from fedxmr_server.report import _rejection_lines

    rounds = [{"round": 1, "train": {"rejected": [{"node-id": 5, "reason": "the node failed: a|b"}]}},
              {"round": 2, "train": {"rejected": [{"node-id": 5, "reason": "later"}, {"node-id": 6, "reason": "x"}]}},
              {"round": 3, "train": {"rejected": []}}]
    text = "\n".join(_rejection_lines(rounds))
    assert "left out: 3" in text and "| 5 | 1, 2 | the node failed: a/b |" in text and "| 6 | 2 | x |" in text
    assert "none" in "\n".join(_rejection_lines(rounds[2:]))


# ---- honest run status -------------------------------------------------------------------------------------------
def _run(method: str, nodes: list[int], failing: set[int], rounds: int, **keys: object):
    """`start` against a grid whose nodes in `failing` always fail their train message; returns the strategy and
    the per-round records `round_fn` saw."""
    from flwr.app import Array, ArrayRecord

    from tests.messages import grid

    s = strategy(method, **keys)
    g, seen = grid(nodes), []

    def send_and_receive(messages, timeout):
        messages = list(messages)
        if messages[0].metadata.message_type != "train":
            return []
        return [reply(m.metadata.dst_node_id, None, {}, error="boom") if m.metadata.dst_node_id in failing else
                reply(m.metadata.dst_node_id, full(1.0), {**PAIRED, "num-examples": 5,
                                                          "partition-id": m.metadata.dst_node_id})
                for m in messages]

    g.send_and_receive.side_effect = send_and_receive
    s.gallery_fn = lambda arrays, split: {"caption-image": np.zeros(1, np.int64), "img-emb": np.ones((1, 1)),
                                          "txt-emb": np.ones((1, 1))}
    round_fn = lambda rnd, dev: seen.append(dict(s.last_train))  # noqa: E731
    s.start(grid=g, initial_arrays=ArrayRecord({k: Array(v) for k, v in G.items()}), num_rounds=rounds,
            round_fn=round_fn, **{"evaluate_fn": lambda rnd, arrays: {"rsum": float(rnd)}})
    return s, seen


def test_a_failing_client_is_recorded_every_round_and_the_run_goes_on() -> None:
    s, seen = _run("fedavg", [1, 2, 3], {2}, rounds=3, **{"client-eval-every": 100})
    assert [len(r["rejected"]) for r in seen[1:]] == [1, 1, 1]
    assert all(r["rejected"][0]["node-id"] == 2 and not r["under-quorum"] for r in seen[1:])


def test_rounds_below_quorum_fail_the_run_after_max_failed_rounds() -> None:
    from fedxmr_server.strategies.base import RunFailed

    with pytest.raises(RunFailed, match="2 rounds in a row .* min-nodes=2"):
        _run("fedavg", [1, 2, 3], {2, 3}, rounds=5, **{"max-failed-rounds": 2, "client-eval-every": 100})
    with pytest.raises(RunFailed, match="rounds in a row"):
        _run("fedavg", [1, 2], {1, 2}, rounds=5, **{"client-eval-every": 100})


def test_a_run_in_which_no_client_ever_trained_fails() -> None:
    from fedxmr_server.strategies.base import RunFailed

    with pytest.raises(RunFailed, match="no client ever sent a usable train reply"):
        _run("fedavg", [1, 2], {1, 2}, rounds=2, **{"max-failed-rounds": 10, "client-eval-every": 100})


def test_a_single_node_is_its_own_quorum() -> None:
    s, seen = _run("centralized", [1], set(), rounds=3, **{"client-eval-every": 100})
    assert not any(r["under-quorum"] for r in seen[1:])


def test_fault_drills() -> None:
    import torch
    from flwr.app import RecordDict

    from fedxmr_client.faults import InjectedFault, apply_fault, fault_of

    assert fault_of("1:raise,3:poison", 3) == "poison" and fault_of("1:raise", 2) is None and fault_of("", 0) is None
    state, received, memo = {"a": torch.tensor([2.0, 3.0])}, {"a": np.array([1.0, 1.0], np.float32)}, RecordDict()
    assert apply_fault(None, state, received, 7, memo) == (state, 7)
    poisoned, n = apply_fault("poison", state, received, 7, memo)
    assert n == 7000 and torch.allclose(poisoned["a"], torch.tensor([1001.0, 2001.0]))
    assert torch.isnan(apply_fault("nan", state, received, 7, memo)[0]["a"]).all()
    with pytest.raises(InjectedFault, match="fault drill"):
        apply_fault("raise", state, received, 7, memo)
    flipped, n = apply_fault("flip", state, received, 7, memo)  # 5 x the update, the other way
    assert n == 7 and torch.allclose(flipped["a"], torch.tensor([-4.0, -9.0]))
    assert apply_fault("inflate", state, received, 7, memo) == (state, 7000)
    first, _ = apply_fault("replay", state, received, 7, memo)
    later, _ = apply_fault("replay", {"a": torch.tensor([5.0, 5.0])}, received, 7, memo)
    assert torch.equal(first["a"], state["a"]) and torch.equal(later["a"], state["a"])  # the first upload, again


def test_attack_drills_tamper_only_what_they_name() -> None:
    from flwr.app import Array, ArrayRecord, RecordDict

    from fedxmr_client.faults import tamper_reply

    def reply() -> tuple[dict, RecordDict]:
        records = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))}),
                              "memory": ArrayRecord({"memory": Array(np.full((2, 2), 0.5, np.float32)),
                                                     "count": Array(np.array([3.0, 1.0], np.float32))})})
        return {"train-loss": 1.0, "rcsr-consistency": 0.5}, records

    metrics, records = reply()
    tamper_reply("inflate", metrics, records, "arrays")
    np.testing.assert_array_equal(records["memory"]["count"].numpy(), [3000.0, 1000.0])
    np.testing.assert_array_equal(records["memory"]["memory"].numpy(), 0.5)
    metrics, records = reply()
    tamper_reply("scale", metrics, records, "arrays")
    np.testing.assert_array_equal(records["memory"]["memory"].numpy(), 500.0)
    np.testing.assert_array_equal(records["memory"]["count"].numpy(), [3.0, 1.0])
    np.testing.assert_array_equal(records["arrays"]["w"].numpy(), 1.0)  # the model arrays are apply_fault's
    tamper_reply("boast", metrics, records, "arrays")
    assert metrics == {"train-loss": 1e30, "rcsr-consistency": 50.0}


def test_fault_drills_are_validated_in_the_run_config() -> None:
    from common.config import _DRILL, ConfigError, parse_run_config
    from fedxmr_client.faults import FAULTS

    assert parse_run_config({"faults": "0:raise,12:nan"}).faults == "0:raise,12:nan"
    assert _DRILL == "(" + "|".join(FAULTS) + ")"
    with pytest.raises(ConfigError, match="faults"):
        parse_run_config({"faults": "0:explode"})


# ---- early checks ------------------------------------------------------------------------------------------------
def test_unusable_paths_are_found_before_anything_runs(tmp_path) -> None:
    from common.config import parse_run_config
    from common.preflight import path_problems

    a_file = tmp_path / "file"
    a_file.write_text("x")
    problems = path_problems(parse_run_config({"data-dir": str(tmp_path / "nowhere"), "cache-dir": str(a_file),
                                               "out-dir": "/proc/fedxmr-cannot-exist"}))
    assert len(problems) == 3
    assert "'data-dir'" in problems[0] and "missing" in problems[0]
    assert "'cache-dir'" in problems[1] and "not a directory" in problems[1]
    assert "'out-dir'" in problems[2] and "cannot create or write" in problems[2]


def test_the_wrapper_refuses_a_bad_run_config_in_one_line_before_flower_starts(flickr8k_dir) -> None:
    from scripts.simulate import preflight

    assert preflight(f"data-dir='{flickr8k_dir}' num-server-rounds=2") == []
    assert "num-server-rounds" in preflight(f"data-dir='{flickr8k_dir}' num-server-rounds=0")[0]
    assert "unknown run config keys ['num-rounds']" in preflight("num-rounds=3")[0]
    assert all("\n" not in p for p in preflight("data-dir='/nowhere' lr=-1"))


def test_a_missing_train_image_fails_only_the_node_that_holds_it(tmp_path, make_fake_flickr8k) -> None:
    from common.config import parse_run_config
    from common.data.split import DatasetError
    from common.data.shards import cut_shard

    names = [f"img{i}.jpg" for i in range(8)]
    root = make_fake_flickr8k(tmp_path / "f8k", {n: [f"a dog {n}", f"a cat {n}"] for n in names},
                              {"train": names, "dev": names[:2], "test": names[2:4]})
    cfg = parse_run_config({"data-dir": str(root), "partitioner": "iid"})
    holder = next(pid for pid in range(2) if "img5.jpg" in cut_shard(cfg, pid, 2, root, "train").data.images)
    (root / "images" / "img5.jpg").unlink()
    with pytest.raises(DatasetError, match=r"partition \d \(train\): 1 image file\(s\).*img5.jpg"):
        cut_shard(cfg, holder, 2, root, "train")
    assert len(cut_shard(cfg, 1 - holder, 2, root, "train").data.images) == 4
    text_only = parse_run_config({"data-dir": str(root), "partitioner": "iid", "modality-mix": "0,0,1"})
    assert len(cut_shard(text_only, holder, 2, root, "train").data.images) == 4  # never touches image files


def test_a_corrupt_train_image_fails_only_the_node_that_holds_it_naming_the_file(tmp_path, make_fake_flickr8k) -> None:
    """An unreadable image (here: not a JPEG at all) surfaces when its holder encodes its shard, naming the file;
    the other node never reads it."""
    from common.backbones import BackboneError, build_backbone
    from common.config import parse_run_config
    from common.data.shards import cut_shard
    from common.features import split_features

    names = [f"img{i}.jpg" for i in range(8)]
    root = make_fake_flickr8k(tmp_path / "f8k", {n: [f"a dog {n}", f"a cat {n}"] for n in names},
                              {"train": names, "dev": names[:2], "test": names[2:4]})
    cfg = parse_run_config({"data-dir": str(root), "partitioner": "iid"})
    shards = [cut_shard(cfg, pid, 2, root, "train") for pid in range(2)]
    holder = next(pid for pid in range(2) if "img5.jpg" in shards[pid].data.images)
    (root / "images" / "img5.jpg").write_bytes(b"not an image")
    backbone = build_backbone("openclip:fedxmr-tiny", "cpu")
    with pytest.raises(BackboneError, match=r"cannot read image .*img5.jpg"):
        split_features(shards[holder].data, backbone, tmp_path / "cache", modalities=("img", "txt"))
    feats = split_features(shards[1 - holder].data, backbone, tmp_path / "cache", modalities=("img", "txt"))
    assert len(feats["img"]) == 4


def test_an_existing_run_is_never_written_over(tmp_path, flickr8k_dir) -> None:
    from common.config import parse_run_config
    from common.preflight import path_problems

    cfg = parse_run_config({"data-dir": str(flickr8k_dir), "out-dir": str(tmp_path), "run-name": "r1",
                            "cache-dir": str(tmp_path / "cache")})
    assert path_problems(cfg) == []
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "metrics.jsonl").write_text("")
    assert "already holds a run" in path_problems(cfg)[0]


def test_a_node_that_never_replies_is_recorded_as_lost() -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from tests.messages import grid

    s = strategy("fedavg")
    list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in G.items()}), ConfigRecord(), grid([1, 2, 3])))
    s.aggregate_train(1, [honest(1), honest(3)])
    assert _rejected(s) == {2: "no reply (node lost, or past round-timeout)"} and s.last_train_asked == 3


def test_the_superlinks_error_for_an_unavailable_node_is_counted_once_for_that_node() -> None:
    """A SuperNode killed mid-round: the SuperLink answers for it with an error from node id 1 that replies to the
    message sent to it (seen in `make compose-test`); the loss must be recorded once, against the lost node."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from tests.messages import grid

    s = strategy("fedavg")
    messages = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in G.items()}), ConfigRecord(),
                                      grid([5, 6])))
    for i, msg in enumerate(messages):  # what the grid does when it sends them
        msg.metadata.__dict__["_message_id"] = f"id-{i}"
    lost = next(m for m in messages if m.metadata.dst_node_id == 6)
    unavailable = reply(1, None, {}, error="Error: Node Unavailable")
    unavailable.metadata.reply_to_message_id = lost.metadata.message_id
    s.aggregate_train(1, [honest(5), unavailable])
    assert _rejected(s) == {6: "the node failed: Error: Node Unavailable"}


def test_two_nodes_claiming_one_partition_are_kept_apart_and_reported_once(caplog) -> None:
    s = strategy("local")
    first, second = honest(1), reply(2, full(2.0), {**PAIRED, "num-examples": 10, "partition-id": 1})
    for _ in range(2):
        s.aggregate_train(1, [first, second])
    assert s.client_of(first) == "client-1" and s.client_of(second) == "node-2"
    assert set(s.state.clients) == {"client-1", "node-2"}
    assert sum("both say they hold partition 1" in r.message for r in caplog.records) == 1
