"""``tbps figures``: every analysis figure from the run registry, training what is missing."""
from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

from tbps_lib.analysis import figures
from tbps_lib.cli import main


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """A 40-identity synthetic set (4 test identities) in its own folder."""
    from tbps_lib.data import synthetic

    return synthetic.generate("cuhk-like", tmp_path_factory.mktemp("figs") / "set", ids=40, progress=False,
                              workers=1)


def test_tbps_figures_trains_and_writes_every_figure(tiny_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TBPS_FIGURES", str(tmp_path / "figures"))
    runs = tmp_path / "runs"
    status = main(["figures", "--methods", "baseline", "--mode", "smoke", "--data", str(tiny_set),
                   "--runs", str(runs), "--captions", "10", "--quiet"])
    out = capsys.readouterr().out
    assert status == 0
    names = {figures.FIG4, figures.FIG5, figures.FIG6, figures.POINTING}
    for name in names:
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0
        assert (tmp_path / "figures" / f"{name}.pdf").stat().st_size > 0
        assert f"wrote {name}:" in out
    assert len(list(runs.glob("baseline-*/metrics.json"))) == 1  # the missing run was trained
    for table in ("gap", "tsne", "pointing", "pointing_by_word"):
        assert f"== {table}" in out
    # A second call reuses the run and draws the same numbers.
    assert main(["figures", "--methods", "baseline", "--data", str(tiny_set), "--runs", str(runs),
                 "--captions", "10", "--quiet"]) == 0
    assert capsys.readouterr().out == out


def test_tbps_figures_unknown_method(capsys):
    assert main(["figures", "--methods", "no_such_method", "--quiet"]) == 2
    assert "unknown method" in capsys.readouterr().err


def _toy_figure(runs, *, split="test", **_):
    """A declared figure: one bar per run (its number of test captions), with that table."""
    import matplotlib.pyplot as plt
    import pandas as pd

    table = pd.DataFrame({"captions": {m: r.embeddings(split).n_queries for m, r in runs.items()}})
    fig, ax = plt.subplots()
    ax.bar(list(table.index), table["captions"])
    return fig, {"toy_captions": table}


def test_a_method_declares_its_figures_and_regenerate_draws_them(tiny_set, tmp_path, monkeypatch):
    from tbps_lib.models import registry
    from tbps_lib.models.baseline import Baseline, BaselineConfig, smoke_preset

    registry.register_method("fig_toy", BaselineConfig, {"smoke": smoke_preset},
                             figures={"toy_fig": _toy_figure, "toy_none": lambda runs, **_: (None, {})})(
        type("FigToy", (Baseline,), {}))
    try:
        assert list(registry.method_figures())[-2:] == ["toy_fig", "toy_none"]
        monkeypatch.setenv("TBPS_FIGURES", str(tmp_path / "figures"))
        out = figures.regenerate(methods=["baseline"], data=str(tiny_set), runs_dir=tmp_path / "runs",
                                 figures=["toy_fig", "toy_none", figures.FIG4])
        assert sorted(out.paths) == sorted([figures.FIG4, "toy_fig"])  # toy_none does not apply: skipped
        assert (tmp_path / "figures" / "toy_fig.png").stat().st_size > 0
        assert out.tables["toy_captions"]["captions"]["baseline"] > 0 and "gap" in out.tables
        with pytest.raises(ValueError, match="unknown figure.*no_such"):
            figures.regenerate(methods=["baseline"], figures=["no_such"])
        registry.register_method("fig_toy2", BaselineConfig, {"smoke": smoke_preset},
                                 figures={"toy_fig": _toy_figure})(type("FigToy2", (Baseline,), {}))
        with pytest.raises(ValueError, match="'toy_fig' is declared by both 'fig_toy' and 'fig_toy2'"):
            registry.method_figures()
    finally:
        registry._REGISTRY.pop("fig_toy", None)
        registry._REGISTRY.pop("fig_toy2", None)
