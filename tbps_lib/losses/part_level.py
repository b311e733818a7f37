"""The commonality of a fine embedding and the commonality-based margin ranking (CMR) loss.

Source: Park et al., "Improving Text-based Person Search via Part-level Cross-modal Correspondence" (the
part-level paper, file 001), Section 3.3: commonality Eq. (11), CMR loss Eq. (12). The ID loss Eq. (7) and
the plain hardest-negative ranking loss Eq. (9) are in :mod:`tbps_lib.losses.ranking`.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from tbps_lib.losses.cmpm import full_precision
from tbps_lib.losses.ranking import REDUCTIONS, hardest_negative_costs


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


@full_precision
def cmr_loss(image: Tensor, text: Tensor, pids: Tensor, image_commonality: Tensor, text_commonality: Tensor,
             margin: float = 0.2, reduction: str = "sum") -> Tensor:
    """Eq. (12): the hardest-negative ranking loss of Eq. (9) whose margin shrinks with the commonality.

    For pair k (image embedding v_k, text embedding t_k), with cosine similarity s:
    [alpha (1 - C(v_k)) - s(v_k, t_k) + s(v_k, t_h)]_+ + [alpha (1 - C(t_k)) - s(t_k, v_k) + s(t_k, v_h)]_+,
    t_h / v_h the most similar text / image of *another person* (as Eq. (9)); ``image_commonality`` and
    ``text_commonality`` [n] are C of Eq. (11) for v_k and t_k (the image-anchored term takes the image's,
    the text-anchored term the text's). With C = 0 this is Eq. (9) with margin alpha. A pair without a
    negative in the batch contributes 0. ``reduction="sum"`` as written (sum over k), ``"mean"`` divides by n.
    Gradients flow through C only if the caller passes it undetached.
    """
    n = image.shape[0]
    if image.dim() != 2 or image.shape != text.shape or pids.shape != (n,):
        raise ValueError(f"cmr_loss: image/text [n, d] and n pids expected, got {tuple(image.shape)}, "
                         f"{tuple(text.shape)}, {tuple(pids.shape)}")
    if image_commonality.shape != (n,) or text_commonality.shape != (n,):
        raise ValueError(f"cmr_loss: one commonality per pair expected ({n}), got "
                         f"{tuple(image_commonality.shape)} and {tuple(text_commonality.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cmr_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    cost = hardest_negative_costs(image, text, pids, margin * (1 - image_commonality),  # anchor v_k
                                  margin * (1 - text_commonality))  # anchor t_k
    return cost.sum() if reduction == "sum" else cost.mean()
