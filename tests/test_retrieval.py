"""Run-level analysis helpers: ranked lists, error attribution, query sampling, the metrics table."""
from __future__ import annotations

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from tbps_lib.analysis.retrieval import (error_attributes, metrics_table, plot_training_curves, ranked_table,
                                         sample_queries, top_k)
from tbps_lib.data.formats import Record
from tbps_lib.engine.evaluate import Encoded


def _encoded() -> tuple[Encoded, torch.Tensor, list[Record]]:
    # 3 people (ids 1, 2, 3), one image each; 3 captions, one per person.
    enc = Encoded(split="test", image_feats={}, text_feats={}, query_pids=torch.tensor([1, 2, 3]),
                  gallery_pids=torch.tensor([1, 2, 3]), image_paths=["a.png", "b.png", "c.png"],
                  captions=["one", "two", "three"], query_image_index=torch.tensor([0, 1, 2]))
    sim = torch.tensor([[0.9, 0.1, 0.2],    # correct
                        [0.5, 0.4, 0.5],    # wrong: ties 0 and 2 -> index 0 (person 1) ranks first
                        [0.1, 0.8, 0.7]])   # wrong: person 2 first
    base = {"upper_color": "red", "hair_color": "black", "bag": "none"}
    attrs = {1: base, 2: {**base, "upper_color": "blue"}, 3: {**base, "upper_color": "blue", "bag": "backpack"}}
    records = [Record(f"{p}.png", p, ("c",), "test", {"attributes": attrs[p]}) for p in (1, 2, 3)]
    return enc, sim, records


def test_top_k_breaks_ties_by_gallery_index():
    enc, sim, _ = _encoded()
    scores, idx = top_k(sim, 2)
    assert idx.tolist() == [[0, 2], [0, 2], [1, 2]]
    with pytest.raises(ValueError, match="k must be in 1..3"):
        top_k(sim, 4)


def test_ranked_table_marks_matches():
    enc, sim, _ = _encoded()
    table = ranked_table(enc, sim, [0, 1], k=2)
    assert table["match"].tolist() == [True, False, False, False]
    assert table.loc[0, "image"] == "a.png" and table.loc[0, "score"] == 0.9


def test_error_attributes_counts_differences():
    enc, sim, records = _encoded()
    table = error_attributes(enc, sim, records).set_index("attribute")
    # errors: query 1 (person 2 vs 1: upper_color), query 2 (person 3 vs 2: bag)
    assert table.attrs["n_errors"] == 2
    assert table.loc["upper_color", "differs_in_errors_%"] == 50.0
    assert table.loc["upper_color", "only_difference_%"] == 50.0
    assert table.loc["bag", "only_difference_%"] == 50.0
    with pytest.raises(ValueError, match="needs synthetic records"):
        error_attributes(enc, sim, [Record("x.png", 1, ("c",), "test")])


def test_sample_queries_distinct_people_and_errors_only():
    enc, sim, _ = _encoded()
    assert sorted(sample_queries(enc, 3, seed=0)) == [0, 1, 2]
    assert sorted(sample_queries(enc, 3, seed=0, errors_of=sim)) == [1, 2]


def test_metrics_table_one_row_per_reranking():
    class FakeRun:
        def evaluate(self, split, rerank=None):
            r1 = {None: 10.0, "visual_neighbors": 12.0, "k_reciprocal": 15.0, "k_reciprocal_paper": 14.0}[rerank]
            return {"R1": r1, "mAP": 1.0, **({"rerank": rerank} if rerank else {})}
    table = metrics_table(FakeRun())
    assert table.index.tolist() == ["none", "visual_neighbors", "k_reciprocal", "k_reciprocal_paper"]
    assert table["R1"].tolist() == [10.0, 12.0, 15.0, 14.0] and list(table.columns) == ["R1", "mAP"]


def test_training_curves_need_history():
    with pytest.raises(ValueError, match="no history"):
        plot_training_curves(pd.DataFrame())
    hist = pd.DataFrame({"epoch": [1, 2], "step": [5, 10], "loss": [2.0, 1.0], "lr": [0.1, 0.1],
                         "val_R1": [None, 30.0], "time_s": [1, 2]})
    fig = plot_training_curves(hist)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 1 and len(fig.axes[1].lines) == 1
