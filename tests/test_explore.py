"""Data-exploration helpers: known-answer tables and figures built on a tiny synthetic set."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tbps_lib.data import explore, synthetic  # noqa: E402
from tbps_lib.data.formats import LoadReport, Record, TBPSDataset, read_synthetic  # noqa: E402


def _dataset(name: str, captions: dict[str, list[list[str]]]) -> TBPSDataset:
    """A dataset of records without images: {split: [captions of image 0, captions of image 1, ...]}."""
    records = [Record(f"{s}/{i}.png", pid=100 * k + i, captions=tuple(c), split=s)
               for k, (s, per_image) in enumerate(captions.items()) for i, c in enumerate(per_image)]
    return TBPSDataset(name, Path("."), Path("imgs"), records, LoadReport(file=Path("ann.json")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = synthetic.generate("cuhk-like", tmp_path_factory.mktemp("ex") / "s", ids=6, progress=False)
    return read_synthetic(root)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_caption_lengths_count_words_not_punctuation():
    ds = _dataset("x", {"train": [["A man, in red.", "a woman"]]})
    assert explore.caption_lengths(ds.records).tolist() == [4, 2]


def test_length_bounds_use_the_paper_for_real_datasets_and_percentiles_otherwise():
    ds = _dataset("icfg-pedes", {"train": [["a b c"]], "test": [["a"]]})
    assert explore.length_bounds(ds)[:2] == (25, 65)
    lengths = list(range(1, 101))
    train = [[" ".join(["w"] * n)] for n in lengths]
    syn = _dataset("synthetic", {"train": train, "test": [["w " * 500]]})
    t_min, t_max, source = explore.length_bounds(syn)
    assert (t_min, t_max) == (round(np.percentile(lengths, 5)), round(np.percentile(lengths, 95))) == (6, 95)
    assert "percentiles" in source


def test_frequent_words_skip_stopwords_and_count():
    ds = _dataset("x", {"train": [["A red coat and a red bag.", "the red coat"]]})
    table = explore.frequent_words(ds.records, n=3)
    assert table.values.tolist() == [["red", 3], ["coat", 2], ["bag", 1]]


def test_frequent_noun_phrases_drop_the_determiner():
    ds = _dataset("x", {"train": [["A man wearing a black jacket.", "The woman has a black jacket."]]})
    table, tagger = explore.frequent_noun_phrases(ds.records, n=5)
    counts = dict(table.values.tolist())
    assert counts["black jacket"] == 2 and counts["man"] == 1 and counts["woman"] == 1
    assert tagger in ("builtin", "nltk-perceptron")
    with pytest.raises(ValueError, match="no captions"):
        explore.frequent_noun_phrases([], n=5)


def test_pick_records_is_reproducible_and_one_per_person(tiny):
    a = explore.pick_records(tiny.records, 4, seed=1)
    assert [r.image for r in a] == [r.image for r in explore.pick_records(tiny.records, 4, seed=1)]
    assert len({r.pid for r in a}) == 4


def test_attribute_frequencies_are_shares_of_identities(tiny):
    freq = explore.attribute_frequencies(tiny.records)
    for _, part in freq.groupby("attribute"):
        assert part["identities"].sum() == 6 and abs(part["share"].sum() - 1.0) < 1e-9
    ds = _dataset("x", {"train": [["a man"]]})
    with pytest.raises(ValueError, match="no synthetic sidecar entry"):
        explore.attribute_frequencies(ds.records)


def test_stats_table_has_one_row_per_split(tiny):
    table = explore.stats_table(tiny)
    assert list(table.index) == ["train", "val", "test"]
    assert table.loc["train", "ids"] + table.loc["val", "ids"] + table.loc["test", "ids"] == 6


def test_figures_have_the_expected_panels(tiny):
    recs = explore.pick_records(tiny.records, 3)
    assert len(explore.plot_image_grid(tiny, recs, cols=3).axes) == 3
    assert len(explore.plot_part_masks(tiny, recs).axes) == 6
    fig = explore.plot_caption_lengths(tiny)
    assert any("T_{min}" in t.get_text() for t in fig.axes[0].texts)
    freq = explore.attribute_frequencies(tiny.records)
    assert len(explore.plot_attribute_frequencies(freq, ["gender", "upper_color"]).axes) == 2


def test_similar_pairs_against_a_slow_count():
    base = {"gender": "male", "upper": "coat", "upper_color": "black", "bag": "none"}
    people = [base, {**base, "upper_color": "grey"}, {**base, "upper_color": "grey", "bag": "backpack"},
              {**base, "gender": "female", "upper": "dress", "bag": "handbag"}]
    records = [Record(f"{i}.png", i + 1, ("x",), "test", meta={"attributes": p}) for i, p in enumerate(people)]
    pairs = explore.similar_pairs(records, max_diff=1)
    assert pairs[["pid_a", "pid_b", "differences"]].values.tolist() == [[1, 2, 1], [2, 3, 1]]
    assert pairs["attributes"].tolist() == ["upper_color", "bag"]
    slow = sum(sum(a[k] != b[k] for k in base) <= 2 for i, a in enumerate(people) for b in people[i + 1:])
    assert len(explore.similar_pairs(records, max_diff=2)) == slow == 3


def test_nearest_differences_known_answer():
    base = {"gender": "male", "upper": "coat", "upper_color": "black", "bag": "none"}
    people = [base, {**base, "upper_color": "grey"}, {**base, "gender": "female", "upper": "dress", "bag": "handbag"}]
    records = [Record(f"{i}.png", i + 1, ("x",), "test", meta={"attributes": p}) for i, p in enumerate(people)]
    assert explore.nearest_differences(records).to_dict() == {1: 1, 2: 1, 3: 3}
    with pytest.raises(ValueError, match="at least two identities"):
        explore.nearest_differences(records[:1])
