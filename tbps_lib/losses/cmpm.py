"""Cross-Modal Projection Matching (CMPM) and Classification (CMPC) losses.

Source: Y. Zhang and H. Lu, "Deep Cross-Modal Projection Learning for Image-Text Matching", ECCV 2018,
Section 3.1 (CMPM) and Section 3.2 (CMPC). The formulas are restated in each docstring; equation
numbers are not cited because only the section structure of that paper was available here. The Sew
paper restates the CMPC projection as its Eq. (9). The Sew baseline ("Model 2") trains with CMPM + CMPC;
ACSA uses CMPM + mu * CMPC (its Eq. (17)).

Notation: x_i image embeddings, z_j text embeddings (both [n, d], not normalised); a bar means L2-normalised.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

_Fn = TypeVar("_Fn", bound=Callable[..., Tensor])
_HALF = (torch.float16, torch.bfloat16)


def full_precision(fn: _Fn) -> _Fn:
    """Run a loss with autocast off and half-precision tensor arguments cast to float32.

    Why: under bf16 autocast the similarity matmuls would come out in bf16, where log(q + eps) loses its
    eps and the ranking margins lose their resolution; the losses' matmuls are [n, n] or [n, C], cheap.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        up = lambda a: a.float() if isinstance(a, Tensor) and a.dtype in _HALF else a  # noqa: E731
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
    return wrapper  # type: ignore[return-value]


def _check_batch(image: Tensor, text: Tensor, ids: Tensor, what: str) -> None:
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"{what}: image and text embeddings must both be [n, d], got {tuple(image.shape)} "
                         f"and {tuple(text.shape)}")
    if ids.shape != (image.shape[0],):
        raise ValueError(f"{what}: expected {image.shape[0]} ids, got shape {tuple(ids.shape)}")


def matching_distribution(pids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q_ij = y_ij / sum_k y_ik with y_ij = 1 when pairs i and j show the same person (Section 3.1): [n, n]."""
    same = (pids.unsqueeze(1) == pids.unsqueeze(0)).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


def _projection_kl(logits: Tensor, q: Tensor, eps: float) -> Tensor:
    """mean_i sum_j p_ij (log p_ij - log(q_ij + eps)), with p = softmax over j of ``logits``."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(q + eps))).sum(dim=1).mean()


@full_precision
def cmpm_loss(image: Tensor, text: Tensor, pids: Tensor, eps: float = 1e-8) -> Tensor:
    """CMPM: KL(p || q) between the softmax of projections and the true matching distribution, both ways.

    Image-to-text: p_ij = exp(x_i^T zbar_j) / sum_k exp(x_i^T zbar_k); q from :func:`matching_distribution`;
    L_i2t = (1/n) sum_i sum_j p_ij log(p_ij / (q_ij + eps)). Text-to-image swaps the roles (z_i^T xbar_j).
    Returns L_cmpm = L_i2t + L_t2i. ``pids`` are person ids: all pairs of the same person are true matches.
    """
    _check_batch(image, text, pids, "cmpm_loss")
    q = matching_distribution(pids, image.dtype)
    i2t = image @ F.normalize(text, dim=1).T  # x_i projected on each normalised z_j
    t2i = text @ F.normalize(image, dim=1).T
    return _projection_kl(i2t, q, eps) + _projection_kl(t2i, q, eps)


@full_precision
def cmpc_loss(image: Tensor, text: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """CMPC: norm-softmax identity classification of each modality projected on the other.

    xhat_i = (x_i^T zbar_i) zbar_i (restated as Eq. (9) of the Sew paper); the norm-softmax loss
    L_ipt = -(1/n) sum_i log(exp(W_{y_i}^T xhat_i) / sum_j exp(W_j^T xhat_i)) with ||W_j|| = 1 and no bias;
    L_tpi the same for zhat_i = (z_i^T xbar_i) xbar_i. Returns L_cmpc = L_ipt + L_tpi. ``labels`` are
    contiguous class indices in [0, C); ``weight`` [C, d] is one classifier shared by both modalities,
    normalised here.
    """
    _check_batch(image, text, labels, "cmpc_loss")
    if weight.dim() != 2 or weight.shape[1] != image.shape[1]:
        raise ValueError(f"cmpc_loss: classifier weight must be [C, {image.shape[1]}], got {tuple(weight.shape)}")
    w = F.normalize(weight, dim=1)
    image_proj, text_proj = cross_projections(image, text)
    return F.cross_entropy(image_proj @ w.T, labels) + F.cross_entropy(text_proj @ w.T, labels)


def cross_projections(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Each image feature projected on its pair's normalised text feature, and the text-side twin:
    xhat_i = (x_i^T zbar_i) zbar_i and zhat_i = (z_i^T xbar_i) xbar_i (CMPC; Eq. (9) of the Sew paper)."""
    text_n, image_n = F.normalize(text, dim=1), F.normalize(image, dim=1)
    return (image * text_n).sum(dim=1, keepdim=True) * text_n, (text * image_n).sum(dim=1, keepdim=True) * image_n
