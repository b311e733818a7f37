"""t-SNE maps and the purity / silhouette numbers that go with them."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from tbps_lib.analysis.embedding_map import (EmbeddingSample, cluster_scores, knn_purity, map_scores, plot_maps,
                                             sample_identities, sample_table, tsne_map)


def clustered(n_ids: int = 6, per_id: int = 4, dim: int = 64, noise: float = 0.05, text_shift: float = 0.0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Image and text features: one random centre per identity plus noise; texts optionally shifted."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    pids = np.repeat(np.arange(10, 10 + n_ids), per_id)
    shift = np.zeros(dim)
    shift[0] = text_shift
    img = centres[pids - 10] + noise * rng.normal(size=(len(pids), dim))
    txt = centres[pids - 10] + noise * rng.normal(size=(len(pids), dim)) + shift
    return torch.tensor(img), torch.tensor(txt), pids, pids.copy()


def test_sample_identities_is_reproducible_and_normalised():
    img, txt, ip, tp = clustered(n_ids=8)
    a = sample_identities(img, txt, ip, tp, n_ids=3, seed=5)
    b = sample_identities(img, txt, ip, tp, n_ids=3, seed=5)
    np.testing.assert_array_equal(a.pids, b.pids)
    assert len(np.unique(a.pids)) == 3 and len(a.pids) == 3 * 4 * 2
    np.testing.assert_allclose(np.linalg.norm(a.features, axis=1), 1.0, rtol=1e-5)
    assert list(sample_table(a).columns) == ["image", "text"]
    with pytest.raises(ValueError, match="n_ids"):
        sample_identities(img, txt, ip, tp, n_ids=9)


def test_knn_purity_known_answers():
    # Two identities on a line: 0 0 1 1, perfectly separated.
    x = np.array([[0.0], [0.1], [5.0], [5.1]])
    d = np.abs(x - x.T)
    pids = np.array([1, 1, 2, 2])
    assert knn_purity(d, pids, pids, same_set=True) == 1.0
    # Interleaved: 1 2 1 2 with equal gaps: the nearest neighbour of each point is the other identity.
    x = np.array([[0.0], [1.0], [2.1], [3.3]])
    d = np.abs(x - x.T)
    assert knn_purity(d, np.array([1, 2, 1, 2]), np.array([1, 2, 1, 2]), same_set=True) == 0.0
    # Cross: query 1 -> candidates [1, 2] ranked right, query 2 ranked wrong.
    d = np.array([[0.1, 0.9], [0.2, 0.8]])
    assert knn_purity(d, np.array([1, 2]), np.array([1, 2]), same_set=False) == 0.5


def test_cluster_scores_separate_good_from_bad_features():
    img, txt, ip, tp = clustered(n_ids=6, noise=0.05)
    good = sample_identities(img, txt, ip, tp, n_ids=6)
    scores = cluster_scores(good.features, good)
    assert scores["purity_image"] == scores["purity_text"] == scores["purity_cross"] == 1.0
    assert scores["silhouette_all"] > 0.8
    assert abs(scores["modality_silhouette"]) < 0.1
    # Texts shifted far along one axis: within-modality purity stays, the modalities separate.
    img, txt, ip, tp = clustered(n_ids=6, noise=0.05, text_shift=40.0)
    gap = sample_identities(img, txt, ip, tp, n_ids=6)
    shifted = cluster_scores(gap.features, gap)
    assert shifted["purity_image"] == 1.0 and shifted["purity_text"] == 1.0
    assert shifted["modality_silhouette"] > 0.5
    assert shifted["silhouette_all"] < scores["silhouette_all"]
    rng = np.random.default_rng(0)
    noise = EmbeddingSample(rng.normal(size=good.features.shape), good.pids, good.modality)
    assert cluster_scores(noise.features, noise)["purity_cross"] < 0.6


def test_tsne_map_is_deterministic_and_keeps_clusters():
    img, txt, ip, tp = clustered(n_ids=5, per_id=6, dim=80, noise=0.05)
    sample = sample_identities(img, txt, ip, tp, n_ids=5)
    a = tsne_map(sample.features, seed=3)
    b = tsne_map(sample.features, seed=3)
    assert a.shape == (len(sample.pids), 2)
    np.testing.assert_array_equal(a, b)
    table = map_scores(sample, a)
    assert table.loc["t-SNE map (euclidean)", "purity_image"] == 1.0
    assert table.loc["features (cosine)", "purity_cross"] == 1.0
    fig = plot_maps({"m1": (sample, a), "m2": (sample, b)}, title="t")
    assert len(fig.axes) == 2


def test_sample_validation():
    with pytest.raises(ValueError, match="modality"):
        EmbeddingSample(np.zeros((2, 3)), np.array([1, 2]), np.array(["image", "audio"]))
    with pytest.raises(ValueError, match="at least 5"):
        tsne_map(np.zeros((3, 4)))
