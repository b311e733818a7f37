"""Paper tables: the reported numbers of :mod:`tbps_lib.reported` laid out as the papers print them."""
from __future__ import annotations

import pandas as pd

from tbps_lib.reported import METRICS, MissingTableError, load_reported, table_info


def _row_index(rows: pd.DataFrame) -> pd.Index:
    """Row labels in paper order; the backbone joins the label where the table prints backbones."""
    if rows["backbone"].ne("").any():
        return pd.MultiIndex.from_frame(rows[["row", "backbone"]])
    return pd.Index(rows["row"], name="row")


def _join_notes(notes: pd.Series) -> str:
    """One text from a row's cell notes, each distinct clause once (a row note repeats on every cell)."""
    clauses = (c for note in notes for c in note.split("; "))
    return "; ".join(dict.fromkeys(clauses))


def _column_order(long: pd.DataFrame) -> list[tuple[str, str]]:
    """(dataset, metric) pairs: datasets in the order the table first uses them, metrics R1..mINP, Rsum."""
    datasets = list(dict.fromkeys(long.sort_values("order", kind="stable")["dataset"]))
    present = set(zip(long["dataset"], long["metric"]))
    return [(d, m) for d in datasets for m in METRICS if (d, m) in present]


def paper_table(paper: str, table: str | int) -> pd.DataFrame:
    """Reported numbers of one paper table: rows in paper order, columns (dataset, metric).

    Cells the paper leaves blank ("-") or that could not be read are NaN. ``attrs`` carries the
    table's caption, kind, page and the notes of each row (row label -> note text). An unknown paper
    or table is a ValueError listing the available ones; a table whose numbers are not in the paper
    text raises :class:`tbps_lib.reported.MissingTableError` with the reason.
    """
    info = table_info(paper, table)
    if info["status"] == "missing":
        raise MissingTableError(f"{paper} Table {info['table']} is not in the paper text: {info['reason']}")
    long = load_reported(paper, info["table"])
    rows = long.sort_values("order", kind="stable").drop_duplicates("order")
    wide = long.pivot(index="order", columns=["dataset", "metric"], values="value")
    wide = wide.reindex(index=rows["order"], columns=pd.MultiIndex.from_tuples(_column_order(long),
                                                                               names=["dataset", "metric"]))
    wide.index = _row_index(rows)
    if not wide.index.is_unique:
        raise ValueError(f"{paper} Table {info['table']}: row labels are not unique: "
                         f"{wide.index[wide.index.duplicated()].tolist()}")
    notes = long[long["note"] != ""].groupby("order", sort=True)["note"].agg(_join_notes)
    labels = dict(zip(rows["order"], wide.index))
    wide.attrs = {"paper": paper, "table": info["table"], "caption": info["caption"], "kind": info["kind"],
                  "page": info["page"], "status": info["status"], "reason": info["reason"],
                  "notes": {labels[o]: text for o, text in notes.items()}}
    return wide
