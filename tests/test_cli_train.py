"""`tbps train`, `tbps eval`, `tbps runs list`: outputs, JSON, and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tbps_lib.cli import main
from test_trainer import HAVE_BASELINE, _toy_registered, write_toy_dataset  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("cli") / "data")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """(runs root, run folder) of a toy run trained through the CLI."""
    root = tmp_path_factory.mktemp("cli_runs")
    assert main(["train", "--method", "toy", "--dataset", str(data), "--set", "optim.epochs=2",
                 "--set", "model.dim=8", "--runs", str(root), "--quiet", "--device", "cpu"]) == 0
    (run_dir,) = list(root.iterdir())
    return root, run_dir


def test_train_prints_run_and_metrics_then_loads(trained, data, capsys):
    root, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["dim"] == 8 and config["optim"]["epochs"] == 2
    assert main(["train", "--method", "toy", "--dataset", str(data), "--set", "optim.epochs=2",
                 "--set", "model.dim=8", "--runs", str(root), "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"run {run_dir} (already trained)" in out
    assert f"test: R1 {metrics['test']['R1']:.2f}" in out


def test_eval_json_matches_the_recorded_test_metrics(trained, capsys):
    _, run_dir = trained
    assert main(["eval", str(run_dir), "--split", "test", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    recorded = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert report["metrics"] == pytest.approx({k: recorded[k] for k in report["metrics"]})
    assert report["provenance"]["split"] == "test" and report["provenance"]["method"] == "toy"
    assert report["rerank"] is None


def test_eval_with_reranking_prints_one_line(trained, capsys):
    _, run_dir = trained
    assert main(["eval", str(run_dir), "--split", "val", "--rerank", "visual_neighbors", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{run_dir.name} val + visual_neighbors: R1 ")


def test_runs_list(trained, tmp_path, capsys):
    root, run_dir = trained
    assert main(["runs", "list", "--runs", str(root)]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "done" in out and run_dir.name.split("-")[1] in out
    assert main(["runs", "list", "--runs", str(root), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "done" and row["dir"] == str(run_dir)
    assert main(["runs", "list", "--runs", str(tmp_path / "none")]) == 0
    assert "no runs under" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.nope=1"], "unknown config field 'optim.nope'"),
    (["--set", "optim.lr"], "--set expects key=value"),
    (["--set", "optim.epochs=two"], "optim.epochs: expected int, got 'two'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
])
def test_train_errors_are_one_line(data, tmp_path, capsys, args, message):
    argv = ["train", "--method", "toy", "--dataset", str(data), "--runs", str(tmp_path), "--quiet", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tbps: error:") and message in err[0]


def test_unknown_method_and_missing_run_are_one_line(tmp_path, capsys):
    assert main(["train", "--method", "nope", "--runs", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a run folder" in err[0]


@pytest.mark.slow  # about 10 s on 2 cores, most of it building the small ViT and BERT twice
@pytest.mark.skipif(not HAVE_BASELINE, reason="tbps_lib/models/baseline.py is not there yet")
def test_baseline_end_to_end_smoke(data, tmp_path, capsys):
    """The real baseline through the whole engine: two steps on the tiny dataset, then eval with re-ranking."""
    root = tmp_path / "runs"
    argv = ["train", "--method", "baseline", "--dataset", str(data), "--runs", str(root), "--quiet",
            "--device", "cpu", "--set", "optim.max_steps=2", "--set", "data.batch_size=16",
            "--set", "image.img_size=32x16", "--set", "text.vocab_size=200"]
    assert main(argv) == 0
    (run_dir,) = list(root.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["num_classes"] == 30  # filled in from the training identities
    assert metrics["steps"] == 2 and {"cmpm", "cmpc", "loss"} <= set(json.loads(
        (run_dir / "history.jsonl").read_text().splitlines()[0]))
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--rerank", "k_reciprocal", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rerank"] == report["metrics"].pop("rerank") == "k_reciprocal"
    assert set(report["metrics"]) == {"R1", "R5", "R10", "mAP", "mINP"}
