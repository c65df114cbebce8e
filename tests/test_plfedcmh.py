"""PLFedCMH (issue 15): the hypernetwork's layer weights, the direction of its step, the class-code update, n-way
k-shot partitions, and that each node is sent its own generated parameters (real ServerApp and ClientApp in this
process; `test_e2e` checks the same through `flwr run`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import parse_run_config
from common.data.partition import dominant_class, partition
from common.hypernet import LayerHypernet, alpha_entropy, hypernet_step, layer_of, personalized
from fedxmr_client.methods.plfedcmh import update_class_codes
from fedxmr_server.app import _run
from tests.inprocess import InProcessGrid, server_context

LAYERS = ["img.proj", "txt.proj", "logit_scale"]


def _params(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"img.proj.weight": torch.randn(3, 2, generator=gen), "img.proj.bias": torch.randn(3, generator=gen),
             "txt.proj.weight": torch.randn(2, 2, generator=gen), "logit_scale": torch.randn(1, generator=gen)}
            for _ in range(n)]


def test_layer_weights_are_a_distribution_over_the_clients_the_mask_allows() -> None:
    net = LayerHypernet(4, LAYERS, 8, 8, seed=1)
    mask = {"img.proj": torch.tensor([1.0, 1.0, 0.0, 1.0]), "txt.proj": torch.ones(4),
            "logit_scale": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    for client in range(4):
        alpha = net.weights(client, mask)
        for layer, w in alpha.items():
            assert w.sum().item() == pytest.approx(1.0) and (w >= 0).all()
            assert (w[mask[layer] == 0] == 0).all()
        assert alpha["logit_scale"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert layer_of("img.adapter.down.weight") == "img.adapter.down" and layer_of("logit_scale") == "logit_scale"


def test_personalized_parameters_are_the_layer_weighted_sum() -> None:
    params = _params(3)
    alpha = {"img.proj": torch.tensor([0.5, 0.5, 0.0]), "txt.proj": torch.tensor([0.0, 0.0, 1.0]),
             "logit_scale": torch.tensor([1.0, 0.0, 0.0])}
    theta = personalized(alpha, params, list(params[0]))
    torch.testing.assert_close(theta["img.proj.bias"], 0.5 * (params[0]["img.proj.bias"] + params[1]["img.proj.bias"]))
    torch.testing.assert_close(theta["txt.proj.weight"], params[2]["txt.proj.weight"])


def test_a_hypernetwork_step_moves_the_generated_parameters_toward_the_trained_ones() -> None:
    """The documented sign (descent with θ̄ - θ_trained); the released code's sign (θ_trained - θ̄) would move
    them away, which the second half shows."""
    params, mask = _params(3, seed=2), {layer: torch.ones(3) for layer in LAYERS}
    keys = list(params[0])
    for sign in (1.0, -1.0):
        net = LayerHypernet(3, LAYERS, 8, 8, seed=3)
        before = {k: v.detach() for k, v in personalized(net.weights(0, mask), params, keys).items()}
        trained = {k: v + sign * 0.5 * torch.ones_like(v) for k, v in before.items()}
        if sign < 0:  # emulate the released code: step with the update vector negated
            trained = {k: 2 * before[k] - (before[k] + 0.5 * torch.ones_like(v)) for k, v in before.items()}
        generated = hypernet_step(net, 0.05, mask, params, {0: trained})
        torch.testing.assert_close(generated[0]["img.proj.bias"], before["img.proj.bias"])
        after = personalized(net.weights(0, mask), params, keys)
        target = {k: before[k] + 0.5 * torch.ones_like(v) for k, v in before.items()}  # where the client went
        moved = sum(((after[k] - before[k]) * (target[k] - before[k])).sum() for k in keys).item()
        assert (moved > 0) == (sign > 0), f"sign {sign}: projection of the move on the update {moved}"


def test_alpha_moves_away_from_uniform_when_clients_differ_and_each_keeps_its_own() -> None:
    """Clients whose parameters differ and whose training returns to their own parameters: every step raises each
    client's self-weight and lowers the entropy of its α; with identical clients the updates are 0 and α stays."""
    mask = {layer: torch.ones(4) for layer in LAYERS}
    for differ in (True, False):
        params = _params(4, seed=5) if differ else [_params(1, seed=5)[0]] * 4
        net = LayerHypernet(4, LAYERS, 8, 8, seed=1)
        start = [alpha_entropy(net.weights(i, mask)) for i in range(4)]
        assert min(start) > 0.9, "pFedLA's start is near uniform"
        for _ in range(20):
            hypernet_step(net, 0.05, mask, params, {i: params[i] for i in range(4)})
        end = [alpha_entropy(net.weights(i, mask)) for i in range(4)]
        self_weight = [float(np.mean([float(w[i]) for w in net.weights(i, mask).values()])) for i in range(4)]
        if differ:
            assert all(e < s - 0.05 for e, s in zip(end, start)), (start, end)
            assert min(self_weight) > 0.3, self_weight
        else:
            np.testing.assert_allclose(end, start, atol=1e-6)


def test_the_class_code_update_lowers_the_instance_class_loss() -> None:
    rng = np.random.default_rng(0)
    bits, concepts = 16, 5
    truth = np.where(rng.standard_normal((concepts, bits)) >= 0, 1.0, -1.0)
    labels = np.eye(concepts)[rng.integers(0, concepts, 80)]
    feats = np.tanh(2 * labels @ truth + rng.normal(scale=0.5, size=(80, bits)))
    start = np.where(rng.standard_normal((concepts, bits)) >= 0, 1.0, -1.0)

    def loss(y: np.ndarray) -> float:
        return float(((bits * labels - feats @ y.T) ** 2).sum())

    new = update_class_codes(start, [(feats, labels)])
    assert set(np.unique(new)) <= {-1.0, 1.0} and loss(new) < loss(start)
    assert (new == truth).mean() > 0.95, "the codes of the concepts are recovered"


def test_nway_k_shot_keeps_at_most_k_items_per_class_per_client_seeded() -> None:
    rng = np.random.default_rng(1)
    labels = np.eye(6, dtype=np.uint8)[rng.integers(0, 6, 600)]
    parts = partition("nway", 600, 4, seed=5, labels=labels, ways=2, shots=7)
    classes = dominant_class(labels)
    for part in parts:
        counts = np.bincount(classes[part])
        assert counts.max() <= 7 and (counts[counts > 0] == 7).all() and len(np.flatnonzero(counts)) <= 3
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition("nway", 600, 4, 5, labels, ways=2, shots=7)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition("nway", 600, 4, 6, labels, ways=2, shots=7)))
    assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts), "clients are disjoint"
    with pytest.raises(ValueError, match="nway"):
        partition("dirichlet", 600, 4, 5, labels, shots=7)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


class Recorder(InProcessGrid):
    """Keeps every train message sent and every reply."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent, self.replies = [], []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout)
        if messages and messages[0].metadata.message_type == "train":
            self.sent.append({m.metadata.dst_node_id: m for m in messages})
            self.replies.append({r.metadata.src_node_id: r for r in replies})
        return replies


def test_each_node_is_sent_its_own_layer_weighted_parameters(flickr8k_dir: Path, tmp_path: Path) -> None:
    keys = {"method": "plfedcmh", "backbone": "openclip:fedxmr-tiny", "data-dir": str(flickr8k_dir),
            "cache-dir": str(tmp_path / "cache"), "out-dir": str(tmp_path / "runs"), "run-name": "pl",
            "num-server-rounds": 2, "max-train-images": 30, "max-eval-images": 20, "local-epochs": 1,
            "batch-size": 8, "embed-dim": 32, "adapter-dim": 8, "hash-bits": 16, "plfedcmh-hn-lr": 0.5}
    cfg = parse_run_config(keys).as_flat_dict()
    nodes = [11, 22, 33]
    grid = Recorder(cfg, nodes)
    _run(grid, server_context(cfg))
    pid = {n: p for p, n in enumerate(nodes)}
    round1 = {pid[n]: {k: a.numpy() for k, a in r.content["arrays"].items()} for n, r in grid.replies[0].items()}
    received = {pid[n]: {k: a.numpy() for k, a in m.content["arrays"].items()} for n, m in grid.sent[1].items()}
    log = [json.loads(line) for line in (tmp_path / "runs" / "pl" / "metrics.jsonl").read_text().splitlines()]
    second = next(r for r in log if r["round"] == 2)
    alpha = {c["partition-id"]: c["layer-weights"] for c in second["train"]["clients"]}
    for p, arrays in received.items():
        for key, value in arrays.items():
            expected = sum(alpha[p][layer_of(key)][j] * round1[j][key] for j in range(len(nodes)))
            np.testing.assert_allclose(value, expected, atol=2e-3 * (1 + np.abs(expected).max()))
    checks = {p: sum(float(v.sum()) for v in a.values()) for p, a in received.items()}
    assert len(set(checks.values())) == len(nodes), "every node gets different parameters"
    assert (tmp_path / "runs" / "pl" / "layer-weights.png").exists()


def test_the_split_class_target_is_reachable_for_items_of_several_labels_and_the_indicator_is_not() -> None:
    from fedxmr_client.methods.plfedcmh import class_targets

    h = np.array([[1.0]])
    while h.shape[0] < 8:
        h = np.block([[h, h], [h, -h]])
    codes = h[:4]  # 4 concepts, orthogonal 8-bit class codes
    labels = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]], np.uint8)
    f = labels @ codes / labels.sum(axis=1, keepdims=True)  # each item: the mean of its labels' codes
    bits = codes.shape[1]
    split = ((bits * class_targets(labels, "split") - f @ codes.T) ** 2).mean()
    indicator = ((bits * class_targets(labels, "indicator") - f @ codes.T) ** 2).mean()
    assert split == pytest.approx(0.0) and indicator > 1.0
    np.testing.assert_array_equal(class_targets(labels[2:], "split"), class_targets(labels[2:], "indicator"))
