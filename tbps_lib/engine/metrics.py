"""Retrieval metrics of the TBPS protocol: Rank-K, mAP and mINP, computed exactly in chunks.

Every paper in the workbook reports text-to-image Rank-1/5/10 (LAIP adds mAP); mINP (Ye et al.,
"Deep Learning for Person Re-identification", TPAMI 2021) measures how hard the last true match is to
find. Definitions (``CONTRIBUTING.md``, "Protocol rules"), for one query whose gallery holds ``m`` hits
(images of the same person) at 1-based ranks ``r_1 < ... < r_m``:

* R@K  = 1 if ``r_1 <= K`` else 0;
* AP   = (1/m) * sum_i  i / r_i           (precision at the rank of each hit);
* INP  = m / r_m                          (hits over the rank of the last hit).

Each is averaged over queries and reported in percent. Ranks come from sorting the gallery by
decreasing similarity with ties broken by gallery index (lower index first), so results are
deterministic and independent of the sort algorithm.

Speed and memory: no [n_queries, n_gallery] rank matrix is ever built. Queries are processed in
chunks of rows; inside a chunk the rank of each hit is ``1 + #(scores > hit score) + #(equal scores
at a lower gallery index)``. Counting costs two vectorised passes over the row per hit (about 2-3 hits
per query in CUHK-PEDES), far less than a sort; queries are visited by increasing hit count so a
chunk wastes no passes on padding. A chunk whose queries have many hits (more than
``SORT_ABOVE_HITS``) is ranked with a stable argsort instead. Both give identical ranks.
Counting runs in NumPy, whose comparisons and counts are single-threaded but steady (torch's
threaded reductions were several times slower and erratic on a busy 2-core machine); CUDA tensors
are copied to the host one chunk at a time.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

ScoreMatrix = Union[torch.Tensor, np.ndarray]
PidArray = Union[torch.Tensor, np.ndarray, Sequence[int]]

#: The metrics ``rank_metrics`` returns with the default cut-offs, in the order tables show them: the one
#: tuple of metric names (run listings, the CLI, checkpoint selection and the reported tables use it).
METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")

#: A chunk whose largest number of hits per query exceeds this is ranked by a stable argsort
#: (cost ~ log n per element) rather than by counting (cost ~ 2 passes per hit).
SORT_ABOVE_HITS = 48

#: Default number of similarity entries per chunk (4 MiB of float32): small enough to stay in cache
#: while each hit's counting pass re-reads the chunk.
CHUNK_ELEMENTS = 1 << 20


def as_score_matrix(scores: ScoreMatrix, name: str) -> torch.Tensor:
    """Return ``scores`` as a 2-D floating-point tensor without copying it.

    Accepts a torch tensor (any float dtype, any device) or a NumPy array; nested lists are turned
    into a float64 array. Raises ``TypeError``/``ValueError`` naming ``name`` for anything else.
    """
    if isinstance(scores, (list, tuple)):
        scores = np.asarray(scores, dtype=np.float64)
    if isinstance(scores, np.ndarray):
        if not np.issubdtype(scores.dtype, np.floating):
            raise TypeError(f"{name} must hold floating-point scores, got NumPy dtype {scores.dtype}")
        if any(s < 0 for s in scores.strides):
            scores = np.ascontiguousarray(scores)  # torch cannot view negative strides
        with warnings.catch_warnings():  # read-only arrays are fine: scores are never written to
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            scores = torch.from_numpy(scores)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must hold floating-point scores, got dtype {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(scores.shape)}")
    return scores.detach()


def _as_pids(pids: PidArray, name: str, expected: int, what: str) -> np.ndarray:
    """Person ids as a 1-D int64 array of length ``expected`` (the matching similarity axis)."""
    if isinstance(pids, torch.Tensor):
        pids = pids.detach().cpu().numpy()
    arr = np.asarray(pids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer person ids, got dtype {arr.dtype}")
    if arr.shape[0] != expected:
        raise ValueError(f"{name} has {arr.shape[0]} entries but similarity has {expected} {what}")
    return arr.astype(np.int64, copy=False)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Validate the Rank-K cut-offs: a non-empty sequence of distinct positive integers."""
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one Rank-K cut-off, e.g. (1, 5, 10)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must be positive integers, got {k!r} in {ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat a cut-off, got {ks}")
    return tuple(int(k) for k in ks)


def _hit_lists(query_pids: np.ndarray, gallery_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each query's hits are: ``order[start[q] : start[q] + count[q]]`` are its gallery indices.

    ``order`` is a stable argsort of the gallery ids, so each query's hits come in increasing
    gallery index.
    """
    order = np.argsort(gallery_pids, kind="stable")
    sorted_pids = gallery_pids[order]
    start = np.searchsorted(sorted_pids, query_pids, side="left")
    count = np.searchsorted(sorted_pids, query_pids, side="right") - start
    return order, start, count


def _count_ranks(scores: np.ndarray, hit_idx: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """1-based rank of each hit by counting: 1 + #greater + #equal at a lower gallery index."""
    n_gallery = scores.shape[1]
    hit_scores = np.take_along_axis(scores, hit_idx, axis=1)
    ranks = np.empty(hit_idx.shape, dtype=np.int64)
    buf = np.empty(scores.shape, dtype=bool)
    for a in range(hit_idx.shape[1]):
        thr = hit_scores[:, a:a + 1]
        n_gt = np.count_nonzero(np.greater(scores, thr, out=buf), axis=1)
        n_ge = np.count_nonzero(np.greater_equal(scores, thr, out=buf), axis=1)
        ranks[:, a] = n_gt + 1
        tied = np.flatnonzero((n_ge - n_gt > 1) & valid[:, a])  # another entry equals the hit score
        if tied.size:
            earlier = np.arange(n_gallery)[None, :] < hit_idx[tied, a][:, None]
            ranks[tied, a] += np.count_nonzero((scores[tied] == thr[tied]) & earlier, axis=1)
    return ranks


def _sort_ranks(scores: np.ndarray, hit_idx: np.ndarray) -> np.ndarray:
    """1-based rank of each hit from a stable argsort of the negated scores (ties: lower index first)."""
    n_gallery = scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.broadcast_to(np.arange(n_gallery), order.shape), axis=1)
    return np.take_along_axis(position, hit_idx, axis=1) + 1


def _chunk_scores(sim: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """The given query rows as a contiguous host float32/float64 array (half types widen exactly)."""
    if sim.device.type == "cpu" and sim.dtype in (torch.float32, torch.float64):
        block = sim.numpy()[rows]  # NumPy's row gather is a plain copy, no thread start-up
    else:
        block = sim[torch.from_numpy(rows).to(sim.device)]
        block = (block if block.dtype == torch.float64 else block.float()).cpu().numpy()
    block = np.ascontiguousarray(block)  # a transposed input gathers into column-major order
    if np.isnan(block).any():
        bad = int(rows[np.flatnonzero(np.isnan(block).any(axis=1))].min())
        raise ValueError(f"similarity contains NaN (in query row {bad}); ranks would be undefined")
    return block


def _accumulate(ranks: np.ndarray, valid: np.ndarray, ks: tuple[int, ...], totals: dict[str, float]) -> None:
    """Add the chunk's per-query R@K hits, AP and INP (rows with at least one hit) to ``totals``."""
    n_hits = valid.sum(axis=1)
    keep = n_hits > 0
    ranks, valid, n_hits = ranks[keep], valid[keep], n_hits[keep]
    if not ranks.size:
        return
    ranks = np.sort(np.where(valid, ranks, np.iinfo(np.int64).max), axis=1)  # hits in ranked order
    order_pos = np.arange(1, ranks.shape[1] + 1)
    precision = np.where(order_pos <= n_hits[:, None], order_pos / ranks, 0.0)
    last = ranks[np.arange(len(ranks)), n_hits - 1]
    for k in ks:
        totals[f"R{k}"] += float(np.count_nonzero(ranks[:, 0] <= k))
    totals["mAP"] += float((precision.sum(axis=1) / n_hits).sum())
    totals["mINP"] += float((n_hits / last).sum())


def rank_metrics(similarity: ScoreMatrix, query_pids: PidArray, gallery_pids: PidArray,
                 ks: Sequence[int] = (1, 5, 10), chunk_size: int | None = None,
                 allow_missing: bool = False) -> dict[str, float]:
    """Rank-K, mAP and mINP (percent) of ranking each query's gallery row by decreasing similarity.

    Args:
        similarity: [n_queries, n_gallery] scores, higher = more similar; a torch tensor (any float
            dtype, CPU or CUDA) or a NumPy array. For image-to-text retrieval pass the transpose.
        query_pids, gallery_pids: 1-D integer person ids; a hit is a gallery entry with the query's id.
        ks: Rank-K cut-offs; one key ``"R{k}"`` each.
        chunk_size: queries per chunk (default: about ``CHUNK_ELEMENTS`` scores per chunk).
        allow_missing: if False, a query without any hit in the gallery is an error (the TBPS
            protocol always has one). If True such queries are left out of every mean, and the
            result gains ``"n_queries"`` (queries evaluated) and ``"n_without_hit"`` (left out).

    Returns:
        ``{"R1": ..., "R5": ..., "R10": ..., "mAP": ..., "mINP": ...}`` as Python floats in percent
        (plus the two counts when ``allow_missing``). Ties rank the lower gallery index first.
    """
    sim = as_score_matrix(similarity, "similarity")
    n_queries, n_gallery = sim.shape
    if n_queries == 0 or n_gallery == 0:
        raise ValueError(f"similarity must have at least one query and one gallery entry, got {tuple(sim.shape)}")
    qp = _as_pids(query_pids, "query_pids", n_queries, "rows (queries)")
    gp = _as_pids(gallery_pids, "gallery_pids", n_gallery, "columns (gallery entries)")
    ks = _check_ks(ks)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // n_gallery)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    order, start, count = _hit_lists(qp, gp)
    n_missing = int(np.count_nonzero(count == 0))
    if n_missing == n_queries or (n_missing and not allow_missing):
        raise ValueError(
            f"{n_missing} of {n_queries} queries have no gallery entry with their person id"
            + ("" if n_missing == n_queries else "; pass allow_missing=True to leave them out"))

    totals = {**{f"R{k}": 0.0 for k in ks}, "mAP": 0.0, "mINP": 0.0}
    # Visit queries by increasing number of hits, so a chunk's queries need about the same number
    # of counting passes (a chunk pads every query to its largest hit count).
    by_hits = np.argsort(count, kind="stable")[n_missing:]
    for lo in range(0, len(by_hits), chunk_size):
        rows = by_hits[lo:lo + chunk_size]
        counts = count[rows]
        width = int(counts.max())
        slots = np.arange(width)
        valid = slots[None, :] < counts[:, None]
        hit_idx = order[np.minimum(start[rows, None] + slots[None, :], n_gallery - 1)]
        hit_idx = np.where(valid, hit_idx, 0)  # padding points at entry 0; masked out below
        scores = _chunk_scores(sim, rows)
        if width > SORT_ABOVE_HITS:
            ranks = _sort_ranks(scores, hit_idx)
        else:
            ranks = _count_ranks(scores, hit_idx, valid)
        _accumulate(ranks, valid, ks, totals)

    n_eval = n_queries - n_missing
    result = {key: 100.0 * value / n_eval for key, value in totals.items()}
    if allow_missing:
        result.update(n_queries=n_eval, n_without_hit=n_missing)
    return result
