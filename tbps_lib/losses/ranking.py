"""Identity classification loss and the hardest-negative bidirectional ranking loss.

Source: Park et al., "Improving Text-based Person Search via Part-level Cross-modal Correspondence" (the
part-level paper, file 001): ID loss Eq. (7) with one classifier shared by both modalities, and the
triplet ranking loss with the hardest in-batch negative, Eq. (9) (after Faghri et al., VSE++). Its
"Baseline" row trains global-max-pooled embeddings with exactly these two losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps_lib.losses.cmpm import full_precision

REDUCTIONS = ("sum", "mean")


@full_precision
def id_loss(embeddings: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """Eq. (7) of the part-level paper: -y log softmax(e W_ID), averaged over the batch.

    ``weight`` [C, d] is the classifier (no bias), the same tensor for image and text embeddings so that
    both modalities are classified alike; ``labels`` are contiguous class indices in [0, C).
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"id_loss: embeddings [n, d] and classifier weight [C, d] expected, got "
                         f"{tuple(embeddings.shape)} and {tuple(weight.shape)}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"id_loss: expected {embeddings.shape[0]} labels, got shape {tuple(labels.shape)}")
    return F.cross_entropy(embeddings @ weight.T, labels)


@full_precision
def hardest_negative_ranking_loss(image: Tensor, text: Tensor, pids: Tensor, margin: float = 0.2,
                                  reduction: str = "sum") -> Tensor:
    """Eq. (9) of the part-level paper: bidirectional triplet loss with the hardest in-batch negative.

    For pair k (image v_k, its caption t_k), with cosine similarity s:
    [margin - s(v_k, t_k) + s(v_k, t_h)]_+ + [margin - s(t_k, v_k) + s(t_k, v_h)]_+, where t_h is the most
    similar caption of another person and v_h the most similar image of another person ("negative" is
    decided by person id, so other pairs of the same person are neither positive nor negative). A pair
    without any negative in the batch contributes 0. ``reduction="sum"`` is Eq. (9) as written (sum over
    the batch); ``"mean"`` divides by the batch size.
    """
    if image.dim() != 2 or image.shape != text.shape or pids.shape != (image.shape[0],):
        raise ValueError(f"hardest_negative_ranking_loss: image/text [n, d] and n pids expected, got "
                         f"{tuple(image.shape)}, {tuple(text.shape)}, {tuple(pids.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"hardest_negative_ranking_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    cost = hardest_negative_costs(image, text, pids, margin, margin)
    return cost.sum() if reduction == "sum" else cost.mean()


def hardest_negative_costs(image: Tensor, text: Tensor, pids: Tensor, image_margin: float | Tensor,
                           text_margin: float | Tensor) -> Tensor:
    """Per pair k, the two hinge terms of Eq. (9) summed, [n]: the image-anchored term with
    ``image_margin`` and the text-anchored one with ``text_margin`` (numbers, or one margin per pair [n], as
    the commonality-based margin of the CMR loss, part-level Eq. (12)); 0 for a pair without a negative."""
    sim = F.normalize(image, dim=1) @ F.normalize(text, dim=1).T  # sim[k, j] = s(v_k, t_j)
    positive = sim.diagonal()
    negative = pids.unsqueeze(1) != pids.unsqueeze(0)
    neg_sim = sim.masked_fill(~negative, float("-inf"))
    hardest_text = neg_sim.amax(dim=1)  # for each image: its hardest negative caption
    hardest_image = neg_sim.amax(dim=0)  # for each caption: its hardest negative image
    cost = F.relu(image_margin - positive + hardest_text) + F.relu(text_margin - positive + hardest_image)
    return torch.where(negative.any(dim=1), cost, torch.zeros_like(cost))
