"""The in-process study tools (`scripts/inproc.py`, `scripts/diagnose_unimodal.py`) on constructed cases: the
emulated aggregation is the strategy's, and the diagnosis summary averages what it says it does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.diagnose_unimodal import group_of, summary
from scripts.inproc import Update, agreement_weighted, weighted_mean
from tests.messages import reply
from tests.test_methods import strategy

G = {"img.w": np.zeros((2, 3), np.float32), "txt.b": np.zeros(3, np.float32), "logit_scale": np.zeros(1)}


def _updates() -> list[Update]:
    rng = np.random.default_rng(0)
    paired = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in G.items()}
    return [Update(0, "paired", paired, 10.0),
            Update(1, "image-only", {"img.w": rng.normal(size=(2, 3)).astype(np.float32)}, 30.0),
            Update(2, "text-only", {"txt.b": rng.normal(size=3).astype(np.float32)}, 60.0)]


@pytest.mark.parametrize("method", ["fedavg", "unialign-agreement"])
def test_the_emulated_aggregation_is_the_strategys(method: str) -> None:
    updates = _updates()
    keys = {"unialign-weighting": "agreement"} if method != "fedavg" else {}
    s = strategy(method.split("-")[0], **keys)
    s.state.arrays = {k: v.copy() for k, v in G.items()}
    types = {"paired": (1, 1), "image-only": (1, 0), "text-only": (0, 1)}
    arrays, _ = s.aggregate_train(1, [reply(u.partition_id, u.arrays, {
        "num-examples": u.weight, "partition-id": u.partition_id, "has-img": types[u.client_type][0],
        "has-txt": types[u.client_type][1]}) for u in updates])
    emulated = weighted_mean(G, updates) if method == "fedavg" else agreement_weighted(G, updates)
    for key in G:
        np.testing.assert_allclose(arrays[key].numpy(), emulated[key], rtol=1e-5, atol=1e-6)


def test_layer_groups() -> None:
    assert [group_of(k) for k in ("img.proj.weight", "txt.adapter.up.bias", "img.hash.weight", "logit_scale")] == \
        ["proj", "adapter", "hash", "temperature"]


def test_the_summary_averages_rounds_two_and_up_over_clients_and_seeds(tmp_path: Path) -> None:
    def row(r: int, drift: float) -> dict:
        client = {"type": "image-only", "drift": drift, "pair-cos": 0.0, "cos-to-paired": 0.0, "norm-ratio": 1.0,
                  "uniformity-global": -3.0, "uniformity-updated": -3.0}
        ref = {"drift": 1.0, "pair-cos": 0.0}
        return {"round": r, "clients": [client], "paired-mean-img": ref, "paired-mean-txt": ref,
                "aggregates": {"fedavg": {"rsum": 100.0 + r, "hash_rsum": 50.0}}}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([row(1, -999.0), row(2, -10.0)]))
    b.write_text(json.dumps([row(2, -20.0), row(3, -30.0)]))
    text = summary([a, b])
    assert "| image-only | -20.000 |" in text  # round 1 left out
    assert "| dev rsum | 102.3 |" in text
