"""`unialign` (issue 11) on constructed cases: the distillation terms, the agreement weighting, and the method's client
and server sides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, MessageType, RecordDict

from common.config import parse_run_config
from common.train import Batch
from common.unimodal import DistillTerm, agreement_weights, scene_teacher, tower_of
from fedxmr_client.app import app
from fedxmr_server.strategies import build_strategy
from tests.messages import reply
from tests.test_client_app import BACKBONE, _global_arrays, _message


def _unit(rng: np.random.Generator, n: int, d: int = 8) -> torch.Tensor:
    return F.normalize(torch.as_tensor(rng.normal(size=(n, d)), dtype=torch.float32), dim=-1)


# ---- distillation ------------------------------------------------------------------------------------------------
def test_embedding_distillation_is_zero_at_the_teacher_and_pulls_toward_it() -> None:
    rng = np.random.default_rng(0)
    teacher = _unit(rng, 6)
    term = DistillTerm("img", teacher, weight=2.0)
    items = np.array([4, 1, 3])
    at_teacher, parts = term(Batch({"img": teacher[items]}, items, {}))
    assert at_teacher.item() == pytest.approx(0.0, abs=1e-6) and parts == {"loss_distill_img": pytest.approx(0.0,
                                                                                                           abs=1e-6)}
    student = _unit(rng, 3).requires_grad_()
    loss, _ = term(Batch({"img": student}, items, {}))
    assert loss.item() == pytest.approx(2.0 * float((1 - (student * teacher[items]).sum(-1)).mean().detach()))
    loss.backward()
    moved = F.normalize(student - 0.1 * student.grad, dim=-1)
    assert ((moved * teacher[items]).sum(-1) > (student * teacher[items]).sum(-1)).all()


def test_relational_distillation_ignores_a_rotation_but_not_a_reordering() -> None:
    """It keeps the similarity structure among the batch's items, not their absolute positions."""
    rng = np.random.default_rng(1)
    teacher = _unit(rng, 5)
    items = np.arange(5)
    rotation = torch.as_tensor(np.linalg.qr(rng.normal(size=(8, 8)))[0], dtype=torch.float32)
    term = DistillTerm("txt", teacher, weight=1.0, kind="relational")
    rotated, _ = term(Batch({"txt": teacher @ rotation}, items, {}))
    shuffled, _ = term(Batch({"txt": teacher[[1, 0, 3, 4, 2]]}, items, {}))
    assert rotated.item() == pytest.approx(0.0, abs=1e-5)
    assert shuffled.item() > 0.1
    assert DistillTerm("img", teacher, 1.0, "embedding")(Batch({"img": teacher @ rotation}, items, {}))[0].item() > 0.1


def test_distillation_skips_batches_without_its_modality_and_rejects_unknown_kinds() -> None:
    teacher = _unit(np.random.default_rng(2), 3)
    assert DistillTerm("img", teacher, 1.0)(Batch({"txt": teacher}, np.arange(3), {})) is None
    with pytest.raises(ValueError, match="kind"):
        DistillTerm("img", teacher, 1.0, kind="cosine")  # type: ignore[arg-type]


def test_scene_teacher_is_the_normalised_mean_of_a_scenes_captions() -> None:
    caps = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, -1.0]], dtype=np.float32)
    out = scene_teacher(caps, np.array([0, 0, 1, 1]), 2)
    np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="without captions"):
        scene_teacher(caps, np.array([0, 0, 0, 0]), 2)


# ---- agreement weighting -----------------------------------------------------------------------------------------
G = {"img.w": np.zeros(4), "txt.w": np.zeros(4), "logit_scale": np.zeros(1)}


def _paired(img: list[float], txt: list[float]) -> dict[str, np.ndarray]:
    return {"img.w": np.array(img, dtype=float), "txt.w": np.array(txt, dtype=float), "logit_scale": np.ones(1)}


def test_a_drifting_update_is_down_weighted_and_an_agreeing_one_kept() -> None:
    paired = [_paired([1, 0, 0, 0], [0, 1, 0, 0]), _paired([1, 1, 0, 0], [0, 1, 0, 0])]
    agreeing = {"img.w": np.array([2.0, 0.5, 0.0, 0.0])}
    drifting = {"img.w": np.array([-1.0, -0.5, 1.0, 0.0])}  # against the paired mean update
    orthogonal = {"txt.w": np.array([0.0, 0.0, 3.0, 0.0])}
    weights, cos = agreement_weights(G, paired + [agreeing, drifting, orthogonal], np.array([10, 30, 20, 20, 40]),
                                     np.array([True, True, False, False, False]))
    mean_img = (10 * np.array([1, 0, 0, 0]) + 30 * np.array([1, 1, 0, 0])) / 40
    expect = agreeing["img.w"] @ mean_img / np.linalg.norm(agreeing["img.w"]) / np.linalg.norm(mean_img)
    assert cos[2] == pytest.approx(expect) and weights[2] == pytest.approx(20 * expect)
    assert cos[3] < 0 and weights[3] == 0.0
    assert cos[4] == pytest.approx(0.0) and weights[4] == 0.0
    np.testing.assert_array_equal(weights[:2], [10, 30])
    assert np.isnan(cos[:2]).all()


def test_without_paired_clients_a_unimodal_client_keeps_its_size() -> None:
    weights, cos = agreement_weights(G, [{"img.w": np.ones(4)}], np.array([7.0]), np.array([False]))
    assert weights.tolist() == [7.0] and np.isnan(cos[0])


def test_tower_of_names_a_single_tower_only() -> None:
    assert tower_of(["img.a", "img.b"]) == "img"
    assert tower_of(["img.a", "txt.b"]) is None and tower_of(["img.a", "logit_scale"]) is None
    assert tower_of([]) is None


def test_the_strategy_weights_by_agreement_and_reports_the_cosines() -> None:
    strategy = build_strategy(parse_run_config({"method": "unialign", "unialign-weighting": "agreement",
                                                "max-client-share": 1.0}))  # uncapped (test_attacks.py)
    strategy.state.arrays = {k: v.copy() for k, v in G.items()}
    paired = {"num-examples": 10, "has-img": 1, "has-txt": 1}
    image_only = {"num-examples": 50, "has-img": 1, "has-txt": 0}
    replies = [reply(1, _paired([1, 0, 0, 0], [1, 0, 0, 0]), paired),
               reply(2, {"img.w": np.array([-5.0, 0, 0, 0])}, image_only)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["img.w"].numpy(), [1, 0, 0, 0])  # the drifting image-only update counts 0
    rows = {c["node-id"]: c for c in strategy.last_train["clients"]}
    assert rows[2]["agreement-cos"] == pytest.approx(-1.0) and rows[1]["agreement-cos"] is None
    by_size = build_strategy(parse_run_config({"method": "unialign", "max-client-share": 1.0}))  # FedAvg's weights
    by_size.state.arrays = {k: v.copy() for k, v in G.items()}
    arrays, _ = by_size.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["img.w"].numpy(), [(10 - 250) / 60, 0, 0, 0])


# ---- the client side ---------------------------------------------------------------------------------------------
def _node_reply(flickr8k_dir: Path, cache: Path, mix: str, parts: str, pid: int) -> tuple[dict, dict, object]:
    """One train message to a unialign node (tiny backbone, 40 train images, 2 partitions): (sent arrays, the
    global arrays it was sent, the reply)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    run_config = parse_run_config({
        "backbone": BACKBONE, "data-dir": str(flickr8k_dir), "cache-dir": str(cache), "max-train-images": 40,
        "local-epochs": 1, "batch-size": 8, "embed-dim": 32, "adapter-dim": 8, "hash-bits": 16,
        "modality-mix": mix, "method": "unialign", "unialign-train-parts": parts}).as_flat_dict()
    arrays, before = _global_arrays(run_config)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": 2}, state=RecordDict(),
                  run_config=run_config)
    out = app(_message(arrays, MessageType.TRAIN), ctx)
    assert not out.has_error(), out.error
    return {k: a.numpy() for k, a in out.content["arrays"].items()}, before, out


@pytest.mark.parametrize("parts,sent_layers", [("all", {"norm", "proj", "adapter", "hash"}),
                                               ("adapter-hash", {"adapter", "hash"})])
def test_a_unimodal_node_distils_and_sends_only_the_parts_it_trains(
        parts: str, sent_layers: set[str], flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    sent, before, out = _node_reply(flickr8k_dir, tmp_path_factory.getbasetemp() / "client-app-cache", "0,0,1",
                                    parts, 0)
    assert {k.split(".")[1] for k in sent} == sent_layers and all(k.startswith("txt.") for k in sent)
    assert any(not np.array_equal(sent[k], before[k]) for k in sent if ".adapter." in k)
    assert out.content["metrics"]["train-loss-distill-txt"] > 0


def test_the_control_sends_its_tower_untouched(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`unialign-train-parts = none`: a unimodal node trains nothing and sends its tower exactly as it arrived."""
    sent, before, out = _node_reply(flickr8k_dir, tmp_path_factory.getbasetemp() / "client-app-cache", "0,1,0",
                                    "none", 1)
    assert sorted(sent) == sorted(k for k in before if k.startswith("img."))
    assert all(np.array_equal(sent[k], before[k]) for k in sent)
    assert out.content["metrics"]["trained"] == 0
