"""The hash-code loss terms on constructed tensors (common/losses.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.losses import (LossWeights, bit_balance, center_loss, center_targets, code_distill, info_nce,
                           retrieval_loss, signed)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_distillation_is_zero_when_the_codes_rank_as_the_embeddings_and_positive_otherwise() -> None:
    img, txt = _unit(8, 16, 0), _unit(8, 16, 1)
    scale = torch.tensor(10.0)
    assert code_distill(img, txt, img, txt, scale, code_temperature=0.1).item() < 1e-6  # same similarities
    assert code_distill(img, txt, img, txt[torch.randperm(8, generator=torch.Generator().manual_seed(2))], scale,
                        code_temperature=0.1).item() > 0.1


def test_distillation_moves_only_the_codes() -> None:
    img, txt = _unit(8, 16, 0).requires_grad_(), _unit(8, 16, 1).requires_grad_()
    codes = _unit(8, 32, 3).requires_grad_()
    code_distill(img, txt, codes, _unit(8, 32, 4), torch.tensor(10.0), 0.1).backward()
    assert img.grad is None and txt.grad is None and codes.grad.abs().sum() > 0


def test_bit_balance_is_zero_for_balanced_uncorrelated_bits_and_high_for_constant_ones() -> None:
    hadamard = torch.tensor([[1.0]])
    for _ in range(3):  # 8 x 8 Sylvester Hadamard: columns 1..7 balanced and mutually orthogonal
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    assert bit_balance(hadamard[:, 1:]).item() < 1e-12
    assert bit_balance(torch.ones(8, 7)).item() > 0.9


def test_straight_through_sign_is_the_sign_forward_and_the_identity_backward() -> None:
    code = torch.tensor([[-0.3, 0.0, 0.7]], requires_grad=True)
    out = signed(code)
    assert out.tolist() == [[-1.0, 1.0, 1.0]]
    out.sum().backward()
    assert code.grad.tolist() == [[1.0, 1.0, 1.0]]


def test_identical_inputs_give_identical_codes_and_the_default_loss_is_unchanged() -> None:
    img, txt = _unit(6, 16, 5), _unit(6, 16, 6)
    ic, tc = torch.tanh(3 * _unit(6, 32, 7)), torch.tanh(3 * _unit(6, 32, 8))
    w = LossWeights()
    total, parts = retrieval_loss(img, txt, ic, tc, torch.tensor(14.0), w)
    expected = (info_nce(img, txt, 14.0) + 0.5 * info_nce(F.normalize(ic, dim=-1), F.normalize(tc, dim=-1), 10.0)
                + 0.1 * (((ic.abs() - 1) ** 2).mean() + ((tc.abs() - 1) ** 2).mean()))
    assert torch.allclose(total, expected) and set(parts) == {"loss_emb", "loss_hash", "loss_quant"}
    full = LossWeights(distill_weight=1.0, balance_weight=1.0, straight_through=True)
    _, parts = retrieval_loss(img, txt, ic, tc, torch.tensor(14.0), full)
    assert {"loss_distill", "loss_balance"} <= set(parts)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 32)
    assert torch.equal(torch.sign(head(img[:1])), torch.sign(head(img[:1].clone())))


def test_with_hash_detach_the_hash_terms_move_the_head_but_not_the_towers() -> None:
    from common.model import ModelConfig, XmrModel

    torch.manual_seed(0)
    model = XmrModel(ModelConfig(img_dim=12, txt_dim=10, embed_dim=16, adapter_dim=4, hash_bits=16, hash_detach=True))
    (_, ic), (_, tc) = model.img(torch.randn(6, 12)), model.txt(torch.randn(6, 10))
    info_nce(F.normalize(ic, dim=-1), F.normalize(tc, dim=-1), 10.0).backward()
    assert model.img.hash.weight.grad.abs().sum() > 0 and model.img.proj.weight.grad is None


def test_hash_centers_are_shared_far_apart_codewords_and_multi_label_items_get_the_sign_of_their_sum() -> None:
    labels = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    targets = center_targets(labels, 16)
    assert torch.equal(targets, center_targets(labels, 16)), "every client derives the same centers"
    assert set(targets[:3].unique().tolist()) == {-1.0, 1.0} and torch.all(targets[3] == 0)
    single = center_targets(torch.eye(32), 16)  # 32 labels, 16 bits: Hadamard rows and their negations
    hamming = (16 - single @ single.T) / 2
    off = hamming[~torch.eye(32, dtype=torch.bool)]
    assert off.min() >= 8, "two labels' centers differ in at least half the bits"
    total = single[0] + single[1] + single[2]
    assert torch.equal(targets[2], torch.sign(total))
    assert center_targets(torch.eye(3), 24).shape == (3, 24)  # not a power of 2: seeded random codewords


def test_center_loss_is_lowest_at_the_center_and_ignores_unlabelled_items() -> None:
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    target = center_targets(labels, 8)
    near = center_loss(torch.tanh(3 * target) + 0.0, labels)
    far = center_loss(torch.tanh(-3 * target), labels)
    assert near < 0.1 < far
    code = torch.zeros(3, 8, requires_grad=True)
    center_loss(code, labels).backward()
    assert torch.all(code.grad[2] == 0) and torch.any(code.grad[0] != 0)
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    _, parts = retrieval_loss(emb, emb, torch.tanh(target), torch.tanh(target), torch.tensor(10.0),
                              LossWeights(hash_loss="center"), labels)
    assert parts["loss_hash"] == pytest.approx(center_loss(torch.tanh(target), labels).item())


def test_label_positives_stop_pushing_apart_items_of_a_label() -> None:
    a = _unit(4, 8, 3)
    b = torch.stack([a[0], a[0], a[2], a[3]])  # caption 1 sits on image 0's embedding
    same_label = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    plain = info_nce(a, b, 10.0)
    assert info_nce(a, b, 10.0, same_label, 0.0) == plain, "share 0 is the instance InfoNCE"
    assert info_nce(a, b, 10.0, same_label, 0.5) < plain, "images 0 and 1 share a label: the mix-up costs less"
    eye = torch.eye(4)
    torch.testing.assert_close(info_nce(a, b, 10.0, eye, 0.7), plain)  # no label partners: nothing changes


def test_label_positive_targets_are_distributions_in_both_directions() -> None:
    """Unequal label partners per row: the text->image targets must sum to 1 per caption as well."""
    a, b = _unit(4, 8, 5), _unit(4, 8, 6)
    positives = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])
    share = 0.6
    soft = (1 - share) * torch.eye(4) + share * positives / positives.sum(dim=1, keepdim=True)
    assert torch.allclose(soft.sum(dim=1), torch.ones(4))
    logits = 10.0 * a @ b.t()
    by_hand = 0.5 * (-(soft * logits.log_softmax(dim=1)).sum(dim=1).mean()
                     - (soft * logits.t().log_softmax(dim=1)).sum(dim=1).mean())
    torch.testing.assert_close(info_nce(a, b, 10.0, positives, share), by_hand)
