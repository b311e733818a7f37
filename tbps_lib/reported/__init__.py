"""The numbers the five papers report, transcribed as data (one CSV per paper, long format).

Every comparison and ablation table of the papers in ``../shared/papers/`` is stored with one line per
printed number, so a later step can set the workbook's own measurement beside each one. The data are
transcribed from the paper texts only; a cell that cannot be read unambiguously is left out and said so
in ``note``; a table whose numbers are not in the text at all is listed by :func:`missing_tables`.

Columns of ``<paper>.csv`` (and of the frame :func:`load_reported` returns)
-----------------------------------------------------------------------------
``paper``     paper id, a key of :data:`PAPERS`.
``table``     the table's number as printed: ``"1"``, ``"IV"``; ``"S2"`` is the part-level paper's
              supplementary Table 2.
``order``     1-based position of the row in the printed table. A row repeated per dataset block
              (Sew Table 6) keeps one order.
``row``       the row label as printed, citation markers removed (``"NAFS+R"``, ``"ACSA (Ours)"``).
              Where the paper prints no label, the label is built from the row's check marks: the
              names of the checked columns joined by ``+`` (DSSL Tables 1-2, Sew Table 5,
              part-level Table 2), ``"Model k"`` for Sew Table 4's ID column, ``"Coarse=k"`` /
              ``"r=k"`` for a swept value. Such rows say so in ``note`` where it is not evident.
``variant``   normalised inference flags of the row: ``+R`` re-ranking (printed ``+R``, ``+RR`` or
              ``+ RVN``), ``+C`` CLIP-pretrained image encoder, ``+R+C`` both; empty otherwise.
``backbone``  ``image+text`` encoders as printed in the table (e.g. ``RN50+BERT``); empty where the
              table prints none.
``dataset``   ``CUHK-PEDES``, ``ICFG-PEDES``, ``RSTPReid``, or ``TRAIN->TEST`` for cross-domain rows.
``metric``    ``R1``, ``R5``, ``R10`` (Rank-k / Top-k / R@k), ``mAP``, ``mINP`` in percent, or
              ``Rsum`` = R1 + R5 + R10 as printed in ACSA's "Total" column.
``value``     the number as printed.
``page``      1-based PDF page where the text marks it (LAIP's ``page-N-k`` anchors, ACSA's printed
              page number "8" before Tables IV-V); empty elsewhere.
``config``    ``key=value;key=value`` flags that define an ablation row (see below); for the paper's
              own rows in comparison tables ``method=<paper id>`` plus ``rerank=1`` /
              ``image_pretrain=clip`` for the variants; empty for other methods.
``note``      what is uncertain about this number or row, in words; empty when nothing is.

Config keys (short names; values are ``0``/``1`` unless listed)
----------------------------------------------------------------
sew_mcm     ``image_encoder`` (resnet50|vit_b16), ``sew_margin`` (none = CMPM+CMPC baseline loss |
            fixed = Sew-F, margin 0.5 | adaptive = Sew-A), ``margin``, ``mcm``; Table 5:
            ``mcm_mask``, ``mcm_attention``, ``mcm_modeling`` (caption modelling head).
part_level  ``coarse``, ``fine``, ``cmr``; ``cmr_coarse``, ``cmr_fine`` (where CMR is applied);
            ``decoder`` (separated|shared); ``n_coarse`` (number of shared tokens D).
acsa        ``image_encoder`` (resnet50|vit|swin_t), ``text_encoder`` (bilstm|bert|xlnet),
            ``local_parts`` (six_slices|partition), ``relations`` (I, I+II, I+II+III, I+II+III+IV)
            with the cross-attention inputs ``image``, ``region``, ``text``, ``phrase``.
laip        ``coco`` (COCO pre-finetuning), ``itc_itm``, ``ftri`` (fusion triplet loss), ``foratt``,
            ``backatt`` (both = BidirAtt), ``mpm``.
dssl        ``baseline``, ``align1`` .. ``align5``; ``mec``, ``spsm_spfm``, ``sam``, ``sdm``;
            ``spfm_fusion`` (add|concat); ``sdm_zero_rate``; ``sdm_loss`` (euclidean|ranking).

``tables.csv`` is the catalogue: every table of the issue with its kind (comparison|ablation),
status (complete|partial|missing), page, caption and, where not complete, the reason.
"""
from __future__ import annotations

import csv
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pandas as pd

from tbps_lib.engine.metrics import METRIC_NAMES

PAPERS: dict[str, dict[str, str]] = {
    "sew_mcm": {"title": "Calibrating Cross-modal Features for Text-Based Person Searching",
                "source": "Wei et al., arXiv 2023", "file": "000_023d850703213881.txt", "csv": "sew_mcm.csv"},
    "part_level": {"title": "Improving Text-based Person Search via Part-level Cross-modal Correspondence",
                   "source": "Park et al., 2024", "file": "001_a6a65e495415db72.txt", "csv": "part_level.csv"},
    "acsa": {"title": "Asymmetric Cross-Scale Alignment for Text-Based Person Search",
             "source": "Ji et al., IEEE TMM 2022", "file": "002_7620bf405c034493.txt", "csv": "acsa.csv"},
    "laip": {"title": "LAIP: Learning Local Alignment from Image-Phrase Modeling for Text-based Person Search",
             "source": "Wang, Wu et al., 2024", "file": "003_82a3fd73b744ab58.txt", "csv": "laip.csv"},
    "dssl": {"title": "DSSL: Deep Surroundings-person Separation Learning for Text-based Person Retrieval",
             "source": "Zhu et al., ACM MM 2021", "file": "004_24d0390610cb116e.txt", "csv": "dssl.csv"},
}
"""Paper id -> title, source (authors, venue), paper text (in ``../shared/papers/``) and CSV file."""

COLUMNS = ("paper", "table", "order", "row", "variant", "backbone", "dataset", "metric", "value", "page",
           "config", "note")
REQUIRED = ("paper", "table", "order", "row", "dataset", "metric", "value")
PERCENT_METRICS = METRIC_NAMES  # R1/R5/R10/mAP/mINP, the names evaluation returns
METRICS = PERCENT_METRICS + ("Rsum",)
DATASETS = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")
VARIANTS = ("", "+R", "+C", "+R+C")
CATALOG_COLUMNS = ("paper", "table", "kind", "status", "page", "caption", "reason")
_NUMBER = re.compile(r"\d+(\.\d+)?")
_CONFIG_ITEM = re.compile(r"[a-z][a-z0-9_]*=[^;=]+")


class MissingTableError(LookupError):
    """A table the paper has, whose numbers are not in the paper text (see :func:`missing_tables`)."""


def _data_dir() -> Path:
    return Path(str(resources.files(__name__)))


def _valid_dataset(name: str) -> bool:
    parts = name.split("->")
    return len(parts) in (1, 2) and all(p in DATASETS for p in parts)


def _check_record(rec: dict[str, str], where: str, paper: str) -> None:
    """Raise ValueError naming ``where`` (file:line) if one CSV record breaks the schema."""
    for col in REQUIRED:
        if not rec.get(col):
            raise ValueError(f"{where}: required column {col!r} is empty")
    if rec["paper"] != paper:
        raise ValueError(f"{where}: paper {rec['paper']!r} in the file of paper {paper!r}")
    if not _NUMBER.fullmatch(rec["value"]):
        raise ValueError(f"{where}: value {rec['value']!r} is not a number as printed (digits, optional decimals)")
    if not rec["order"].isdigit() or int(rec["order"]) < 1:
        raise ValueError(f"{where}: order {rec['order']!r} is not a positive integer")
    if rec["page"] and not rec["page"].isdigit():
        raise ValueError(f"{where}: page {rec['page']!r} is not a page number")
    if rec["metric"] not in METRICS:
        raise ValueError(f"{where}: unknown metric {rec['metric']!r}; expected one of {', '.join(METRICS)}")
    if not _valid_dataset(rec["dataset"]):
        raise ValueError(f"{where}: unknown dataset {rec['dataset']!r}; expected one of {', '.join(DATASETS)} "
                         "or TRAIN->TEST")
    if rec["variant"] not in VARIANTS:
        raise ValueError(f"{where}: unknown variant {rec['variant']!r}; expected one of {VARIANTS}")
    if rec["config"] and not all(_CONFIG_ITEM.fullmatch(item) for item in rec["config"].split(";")):
        raise ValueError(f"{where}: config {rec['config']!r} is not key=value;key=value")
    limit = 300.0 if rec["metric"] == "Rsum" else 100.0
    if not 0.0 <= float(rec["value"]) <= limit:
        raise ValueError(f"{where}: {rec['metric']} value {rec['value']} is outside 0..{limit:g}")


def read_reported_csv(path: str | Path, paper: str) -> pd.DataFrame:
    """Read and validate one paper's CSV; errors name the file and line of the bad record."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: header {reader.fieldnames} differs from the expected {list(COLUMNS)}")
        records = []
        for rec in reader:
            where = f"{path}:{reader.line_num}"
            if None in rec or any(v is None for v in rec.values()):
                raise ValueError(f"{where}: wrong number of fields")
            _check_record(rec, where, paper)
            records.append(rec)
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    df["order"] = df["order"].astype(int)
    df["value"] = df["value"].astype(float)
    df["page"] = pd.to_numeric(df["page"].where(df["page"] != "")).astype("Int64")
    return df


@lru_cache(maxsize=1)
def _all_reported() -> pd.DataFrame:
    frames = [read_reported_csv(_data_dir() / meta["csv"], paper) for paper, meta in PAPERS.items()]
    return pd.concat(frames, ignore_index=True)


@lru_cache(maxsize=1)
def _catalog() -> pd.DataFrame:
    path = _data_dir() / "tables.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if tuple(df.columns) != CATALOG_COLUMNS:
        raise ValueError(f"{path}: header {list(df.columns)} differs from the expected {list(CATALOG_COLUMNS)}")
    bad = df[~df["paper"].isin(list(PAPERS)) | ~df["status"].isin(["complete", "partial", "missing"])]
    if len(bad):
        raise ValueError(f"{path}: unknown paper or status in rows {list(bad.index + 2)}")
    return df


def _check_paper(paper: str) -> None:
    if paper not in PAPERS:
        raise ValueError(f"unknown paper {paper!r}; available: {', '.join(PAPERS)}")


def available_tables(paper: str) -> list[str]:
    """The tables of ``paper`` in the catalogue, in paper order (missing ones included)."""
    _check_paper(paper)
    cat = _catalog()
    return cat.loc[cat["paper"] == paper, "table"].tolist()


def table_catalog(paper: str | None = None) -> pd.DataFrame:
    """The catalogue of tables (kind, status, page, caption, reason), optionally for one paper."""
    cat = _catalog()
    if paper is None:
        return cat.copy()
    _check_paper(paper)
    return cat[cat["paper"] == paper].reset_index(drop=True)


def table_info(paper: str, table: str | int) -> dict[str, str]:
    """The catalogue entry of one table; ValueError listing the available tables if there is none."""
    table = str(table)
    if table not in available_tables(paper):
        raise ValueError(f"paper {paper!r} has no table {table!r}; available: {', '.join(available_tables(paper))}")
    cat = _catalog()
    return cat[(cat["paper"] == paper) & (cat["table"] == table)].iloc[0].to_dict()


def missing_tables(paper: str | None = None) -> pd.DataFrame:
    """Tables whose numbers are not in the paper text, with the reason; never filled with guesses."""
    cat = table_catalog(paper)
    return cat[cat["status"] == "missing"].reset_index(drop=True)


def load_reported(paper: str | None = None, table: str | int | None = None) -> pd.DataFrame:
    """Reported numbers in long format (see the module docstring), filtered by paper and table.

    A table listed by :func:`missing_tables` gives an empty frame; an unknown paper or table is a
    ValueError that lists the available ones.
    """
    df = _all_reported()
    if paper is not None:
        _check_paper(paper)
        df = df[df["paper"] == paper]
    if table is not None:
        if paper is None:
            raise ValueError("a table is numbered within a paper: pass paper= together with table=")
        table_info(paper, table)
        df = df[df["table"] == str(table)]
    return df.reset_index(drop=True).copy()


def parse_config(text: str) -> dict[str, str]:
    """``"a=1;b=x"`` -> ``{"a": "1", "b": "x"}``; ValueError on a malformed item."""
    if not text:
        return {}
    out = {}
    for item in text.split(";"):
        if not _CONFIG_ITEM.fullmatch(item):
            raise ValueError(f"config item {item!r} of {text!r} is not key=value")
        key, value = item.split("=")
        out[key] = value
    return out
