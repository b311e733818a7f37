"""The cross-method leaderboard: every implemented method, default config, one dataset and preset.

For each method of ``list_methods()`` the run of ``make_config(method, preset, dataset)`` is looked up in
the run registry (never trained): its test R1/R5/R10/mAP/mINP as recorded in ``metrics.json``, its
training wall time (``wall_time_s``: the training loop with its validations plus the one final test
evaluation), its parameter count and the time it takes to answer one caption query (:func:`query_latency`).
A method whose run is not there is listed as "not run yet" with the command that trains it; no number is
filled in for it. ``stale`` is True for a measured run made by other code than the current library
(``Run.stale``; its ``reason`` says which), so a reader sees which numbers may be out of date.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from tbps_lib.analysis.tables import PAPER_DATA, ROOT_ENV, RunLookup, encoder_init, train_command
from tbps_lib.reported import DATASETS, PERCENT_METRICS

if TYPE_CHECKING:  # pragma: no cover
    from tbps_lib.engine.runs import Run

COLUMNS = ("method", "status", "stale", *PERCENT_METRICS, "train_s", "params_M", "query_ms", "backbones", "init", "data",
           "preset", "config", "train_device", "query_device", "reason")


def query_latency(run: Run, n_queries: int = 50, warmup: int = 5, k: int = 10, seed: int = 0) -> dict[str, Any]:
    """Median time to answer one caption query against the run's test gallery, in milliseconds.

    The gallery is the run's cached test-split encoding (``Run.embeddings``), set up once as a
    :class:`tbps_lib.search.CaptionSearch`; each query is one test caption (drawn with ``seed``, without
    replacement) answered alone (batch of one) by ``CaptionSearch.search``, whose timed part is exactly
    tokenisation + ``model.encode_texts`` + scoring against the whole gallery (the method's own
    ``similarity``, or the equal cosine fast path) + top-``k``, ending with the indices on the CPU. The
    first ``warmup`` queries are answered but not counted (lazy initialisation, caches, CUDA kernels).
    Returns ``query_ms`` (median), ``queries`` (how many were timed), ``gallery`` (images), ``scoring``.
    """
    from tbps_lib.search import CaptionSearch, SearchInputError

    searcher = CaptionSearch.from_run(run, "test")
    n = searcher.encoded.n_queries
    warmup = min(warmup, max(n - 1, 0))
    picks = np.random.default_rng(seed).choice(n, size=min(n_queries + warmup, n), replace=False)
    times = []
    for i in picks:
        try:
            table = searcher.search(searcher.encoded.captions[int(i)], k=k)
        except SearchInputError:  # a caption made only of words the model never saw: not a fair query
            continue
        times.append(table.attrs["latency_ms"])
    timed = times[warmup:]
    if not timed:
        raise ValueError(f"no test caption of {run.dir} could be searched (all made of unknown words)")
    return {"query_ms": float(np.median(timed)), "queries": len(timed), "gallery": searcher.gallery_size,
            "scoring": searcher.scoring}


def _source(dataset: str, lookup: RunLookup) -> tuple[str, str | None]:
    """(spec, root): a paper dataset name through the lookup's mapping; a real dataset's reader name with
    its folder from ``roots`` / the environment; any other spec (synthetic preset, folder) as given."""
    if dataset in DATASETS:
        return lookup.source(dataset)
    for name, reader in PAPER_DATA.items():
        if dataset == reader:
            return dataset, lookup.roots.get(name) or os.environ.get(ROOT_ENV[name]) or None
    return dataset, None


def leaderboard(dataset: str = "CUHK-PEDES", preset: str = "smoke", runs_dir: str | os.PathLike | None = None, *,
                lookup: RunLookup | None = None, methods: Sequence[str] | None = None, n_queries: int = 50,
                warmup: int = 5) -> pd.DataFrame:
    """One line per method (default config) on ``dataset`` in ``preset``; see the module docstring.

    ``dataset``: a paper dataset name (mapped by preset as in the paper tables), a dataset reader name or a
    spec such as ``synthetic:cuhk-like``. Columns: :data:`COLUMNS`; metrics in percent, ``train_s`` in
    seconds, ``params_M`` = all parameters of the model in millions (training-only heads included),
    ``query_ms`` = :func:`query_latency`. Measured methods come first, best R1 first.
    """
    from tbps_lib.config import config_hash, make_config
    from tbps_lib.models.registry import NotReproducible, list_methods

    lookup = lookup or RunLookup(preset, runs_dir)
    if lookup.preset != preset:
        raise ValueError(f"lookup is for preset {lookup.preset!r}, the leaderboard was asked for {preset!r}")
    rows = []
    for method in methods or list_methods():
        row: dict[str, Any] = {"method": method, "preset": preset}
        try:
            spec, root = _source(dataset, lookup)
        except NotReproducible as e:
            rows.append({**row, "status": "not reproducible", "reason": str(e)})
            continue
        cfg = make_config(method, preset, spec, {"data.root": root} if root else {})
        run = lookup.find(cfg)
        row.update(data=spec, backbones=f"{cfg.image.arch}+{cfg.text.arch}", init=encoder_init(run, cfg))
        if run is None:
            rows.append({**row, "status": "not run yet",
                         "reason": train_command(method, preset, spec, root, {})})
            continue
        m = run.metrics
        latency = query_latency(run, n_queries=n_queries, warmup=warmup)
        stale = run.stale_reason
        row.update(status="measured", stale=stale is not None, **{k: float(m["test"][k]) for k in PERCENT_METRICS},
                   train_s=float(m["wall_time_s"]),
                   params_M=sum(p.numel() for p in run.model.parameters()) / 1e6,
                   query_ms=latency["query_ms"],
                   config=config_hash(run.config), train_device=m.get("device", ""),
                   query_device=str(run.device), reason=f"stale: {stale}" if stale else "")
        rows.append(row)
    board = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    board["_measured"] = board["status"] == "measured"
    board = board.sort_values(["_measured", "R1"], ascending=[False, False], kind="stable", na_position="last")
    return board.drop(columns="_measured").reset_index(drop=True)
