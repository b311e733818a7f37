"""The run registry: train once then load, resume, cached embeddings, listing, and two processes at once."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tbps_lib.config import Config, config_hash
from tbps_lib.engine import runs
from tbps_lib.engine.runs import RunError, list_runs, load_run, resolve_config, train_or_load
from tbps_lib.engine.trainer import ResumeError, fit
from tbps_lib.models.base import MethodConfig
from test_trainer import _toy_registered, register_toy, toy_config, write_toy_dataset  # noqa: F401

from tbps_lib.engine.metrics import METRIC_NAMES as METRICS


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("runs") / "data")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One finished toy run, shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("registry")
    return train_or_load(toy_config(data), runs_dir=root, progress=False, device="cpu"), root


def test_train_once_then_load(trained, data):
    run, root = trained
    assert run.trained_now and run.status == "done"
    assert run.dir == root / f"toy-{config_hash(run.config)}"
    again = train_or_load(toy_config(data), runs_dir=root, progress=False, device="cpu")
    assert not again.trained_now and again.dir == run.dir and again.metrics == run.metrics
    assert sorted(p.name for p in run.dir.iterdir() if not p.name.startswith(".")) == [
        "best.pt", "config.json", "history.jsonl", "metrics.json", "tokenizer"]  # last.pt goes once it is done


def test_metrics_carry_provenance(trained):
    run, _ = trained
    m = run.metrics
    assert m["method"] == "toy" and m["config_hash"] == config_hash(run.config) and m["preset"] == "smoke"
    assert m["seed"] == 0 and m["device"].startswith("cpu") and m["library_version"]
    assert m["init"] == {"image": "random", "text": "random"} and m["dataset_notes"] == []
    assert m["selected"]["select_metric"] == "R1" and m["val"]["split"] == "val" and m["test"]["split"] == "test"
    assert m["wall_time_s"] > 0 and set(METRICS) <= set(m["test"])
    assert run.provenance("test")["split"] == "test"


def test_history_is_a_dataframe_per_epoch(trained):
    history = trained[0].history
    assert isinstance(history, pd.DataFrame) and history["epoch"].tolist() == [1, 2, 3]
    assert {"itc", "align", "loss", "lr", "val_R1", "time_s"} <= set(history.columns)


def test_model_holds_the_selected_weights_and_reproduces_test_metrics(trained):
    run, _ = trained
    best = torch.load(run.dir / "best.pt", weights_only=True)
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in best["model"].items())
    assert not run.model.training
    again = run.evaluate("test")
    assert again == pytest.approx({k: run.metrics["test"][k] for k in METRICS}, abs=1e-9)


def test_embeddings_are_cached_on_disk(trained, monkeypatch):
    run, _ = trained
    encoded = run.embeddings("val")
    assert (run.dir / "embeddings" / "val.pt").is_file()
    assert encoded.n_gallery == 12 and encoded.n_queries == 24 and encoded.image_feats["global"].shape == (12, 16)

    def no_encode(*args, **kwargs):
        raise AssertionError("the cached embeddings should have been used")

    monkeypatch.setattr(runs, "encode", no_encode)
    fresh = load_run(run.dir, device="cpu")
    cached = fresh.embeddings("val")
    assert torch.equal(cached.text_feats["global"], encoded.text_feats["global"])
    assert cached.captions == encoded.captions and torch.equal(cached.query_pids, encoded.query_pids)


def test_cross_domain_evaluation_uses_the_other_dataset_and_its_own_cache(trained, tmp_path):
    run, _ = trained
    other = write_toy_dataset(tmp_path / "other", n_test=4, seed=3)
    encoded = run.embeddings("test", dataset=str(other))
    assert encoded.n_gallery == 8 and encoded.n_queries == 16  # the other dataset's 4 test persons x 2 images
    cached = list((run.dir / "embeddings").glob("*/test.pt"))
    assert len(cached) == 1 and cached[0].parent.name != "test"
    assert run.embeddings("test").n_gallery == 12  # the run's own test split is untouched
    metrics = run.evaluate("test", dataset=str(other))
    assert set(METRICS) <= set(metrics) and metrics != run.evaluate("test")


def test_reranked_evaluation(trained):
    run, _ = trained
    plain = run.evaluate("test")
    for method in ("visual_neighbors", "k_reciprocal", "k_reciprocal_paper"):
        reranked = run.evaluate("test", rerank=method)
        assert reranked.pop("rerank") == method  # every re-ranked result names its form
        assert set(reranked) == set(plain) and all(0 <= v <= 100 for v in reranked.values())
    with pytest.raises(ValueError, match="unknown re-ranking 'nafs'"):
        run.evaluate("test", rerank="nafs")


def test_list_runs(trained, tmp_path):
    run, root = trained
    table = list_runs(root)
    row = table.set_index("hash").loc[config_hash(run.config)]
    assert row["method"] == "toy" and row["status"] == "done" and row["preset"] == "smoke"
    assert row["R1"] == run.metrics["test"]["R1"] and row["dir"] == str(run.dir)
    assert list_runs(tmp_path / "empty").empty


def test_interrupted_run_is_resumed(data, tmp_path, trained):
    ds = runs.prepare_dataset(toy_config(data))
    cfg = resolve_config(toy_config(data), ds)  # what train_or_load writes (model.num_classes filled in)
    run_dir = tmp_path / runs.run_name(cfg)
    tokenizer = runs._prepare_folder(run_dir, cfg, ds)
    from tbps_lib.models.registry import build_model
    from tbps_lib.utils import seed_everything

    seed_everything(cfg.seed)
    fit(build_model(cfg), ds, tokenizer, cfg, run_dir, progress=False, stop_after_steps=9)
    assert [r["status"] for r in list_runs(tmp_path).to_dict("records")] == ["partial"]
    with pytest.raises(RunError, match="has not finished training"):
        _ = load_run(run_dir, device="cpu").metrics
    resumed = train_or_load(cfg, runs_dir=tmp_path, progress=False, device="cpu")
    assert resumed.trained_now and resumed.dir == run_dir
    assert {k: resumed.metrics["test"][k] for k in METRICS} == {k: trained[0].metrics["test"][k] for k in METRICS}


def test_settings_that_do_not_change_results_find_the_same_run(trained, data, tmp_path):
    run, root = trained
    fast = toy_config(data, **{"data.num_workers": 1, "eval.batch_size": 7, "eval.chunk_size": 3})
    assert config_hash(fast) == config_hash(toy_config(data))
    found = runs.find_run(fast, runs_dir=root, device="cpu")
    assert found is not None and found.dir == run.dir and found.config.eval.batch_size == 7
    loaded = train_or_load(fast, runs_dir=root, progress=False, device="cpu")
    assert not loaded.trained_now and loaded.dir == run.dir
    # an interrupted run resumes under the new settings: neither config.json nor last.pt refuses them
    ds = runs.prepare_dataset(toy_config(data))
    cfg = resolve_config(toy_config(data, **{"optim.max_steps": 4}), ds)  # what train_or_load writes
    run_dir = tmp_path / runs.run_name(cfg)
    tokenizer = runs._prepare_folder(run_dir, cfg, ds)
    fit(runs.build_model(cfg), ds, tokenizer, cfg, run_dir, progress=False, stop_after_steps=2)
    faster = toy_config(data, **{"optim.max_steps": 4, "eval.batch_size": 5, "data.num_workers": 1})
    resumed = train_or_load(faster, runs_dir=tmp_path, progress=False, device="cpu")
    assert resumed.trained_now and resumed.dir == run_dir and resumed.status == "done"


# ----------------------------------------------------------------------------------------------------
# Provenance of the code: fingerprints and stale runs


def _copy_with_fingerprint(run, root: Path, fingerprint) -> Path:
    """A copy of ``run`` under ``root`` whose metrics.json records ``fingerprint`` (None: no record)."""
    copy = root / run.name
    shutil.copytree(run.dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics.pop("code_fingerprint")
    if fingerprint is not None:
        metrics["code_fingerprint"] = fingerprint
    (copy / "metrics.json").write_text(json.dumps(metrics))
    return copy


def test_metrics_record_the_code_fingerprint(trained):
    run, _ = trained
    fp = run.metrics["code_fingerprint"]
    assert fp["sources"] == runs.sources_hash() and len(fp["sources"]) == 16 and fp["files"] > 20
    assert fp["commit"] is None or len(fp["commit"]) == 40
    assert fp["dirty"] in (None, True, False)
    assert not run.stale and run.stale_reason is None and run.provenance()["stale"] is False


def test_fingerprint_follows_the_code_that_decides_results(tmp_path):
    lib = tmp_path / "tbps_lib"
    shutil.copytree(runs.PACKAGE_DIR, lib, ignore=shutil.ignore_patterns("__pycache__"))
    before = runs.sources_hash(lib)
    (lib / "analysis" / "figures.py").write_text("# plotting only\n", encoding="utf-8")
    (lib / "cli.py").write_text("# the command line\n", encoding="utf-8")
    assert runs.sources_hash(lib) == before  # excluded: cannot change a run's numbers
    with open(lib / "losses" / "cmpm.py", "a", encoding="utf-8") as f:
        f.write("\n# a changed loss\n")
    assert runs.sources_hash(lib) != before
    assert runs.code_fingerprint(lib)["sources"] == runs.sources_hash(lib)


def test_stale_runs_are_marked_and_listed(trained, tmp_path, capsys):
    run, _ = trained
    fp = run.metrics["code_fingerprint"]
    other = _copy_with_fingerprint(run, tmp_path / "a", {**fp, "sources": "0" * 16, "dirty": True})
    unknown = _copy_with_fingerprint(run, tmp_path / "b", None)
    assert load_run(other, device="cpu").stale
    assert "trained by other code (sources 0000000000000000" in load_run(other, device="cpu").stale_reason
    assert load_run(unknown, device="cpu").stale_reason.startswith("unknown code")
    shutil.copytree(run.dir, tmp_path / "a" / "fresh-0123456789ab")
    table = list_runs(tmp_path / "a")
    assert table.set_index("dir")["stale"].to_dict() == {str(other): True,
                                                         str(tmp_path / "a" / "fresh-0123456789ab"): False}
    assert list_runs(tmp_path / "a", only_stale=True)["dir"].tolist() == [str(other)]
    from tbps_lib.cli import main

    assert main(["runs", "list", "--runs", str(tmp_path / "a"), "--stale", "--json"]) == 0
    assert [r["dir"] for r in json.loads(capsys.readouterr().out)] == [str(other)]
    assert main(["runs", "list", "--runs", str(tmp_path / "b" / "x"), "--stale"]) == 0
    assert "no stale runs under" in capsys.readouterr().out


def test_train_or_load_policy_for_a_stale_run(trained, data, tmp_path, capsys, monkeypatch):
    run, _ = trained
    cfg = toy_config(data)
    root = tmp_path / "reg"
    copy = _copy_with_fingerprint(run, root, None)
    capsys.readouterr()
    loaded = train_or_load(cfg, runs_dir=root, progress=False, device="cpu")  # default: warn
    assert not loaded.trained_now and loaded.stale
    assert f"warning: stale run {copy}: unknown code" in capsys.readouterr().err
    assert not train_or_load(cfg, runs_dir=root, progress=False, device="cpu", stale="ok").trained_now
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TBPS_STALE", "nonsense")
    with pytest.raises(ValueError, match=r"\$TBPS_STALE must be one of \['warn', 'retrain', 'ok'\]"):
        train_or_load(cfg, runs_dir=root, progress=False, device="cpu")
    monkeypatch.setenv("TBPS_STALE", "retrain")
    again = train_or_load(cfg, runs_dir=root, progress=False, device="cpu")
    assert again.trained_now and again.dir == copy and not again.stale
    (aside,) = (root / ".stale").iterdir()
    assert aside.name == f"{run.name}-unknown" and (aside / "best.pt").is_file() and (aside / "metrics.json").is_file()
    assert list_runs(root)["dir"].tolist() == [str(copy)]  # the set-aside files are not a run of the registry
    with pytest.raises(ValueError, match=r"stale must be one of"):
        train_or_load(cfg, runs_dir=root, progress=False, device="cpu", stale="never")


def test_val_holdout_note_reaches_the_metrics(tmp_path):
    root = write_toy_dataset(tmp_path / "icfg_like", splits=("train", "test"))
    cfg = toy_config(root, **{"optim.max_steps": 2})
    run = train_or_load(cfg, runs_dir=tmp_path / "runs", progress=False, device="cpu")
    assert any("held out as 'val'" in note for note in run.metrics["dataset_notes"])


def test_weights_that_do_not_fit_the_model_are_a_clear_error(trained, tmp_path):
    run, _ = trained
    copy = tmp_path / run.name
    shutil.copytree(run.dir, copy)
    best = torch.load(copy / "best.pt", weights_only=True)
    best["model"]["image_head.weight"] = torch.zeros(3, 3)  # as if the model code had changed since
    torch.save(best, copy / "best.pt")
    with pytest.raises(ResumeError, match=r"best\.pt do not fit the ToyModel .*image_head\.weight"):
        _ = load_run(copy, device="cpu").model


def test_load_run_errors_name_the_folder(tmp_path):
    with pytest.raises(RunError, match=r"not a run folder: .*config\.json does not exist"):
        load_run(tmp_path)


def test_resolve_config_fills_num_classes(data):
    ds = runs.prepare_dataset(toy_config(data))
    cfg = Config(method="x", model=MethodConfig())  # the default resolve_from_data of every method config
    assert resolve_config(cfg, ds).model.num_classes == 30
    assert resolve_config(Config(method="x", model=MethodConfig(7)), ds).model.num_classes == 7


# ----------------------------------------------------------------------------------------------------
# Two processes asking for the same run


def _ask(data: str, root: str, out: str) -> None:
    torch.set_num_threads(1)
    register_toy()
    run = train_or_load(toy_config(Path(data)), runs_dir=root, progress=False, device="cpu")
    Path(out).write_text(json.dumps({"trained": run.trained_now, "test": run.metrics["test"]}))


def test_two_processes_share_one_run(data, tmp_path):
    cfg = toy_config(data)
    run_dir = tmp_path / "runs" / runs.run_name(resolve_config(cfg, runs.prepare_dataset(cfg)))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_ask, args=(str(data), str(tmp_path / "runs"), str(tmp_path / f"{i}.json")))
             for i in range(2)]
    with runs.run_lock(run_dir):  # hold the run: both processes must queue behind the lock
        for p in procs:
            p.start()
        time.sleep(1.0)
        assert all(p.is_alive() for p in procs) and not (run_dir / "config.json").exists()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert sorted(r["trained"] for r in results) == [False, True]  # one trained, the other waited and loaded
    assert results[0]["test"] == results[1]["test"]
    assert len((run_dir / "history.jsonl").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------------------------------
# The small helpers the registry relies on (tbps_lib.utils)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from tbps_lib.utils import atomic_write, atomic_write_json

    target = atomic_write_json(tmp_path / "m.json", {"R1": 1.0})

    def crash(tmp: Path) -> None:
        tmp.write_text("{half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"R1": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind
    assert (target.stat().st_mode & 0o044) == (0o644 & ~_umask() & 0o044)  # not owner-only


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_progress_bars_follow_tbps_progress(monkeypatch):
    from tbps_lib.utils import progress

    monkeypatch.setenv("TBPS_PROGRESS", "0")
    assert progress(range(3)).disable
    monkeypatch.setenv("TBPS_PROGRESS", "1")
    assert not progress(range(3), file=open(os.devnull, "w")).disable
    assert progress(range(3), enabled=False).disable


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_select_device_refuses_missing_cuda(monkeypatch):
    from tbps_lib.utils import select_device

    assert select_device() == torch.device("cpu")
    monkeypatch.setenv("TBPS_DEVICE", "cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device()


def test_run_parallel_keeps_the_order_of_calls_across_processes(data):
    """Two spawned processes (the library's own function, importable in a fresh interpreter)."""
    configs = [toy_config(data, seed=s) for s in range(4)]
    calls = [(c,) for c in configs]
    assert runs.run_parallel(config_hash, calls, jobs=2, progress=False) == [config_hash(c) for c in configs]
    assert runs.run_parallel(config_hash, calls, jobs=1, progress=False) == [config_hash(c) for c in configs]


def test_train_many_trains_each_config_once_and_chained_runs_last(data, tmp_path, monkeypatch):
    first = toy_config(data, **{"optim.epochs": 1})
    stage1_name = f"toy-{config_hash(resolve_config(first, runs.prepare_dataset(first)))}"
    chained = toy_config(data, **{"optim.epochs": 1, "init.from_run": stage1_name})
    order = []
    real = runs._train_one
    monkeypatch.setattr(runs, "_train_one", lambda cfg, *a: order.append(cfg.init.from_run) or real(cfg, *a))
    table = runs.train_many([chained, first, first], tmp_path, jobs=1, progress=False)
    assert order == [None, stage1_name]  # the duplicate trained once; the chained run after its source
    assert table["trained_now"].tolist() == [True, True] and (table["wall_time_s"] > 0).all()
    again = runs.train_many([first], tmp_path, jobs=1, progress=False)
    assert again["trained_now"].tolist() == [False] and again["wall_time_s"].tolist() == [0.0]


def test_train_many_trains_the_workbook_weights_first_and_runs_on_the_vlp_stage_last(tmp_path, monkeypatch):
    """One pool: the weights the runs load are its first jobs (what LAIP's VLP stage starts from first, the
    VLP stage last), then the runs, those on the VLP weights after those on unimodal weights only."""
    from tbps_lib import pretrain
    from tbps_lib.config import make_config

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "empty-cache"))  # nothing pretrained yet
    assert pretrain.training_order({"vlp_smoke", "bigru_smoke"}) == ["bert_smoke", "resnet_smoke", "bigru_smoke",
                                                                     "vlp_smoke"]
    laip, baseline = make_config("laip", "smoke"), make_config("baseline", "smoke")
    assert runs.workbook_weights(laip) == {"vlp_smoke", "resnet_smoke", "bert_smoke"}
    order = []
    monkeypatch.setattr(runs, "_pretrain_one", lambda name: order.append(name))
    monkeypatch.setattr(runs, "_train_one", lambda cfg, *a: order.append(cfg.method) or (cfg.method, True, 1.0))
    table = runs.train_many([laip, baseline], tmp_path, jobs=1, progress=False)
    assert order == ["bert_smoke", "resnet_smoke", "bigru_smoke", "vlp_smoke", "baseline", "laip"]
    assert table["run"].tolist() == ["baseline", "laip"]
