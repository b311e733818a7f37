"""The baseline losses against hand computations with explicit small numbers, and against slow loops."""
from __future__ import annotations

import math

import pytest
import torch

from tbps_lib.losses import (cmpc_loss, cmpm_loss, hardest_negative_ranking_loss, id_loss,
                             matching_distribution)

EPS = 1e-8
R2 = math.sqrt(2.0)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _kl_row(p, q):
    """sum_j p_j log(p_j / (q_j + eps)), written out."""
    return sum(pj * math.log(pj / (qj + EPS)) for pj, qj in zip(p, q))


def test_matching_distribution_normalises_same_id_rows():
    q = matching_distribution(torch.tensor([4, 4, 9]))
    assert torch.allclose(q, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))


def test_cmpm_two_people_by_hand():
    # x1=(1,0), x2=(0,2); z1=(2,0), z2=(0,1): zbar = e1, e2; xbar = e1, e2; q = identity.
    image, text = t([[1, 0], [0, 2]]), t([[2, 0], [0, 1]])
    e = math.e
    # image -> text logits x_i . zbar_j: row 1 (1, 0), row 2 (0, 2)
    i2t = (_kl_row([e / (e + 1), 1 / (e + 1)], [1, 0]) + _kl_row([1 / (1 + e**2), e**2 / (1 + e**2)], [0, 1])) / 2
    # text -> image logits z_i . xbar_j: row 1 (2, 0), row 2 (0, 1)
    t2i = (_kl_row([e**2 / (1 + e**2), 1 / (1 + e**2)], [1, 0]) + _kl_row([1 / (1 + e), e / (1 + e)], [0, 1])) / 2
    got = cmpm_loss(image, text, torch.tensor([0, 1]), eps=EPS)
    assert got.item() == pytest.approx(i2t + t2i, rel=1e-9)


def test_cmpm_same_person_spreads_the_target():
    # Both pairs show person 7: q = (1/2, 1/2) in every row; logits rows (1, 0) and (0, 1) both ways.
    image, text = t([[1, 0], [0, 1]]), t([[1, 0], [0, 1]])
    e = math.e
    row = _kl_row([e / (1 + e), 1 / (1 + e)], [0.5, 0.5])
    got = cmpm_loss(image, text, torch.tensor([7, 7]), eps=EPS)
    assert got.item() == pytest.approx(2 * row, rel=1e-9)
    # zero embeddings give uniform projections p = (1/2, 1/2) = q both ways: the loss is 0 (up to eps)
    assert abs(cmpm_loss(t([[0, 0], [0, 0]]), t([[0, 0], [0, 0]]), torch.tensor([7, 7])).item()) < 1e-7


def test_cmpm_matches_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    image, text = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    pids = torch.tensor([1, 1, 2, 3, 3, 3])
    total = 0.0
    for a, b in ((image, text), (text, image)):
        for i in range(6):
            logits = [float(a[i] @ (b[j] / b[j].norm())) for j in range(6)]
            z = sum(math.exp(v) for v in logits)
            p = [math.exp(v) / z for v in logits]
            same = [float(pids[i] == pids[j]) for j in range(6)]
            q = [s / sum(same) for s in same]
            total += _kl_row(p, q) / 6
    assert cmpm_loss(image, text, pids, eps=EPS).item() == pytest.approx(total, rel=1e-9)


def test_cmpc_by_hand():
    # Normalised classifier: w0 = (1,0), w1 = (0,1), w2 = (1,1)/sqrt2.
    weight = t([[2, 0], [0, 1], [1, 1]])
    image, text = t([[1, 1], [0, 2]]), t([[2, 0], [0, 3]])
    labels = torch.tensor([0, 1])
    e = math.exp
    # pair 1: xhat = (x.zbar) zbar = 1*(1,0) -> logits (1, 0, 1/sqrt2), class 0
    # pair 2: xhat = 2*(0,1) = (0,2)       -> logits (0, 2, sqrt2),   class 1
    ipt = (-math.log(e(1) / (e(1) + e(0) + e(1 / R2))) - math.log(e(2) / (e(0) + e(2) + e(R2)))) / 2
    # pair 1: zhat = (z.xbar) xbar = sqrt2 * (1,1)/sqrt2 = (1,1) -> logits (1, 1, sqrt2), class 0
    # pair 2: zhat = 3*(0,1) = (0,3)                            -> logits (0, 3, 3/sqrt2), class 1
    tpi = (-math.log(e(1) / (e(1) + e(1) + e(R2))) - math.log(e(3) / (e(0) + e(3) + e(3 / R2)))) / 2
    assert cmpc_loss(image, text, labels, weight).item() == pytest.approx(ipt + tpi, rel=1e-9)


def test_cmpc_is_invariant_to_classifier_scale():
    g = torch.Generator().manual_seed(1)
    image, text, w = (torch.randn(n, 3, generator=g) for n in (4, 4, 5))
    labels = torch.tensor([0, 4, 2, 2])
    assert cmpc_loss(image, text, labels, w).item() == pytest.approx(cmpc_loss(image, text, labels, 7 * w).item(),
                                                                       rel=1e-5)


def test_id_loss_by_hand():
    weight = t([[1, 0], [0, 1], [1, 1]])  # not normalised: a plain linear classifier without bias
    emb = t([[1, 0], [0, 2]])  # logits (1, 0, 1) -> class 2; (0, 2, 2) -> class 1
    e = math.e
    expected = (-math.log(e / (e + 1 + e)) - math.log(e**2 / (1 + 2 * e**2))) / 2
    assert id_loss(emb, torch.tensor([2, 1]), weight).item() == pytest.approx(expected, rel=1e-9)


def test_ranking_loss_by_hand():
    # pids (0, 0, 1). Cosines s(v_k, t_j):
    #   v1=(1,0): t1 1, t2 1/sqrt2, t3 0;  v2=(0,1): 0, 1/sqrt2, 1;  v3=(1,1): 1/sqrt2, 1, 1/sqrt2
    image, text = t([[1, 0], [0, 1], [1, 1]]), t([[1, 0], [1, 1], [0, 1]])
    pids = torch.tensor([0, 0, 1])
    a = 0.2
    pos = [1.0, 1 / R2, 1 / R2]
    hardest_text = [0.0, 1.0, 1.0]  # v1, v2 vs t3; v3 vs max(t1, t2)
    hardest_image = [1 / R2, 1.0, 1.0]  # t1, t2 vs v3; t3 vs max(v1, v2)
    expected = sum(max(a - p + h, 0) for p, h in zip(pos, hardest_text)) + sum(
        max(a - p + h, 0) for p, h in zip(pos, hardest_image))
    assert expected == pytest.approx(4 * (1.2 - 1 / R2))  # the written-out value
    got = hardest_negative_ranking_loss(image, text, pids, margin=a)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    mean = hardest_negative_ranking_loss(image, text, pids, margin=a, reduction="mean")
    assert mean.item() == pytest.approx(expected / 3, rel=1e-9)


def test_ranking_loss_matches_a_slow_loop():
    g = torch.Generator().manual_seed(2)
    image, text = (torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(2))
    pids = torch.tensor([3, 3, 1, 1, 1, 8, 5])
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
    total = 0.0
    for k in range(7):
        negs = [j for j in range(7) if pids[j] != pids[k]]
        total += max(0.3 - cos(image[k], text[k]) + max(cos(image[k], text[j]) for j in negs), 0)
        total += max(0.3 - cos(text[k], image[k]) + max(cos(text[k], image[j]) for j in negs), 0)
    assert hardest_negative_ranking_loss(image, text, pids, margin=0.3).item() == pytest.approx(total, rel=1e-9)


def test_ranking_loss_without_negatives_is_zero_with_finite_gradients():
    image = torch.randn(3, 4, requires_grad=True)
    text = torch.randn(3, 4, requires_grad=True)
    loss = hardest_negative_ranking_loss(image, text, torch.tensor([5, 5, 5]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()


def test_losses_reject_bad_shapes():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="cmpm_loss"):
        cmpm_loss(x, torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="expected 3 ids"):
        cmpc_loss(x, x, torch.zeros(2, dtype=torch.long), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"classifier weight must be \[C, 4\]"):
        cmpc_loss(x, x, torch.zeros(3, dtype=torch.long), torch.randn(2, 5))
    with pytest.raises(ValueError, match="reduction"):
        hardest_negative_ranking_loss(x, x, torch.arange(3), reduction="max")
    with pytest.raises(ValueError, match="id_loss"):
        id_loss(x, torch.zeros(3, dtype=torch.long), torch.randn(2, 5))
