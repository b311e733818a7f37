"""Saving figures the one way every notebook does: PNG and PDF under ``figures/``."""
from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from tbps_lib.config import WORKBOOK_ROOT


def figures_dir() -> Path:
    """``$TBPS_FIGURES`` if set, else ``figures/`` at the repository root (next to ``tbps_lib/``)."""
    env = os.environ.get("TBPS_FIGURES")
    return Path(env) if env else WORKBOOK_ROOT / "figures"


def save_figure(fig: Figure, name: str, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``NAME.png`` and ``NAME.pdf``; return the two paths.

    PDF metadata carries no creation date, so regenerating an unchanged figure gives the same bytes.
    """
    if not name or "/" in name or name.endswith((".png", ".pdf")):
        raise ValueError(f"figure name must be a bare name without extension or folder, got {name!r}")
    out = figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return paths
