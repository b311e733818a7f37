"""rank_metrics: known answers, agreement with a slow loop version, tie rule, chunking and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tbps_lib.engine import metrics
from tbps_lib.engine.metrics import rank_metrics


def loop_metrics(sim, query_pids, gallery_pids, ks=(1, 5, 10)):
    """Obviously-correct version: sort each row by (-score, index), walk it, average in percent."""
    sums = {**{f"R{k}": 0.0 for k in ks}, "mAP": 0.0, "mINP": 0.0}
    n_eval = 0
    for row, pid in zip(sim, query_pids):
        ranking = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))
        hit_ranks = [r + 1 for r, j in enumerate(ranking) if gallery_pids[j] == pid]
        if not hit_ranks:
            continue
        n_eval += 1
        for k in ks:
            sums[f"R{k}"] += hit_ranks[0] <= k
        sums["mAP"] += sum((i + 1) / r for i, r in enumerate(hit_ranks)) / len(hit_ranks)
        sums["mINP"] += len(hit_ranks) / hit_ranks[-1]
    return {key: 100.0 * v / n_eval for key, v in sums.items()}


def assert_close(got, want):
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def random_case(rng, n_q=37, n_g=23, n_ids=6, quantise=False):
    """Random scores and ids where every query id appears in the gallery."""
    gallery_pids = rng.integers(0, n_ids, n_g)
    gallery_pids[:n_ids] = np.arange(n_ids)
    query_pids = rng.integers(0, n_ids, n_q)
    sim = rng.standard_normal((n_q, n_g)).astype(np.float32)
    if quantise:  # many exact ties
        sim = np.round(sim * 2) / 2
    return sim, query_pids, gallery_pids


def test_known_answer():
    # Hits at gallery 1 and 3 rank 2nd and 4th: AP = (1/2 + 2/4) / 2, INP = 2 / 4.
    sim = np.array([[0.9, 0.8, 0.7, 0.6]], dtype=np.float32)
    got = rank_metrics(sim, [7], [3, 7, 3, 7], ks=(1, 2, 3))
    assert got == {"R1": 0.0, "R2": 100.0, "R3": 100.0, "mAP": 50.0, "mINP": 50.0}
    assert all(type(v) is float for v in got.values())


def test_ties_rank_lower_gallery_index_first():
    sim = np.zeros((2, 5), dtype=np.float32)
    # Query 0's hit is gallery 0 (rank 1); query 1's hit is gallery 4 (rank 5 among five equal scores).
    got = rank_metrics(sim, [0, 1], [0, 2, 2, 2, 1], ks=(1, 5))
    assert got["R1"] == 50.0 and got["R5"] == 100.0
    assert got["mAP"] == pytest.approx(100.0 * (1 + 1 / 5) / 2)


@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_matches_loop_version(quantise, chunk_size):
    rng = np.random.default_rng(3)
    sim, qp, gp = random_case(rng, quantise=quantise)
    assert_close(rank_metrics(sim, qp, gp, chunk_size=chunk_size), loop_metrics(sim, qp, gp))


@pytest.mark.parametrize("quantise", [False, True])
def test_sort_path_matches_counting_path(monkeypatch, quantise):
    rng = np.random.default_rng(4)
    sim, qp, gp = random_case(rng, quantise=quantise)
    counted = rank_metrics(sim, qp, gp, chunk_size=5)
    monkeypatch.setattr(metrics, "SORT_ABOVE_HITS", 0)
    sorted_ = rank_metrics(sim, qp, gp, chunk_size=5)
    assert counted == sorted_
    assert_close(sorted_, loop_metrics(sim, qp, gp))


def test_many_hits_use_sort_path_and_agree():
    rng = np.random.default_rng(5)
    n_g = metrics.SORT_ABOVE_HITS + 30
    gp = np.r_[np.zeros(metrics.SORT_ABOVE_HITS + 10, dtype=int), np.arange(1, 21)]
    qp = np.array([0, 0, 3, 0, 7])
    sim = np.round(rng.standard_normal((5, n_g)), 1).astype(np.float32)
    assert_close(rank_metrics(sim, qp, gp, ks=(1, 5, 50)), loop_metrics(sim, qp, gp, ks=(1, 5, 50)))


def test_image_to_text_transpose_and_input_types():
    rng = np.random.default_rng(6)
    sim, qp, gp = random_case(rng, n_q=30, n_g=30, n_ids=5)
    want_i2t = loop_metrics(sim.T, gp, qp)
    assert_close(rank_metrics(sim.T, gp, qp), want_i2t)  # strided NumPy view
    assert_close(rank_metrics(torch.from_numpy(sim).T, torch.from_numpy(gp), list(qp)), want_i2t)
    want = loop_metrics(sim, qp, gp)
    assert_close(rank_metrics(torch.tensor(sim, requires_grad=True), qp, gp), want)
    assert_close(rank_metrics(sim.astype(np.float64).tolist(), qp, gp), want)
    readonly = sim.copy()
    readonly.flags.writeable = False
    assert_close(rank_metrics(readonly, qp, gp), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_rank_their_own_values(dtype):
    rng = np.random.default_rng(7)
    sim, qp, gp = random_case(rng)
    low = torch.from_numpy(sim).to(dtype)  # rounding creates ties; ranks follow the rounded values
    assert_close(rank_metrics(low, qp, gp), loop_metrics(low.double().numpy(), qp, gp))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor():
    rng = np.random.default_rng(8)
    sim, qp, gp = random_case(rng)
    assert_close(rank_metrics(torch.from_numpy(sim).cuda(), torch.from_numpy(qp).cuda(), gp),
                 loop_metrics(sim, qp, gp))


def test_query_without_hit_is_an_error_unless_allowed():
    rng = np.random.default_rng(9)
    sim, qp, gp = random_case(rng, n_q=10)
    qp[[2, 5]] = 99
    with pytest.raises(ValueError, match=r"2 of 10 queries have no gallery entry .*allow_missing=True"):
        rank_metrics(sim, qp, gp)
    got = rank_metrics(sim, qp, gp, allow_missing=True, chunk_size=3)
    keep = qp != 99
    assert_close(got, loop_metrics(sim[keep], qp[keep], gp))
    assert got["n_queries"] == 8 and got["n_without_hit"] == 2
    with pytest.raises(ValueError, match="10 of 10 queries"):
        rank_metrics(sim, np.full(10, 99), gp, allow_missing=True)


def test_shape_and_argument_errors():
    sim = np.zeros((3, 4), dtype=np.float32)
    qp, gp = [0, 1, 2], [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(4,\)"):
        rank_metrics(np.zeros(4, dtype=np.float32), qp, gp)
    with pytest.raises(ValueError, match=r"query_pids has 2 entries but similarity has 3 rows"):
        rank_metrics(sim, [0, 1], gp)
    with pytest.raises(ValueError, match=r"gallery_pids has 5 entries but similarity has 4 columns"):
        rank_metrics(sim, qp, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="gallery_pids must be 1-D"):
        rank_metrics(sim, qp, np.zeros((2, 2), dtype=int))
    with pytest.raises(TypeError, match="query_pids must hold integer person ids"):
        rank_metrics(sim, [0.0, 1.0, 2.0], gp)
    with pytest.raises(TypeError, match="similarity must hold floating-point scores"):
        rank_metrics(np.zeros((3, 4), dtype=np.int64), qp, gp)
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        rank_metrics("scores", qp, gp)
    with pytest.raises(ValueError, match="at least one query"):
        rank_metrics(np.zeros((0, 4), dtype=np.float32), [], gp)
    with pytest.raises(ValueError, match="ks must be positive integers"):
        rank_metrics(sim, qp, gp, ks=(1, 0))
    with pytest.raises(ValueError, match="must not repeat"):
        rank_metrics(sim, qp, gp, ks=(1, 1))
    with pytest.raises(ValueError, match="at least one Rank-K"):
        rank_metrics(sim, qp, gp, ks=())
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        rank_metrics(sim, qp, gp, chunk_size=0)
    bad = sim.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN .*query row 2"):
        rank_metrics(bad, qp, gp)
