"""Attacks that look valid: one of four nodes sends well-formed replies built to take over the aggregate
(`fedxmr_client/faults.py`: inflated examples and counts, scaled tables, boasted consistency and loss, a sign-flipped
update inside the norm screen, a replay of its first upload). The real ServerApp and ClientApp run in this process
(`tests.inprocess`) on a small Flickr8k subset, for every registered method, clean and attacked.

What must hold (docs/TRUST.md, "Bounded influence"):
- the attacker's share of every mix it feeds stays within max-client-share (here 0.3, above the uniform 0.25): its
  aggregation weight, its share of every prototype row, its weight in the other clients' hypernetwork mixes;
- the honest clients' result stays within a stated bound of the clean run's: a global model (or an honest client's
  own model) moves from the clean one by at most `BOUND` (= max-client-share x (1 + update-norm-limit)) x the
  distance the clean run moved from the initial model; fused prototype and memory rows keep a mean cosine of at least
  `MIN_COS` with the clean run's; Local's honest clients end exactly as in the clean run; a replayed upload is
  refused every time.
`centralized` is not here: its one node is the whole federation, so there is no one else's share to protect.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, parse_run_config
from common.data.datasets import backbone_for, concept_count
from common.model import XmrModel
from common.robust import combine
from common.trust import cap_columns, cap_shares
from fedxmr_client.methods import client_method
from fedxmr_server.app import _run
from fedxmr_server.strategies import STRATEGIES
from fedxmr_server.strategies.state import Checkpoint
from tests.inprocess import InProcessGrid, server_context

NODES, ATTACKER, ROUNDS, CAP = 4, 1, 3, 0.3
ATTACKS = ("inflate", "scale", "boast", "flip", "replay")
METHODS = sorted(set(STRATEGIES) - {"centralized"})
# per round the attacker moves an aggregate by at most its share x its update, and the norm screen keeps its update
# within update-norm-limit (10) x the round's median: so at most CAP x (1 + 10) x an honest round's movement
BOUND, MIN_COS = CAP * (1 + 10), 0.5


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, flickr8k_dir: Path):
    """(method, faults) -> (round records, final checkpoint, run config); each run once per module."""
    root, done = tmp_path_factory.mktemp("attacks"), {}

    def run(method: str, faults: str = "") -> tuple[list[dict], Checkpoint, dict]:
        if (method, faults) not in done:
            name = f"{method}-{faults.replace(':', '-') or 'clean'}"
            cfg = parse_run_config({
                "method": method, "backbone": "openclip:fedxmr-tiny", "data-dir": str(flickr8k_dir),
                "cache-dir": str(root / "cache"), "out-dir": str(root / "runs"), "run-name": name,
                "num-server-rounds": ROUNDS, "max-train-images": 40, "max-eval-images": 20, "local-epochs": 1,
                "batch-size": 8, "embed-dim": 32, "adapter-dim": 8, "hash-bits": 16, "seed": 5,
                "max-client-share": CAP, "faults": faults}).as_flat_dict()
            _run(InProcessGrid(cfg, list(range(1, NODES + 1))), server_context(cfg))
            run_dir = root / "runs" / name
            rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            done[(method, faults)] = rounds, Checkpoint.load(run_dir / "checkpoint.npz"), cfg
        return done[(method, faults)]

    return run


def _initial(cfg: dict) -> dict[str, np.ndarray]:
    """The model every run starts from (as the ServerApp builds it: seeded, before round 1)."""
    parsed = parse_run_config(cfg)
    backbone = backbone_for(parsed.backbone, parsed.data_dir, parsed.data_keys)
    torch.manual_seed(parsed.seed)
    model = XmrModel(parsed.model_cfg(backbone.img_dim, backbone.txt_dim,
                                      concepts=concept_count(parsed.data_dir, parsed.data_keys)))
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a if k in b)))


def _shares(rounds: list[dict]) -> list[float]:
    """Every share the attacker had in any mix, over the rounds (empty where it was left out)."""
    out = []
    for record in rounds:
        for client in record.get("train", {}).get("clients", []):
            if client.get("partition-id") == ATTACKER:
                out += [client["weight"]] + ([client["table-share"]] if "table-share" in client else [])
            else:  # PLFedCMH: the attacker's weight in this client's layer-wise mix
                out += [w[ATTACKER] for w in client.get("layer-weights", {}).values()]
    return out


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("method", METHODS)
def test_one_attacker_stays_within_its_share_and_the_result_within_bound(method: str, attack: str, runs) -> None:
    clean_rounds, clean, cfg = runs(method)
    rounds, attacked, _ = runs(method, f"{ATTACKER}:{attack}")
    assert all(record.get("train", {}).get("usable", 1) >= NODES - 1 for record in rounds[1:]), "honest replies lost"
    shares = _shares(rounds)
    assert max(shares, default=0.0) <= CAP + 1e-4, f"attacker's share {max(shares):.3f} > max-client-share {CAP}"
    honest = [f"client-{i}" for i in range(NODES) if i != ATTACKER]
    if method == "local":  # nothing is mixed: the honest clients end exactly as without the attacker
        for c in honest:
            assert _distance(attacked.state.clients[c], clean.state.clients[c]) == 0.0
    elif STRATEGIES[method].has_global_model or method == "plfedcmh":
        start = _initial(cfg)
        pairs = ([(attacked.state.arrays, clean.state.arrays)] if STRATEGIES[method].has_global_model else
                 [(attacked.state.clients[c], clean.state.clients[c]) for c in honest])
        for got, want in pairs:
            moved, off = _distance(want, start), _distance(got, want)
            assert off <= BOUND * moved, f"{off:.3g} from the clean run, which moved {moved:.3g} from the start"
    # every later upload is refused as a replay (Local sends a client its own last model: replaying that is no update)
    if attack == "replay" and client_method(method).sends_weights and method != "local":
        left_out = [r["train"]["rejected"] for r in rounds if r.get("round", 0) >= 2 and "train" in r]
        assert left_out and all(any(x["partition-id"] == ATTACKER and "replay" in x["reason"] for x in rejected)
                                for rejected in left_out)
    # fused tables (prototypes, FedCAFE's memory): rows that the clean run filled, keyed to their counts
    tables = {k: f"{k}-count" for k in clean.state.buffers if k.startswith("proto/") and not k.endswith("-count")}
    tables |= {"fedcafe/memory": "fedcafe/count"} if "fedcafe/memory" in clean.state.buffers else {}
    for key, count in tables.items():
        rows = clean.state.buffers[count] > 0
        cos = np.sum(attacked.state.buffers[key][rows] * clean.state.buffers[key][rows], axis=1)
        norms = np.linalg.norm(attacked.state.buffers[key][rows], axis=1) * np.linalg.norm(
            clean.state.buffers[key][rows], axis=1)
        assert float(np.mean(cos / np.maximum(norms, 1e-12))) >= MIN_COS, key


def test_the_cap_moves_the_excess_of_capped_clients_onto_the_others_in_proportion() -> None:
    np.testing.assert_allclose(cap_shares(np.array([97.0, 1, 1, 1]), 0.3), [0.3, 0.7 / 3, 0.7 / 3, 0.7 / 3])
    np.testing.assert_allclose(cap_shares(np.array([5.0, 3, 1, 1, 0]), 0.3), [0.3, 0.3, 0.2, 0.2, 0.0])
    np.testing.assert_allclose(cap_shares(np.array([3.0, 1]), 0.3), [0.5, 0.5])  # never below the uniform share
    w = np.array([0.1, 0.2, 0.3, 0.4])
    assert cap_shares(w, 0.5) is w  # nothing to cap: FedAvg's weights bit for bit
    rows = cap_columns(np.array([[90.0, 1], [5, 1], [5, 1], [0, 1]]), 0.5)
    np.testing.assert_allclose(rows.sum(axis=0), [100, 4])  # each row keeps its mass ...
    np.testing.assert_allclose(rows[:, 0], [50, 25, 25, 0])  # ... and no client holds more than half of it


def test_norm_clip_composes_with_a_methods_own_weights() -> None:
    """norm-clip clips every update to the round's median norm, then takes the method's weighted mean."""
    start = {"img.w": np.zeros(2, np.float32)}
    clients = [{"img.w": np.full(2, v, np.float32)} for v in (1.0, 2.0, 100.0)]
    out = combine(start, clients, np.array([0.5, 0.3, 0.2]), "norm-clip", max_share=1.0)["img.w"]
    np.testing.assert_allclose(out, 0.5 * 1 + 0.3 * 2 + 0.2 * 2, rtol=1e-6)


@pytest.mark.parametrize("method,aggregation", [("rcsr", "median"), ("fedcafe", "trimmed-mean"),
                                                ("plfedcmh", "norm-clip"), ("local", "median"),
                                                ("linear", "trimmed-mean"), ("fedproto", "norm-clip")])
def test_an_aggregation_the_method_cannot_honour_is_refused_naming_both_keys(method: str, aggregation: str) -> None:
    with pytest.raises(ConfigError, match=rf"'aggregation' = '{aggregation}' and 'method' = '{method}'"):
        parse_run_config({"method": method, "aggregation": aggregation})


def test_robust_rules_that_keep_the_methods_weights_are_accepted() -> None:
    assert parse_run_config({"method": "rcsr", "aggregation": "norm-clip"}).aggregation == "norm-clip"
    assert parse_run_config({"method": "fedavg", "aggregation": "median"}).aggregation == "median"
    with pytest.raises(ConfigError, match="agreement"):
        parse_run_config({"method": "unialign", "unialign-weighting": "agreement", "aggregation": "median"})


def test_capping_changes_no_number_it_does_not_have_to() -> None:
    rng = np.random.default_rng(0)
    start = {"img.w": np.zeros(5, np.float32)}
    clients = [{"img.w": rng.standard_normal(5).astype(np.float32)} for _ in range(7)]
    sizes = rng.uniform(10, 20, 7)  # nobody above 0.3 of the mass
    w = sizes / sizes.sum()
    expected = np.sum([wi * c["img.w"].astype(np.float64) for wi, c in zip(w, clients)], axis=0).astype(np.float32)
    np.testing.assert_array_equal(combine(start, clients, sizes / sizes.sum(), max_share=0.3)["img.w"], expected)
    table = rng.uniform(1, 2, (7, 4))
    np.testing.assert_array_equal(cap_columns(table, 0.3), table)


def test_the_hypernetwork_cap_keeps_the_mask_and_the_uniform_share() -> None:
    from common.hypernet import LayerHypernet

    for seed in range(6):
        net = LayerHypernet(3, ["img.proj"], seed=seed, max_share=0.3)
        alpha = net.weights(2, {"img.proj": torch.tensor([1.0, 1.0, 0.0])})["img.proj"].detach()  # 2: text-only
        assert float(alpha[2]) == 0.0 and float(alpha.sum()) == pytest.approx(1.0)
        assert float(alpha.max()) <= 0.5 + 1e-6  # two clients allowed: the uniform share is the limit
        alpha = net.weights(0, {"img.proj": torch.ones(3)})["img.proj"].detach()
        assert float(alpha[1:].max()) <= 1 / 3 + 1e-6 and float(alpha.sum()) == pytest.approx(1.0)
