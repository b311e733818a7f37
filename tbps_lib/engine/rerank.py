"""Test-time re-ranking of text-to-image scores: NAFS-style visual neighbours and k-reciprocal encoding.

Both functions take similarity matrices (higher = more similar), return re-ranked scores of the same
shape as the text-to-image matrix (higher = better), and never build more than a chunk of any
all-by-all matrix: neighbour sets are kept as index lists and compared through inverted indices
(for each gallery index, the samples whose neighbour set contains it), so the work grows with the
number of neighbours rather than with the gallery size.

Neighbour lists are "top-m by similarity, ties to the lower index", the same order
``tbps_lib.engine.metrics`` ranks by, so results are deterministic.
"""
from __future__ import annotations

import math
import numbers

import torch

from tbps_lib.engine.metrics import ScoreMatrix, as_score_matrix

#: Default number of matrix entries handled per chunk (16 MiB of float32).
CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores of each row, best first, ties broken by lower index.

    ``torch.topk`` is fast but picks an arbitrary subset among equal scores at the cut; rows where
    the (k+1)-th best score equals the k-th are redone exactly, which is rare for real features.
    """
    n = scores.shape[1]
    values, idx = scores.topk(min(k + 1, n), dim=1)
    kth = values[:, k - 1:k]
    ambiguous = (values[:, k] == values[:, k - 1]).nonzero().flatten() if k < n else idx[:0, 0]
    idx = idx[:, :k]
    if ambiguous.numel():
        sub, cut = scores[ambiguous], kth[ambiguous]
        above, tied = sub > cut, sub == cut
        need = k - above.sum(dim=1, keepdim=True)
        take = above | (tied & (tied.cumsum(dim=1) <= need))
        idx[ambiguous] = take.nonzero()[:, 1].view(-1, k)
    idx = idx.sort(dim=1).values  # increasing index, so the stable sort below keeps lower index first
    best_first = scores.gather(1, idx).sort(dim=1, descending=True, stable=True).indices
    return idx.gather(1, best_first)


def _csr(keys: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group entries by key: ``order[ptr[v]:ptr[v + 1]]`` are the positions of the entries with key v."""
    order = torch.argsort(keys, stable=True)
    ptr = torch.zeros(n_keys + 1, dtype=torch.long, device=keys.device)
    ptr[1:] = torch.cumsum(torch.bincount(keys, minlength=n_keys), dim=0)
    return order, ptr


def _expand(ptr: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All (owner, slot) pairs with ``slot`` in ``ptr[keys[owner]] .. ptr[keys[owner] + 1] - 1``.

    This is the inverted-index walk: for every key asked about, list every entry stored under it.
    """
    starts = ptr[keys]
    counts = ptr[keys + 1] - starts
    owner = torch.repeat_interleave(torch.arange(keys.numel(), device=keys.device), counts)
    first = torch.cumsum(counts, dim=0) - counts
    slot = starts[owner] + torch.arange(owner.numel(), device=keys.device) - first[owner]
    return owner, slot


def _check_finite(*named: tuple[str, torch.Tensor]) -> None:
    """Raise if any matrix holds NaN or infinity (neighbour sets would be undefined).

    A finite sum proves every entry finite in one cheap pass; only otherwise is each entry checked
    (a sum can also overflow on huge but finite scores).
    """
    for name, x in named:
        if not math.isfinite(x.sum().item()) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite scores")


def _check_count(name: str, value: int, low: int, high: int, what: str) -> None:
    """Raise unless ``low <= value <= high`` and ``value`` is an integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}={value} must be between {low} and {high} ({what})")


def _chunk_rows(chunk_size: int | None, row_length: int) -> int:
    """Rows per chunk: ``chunk_size`` if given (a positive integer), else about ``CHUNK_ELEMENTS`` entries."""
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // row_length)
    _check_count("chunk_size", chunk_size, 1, 2**62, "rows per chunk")
    return int(chunk_size)


def _work_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are widened)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ----------------------------------------------------------------------------------------------
# NAFS-style visual-neighbour re-ranking
# ----------------------------------------------------------------------------------------------
def visual_neighbors(text_image_sim: ScoreMatrix, image_image_sim: ScoreMatrix, k: int = 5,
                     weight: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """Re-rank text-to-image scores with the overlap of textual and visual neighbourhoods ("+R").

    The Sew and ACSA papers re-rank "following NAFS": a text and an image that retrieve the same
    images are more likely to match. For text ``t`` let ``A_t`` be its top-``k`` gallery images
    (from ``text_image_sim``); for image ``g`` let ``B_g`` be its top-``k`` visual neighbours (from
    ``image_image_sim``, the image itself included, as it is normally its own highest-similarity
    entry). The re-ranked score is::

        s'(t, g) = s(t, g) + weight * |A_t & B_g| / |A_t | B_g|
                 = s(t, g) + weight * inter / (2k - inter),   since |A_t| = |B_g| = k.

    Note on the public NAFS code: it compares a text's top-k *gallery indices* with neighbour lists
    that are indexed differently, so the two sets it intersects live in mismatched index spaces.
    Here both sets are gallery indices, which is the evident intent of the method.

    Args:
        text_image_sim: [n_texts, n_images] similarities.
        image_image_sim: [n_images, n_images] similarities among the gallery images.
        k: neighbourhood size (1 <= k <= n_images).
        weight: scale of the Jaccard term (1: add the plain overlap, which lies in [0, 1]).
        chunk_size: texts per chunk (default: about ``CHUNK_ELEMENTS`` scores per chunk).

    Returns:
        [n_texts, n_images] re-ranked scores (float32, or float64 for float64 input), on the input's device.
    """
    ti = as_score_matrix(text_image_sim, "text_image_sim")
    ii = as_score_matrix(image_image_sim, "image_image_sim")
    n_texts, n_images = ti.shape
    if tuple(ii.shape) != (n_images, n_images):
        raise ValueError(f"image_image_sim must be [{n_images}, {n_images}] to match the {n_images} columns "
                         f"(images) of text_image_sim, got {tuple(ii.shape)}")
    _check_count("k", k, 1, n_images, "the number of gallery images")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight!r}")
    _check_finite(("text_image_sim", ti), ("image_image_sim", ii))
    chunk_size = _chunk_rows(chunk_size, n_images)
    dtype = _work_dtype(ti, ii)
    out = ti.to(dtype, copy=True)                                     # s(t, g); the term is added below
    ii = ii.to(dtype)

    # Inverted index of the visual neighbourhoods: for gallery index l, the images g with l in B_g.
    neighbours = stable_topk(ii, k).flatten()                        # B_g, row-major over g
    order, ptr = _csr(neighbours, n_images)
    holder = torch.div(order, k, rounding_mode="floor")               # the g owning each entry

    flat = out.view(-1)
    for lo in range(0, n_texts, chunk_size):
        # These rows still hold the original scores: each chunk only changes its own rows, below.
        top = stable_topk(out[lo:lo + chunk_size], k).flatten()     # A_t, row-major over t
        owner, slot = _expand(ptr, top)                               # every (l in A_t, g with l in B_g)
        text = lo + torch.div(owner, k, rounding_mode="floor")
        pairs, inter = torch.unique(text * n_images + holder[slot], return_counts=True)
        inter = inter.to(dtype)                                       # |A_t & B_g| where non-zero
        flat.index_add_(0, pairs, weight * inter / (2 * k - inter))
    return out


# ----------------------------------------------------------------------------------------------
# k-reciprocal encoding (Zhong et al., CVPR 2017)
# ----------------------------------------------------------------------------------------------
#: The two forms of :func:`k_reciprocal`: the authors' released code (default) and the paper's text.
K_RECIPROCAL_FORMS = ("released", "paper")

class _JointSimilarity:
    """The (Q+G) x (Q+G) similarity [[q_q, q_g], [q_g^T, g_g]], served by rows or by entries
    without ever being stored."""

    def __init__(self, q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor) -> None:
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.n_q = q_g.shape[0]

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` of the joint matrix."""
        parts = []
        if lo < self.n_q:
            top = min(hi, self.n_q)
            parts.append(torch.cat([self.q_q[lo:top], self.q_g[lo:top]], dim=1))
        if hi > self.n_q:
            a, b = max(lo, self.n_q) - self.n_q, hi - self.n_q
            parts.append(torch.cat([self.q_g[:, a:b].T, self.g_g[a:b]], dim=1))
        return torch.cat(parts, dim=0)

    def entries(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Joint similarities at the index pairs ``(i[e], j[e])``."""
        n = self.n_q
        out = torch.empty(i.shape, dtype=self.q_g.dtype, device=i.device)
        iq, jq = i < n, j < n
        for mask, block, di, dj in ((iq & jq, self.q_q, 0, 0), (iq & ~jq, self.q_g, 0, n),
                                    (~iq & ~jq, self.g_g, n, n)):
            out[mask] = block[i[mask] - di, j[mask] - dj]
        mask = ~iq & jq                                               # gallery row, query column
        out[mask] = self.q_g[j[mask], i[mask] - n]
        return out


def _distance(sim: torch.Tensor) -> torch.Tensor:
    """Original distance from cosine similarity: squared Euclidean distance of unit vectors, 2 - 2s.

    This is the paper's Mahalanobis form (x_p - x_g)^T M (x_p - x_g) with M = I.
    """
    return 2.0 - 2.0 * sim


def _reciprocal(ranked: torch.Tensor, chunk: int) -> torch.Tensor:
    """R(p, k): keep neighbour g of p only if p is among g's own list; the rest becomes -1.

    ``ranked`` [N, m] holds each sample's m nearest samples (itself normally first).
    """
    out = ranked.clone()
    for lo in range(0, ranked.shape[0], chunk):
        block = ranked[lo:lo + chunk]
        me = torch.arange(lo, lo + block.shape[0], device=ranked.device)[:, None, None]
        mutual = (ranked[block] == me).any(dim=2)
        out[lo:lo + chunk][~mutual] = -1
    return out


def _expanded_sets(recip: torch.Tensor, recip_half: torch.Tensor,
                   chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R*(p, k): R(p, k) joined with every R(q, k/2), q in R(p, k), that shares at least 2/3 of
    its members with R(p, k) (the paper's robust k-reciprocal expansion, Sec. 3.2).

    Returns the (p, member) index pairs of all sets, each member listed once.
    """
    rows, cols = [], []
    for lo in range(0, recip.shape[0], chunk):
        own = recip[lo:lo + chunk]                                    # [c, m], -1 = absent
        cand = recip_half[own.clamp(min=0)]                           # [c, m, h]
        cand = torch.where((own >= 0)[..., None], cand, -1)
        shared = ((cand[..., None] == own[:, None, None, :]) & (cand[..., None] >= 0)).any(dim=3)
        size = (cand >= 0).sum(dim=2)
        accept = (own >= 0) & (3 * shared.sum(dim=2) >= 2 * size)     # |R ∩ R_half| >= 2/3 |R_half|
        extra = torch.where(accept[..., None], cand, -1).flatten(1)
        members = torch.cat([own, extra], dim=1).sort(dim=1).values
        first = torch.ones_like(members, dtype=torch.bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        r, c = (first & (members >= 0)).nonzero(as_tuple=True)
        rows.append(r + lo)
        cols.append(members[r, c])
    return torch.cat(rows), torch.cat(cols)


def _query_expansion(v: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Local query expansion: replace each V_p by the mean of V over its ``k2`` nearest samples
    (p itself included). ``v`` is a coalesced sparse COO matrix; so is the result."""
    n, k2 = nearest.shape
    rows = v.indices()[0]
    _, ptr = _csr(rows, n)                                            # coalesced: already row-sorted
    owner, slot = _expand(ptr, nearest.flatten())
    p = torch.div(owner, k2, rounding_mode="floor")
    idx = torch.stack([p, v.indices()[1][slot]])
    return torch.sparse_coo_tensor(idx, v.values()[slot] / k2, v.shape, check_invariants=False).coalesce()


def _row_chunks(costs: torch.Tensor, budget: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose summed cost stays within ``budget`` (at least one row each)."""
    bounds, lo, n = [], 0, costs.numel()
    cum = torch.cumsum(costs, dim=0).tolist()
    while lo < n:
        base = cum[lo - 1] if lo else 0
        hi = lo + 1
        while hi < n and hi - lo < max_rows and cum[hi] - base <= budget:
            hi += 1
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _jaccard_distance_into(v: torch.Tensor, n_q: int, out: torch.Tensor,
                           scale: float, budget: int) -> None:
    """Add ``scale * d_J(p, g)`` to ``out`` [Q, G] for every query p and gallery sample g.

    Jaccard distance of the weighted sets (Zhong et al., Sec. 3.3): d_J = 1 - sum_j min(V_pj, V_gj) /
    sum_j max(V_pj, V_gj), with sum max = |V_p|_1 + |V_g|_1 - sum min. Only columns j where V_p is
    non-zero can contribute, so each query walks the inverted index of the gallery rows over its
    own non-zero columns.
    """
    n_g = out.shape[1]
    idx, val = v.indices(), v.values()
    row_sum = torch.zeros(v.shape[0], dtype=val.dtype, device=val.device).index_add_(0, idx[0], val)
    is_q = idx[0] < n_q
    q_rows, q_cols, q_vals = idx[0][is_q], idx[1][is_q], val[is_q]
    g_order, g_ptr = _csr(idx[1][~is_q], v.shape[1])                 # inverted index by column
    g_rows, g_vals = (idx[0][~is_q] - n_q)[g_order], val[~is_q][g_order]
    _, q_ptr = _csr(q_rows, n_q)
    cost = torch.zeros(n_q, dtype=torch.long, device=val.device)
    cost.index_add_(0, q_rows, g_ptr[q_cols + 1] - g_ptr[q_cols])
    for lo, hi in _row_chunks(cost, budget, max(1, budget // n_g)):
        e = slice(int(q_ptr[lo]), int(q_ptr[hi]))
        owner, slot = _expand(g_ptr, q_cols[e])
        pair = (q_rows[e][owner] - lo) * n_g + g_rows[slot]
        mins = torch.minimum(q_vals[e][owner], g_vals[slot])
        inter = torch.zeros((hi - lo) * n_g, dtype=val.dtype, device=val.device)
        inter = inter.index_add_(0, pair, mins).view(hi - lo, n_g)
        union = row_sum[lo:hi, None] + row_sum[None, n_q:] - inter
        out[lo:hi] += scale * (1.0 - inter / union)


def k_reciprocal(q_g_sim: ScoreMatrix, q_q_sim: ScoreMatrix, g_g_sim: ScoreMatrix, k1: int = 20,
                 k2: int = 6, lambda_value: float = 0.3, chunk_size: int | None = None,
                 form: str = "released") -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
    Encoding", CVPR 2017) of query-to-gallery scores; returns ``-d*``, so HIGHER = BETTER.

    In TBPS the queries are texts: ``q_q_sim`` is text-text, ``g_g_sim`` image-image, and all
    neighbour sets live in the joint set of Q texts + G images, whose similarity is
    [[q_q, q_g], [q_g^T, g_g]] (served in row chunks, never stored). Steps, following the paper:

    1. original distance d = 2 - 2s (squared Euclidean distance of L2-normalised features; the
       paper's Mahalanobis distance with M = I, Sec. 3.1);
    2. N(p, k1): the k1 + 1 most similar samples of p (p itself normally first);
       R(p, k1) = {g in N(p, k1) : p in N(g, k1)}, the k-reciprocal neighbours (Sec. 3.2);
    3. R*(p, k1): R(p, k1) plus each R(q, round(k1/2)), q in R(p, k1), sharing >= 2/3 of its
       members with R(p, k1) (Sec. 3.2);
    4. V_p,g = exp(-d(p, g)) for g in R*(p, k1), else 0 (Gaussian-kernel encoding, Eq. (7));
    5. local query expansion: V_p <- mean of V over the k2 most similar samples of p, p included
       (Sec. 3.3);
    6. Jaccard distance d_J = 1 - sum min(V_p, V_g) / sum max(V_p, V_g) (Sec. 3.3), via an
       inverted index over the sparse V;
    7. d* = (1 - lambda) d_J + lambda d (Sec. 3.4); the function returns -d* for each pair.

    ``form`` chooses between the two published versions of the method:

    - ``"released"`` (default): the authors' public code, which is what re-id and TBPS papers' "+R"
      numbers come from. It adds two normalisations the paper text does not describe: the joint
      distance matrix is divided column-wise by each column's maximum and then transposed, so row p
      holds d(p, .) / max_j d(j, p) (= max_j d(p, j), d being symmetric) -- this scaled distance is
      used in Eq. (7) and in step 7; and each V row is divided by its sum (Eq. (7) becomes a
      distribution over R*(p, k1)). Ranks, hence the neighbour sets, are unchanged by either. (The
      transpose assumes symmetric ``q_q_sim`` and ``g_g_sim``, as cosine similarities are.)
      (That code also squares the distances it is given, which are Euclidean; ``2 - 2s`` already
      is the squared Euclidean distance of unit vectors.)
    - ``"paper"``: the paper text's equations as written above, without either normalisation.

    The neighbour-list sizes (k1 + 1 with self, k2 with self) match the public implementation, so
    k1 = 20, k2 = 6, lambda = 0.3 (the paper's setting) mean the same in both forms. Similarities other
    than cosines should be rescaled to [-1, 1] first, as d assumes unit vectors.

    Args:
        q_g_sim: [Q, G] query-gallery similarities; q_q_sim: [Q, Q]; g_g_sim: [G, G].
        k1, k2: neighbourhood sizes (1 <= k1 < Q + G, 1 <= k2 <= Q + G).
        lambda_value: weight of the original distance, in [0, 1].
        chunk_size: rows of the joint matrix per chunk (default: about ``CHUNK_ELEMENTS`` entries).
        form: ``"released"`` (the public code's normalisations, default) or ``"paper"`` (see above).

    Returns:
        [Q, G] tensor of -d* (float32, or float64 for float64 input), on the input's device.
    """
    qg = as_score_matrix(q_g_sim, "q_g_sim")
    qq = as_score_matrix(q_q_sim, "q_q_sim")
    gg = as_score_matrix(g_g_sim, "g_g_sim")
    n_q, n_g = qg.shape
    for name, x, size in (("q_q_sim", qq, n_q), ("g_g_sim", gg, n_g)):
        if tuple(x.shape) != (size, size):
            raise ValueError(f"{name} must be [{size}, {size}] to match q_g_sim of shape {tuple(qg.shape)}, "
                             f"got {tuple(x.shape)}")
    n = n_q + n_g
    _check_count("k1", k1, 1, n - 1, f"k1 + 1 neighbours among the {n} queries + gallery samples")
    _check_count("k2", k2, 1, n, f"the {n} queries + gallery samples")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value!r}")
    if form not in K_RECIPROCAL_FORMS:
        raise ValueError(f"form must be one of {list(K_RECIPROCAL_FORMS)}, got {form!r}")
    _check_finite(("q_g_sim", qg), ("q_q_sim", qq), ("g_g_sim", gg))
    dtype = _work_dtype(qg, qq, gg)
    joint = _JointSimilarity(qg.to(dtype), qq.to(dtype), gg.to(dtype))
    chunk = _chunk_rows(chunk_size, n)

    width = max(k1 + 1, k2)
    ranked, lowest = [], []
    for lo in range(0, n, chunk):
        rows = joint.rows(lo, min(lo + chunk, n))
        ranked.append(stable_topk(rows, width))
        lowest.append(rows.min(dim=1).values)
    ranked = torch.cat(ranked)
    if form == "released":  # d(p, .) / max_j d(p, j): the largest distance comes from the lowest similarity
        scale = _distance(torch.cat(lowest)).clamp(min=torch.finfo(dtype).tiny)
    else:
        scale = torch.ones(n, dtype=dtype, device=qg.device)
    small = max(1, CHUNK_ELEMENTS // (width * width * 8))             # rows per chunk of the [c, m, m] checks
    recip = _reciprocal(ranked[:, :k1 + 1], small)
    recip_half = _reciprocal(ranked[:, :int(round(k1 / 2)) + 1], small)
    p, g = _expanded_sets(recip, recip_half, small)

    weight = torch.exp(-_distance(joint.entries(p, g)) / scale[p])   # Eq. (7)
    if form == "released":                                            # each V row sums to 1
        row_sum = torch.zeros(n, dtype=dtype, device=weight.device).index_add_(0, p, weight)
        weight = weight / row_sum[p]
    v = torch.sparse_coo_tensor(torch.stack([p, g]), weight, (n, n), check_invariants=False).coalesce()
    if k2 > 1:
        v = _query_expansion(v, ranked[:, :k2])

    out = joint.q_g * -2.0                                            # final d*, negated, built in place:
    out.add_(2.0).mul_(-lambda_value / scale[:n_q, None])             # -lambda d(p, g) (one [Q, G] buffer)
    _jaccard_distance_into(v, n_q, out, -(1.0 - lambda_value), CHUNK_ELEMENTS)
    return out
