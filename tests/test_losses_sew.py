"""The Sew calibration losses against hand computations with explicit numbers and against slow loops."""
from __future__ import annotations

import math

import pytest
import torch

from tbps_lib.losses.cmpm import cmpc_loss
from tbps_lib.losses.sew import adaptive_margin, sew_id_loss, sew_matching_loss

L = math.log
E = math.exp


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- Eq. (10): adaptive margin ------------------------------------------------------------------------

def test_adaptive_margin_end_points_midpoint_and_clamp():
    lengths = torch.tensor([20, 60, 40, 30, 10, 100])  # CUHK bounds T = 20..60, M = 0.4..0.6
    got = adaptive_margin(lengths, t_min=20, t_max=60)
    assert got.dtype == torch.get_default_dtype()
    assert torch.allclose(got, torch.tensor([0.4, 0.6, 0.5, 0.45, 0.4, 0.6]))


def test_adaptive_margin_custom_bounds_keep_float64():
    got = adaptive_margin(t([25.0, 45.0, 65.0]), t_min=25, t_max=65, m_min=0.2, m_max=1.0)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([0.2, 0.6, 1.0], abs=1e-15)


def test_adaptive_margin_rejects_bad_bounds():
    with pytest.raises(ValueError, match="t_min must be < t_max"):
        adaptive_margin(torch.tensor([30]), t_min=60, t_max=20)
    with pytest.raises(ValueError, match="m_min must be <= m_max"):
        adaptive_margin(torch.tensor([30]), t_min=20, t_max=60, m_min=0.6, m_max=0.4)


# --- Eq. (5)-(7): matching loss ----------------------------------------------------------------------

def test_matching_several_positives_per_identity_by_hand():
    # Images are e1..e4, so s_ij = vbar_i . tbar_j = t_j[i]. Captions (unit norm):
    # t1 = (1, 0, 0, 0), t2 = (.6, .8, 0, 0), t3 = (0, 0, 1, 0), t4 = (0, .6, 0, .8).
    # s = [[1, .6, 0, 0], [0, .8, 0, .6], [0, 0, 1, 0], [0, 0, 0, .8]]; pids 5 5 5 8; alpha 2, M 0.5.
    image = torch.eye(4, dtype=torch.float64)
    text = t([[1, 0, 0, 0], [.6, .8, 0, 0], [0, 0, 1, 0], [0, .6, 0, .8]])
    # image -> text, anchors 1..3 (positives: the other two of 1..3; negative: 4); anchor 4 has none
    i2t = [L(1 + E(0.2) + E(-1)) + L(1 + E(-0.2) + E(1)),   # pull s12, s13 vs s11; push s14 vs s12, s13
           L(1 + 2 * E(-0.6)) + L(1 + 2 * E(2.2)),          # s22 = .8, s21 = s23 = 0, s24 = .6
           L(1 + 2 * E(-1)) + L(1 + 2 * E(1)),              # s33 = 1, s31 = s32 = s34 = 0
           0.0]
    # text -> image uses the columns: caption 1 (1, 0, 0, 0), 2 (.6, .8, 0, 0), 3 (0, 0, 1, 0)
    t2i = [L(1 + 2 * E(-1)) + L(1 + 2 * E(1)),
           L(1 + E(0.6) + E(-0.6)) + L(1 + E(-0.2) + E(1)),  # s'22 = .8, s'21 = .6, s'23 = 0, s'24 = 0
           L(1 + 2 * E(-1)) + L(1 + 2 * E(1)),
           0.0]
    expected = (sum(i2t) + sum(t2i)) / 4
    got = sew_matching_loss(image, text, torch.tensor([5, 5, 5, 8]), margin=0.5, alpha=2.0)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_matching_per_pair_margins_at_alpha_32():
    # image = text = e1..e4, pids 1 1 2 2: s_ii = 1, every other s = 0; K = 1, J = 2 in both directions.
    # per anchor and direction: log(1 + e^{32 (M_i - 1)}) + log(1 + 2 e^{32 M_i})
    eye = torch.eye(4, dtype=torch.float64)
    margins = [0.4, 0.5, 0.6, 0.45]
    expected = sum(2 * (L(1 + E(32 * (m - 1))) + L(1 + 2 * E(32 * m))) for m in margins) / 4
    got = sew_matching_loss(eye, eye, torch.tensor([1, 1, 2, 2]), margin=t(margins))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # a constant tensor margin equals the float margin (Sew-F)
    const = sew_matching_loss(eye, eye, torch.tensor([1, 1, 2, 2]), margin=t([0.5] * 4))
    assert const.item() == pytest.approx(sew_matching_loss(eye, eye, torch.tensor([1, 1, 2, 2]), 0.5).item(),
                                         rel=1e-15)


def test_matching_without_other_positives_is_zero_with_zero_gradient():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = sew_matching_loss(image, text, torch.tensor([0, 1, 2]), margin=0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(image.grad, torch.zeros_like(image)) and torch.equal(text.grad, torch.zeros_like(text))


def test_matching_without_negatives_keeps_only_the_pull_term():
    # pids all equal: J = 0, push = 0. s = [[1, .6], [0, .8]] (images e1, e2; t1 = e1, t2 = (.6, .8)).
    image, text = torch.eye(2, dtype=torch.float64), t([[1, 0], [.6, .8]])
    i2t = L(1 + E(2 * (0.6 - 1 + 0.5))) + L(1 + E(2 * (0 - 0.8 + 0.5)))
    t2i = L(1 + E(2 * (0 - 1 + 0.5))) + L(1 + E(2 * (0.6 - 0.8 + 0.5)))
    got = sew_matching_loss(image, text, torch.tensor([3, 3]), margin=0.5, alpha=2.0)
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-12)


def _slow_matching(image, text, pids, margins, alpha):
    """Eq. (5)-(7) both ways with explicit loops over anchors, positives and negatives."""
    v = [row / row.norm() for row in image]
    w = [row / row.norm() for row in text]
    n, total = len(v), 0.0
    for a, b in ((v, w), (w, v)):
        for i in range(n):
            pos = [k for k in range(n) if k != i and pids[k] == pids[i]]
            neg = [j for j in range(n) if pids[j] != pids[i]]
            s = lambda p, q: float(a[p] @ b[q])  # noqa: E731
            m = margins[i]
            pull = sum(math.exp(alpha * (s(i, k) - s(i, i) + m)) for k in pos)
            push = sum(math.exp(alpha * (s(i, j) - s(i, k) + m)) for k in pos for j in neg)
            total += math.log1p(pull) + math.log1p(push)
    return total / n


def test_matching_matches_a_slow_loop_with_mixed_groups():
    g = torch.Generator().manual_seed(0)
    image, text = (torch.randn(9, 6, generator=g, dtype=torch.float64) for _ in range(2))
    pids = [4, 4, 4, 7, 7, 9, 2, 2, 2]  # groups of 3, 2, a lonely anchor, 3
    margins = adaptive_margin(torch.tensor([18, 25, 33, 41, 50, 59, 61, 22, 37]), 20, 60).double()
    got = sew_matching_loss(image, text, torch.tensor(pids), margins, alpha=8.0)
    assert got.item() == pytest.approx(_slow_matching(image, text, pids, margins.tolist(), 8.0), rel=1e-12)


def test_matching_gradients_reach_both_inputs_and_half_inputs_run_in_float32():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(6, 8, generator=g, requires_grad=True)
    text = torch.randn(6, 8, generator=g, requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = sew_matching_loss(image, text, pids, margin=torch.full((6,), 0.5))
    loss.backward()
    assert torch.isfinite(loss) and image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    half = sew_matching_loss(image.detach().bfloat16(), text.detach().bfloat16(), pids, 0.5)
    assert half.dtype == torch.float32


def test_matching_errors_name_the_argument():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="sew_matching_loss: image and text embeddings"):
        sew_matching_loss(x, torch.randn(3, 5), torch.tensor([0, 0, 1]), 0.5)
    with pytest.raises(ValueError, match="sew_matching_loss: expected 3 ids"):
        sew_matching_loss(x, x, torch.tensor([0, 1]), 0.5)
    with pytest.raises(ValueError, match="sew_matching_loss: margin must be a float or a tensor of 3"):
        sew_matching_loss(x, x, torch.tensor([0, 0, 1]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        sew_matching_loss(x, x, torch.tensor([0, 0, 1]), 0.5, alpha=0.0)


# --- Eq. (8)-(9): ID loss ----------------------------------------------------------------------------

def test_id_loss_by_hand_with_per_pair_margins():
    # W = [[1, 0], [0, 3]] normalises to the identity, so s_{c,i} = proj_i[c]; alpha 2, margins (.5, .2).
    # pair 1: v = (2, 0), t = (1, 1), label 0. vhat = (v.tbar) tbar = (1, 1); that = (t.vbar) vbar = (1, 0).
    # pair 2: v = (0, 1), t = (0, 3), label 1. vhat = (0, 1); that = (0, 3).
    image, text, weight = t([[2, 0], [0, 1]]), t([[1, 1], [0, 3]]), t([[1, 0], [0, 3]])
    # I2T logits 2 (s - M [c = y]): pair 1 (1, 2), label 0; pair 2 (0, 1.6), label 1
    i2t = (L(1 + E(1)) + L(1 + E(-1.6))) / 2
    # T2I logits: pair 1 (1, 0), label 0; pair 2 (0, 5.6), label 1
    t2i = (L(1 + E(-1)) + L(1 + E(-5.6))) / 2
    got = sew_id_loss(image, text, torch.tensor([0, 1]), weight, margin=t([0.5, 0.2]), alpha=2.0)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(i2t + t2i, rel=1e-12)


def test_id_loss_without_margin_and_unit_scale_is_cmpc():
    g = torch.Generator().manual_seed(3)
    image, text = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    weight, labels = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    got = sew_id_loss(image, text, labels, weight, margin=0.0, alpha=1.0)
    assert got.item() == pytest.approx(cmpc_loss(image, text, labels, weight).item(), rel=1e-12)
    # a positive margin makes the true class harder: the loss grows
    assert sew_id_loss(image, text, labels, weight, margin=0.5, alpha=1.0) > got


def test_id_loss_gradients_reach_both_inputs_and_the_classifier():
    g = torch.Generator().manual_seed(4)
    image = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    sew_id_loss(image, text, torch.tensor([0, 1, 2, 0]), weight, margin=0.5).backward()
    for grad in (image.grad, text.grad, weight.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_id_loss_errors_name_the_argument():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"sew_id_loss: classifier weight must be \[C, 4\]"):
        sew_id_loss(x, x, torch.tensor([0, 1]), torch.randn(3, 5), 0.5)
    # Out-of-range labels are not pre-checked (that would sync with the host every step); on CPU the
    # indexing itself raises.
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        sew_id_loss(x, x, torch.tensor([0, 3]), torch.randn(3, 4), 0.5)
    with pytest.raises(ValueError, match="sew_id_loss: margin must be a float or a tensor of 2"):
        sew_id_loss(x, x, torch.tensor([0, 1]), torch.randn(3, 4), torch.tensor([0.5]))
