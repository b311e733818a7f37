"""Shared test fixtures: tiny datasets written in each official annotation format."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("TBPS_PROGRESS", "0")  # no progress bars in test logs

ANNOTATION = {"cuhk-pedes": "reid_raw.json", "icfg-pedes": "ICFG-PEDES.json", "rstpreid": "data_captions.json"}
PATH_KEY = {"cuhk-pedes": "file_path", "icfg-pedes": "file_path", "rstpreid": "img_path"}


def official_entries(fmt: str) -> list[dict]:
    """A small, valid annotation list in the official layout of ``fmt`` (ids 1-based, several splits)."""
    splits = {"icfg-pedes": ["train"] * 3 + ["test"] * 2}.get(fmt, ["train"] * 3 + ["val", "test"])
    entries = []
    for pid, split in enumerate(splits, start=1):
        for k in range(2):
            if fmt == "rstpreid":
                path = f"{pid:04d}_c{k}_0001.jpg"
            else:
                path = f"{split}/{pid:04d}/{pid:04d}_{k}.png"
            n_caps = 1 if fmt == "icfg-pedes" else 2
            caps = [f"a person number {pid} wearing a blue shirt view {k} caption {c}" for c in range(n_caps)]
            entry = {"id": pid, PATH_KEY[fmt]: path, "captions": caps, "split": split}
            if fmt != "rstpreid":
                entry["processed_tokens"] = [c.split() for c in caps]
            entries.append(entry)
    return entries


def write_dataset(fmt: str, root: Path, entries: list[dict], annotation: str | None = None,
                  images: bool = True) -> Path:
    """Write ``entries`` as ``fmt``'s annotation file under ``root`` and a 4x2 image for each entry."""
    root.mkdir(parents=True, exist_ok=True)
    (root / (annotation or ANNOTATION[fmt])).write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    if images:
        for e in entries:
            rel = e.get(PATH_KEY[fmt])
            if isinstance(rel, str) and rel:
                p = root / "imgs" / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (2, 4), (10, 20, 30)).save(p)
    return root


@pytest.fixture(params=sorted(ANNOTATION))
def official(request, tmp_path):
    """(format name, root) of a valid tiny dataset in each official format."""
    fmt = request.param
    return fmt, write_dataset(fmt, tmp_path / fmt, official_entries(fmt))
