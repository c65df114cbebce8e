"""The server's evaluator (dev/test scores, galleries) and the per-client gallery index mapping, with a real model
on a real Flickr8k subset (tiny random-init open_clip backbone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from common.backbones import build_backbone
from common.config import parse_run_config
from common.data.split import caption_rows
from common.evaluate import evaluate_retrieval
from common.metrics import query_recalls, standard_map
from common.model import XmrModel, state_to_numpy
from fedxmr_client.app import app
from fedxmr_client.node import load_shard
from fedxmr_server.evaluator import ServerEvaluator

BACKBONE = "openclip:fedxmr-tiny"


@pytest.fixture(scope="module")
def setup(flickr8k_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.getbasetemp() / "client-app-cache"  # shared with test_client_app: encode once
    raw = parse_run_config({"backbone": BACKBONE, "data-dir": str(flickr8k_dir), "cache-dir": str(cache),
                            "max-train-images": 40, "max-eval-images": 30, "embed-dim": 32, "adapter-dim": 8,
                            "hash-bits": 16}).as_flat_dict()
    cfg = parse_run_config(raw)
    backbone = build_backbone(BACKBONE, "cpu")
    torch.manual_seed(3)
    arrays = state_to_numpy(XmrModel(cfg.model_cfg(backbone.img_dim, backbone.txt_dim)))
    return raw, cfg, ServerEvaluator(cfg, backbone), arrays


def test_score_is_evaluate_retrieval_on_the_split(setup) -> None:
    _, cfg, evaluator, arrays = setup
    split = evaluator._split("dev")
    model = evaluator._model(arrays)
    direct = evaluate_retrieval(model, split.feats["img"], split.feats["txt"], split.data.caption_image,
                                split.data.labels, standard_map=True)
    assert evaluator.score(arrays, "dev") == direct
    # dev carries the standard MAPs too: `select-on` may select on them
    assert len(split.data.images) == 30 and {"rsum", "hash_rsum", "hash_map_i2t", "hash_smap_i2t", "emb_smap_t2i",
                                             "relaxed_smap_i2t", "code_abs_mean"} <= set(direct)
    test = evaluator.score(arrays, "test")
    assert {"hash_smap_i2t", "hash_smap_t2i"} <= set(test) and test["rsum"] != direct["rsum"]


def test_gallery_is_the_split_embedded_by_the_given_model_or_raw_features(setup) -> None:
    _, _, evaluator, arrays = setup
    gallery = evaluator.gallery(arrays, "test")
    split = evaluator._split("test")
    model = evaluator._model(arrays)
    np.testing.assert_array_equal(gallery["img-emb"], model.encode("img", split.feats["img"])[0])
    np.testing.assert_array_equal(gallery["txt-emb"], model.encode("txt", split.feats["txt"])[0])
    assert evaluator.gallery(arrays, "test") is gallery, "the same model's gallery is embedded once per round"
    other = {k: v + 0.01 for k, v in arrays.items()}
    assert not np.array_equal(evaluator.gallery(other, "test")["img-emb"], gallery["img-emb"])
    raw = evaluator.gallery(None, "test")
    np.testing.assert_array_equal(raw["img-feat"], split.feats["img"])
    assert "img-emb" not in raw


def test_per_client_scores_index_the_shared_gallery_correctly(setup) -> None:
    """A node's test queries against the gallery the server sends must score exactly like the same queries taken
    from the full split on the server. With the shard's pool indices replaced by 0..n-1 (a mapping bug), they would
    not: the last assertion shows the check can fail."""
    raw, cfg, evaluator, arrays = setup
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                      run_config=raw)
    gallery = evaluator.gallery(arrays, "test")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord({"server-round": 1, "split": "test", "best-round": -1}),
                          "gallery": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in gallery.items()})})
    reply = app(Message(content=content, dst_node_id=1, message_type=MessageType.EVALUATE), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    rows = load_shard(context, "test").pool_indices
    assert 0 < len(rows) < 30 and rows.max() >= len(rows), "the shard must not be a prefix of the pool"
    full = evaluator._split("test").data
    sim = gallery["img-emb"] @ gallery["txt-emb"].T
    expected = query_recalls(sim[rows], rows, full.caption_image, "i2t")
    caps = caption_rows(full, rows)
    expected |= query_recalls(sim.T[caps], full.caption_image[caps], np.arange(len(full.images)), "t2i")
    assert {k: metrics[f"global-{k}"] for k in expected} == pytest.approx(expected)
    wrong = query_recalls(sim[rows], np.arange(len(rows)), full.caption_image, "i2t")
    assert wrong != {k: metrics[f"global-{k}"] for k in wrong}
    # the per-client Hamming MAP: the node's queries (its own codes and labels) against the gallery's codes
    codes = {mod: evaluator._model(arrays).encode(mod, evaluator._split("test").feats[mod])[1] for mod in ("img", "txt")}
    np.testing.assert_array_equal(gallery["img-code"], codes["img"])
    assert metrics["global-smap_i2t"] == pytest.approx(
        standard_map(codes["img"][rows], codes["txt"], full.labels[rows], full.labels[full.caption_image]))
    assert metrics["global-smap_t2i"] == pytest.approx(
        standard_map(codes["txt"][caps], codes["img"], full.labels[full.caption_image[caps]], full.labels))


def test_gallery_retrieval_on_flickr8k_ranks_train_and_test_captions_and_images(setup) -> None:
    """Flickr8k with `gallery = "retrieval"`: i2t ranks the captions of train + test, t2i their images (labels
    DERIVED from the captions), train first; R@K stays test vs test."""
    raw, _, evaluator, arrays = setup
    cfg = parse_run_config({**raw, "gallery": "retrieval"})
    ours = ServerEvaluator(cfg, evaluator.backbone)
    model = ours._model(arrays)
    db = ours.database(model)
    train, test = ours._split("train"), ours._split("test")
    assert len(db.img_code) == len(train.data.images) + len(test.data.images) == 40 + 30
    assert len(db.txt_code) == len(train.data.captions) + len(test.data.captions)
    np.testing.assert_array_equal(db.txt_labels[:len(train.data.captions)],
                                  train.data.labels[train.data.caption_image])
    scores, plain = ours.score(arrays, "test"), evaluator.score(arrays, "test")
    codes = {m: model.encode(m, test.feats[m])[1] for m in ("img", "txt")}
    assert scores["hash_smap_i2t"] == pytest.approx(
        standard_map(codes["img"], db.txt_code, test.data.labels, db.txt_labels))
    assert scores["hash_smap_t2i"] == pytest.approx(
        standard_map(codes["txt"], db.img_code, test.data.labels[test.data.caption_image], db.img_labels))
    assert {k: scores[k] for k in ("rsum", "hash_rsum")} == {k: plain[k] for k in ("rsum", "hash_rsum")}
