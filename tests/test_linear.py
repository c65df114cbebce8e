"""The closed-form floor (`linear`, issue 25): summed client statistics give exactly the centralized ridge solution,
ITQ's rotation is orthogonal and lowers the quantisation loss, and through the real ServerApp and ClientApp a
federated run ends with the same model as a one-node run on the pooled data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.config import parse_run_config
from common.linear import (FeatureStats, itq_rotation, label_to_bits, quantisation_loss, random_rotation,
                           solve_ridge)
from fedxmr_server.app import _run
from tests.inprocess import InProcessGrid, server_context


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


def _data(n: int = 300, d: int = 12, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(np.float64)
    x = y @ rng.standard_normal((c, d)) * 3 + rng.standard_normal((n, d)) * rng.uniform(0.5, 4, d) + 7
    return x, y


def test_summed_client_statistics_give_the_centralized_ridge_solution() -> None:
    x, y = _data()
    lam = 10.0
    parts = [FeatureStats.of(x[a:b], y[a:b]) for a, b in ((0, 40), (40, 200), (200, 300))]
    federated = solve_ridge(sum(parts[1:], parts[0]), lam)
    # centralized: standardise with the pooled mean and std, centre, solve the normal equations directly
    xs = (x - x.mean(axis=0)) / x.std(axis=0)
    w = np.linalg.solve(xs.T @ xs + lam * np.eye(x.shape[1]), xs.T @ y)
    np.testing.assert_allclose(x @ federated.weight + federated.bias, xs @ w, rtol=1e-8, atol=1e-10)
    z = xs @ w
    np.testing.assert_allclose(federated.cov, np.cov(z.T, bias=True), rtol=1e-8, atol=1e-12)
    # and the statistics survive the trip through a message's arrays
    again = FeatureStats.from_arrays(parts[0].as_arrays())
    assert again.n == 40 and np.array_equal(again.gram, parts[0].gram)


def test_statistics_of_mismatched_shapes_are_refused() -> None:
    arrays = FeatureStats.of(*_data(n=10)).as_arrays()
    with pytest.raises(ValueError, match="inconsistent"):
        FeatureStats.from_arrays(arrays | {"gram": np.zeros((3, 3))})
    with pytest.raises(KeyError, match="lack"):
        FeatureStats.from_arrays({k: v for k, v in arrays.items() if k != "xy"})


def test_itq_rotation_is_orthogonal_and_lowers_the_quantisation_loss() -> None:
    rng = np.random.default_rng(1)
    v = rng.standard_normal((500, 8)) @ np.diag([5, 4, 3, 2, 1, 1, 0.5, 0.5])
    v -= v.mean(axis=0)
    rotation = random_rotation(8, rng)
    losses = [quantisation_loss(v, rotation)]
    for _ in range(20):
        codes = np.where(v @ rotation >= 0, 1.0, -1.0)
        rotation = itq_rotation(codes.T @ v)
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(8), atol=1e-10)
        losses.append(quantisation_loss(v, rotation))
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0]


def test_label_space_is_mapped_to_the_code_length() -> None:
    rng = np.random.default_rng(2)
    cov = np.diag([4.0, 3.0, 2.0, 1.0])
    top = label_to_bits(cov, 2, rng)  # fewer bits than labels: the top principal directions
    np.testing.assert_allclose(np.abs(top), np.eye(4)[:, :2], atol=1e-12)
    wide = label_to_bits(cov, 16, rng)  # more bits than labels: orthonormal rows
    assert wide.shape == (4, 16)
    np.testing.assert_allclose(wide @ wide.T, np.eye(4), atol=1e-10)


def _config(flickr8k_dir: Path, cache: Path, out: Path, name: str, rounds: int) -> dict:
    keys = {"method": "linear", "backbone": "openclip:fedxmr-tiny", "data-dir": str(flickr8k_dir),
            "cache-dir": str(cache), "out-dir": str(out), "run-name": name, "num-server-rounds": rounds,
            "max-train-images": 30, "max-eval-images": 20, "embed-dim": 32, "adapter-dim": 8, "hash-bits": 16,
            "min-nodes": 1, "seed": 3, "select-on": "hash-map"}
    return parse_run_config(keys).as_flat_dict()


def test_a_federated_linear_run_ends_with_the_one_node_model(flickr8k_dir: Path, tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "runs"
    for name, nodes in (("federated", 3), ("pooled", 1)):
        cfg = _config(flickr8k_dir, cache, out, name, rounds=4)
        _run(InProcessGrid(cfg, [20 + i for i in range(nodes)]), server_context(cfg))
    fed, pooled = (np.load(out / n / "strategy-state.npz") for n in ("federated", "pooled"))
    arrays = [k for k in fed.files if k.startswith("arrays/")]
    assert any(k.endswith("proj.weight") for k in arrays)
    for key in arrays:  # the ridge map and every ITQ rotation agree (float32 sums in another order)
        np.testing.assert_allclose(fed[key], pooled[key], rtol=1e-4, atol=1e-5, err_msg=key)
    rotation = fed["buffers/linear-r"]
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(16), atol=1e-8)
    rounds = [json.loads(line) for line in (out / "federated" / "metrics.jsonl").read_text().splitlines()]
    quant = [r["train"]["aggregate"]["linear-quant-img"] for r in rounds if r["round"] >= 2]
    assert quant[-1] <= quant[0] + 1e-6, quant  # ITQ lowers the quantisation loss of the image codes
    final = json.loads((out / "federated" / "final.json").read_text())
    assert "hash_smap_i2t" in final["test"] and "emb_smap_i2t" in final["test"]
    assert set(load_file(str(out / "federated" / "weights.safetensors"))) >= {"img.proj.weight", "txt.hash.weight"}


def _linear_strategy():
    from fedxmr_server.strategies import build_strategy
    s = build_strategy(parse_run_config({"method": "linear", "embed-dim": 8, "hash-bits": 16}))
    s.concepts = 3
    for m in ("img", "txt"):
        s.state.arrays |= {f"{m}.proj.weight": np.zeros((8, 5), np.float32), f"{m}.proj.bias": np.zeros(8, np.float32),
                           f"{m}.hash.weight": np.zeros((16, 8), np.float32),
                           f"{m}.norm.weight": np.ones(5, np.float32),
                           f"{m}.norm.bias": np.zeros(5, np.float32)}
    return s


def _reply(record: dict[str, np.ndarray], n: float = 20):
    from tests.messages import reply
    return reply(1, None, {"num-examples": n, "has-img": 1, "has-txt": 1}, records={"linear": record})


def _layer_normed(x: np.ndarray) -> np.ndarray:
    """What a node's statistics are taken of: features through the tower's LayerNorm (identity weights)."""
    return (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)


def test_linear_rejects_malformed_replies_naming_the_problem() -> None:
    s = _linear_strategy()
    x, y = _data(n=20, d=5, c=3)
    good = {f"img-{k}": v for k, v in FeatureStats.of(_layer_normed(x), y).as_arrays().items()}
    assert s.reply_problem(_reply(good)) is None
    assert "shape" in s.reply_problem(_reply(good | {"img-xy": np.zeros((5, 4))}))
    assert "finite" in s.reply_problem(_reply(good | {"img-sum": np.full(5, np.inf)}))
    assert "finite floats" in s.reply_problem(_reply(good | {"img-sum": np.arange(5)}))  # integers are refused
    assert "ITQ sums sent" in s.reply_problem(_reply({"img-etb": np.zeros((8, 16))}))
    s.state.buffers["linear-p"] = np.zeros((3, 16))  # the map is solved: the ITQ phase
    itq = {"img-etb": np.zeros((8, 16)), "img-quant": np.ones(1)}
    assert s.reply_problem(_reply(itq)) is None
    assert "no ITQ sums" in s.reply_problem(_reply(good))
    assert "one value" in s.reply_problem(_reply(itq | {"img-quant": np.zeros(0)}))
    assert "expected" in s.reply_problem(_reply(itq | {"img-etb": np.zeros((16, 8))}))


def test_the_center_loss_with_exact_sign_codes_is_refused() -> None:
    from common.config import ConfigError
    with pytest.raises(ConfigError, match="hash-straight-through"):
        parse_run_config({"hash-loss": "center", "hash-straight-through": True})
