"""Embedding maps: t-SNE of image and text features of a few identities (the Sew paper's Figure 6),
with numbers that say what the picture shows.

The picture: the global image and text embeddings of ``n`` test identities, L2-normalised, reduced to 50
dimensions by PCA and then to 2 by t-SNE (scikit-learn, fixed seed); one colour per identity, a circle
for an image and a cross for a caption. The Sew paper reads tighter same-colour groups with mixed
markers as a smaller cross-modal gap.

The numbers (:func:`cluster_scores`), computed on the same points, in the feature space (cosine) and on
the 2-D map (Euclidean):

* kNN identity purity, as R-precision: for each point, the share of its ``k`` nearest neighbours that
  show the same identity, where ``k`` is the number of same-identity points among the candidates
  (so 1.0 means every identity forms its own cluster). ``image`` and ``text`` search within one
  modality, ``cross`` searches the other modality (captions -> images and images -> captions, averaged).
* Silhouette score with the identities as clusters, per modality and over both modalities together,
  and ``modality_silhouette``: the silhouette with the modality as the cluster label (near 0 when
  images and captions are mixed, near 1 when they form two separate clouds, i.e. a large gap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class EmbeddingSample:
    """Image and text embeddings of a set of identities: ``features`` [n, d] (images first, then texts),
    ``pids`` [n] and ``modality`` [n] (``"image"`` or ``"text"``)."""

    features: np.ndarray
    pids: np.ndarray
    modality: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.features)
        if self.features.ndim != 2 or len(self.pids) != n or len(self.modality) != n:
            raise ValueError(f"features [n, d], pids [n] and modality [n] must agree; got {self.features.shape}, "
                             f"{len(self.pids)}, {len(self.modality)}")
        unknown = set(np.unique(self.modality)) - set(MODALITIES)
        if unknown:
            raise ValueError(f"modality labels must be {MODALITIES}, got {sorted(unknown)}")


def sample_identities(image_feats: Tensor | np.ndarray, text_feats: Tensor | np.ndarray,
                      image_pids: Tensor | np.ndarray, text_pids: Tensor | np.ndarray, n_ids: int,
                      seed: int = 0) -> EmbeddingSample:
    """All image and text embeddings of ``n_ids`` identities drawn reproducibly (identities present in both
    modalities only), L2-normalised, in float32."""
    image_pids, text_pids = np.asarray(image_pids), np.asarray(text_pids)
    common = np.intersect1d(image_pids, text_pids)
    if n_ids < 2 or n_ids > len(common):
        raise ValueError(f"n_ids must be in 2..{len(common)} (identities with images and captions), got {n_ids}")
    chosen = np.sort(np.random.default_rng(seed).choice(common, size=n_ids, replace=False))
    img_rows = np.flatnonzero(np.isin(image_pids, chosen))
    txt_rows = np.flatnonzero(np.isin(text_pids, chosen))
    img = torch.nn.functional.normalize(torch.as_tensor(image_feats)[img_rows].float(), dim=1).numpy()
    txt = torch.nn.functional.normalize(torch.as_tensor(text_feats)[txt_rows].float(), dim=1).numpy()
    return EmbeddingSample(np.concatenate([img, txt]), np.concatenate([image_pids[img_rows], text_pids[txt_rows]]),
                           np.array(["image"] * len(img_rows) + ["text"] * len(txt_rows)))


def tsne_map(features: np.ndarray, seed: int = 0, pca_dim: int = 50, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE coordinates [n, 2] of ``features``: PCA to ``pca_dim`` first (when the features are wider),
    then scikit-learn's Barnes-Hut t-SNE initialised by PCA, with a fixed ``seed``.

    The perplexity is capped at (n - 1) / 3, since t-SNE needs more points than three times its perplexity.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float32)
    if len(x) < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {len(x)}")
    if x.shape[1] > pca_dim:
        x = PCA(n_components=min(pca_dim, len(x)), random_state=seed).fit_transform(x)
    perplexity = min(perplexity, (len(x) - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, method="barnes_hut")
    return tsne.fit_transform(x).astype(np.float32)


def _distances(x: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
        return 1.0 - u @ u.T
    if metric == "euclidean":
        sq = (x * x).sum(axis=1)
        return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def knn_purity(dist: np.ndarray, query_pids: np.ndarray, cand_pids: np.ndarray, same_set: bool) -> float:
    """Mean R-precision of identity retrieval from a distance matrix [n_queries, n_candidates].

    For each query, ``k`` = the number of candidates with its identity (itself excluded when
    ``same_set``), and the score is the share of same-identity points among its ``k`` nearest candidates
    (ties broken by candidate index). Queries without any same-identity candidate are skipped.
    """
    dist = np.array(dist, dtype=np.float64)
    if same_set:
        np.fill_diagonal(dist, np.inf)
    same = query_pids[:, None] == cand_pids[None, :]
    if same_set:
        np.fill_diagonal(same, False)
    k = same.sum(axis=1)
    order = np.argsort(dist, axis=1, kind="stable")
    hits = np.take_along_axis(same, order, axis=1)
    ranks = np.arange(dist.shape[1])[None, :]
    within = ranks < k[:, None]
    valid = k > 0
    if not valid.any():
        raise ValueError("no query has a same-identity candidate; purity is undefined")
    return float(((hits & within).sum(axis=1)[valid] / k[valid]).mean())


def _silhouette(x: np.ndarray, labels: np.ndarray, metric: str) -> float:
    from sklearn.metrics import silhouette_score

    if not 2 <= len(np.unique(labels)) <= len(labels) - 1:
        return float("nan")
    return float(silhouette_score(x, labels, metric=metric))


def cluster_scores(points: np.ndarray, sample: EmbeddingSample, metric: str = "cosine") -> dict[str, float]:
    """Purity and silhouette scores of ``points`` (features or 2-D map, rows as in ``sample``); see the
    module docstring. Keys: ``purity_image``, ``purity_text``, ``purity_cross``, ``silhouette_image``,
    ``silhouette_text``, ``silhouette_all``, ``modality_silhouette``."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) != len(sample.pids):
        raise ValueError(f"{len(points)} points for a sample of {len(sample.pids)}")
    dist = _distances(points, metric)
    img, txt = sample.modality == "image", sample.modality == "text"
    pid = sample.pids
    cross = 0.5 * (knn_purity(dist[np.ix_(txt, img)], pid[txt], pid[img], False)
                   + knn_purity(dist[np.ix_(img, txt)], pid[img], pid[txt], False))
    return {
        "purity_image": knn_purity(dist[np.ix_(img, img)], pid[img], pid[img], True),
        "purity_text": knn_purity(dist[np.ix_(txt, txt)], pid[txt], pid[txt], True),
        "purity_cross": cross,
        "silhouette_image": _silhouette(points[img], pid[img], metric),
        "silhouette_text": _silhouette(points[txt], pid[txt], metric),
        "silhouette_all": _silhouette(points, pid, metric),
        "modality_silhouette": _silhouette(points, sample.modality, metric),
    }


def map_scores(sample: EmbeddingSample, coords: np.ndarray) -> pd.DataFrame:
    """:func:`cluster_scores` in the feature space (cosine) and on the t-SNE map (Euclidean), one row each."""
    return pd.DataFrame({"features (cosine)": cluster_scores(sample.features, sample, "cosine"),
                         "t-SNE map (euclidean)": cluster_scores(coords, sample, "euclidean")}).T


def plot_maps(maps: Mapping[str, tuple[EmbeddingSample, np.ndarray]], title: str | None = None,
              columns: int = 3) -> Figure:
    """One panel per method (``columns`` panels a row): the t-SNE points, coloured by identity (the same
    colour for the same identity in every panel), a circle per image and a cross per caption."""
    if not maps:
        raise ValueError("plot_maps needs at least one method")
    all_pids = np.unique(np.concatenate([s.pids for s, _ in maps.values()]))
    cmap = plt.get_cmap("tab20" if len(all_pids) <= 20 else "turbo")
    color = {p: cmap(i % 20 if len(all_pids) <= 20 else i / max(len(all_pids) - 1, 1))
             for i, p in enumerate(all_pids)}
    n_cols = min(columns, len(maps))
    n_rows = -(-len(maps) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 4.0 * n_rows), squeeze=False)
    for ax in axes.flat[len(maps):]:
        ax.remove()  # the empty panels of the last row
    for ax, (name, (sample, coords)) in zip(axes.flat, maps.items()):
        for modality, marker, size in (("image", "o", 28), ("text", "x", 22)):
            rows = sample.modality == modality
            ax.scatter(coords[rows, 0], coords[rows, 1], c=[color[p] for p in sample.pids[rows]], marker=marker,
                       s=size, linewidths=1.1)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    handles = [Line2D([], [], ls="", marker=m, color="0.35", label=f"{label} (one colour per identity)")
               for m, label in (("o", "image"), ("x", "caption"))]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def sample_table(sample: EmbeddingSample) -> pd.DataFrame:
    """Images and captions per identity of a sample (what the map shows)."""
    df = pd.DataFrame({"pid": sample.pids, "modality": sample.modality})
    return df.groupby(["pid", "modality"]).size().unstack(fill_value=0)


__all__ = ["MODALITIES", "EmbeddingSample", "sample_identities", "tsne_map", "knn_purity", "cluster_scores",
           "map_scores", "plot_maps", "sample_table"]
