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
