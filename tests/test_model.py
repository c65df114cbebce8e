"""Tests for common.model, common.losses and common.train on small synthetic features (no backbone)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from common.losses import LossWeights, info_nce, retrieval_loss
from common.metrics import retrieval_recalls
from common.model import Adapter, ModelConfig, XmrModel, load_numpy_state, state_to_numpy
from common.train import TrainConfig, train_paired

CFG = ModelConfig(img_dim=12, txt_dim=10, embed_dim=16, adapter_dim=4, hash_bits=8, dropout=0.1)


def _model(seed: int = 0, cfg: ModelConfig = CFG) -> XmrModel:
    torch.manual_seed(seed)
    return XmrModel(cfg)


def _paired_data(n: int = 200, img_dim: int = 32, txt_dim: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """txt = fixed random linear map of img + small noise, one caption per image."""
    g = np.random.default_rng(123)
    img = g.normal(size=(n, img_dim)).astype(np.float32)
    w = g.normal(size=(img_dim, txt_dim)).astype(np.float32)
    txt = (img @ w + 0.1 * g.normal(size=(n, txt_dim))).astype(np.float32)
    return img, txt, np.arange(n, dtype=np.int64)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads; one thread avoids contention on small CI runners."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TRAIN_CFG = ModelConfig(img_dim=32, txt_dim=24, embed_dim=32, adapter_dim=8, hash_bits=16, dropout=0.1)


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


# ------------------------------------------------------------------------------------------ model
def test_adapter_starts_as_identity_but_learns() -> None:
    """Guards the zero-init residual adapter: identity at start (even with dropout active), yet trainable."""
    adapter = Adapter(16, 4, dropout=0.5).train()
    x = torch.randn(5, 16)
    assert torch.equal(adapter(x), x)
    (adapter(x) ** 2).sum().backward()
    assert adapter.up.weight.grad is not None and adapter.up.weight.grad.abs().sum() > 0
    model = _model()
    h = torch.randn(3, CFG.embed_dim)
    assert torch.equal(model.img.adapter(h), h) and torch.equal(model.txt.adapter(h), h)


def test_embeddings_unit_norm_and_relaxed_codes() -> None:
    """Guards L2-normalised embeddings and tanh codes in (-1, 1) for both towers."""
    model = _model()
    for mod, dim in (("img", CFG.img_dim), ("txt", CFG.txt_dim)):
        emb, code = model.tower(mod)(torch.randn(7, dim) * 5)
        assert emb.shape == (7, CFG.embed_dim) and code.shape == (7, CFG.hash_bits)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(7))
        assert bool((code.abs() < 1).all())
    with pytest.raises(ValueError, match="audio"):
        model.tower("audio")


def test_encode_shapes_codes_and_mode() -> None:
    """Guards encode(): (n, embed) unit-norm float embeddings, int8 ±1 codes, batch-invariant, mode restored."""
    model = _model().train()
    feats = np.random.default_rng(0).normal(size=(9, CFG.txt_dim)).astype(np.float32)
    emb, codes = model.encode("txt", feats)
    assert emb.shape == (9, CFG.embed_dim) and codes.shape == (9, CFG.hash_bits)
    assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 1}
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert model.training, "encode must restore training mode"
    emb2, codes2 = model.encode("txt", feats, batch_size=2)
    np.testing.assert_allclose(emb2, emb, rtol=1e-5, atol=1e-6)
    assert np.array_equal(codes2, codes)
    _, relaxed = model.eval().txt(torch.as_tensor(feats))
    assert np.array_equal(codes, np.where(relaxed.detach().numpy() >= 0, 1, -1))


def test_numpy_state_round_trip() -> None:
    """Guards exact transfer of every parameter through numpy (what Flower ships), and copy semantics."""
    src, dst = _model(0), _model(1)
    state = state_to_numpy(src)
    assert set(state) == set(src.state_dict()) and any(k.startswith("img.") for k in state)
    assert not all(np.array_equal(state[k], v) for k, v in state_to_numpy(dst).items())
    load_numpy_state(dst, state)
    back = state_to_numpy(dst)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    state["img.proj.weight"][:] = 123.0
    assert not torch.any(src.img.proj.weight == 123.0), "state_to_numpy must return copies"


def test_load_numpy_state_errors_name_the_key() -> None:
    """Guards that a missing, extra or mis-shaped key is rejected with its name (no silent partial load)."""
    model = _model()
    state = state_to_numpy(model)
    missing = dict(state)
    del missing["txt.hash.bias"]
    with pytest.raises(KeyError, match="txt.hash.bias"):
        load_numpy_state(model, missing)
    with pytest.raises(KeyError, match="bogus.weight"):
        load_numpy_state(model, {**state, "bogus.weight": np.zeros(3, np.float32)})
    bad = {**state, "img.proj.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match="img.proj.weight"):
        load_numpy_state(model, bad)
    assert not torch.all(model.img.proj.weight == 0), "a rejected state must not be partially loaded"


def test_logit_scale_shape_and_cap() -> None:
    """Guards the (1,)-shaped temperature (Flower round-trips 0-d arrays as (1,)) and the CLIP cap at 100."""
    model = _model()
    assert tuple(model.logit_scale.shape) == (1,) and state_to_numpy(model)["logit_scale"].shape == (1,)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    hot = _model(cfg=ModelConfig(img_dim=4, txt_dim=4, temperature=0.001))
    assert hot.scale().item() == pytest.approx(100.0)
    frozen = _model(cfg=ModelConfig(img_dim=4, txt_dim=4, learn_temperature=False))
    assert not frozen.logit_scale.requires_grad


def test_temperature_at_the_cap_still_gets_a_gradient_and_stays_capped() -> None:
    """The old cap (a clamp inside `scale()`) zeroed the temperature's gradient at 100, so it could never come
    back down; the cap is now applied to the parameter after each step."""
    model = _model(cfg=ModelConfig(img_dim=4, txt_dim=4, temperature=0.001))
    model.scale().sum().backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    model.clamp_temperature()
    assert model.scale().item() == pytest.approx(100.0)


def test_no_weight_decay_on_one_dimensional_parameters() -> None:
    """Biases, LayerNorm gains and the temperature are not decayed; matrices are."""
    from common.optim import AdamW, decays

    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = AdamW(params, lr=0.1, weight_decay=0.5, decay=decays(params))
    for p in params:
        p.grad = torch.zeros_like(p)  # zero gradient: only weight decay can move a parameter
    opt.step()
    for (name, p), b in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], before):
        moved = not torch.equal(p.detach(), b)
        assert moved == (p.ndim >= 2 and bool(b.abs().sum() > 0)), name


# ------------------------------------------------------------------------------------------ losses
def test_info_nce_hand_computed() -> None:
    """Guards the symmetric InfoNCE formula against a 2x2 example computed by hand."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * a @ b.T = [[2, 1.2], [0, 1.6]]
    rows = (-2 + math.log(math.exp(2) + math.exp(1.2)) - 1.6 + math.log(1 + math.exp(1.6))) / 2
    cols = (-2 + math.log(math.exp(2) + 1) - 1.6 + math.log(math.exp(1.2) + math.exp(1.6))) / 2
    assert info_nce(a, b, 2.0).item() == pytest.approx(0.5 * (rows + cols), rel=1e-6)
    assert info_nce(a, b, torch.tensor(2.0)).item() == pytest.approx(0.5 * (rows + cols), rel=1e-6)


def test_info_nce_prefers_aligned_pairs() -> None:
    """Guards the direction of the loss: matched pairs score lower than shuffled ones."""
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    b = torch.nn.functional.normalize(a + 0.1 * torch.randn(16, 8), dim=-1)
    perm = torch.roll(torch.arange(16), 1)
    assert info_nce(a, b, 10.0) < info_nce(a, b[perm], 10.0) - 1.0


def test_retrieval_loss_parts() -> None:
    """Guards the total = emb + w_hash*hash + w_quant*quant composition and a zero quant term for ±1 codes."""
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    codes = torch.sign(torch.randn(6, 16))
    w = LossWeights(hash_weight=0.5, quant_weight=0.1, hash_temperature=0.1)
    total, parts = retrieval_loss(emb, emb, codes, codes, torch.tensor(10.0), w)
    assert set(parts) == {"loss_emb", "loss_hash", "loss_quant"}
    assert torch.isfinite(total) and parts["loss_quant"] == 0.0
    expected = parts["loss_emb"] + 0.5 * parts["loss_hash"] + 0.1 * parts["loss_quant"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    _, soft = retrieval_loss(emb, emb, 0.5 * codes, codes, torch.tensor(10.0), w)
    assert soft["loss_quant"] == pytest.approx(0.25, rel=1e-6)


# ------------------------------------------------------------------------------------------ training
def _full_loss(model: XmrModel, img: np.ndarray, txt: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        ie, ic = model.img(torch.as_tensor(img))
        te, tc = model.txt(torch.as_tensor(txt))
        return retrieval_loss(ie, te, ic, tc, model.scale(), LossWeights())[0].item()


def _r1(model: XmrModel, img: np.ndarray, txt: np.ndarray, cap: np.ndarray) -> dict[str, float]:
    ie, _ = model.encode("img", img)
    te, _ = model.encode("txt", txt)
    return retrieval_recalls(ie @ te.T, cap, ks=(1,))


def _train(seed: int, rng_seed: int, cfg: TrainConfig) -> tuple[XmrModel, dict[str, float]]:
    img, txt, cap = _paired_data()
    model = _model(seed, TRAIN_CFG)
    torch.manual_seed(1000 + rng_seed)
    return model, train_paired(model, img, txt, cap, cfg, np.random.default_rng(rng_seed))


def test_train_paired_learns_the_pairing() -> None:
    """Guards that local training lowers the loss and lifts in-sample R@1 far above the untrained model."""
    img, txt, cap = _paired_data()
    before = _model(0, TRAIN_CFG)
    loss0, r0 = _full_loss(before, img, txt), _r1(before, img, txt, cap)
    model, hist = _train(0, 0, TrainConfig(epochs=8, batch_size=50, lr=1e-2))
    assert hist["steps"] == 8 * 4 and math.isfinite(hist["loss"])
    assert {"loss", "loss_emb", "loss_hash", "loss_quant"} <= set(hist)
    assert _full_loss(model, img, txt) < 0.5 * loss0
    r1 = _r1(model, img, txt, cap)
    assert r1["i2t_r1"] >= r0["i2t_r1"] + 50 and r1["t2i_r1"] >= r0["t2i_r1"] + 50


def test_train_paired_deterministic() -> None:
    """Guards reproducibility for fixed seeds, and that the rng seed actually drives the batch order."""
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2)
    (m1, h1), (m2, h2), (m3, _) = _train(0, 7, cfg), _train(0, 7, cfg), _train(0, 8, cfg)
    s1, s2, s3 = state_to_numpy(m1), state_to_numpy(m2), state_to_numpy(m3)
    assert h1 == h2 and all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert not all(np.array_equal(s1[k], s3[k]) for k in s1)


def test_train_paired_skips_singleton_batch() -> None:
    """Guards that a trailing batch of one image (no in-batch negative) is skipped, not trained on."""
    img, txt, cap = _paired_data(n=101)
    model = _model(0, TRAIN_CFG)
    hist = train_paired(model, img, txt, cap, TrainConfig(epochs=3, batch_size=50), np.random.default_rng(0))
    assert hist["steps"] == 3 * 2


def test_train_paired_rejects_bad_shards() -> None:
    """Guards that < 2 images or an image without captions is a ValueError, not a crash or a NaN."""
    img, txt, _ = _paired_data(n=4)
    model = _model(0, TRAIN_CFG)
    with pytest.raises(ValueError, match="at least 2"):
        train_paired(model, img[:1], txt[:1], np.array([0]), TrainConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="caption"):
        train_paired(model, img, txt[:3], np.array([0, 1, 1]), TrainConfig(), np.random.default_rng(0))


def test_frozen_temperature_stays_fixed() -> None:
    """Guards that learn_temperature=False keeps logit_scale untouched by training (no weight decay on it)."""
    img, txt, cap = _paired_data(n=40)
    cfg = ModelConfig(img_dim=32, txt_dim=24, embed_dim=16, adapter_dim=4, hash_bits=8, learn_temperature=False)
    model = _model(0, cfg)
    start = model.logit_scale.detach().clone()
    train_paired(model, img, txt, cap, TrainConfig(epochs=2, batch_size=16, lr=1e-2), np.random.default_rng(0))
    assert torch.equal(model.logit_scale.detach(), start)


def test_proximal_term_keeps_parameters_close() -> None:
    """Guards FedProx's loss term: mu > 0 pulls the local model towards its starting point compared with none."""
    from common.train import trainable
    from fedxmr_client.methods.fedprox import ProximalTerm

    start = state_to_numpy(_model(0, TRAIN_CFG))
    cfg = TrainConfig(epochs=4, batch_size=50, lr=1e-2)
    free, _ = _train(0, 3, cfg)
    img, txt, cap = _paired_data()
    prox = _model(0, TRAIN_CFG)
    torch.manual_seed(1003)
    hist = train_paired(prox, img, txt, cap, cfg, np.random.default_rng(3),
                        terms=[ProximalTerm(trainable(prox, ("img", "txt"), personal=False), 10.0)])
    assert hist["loss_prox"] > 0
    d_free, d_prox = _distance(state_to_numpy(free), start), _distance(state_to_numpy(prox), start)
    assert d_free > 0 and d_prox < 0.8 * d_free
