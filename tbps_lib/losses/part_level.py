"""The commonality of a fine embedding and the commonality-based margin ranking (CMR) loss.

Source: Park et al., "Improving Text-based Person Search via Part-level Cross-modal Correspondence" (the
part-level paper, file 001), Section 3.3: commonality Eq. (11), CMR loss Eq. (12). The ID loss Eq. (7) and
the plain hardest-negative ranking loss Eq. (9) are in :mod:`tbps_lib.losses.ranking`.

``negatives="all"`` (:func:`ranking_loss`, :func:`cmr_loss`) replaces the hardest negative of Eq. (9) / (12)
by the sum over every negative of the batch (Faghri et al.'s VSE0, the loss VSE++ [12] compares against):
the smoke preset's warm-up (``models/part_level.py``, ``model.all_negatives_epochs``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps_lib.losses.cmpm import full_precision
from tbps_lib.losses.ranking import REDUCTIONS, hardest_negative_costs

NEGATIVES = ("hardest", "all")


@full_precision
def commonality(logits: Tensor) -> Tensor:
    """Eq. (11): the entropy of the identity prediction p = softmax(logits) divided by log(c), in [0, 1].

    ``logits`` [n, c] are e W_ID of Eq. (7) (the shared classifier); returns [n]. 0 = the embedding names
    one identity for certain (specific to a person), 1 = uniform over the c identities (shared by all).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"commonality: logits [n, c] with c >= 2 identities expected (log(c) normalises the "
                         f"entropy), got {tuple(logits.shape)}")
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1) / math.log(logits.shape[1])


def all_negative_costs(image: Tensor, text: Tensor, pids: Tensor, image_margin: float | Tensor,
                       text_margin: float | Tensor) -> Tensor:
    """Per pair k, the hinge terms of Eq. (9) summed over *every* negative instead of the hardest one, [n]:
    sum_j [m_v(k) - s(v_k, t_k) + s(v_k, t_j)]_+ + sum_j [m_t(k) - s(t_k, v_k) + s(t_k, v_j)]_+ over the j of
    another person; margins as in :func:`~tbps_lib.losses.ranking.hardest_negative_costs` (numbers or [n])."""
    sim = F.normalize(image, dim=1) @ F.normalize(text, dim=1).T  # sim[k, j] = s(v_k, t_j)
    positive = sim.diagonal()
    negative = (pids.unsqueeze(1) != pids.unsqueeze(0)).to(sim.dtype)
    image_margin = torch.as_tensor(image_margin, dtype=sim.dtype, device=sim.device).expand(sim.shape[0])
    text_margin = torch.as_tensor(text_margin, dtype=sim.dtype, device=sim.device).expand(sim.shape[0])
    rows = F.relu((image_margin - positive).unsqueeze(1) + sim) * negative  # anchor v_k (row k) vs t_j
    cols = F.relu((text_margin - positive).unsqueeze(0) + sim) * negative  # anchor t_k (column k) vs v_j
    return rows.sum(dim=1) + cols.sum(dim=0)


def _check_pairs(image: Tensor, text: Tensor, pids: Tensor, reduction: str, negatives: str, where: str) -> None:
    if image.dim() != 2 or image.shape != text.shape or pids.shape != (image.shape[0],):
        raise ValueError(f"{where}: image/text [n, d] and n pids expected, got {tuple(image.shape)}, "
                         f"{tuple(text.shape)}, {tuple(pids.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"{where}: negatives must be one of {NEGATIVES}, got {negatives!r}")


def _ranking(image: Tensor, text: Tensor, pids: Tensor, image_margin: float | Tensor, text_margin: float | Tensor,
             reduction: str, negatives: str) -> Tensor:
    costs = hardest_negative_costs if negatives == "hardest" else all_negative_costs
    cost = costs(image, text, pids, image_margin, text_margin)
    return cost.sum() if reduction == "sum" else cost.mean()


@full_precision
def ranking_loss(image: Tensor, text: Tensor, pids: Tensor, margin: float = 0.2, reduction: str = "sum",
                 negatives: str = "hardest") -> Tensor:
    """Eq. (9) (``negatives="hardest"``, = :func:`~tbps_lib.losses.ranking.hardest_negative_ranking_loss`) or
    its sum over every negative (``"all"``, the warm-up: module docstring); ``reduction`` over the n pairs."""
    _check_pairs(image, text, pids, reduction, negatives, "ranking_loss")
    return _ranking(image, text, pids, margin, margin, reduction, negatives)


@full_precision
def cmr_loss(image: Tensor, text: Tensor, pids: Tensor, image_commonality: Tensor, text_commonality: Tensor,
             margin: float = 0.2, reduction: str = "sum", negatives: str = "hardest") -> Tensor:
    """Eq. (12): the hardest-negative ranking loss of Eq. (9) whose margin shrinks with the commonality.

    For pair k (image embedding v_k, text embedding t_k), with cosine similarity s:
    [alpha (1 - C(v_k)) - s(v_k, t_k) + s(v_k, t_h)]_+ + [alpha (1 - C(t_k)) - s(t_k, v_k) + s(t_k, v_h)]_+,
    t_h / v_h the most similar text / image of *another person* (as Eq. (9)); ``image_commonality`` and
    ``text_commonality`` [n] are C of Eq. (11) for v_k and t_k (the image-anchored term takes the image's,
    the text-anchored term the text's). With C = 0 this is Eq. (9) with margin alpha. A pair without a
    negative in the batch contributes 0. ``reduction="sum"`` as written (sum over k), ``"mean"`` divides by n.
    ``negatives="all"`` sums the hinges over every negative instead of taking the hardest (the warm-up).
    Gradients flow through C only if the caller passes it undetached.
    """
    _check_pairs(image, text, pids, reduction, negatives, "cmr_loss")
    n = image.shape[0]
    if image_commonality.shape != (n,) or text_commonality.shape != (n,):
        raise ValueError(f"cmr_loss: one commonality per pair expected ({n}), got "
                         f"{tuple(image_commonality.shape)} and {tuple(text_commonality.shape)}")
    return _ranking(image, text, pids, margin * (1 - image_commonality),  # anchor v_k
                    margin * (1 - text_commonality), reduction, negatives)  # anchor t_k
