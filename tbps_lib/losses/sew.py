"""Sew calibration losses: the adaptive margin, the Sew matching loss and the Sew ID loss.

Source: Wei et al., "Calibrating Cross-modal Features for Text-Based Person Searching" (the Sew paper,
file 000), Section 3: matching loss Eq. (5)-(7) and its text-to-image twin, ID loss Eq. (8)-(9) both ways,
adaptive margin Eq. (10) with M1 = M2 = M_i. Scale alpha = 32 and margins 0.4..0.6 are Section 4.2's values.

Notation: v_i image and t_i caption features of pair i ([n, d]); a bar means L2-normalised;
s_ij = vbar_i . tbar_j. Negatives of anchor i: N(i) = {j : y_j != y_i}.

Positives P(i): the paper's "1(y_i = y_j, i != j)" (Section 3.1), read with its pairs in mind. The paper
sets up the data as pairs (I_i, T_i) and calls (I_i, T_i) the "perfect pair": "no other text feature will
have a shorter distance" than t_i (Eq. (1)), and Eq. (5) asks s_ii > s_ik + M1 for every positive k. On
CUHK-PEDES (and the synthetic stand-in) each image has two captions, so a batch can hold two pairs
(I, T_a) and (I, T_b) of the *same image*. Counting T_b in P(i) would ask the image to sit a margin closer
to T_a than to T_b, another description of the very same picture, and (in the text-to-image direction)
push the caption away from its own image by the margin: a constraint no model can satisfy, which Eq. (1)
does not intend (both are perfect pairs of I). Here the positives are the *other images'* pairs of the same
person: P(i) = {k : y_k = y_i, image_k != image_i} when ``image_index`` is given; pairs that share the
anchor's image are neither positives nor negatives (they drop out of Eq. (5) and Eq. (6)). Without
``image_index`` every other pair of the person is a positive, as written.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps_lib.utils import IGNORE_INDEX
from tbps_lib.losses.cmpm import _check_batch, cross_projections, full_precision


def adaptive_margin(token_lengths: Tensor, t_min: float, t_max: float, m_min: float = 0.4,
                    m_max: float = 0.6) -> Tensor:
    """Eq. (10) of the Sew paper: M_i = M_min + (M_max - M_min)(T_i - T_min) / (T_max - T_min).

    ``token_lengths`` [n] are the captions' token counts T_i. The paper gives only the linear map; here a
    caption shorter than ``t_min`` gets ``m_min`` and one longer than ``t_max`` gets ``m_max`` (clamped),
    so that an outlier caption can neither loosen the margin below the lower bound nor tighten it beyond
    the upper one. Returns a floating tensor of the same shape (the default dtype for integer lengths).
    """
    if not t_min < t_max:
        raise ValueError(f"adaptive_margin: t_min must be < t_max, got t_min={t_min}, t_max={t_max}")
    if not m_min <= m_max:
        raise ValueError(f"adaptive_margin: m_min must be <= m_max, got m_min={m_min}, m_max={m_max}")
    lengths = token_lengths if token_lengths.is_floating_point() else token_lengths.to(torch.get_default_dtype())
    fraction = ((lengths - t_min) / (t_max - t_min)).clamp(0.0, 1.0)  # the clamp is ours, see docstring
    return m_min + (m_max - m_min) * fraction  # Eq. (10) of the Sew paper


def _margin_column(margin: float | Tensor, n: int, like: Tensor, what: str) -> Tensor:
    """A fixed margin or per-pair margins M_i as an [n, 1] column in ``like``'s dtype and device."""
    if isinstance(margin, Tensor):
        if margin.shape != (n,):
            raise ValueError(f"{what}: margin must be a float or a tensor of {n} per-pair margins, got shape "
                             f"{tuple(margin.shape)}")
        return margin.to(like).unsqueeze(1)
    return torch.full((n, 1), float(margin), dtype=like.dtype, device=like.device)


def _masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """log sum_{j: mask_ij} exp(x_ij) per row; -inf for a row with no entry, with a finite (zero) gradient."""
    has_any = mask.any(dim=1)
    safe = x.masked_fill(~mask, float("-inf")).masked_fill(~has_any.unsqueeze(1), 0.0)
    return torch.where(has_any, torch.logsumexp(safe, dim=1), torch.full_like(has_any, float("-inf"), dtype=x.dtype))


def _one_direction(sim: Tensor, positive: Tensor, negative: Tensor, margin: Tensor, alpha: float) -> Tensor:
    """Per-anchor pull Eq. (5) + push Eq. (6) (= Eq. (7)) for similarities ``sim[i, j]`` of anchor i."""
    anchor = sim.diagonal().unsqueeze(1)
    # Eq. (5): log[1 + sum_{k in P(i)} exp(alpha (s_ik - s_ii + M1))]
    pull = F.softplus(_masked_logsumexp(alpha * (sim - anchor + margin), positive))
    # Eq. (6): log[1 + sum_{k in P(i)} sum_{j in N(i)} exp(alpha (s_ij - s_ik + M2))]; the double sum
    # factorises as (sum_j exp(alpha s_ij)) (sum_k exp(-alpha s_ik)) exp(alpha M2).
    push = F.softplus(_masked_logsumexp(alpha * sim, negative) + _masked_logsumexp(-alpha * sim, positive)
                      + alpha * margin.squeeze(1))
    return pull + push


def sew_pair_masks(pids: Tensor, image_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(positive, negative) bool [n, n] masks of the Sew matching loss: ``positive[i, k]`` = k in P(i)
    (same person, k != i, and, when ``image_index`` is given, another image than i's; see the module
    docstring), ``negative[i, j]`` = j in N(i) (another person). Both are symmetric."""
    if image_index is not None and image_index.shape != pids.shape:
        raise ValueError(f"sew_pair_masks: image_index must have the shape of pids {tuple(pids.shape)}, got "
                         f"{tuple(image_index.shape)}")
    same = pids.unsqueeze(1) == pids.unsqueeze(0)
    other = ~torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    if image_index is not None:
        other = other & (image_index.unsqueeze(1) != image_index.unsqueeze(0)).to(pids.device)
    return same & other, ~same


@torch.no_grad()
def sew_positive_census(image: Tensor, text: Tensor, pids: Tensor, image_index: Tensor, margin: float | Tensor,
                        alpha: float = 32.0) -> dict[str, float]:
    """What Eq. (5) does to one batch, image-to-text, for the two readings of P(i): a diagnostic.

    Returns: ``anchors``; ``same-image share``: the fraction of (anchor, positive) pairs under the literal
    reading (every other pair of the person) whose positive caption describes the anchor's own image;
    ``anchors with only same-image positives``; mean cosines ``s_ii`` (own caption), ``s_ik same image``,
    ``s_ik other image``, ``s_ij negative``; ``violated (literal)`` / ``violated (other images)``: the
    fraction of Eq. (5) terms with s_ik - s_ii + M > 0 (the constraint not met); ``pull (literal)`` and
    ``pull (other images)``: Eq. (5) averaged over the anchors. Features are normalised here; ``margin`` as
    in :func:`sew_matching_loss`.
    """
    n = image.shape[0]
    m = _margin_column(margin, n, image, "sew_positive_census")
    literal, negative = sew_pair_masks(pids)
    others, _ = sew_pair_masks(pids, image_index)
    same_image = literal & ~others
    sim = F.normalize(image.float(), dim=1) @ F.normalize(text.float(), dim=1).T
    anchor = sim.diagonal().unsqueeze(1)
    slack = sim - anchor + m  # > 0: Eq. (5)'s constraint s_ii > s_ik + M is violated

    def mean(x: Tensor, mask: Tensor) -> float:
        return float(x[mask].mean()) if mask.any() else math.nan

    def pull(mask: Tensor) -> float:
        return float(F.softplus(_masked_logsumexp(alpha * slack, mask)).mean())

    return {"anchors": float(n), "same-image share": float(same_image.sum() / literal.sum().clamp(min=1)),
            "anchors with only same-image positives": float((same_image.any(1) & ~others.any(1)).float().mean()),
            "s_ii": float(anchor.mean()), "s_ik same image": mean(sim, same_image),
            "s_ik other image": mean(sim, others), "s_ij negative": mean(sim, negative),
            "violated (literal)": mean((slack > 0).float(), literal),
            "violated (other images)": mean((slack > 0).float(), others),
            "pull (literal)": pull(literal), "pull (other images)": pull(others)}


@full_precision
def sew_matching_loss(image: Tensor, text: Tensor, pids: Tensor, margin: float | Tensor,
                      alpha: float = 32.0, image_index: Tensor | None = None) -> Tensor:
    """Sew matching loss L_match^I2T (Eq. (7) = pull Eq. (5) + push Eq. (6)) + its text-to-image twin.

    Features are L2-normalised here. Image-to-text: anchor image i, pair caption t_i, positive captions
    t_k (k in P(i)), negative captions t_j (j in N(i)); text-to-image swaps the modalities. ``margin`` is
    a float (Sew-F) or a tensor of per-pair margins M_i ([n], e.g. :func:`adaptive_margin`), used as
    M1 = M2 = M_i for anchor i in both directions (Section 3.3). The result is the mean over the n anchors
    of (I2T + T2I). ``image_index`` [n] (which image each pair shows): pairs that show the anchor's own
    image are not positives (module docstring, "Positives P(i)"); None = every other pair of the person.

    An anchor without another positive in the batch (K = 0) gets empty sums in Eq. (5) and Eq. (6), i.e.
    log(1 + 0) = 0: it contributes 0 (and no gradient) but still counts in the mean; likewise an anchor
    without negatives (J = 0) has push 0. Train with an identity-balanced sampler (>= 2 pairs per id) so
    that every anchor has a positive.
    """
    _check_batch(image, text, pids, "sew_matching_loss")
    if alpha <= 0:
        raise ValueError(f"sew_matching_loss: alpha must be > 0, got {alpha}")
    n = image.shape[0]
    m = _margin_column(margin, n, image, "sew_matching_loss")
    positive, negative = sew_pair_masks(pids, image_index)
    sim = F.normalize(image, dim=1) @ F.normalize(text, dim=1).T  # sim[i, j] = vbar_i . tbar_j
    i2t = _one_direction(sim, positive, negative, m, alpha)
    t2i = _one_direction(sim.T, positive, negative, m, alpha)  # the masks are symmetric
    return (i2t + t2i).mean()


def _margin_cross_entropy(proj: Tensor, w: Tensor, labels: Tensor, margin: Tensor, alpha: float) -> Tensor:
    """Eq. (8): -(1/n) sum_i log softmax_c(alpha (s_{c,i} - M_i [c = y_i]))[y_i], with s = w proj^T."""
    logits = proj @ w.T  # s_{c,i} = w_c^T proj_i, Eq. (9)
    logits = logits.scatter_add(1, labels.unsqueeze(1), -margin)  # s_{y_i,i} - M_i, without a host sync
    return F.cross_entropy(alpha * logits, labels)


@full_precision
def sew_id_loss(image: Tensor, text: Tensor, labels: Tensor, weight: Tensor, margin: float | Tensor,
                alpha: float = 32.0) -> Tensor:
    """Sew ID loss L_id^I2T Eq. (8) + L_id^T2I, with the projections of Eq. (9).

    vhat_i = (v_i^T tbar_i) tbar_i (the image feature projected on its normalised caption feature, not
    normalised itself, as in Eq. (9)); s_{c,i} = w_c^T vhat_i with unit-norm class weights w_c; the margin
    M_i (float or [n] tensor, M2 = M_i) is subtracted from the true-class logit inside a softmax of scale
    alpha. T2I uses that = (t_i^T vbar_i) vbar_i with the same classifier. ``labels`` are contiguous class
    indices in [0, C); ``weight`` [C, d] is normalised here. Returns L_id^I2T + L_id^T2I.
    """
    _check_batch(image, text, labels, "sew_id_loss")
    if weight.dim() != 2 or weight.shape[1] != image.shape[1]:
        raise ValueError(f"sew_id_loss: classifier weight must be [C, {image.shape[1]}], got {tuple(weight.shape)}")
    if alpha <= 0:
        raise ValueError(f"sew_id_loss: alpha must be > 0, got {alpha}")
    m = _margin_column(margin, image.shape[0], image, "sew_id_loss")
    w = F.normalize(weight, dim=1)
    image_proj, text_proj = cross_projections(image, text)  # vhat_i of Eq. (9) and its text-side twin
    return (_margin_cross_entropy(image_proj, w, labels, m, alpha)
            + _margin_cross_entropy(text_proj, w, labels, m, alpha))


@full_precision
def masked_caption_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Eq. (11) of the Sew paper: L_mcm = -sum_{n=1}^{N} log P(t_n | {t_i}, {v_i}) per caption, averaged over
    the captions of the batch.

    ``logits`` [B, K, V] are the decoder's vocabulary scores at K gathered positions per caption and
    ``targets`` [B, K] the original token ids there, ``IGNORE_INDEX`` where a gathered position is not a
    masked one (captions mask different numbers of tokens). The sum over a caption's masked tokens follows
    Eq. (11); a caption with no masked token contributes 0.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"masked_caption_loss: logits [B, K, V] and targets [B, K] expected, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none")  # 0 at ignored positions
    return per_token.view(targets.shape).sum(dim=1).mean()
