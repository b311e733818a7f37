"""LAIP's losses (Wang, Wu et al., "LAIP: Learning Local Alignment from Image-Phrase Modeling for Text-based
Person Search", file 003 in ``../shared/papers/``; appendix numbering for the ALBEF terms).

Global stream (Eq. (1)): image-text contrastive loss with feature queues, Eq. (16)-(17); image-text
matching on the fusion encoder's score, Eq. (18)-(19); the fusion triplet loss, Eq. (20).
Phrase stream: the bidirectional attention weights, Eq. (4)-(7); the phrase-guided image feature, Eq. (8);
the BidirAtt loss, Eq. (9)-(10); Mask Phrase Modeling, Eq. (11); Table V's MLM. Pure functions of tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps_lib.losses.cmpm import full_precision
from tbps_lib.utils import IGNORE_INDEX

ATTENTION_MODES = ("forward", "backward", "bidirectional")


@full_precision
def itc_loss(image: Tensor, text: Tensor, image_bank: Tensor, text_bank: Tensor, image_pos: Tensor,
             text_pos: Tensor, temperature: Tensor | float) -> Tensor:
    """Eq. (16)-(17): (CE(p^i2t, y^i2t) + CE(p^t2i, y^t2i)) / 2, averaged over the batch.

    ``image``, ``text`` [B, d]: the batch's projected features (normalised here, so their dot products are
    the coarse similarity of Eq. (15)). ``text_bank`` / ``image_bank`` [M, d]: the texts / images each
    image / text is contrasted with (the momentum features of the batch followed by the queue).
    ``image_pos`` bool [B, M]: which entries of ``text_bank`` are positives of each image (same person);
    ``text_pos`` likewise for ``image_bank``. y is the positives' indicator normalised to sum to 1
    (a soft-label cross-entropy), so several positives share the target mass.
    """
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    image_bank, text_bank = F.normalize(image_bank, dim=-1), F.normalize(text_bank, dim=-1)
    if image_pos.shape != (image.shape[0], text_bank.shape[0]) or text_pos.shape != (text.shape[0], image_bank.shape[0]):
        raise ValueError(f"itc_loss: positives must be [B, M] masks, got {tuple(image_pos.shape)} and "
                         f"{tuple(text_pos.shape)} for banks of {text_bank.shape[0]} / {image_bank.shape[0]}")

    def soft_ce(logits: Tensor, pos: Tensor) -> Tensor:
        target = pos.float() / pos.float().sum(dim=1, keepdim=True).clamp_min(1.0)
        return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()

    i2t = image @ text_bank.T / temperature  # Eq. (16), image to text
    t2i = text @ image_bank.T / temperature  # Eq. (16), text to image
    return 0.5 * (soft_ce(i2t, image_pos) + soft_ce(t2i, text_pos))  # Eq. (17)


@full_precision
def itm_loss(positive: Tensor, negative: Tensor) -> Tensor:
    """Eq. (19) with the scalar score of Eq. (18): binary cross-entropy of the matching logits, y = 1 for the
    ``positive`` pairs [B] and y = 0 for the ``negative`` pairs [K], averaged over all B + K pairs."""
    logits = torch.cat([positive.reshape(-1), negative.reshape(-1)])
    labels = torch.cat([torch.ones_like(positive.reshape(-1)), torch.zeros_like(negative.reshape(-1))])
    return F.binary_cross_entropy_with_logits(logits, labels)


@full_precision
def fusion_triplet_loss(positive: Tensor, negative_image: Tensor, negative_text: Tensor, delta: float) -> Tensor:
    """Eq. (20), with the hinge the right way round: [delta - s(I, T) + s(I_neg, T)]_+^2 +
    [delta - s(I, T) + s(I, T_neg)]_+^2, averaged over the B pairs; s = sim_fine (Eq. (18)).

    The paper prints [s(I, T) - s(I_neg, T) + delta]_+^2, which would push the positive pair *below* the
    negative; its text ("the positive pair should output higher sim_fine") fixes the sign used here.
    """
    return ((delta - positive + negative_image).clamp_min(0).pow(2)
            + (delta - positive + negative_text).clamp_min(0).pow(2)).mean()


def attention_weights(forward: Tensor, backward: Tensor | None, mode: str, eps: float = 1e-12) -> Tensor:
    """Eq. (7): w = norm(mean_h w^Fa * mean_h w^Ba) over the image patches.

    ``forward`` [..., H, N] is the [CLS] row of the cross-attention map per head (Eq. (4)); ``backward``
    [..., H, N] the gradient of the masked-word score with respect to it (Eq. (5)-(6)). Both are averaged
    over heads; only the positive part of the averaged gradient is kept (Grad-CAM, as the paper's
    references: a patch that lowers the score is no evidence for the phrase), so norm (division by the sum)
    gives weights >= 0 summing to 1. ``mode`` "forward" (Table IV's ForAtt) / "backward" (BackAtt) keeps one
    factor. A row whose product is zero everywhere gets uniform weights. Returns [..., N].
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {list(ATTENTION_MODES)}, got {mode!r}")
    weights = torch.ones_like(forward[..., 0, :])
    if mode in ("forward", "bidirectional"):
        weights = weights * forward.mean(dim=-2)
    if mode in ("backward", "bidirectional"):
        if backward is None or backward.shape != forward.shape:
            raise ValueError(f"attention mode {mode!r} needs the backward attention of the forward's shape "
                             f"{tuple(forward.shape)}")
        weights = weights * backward.mean(dim=-2).clamp_min(0.0)
    total = weights.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return torch.where(total > eps, weights / total.clamp_min(eps), uniform)


def phrase_guided_feature(weights: Tensor, patches: Tensor) -> Tensor:
    """Eq. (8): f~^I = sum_j w_j f_j^I; ``weights`` [P, N], ``patches`` [P, N, d] -> [P, d]."""
    return torch.einsum("pn,pnd->pd", weights, patches)


@full_precision
def biatt_loss(image: Tensor, phrase: Tensor, valid: Tensor, n_captions: int) -> Tensor:
    """Eq. (9)-(10) summed over the phrases of each caption as Eq. (12) does, averaged over captions:
    sum_p valid_p (1 - cos(G_I(f~^I_p), G_P(f^P_p))) / n_captions. ``image``, ``phrase`` [P, d] are the
    projected features, ``valid`` bool [P] marks real (not padding) phrases."""
    cos = F.cosine_similarity(image, phrase, dim=-1)
    return ((1.0 - cos) * valid.float()).sum() / max(1, n_captions)


@full_precision
def mask_phrase_loss(logits: Tensor, labels: Tensor, n_captions: int) -> Tensor:
    """Eq. (11) summed over the phrases of each caption (Eq. (12)), averaged over captions: the
    cross-entropy of the MLP's vocabulary ``logits`` [..., V] at every position whose ``labels`` [...] is not
    ``IGNORE_INDEX`` (the masked word's pieces), summed, divided by ``n_captions``."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    return ce / max(1, n_captions)


@full_precision
def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Masked language modelling as BERT (the paper's ref. [5]) and ALBEF's pretraining define it, Table V's
    alternative to MPM and a loss of the workbook's VLP stage: the cross-entropy at every position whose
    ``labels`` is not ``IGNORE_INDEX`` (the randomly masked caption tokens), *averaged over those tokens*.
    (Summed per caption like Eq. (11), a caption's ~15% masked tokens weigh ~5 times ITC + ITM; in the VLP
    stage that left held-out retrieval near chance: ``models.laip`` module docstring.)"""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


__all__ = ["ATTENTION_MODES", "attention_weights", "biatt_loss", "fusion_triplet_loss", "itc_loss", "itm_loss",
           "mask_phrase_loss", "mlm_loss", "phrase_guided_feature"]
