"""Configuration: plain, frozen, hashable dataclasses and the notebook parameters.

Notebooks read their parameters from the environment with :func:`notebook_params`, so the same notebook
runs the CPU smoke preset on the synthetic benchmark (the default) and, with ``TBPS_MODE=paper`` and
``TBPS_DATA`` pointing at a real dataset, the papers' settings.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

MODES = ("smoke", "paper")


@dataclass(frozen=True)
class NotebookParams:
    """What every notebook's first cell reads: preset mode, dataset spec and run-registry folder."""

    mode: str
    data: str
    runs: str


def notebook_params() -> NotebookParams:
    """Read ``TBPS_MODE`` (smoke|paper, default smoke), ``TBPS_DATA`` (dataset name, ``synthetic:<preset>``
    or a folder; default ``synthetic:cuhk-like``) and ``TBPS_RUNS`` (default ``runs``)."""
    mode = os.environ.get("TBPS_MODE", "smoke").strip().lower()
    if mode not in MODES:
        raise ValueError(f"TBPS_MODE must be one of {MODES}, got {mode!r}")
    data = os.environ.get("TBPS_DATA", "synthetic:cuhk-like").strip()
    runs = os.environ.get("TBPS_RUNS", "runs").strip()
    return NotebookParams(mode=mode, data=data, runs=runs)
