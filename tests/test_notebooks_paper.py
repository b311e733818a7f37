"""The paper path, kept working: every notebook executes with ``TBPS_MODE=paper``.

A user with a GPU runs the notebooks in paper mode first. Here each notebook runs headless with the papers'
presets (ViT-B/16, BERT-base, Swin-T, ResNet-50, ... at random init: no local weights), on a tiny
synthetic benchmark (40 identities, CUHK-PEDES layout, also given as the CUHK-PEDES folder so the paper
tables' CUHK-PEDES rows run), in the ``check`` budget (``tbps_lib.config.BUDGETS``: one seed, the ``full``
tables, every run one step of 4 image-text pairs). It checks that the code runs end to end; the numbers
mean nothing. Figures and runs go to temporary folders, never into the checkout; each notebook's runs are
deleted after it.

A paper-size run costs tens of seconds on a CPU even at one step, and the method and figure notebooks train
several, so all of them together take longer than CI's budget: ``make test`` (CI) executes the quick-start
notebook here, ``make test-paper`` (``TBPS_TEST_PAPER=1``) every notebook.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TINY_IDS = 40
IN_CI = ("00_quickstart",)  # the rest only under `make test-paper`
ALL = os.environ.get("TBPS_TEST_PAPER") == "1"


@pytest.fixture(scope="module")
def paper_env(tmp_path_factory) -> dict[str, str]:
    from tbps_lib.data.synthetic import ensure_synthetic

    data = str(ensure_synthetic("cuhk-like", ids=TINY_IDS, progress=False))
    tmp = tmp_path_factory.mktemp("paper_path")
    return {**os.environ, "TBPS_MODE": "paper", "TBPS_BUDGET": "check", "TBPS_DATA": data,
            "TBPS_CUHK_PEDES_ROOT": data, "TBPS_FIGURES": str(tmp / "figures"), "TBPS_PROGRESS": "0",
            "MPLBACKEND": "Agg"}


def test_the_check_budget_reaches_paper_mode(paper_env, monkeypatch):
    """Without the step cap in paper mode a notebook here would train ViT-B/16 for 60 epochs."""
    from tbps_lib.config import make_config, notebook_params

    for key in ("TBPS_MODE", "TBPS_BUDGET", "TBPS_DATA"):
        monkeypatch.setenv(key, paper_env[key])
    params = notebook_params()
    cfg = make_config("baseline", params.mode, params.data, params.default_changes)
    assert (cfg.preset, cfg.image.arch, cfg.text.arch) == ("paper", "vit_base_patch16", "bert_base")
    assert cfg.optim.max_steps == 1 and cfg.data.batch_size == 4 and params.seeds == 1


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_in_paper_mode(notebook: Path, paper_env: dict[str, str], tmp_path: Path):
    if not ALL and notebook.stem not in IN_CI:
        pytest.skip("paper-size runs of this notebook take minutes on a CPU: make test-paper (TBPS_TEST_PAPER=1)")
    runs = tmp_path / "runs"  # each notebook trains its own runs: a paper-size run keeps 0.5-1 GB of weights
    try:
        out = subprocess.run(
            [sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute", "--output-dir", str(tmp_path),
             "--ExecutePreprocessor.timeout=900", notebook.name],
            cwd=notebook.parent, env={**paper_env, "TBPS_RUNS": str(runs)}, capture_output=True, text=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    assert out.returncode == 0, f"{notebook.name} failed in paper mode:\n{out.stderr[-6000:]}"
