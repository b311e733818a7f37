"""The Asymmetric Cross-Attention Module's similarity (ACAM) and the ACSA matching loss.

Source: Z. Ji, J. Hu, D. Liu, L. Y. Wu, Y. Zhao, "Asymmetric Cross-Scale Alignment for Text-Based Person
Search", IEEE TMM 2022 (file 002 in ``../shared/papers/``), Section III-C, Eq. (1)-(16).

Notation: visual entities v_i (i = 0..k: the global image embedding and the region embeddings, or the
regions only), text entities t_j (j = 1..M: the noun-phrase embeddings, plus the caption embedding in the
full-scale variant). Neither is normalised on input; every cosine is taken here.

Two printed typos are read as follows (documented again in ``tbps_lib/models/acsa.py``):

* Eq. (9) prints ``V_tj = sum_{j=1}^{M} alpha'_ij t_j``: a weighted *visual* representation is a sum over
  the visual entities, ``V_tj = sum_{i=0}^{k} alpha'_ij v_i``, and the softmax of alpha'_ij runs over i
  (the printed denominator sums over j). This is the text-to-image attention of SCAN (Lee et al., the
  paper's [45]), which Eq. (7)-(8) follow: normalise over the phrases, attend over the regions.
* Eq. (12) prints ``p_ab = S(x_a, z_b) / sum_a S(x_a, z_b)``, while Eq. (14) sums p_ab over b for image a:
  the normalisation runs over the texts b of image a (image-to-text), and over the images a of text b for
  Eq. (16) (text-to-image), as in CMPM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tbps_lib.losses.cmpm import _projection_kl, full_precision, matching_distribution

PROBABILITIES = ("softmax", "ratio")
_TINY = 1e-8  # guards Eq. (2)/(8) when every similarity of a row is <= 0, and |T_vi| = 0


def _check_entities(visual: Tensor, texts: Tensor, text_mask: Tensor) -> None:
    if visual.dim() != 3 or texts.dim() != 3 or visual.shape[-1] != texts.shape[-1]:
        raise ValueError(f"acam_similarity: visual [n_images, K, d] and texts [n_texts, M, d] expected, got "
                         f"{tuple(visual.shape)} and {tuple(texts.shape)}")
    if text_mask.shape != texts.shape[:2]:
        raise ValueError(f"acam_similarity: text_mask must be [n_texts, M] = {tuple(texts.shape[:2])}, got "
                         f"{tuple(text_mask.shape)}")


def _attended_cosine(cos: Tensor, weights: Tensor, norms: Tensor, weights_gram: Tensor) -> Tensor:
    """cos(x, sum_j w_j y_j) for every (x, weights) without building the weighted sums.

    ``cos`` [..., J] = cos(x, y_j); ``weights`` [..., J]; ``norms`` (broadcastable to [..., J]) = |y_j|;
    ``weights_gram`` [..., J] = sum_m w_m (y_m . y_j). x . Y / (|x| |Y|) = sum_j w_j cos_j |y_j| / sqrt(w^T G w).
    """
    num = (weights * cos * norms).sum(dim=-1)
    return num / (weights_gram * weights).sum(dim=-1).clamp_min(_TINY ** 2).sqrt()


@full_precision
def acam_similarity(visual: Tensor, texts: Tensor, text_mask: Tensor, lambda_i2t: float = 20.0,
                    lambda_t2i: float = 20.0) -> tuple[Tensor, Tensor]:
    """The two directions of ACAM for every (text, image) pair: (S, S'), each [n_texts, n_images].

    ``visual`` [n_images, K, d]: the visual entities I_m of each image (all present); ``texts``
    [n_texts, M, d]: the text entities of each caption, ``text_mask`` [n_texts, M] bool (True = present;
    every caption needs at least one).

    Image-text cross-attention (each visual entity attends over the phrases), Eq. (1)-(6):
    s_ij = cos(v_i, t_j) (1); s~_ij = [s_ij]_+ / sqrt(sum_i [s_ij]_+^2) (2), normalised over the visual
    entities; alpha_ij = softmax_j(lambda_1 s~_ij) (4); T_vi = sum_j alpha_ij t_j (3);
    S(I, T) = mean_i cos(v_i, T_vi) (5)-(6).

    Text-image cross-attention (each phrase attends over the visual entities), Eq. (7)-(11):
    s'_ij = cos(v_i, t_j) (7); s~'_ij = [s'_ij]_+ / sqrt(sum_j [s'_ij]_+^2) (8), normalised over the
    phrases; alpha'_ij = softmax_i(lambda'_1 s~'_ij) and V_tj = sum_i alpha'_ij v_i (9, typo read as in
    the module docstring); S'(I, T) = mean_j cos(t_j, V_tj) (10)-(11), over the present phrases.

    The weighted sums are never built: cos(v_i, T_vi) comes from the cosines, the phrase norms and the
    phrases' Gram matrix (:func:`_attended_cosine`), so memory is O(n_texts n_images K M), not times d.
    """
    _check_entities(visual, texts, text_mask)
    present = text_mask.bool()
    v_norm, t_norm = visual.norm(dim=-1), texts.norm(dim=-1)  # [Ni, K], [Nt, M]
    vn, tn = F.normalize(visual, dim=-1), F.normalize(texts, dim=-1)
    cos = torch.einsum("akd,bmd->bakm", vn, tn)  # Eq. (1) = Eq. (7): [Nt, Ni, K, M]
    pos = cos.clamp_min(0.0) * present[:, None, None, :]  # [s]_+, absent phrases count as 0
    mask4 = present[:, None, None, :].expand_as(cos)

    # Image-to-text, Eq. (2)-(6)
    s_i2t = pos / pos.pow(2).sum(dim=2, keepdim=True).sqrt().clamp_min(_TINY)  # Eq. (2): over i
    alpha = torch.softmax((lambda_i2t * s_i2t).masked_fill(~mask4, float("-inf")), dim=3)  # Eq. (4): over j
    nt, ni, k, m = cos.shape
    t_gram = texts @ texts.transpose(1, 2)  # t_j . t_m: [Nt, M, M]
    alpha_gram = torch.bmm(alpha.reshape(nt, ni * k, m), t_gram).view(nt, ni, k, m)
    s_vi = _attended_cosine(cos, alpha, t_norm[:, None, None, :], alpha_gram)  # Eq. (3) + (5): [Nt, Ni, K]
    S = s_vi.mean(dim=2)  # Eq. (6)

    # Text-to-image, Eq. (8)-(11)
    s_t2i = pos / pos.pow(2).sum(dim=3, keepdim=True).sqrt().clamp_min(_TINY)  # Eq. (8): over j
    alpha_t = torch.softmax(lambda_t2i * s_t2i, dim=2)  # Eq. (9): over the visual entities i
    v_gram = visual @ visual.transpose(1, 2)  # v_i . v_l: [Ni, K, K]
    weights = alpha_t.permute(1, 0, 3, 2)  # [Ni, Nt, M, K]
    weights_gram = torch.bmm(weights.reshape(ni, nt * m, k), v_gram).view(ni, nt, m, k)
    s_tj = _attended_cosine(cos.permute(1, 0, 3, 2), weights, v_norm[:, None, None, :],
                            weights_gram).transpose(0, 1)  # Eq. (9) + (10): [Nt, Ni, M]
    counts = present.sum(dim=1).clamp_min(1).to(cos.dtype)[:, None]
    S_prime = (s_tj * present[:, None, :]).sum(dim=2) / counts  # Eq. (11)
    return S, S_prime


@full_precision
def acam_attention(visual: Tensor, texts: Tensor, text_mask: Tensor, lambda_i2t: float = 20.0,
                   lambda_t2i: float = 20.0) -> tuple[Tensor, Tensor]:
    """The attention weights of ACAM for matched pairs (image b with text b): (alpha, alpha').

    ``visual`` [n, K, d], ``texts`` [n, M, d], ``text_mask`` [n, M]. ``alpha`` [n, K, M]: Eq. (4), each
    visual entity's weights over the phrases; ``alpha'`` [n, M, K]: Eq. (9), each phrase's weights over
    the visual entities (rows of absent phrases are 0). For figures (where a phrase looks in the image).
    """
    _check_entities(visual, texts, text_mask)
    present = text_mask.bool()
    cos = torch.einsum("bkd,bmd->bkm", F.normalize(visual, dim=-1), F.normalize(texts, dim=-1))
    pos = cos.clamp_min(0.0) * present[:, None, :]
    mask3 = present[:, None, :].expand_as(cos)
    s_i2t = pos / pos.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(_TINY)
    alpha = torch.softmax((lambda_i2t * s_i2t).masked_fill(~mask3, float("-inf")), dim=2)
    s_t2i = pos / pos.pow(2).sum(dim=2, keepdim=True).sqrt().clamp_min(_TINY)
    alpha_t = torch.softmax(lambda_t2i * s_t2i, dim=1).transpose(1, 2) * present[:, :, None]
    return alpha, alpha_t


def matching_logits(scores: Tensor, form: str = "softmax", scale: float = 20.0) -> Tensor:
    """Logits whose softmax along a row is the matching probability p of Eq. (12).

    ``form="ratio"``: the printed Eq. (12), p_ab = S_ab / sum_b S_ab, i.e. the softmax of log S_ab. It is a
    probability only when every similarity of the row is > 0 (cosines can be negative); non-positive
    similarities are clamped to 1e-8 (p ~ 0, no gradient). ``form="softmax"``: p_ab = softmax_b(scale *
    S_ab), defined for any similarity (the CMPM form, with the paper's softmax inverse temperature 20).
    """
    if form == "ratio":
        return scores.clamp_min(_TINY).log()
    if form == "softmax":
        return scale * scores
    raise ValueError(f"acsa matching probability form must be one of {list(PROBABILITIES)}, got {form!r}")


@full_precision
def acsa_loss(scores: Tensor, pids: Tensor, form: str = "softmax", scale: float = 20.0,
              eps: float = 1e-8) -> Tensor:
    """L_ACSA = L_i2t + L_t2i, Eq. (12)-(16), from ``scores`` [n, n] with scores[a, b] = S(x_a, z_b) (image a,
    text b of the batch; pair a is image a with text a).

    Image-to-text: p_ab from :func:`matching_logits` normalised over the texts b (Eq. (12));
    q_ab = y_ab / sum_m y_am with y_ab = 1 for the same person (Eq. (13)); L_a = sum_b p_ab log(p_ab /
    (q_ab + eps)) (14); L_i2t = mean_a L_a (15). Text-to-image: the same over the images a of text b (16).
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1] or pids.shape != scores.shape[:1]:
        raise ValueError(f"acsa_loss: scores [n, n] and pids [n] expected, got {tuple(scores.shape)} and "
                         f"{tuple(pids.shape)}")
    q = matching_distribution(pids, scores.dtype)  # Eq. (13), symmetric
    logits = matching_logits(scores, form, scale)
    return _projection_kl(logits, q, eps) + _projection_kl(logits.T, q, eps)  # Eq. (15) + (16)


__all__ = ["PROBABILITIES", "acam_attention", "acam_similarity", "acsa_loss", "matching_logits"]
