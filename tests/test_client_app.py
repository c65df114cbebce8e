"""The ClientApp on constructed messages: real Flickr8k subset, the tiny random-init open_clip backbone."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from common.config import ConfigError, parse_run_config
from common.data.concepts import CONCEPT_NAMES
from common.model import XmrModel, state_to_numpy
from fedxmr_client.app import app
from fedxmr_client.node import load_shard
from fedxmr_client.state_store import NodeStateStore

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


@pytest.fixture(autouse=True)
def _fresh_run_key(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Each test is its own run for the nodes' on-disk state (the cache dir is shared between tests)."""
    monkeypatch.setattr(sys.modules[__name__], "RUN_KEY", f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}",
                        raising=False)


RUN_KEY = "unset"


def _stored(run_config: dict, as_of: int, pid: int = 0) -> dict:
    """What the node keeps on its disk (`state_store`) as of round `as_of`."""
    return NodeStateStore.of(Path(run_config["cache-dir"]), RUN_KEY, pid).load(as_of)


def _global_arrays(run_config: dict) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    model = XmrModel(parse_run_config(run_config).model_cfg(64, 64))
    return ArrayRecord(model.state_dict()), state_to_numpy(model)


def _context(run_config: dict, pid: int = 0, num: int = 2) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": num}, state=RecordDict(),
                   run_config=run_config)


def _message(arrays: ArrayRecord | None, kind: str, server_round: int = 1, gallery: ArrayRecord | None = None,
             split: str = "dev", best_round: int = -1) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round, "split": split,
                                                  "best-round": best_round, "run-key": RUN_KEY})})
    if arrays is not None:
        content["arrays"] = arrays
    if gallery is not None:
        content["gallery"] = gallery
    return Message(content=content, dst_node_id=1, message_type=kind)


def _gallery(run_config: dict, n_images: int = 20) -> ArrayRecord:
    """A stand-in test gallery (the server sends the real one): random unit embeddings, 5 captions per image."""
    rng = np.random.default_rng(0)
    dim = parse_run_config(run_config).embed_dim

    def unit(n: int) -> np.ndarray:
        x = rng.normal(size=(n, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return ArrayRecord({"img-emb": Array(unit(n_images)), "txt-emb": Array(unit(5 * n_images)),
                        "caption-image": Array(np.repeat(np.arange(n_images), 5))})


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
    assert len(ctx.state) == 0 and not _stored(run_config, 1), "without personal adapters a node keeps no state"


def test_train_is_deterministic_per_partition_and_round(run_config: dict) -> None:
    arrays, _ = _global_arrays(run_config)
    first = app(_message(arrays, MessageType.TRAIN), _context(run_config))
    again = app(_message(arrays, MessageType.TRAIN), _context(run_config))
    other = app(_message(arrays, MessageType.TRAIN), _context(run_config, pid=1))
    key = "txt.proj.weight"
    assert np.array_equal(first.content["arrays"][key].numpy(), again.content["arrays"][key].numpy())
    assert not np.array_equal(first.content["arrays"][key].numpy(), other.content["arrays"][key].numpy())


def test_evaluate_scores_own_queries_against_the_gallery(run_config: dict) -> None:
    run_config = {**run_config, "max-eval-images": 20}
    arrays, _ = _global_arrays(run_config)
    reply = app(_message(arrays, MessageType.EVALUATE, gallery=_gallery(run_config), split="test"),
                _context(run_config, pid=1))
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 10 and metrics["client-type"] == 0  # 20 test images, 2 partitions, paired
    dev = app(_message(arrays, MessageType.EVALUATE, gallery=_gallery(run_config)), _context(run_config, pid=1))
    assert dev.content["metrics"]["num-examples"] == len(load_shard(_context(run_config, pid=1), "dev").data.images)
    recalls = [metrics[f"global-{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert all(0.0 <= r <= 100.0 for r in recalls) and recalls == sorted(recalls[:3]) + sorted(recalls[3:])
    assert metrics["global-score"] == pytest.approx(np.mean(recalls))
    assert "personal-score" not in metrics


def test_unimodal_clients_load_and_send_only_their_modality(run_config: dict) -> None:
    """With mix 0,0.5,0.5 over 2 clients one is image-only and one text-only: assert on what each loads."""
    run_config = {**run_config, "modality-mix": "0,0.5,0.5", "max-eval-images": 20}
    arrays, before = _global_arrays(run_config)
    seen = set()
    for pid in (0, 1):
        shard = load_shard(_context(run_config, pid), "train")
        seen.add(shard.client_type)
        (held,) = shard.modalities
        assert set(shard.feats) == {held}
        if held == "img":
            assert shard.data.captions == () and shard.data.caption_ids == () and shard.data.labels.size == 0
        reply = app(_message(arrays, MessageType.TRAIN), _context(run_config, pid))
        assert not reply.has_error(), reply.error
        sent = set(reply.content["arrays"].keys())
        assert sent == {k for k in before if k.startswith(held + ".")}, sent
        assert reply.content["metrics"][f"has-{held}"] == 1
        ev = app(_message(arrays, MessageType.EVALUATE, gallery=_gallery(run_config)), _context(run_config, pid))
        direction = "i2t" if held == "img" else "t2i"
        assert {k for k in ev.content["metrics"].keys() if k.startswith("global-")} == \
            {f"global-{direction}_r{k}" for k in (1, 5, 10)} | {"global-score"}
    assert seen == {"image-only", "text-only"}


def test_personal_adapters_stay_on_the_node(run_config: dict) -> None:
    run_config = {**run_config, "personal-adapters": True, "personal-epochs": 1, "max-eval-images": 20}
    arrays, before = _global_arrays(run_config)
    ctx = _context(run_config)
    reply = app(_message(arrays, MessageType.TRAIN), ctx)
    assert not reply.has_error(), reply.error
    assert set(reply.content["arrays"].keys()) == set(before), "personal adapters must not be uploaded"
    personal = _stored(run_config, 1)["personal-adapters"]
    assert personal and all(".personal." in k for k in personal.keys())
    assert any(np.abs(a).sum() > 0 for k, a in personal.items() if "up" in k), "personal adapters untrained"
    ev = app(_message(arrays, MessageType.EVALUATE, gallery=_gallery(run_config)), ctx)
    assert "personal-score" in ev.content["metrics"] and "global-score" in ev.content["metrics"]


def test_bad_run_config_fails_naming_the_key(run_config: dict) -> None:
    """Raised inside the handler; Flower's runtime turns it into the error reply the strategy skips."""
    arrays, _ = _global_arrays(run_config)
    with pytest.raises(ConfigError, match="'hash-bits'"):
        app(_message(arrays, MessageType.TRAIN), _context({**run_config, "hash-bits": 12}))


def test_mismatched_global_arrays_fail_naming_the_key(run_config: dict) -> None:
    arrays, _ = _global_arrays({**run_config, "embed-dim": 48})
    with pytest.raises(ValueError, match="img.proj.weight"):
        app(_message(arrays, MessageType.TRAIN), _context(run_config))


def test_rcsr_round_sends_prototypes_and_consistency(run_config: dict) -> None:
    """Round 1 (no global prototypes): prototypes of the node's modalities, no consistency, no anchoring. Round 2
    with the prototypes fed back as the global ones: anchored training and a measured consistency in [0, 1]."""
    run_config = {**run_config, "method": "rcsr", "rcsr-holdout": 0.2, "modality-mix": "0,0.5,0.5",
                  "rcsr-anchor-weight": 1.0}
    arrays, _ = _global_arrays(run_config)
    dim = parse_run_config(run_config).embed_dim
    replies = {}
    for pid in (0, 1):
        reply = app(_message(arrays, MessageType.TRAIN), _context(run_config, pid))
        assert not reply.has_error(), reply.error
        held = "img" if reply.content["metrics"]["has-img"] else "txt"
        protos = reply.content["prototypes"]
        assert set(protos.keys()) == {held, f"{held}-count"}
        assert protos[held].numpy().shape == (1 + len(CONCEPT_NAMES), dim)
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] == 16 and metrics["rcsr-holdout-images"] == 4  # 20 images, 20 % held out
        assert "rcsr-consistency" not in metrics and metrics["rcsr-anchored"] == 0
        replies[held] = protos
    counts = replies["img"]["img-count"].numpy()
    assert counts[0] == 16 and counts[1:].max() == 0, "image-only: no labels (they need captions), no pseudo-labels yet"
    # as global prototypes of *both* modalities, send the text node's table (it has concept rows)
    txt_table, txt_counts = replies["txt"]["txt"], replies["txt"]["txt-count"]
    sent = ArrayRecord({"img": txt_table, "img-count": txt_counts, "txt": txt_table, "txt-count": txt_counts})
    for pid in (0, 1):
        msg = _message(arrays, MessageType.TRAIN, server_round=2)
        msg.content["prototypes"] = sent
        metrics = app(msg, _context(run_config, pid)).content["metrics"]
        assert metrics["rcsr-anchored"] == 1 and 0.0 <= metrics["rcsr-consistency"] <= 1.0
        assert any(k.startswith("train-loss-anchor-") for k in metrics.keys())


def test_personal_adapters_leave_the_upload_unchanged(run_config: dict) -> None:
    """Why "personal adapters off" needs no separate run: the shared update, prototypes and statistics a node
    sends are bit-identical with and without its personal phase, so the global model is too."""
    base = {**run_config, "method": "rcsr", "personal-epochs": 1}
    arrays, _ = _global_arrays(base)
    replies = [app(_message(arrays, MessageType.TRAIN), _context({**base, "personal-adapters": on}))
               for on in (False, True)]
    for name in ("arrays", "prototypes"):
        off, on = replies[0].content[name], replies[1].content[name]
        assert set(off.keys()) == set(on.keys())
        assert all(np.array_equal(off[k].numpy(), on[k].numpy()) for k in off.keys()), name
    assert "personal-loss" in replies[1].content["metrics"]


# ---- client methods -------------------------------------------------------------------------------------------------
def test_fedproto_node_keeps_its_model_and_sends_only_prototypes(run_config: dict) -> None:
    """Round 1 arrives without arrays: the node starts from the server's initialisation (same seed), trains,
    keeps its model in its state and replies with prototypes only. Round 2 starts from that kept model and adds the
    prototype-distance term once global prototypes are sent."""
    run_config = {**run_config, "method": "fedproto"}
    _, init = _global_arrays(run_config)
    ctx = _context(run_config)
    reply = app(_message(None, MessageType.TRAIN), ctx)
    assert not reply.has_error(), reply.error
    assert len(reply.content["arrays"]) == 0, "FedProto must not upload weights"
    protos = reply.content["prototypes"]
    assert set(protos.keys()) == {"img", "img-count", "txt", "txt-count"}
    kept = _stored(run_config, 1)["node-model"]
    assert set(kept) == set(init) and any(not np.array_equal(kept[k], init[k]) for k in init)
    msg = _message(None, MessageType.TRAIN, server_round=2)
    msg.content["prototypes"] = protos
    metrics = app(msg, ctx).content["metrics"]
    assert metrics["train-loss-proto"] > 0
    again = _stored(run_config, 2)["node-model"]
    assert any(not np.array_equal(again[k], kept[k]) for k in kept)


def test_fedproto_fresh_model_is_the_servers_initialisation(run_config: dict) -> None:
    from fedxmr_client.methods.fedproto import FedProtoClient

    run_config = {**run_config, "method": "fedproto"}
    shard = load_shard(_context(run_config), "train")
    _, server = _global_arrays(run_config)  # the ServerApp seeds torch with the run seed before building it
    import torch

    torch.manual_seed(parse_run_config(run_config).seed)
    server = state_to_numpy(XmrModel(parse_run_config(run_config).model_cfg(shard.backbone.img_dim,
                                                                            shard.backbone.txt_dim)))
    fresh = FedProtoClient().initial_model(shard)
    assert all(np.array_equal(fresh[k], server[k]) for k in server)


def test_paired_only_unimodal_nodes_train_and_send_nothing(run_config: dict) -> None:
    run_config = {**run_config, "method": "paired-only", "modality-mix": "0,0.5,0.5"}
    arrays, _ = _global_arrays(run_config)
    for pid in (0, 1):
        reply = app(_message(arrays, MessageType.TRAIN), _context(run_config, pid))
        assert not reply.has_error(), reply.error
        assert len(reply.content["arrays"]) == 0 and reply.content["metrics"]["trained"] == 0
        assert "train-loss" not in reply.content["metrics"]


def test_centralized_loads_the_whole_split_paired_on_its_one_node(run_config: dict) -> None:
    run_config = {**run_config, "method": "centralized", "modality-mix": "0,0.5,0.5", "partitioner": "dirichlet"}
    arrays, _ = _global_arrays(run_config)
    with pytest.raises(ConfigError, match="exactly one node"):
        app(_message(arrays, MessageType.TRAIN), _context(run_config, 0, 2))
    reply = app(_message(arrays, MessageType.TRAIN), _context(run_config, 0, 1))
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 40 and metrics["has-img"] == 1 and metrics["has-txt"] == 1
    assert metrics["train-steps"] == 1 * 5  # centralized-local-epochs=1 (not local-epochs), 40 images / batch 8


def test_the_once_only_test_uses_the_node_state_of_the_selected_round(run_config: dict) -> None:
    """Personal adapters trained in round 1 (selected) and changed in round 2: the test message (sent as round 1,
    the selected one) must score the round-1 adapters, dev messages of round 2 the round-2 ones; versions no
    message can need any more are deleted."""
    run_config = {**run_config, "personal-adapters": True, "personal-epochs": 1, "max-eval-images": 20}
    arrays, _ = _global_arrays(run_config)
    gallery = _gallery(run_config)
    ctx = _context(run_config)
    app(_message(arrays, MessageType.TRAIN, server_round=1), ctx)
    round1 = _stored(run_config, 1)["personal-adapters"]
    app(_message(arrays, MessageType.TRAIN, server_round=2, best_round=1), ctx)  # round 1 selected so far
    round2 = _stored(run_config, 2)["personal-adapters"]
    assert any(not np.array_equal(round1[k], round2[k]) for k in round1)

    def personal_score(server_round: int, split: str) -> float:
        msg = _message(arrays, MessageType.EVALUATE, server_round=server_round, gallery=gallery, split=split,
                       best_round=1)
        return app(msg, _context(run_config)).content["metrics"]["personal-score"]  # a fresh process: disk only

    assert personal_score(1, "test") != personal_score(2, "dev")
    store = NodeStateStore.of(Path(run_config["cache-dir"]), RUN_KEY, 0)
    assert store.versions() == [1, 2]
    app(_message(arrays, MessageType.TRAIN, server_round=3, best_round=2), ctx)  # round 2 selected: 1 is not needed
    assert store.versions() == [2, 3]


def test_a_round_run_again_after_a_kill_starts_from_the_state_before_it(run_config: dict) -> None:
    """A run killed during round 2 (after the node saved its round-2 state) and resumed sends round 2 again: the
    node must train it from its round-1 state, giving the same reply and state as the first attempt."""
    run_config = {**run_config, "personal-adapters": True, "personal-epochs": 1}
    arrays, _ = _global_arrays(run_config)
    app(_message(arrays, MessageType.TRAIN, server_round=1), _context(run_config))
    first = app(_message(arrays, MessageType.TRAIN, server_round=2, best_round=1), _context(run_config))
    kept = _stored(run_config, 2)["personal-adapters"]
    again = app(_message(arrays, MessageType.TRAIN, server_round=2, best_round=1), _context(run_config))
    assert first.content["metrics"]["personal-loss"] == again.content["metrics"]["personal-loss"]
    assert all(np.array_equal(kept[k], v) for k, v in _stored(run_config, 2)["personal-adapters"].items())


def test_a_process_reuses_a_loaded_shard_until_its_files_change(run_config: dict) -> None:
    """The per-process memo (simulation actors serve many messages): same configs and files -> the same shard,
    read-only; a touched feature chunk or another node config -> a fresh load with the same content."""
    import os

    load_shard(_context(run_config), "train")  # encodes into the cache if no earlier test did (changes the files)
    first = load_shard(_context(run_config), "train")
    again = load_shard(_context(run_config), "train")
    assert again.data is first.data and again.feats["txt"] is first.feats["txt"]
    with pytest.raises(TypeError):
        again.feats["txt"] = np.zeros(1)  # type: ignore[index]
    assert load_shard(_context(run_config, pid=1), "train").data is not first.data
    from fedxmr_client.methods import client_method

    one = {**run_config, "method": "centralized"}
    whole = load_shard(_context(one, num=1), "train", client_method("centralized").data_config)
    assert load_shard(_context(one, num=1), "train", client_method("centralized").data_config).data is whole.data, \
        "two instances of a method's data_config must hit the memo (each message makes a new instance)"
    chunk = next(Path(run_config["cache-dir"]).rglob("chunk-*.npz"))
    st = chunk.stat()
    os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    fresh = load_shard(_context(run_config), "train")
    assert fresh.data is not first.data
    assert fresh.data.images == first.data.images and np.array_equal(fresh.feats["txt"], first.feats["txt"])


def test_a_process_derives_the_partition_once_for_all_the_nodes_it_serves(run_config: dict,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With thousands of simulated nodes a sampled node is mostly new to its actor: the split and its partition are
    derived once per process (not per node), and every node still gets exactly the shard cut on its own."""
    import fedxmr_client.node as node
    from common.config import parse_run_config
    from common.data.shards import cut_shard

    calls = []
    real = node.partitioned_split
    monkeypatch.setattr(node, "partitioned_split", lambda *a: calls.append(a[-1]) or real(*a))
    node._MEMO.clear()
    node._PARTITIONS.clear()
    cfg = parse_run_config(run_config)
    for pid in range(3):
        for split in ("train", "dev"):
            shard = load_shard(_context(run_config, pid=pid, num=3), split)
            alone = cut_shard(cfg, pid, 3, run_config["data-dir"], split)
            assert shard.data.images == alone.data.images and np.array_equal(shard.pool_indices, alone.pool_indices)
    assert sorted(calls) == ["dev", "train"], "nodes encoding into the feature cache must not re-derive the partition"
