"""Looking at what a trained model retrieves: ranked lists, query figures, training curves, and, on the
synthetic benchmark, which attribute differences cause the wrong answers.

All functions take an :class:`~tbps_lib.engine.evaluate.Encoded` split and its text-to-image similarity
(``tbps_lib.engine.evaluate.similarity``), so they work for every method.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from tbps_lib.data.formats import Record
from tbps_lib.engine.evaluate import RERANKERS, Encoded

MATCH, MISS = "#1a9850", "#d73027"  # green frame for a true match, red for a wrong person


def top_k(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Scores and gallery indices of the ``k`` best images per query; ties go to the lower gallery index
    (as in ``rank_metrics``)."""
    if k < 1 or k > sim.shape[1]:
        raise ValueError(f"k must be in 1..{sim.shape[1]} (the gallery size), got {k}")
    scores, idx = torch.sort(sim.float(), dim=1, descending=True, stable=True)
    return scores[:, :k], idx[:, :k]


def ranked_table(encoded: Encoded, sim: Tensor, queries: Sequence[int], k: int = 5) -> pd.DataFrame:
    """One row per (query, rank): caption, image path, person id, score and whether it is a hit."""
    scores, idx = top_k(sim[list(queries)], k)
    rows = []
    for qi, q in enumerate(queries):
        for r in range(k):
            g = int(idx[qi, r])
            rows.append({"query": q, "caption": encoded.captions[q], "rank": r + 1,
                         "image": str(encoded.image_paths[g]), "pid": int(encoded.gallery_pids[g]),
                         "score": round(float(scores[qi, r]), 4),
                         "match": bool(encoded.gallery_pids[g] == encoded.query_pids[q])})
    return pd.DataFrame(rows)


def plot_query_results(encoded: Encoded, sim: Tensor, queries: Sequence[int], k: int = 5,
                       wrap: int = 38) -> Figure:
    """A row per query: its caption, then its top-``k`` images framed green (same person) or red."""
    import textwrap

    table = ranked_table(encoded, sim, queries, k)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.3 * k + 3.2, 2.3 * len(queries)),
                             gridspec_kw={"width_ratios": [2.6] + [1] * k}, squeeze=False)
    for row, (q, group) in enumerate(table.groupby("query", sort=False)):
        text_ax = axes[row, 0]
        text_ax.axis("off")
        text_ax.text(0, 0.5, textwrap.fill(group["caption"].iloc[0], wrap), va="center", fontsize=7.5)
        for col, item in enumerate(group.itertuples(), start=1):
            ax = axes[row, col]
            ax.imshow(Image.open(item.image).convert("RGB"))
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(MATCH if item.match else MISS)
                spine.set_linewidth(3)
            ax.set_title(f"#{item.rank}  {item.score:.2f}", fontsize=7)
    fig.tight_layout()
    return fig


def plot_training_curves(history: pd.DataFrame, metric: str = "R1") -> Figure:
    """Loss terms per epoch (left) and the validation metric(s) per epoch (right)."""
    if history.empty:
        raise ValueError("the run has no history yet (train it first)")
    loss_cols = [c for c in history.columns if c not in ("epoch", "step", "lr", "time_s")
                 and not c.startswith("val_") and pd.api.types.is_numeric_dtype(history[c])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for c in loss_cols:
        left.plot(history["epoch"], history[c], marker="o", ms=3, label=c, lw=2.2 if c == "loss" else 1.2)
    left.set_xlabel("epoch"), left.set_ylabel("training loss (epoch mean)"), left.legend(fontsize=8)
    val = history.dropna(subset=[f"val_{metric}"]) if f"val_{metric}" in history else history.iloc[:0]
    for m in ("R1", "R5", "R10", "mAP"):
        if f"val_{m}" in val:
            right.plot(val["epoch"], val[f"val_{m}"], marker="o", ms=3, label=m)
    right.set_xlabel("epoch"), right.set_ylabel("validation (%)"), right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _attributes_by_pid(records: Sequence[Record]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in records:
        if not r.meta or "attributes" not in r.meta:
            raise ValueError("attribute analysis needs synthetic records (meta['attributes']); "
                         f"record {r.image} has none")
        out.setdefault(r.pid, r.meta["attributes"])
    return out


def error_attributes(encoded: Encoded, sim: Tensor, records: Sequence[Record]) -> pd.DataFrame:
    """Which attributes tell apart the true person and the wrongly retrieved top-1 person.

    For every query whose top-1 image shows another person, compare the two identities' attributes
    (synthetic benchmark only). Returns, per attribute, the share of errors in which it differs and the
    share in which it is the *only* difference (the "similar people" case the papers target), sorted.
    """
    attrs = _attributes_by_pid(records)
    _, idx = top_k(sim, 1)
    top_pids = encoded.gallery_pids[idx[:, 0]]
    wrong = torch.nonzero(top_pids != encoded.query_pids).flatten().tolist()
    differs, only = Counter(), Counter()
    for q in wrong:
        a, b = attrs[int(encoded.query_pids[q])], attrs[int(top_pids[q])]
        diff = [key for key in a if a.get(key) != b.get(key)]
        differs.update(diff)
        if len(diff) == 1:
            only.update(diff)
    n = max(len(wrong), 1)
    table = pd.DataFrame({"attribute": sorted(differs)})
    table["differs_in_errors_%"] = [100.0 * differs[a] / n for a in table["attribute"]]
    table["only_difference_%"] = [100.0 * only[a] / n for a in table["attribute"]]
    table = table.sort_values(["differs_in_errors_%", "attribute"], ascending=[False, True])
    table.attrs["n_errors"], table.attrs["n_queries"] = len(wrong), encoded.n_queries
    return table.reset_index(drop=True)


def attribute_differences(pid_a: int, pid_b: int, records: Sequence[Record]) -> dict[str, tuple]:
    """The attributes in which two synthetic identities differ: ``{name: (value_a, value_b)}``."""
    attrs = _attributes_by_pid(records)
    a, b = attrs[pid_a], attrs[pid_b]
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def sample_queries(encoded: Encoded, n: int, seed: int = 0, errors_of: Tensor | None = None) -> list[int]:
    """``n`` query indices of distinct people, drawn reproducibly; with ``errors_of`` (a similarity),
    only queries whose top-1 image shows another person."""
    candidates = np.arange(encoded.n_queries)
    if errors_of is not None:
        _, idx = top_k(errors_of, 1)
        wrong = (encoded.gallery_pids[idx[:, 0]] != encoded.query_pids).numpy()
        candidates = candidates[wrong]
    seen, picked = set(), []
    for q in np.random.default_rng(seed).permutation(candidates):
        pid = int(encoded.query_pids[q])
        if pid not in seen:
            seen.add(pid)
            picked.append(int(q))
        if len(picked) == n:
            break
    return picked


def metrics_table(run: Any, split: str = "test", reranks: Sequence[str | None] = (None, *RERANKERS)) -> pd.DataFrame:
    """R1/R5/R10/mAP/mINP of a run's selected checkpoint on ``split``, once per re-ranking choice (the index
    names it: ``k_reciprocal`` is the released code's form, ``k_reciprocal_paper`` the paper text's)."""
    rows = [{"re-ranking": name or "none",
             **{k: v for k, v in run.evaluate(split, rerank=name).items() if k != "rerank"}} for name in reranks]
    return pd.DataFrame(rows).set_index("re-ranking")
