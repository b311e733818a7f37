"""The papers' reported numbers: row counts, spot checks against the paper texts, schema, paper_table layout."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from tbps_lib.analysis.tables import paper_table
from tbps_lib.reported import (PAPERS, PERCENT_METRICS, MissingTableError, available_tables, load_reported,
                               missing_tables, parse_config, read_reported_csv, table_catalog)

C, I, R = "CUHK-PEDES", "ICFG-PEDES", "RSTPReid"


def _papers_dir() -> Path | None:
    """../shared/papers beside the clone (CI) or /work/shared/papers (the workbench); None if neither."""
    for cand in (Path(__file__).resolve().parents[2] / "shared" / "papers", Path("/work/shared/papers")):
        if cand.is_dir():
            return cand
    return None


def value(paper: str, table: str, row: str, dataset: str, metric: str, backbone: str | None = None) -> float:
    """The one reported value at (table, row, dataset, metric); fails unless exactly one matches."""
    df = load_reported(paper, table)
    hit = df[(df["row"] == row) & (df["dataset"] == dataset) & (df["metric"] == metric)]
    if backbone is not None:
        hit = hit[hit["backbone"] == backbone]
    assert len(hit) == 1, f"{paper} {table} {row!r} {dataset} {metric}: {len(hit)} matches"
    return float(hit["value"].iloc[0])


# (distinct rows, values) per table, counted by hand from the paper texts.
COUNTS = {
    ("sew_mcm", "1"): (30, 88), ("sew_mcm", "2"): (13, 39), ("sew_mcm", "3"): (11, 33),
    ("sew_mcm", "4"): (6, 18), ("sew_mcm", "5"): (4, 12), ("sew_mcm", "6"): (2, 24),
    ("part_level", "1"): (20, 109), ("part_level", "2"): (4, 36), ("part_level", "3"): (2, 6),
    ("part_level", "4"): (2, 18), ("part_level", "5"): (4, 12), ("part_level", "S2"): (3, 27),
    ("acsa", "I"): (20, 76), ("acsa", "II"): (2, 8), ("acsa", "III"): (6, 24), ("acsa", "IV"): (2, 8),
    ("acsa", "V"): (4, 16), ("acsa", "VI"): (4, 16),
    ("laip", "I"): (11, 35), ("laip", "II"): (9, 29), ("laip", "IV"): (8, 32), ("laip", "VI"): (4, 15),
    ("dssl", "1"): (12, 72), ("dssl", "2"): (5, 15), ("dssl", "3"): (2, 6), ("dssl", "4"): (5, 15),
    ("dssl", "5"): (2, 6), ("dssl", "6"): (18, 50),
}


def test_every_transcribed_table_is_counted():
    df = load_reported()
    assert set(zip(df["paper"], df["table"])) == set(COUNTS)
    assert len(df) == sum(v for _, v in COUNTS.values()) == 845


@pytest.mark.parametrize("key", sorted(COUNTS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_row_and_value_counts(key):
    df = load_reported(*key)
    assert (df["order"].nunique(), len(df)) == COUNTS[key]


# (paper, table, row, dataset, metric, printed value, backbone or None, text printed next to the number)
SPOTS = [
    ("sew_mcm", "1", "Ours+R+C", C, "R1", "73.81", None, "Ours+R+C"),
    ("sew_mcm", "2", "Ours", I, "R10", "81.78", None, "Ours\t-"),
    ("sew_mcm", "3", "ACSA", R, "R10", "81.45", None, "ACSA [15]"),
    ("sew_mcm", "4", "Model 4", C, "R1", "66.02", None, "4\t\t✓\t\t✓"),
    ("sew_mcm", "6", "Baseline+MCM", "RSTPReid->CUHK-PEDES", "R5", "25.20", None, "Baseline+MCM"),
    ("part_level", "1", "BEAT", R, "R10", "79.20", "RN50+BERT", "BEAT [31]"),
    ("part_level", "1", "Ours", I, "R1", "60.06", "ViT-B/16+BERT", "Ours\tViT-B/16"),
    ("part_level", "2", "Baseline", I, "R5", "72.69", None, "Baseline\t✗"),
    ("part_level", "4", "Separated Decoder", R, "R5", "72.3", None, "Separated Decoder"),
    ("part_level", "S2", "Coarse=6", R, "R1", "49.05", None, "\t6\t"),
    ("acsa", "I", "ACSA+RR", C, "R1", "68.67", None, "ACSA+RR"),
    ("acsa", "II", "DSSL (ACM MM'21)", R, "R10", "63.19", None, "DSSL (ACM MM'21)"),
    ("acsa", "V", "I,II,III", C, "R5", "81.40", None, "I,II,III\t"),
    ("acsa", "VI", "TIPCB", C, "Rsum", "234.93", "ResNet50+BERT", "TIPCB [51]"),
    ("laip", "I", "IRRA", C, "mAP", "66.13", None, "IRRA"),
    ("laip", "II", "ALBEF", I, "mAP", "19.98", None, "ALBEF"),
    ("laip", "IV", "+BackAtt", C, "R1", "75.37", None, "+BackAtt"),
    ("laip", "VI", "LAIP+", C, "R5", "90.42", None, "I \\Delta I P^+"),
    ("dssl", "1", "AlignI+AlignII+AlignIII", R, "R1", "31.00", None, "×\t✓\t✓\t✓\t×\t×"),
    ("dssl", "4", "r=0.25", C, "R5", "81.05", None, "0.25\t"),
    ("dssl", "5", "Euclidean Distance", C, "R1", "58.93", None, "Euclidean Distance"),
    ("dssl", "6", "NAFS + RVN", C, "R1", "61.50", None, "NAFS + RVN"),
]


@pytest.mark.parametrize("spot", SPOTS, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}-{s[4]}")
def test_spot_values(spot):
    paper, table, row, dataset, metric, printed, backbone, anchor = spot
    assert value(paper, table, row, dataset, metric, backbone) == float(printed)
    papers = _papers_dir()
    if papers is None:
        return  # the paper texts are not beside this clone: the value check above still ran
    text = (papers / PAPERS[paper]["file"]).read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(re.escape(anchor), text)]
    assert starts, f"{anchor!r} not found in {PAPERS[paper]['file']}"
    number = re.compile(rf"(?<![\d.]){re.escape(printed)}(?![\d])")
    assert any(number.search(text, s, s + 300) for s in starts), \
        f"{printed} is not printed within 300 characters after {anchor!r}"


def test_spot_checks_cover_every_paper():
    per_paper = pd.Series([s[0] for s in SPOTS]).value_counts()
    assert set(per_paper.index) == set(PAPERS) and per_paper.min() >= 3


# Differences the papers' running text quotes between two rows: a transcription slip breaks them.
# (paper, table, row_a, row_b, dataset, metric, quoted a - b, backbone of row_a, backbone of row_b)
QUOTED = [
    ("sew_mcm", "4", "Model 2", "Model 1", C, "R1", 1.90, None, None),
    ("sew_mcm", "4", "Model 2", "Model 1", C, "R10", 0.69, None, None),
    ("sew_mcm", "1", "Ours", "CFine", C, "R1", 2.64, None, None),
    ("sew_mcm", "2", "Ours", "CFine", I, "R5", 3.25, None, None),
    ("sew_mcm", "3", "Ours", "CFine", R, "R10", 3.30, None, None),
    ("part_level", "1", "Ours", "CAIBC", C, "R1", 1.21, "RN50+BERT", "RN50+BERT"),
    ("part_level", "1", "Ours", "BEAT", I, "R1", 0.34, "RN50+BERT", "RN50+BERT"),
    ("part_level", "1", "Ours", "IVT", R, "R1", 5.25, "ViT-B/16+BERT", "ViT-B/16+BERT"),
    ("acsa", "I", "ACSA+RR", "ACSA (Ours)", C, "R1", 5.11, None, None),
    ("acsa", "II", "ACSA (Ours)", "DSSL (ACM MM'21)", R, "R10", 18.26, None, None),
    ("acsa", "III", "Swin Transformer + BERT", "ResNet50 + Bi-LSTM", C, "R1", 17.12, None, None),
    ("acsa", "V", "I,II", "I", C, "R1", 1.36, None, None),
    ("laip", "IV", "+ForAtt", "Baseline+", C, "R1", 8.46, None, None),
    ("laip", "IV", "+MPM", "Baseline+", C, "mAP", 9.31, None, None),
    ("laip", "IV", "LAIP (Ours)", "+BidirAtts+MPM", C, "R1", 1.57, None, None),
    ("laip", "VI", "LAIP+", "LAIP", C, "mAP", 3.98, None, None),
    ("laip", "VI", "Baseline+", "Baseline", C, "mAP", 2.67, None, None),
    ("dssl", "1", "AlignI+AlignII+AlignIII+AlignIV+AlignV", "AlignI+AlignII+AlignIII", R, "R1", 1.43, None, None),
    ("dssl", "2", "MEC+SPSM+SPFM+SAM+SDM", "SAM+SDM", C, "R5", 2.79, None, None),
    ("dssl", "2", "MEC+SPSM+SPFM+SAM+SDM", "MEC+SPSM+SPFM+SAM", C, "R1", 2.52, None, None),
    ("dssl", "5", "Ranking Loss", "Euclidean Distance", C, "R1", 1.05, None, None),
]


@pytest.mark.parametrize("q", QUOTED, ids=lambda q: f"{q[0]}-{q[1]}-{q[2]}-{q[5]}")
def test_differences_quoted_in_the_text(q):
    paper, table, a, b, dataset, metric, diff, bb_a, bb_b = q
    got = value(paper, table, a, dataset, metric, bb_a) - value(paper, table, b, dataset, metric, bb_b)
    assert got == pytest.approx(diff, abs=1e-6)


def test_schema_required_columns_and_ranges():
    df = load_reported()
    for col in ("paper", "table", "row", "dataset", "metric"):
        assert (df[col] != "").all(), col
    assert df["value"].notna().all() and df["order"].notna().all()
    pct = df[df["metric"].isin(PERCENT_METRICS)]
    assert pct["value"].between(0, 100).all()
    rsum = df[df["metric"] == "Rsum"]
    assert len(rsum) > 0 and set(rsum["paper"]) == {"acsa"} and rsum["value"].between(0, 300).all()
    assert df["page"].dropna().between(1, 20).all()


def test_rows_are_consistent_and_orders_contiguous():
    df = load_reported()
    per_row = df.groupby(["paper", "table", "order"])[["row", "variant", "backbone", "config"]].nunique()
    assert (per_row == 1).all().all()
    for (paper, table), g in df.groupby(["paper", "table"]):
        assert sorted(g["order"].unique()) == list(range(1, g["order"].nunique() + 1)), (paper, table)
        assert not g.duplicated(["order", "dataset", "metric"]).any(), (paper, table)


def test_rsum_equals_the_three_ranks_except_the_noted_typo():
    wide = load_reported("acsa").pivot_table(index=["table", "order", "dataset"], columns="metric",
                                            values="value", aggfunc="first").dropna()
    off = wide[(wide["R1"] + wide["R5"] + wide["R10"] - wide["Rsum"]).abs() > 0.005]
    assert list(off.index) == [("VI", 1, C)]  # TIPCB: Total 234.93 vs sum 235.93, noted in the CSV
    note = load_reported("acsa", "VI").query("order == 1 and metric == 'Rsum'")["note"].iloc[0]
    assert "235.93" in note


def test_variants_match_row_labels():
    df = load_reported()
    reranked = df["row"].str.contains(r"\+ ?(?:R|RR|RVN)\b", regex=True)
    assert (df.loc[reranked, "variant"].str.startswith("+R")).all()
    assert (df.loc[~reranked, "variant"].isin(["", "+C"])).all()
    assert set(df.loc[df["row"].str.endswith("+C"), "variant"]) == {"+C", "+R+C"}


def test_ablation_rows_carry_configs():
    df = load_reported()
    cat = table_catalog()
    ablations = set(zip(cat.loc[cat["kind"] == "ablation", "paper"], cat.loc[cat["kind"] == "ablation", "table"]))
    for (paper, table), g in df.groupby(["paper", "table"]):
        for cfg in g["config"]:
            parse_config(cfg)  # raises if malformed
        if (paper, table) in ablations:
            bare = g[(g["config"] == "") & (g["backbone"] == "")]
            assert bare.empty, f"{paper} {table}: rows without config {sorted(set(bare['row']))}"
    assert parse_config("coarse=1;fine=0;cmr=0") == {"coarse": "1", "fine": "0", "cmr": "0"}
    with pytest.raises(ValueError, match="not key=value"):
        parse_config("coarse=1;fine")


def test_own_rows_name_the_method():
    own = load_reported("sew_mcm", "1").query("row == 'Ours+R+C'")["config"].iloc[0]
    assert parse_config(own) == {"method": "sew_mcm", "rerank": "1", "image_pretrain": "clip"}
    sew4 = parse_config(load_reported("sew_mcm", "4").query("row == 'Model 3'")["config"].iloc[0])
    assert sew4["sew_margin"] == "fixed" and sew4["mcm"] == "0"


def test_catalog_and_missing_tables():
    cat = table_catalog()
    expected = {"sew_mcm": ["1", "2", "3", "4", "5", "6"], "part_level": ["1", "2", "3", "4", "5", "S2"],
                "acsa": ["I", "II", "III", "IV", "V", "VI"], "laip": ["I", "II", "III", "IV", "V", "VI"],
                "dssl": ["1", "2", "3", "4", "5", "6"]}
    assert {p: available_tables(p) for p in PAPERS} == expected
    missing = missing_tables()
    assert list(zip(missing["paper"], missing["table"])) == [("laip", "III"), ("laip", "V")]
    assert missing["reason"].str.contains("caption").all()
    assert load_reported("laip", "III").empty
    transcribed = set(zip(cat.loc[cat["status"] != "missing", "paper"], cat.loc[cat["status"] != "missing", "table"]))
    assert transcribed == set(COUNTS)
    assert cat.set_index(["paper", "table"]).loc[("laip", "VI"), "status"] == "partial"


def test_omitted_cell_is_absent_and_noted():
    vi = load_reported("laip", "VI").query("row == 'LAIP'")
    assert set(vi["metric"]) == {"R1", "R5", "mAP"}
    assert vi["note"].str.contains("9046").all()


def test_paper_files_exist_when_papers_are_present():
    papers = _papers_dir()
    if papers is None:
        pytest.skip("../shared/papers is not beside this clone")
    for meta in PAPERS.values():
        assert (papers / meta["file"]).is_file(), meta["file"]


def test_unknown_paper_and_table_errors_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown paper 'sew'; available: sew_mcm, part_level, acsa, laip, dssl"):
        load_reported("sew")
    with pytest.raises(ValueError, match=r"has no table 'VII'; available: I, II, III, IV, V, VI"):
        paper_table("laip", "VII")
    with pytest.raises(ValueError, match="unknown paper"):
        paper_table("clip", "1")
    with pytest.raises(ValueError, match="pass paper="):
        load_reported(table="1")
    with pytest.raises(MissingTableError, match="laip Table III is not in the paper text"):
        paper_table("laip", "III")


@pytest.mark.parametrize("bad, message", [
    ("sew_mcm,1,1,X,,,CUHK-PEDES,R1,-,,,", "value '-' is not a number"),
    ("sew_mcm,1,1,X,,,CUHK-PEDES,R1,101.5,,,", "outside 0..100"),
    ("sew_mcm,1,1,X,,,CUHK-PEDES,Top1,50.1,,,", "unknown metric 'Top1'"),
    ("sew_mcm,1,1,X,,,CUHK,R1,50.1,,,", "unknown dataset 'CUHK'"),
    ("sew_mcm,1,1,,,,CUHK-PEDES,R1,50.1,,,", "required column 'row' is empty"),
    ("dssl,1,1,X,,,CUHK-PEDES,R1,50.1,,,", "paper 'dssl' in the file of paper 'sew_mcm'"),
    ("sew_mcm,1,1,X,+RR,,CUHK-PEDES,R1,50.1,,,", "unknown variant '\\+RR'"),
    ("sew_mcm,1,1,X,,,CUHK-PEDES,R1,50.1,,mcm,", "not key=value"),
    ("sew_mcm,1,1,X,,,CUHK-PEDES,R1,50.1,,", "wrong number of fields"),
])
def test_bad_csv_record_names_file_and_line(tmp_path, bad, message):
    header = "paper,table,order,row,variant,backbone,dataset,metric,value,page,config,note"
    good = "sew_mcm,1,1,X,,,CUHK-PEDES,R5,60.00,,,"
    path = tmp_path / "sew_mcm.csv"
    path.write_text(f"{header}\n{good}\n{bad}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"sew_mcm\.csv:3: .*{message}"):
        read_reported_csv(path, "sew_mcm")


def test_bad_csv_header_is_named(tmp_path):
    path = tmp_path / "acsa.csv"
    path.write_text("paper,table,row,value\nacsa,I,X,1.0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"acsa\.csv: header"):
        read_reported_csv(path, "acsa")


# ---------------------------------------------------------------- paper_table layout

@pytest.mark.parametrize("key", sorted(COUNTS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_paper_table_keeps_every_row_and_value(key):
    wide = paper_table(*key)
    n_rows, n_values = COUNTS[key]
    assert wide.shape[0] == n_rows and wide.index.is_unique
    assert int(wide.notna().sum().sum()) == n_values
    assert list(wide.columns.names) == ["dataset", "metric"]


def test_paper_table_sew_1_layout():
    wide = paper_table("sew_mcm", 1)
    assert list(wide.index[:2]) == ["GNA-RNN", "Dual-path"] and wide.index[-1] == "Ours+R+C"
    assert list(wide.columns) == [(C, "R1"), (C, "R5"), (C, "R10")]
    assert math.isnan(wide.loc["GNA-RNN", (C, "R5")])
    assert wide.loc["Ours+R", (C, "R10")] == 91.23
    assert wide.attrs["caption"].startswith("Comparison with state-of-the-art methods on the CUHK-PEDES")


def test_paper_table_with_backbones_and_blocks():
    pl = paper_table("part_level", "1")
    assert pl.index.names == ["row", "backbone"]
    assert pl.loc[("Ours", "ViT-B/16+BERT"), (R, "R1")] == 51.95
    assert [d for d in dict.fromkeys(pl.columns.get_level_values(0))] == [C, I, R]
    sew6 = paper_table("sew_mcm", "6")
    assert list(sew6.index) == ["Baseline", "Baseline+MCM"]
    assert list(dict.fromkeys(sew6.columns.get_level_values(0))) == [
        "CUHK-PEDES->ICFG-PEDES", "ICFG-PEDES->CUHK-PEDES", "CUHK-PEDES->RSTPReid", "RSTPReid->CUHK-PEDES"]
    assert sew6.loc["Baseline+MCM", ("CUHK-PEDES->RSTPReid", "R1")] == 39.25
    acsa = paper_table("acsa", "I")
    assert list(acsa.columns.get_level_values(1)) == ["R1", "R5", "R10", "Rsum"]


def test_paper_table_attrs_carry_notes():
    wide = paper_table("laip", "VI")
    assert wide.attrs["status"] == "partial" and wide.attrs["page"] == "8"
    assert "9046" in wide.attrs["notes"]["LAIP"]
    assert math.isnan(wide.loc["LAIP", (C, "R10")])
    assert "5.42/3.32/2.22" in paper_table("sew_mcm", "4").attrs["notes"]["Model 6"]
