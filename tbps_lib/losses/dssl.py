"""DSSL's losses and its cross-modal attention score (Zhu et al., "DSSL: Deep Surroundings-person Separation
Learning for Text-based Person Retrieval", ACM MM 2021, file 004 in ``../shared/papers/``).

* :func:`ranking_loss_from_scores` / :func:`cosine_ranking_loss` - the triplet ranking loss Eq. (3), summed
  over *every* mismatched pair of the mini-batch (not the hardest one), in both directions, margin alpha;
* :func:`euclidean_reconstruction_loss` - the Euclidean-distance alternative of the SDM loss (Table 5);
* :func:`mutual_exclusion_loss` - MEC, Eq. (6): ``||P^T S||`` (Frobenius norm);
* :func:`attended_cosine` - the cross-modal attention CA of Eq. (12) / (15) followed by the cosine with the
  query, for every (owner of the parts, query) pair at once: the score of Align IV (Eq. (13)) and Align V
  (Eq. (14)) and of the local terms of the inference similarity.

"Mismatched" pairs are decided by person id (as in ``losses.ranking``): two items of the same person are
neither the positive pair nor a negative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps_lib.losses.cmpm import full_precision

REDUCTIONS = ("mean", "sum")


def _check_scores(scores: Tensor, pids: Tensor, where: str) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1] or pids.shape != (scores.shape[0],):
        raise ValueError(f"{where}: a square score matrix [n, n] and n pids expected, got {tuple(scores.shape)} "
                         f"and {tuple(pids.shape)}")


@full_precision
def ranking_loss_from_scores(scores: Tensor, pids: Tensor, margin: float = 0.2, reduction: str = "mean") -> Tensor:
    """Eq. (3) on a score matrix: ``scores[i, j] = S(x1_i, x2_j)`` (the matched pairs on the diagonal).

    For each matched pair k: sum over mismatched x2_j of [alpha - S_kk + S_kj]_+  plus  sum over mismatched
    x1_i of [alpha - S_kk + S_ik]_+ (j, i of another person than k). ``reduction``: "mean" over the n
    matched pairs (the workbook's default, see ``models/dssl.py``) or "sum" (Eq. (3) summed over the batch).
    """
    _check_scores(scores, pids, "ranking_loss_from_scores")
    if reduction not in REDUCTIONS:
        raise ValueError(f"ranking_loss_from_scores: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    positive = scores.diagonal()
    negative = (pids.unsqueeze(1) != pids.unsqueeze(0)).to(scores.dtype)
    rows = (F.relu(margin - positive.unsqueeze(1) + scores) * negative).sum(dim=1)  # anchor x1_k vs x2_j
    cols = (F.relu(margin - positive.unsqueeze(0) + scores) * negative).sum(dim=0)  # anchor x2_k vs x1_i
    cost = rows + cols
    return cost.mean() if reduction == "mean" else cost.sum()


def cosine_matrix(x1: Tensor, x2: Tensor) -> Tensor:
    """``[n1, n2]`` cosine similarities S(x1_i, x2_j)."""
    return F.normalize(x1, dim=-1) @ F.normalize(x2, dim=-1).T


def cosine_ranking_loss(x1: Tensor, x2: Tensor, pids: Tensor, margin: float = 0.2, reduction: str = "mean") -> Tensor:
    """Eq. (3) with S = cosine similarity: L_rank(x1, x2) for n matched rows of x1 [n, d] and x2 [n, d]."""
    if x1.dim() != 2 or x1.shape != x2.shape:
        raise ValueError(f"cosine_ranking_loss: x1 and x2 [n, d] of one shape expected, got {tuple(x1.shape)} "
                         f"and {tuple(x2.shape)}")
    return ranking_loss_from_scores(cosine_matrix(x1.float(), x2.float()), pids, margin, reduction)


@full_precision
def euclidean_reconstruction_loss(x: Tensor, y: Tensor) -> Tensor:
    """Table 5's alternative SDM loss: the Euclidean distance ||x_i - y_i||_2, averaged over the n rows."""
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"euclidean_reconstruction_loss: x and y [n, d] of one shape expected, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return (x - y).norm(dim=1).mean()


@full_precision
def mutual_exclusion_loss(person: Tensor, surroundings: Tensor) -> Tensor:
    """MEC, Eq. (6): ``||P^T S||`` (Frobenius norm, not squared) of the batch matrices P [B, p] (rows V_P)
    and S [B, p] (rows V_S). P^T S = sum_b V_P^b (V_S^b)^T, so the loss is 0 exactly when every person
    feature of the batch is orthogonal to every surroundings feature of the batch."""
    if person.dim() != 2 or person.shape != surroundings.shape:
        raise ValueError(f"mutual_exclusion_loss: P and S [B, p] of one shape expected, got "
                         f"{tuple(person.shape)} and {tuple(surroundings.shape)}")
    return torch.linalg.matrix_norm(person.T @ surroundings)  # Frobenius by default


@full_precision
def attended_cosine(parts: Tensor, queries: Tensor, part_mask: Tensor | None = None, tol: float = 1e-6,
                    eps: float = 1e-8) -> Tensor:
    """cos(CA(parts_o, q), q) for every owner o of parts and every query q: [n_owners, n_queries].

    Eq. (12) / (15): alpha_i = softmax_i(cos(part_i, q)) over the owner's n real parts; CA = sum of
    alpha_i part_i over the parts with alpha_i > 1/n. Ties with 1/n (all weights equal, e.g. a single
    phrase, where the literal ">" would keep nothing) are kept (``>= 1/n - tol``). An owner without parts
    scores 0. Computed without building the attended vectors: cos(sum_i w_i p_i, q) =
    (sum_i w_i p_i.q) / (sqrt(w^T G w) |q|), G the Gram matrix of the owner's parts.

    ``parts`` [n_o, P, d]; ``queries`` [n_q, d]; ``part_mask`` [n_o, P] (True / 1 = a real part) or None.
    """
    if parts.dim() != 3 or queries.dim() != 2 or parts.shape[-1] != queries.shape[-1]:
        raise ValueError(f"attended_cosine: parts [n_o, P, d] and queries [n_q, d] expected, got "
                         f"{tuple(parts.shape)} and {tuple(queries.shape)}")
    mask = (torch.ones(parts.shape[:2], dtype=torch.bool, device=parts.device) if part_mask is None
            else part_mask.bool())
    if mask.shape != parts.shape[:2]:
        raise ValueError(f"attended_cosine: part_mask must be {tuple(parts.shape[:2])}, got {tuple(mask.shape)}")
    q_norm = queries.norm(dim=-1).clamp_min(eps)  # [n_q]
    dots = torch.einsum("opd,qd->opq", parts, queries)  # p_i . q
    cos = dots / parts.norm(dim=-1).clamp_min(eps).unsqueeze(-1) / q_norm
    has_parts = mask.any(dim=1)
    logits = cos.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    logits = torch.where(has_parts.view(-1, 1, 1), logits, torch.zeros_like(logits))  # no NaN for empty owners
    alpha = torch.softmax(logits, dim=1) * mask.unsqueeze(-1)  # Eq. (12) / (15) weights
    n = mask.sum(dim=1).clamp_min(1).to(alpha.dtype).view(-1, 1, 1)
    weights = alpha * (alpha >= 1.0 / n - tol)  # keep the parts above the uniform weight 1/n
    numerator = (weights * dots).sum(dim=1)  # [n_o, n_q]
    gram = parts @ parts.transpose(1, 2)  # [n_o, P, P]
    sq_norm = (weights * (gram @ weights)).sum(dim=1)  # |CA|^2 = w^T G w
    return numerator / sq_norm.clamp_min(eps * eps).sqrt() / q_norm
