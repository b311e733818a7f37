"""Re-ranking: agreement with slow set-based loop versions, behaviour on constructed cases, errors."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from tbps_lib.engine.metrics import rank_metrics
from tbps_lib.engine.rerank import stable_topk, k_reciprocal, visual_neighbors


# ----------------------------------------------------------------------------------------------
# slow reference versions: plain Python lists and sets
# ----------------------------------------------------------------------------------------------
def top(row, m):
    """The m best entries of a row, best first, ties to the lower index."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))[:m]


def visual_neighbors_loop(ti, ii, k, weight):
    ti, ii = ti.tolist(), ii.tolist()
    visual = [set(top(row, k)) for row in ii]
    out = []
    for row in ti:
        textual = set(top(row, k))
        out.append([s + weight * len(textual & visual[g]) / len(textual | visual[g]) for g, s in enumerate(row)])
    return np.array(out)


def k_reciprocal_loop(qg, qq, gg, k1, k2, lam, released=False):
    """Returns (-d*, number of R(q, k1/2) sets the expansion accepted that added members).

    ``released=False``: the paper's equations as written. ``released=True``: plus the two steps of the
    authors' public code -- divide each column of the joint distance matrix by its maximum, then
    transpose it; divide each V row by its sum.
    """
    qg, qq, gg = qg.tolist(), qq.tolist(), gg.tolist()
    n_q, n_g = len(qg), len(gg)
    joint = [qq[i] + qg[i] for i in range(n_q)] + [[qg[i][g] for i in range(n_q)] + gg[g] for g in range(n_g)]
    n = n_q + n_g
    dist = [[2 - 2 * s for s in row] for row in joint]
    if released:
        col_max = [max(dist[i][j] for i in range(n)) for j in range(n)]
        by_column = [[dist[i][j] / col_max[j] for j in range(n)] for i in range(n)]
        dist = [[by_column[j][i] for j in range(n)] for i in range(n)]  # the transpose

    def reciprocal(p, k):
        return {g for g in top(joint[p], k + 1) if p in top(joint[g], k + 1)}

    half = round(k1 / 2)
    encodings, grew = [], 0
    for p in range(n):
        r_p = reciprocal(p, k1)
        expanded = set(r_p)
        for q in r_p:
            r_q = reciprocal(q, half)
            if len(r_p & r_q) >= 2 / 3 * len(r_q):
                grew += not r_q <= expanded
                expanded |= r_q
        weights = {g: math.exp(-dist[p][g]) for g in expanded}
        if released:
            total = sum(weights.values())
            weights = {g: w / total for g, w in weights.items()}
        encodings.append(weights)
    averaged = []
    for p in range(n):
        acc = defaultdict(float)
        for i in top(joint[p], k2):
            for g, v in encodings[i].items():
                acc[g] += v / k2
        averaged.append(acc)
    out = np.zeros((n_q, n_g))
    for p in range(n_q):
        for g in range(n_g):
            a, b = averaged[p], averaged[n_q + g]
            keys = set(a) | set(b)
            low = sum(min(a.get(j, 0.0), b.get(j, 0.0)) for j in keys)
            high = sum(max(a.get(j, 0.0), b.get(j, 0.0)) for j in keys)
            out[p, g] = -((1 - lam) * (1 - low / high) + lam * dist[p][n_q + g])
    return out, grew


def clustered(seed, n_ids=4, texts_per_id=3, images_per_id=4, dim=8, noise=0.6, dtype=torch.float64):
    """L2-normalised text and image features around one centre per identity."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_ids, dim, generator=gen, dtype=dtype)
    text_ids = torch.arange(n_ids).repeat_interleave(texts_per_id)
    image_ids = torch.arange(n_ids).repeat_interleave(images_per_id)
    texts = centres[text_ids] + noise * torch.randn(len(text_ids), dim, generator=gen, dtype=dtype)
    images = centres[image_ids] + noise * torch.randn(len(image_ids), dim, generator=gen, dtype=dtype)
    norm = torch.nn.functional.normalize
    return norm(texts, dim=1), norm(images, dim=1), text_ids, image_ids


# ----------------------------------------------------------------------------------------------
# visual_neighbors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,weight,chunk", [(1, 1.0, None), (3, 1.0, 5), (5, 0.5, 1), (15, 2.0, None)])
def test_visual_neighbors_matches_loop(k, weight, chunk):
    t, g, _, _ = clustered(1, n_ids=5, texts_per_id=3, images_per_id=3)  # 15 texts x 15 images
    ti, ii = t[:12] @ g.T, g @ g.T
    got = visual_neighbors(ti, ii, k=k, weight=weight, chunk_size=chunk)
    assert got.shape == ti.shape and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), visual_neighbors_loop(ti, ii, k, weight), atol=1e-12)


def test_visual_neighbors_with_ties_and_float32_numpy():
    rng = np.random.default_rng(0)
    ti = np.round(rng.standard_normal((12, 15)), 0).astype(np.float32)  # heavy ties
    ii = np.round(rng.standard_normal((15, 15)), 0).astype(np.float32)
    got = visual_neighbors(ti, ii, k=4)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), visual_neighbors_loop(ti, ii, 4, 1.0), atol=1e-5)


def test_visual_neighbors_fixes_a_wrong_top1():
    # Text 0 scores distractor image 0 just above its true image 1. Image 1's visual neighbours
    # {1, 0} equal the text's top-2 (Jaccard 1); image 0's are {0, 2} (Jaccard 1/3).
    ti = torch.tensor([[0.80, 0.79, 0.10, 0.05]])
    ii = torch.tensor([[1.0, 0.8, 0.9, 0.0],
                       [0.8, 1.0, 0.1, 0.0],
                       [0.9, 0.1, 1.0, 0.0],
                       [0.0, 0.0, 0.0, 1.0]])
    got = visual_neighbors(ti, ii, k=2)
    assert ti.argmax().item() == 0 and got.argmax().item() == 1
    assert got[0, 1].item() == pytest.approx(0.79 + 1.0) and got[0, 0].item() == pytest.approx(0.80 + 1 / 3)


def test_visual_neighbors_errors():
    ti, ii = torch.zeros(3, 4), torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"k=5 must be between 1 and 4 \(the number of gallery images\)"):
        visual_neighbors(ti, ii, k=5)
    with pytest.raises(ValueError, match=r"image_image_sim must be \[4, 4\] .* got \(3, 3\)"):
        visual_neighbors(ti, torch.zeros(3, 3), k=2)
    with pytest.raises(TypeError, match="k must be an integer"):
        visual_neighbors(ti, ii, k=2.0)
    with pytest.raises(ValueError, match="chunk_size=0 must be between 1"):
        visual_neighbors(ti, ii, k=2, chunk_size=0)
    assert visual_neighbors(ti, ii, k=np.int64(2)).shape == (3, 4)
    bad = ti.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="text_image_sim contains NaN"):
        visual_neighbors(bad, ii, k=2)


def test_stable_topk_orders_ties_by_index():
    rng = np.random.default_rng(1)
    scores = np.round(rng.standard_normal((40, 30)), 0)
    got = stable_topk(torch.from_numpy(scores), 7).tolist()
    assert got == [top(row, 7) for row in scores.tolist()]


# ----------------------------------------------------------------------------------------------
# k_reciprocal
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k1,k2,lam,chunk", [(4, 3, 0.3, None), (6, 1, 0.3, 7), (3, 6, 0.0, 1), (20, 6, 0.5, None)])
def test_k_reciprocal_matches_loop(k1, k2, lam, chunk):
    t, g, _, _ = clustered(2, n_ids=4, texts_per_id=3, images_per_id=4)  # 12 texts x 16 images
    g = g[:15]
    qg, qq, gg = t @ g.T, t @ t.T, g @ g.T
    want, grew = k_reciprocal_loop(qg, qq, gg, k1, k2, lam)
    got = k_reciprocal(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam, chunk_size=chunk, form="paper")
    assert got.shape == (12, 15) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    if k1 in (4, 6):
        assert grew > 0  # the 1/2 k-reciprocal expansion was exercised


@pytest.mark.parametrize("k1,k2,lam,chunk", [(4, 3, 0.3, None), (6, 1, 0.3, 7), (3, 6, 0.0, 1), (20, 6, 0.5, None)])
def test_k_reciprocal_released_matches_loop(k1, k2, lam, chunk):
    t, g, _, _ = clustered(2, n_ids=4, texts_per_id=3, images_per_id=4)
    g = g[:15]
    qg, qq, gg = t @ g.T, t @ t.T, g @ g.T
    want, _ = k_reciprocal_loop(qg, qq, gg, k1, k2, lam, released=True)
    got = k_reciprocal(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam, chunk_size=chunk)  # released is the default
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert torch.equal(got, k_reciprocal(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam, form="released"))
    paper, _ = k_reciprocal_loop(qg, qq, gg, k1, k2, lam)
    assert np.abs(paper - want).max() > 1e-3  # the two forms really differ on these inputs


def test_k_reciprocal_released_random_similarities():
    # Symmetric, as similarities are: the released code's transpose would otherwise swap rows and columns.
    rng = np.random.default_rng(7)
    qg = rng.uniform(-1, 1, (9, 11))
    qq, gg = rng.uniform(-1, 1, (9, 9)), rng.uniform(-1, 1, (11, 11))
    qq, gg = (qq + qq.T) / 2, (gg + gg.T) / 2
    want, _ = k_reciprocal_loop(qg, qq, gg, 4, 2, 0.3, released=True)
    got = k_reciprocal(qg, qq, gg, k1=4, k2=2, chunk_size=3)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)


def test_k_reciprocal_float32_and_random_similarities():
    rng = np.random.default_rng(3)
    qg = rng.uniform(-1, 1, (12, 15)).astype(np.float32)
    qq = rng.uniform(-1, 1, (12, 12)).astype(np.float32)
    gg = rng.uniform(-1, 1, (15, 15)).astype(np.float32)
    want, _ = k_reciprocal_loop(qg, qq, gg, 5, 3, 0.3)
    got = k_reciprocal(qg, qq, gg, k1=5, k2=3, form="paper")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_k_reciprocal_lambda_one_is_original_distance():
    t, g, _, _ = clustered(4)
    qg = t @ g.T
    got = k_reciprocal(qg, t @ t.T, g @ g.T, k1=4, k2=2, lambda_value=1.0, form="paper")
    np.testing.assert_allclose(got.numpy(), (-(2 - 2 * qg)).numpy(), rtol=0, atol=1e-12)


def test_k_reciprocal_improves_ranking_on_clustered_data():
    # Three captions and four images per person, noisy: the neighbourhoods carry identity, so the
    # re-ranked scores rank true images higher than the raw cosine does.
    t, g, tid, gid = clustered(5, n_ids=12, texts_per_id=3, images_per_id=4, dim=16, noise=0.9)
    qg = t @ g.T
    before = rank_metrics(qg, tid, gid)
    for form in ("released", "paper"):
        after = rank_metrics(k_reciprocal(qg, t @ t.T, g @ g.T, k1=6, k2=3, form=form), tid, gid)
        assert after["mAP"] > before["mAP"] + 3 and after["mINP"] > before["mINP"] + 3
        assert after["R1"] >= before["R1"]


def unit_vectors(degrees):
    """2-D unit vectors at the given angles."""
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], dim=1)


def test_k_reciprocal_fixes_a_wrong_top1():
    # Query text 0 (10 deg) is 10 deg from distractor image 0 (person B, 0 deg) and 10.5 deg from its
    # true image 2 (person A, 20.5 deg). Person B's samples crowd around 0 deg, so the query is not
    # among image 0's k1 nearest: they are not k-reciprocal, while the query and image 2 are.
    texts = unit_vectors([10.0, -1.0, -3.0, 23.0])
    images = unit_vectors([0.0, -2.0, 20.5, 25.0])
    qg = texts @ images.T
    got = k_reciprocal(qg, texts @ texts.T, images @ images.T, k1=3, k2=1, form="paper")
    assert qg[0].argmax().item() == 0 and got[0].argmax().item() == 2
    # Image 0 shares nothing with the query's k-reciprocal set: its Jaccard distance is 1.
    assert got[0, 0].item() == pytest.approx(-(0.7 + 0.3 * (2 - 2 * qg[0, 0].item())))


def test_k_reciprocal_errors():
    qg, qq, gg = torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"k1=5 must be between 1 and 4"):
        k_reciprocal(qg, qq, gg, k1=5)
    with pytest.raises(ValueError, match=r"k2=6 must be between 1 and 5"):
        k_reciprocal(qg, qq, gg, k1=2, k2=6)
    with pytest.raises(ValueError, match=r"q_q_sim must be \[2, 2\] .* got \(3, 3\)"):
        k_reciprocal(qg, gg, gg, k1=2, k2=2)
    with pytest.raises(ValueError, match=r"g_g_sim must be \[3, 3\]"):
        k_reciprocal(qg, qq, qq, k1=2, k2=2)
    with pytest.raises(ValueError, match=r"lambda_value must lie in \[0, 1\]"):
        k_reciprocal(qg, qq, gg, k1=2, k2=2, lambda_value=1.5)
    with pytest.raises(ValueError, match="g_g_sim contains NaN or infinite"):
        k_reciprocal(qg, qq, torch.full((3, 3), float("inf")), k1=2, k2=2)
    with pytest.raises(ValueError, match=r"form must be one of \['released', 'paper'\], got 'text'"):
        k_reciprocal(qg, qq, gg, k1=2, k2=2, form="text")
