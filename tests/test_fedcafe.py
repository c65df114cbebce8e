"""FedCAFE and MOON (issue 14) on constructed tensors and messages: the AFE formula, memory rows aligned to concepts
whatever order the clients reply in, the memory weights' direction, the pairwise hash loss, MOON's term. Their
real runs (kill and resume included) are in test_resume.py, parametrised over every registered method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import parse_run_config
from common.data.concepts import CONCEPT_NAMES
from common.losses import LossWeights, label_similarity, pairwise_likelihood, retrieval_loss
from common.memory import fuse_memories, local_memory, memory_nll, memory_weights, normalise_rows
from common.model import ModelConfig, XmrModel
from common.parts.fedcafe import enhanced, memory_key
from common.train import labels_of
from fedxmr_client.methods.fedcafe import class_loss
from fedxmr_client.methods.moon import model_contrast
from fedxmr_server.strategies import build_strategy
from tests.messages import reply

C, BITS = len(CONCEPT_NAMES), 16
PAIRED = {"num-examples": 10, "has-img": 1, "has-txt": 1}


def test_afe_adds_the_memory_read_gated_by_tanh_of_the_raw_feature() -> None:
    raw = torch.tensor([[0.0, 1.0, -2.0]])
    dist = torch.tensor([[0.25, 0.75]])
    memory = torch.tensor([[4.0, 0.0, 1.0], [0.0, 2.0, -1.0]])
    expected = raw + torch.tanh(raw) * torch.tensor([[1.0, 1.5, -0.5]])
    torch.testing.assert_close(enhanced(raw, dist, memory), expected)
    assert enhanced(raw, dist, memory)[0, 0] == 0.0, "a bit whose raw feature is 0 reads nothing from the memory"
    torch.testing.assert_close(enhanced(raw, dist, torch.zeros_like(memory)), raw)


def test_the_towers_codes_are_the_signs_of_the_enhanced_feature() -> None:
    torch.manual_seed(0)
    model = XmrModel(ModelConfig(img_dim=12, txt_dim=10, embed_dim=8, adapter_dim=4, hash_bits=BITS,
                                 parts=("fedcafe",), concepts=C))
    model.eval()
    x = torch.randn(5, 12)
    plain = model.img(x)[1]
    model.img.fedcafe.memory.copy_(torch.randn(C, BITS))
    raw, logits, v_e = model.img.code(model.img.embed(x))
    torch.testing.assert_close(v_e, enhanced(raw, torch.softmax(logits, -1), model.img.fedcafe.memory))
    torch.testing.assert_close(model.img(x)[1], torch.tanh(v_e))
    assert not torch.equal(plain, model.img(x)[1])
    _, codes = model.encode("img", x.numpy())
    np.testing.assert_array_equal(codes, np.where(v_e.detach().numpy() >= 0, 1, -1))
    assert memory_key("img") in model.state_dict() and memory_key("img") not in dict(model.named_parameters())


def test_afe_never_flips_a_bit_when_memory_rows_have_unit_norm() -> None:
    """V_E = O + tanh(O)·m with |m| ≤ 1 keeps the sign of O (tanh|x| < |x|), so with the unit-norm memory rows the
    server sends, AFE changes the codes only through training, never sign(V_E) against sign(O)."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(4000, BITS, generator=gen) * torch.logspace(-3, 1, 4000).unsqueeze(1)
    dist = torch.softmax(3 * torch.randn(4000, C, generator=gen), dim=-1)
    memory = torch.as_tensor(normalise_rows(np.random.default_rng(0).normal(size=(C, BITS))), dtype=torch.float32)
    assert torch.equal(torch.sign(enhanced(raw, dist, memory)), torch.sign(raw))
    # the bound is what protects the sign: rows of norm 3 do flip bits
    assert not torch.equal(torch.sign(enhanced(raw, dist, 3 * memory)), torch.sign(raw))


def test_class_loss_is_the_reference_kl_mean_over_items_and_concepts() -> None:
    """L_P as the released code: KLDivLoss(mean) of log L̂ against multi-hot labels = −Σ Y·log L̂ / (B·C), about
    C / labels-per-item smaller than a per-item cross-entropy; rows without labels do not count."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, C, generator=gen)
    labels = torch.zeros(6, C)
    labels[0, [0, 3, 5]] = 1
    labels[1, 2] = 1
    labels[2, [1, 7]] = 1
    log_p = torch.log_softmax(logits[:3], dim=-1)
    expected = -(labels[:3] * log_p).sum() / (3 * C)
    torch.testing.assert_close(class_loss(logits, labels), expected)
    per_item_ce = -(labels[:3] / labels[:3].sum(1, keepdim=True) * log_p).sum(1).mean()
    assert class_loss(logits, labels) < per_item_ce / 5
    assert class_loss(logits, torch.zeros(6, C)) is None


def _clients(seed: int, n: int = 4) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Concept centres and n clients' local memories of noisy items around them; client 3 lacks concepts 0-2."""
    rng = np.random.default_rng(seed)
    centres = normalise_rows(rng.normal(size=(C, BITS)))
    memories, counts = [], []
    for k in range(n):
        concept = rng.integers(0, C, 200) if k != 3 else rng.integers(3, C, 200)
        labels = np.eye(C, dtype=np.uint8)[concept]
        m, c = local_memory(centres[concept] + 0.4 * rng.normal(size=(200, BITS)), labels)
        memories.append(m)
        counts.append(c)
    return centres, memories, counts


def test_global_memory_rows_stay_the_concepts_rows_whatever_the_client_order() -> None:
    centres, memories, counts = _clients(0)
    fused, total = fuse_memories(memories, counts, iters=20)
    for perm in ([3, 1, 0, 2], [2, 3, 1, 0]):
        again, total_again = fuse_memories([memories[i] for i in perm], [counts[i] for i in perm], iters=20)
        np.testing.assert_allclose(again, fused, atol=1e-5)
        np.testing.assert_array_equal(total_again, total)
    present = total > 0
    sims = fused[present] @ centres.T
    assert np.array_equal(sims.argmax(axis=1), np.flatnonzero(present)), "row c is nearest concept c's centre"
    assert np.all(fused[~present] == 0)


def test_the_strategy_keeps_memory_rows_aligned_across_rounds_with_permuted_replies() -> None:
    _, memories, counts = _clients(1)
    runs = []
    for order in ([0, 1, 2, 3], [3, 2, 0, 1]):
        s = build_strategy(parse_run_config({"method": "fedcafe", "hash-bits": BITS}))
        s.state.arrays = {memory_key("img"): np.zeros((C, BITS), np.float32), memory_key("txt"): np.zeros((C, BITS), np.float32)}
        for rnd in (1, 2):
            replies = [reply(10 + i, dict(s.state.arrays), {**PAIRED, "partition-id": i},
                             records={"memory": {"memory": memories[i], "count": counts[i]}}) for i in order]
            s.aggregate_train(rnd, replies)
        runs.append(s)
    np.testing.assert_allclose(runs[0].state.buffers["fedcafe/memory"], runs[1].state.buffers["fedcafe/memory"],
                               atol=1e-5)
    np.testing.assert_array_equal(runs[0].state.arrays[memory_key("img")], runs[0].state.buffers["fedcafe/memory"])


def test_memory_weights_are_a_distribution_and_favour_the_less_similar_client_by_default() -> None:
    _, memories, counts = _clients(2, n=3)
    fused, total = fuse_memories(memories, counts, iters=20)
    rng = np.random.default_rng(3)
    odd = normalise_rows(rng.normal(size=(C, BITS)))  # a client whose memory has nothing to do with the global one
    sims = np.array([memory_nll(memories[0], counts[0], fused, total), memory_nll(odd, counts[0], fused, total)])
    assert sims[1] > sims[0], "the unrelated memory has the larger negative log-likelihood"
    for weighting, favoured in (("nll", 1), ("inverse", 0)):
        w = memory_weights(sims, weighting)
        assert w.sum() == pytest.approx(1.0) and np.all(w > 0)
        assert w.argmax() == favoured, weighting
    np.testing.assert_allclose(memory_weights(sims, "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(memory_weights(sims, "nll"), sims / sims.sum())  # softmax(log Sim)


def test_a_bad_memory_record_is_left_out_and_a_missing_one_gets_the_mean_weight() -> None:
    _, memories, counts = _clients(4, n=3)
    s = build_strategy(parse_run_config({"method": "fedcafe", "hash-bits": BITS}))
    s.state.arrays = {memory_key("img"): np.zeros((C, BITS), np.float32)}
    arrays = dict(s.state.arrays)
    good = [reply(i, arrays, {**PAIRED, "partition-id": i}, records={"memory": {"memory": memories[i],
                                                                             "count": counts[i]}}) for i in (0, 1)]
    bad = reply(5, arrays, {**PAIRED, "partition-id": 5},
                records={"memory": {"memory": np.full((C, BITS), np.nan, np.float32), "count": counts[2]}})
    silent = reply(6, arrays, {**PAIRED, "partition-id": 6})
    s.aggregate_train(1, good + [bad, silent])
    assert s.last_train["usable"] == 3
    assert "not finite" in s.last_train["rejected"][0]["reason"]
    weights = {c["partition-id"]: c["weight"] for c in s.last_train["clients"]}
    assert weights[6] == pytest.approx((weights[0] + weights[1]) / 2)


def test_size_weighting_gives_fedavgs_weights_and_still_fuses_the_memory() -> None:
    _, memories, counts = _clients(5)
    s = build_strategy(parse_run_config({"method": "fedcafe", "hash-bits": BITS, "fedcafe-weighting": "size"}))
    s.state.arrays = {memory_key("img"): np.zeros((C, BITS), np.float32)}
    replies = [reply(i, dict(s.state.arrays), {**PAIRED, "num-examples": n, "partition-id": i},
                     records={"memory": {"memory": memories[i], "count": counts[i]}})
               for i, n in enumerate((30, 20, 25, 25))]
    s.aggregate_train(1, replies)
    weights = [c["weight"] for c in sorted(s.last_train["clients"], key=lambda c: c["partition-id"])]
    np.testing.assert_allclose(weights, [0.3, 0.2, 0.25, 0.25])  # no share above `max-client-share` (0.3)
    assert "fedcafe/memory" in s.state.buffers, "the memory (AFE's input) is fused whatever the weights"
    assert all("memory-weight" not in c for c in s.last_train["clients"]), "size weights are no memory weights"


def test_pairwise_likelihood_rewards_similar_items_with_agreeing_codes() -> None:
    codes = torch.tensor([[1.0, 1.0, -1.0, 1.0], [-1.0, 1.0, 1.0, -1.0]])
    similar = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    agree = pairwise_likelihood(codes, codes, similar)
    swapped = pairwise_likelihood(codes, codes.flip(0), similar)
    assert agree < swapped
    assert pairwise_likelihood(codes, codes, torch.ones(2, 2)) > agree, "calling the two items similar costs"
    labels = np.array([[1, 0], [1, 1], [0, 0]], dtype=np.uint8)
    lab = labels_of(labels, np.array([0, 1, 2]), torch.device("cpu"))
    s = label_similarity(lab, 3, torch.device("cpu"))
    torch.testing.assert_close(s, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert labels_of(np.zeros((3, 0), np.uint8), np.array([0, 1]), torch.device("cpu")) is None
    torch.testing.assert_close(label_similarity(None, 2, torch.device("cpu")), torch.eye(2))
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    code = torch.tanh(torch.randn(3, 4))
    _, parts = retrieval_loss(emb, emb, code, code, torch.tensor(10.0), LossWeights(hash_loss="pairwise"), lab)
    expected = pairwise_likelihood(code, code, s).item()
    assert parts["loss_hash"] == pytest.approx(expected)


def test_moon_pulls_toward_the_global_representation_and_away_from_the_previous_one() -> None:
    z_glob, z_prev = torch.eye(4)[:2], torch.eye(4)[2:]
    near_global = model_contrast(z_glob.clone(), z_glob, z_prev, 0.5)
    near_previous = model_contrast(z_prev.clone(), z_glob, z_prev, 0.5)
    assert near_global < 0.2 < np.log(2) < near_previous
    z = torch.randn(2, 4, requires_grad=True)
    model_contrast(z, z_glob, z_prev, 0.5).backward()
    step = -z.grad  # a gradient step raises the cosine to the global representation
    assert (torch.nn.functional.cosine_similarity(z + 0.1 * step, z_glob) >
            torch.nn.functional.cosine_similarity(z, z_glob)).all()
