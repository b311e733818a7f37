"""The modality gap seen through singular values (the Sew paper's Figure 4).

Following Jing et al. (ICLR 2022, "Understanding dimensional collapse in contrastive self-supervised
learning"), which the Sew paper cites for its Figure 4: L2-normalise each embedding, take the covariance
matrix of one modality's embeddings, and plot its singular values sorted from the largest, on a log
scale. Two modalities whose embeddings spread over the joint space in the same way have the same
curve; the Sew paper reads a smaller gap between the image and the text curve as closer cross-modal
distributions (Figure 4 a/c) and plots the per-index log gap (Figure 4 b/d).

Scalar summaries make the pictures checkable:

* ``area_between`` - the area between the two log10 curves, the index axis scaled to [0, 1] with each
  index owning 1/K of it (so it is the mean absolute log10 gap over the K indices, in decades);
* ``centroid_distance`` - the Euclidean distance between the means of the L2-normalised image and text
  embeddings (the "modality gap" of Liang et al., NeurIPS 2022), which the spectra cannot show because
  the covariance removes the mean;
* ``rank_image`` / ``rank_text`` - the numerical rank of each covariance (singular values above
  ``rank_tol`` times the largest), the dimensions a modality actually uses (dimensional collapse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

LOG_FLOOR = 1e-12  # singular values below this are drawn (and compared) at the floor instead of -inf
RANK_TOL = 1e-7  # relative threshold of the numerical rank (float64 round-off of a 768-d covariance is ~1e-15)


def _as_float64(embeddings: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(embeddings).detach()
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"embeddings must be [n >= 2, dim], got shape {tuple(x.shape)}")
    return x.to(device="cpu", dtype=torch.float64)


def normalized(embeddings: Tensor | np.ndarray) -> Tensor:
    """Rows scaled to unit L2 norm, in float64 on the CPU (a zero row is an error: it has no direction)."""
    x = _as_float64(embeddings)
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"{int((norms == 0).sum())} embedding(s) are all zeros and cannot be L2-normalised")
    return x / norms


def singular_values(embeddings: Tensor | np.ndarray, normalize: bool = True) -> np.ndarray:
    """Singular values of the embeddings' covariance matrix, float64, largest first.

    ``embeddings`` [n, dim] are L2-normalised per row (unless ``normalize=False``), centred, and
    C = X^T X / n is decomposed (Jing et al. 2022, Section 3). C is symmetric positive semi-definite, so
    its singular values are its eigenvalues; they sum to the mean squared distance to the centroid.
    Float64 throughout: the smallest values of a collapsed spectrum are many decades below the largest.
    """
    x = normalized(embeddings) if normalize else _as_float64(embeddings)
    mean = x.mean(dim=0, keepdim=True)
    cov = x.T @ x / x.shape[0] - mean.T @ mean  # = centred X^T X / n, without a centred copy of X
    # Symmetric eigenvalues are the singular values of a PSD matrix (up to the sign of round-off),
    # and eigvalsh is about twice as fast as svdvals at 768 x 768.
    values = torch.linalg.eigvalsh(cov).abs().numpy()
    return np.sort(values)[::-1].copy()


def log_spectrum(values: np.ndarray) -> np.ndarray:
    """log10 of singular values, clipped at ``LOG_FLOOR`` (exact zeros of a collapsed spectrum)."""
    return np.log10(np.maximum(np.asarray(values, dtype=np.float64), LOG_FLOOR))


def log_gap(image_values: np.ndarray, text_values: np.ndarray) -> np.ndarray:
    """Per-index gap log10(sigma_text_k) - log10(sigma_image_k) (the Sew paper's Figure 4 b/d).

    Positive where the text embeddings spread more along their k-th direction than the images along
    theirs. Both spectra must have the same length (the joint space's dimension).
    """
    if len(image_values) != len(text_values):
        raise ValueError(f"the two spectra differ in length ({len(image_values)} vs {len(text_values)}): "
                         "image and text embeddings must share the joint space")
    return log_spectrum(text_values) - log_spectrum(image_values)


def numerical_rank(values: np.ndarray, rank_tol: float = RANK_TOL) -> int:
    """Number of singular values above ``rank_tol`` times the largest."""
    values = np.asarray(values, dtype=np.float64)
    return int((values > rank_tol * values.max()).sum()) if values.size and values.max() > 0 else 0


def area_between(image_values: np.ndarray, text_values: np.ndarray) -> float:
    """Area between the two log10 curves, in decades, over the index axis scaled to [0, 1] with each of the
    K indices owning a width of 1/K: the mean absolute per-index log gap (so |mean signed gap| <= area)."""
    return float(np.abs(log_gap(image_values, text_values)).mean())


def centroid_distance(image_embeddings: Tensor | np.ndarray, text_embeddings: Tensor | np.ndarray) -> float:
    """Distance between the centroids of the L2-normalised image and text embeddings (0 = no offset, 2 = most)."""
    return float((normalized(image_embeddings).mean(dim=0) - normalized(text_embeddings).mean(dim=0)).norm())


@dataclass(frozen=True)
class ModalitySpectra:
    """The two spectra of one model (or one set of embeddings) and the centroid distance."""

    image: np.ndarray
    text: np.ndarray
    centroid_distance: float

    @property
    def log_gap(self) -> np.ndarray:
        return log_gap(self.image, self.text)

    def summary(self, rank_tol: float = RANK_TOL) -> dict[str, float]:
        """``area_between``, ``mean_log_gap`` (signed), ``centroid_distance``, ``rank_image``, ``rank_text``."""
        return {"area_between": area_between(self.image, self.text),
                "mean_log_gap": float(self.log_gap.mean()),
                "centroid_distance": self.centroid_distance,
                "rank_image": numerical_rank(self.image, rank_tol),
                "rank_text": numerical_rank(self.text, rank_tol)}


def modality_spectra(image_embeddings: Tensor | np.ndarray, text_embeddings: Tensor | np.ndarray) -> ModalitySpectra:
    """Both spectra (:func:`singular_values`) and the centroid distance of one model's embeddings."""
    return ModalitySpectra(singular_values(image_embeddings), singular_values(text_embeddings),
                           centroid_distance(image_embeddings, text_embeddings))


def gap_table(spectra: Mapping[str, ModalitySpectra], rank_tol: float = RANK_TOL) -> pd.DataFrame:
    """One row of :meth:`ModalitySpectra.summary` per method (the index)."""
    table = pd.DataFrame({name: s.summary(rank_tol) for name, s in spectra.items()}).T
    table.index.name = "method"
    return table.astype({"rank_image": int, "rank_text": int})


def plot_spectra(spectra: Mapping[str, ModalitySpectra], title: str | None = None,
                 colors: Sequence[str] | None = None) -> Figure:
    """The Sew paper's Figure 4 for any number of methods: (a) log10 singular values of the image (solid)
    and text (dashed) embeddings, one colour per method; (b) the per-index log gap, one line per method."""
    if not spectra:
        raise ValueError("plot_spectra needs at least one method's spectra")
    colors = list(colors or plt.rcParams["axes.prop_cycle"].by_key()["color"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for i, (name, s) in enumerate(spectra.items()):
        c = colors[i % len(colors)]
        k = np.arange(1, len(s.image) + 1)
        left.plot(k, log_spectrum(s.image), color=c, lw=1.6, label=f"{name} image")
        left.plot(k, log_spectrum(s.text), color=c, lw=1.6, ls="--", label=f"{name} text")
        right.plot(k, s.log_gap, color=c, lw=1.4, label=name)
    left.set_xlabel("singular value index"), left.set_ylabel("log10 singular value")
    left.set_title("(a) spectra of the embedding covariance", fontsize=9)
    left.legend(fontsize=7)
    right.axhline(0.0, color="0.5", lw=0.8)
    right.set_xlabel("singular value index"), right.set_ylabel("log10 text - log10 image")
    right.set_title("(b) per-index log gap", fontsize=9)
    right.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


__all__ = ["LOG_FLOOR", "RANK_TOL", "normalized", "singular_values", "log_spectrum", "log_gap", "numerical_rank",
           "area_between", "centroid_distance", "ModalitySpectra", "modality_spectra", "gap_table", "plot_spectra"]
