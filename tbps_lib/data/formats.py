"""Readers of the three official TBPS annotation files, into one record schema.

Every dataset becomes a :class:`TBPSDataset`: a list of :class:`Record` (one per image: path, person id,
captions, split, optional metadata) plus a :class:`LoadReport` that says what was read and what, in
lenient mode, was skipped. The three formats:

* CUHK-PEDES  ``reid_raw.json``: list of ``{"split", "captions", "file_path", "id", "processed_tokens"}``,
  splits train/val/test, 1-based person ids, images under ``imgs/``.
* ICFG-PEDES  ``ICFG-PEDES.json`` (or ``ICFG_PEDES.json``): the same fields, splits train/test only, one
  caption per image, images under ``imgs/``.
* RSTPReid    ``data_captions.json``: list of ``{"id", "img_path", "captions", "split"}``, splits
  train/val/test, images in a flat ``imgs/`` folder.

Validation (``CONTRIBUTING.md``, "Bad input never passes silently"): a missing annotation file (naming every file
name tried), an unknown split, missing or non-string captions, an empty caption, a missing image file
(counted, the first few listed), and duplicate image entries. ``strict=True`` raises
:class:`DatasetError` naming the file and the record; ``strict=False`` skips such records and counts
them in ``dataset.report``.

The synthetic benchmark (``tbps_lib.data.synthetic`` generates it) is read as CUHK-PEDES plus its sidecar
``synthetic_meta.json`` (:func:`read_meta`, :func:`read_sidecar`), whose entries become ``Record.meta``.
``tbps_lib.data.catalog.load_dataset`` is the entry point that also generates ``synthetic:<preset>`` sets;
this module never imports the generator.

Person ids stay as in the file (evaluation matches on them); :meth:`TBPSDataset.train_labels` gives the
contiguous 0..N-1 classification labels of the training identities.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

SPLITS = ("train", "val", "test")
MAX_LISTED = 5  # how many offending records an error message lists


class DatasetError(ValueError):
    """An annotation file or an image folder does not match the format it claims."""


@dataclass(frozen=True)
class Record:
    """One image of a dataset with its captions.

    ``image`` is the path relative to the dataset's image folder, exactly as in the annotation file;
    ``pid`` is the original person id; ``meta`` carries extra per-image data (synthetic attributes,
    part boxes) or None.
    """

    image: str
    pid: int
    captions: tuple[str, ...]
    split: str
    meta: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)


@dataclass
class LoadReport:
    """What a reader read, and what it skipped (lenient mode) or noted."""

    file: Path
    n_entries: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def add_skip(self, reason: str, where: str) -> None:
        self.skipped.setdefault(reason, []).append(where)

    def summary(self) -> str:
        """One paragraph a person can read: entries, skips by reason with the first few, notes."""
        lines = [f"{self.file}: {self.n_entries} entries read, {self.n_skipped} skipped"]
        for reason, where in sorted(self.skipped.items()):
            shown = ", ".join(where[:MAX_LISTED]) + (" ..." if len(where) > MAX_LISTED else "")
            lines.append(f"  skipped {len(where)} ({reason}): {shown}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class TBPSDataset:
    """A TBPS dataset in the common schema: records (one per image) and the load report."""

    name: str
    root: Path
    image_dir: Path
    records: list[Record]
    report: LoadReport

    @property
    def splits(self) -> tuple[str, ...]:
        present = {r.split for r in self.records}
        return tuple(s for s in SPLITS if s in present)

    def split(self, name: str) -> list[Record]:
        """The records of one split; an unknown or absent split is an error that lists the present ones."""
        if name not in self.splits:
            raise DatasetError(f"{self.name}: no split {name!r}; present splits: {list(self.splits)}")
        return [r for r in self.records if r.split == name]

    def image_path(self, record: Record) -> Path:
        return self.image_dir / record.image

    @property
    def has_part_masks(self) -> bool:
        """Whether the records carry the synthetic benchmark's sidecar (part masks in ``meta["mask"]``,
        attributes): what the pointing games, look-alike and attribution analyses need. Real datasets (and
        a synthetic folder read through a real dataset's reader) do not."""
        return bool(self.records) and self.records[0].meta is not None and "mask" in self.records[0].meta

    def train_labels(self) -> dict[int, int]:
        """Map each training person id to a contiguous label 0..N-1 (sorted by id)."""
        return {pid: i for i, pid in enumerate(sorted({r.pid for r in self.split("train")}))}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per split: images, identities, captions and caption-length statistics (in words)."""
        out: dict[str, dict[str, Any]] = {}
        for s in self.splits:
            recs = self.split(s)
            lengths = np.array([len(c.split()) for r in recs for c in r.captions], dtype=float)
            out[s] = {
                "images": len(recs),
                "ids": len({r.pid for r in recs}),
                "captions": int(lengths.size),
                "words_mean": round(float(lengths.mean()), 2),
                "words_std": round(float(lengths.std()), 2),
                "words_min": int(lengths.min()),
                "words_median": float(np.median(lengths)),
                "words_max": int(lengths.max()),
            }
        return out


# ----------------------------------------------------------------------------------------------------
# Shared validation


def _find_annotation(root: Path, names: Iterable[str]) -> Path:
    names = list(names)
    for n in names:
        if (root / n).is_file():
            return root / n
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    tried = ", ".join(str(root / n) for n in names)
    raise DatasetError(f"no annotation file in {root}; looked for: {tried}")


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return data


def _check_entry(entry: Any, idx: int, path_key: str, splits: tuple[str, ...]) -> tuple[str, str] | None:
    """Return (reason, description) if the entry is malformed, else None."""
    where = f"record {idx}"
    if not isinstance(entry, dict):
        return "not an object", where
    where = f"record {idx} ({entry.get(path_key, '?')})"
    for key in ("id", path_key, "captions", "split"):
        if key not in entry:
            return f"missing field {key!r}", where
    if entry["split"] not in splits:
        return f"unknown split {entry['split']!r} (expected one of {list(splits)})", where
    if isinstance(entry["id"], bool) or not isinstance(entry["id"], int):
        return f"person id is not an integer: {entry['id']!r}", where
    if not isinstance(entry[path_key], str) or not entry[path_key]:
        return f"{path_key!r} is not a non-empty string", where
    caps = entry["captions"]
    if not isinstance(caps, list) or not caps:
        return "captions missing or not a non-empty list", where
    for j, c in enumerate(caps):
        if not isinstance(c, str):
            return f"caption {j} is not a string ({type(c).__name__})", where
        if not c.strip():
            return f"caption {j} is empty", where
    return None


def _build(
    name: str,
    root: Path,
    names: tuple[str, ...],
    path_key: str,
    splits: tuple[str, ...],
    strict: bool,
    check_images: bool,
) -> TBPSDataset:
    """Read and validate one annotation file into a TBPSDataset (shared by the three readers)."""
    root = Path(root).expanduser()
    ann = _find_annotation(root, names)
    entries = _read_json_list(ann)
    image_dir = root / "imgs"
    report = LoadReport(file=ann, n_entries=len(entries))
    records: list[Record] = []
    seen: dict[str, int] = {}
    missing: list[str] = []
    for idx, entry in enumerate(entries):
        problem = _check_entry(entry, idx, path_key, splits)
        if problem is None and entry[path_key] in seen:
            problem = (f"duplicate image entry (first at record {seen[entry[path_key]]})",
                       f"record {idx} ({entry[path_key]})")
        if problem is not None:
            if strict:
                raise DatasetError(f"{ann}: {problem[1]}: {problem[0]}")
            report.add_skip(problem[0], problem[1])
            continue
        seen[entry[path_key]] = idx
        if check_images and not (image_dir / entry[path_key]).is_file():
            missing.append(f"record {idx} ({entry[path_key]})")
            continue
        records.append(Record(entry[path_key], int(entry["id"]), tuple(entry["captions"]), entry["split"]))
    if missing:
        if strict:
            shown = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
            raise DatasetError(f"{ann}: {len(missing)} image file(s) missing under {image_dir}: {shown}")
        report.skipped["missing image file"] = missing
    if not records:
        raise DatasetError(f"{ann}: no usable records ({report.n_skipped} skipped)\n{report.summary()}")
    return TBPSDataset(name, root, image_dir, records, report)


# ----------------------------------------------------------------------------------------------------
# The three official formats


def read_cuhk_pedes(root: str | Path, strict: bool = True, check_images: bool = True) -> TBPSDataset:
    """CUHK-PEDES: ``reid_raw.json``, splits train/val/test, images under ``imgs/``."""
    return _build("cuhk-pedes", Path(root), ("reid_raw.json",), "file_path", SPLITS, strict, check_images)


def read_icfg_pedes(root: str | Path, strict: bool = True, check_images: bool = True) -> TBPSDataset:
    """ICFG-PEDES: ``ICFG-PEDES.json`` (or ``ICFG_PEDES.json``), splits train/test, one caption per image."""
    names = ("ICFG-PEDES.json", "ICFG_PEDES.json")
    return _build("icfg-pedes", Path(root), names, "file_path", ("train", "test"), strict, check_images)


def read_rstpreid(root: str | Path, strict: bool = True, check_images: bool = True) -> TBPSDataset:
    """RSTPReid: ``data_captions.json`` with ``img_path``, splits train/val/test, flat ``imgs/`` folder."""
    return _build("rstpreid", Path(root), ("data_captions.json",), "img_path", SPLITS, strict, check_images)


SIDECAR = "synthetic_meta.json"
SIDECAR_VERSION = 1


def read_meta(root: str | Path) -> dict[str, Any]:
    """The whole sidecar of a synthetic dataset folder, validated."""
    path = Path(root).expanduser() / SIDECAR
    if not path.is_file():
        raise DatasetError(f"{path}: synthetic sidecar not found (is {root} a synthetic dataset folder?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("version") != SIDECAR_VERSION:
        found = meta.get("version") if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{path}: expected sidecar version {SIDECAR_VERSION}, found {found!r}")
    for key in ("images", "part_labels", "preset", "size"):
        if key not in meta:
            raise DatasetError(f"{path}: missing field {key!r}")
    return meta


def read_sidecar(root: str | Path) -> dict[str, dict[str, Any]]:
    """Per-image sidecar entries of a synthetic dataset folder, keyed by the annotation's ``file_path``."""
    return read_meta(root)["images"]


def read_synthetic(root: str | Path, strict: bool = True, check_images: bool = True) -> TBPSDataset:
    """A synthetic benchmark folder: the CUHK-PEDES layout plus a sidecar whose entries become ``meta``."""
    ds = read_cuhk_pedes(root, strict=strict, check_images=check_images)
    side = read_sidecar(ds.root)
    ds.records = [replace(r, meta=side.get(r.image)) for r in ds.records]
    ds.name = "synthetic"
    return ds


READERS: dict[str, Callable[..., TBPSDataset]] = {
    "cuhk-pedes": read_cuhk_pedes,
    "icfg-pedes": read_icfg_pedes,
    "rstpreid": read_rstpreid,
    "synthetic": read_synthetic,
}


def detect_format(root: str | Path) -> str:
    """Name the format of a dataset folder from the annotation file it holds."""
    root = Path(root).expanduser()
    if (root / "synthetic_meta.json").is_file():
        return "synthetic"
    for name, files in (("cuhk-pedes", ["reid_raw.json"]),
                        ("icfg-pedes", ["ICFG-PEDES.json", "ICFG_PEDES.json"]),
                        ("rstpreid", ["data_captions.json"])):
        if any((root / f).is_file() for f in files):
            return name
    raise DatasetError(
        f"cannot tell the dataset format of {root}: none of reid_raw.json, ICFG-PEDES.json, "
        "ICFG_PEDES.json, data_captions.json is there"
    )


def hold_out_validation(ds: TBPSDataset, share: float = 0.1, seed: int = 0) -> TBPSDataset:
    """Give a dataset without a validation split (ICFG-PEDES) one, carved from training identities.

    A fixed ``share`` of training person ids (chosen with ``seed``) moves to split ``val``; the report
    records it, so every result that used it says so. A dataset that has a val split is returned as is.
    """
    if "val" in ds.splits:
        return ds
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    ids = sorted({r.pid for r in ds.split("train")})
    n_val = max(1, round(share * len(ids)))
    val_ids = set(random.Random(seed).sample(ids, n_val))
    records = [replace(r, split="val") if r.split == "train" and r.pid in val_ids else r for r in ds.records]
    report = replace(ds.report, notes=ds.report.notes + [
        f"no official validation split: {n_val} of {len(ids)} training identities "
        f"({share:.0%}, seed {seed}) held out as 'val'"
    ])
    return TBPSDataset(ds.name, ds.root, ds.image_dir, records, report)


def caption_pairs(records: Iterable[Record]) -> list[tuple[int, int]]:
    """(record index, caption index) for every caption, in order: the evaluation's query list."""
    return [(i, j) for i, r in enumerate(records) for j in range(len(r.captions))]


def split_counts(ds: TBPSDataset) -> dict[str, dict[str, int]]:
    """The compact per-split summary `tbps data inspect --json` prints: images, ids, captions."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for s, st in ds.stats().items():
        counts[s] = {"images": st["images"], "ids": st["ids"], "captions": st["captions"]}
    return dict(counts)


def duplicate_ids_across_splits(ds: TBPSDataset) -> dict[int, list[str]]:
    """Person ids that occur in more than one split (the protocol wants disjoint identities)."""
    where: dict[int, set[str]] = defaultdict(set)
    for r in ds.records:
        where[r.pid].add(r.split)
    return {pid: sorted(s) for pid, s in where.items() if len(s) > 1}


__all__ = [
    "SPLITS", "DatasetError", "Record", "LoadReport", "TBPSDataset", "read_cuhk_pedes", "read_icfg_pedes",
    "read_rstpreid", "SIDECAR", "read_meta", "read_sidecar", "read_synthetic", "READERS", "detect_format",
    "hold_out_validation",
    "caption_pairs", "split_counts", "duplicate_ids_across_splits",
]
