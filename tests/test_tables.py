"""Reproduction tables: reported beside measured, deltas, sign agreement, statuses, cross-domain rows, the
leaderboard, and find_run.

A fake paper ``toytab`` (its reported numbers served in place of ``tbps_lib.reported``) is reproduced by a
fake method of the same name: the toy dual encoder of test_trainer with a ``paper_rows`` mapping
(``dim=<n>`` -> ``model.dim``; ``dim=99`` is not reproducible). Two toy runs are trained once per module
(seconds on a CPU); everything else only reads the registry.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from tbps_lib.analysis import tables
from tbps_lib.analysis.leaderboard import leaderboard, query_latency
from tbps_lib.analysis.tables import (STATUSES, STEPS, RowPlan, RunLookup, mark_repeats, measure_row,
                                      paired_difference, paper_tables_text, reproduction_table, sign_agreement,
                                      sign_summary, step_result)
from tbps_lib.config import config_hash, make_config
from tbps_lib.engine.runs import find_run, train_or_load
from tbps_lib.models import registry
from tbps_lib.reported import COLUMNS, load_reported, table_catalog
from test_trainer import ToyConfig, ToyModel, _toy_smoke, write_toy_dataset

FAKE = "toytab"
C, I = "CUHK-PEDES", "ICFG-PEDES"


def _paper_rows(flags, preset):
    if flags.get("dim") == "99":
        raise registry.NotReproducible("dim 99 does not fit the smoke preset")
    return {"model.dim": int(flags["dim"])}


def _cell(table, order, row, dataset, metric, value, config="", variant=""):
    return {"paper": FAKE, "table": table, "order": order, "row": row, "variant": variant, "backbone": "",
            "dataset": dataset, "metric": metric, "value": value, "page": pd.NA, "config": config, "note": ""}


FAKE_CELLS = [
    _cell("A", 1, "Small", C, "R1", 40.0, "dim=8"), _cell("A", 1, "Small", C, "R5", 70.0, "dim=8"),
    _cell("A", 2, "Base", C, "R1", 50.0, "dim=16"), _cell("A", 2, "Base", C, "R5", 80.0, "dim=16"),
    _cell("A", 3, "Huge", C, "R1", 60.0, "dim=99"),
    _cell("A", 4, "Other", C, "R1", 45.0),
    _cell("A", 5, "Ours+C", C, "R1", 70.0, f"method={FAKE};image_pretrain=clip", "+C"),
    _cell("C", 1, "Ours", C, "R1", 55.0, f"method={FAKE}"),
    _cell("C", 2, "Ours+R", C, "R1", 58.0, f"method={FAKE};rerank=1", "+R"),
    _cell("X", 1, "Base", f"{C}->{I}", "R1", 30.0, "dim=16"),
    _cell("X", 2, "Small", f"{C}->{I}", "R1", 20.0, "dim=8"),
]
FAKE_KIND = {"A": "ablation", "C": "comparison", "X": "ablation"}


@pytest.fixture(autouse=True, scope="module")
def _fake_method():
    registry.register_method(FAKE, ToyConfig, {"smoke": _toy_smoke}, paper_rows=_paper_rows)(ToyModel)
    yield
    registry._REGISTRY.pop(FAKE, None)


@pytest.fixture(autouse=True)
def _fake_paper(monkeypatch):
    """Serve the fake paper's tables through the functions tables.py reads the reported numbers with."""
    real_info, real_load, real_available = tables.table_info, tables.load_reported, tables.available_tables
    fake = pd.DataFrame(FAKE_CELLS, columns=list(COLUMNS))

    def table_info(paper, table):
        if paper != FAKE:
            return real_info(paper, table)
        return {"paper": FAKE, "table": str(table), "kind": FAKE_KIND[str(table)], "status": "complete", "page": "",
                "caption": f"fake table {table}", "reason": ""}

    def load_reported(paper=None, table=None):
        if paper != FAKE:
            return real_load(paper, table)
        return fake[fake["table"] == str(table)].reset_index(drop=True).copy()

    monkeypatch.setattr(tables, "table_info", table_info)
    monkeypatch.setattr(tables, "load_reported", load_reported)
    monkeypatch.setattr(tables, "available_tables",
                        lambda paper: list(FAKE_KIND) if paper == FAKE else real_available(paper))
    monkeypatch.setitem(STEPS, (FAKE, "A"), ((1, 2, "wider"), (2, 3, "huge")))
    monkeypatch.setitem(STEPS, (FAKE, "C"), ((1, 2, "re-ranking"),))
    monkeypatch.setitem(STEPS, (FAKE, "X"), ((2, 1, "wider"),))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tables")
    return {C: write_toy_dataset(root / "a"), I: write_toy_dataset(root / "b", n_test=4, seed=3)}


@pytest.fixture(scope="module")
def registry_dir(data, tmp_path_factory) -> tuple[Path, dict[int, object]]:
    """A run registry holding the toy runs of dim 16 and dim 8 on dataset A, seeds 0 and 1 (``trained[dim]``
    is seed 0, ``trained[dim, seed]`` any seed)."""
    root = tmp_path_factory.mktemp("registry")
    trained = {(dim, seed): train_or_load(make_config(FAKE, "smoke", str(data[C]), {"model.dim": dim, "seed": seed}),
                                          runs_dir=root, progress=False, device="cpu")
               for dim in (16, 8) for seed in (0, 1)}
    trained.update({dim: trained[dim, 0] for dim in (16, 8)})
    return root, trained


def _lookup(data, runs_dir, seeds: int = 2) -> RunLookup:
    return RunLookup("smoke", runs_dir, sources={k: str(v) for k, v in data.items()}, device="cpu", seeds=seeds)


def _mean(trained, dim, metric="R1", seeds=(0, 1)) -> float:
    return sum(trained[dim, s].metrics["test"][metric] for s in seeds) / len(seeds)


def _line(frame, order, dataset=C):
    hit = frame[(frame["order"] == order) & (frame["dataset"] == dataset)]
    assert len(hit) == 1
    return hit.iloc[0]


# ----------------------------------------------------------------------------------------------------
# Statuses without runs


def test_statuses_and_reasons_before_any_run(data, tmp_path):
    frame = reproduction_table(FAKE, "A", lookup=_lookup(data, tmp_path / "empty"))
    assert frame["status"].tolist() == ["not run yet", "not run yet", "not reproducible", "not implemented",
                                        "not reproducible"]
    assert _line(frame, 3)["reason"] == "dim 99 does not fit the smoke preset"
    assert _line(frame, 4)["reason"] == "another paper's method"
    assert "CLIP" in _line(frame, 5)["reason"]
    small = _line(frame, 1)
    assert small["train"].startswith(f"tbps train --method {FAKE} --preset smoke --dataset {data[C]}")
    assert "--set model.dim=8" in small["train"]
    assert frame[[c for c in frame.columns if c.endswith(" ours")]].isna().all().all()  # nothing made up
    assert _line(frame, 2)["R1 paper"] == 50.0 and math.isnan(_line(frame, 3)["R5 paper"])
    assert _line(frame, 2)["sign"] == "vs Small: not measured"


def test_find_run_does_not_load_data_when_nothing_can_match(data, tmp_path):
    def boom(cfg):
        raise AssertionError("the dataset should not be loaded")

    cfg = make_config(FAKE, "smoke", str(data[C]))
    assert find_run(cfg, tmp_path / "empty", load=boom) is None


def test_real_tables_without_runs(tmp_path):
    lookup = RunLookup("smoke", tmp_path / "empty")
    sew = reproduction_table("sew_mcm", "1", lookup=lookup)
    assert len(sew) == 30 and set(sew["status"]) <= set(STATUSES)
    assert _line(sew, 1)["status"] == "not implemented"  # GNA-RNN
    assert _line(sew, 30)["status"] == "not reproducible" and "CLIP" in _line(sew, 30)["reason"]
    assert sew["R1 paper"].tolist() == pd.to_numeric(
        load_reported("sew_mcm", "1").query("metric == 'R1'").set_index("order")["value"]).reindex(
        sew["order"]).tolist()
    acsa = reproduction_table("acsa", "I", lookup=lookup)
    cmpm = acsa[acsa["row"] == "CMPM+CMPC (ECCV'18)"].iloc[0]  # the workbook's baseline stands in for it
    assert cmpm["status"] == "not run yet" and cmpm["train"].startswith("tbps train --method baseline")
    assert "Rsum paper" in acsa.columns
    tipcb = reproduction_table("acsa", "VI", lookup=lookup)
    assert tipcb.loc[tipcb["row"] == "TIPCB", "status"].eq("not implemented").all()


def test_dataset_filter_and_paper_preset_without_data(monkeypatch, tmp_path):
    lookup = RunLookup("smoke", tmp_path / "empty")
    part = reproduction_table("part_level", "2", dataset="RSTPReid", lookup=lookup)
    assert set(part["dataset"]) == {"RSTPReid"} and len(part) == 4
    with pytest.raises(ValueError, match="has no dataset 'ICFG'"):
        reproduction_table("part_level", "2", dataset="ICFG", lookup=lookup)
    monkeypatch.delenv("TBPS_CUHK_PEDES_ROOT", raising=False)
    paper = reproduction_table("acsa", "I", preset="paper", runs_dir=tmp_path / "empty")
    cmpm = paper[paper["row"] == "CMPM+CMPC (ECCV'18)"].iloc[0]
    assert cmpm["status"] == "not reproducible" and "TBPS_CUHK_PEDES_ROOT" in cmpm["reason"]
    with pytest.raises(ValueError, match="lookup is for preset 'smoke'"):
        reproduction_table("acsa", "I", preset="paper", lookup=lookup)


# ----------------------------------------------------------------------------------------------------
# Measured rows


def test_measured_beside_reported_with_delta_provenance_and_sign(data, registry_dir):
    root, trained = registry_dir
    frame = reproduction_table(FAKE, "A", lookup=_lookup(data, root))
    assert frame["status"].tolist()[:2] == ["measured", "measured"]
    for order, dim in ((1, 8), (2, 16)):
        line, run = _line(frame, order), trained[dim]
        values = [trained[dim, s].metrics["test"]["R1"] for s in (0, 1)]
        assert line["R1 ours"] == pytest.approx(_mean(trained, dim))  # mean over the two seeds
        assert line["R5 ours"] == pytest.approx(_mean(trained, dim, "R5"))
        assert line["R1 sd"] == pytest.approx(pd.Series(values).std(ddof=1))
        assert line["R1 by seed"] == pytest.approx(tuple(values)) and line["seeds"] == "2/2"
        assert line["runs"] == ",".join(config_hash(trained[dim, s].config) for s in (0, 1))
        assert line["R1 Δ"] == pytest.approx(line["R1 ours"] - line["R1 paper"])
        assert line["config"] == config_hash(run.config) and line["data"] == str(data[C])
        assert line["preset"] == "smoke" and line["init"] == "random/random" and line["train"] == ""
        assert line["backbones"] == f"{run.config.image.arch}+{run.config.text.arch}"
    diffs = [trained[16, s].metrics["test"]["R1"] - trained[8, s].metrics["test"]["R1"] for s in (0, 1)]
    ours, noise, _ = paired_difference([0.0, 0.0], diffs)
    expected = step_result(10.0, ours, noise)  # the paper's step Small -> Base is +10 points
    steps = sign_agreement(frame)
    first = steps.iloc[0]
    assert (first["from"], first["to"], first["paper Δ"], first["result"]) == ("Small", "Base", 10.0, expected)
    assert first["ours Δ"] == pytest.approx(sum(diffs) / 2) and first["n"] == 2
    assert first["noise"] == pytest.approx(2 * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2))
    assert steps.iloc[1]["result"] == "not measured"  # Huge is not reproducible
    assert _line(frame, 2)["sign"] == f"vs Small: {expected}"


def test_reranked_row_is_the_same_run_evaluated_with_visual_neighbours(data, registry_dir):
    root, trained = registry_dir
    frame = reproduction_table(FAKE, "C", lookup=_lookup(data, root))
    plain, reranked = _line(frame, 1), _line(frame, 2)
    assert plain["config"] == reranked["config"] == config_hash(trained[16].config)
    assert reranked["rerank"] == "visual_neighbors" and plain["rerank"] == ""
    per_seed = [trained[16, s].evaluate("test", rerank="visual_neighbors")["R1"] for s in (0, 1)]
    assert reranked["R1 ours"] == pytest.approx(sum(per_seed) / 2)
    assert plain["R1 ours"] == pytest.approx(_mean(trained, 16))
    step = sign_agreement(frame).iloc[0]  # one config, but re-ranked: a real step, not "same run"
    assert step["result"] in ("agree", "disagree", "within noise")


def test_cross_domain_row_trains_on_the_first_and_tests_on_the_second(data, registry_dir):
    root, trained = registry_dir
    frame = reproduction_table(FAKE, "X", lookup=_lookup(data, root))
    base = _line(frame, 1, f"{C}->{I}")
    assert base["status"] == "measured" and base["data"] == f"{data[C]} -> {data[I]}"
    expected = [trained[16, s].evaluate("test", dataset=str(data[I]))["R1"] for s in (0, 1)]
    assert base["R1 ours"] == pytest.approx(sum(expected) / 2)
    assert list((trained[16].dir / "embeddings").glob("*/test.pt"))  # B's test split, encoded by the A-run
    assert base["sign"].startswith("vs Small: ")


# ----------------------------------------------------------------------------------------------------
# Sign agreement


@pytest.mark.parametrize("paper_delta, ours_delta, noise, same, result", [
    (2.0, 0.5, 0.4, False, "agree"), (-1.0, -3.0, 1.0, False, "agree"), (2.0, -0.5, 0.1, False, "disagree"),
    (2.0, 0.5, 0.6, False, "within noise"), (2.0, -0.5, 0.5, False, "within noise"),  # inside the band
    (2.0, 0.0, 0.0, False, "within noise"), (-2.0, 0.0, 0.3, False, "within noise"),  # zero: never disagree
    (2.0, 0.5, math.nan, False, "too few seeds"),
    (0.0, 1.0, 0.1, False, "paper: no change"), (1.0, math.nan, 0.1, False, "not measured"),
    (math.nan, 1.0, 0.1, False, "paper: not reported"), (1.0, 0.0, 0.0, True, "same run")])
def test_step_result(paper_delta, ours_delta, noise, same, result):
    assert step_result(paper_delta, ours_delta, noise, same) == result


def test_paired_difference_is_two_standard_errors_of_the_same_seed_differences():
    # d = (1, 3, 2): mean 2, sd 1, n 3 -> noise 2 / sqrt(3); seed 3 is missing in one row and is left out
    mean, noise, n = paired_difference([10.0, 10.0, 10.0, 5.0], [11.0, 13.0, 12.0, math.nan])
    assert (mean, n) == (2.0, 3) and noise == pytest.approx(2.0 / math.sqrt(3))
    assert step_result(1.0, mean, noise) == "agree" and step_result(-1.0, mean, noise) == "disagree"
    # a seed effect shared by both rows cancels: unpaired the spread would hide the +1 step
    mean, noise, _ = paired_difference([10.0, 20.0, 30.0], [11.0, 21.1, 30.9])
    assert mean == pytest.approx(1.0) and noise < 0.2
    assert paired_difference([1.0], [2.0])[1] != paired_difference([1.0], [2.0])[1]  # one pair: NaN noise
    assert paired_difference([math.nan], [2.0])[2] == 0


def test_sign_summary_counts(data, registry_dir, tmp_path):
    root, _ = registry_dir
    lookup = _lookup(data, root)
    frames = {FAKE: {t: reproduction_table(FAKE, t, lookup=lookup) for t in FAKE_KIND}}
    steps = pd.concat([sign_agreement(f) for f in frames[FAKE].values()])
    summary = sign_summary(frames).loc[FAKE]
    assert summary["steps"] == len(steps) == 4
    # Table A Small -> Base and Table X Base -> Small (another test set) are different pairs; C re-ranks
    assert summary["agree"] + summary["disagree"] + summary["within noise"] == summary["measured"] == 3
    assert summary["not measured"] == 1 and summary["repeated pair"] == 0
    assert summary["agree %"] == pytest.approx(100 * summary["agree"] / 3)


def test_a_pair_of_runs_standing_for_several_steps_counts_once():
    line = {"paper": "p", "table": "1", "from": "a", "to": "b", "to_order": 2, "what": "x", "dataset": C,
            "metric": "R1", "paper Δ": 1.0, "ours Δ": 2.0, "noise": 0.5, "n": 3, "result": "agree",
            "pair": "h1,h2|| -> h3,h4||"}
    steps = pd.DataFrame([line, {**line, "table": "2"}, {**line, "pair": "h1,h2|| -> h5,h6||"},
                          {**line, "paper": "q"}, {**line, "table": "3", "result": "not measured", "pair": ""}])
    assert mark_repeats(steps)["repeat"].tolist() == [False, True, False, False, False]


def test_a_row_missing_a_seed_says_so_and_averages_what_it_has(data, registry_dir):
    root, trained = registry_dir
    frame = reproduction_table(FAKE, "A", lookup=_lookup(data, root, seeds=3))
    line = _line(frame, 2)
    assert line["status"] == "measured" and line["seeds"] == "2/3"
    assert line["R1 ours"] == pytest.approx(_mean(trained, 16))
    assert math.isnan(line["R1 by seed"][2]) and "--set seed=2" in line["train"]
    one = reproduction_table(FAKE, "A", lookup=_lookup(data, root, seeds=1))
    assert _line(one, 2)["seeds"] == "1/1" and math.isnan(_line(one, 2)["R1 sd"])
    assert sign_agreement(one).iloc[0]["result"] == "too few seeds"


@pytest.mark.parametrize("variant", ["visual_neighbors", "k_reciprocal"])
def test_evaluation_only_variant_rows(data, registry_dir, variant):
    root, trained = registry_dir
    lookup = _lookup(data, root, seeds=1)
    got = measure_row(RowPlan(method=FAKE, changes={"model.dim": 16}, rerank=variant), C, lookup)
    assert got["rerank"] == variant and got["status"] == "measured"
    assert got["metrics"]["R1"] == pytest.approx(trained[16].evaluate("test", rerank=variant)["R1"])
    with pytest.raises(ValueError, match="RowPlan.rerank"):
        RowPlan(method=FAKE, rerank="nearest")
    assert tables.plan_row(FAKE, "C", 2, "Ours+R", "+R", f"method={FAKE};rerank=k_reciprocal").rerank == "k_reciprocal"


def test_steps_name_rows_of_the_tables():
    catalog = table_catalog()
    known = set(zip(catalog["paper"], catalog["table"]))
    for (paper, table), steps in STEPS.items():
        if paper == FAKE:
            continue
        assert (paper, table) in known
        long = load_reported(paper, table)
        for a, b, what in steps:
            assert a != b and what
            shared = set(long.loc[long["order"] == a, "dataset"]) & set(long.loc[long["order"] == b, "dataset"])
            assert shared and "R1" in set(long.loc[long["order"].isin([a, b]), "metric"]), (paper, table, a, b)
    ablations = catalog[(catalog["kind"] == "ablation") & (catalog["status"] != "missing")]
    assert set(zip(ablations["paper"], ablations["table"])) <= set(STEPS)


def test_paper_tables_text_prints_every_table():
    text = paper_tables_text("laip")
    assert "laip Table III (comparison, p. 4)" in text and "not in the paper text" in text
    assert "75.37" in text and "partial:" in text  # +BackAtt R1 in Table IV; Table VI's omitted cell


# ----------------------------------------------------------------------------------------------------
# Leaderboard


def test_leaderboard_measures_the_runs_and_lists_the_missing(data, registry_dir):
    root, trained = registry_dir
    run = trained[16]
    board = leaderboard(str(data[C]), runs_dir=root, methods=[FAKE, "baseline"], n_queries=5, warmup=2)
    assert board["method"].tolist() == [FAKE, "baseline"]
    toy, base = board.iloc[0], board.iloc[1]
    assert toy["status"] == "measured" and toy["R1"] == pytest.approx(run.metrics["test"]["R1"])
    assert toy["train_s"] == run.metrics["wall_time_s"] and toy["config"] == config_hash(run.config)
    assert toy["params_M"] == pytest.approx(sum(p.numel() for p in run.model.parameters()) / 1e6)
    assert toy["query_ms"] > 0
    assert base["status"] == "not run yet" and base["reason"].startswith("tbps train --method baseline")
    assert math.isnan(base["R1"]) and math.isnan(base["query_ms"])
    assert toy["stale"] == False and toy["reason"] == ""  # noqa: E712


def test_leaderboard_marks_runs_made_by_other_code(data, registry_dir, monkeypatch):
    from tbps_lib.engine import runs

    root, _ = registry_dir
    monkeypatch.setattr(runs, "sources_hash", lambda package_dir=None: "f" * 16)  # as if the library changed
    board = leaderboard(str(data[C]), runs_dir=root, methods=[FAKE], n_queries=3, warmup=1)
    assert board.loc[0, "status"] == "measured" and board.loc[0, "stale"] == True  # noqa: E712
    assert board.loc[0, "reason"].startswith("stale: trained by other code (sources ")


def test_query_latency_times_single_queries_after_warmup(registry_dir):
    _, trained = registry_dir
    out = query_latency(trained[16], n_queries=4, warmup=2)
    assert out["queries"] == 4 and out["gallery"] == 12 and out["query_ms"] > 0


def test_find_run_returns_the_finished_run_and_never_trains(data, registry_dir):
    root, trained = registry_dir
    found = find_run(make_config(FAKE, "smoke", str(data[C]), {"model.dim": 8}), root, device="cpu")
    assert found is not None and found.dir == trained[8].dir and found.status == "done"
    before = sorted(p.name for p in root.iterdir())
    assert find_run(make_config(FAKE, "smoke", str(data[C]), {"model.dim": 4}), root) is None
    assert sorted(p.name for p in root.iterdir()) == before  # no folder was created for the missing run


def test_step_delta_figure_draws_each_counted_pair_once():
    from tbps_lib.analysis.figures import step_delta_figure

    line = {"paper": "p", "table": "1", "from": "a", "to": "b", "to_order": 2, "what": "x", "dataset": C,
            "metric": "R1", "paper Δ": 1.0, "ours Δ": 2.0, "noise": 0.5, "n": 3, "result": "agree",
            "pair": "k1"}
    steps = mark_repeats(pd.DataFrame([line, {**line, "table": "2"}, {**line, "pair": "k2", "result": "within noise"},
                                       {**line, "pair": "", "result": "not measured"}]))
    fig = step_delta_figure(steps, "p")
    ax = fig.axes[0]
    assert len(ax.get_yticks()) == 2 and ax.get_title() == "p: 1 agree, 0 disagree, 1 within noise"
    empty = step_delta_figure(steps, "q")
    assert "no step measured" in empty.axes[0].texts[0].get_text()
    import matplotlib.pyplot as plt

    plt.close(fig), plt.close(empty)


def test_more_seeds_read_each_dataset_once(data, registry_dir, monkeypatch):
    from tbps_lib.data import catalog

    root, _ = registry_dir
    calls = []
    real = catalog.load_dataset
    monkeypatch.setattr(catalog, "load_dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    frame = reproduction_table(FAKE, "A", lookup=_lookup(data, root, seeds=3))
    assert (frame["status"] == "measured").sum() == 2 and len(calls) == 1  # 2 rows x 3 seeds, one read


def test_reproduction_rows_mark_runs_made_by_other_code(data, registry_dir, monkeypatch):
    from tbps_lib.engine import runs

    root, _ = registry_dir
    fresh = reproduction_table(FAKE, "A", lookup=_lookup(data, root))
    assert (fresh["stale"].iloc[:2] == "").all() and "stale" not in fresh["reason"].iloc[0]
    monkeypatch.setattr(runs, "sources_hash", lambda package_dir=None: "f" * 16)  # as if the library changed
    frame = reproduction_table(FAKE, "A", lookup=_lookup(data, root))
    line = _line(frame, 1)
    assert line["status"] == "measured" and line["stale"] == "2/2"
    assert "stale run(s) of seed(s) [0, 1]" in line["reason"]


def test_reproduce_plan_is_what_the_notebooks_train():
    """`tbps reproduce` trains the default run of each method plus the rows of the tables its notebook
    trains in the budget (the registry's `trained_tables`), with the budget's seeds and changes."""
    from tbps_lib.analysis.tables import plan_tables, reproduce_plan, trained_tables
    from tbps_lib.config import BUDGETS, NotebookParams, config_diff, config_hash, make_config

    ci = BUDGETS["ci"]
    params = NotebookParams(mode="smoke", data="synthetic:cuhk-like", runs="", budget="ci", seeds=ci.seeds,
                            train_changes=ci.changes)
    plan = reproduce_plan(["baseline", "sew_mcm"], params)
    assert trained_tables("sew_mcm", "ci") == {"4": None} and trained_tables("baseline", "full") == {}
    default = plan[plan["table"] == "default"]
    assert default["method"].tolist() == ["baseline", "sew_mcm"]
    assert default["hash"].tolist() == [config_hash(make_config(m, "smoke", "synthetic:cuhk-like"))
                                        for m in ("baseline", "sew_mcm")]
    figures = plan[plan["table"] == "figures"]  # notebooks 09-11: the default runs with the budget's changes
    assert figures["hash"].tolist() == [config_hash(make_config(m, "smoke", "synthetic:cuhk-like", params.changes))
                                        for m in ("baseline", "sew_mcm")]
    assert all(c.optim.max_steps == 12 for c in figures["config"])
    full = reproduce_plan(["baseline"], NotebookParams(mode="smoke", data="synthetic:cuhk-like", runs=""))
    # no changes in the full budget: 09-11 load the default runs; notebook 02's random-init baseline is planned
    assert full[["table", "row"]].values.tolist() == [["default", "default"], ["extra", "random init"]]
    random_init = full.set_index("row").loc["random init", "config"]
    assert (random_init.image.pretrained, random_init.text.pretrained) == (None, None)  # "none" reads as None
    assert [line.split(":")[0] for line in config_diff(full["config"].iloc[0], random_init)] == [
        "image.pretrained", "text.pretrained"]
    rows = plan[~plan["table"].isin(["default", "figures", "extra"])]
    lookup = RunLookup("smoke", seeds=ci.seeds, changes=params.changes)
    assert rows["hash"].tolist() == plan_tables("sew_mcm", ("4",), "smoke", lookup)["hash"].tolist()
    assert set(rows["seed"]) == {0, 1} and all(c.optim.max_steps == 12 for c in rows["config"])
    with pytest.raises(ValueError, match="unknown budget"):
        trained_tables("sew_mcm", "weekly")


def test_reproduce_plan_trains_notebook_06s_variants_in_the_full_budget():
    """Notebook 06's Table V / Figure 6 variants are single-seed runs of the default config with SWEEPS'
    changes: planned (so `tbps reproduce` trains them, two at a time) in the full budget only."""
    from tbps_lib.analysis.laip_figures import SWEEPS
    from tbps_lib.analysis.tables import notebook_extras, reproduce_plan
    from tbps_lib.config import NotebookParams, config_hash, make_config

    plan = reproduce_plan(["laip"], NotebookParams.of("full", "smoke", "synthetic:cuhk-like", ""))
    extra = plan[plan["table"] == "extra"].set_index("row")
    assert set(extra.index) == {label for label, changes in SWEEPS.items() if changes} and len(extra) == 4
    for label, changes in SWEEPS.items():  # the configs notebook 06 asks for, "LAIP" being the default run
        cfg = make_config("laip", "smoke", "synthetic:cuhk-like", changes)
        assert config_hash(cfg) in set(plan["hash"]) and cfg.seed == 0
    assert notebook_extras("laip", "ci", "smoke") == {} and notebook_extras("laip", "full", "paper") == {}
    ci = reproduce_plan(["laip"], NotebookParams.of("ci", "smoke", "synthetic:cuhk-like", ""))
    assert "extra" not in set(ci["table"])


def test_reproduce_plan_of_the_paper_check(monkeypatch, tmp_path):
    """The ``check`` budget (the paper path's smoke test) plans the ``full`` tables in paper mode, one seed,
    every run capped at one step, the default runs included; without it paper mode trains only the
    default runs, uncapped."""
    from tbps_lib.analysis.tables import reproduce_plan, trained_tables
    from tbps_lib.config import NotebookParams

    monkeypatch.setenv("TBPS_CUHK_PEDES_ROOT", str(tmp_path))  # a root makes CUHK-PEDES rows plannable
    assert trained_tables("sew_mcm", "check") == trained_tables("sew_mcm", "full")
    plan = reproduce_plan(["sew_mcm"], NotebookParams.of("check", "paper", "synthetic:cuhk-like", ""))
    assert set(plan["table"]) == {"default", "4"} and set(plan["seed"]) == {0}
    assert all(c.optim.max_steps == 1 and c.preset == "paper" for c in plan["config"])
    full = reproduce_plan(["sew_mcm"], NotebookParams.of("full", "paper", "synthetic:cuhk-like", ""))
    assert full["table"].tolist() == ["default"] and full["config"].iloc[0].optim.max_steps is None


def test_plan_tables_keeps_only_the_chosen_rows():
    from tbps_lib.analysis.tables import plan_tables

    lookup = RunLookup("smoke", seeds=1)
    chosen = plan_tables("sew_mcm", {"4": ("Model 2", "Model 6"), "6": None}, "smoke", lookup)
    assert set(chosen.loc[chosen["table"] == "4", "row"]) == {"Model 2", "Model 6"}
    assert len(chosen[chosen["table"] == "6"]) == len(tables.table_configs("sew_mcm", "6", "smoke", lookup))
    one = plan_tables("part_level", {"2@CUHK-PEDES": ("Ours",)}, "smoke", lookup)
    assert set(one["dataset"]) == {"CUHK-PEDES"} and set(one["row"]) == {"Ours"} and set(one["table"]) == {"2"}
    with pytest.raises(ValueError, match=r"no row\(s\) \['Model 9'\]"):
        plan_tables("sew_mcm", {"4": ("Model 9",)}, "smoke", lookup)


def test_trained_tables_registration_is_checked():
    from tbps_lib.models.registry import _table_rows

    assert _table_rows("m", "full", ("4", 5)) == {"4": None, "5": None}
    assert _table_rows("m", "full", {"4": ["Model 2"], "5": None}) == {"4": ("Model 2",), "5": None}
    for bad in ("4", {"4": "Model 2"}, {"4": ()}):
        with pytest.raises(ValueError, match="trained_tables"):
            _table_rows("m", "full", bad)
