"""The run registry: one folder per config under ``runs/``, trained once and reused by every notebook.

Layout of ``<runs>/<method>-<config_hash>/``::

    config.json       the resolved config (data-derived fields such as model.num_classes filled in)
    tokenizer/        the run's tokenizer (CaptionTokenizer.save)
    last.pt best.pt   the training state and the selected (best-validation) weights (engine/trainer.py)
    history.jsonl     one line per epoch: loss terms, lr, validation metrics, wall time
    metrics.json      val metrics of the selected checkpoint and the test metrics (evaluated once), with
                      provenance: method, config hash, dataset, seed, preset, device, wall time, library
                      version, the initialisation of each encoder and the dataset's notes (val hold-out)
    embeddings/       cached encodings per split (Run.embeddings)

``train_or_load(cfg)`` trains only what is missing: nothing when ``metrics.json`` exists, the rest of an
interrupted run otherwise (resuming ``last.pt``). Two processes asking for the same run serialise on an
``fcntl.flock`` of ``<run>/.lock``: the second waits, then finds the finished run and loads it.
The root is the ``runs_dir`` argument, else ``TBPS_RUNS``, else ``./runs``.
"""
from __future__ import annotations

import dataclasses
import fcntl
import importlib.metadata
import json
import platform
import re
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pandas as pd
import torch

from tbps_lib.config import Config, config_diff, config_from_dict, config_hash, config_to_dict, default_runs_dir
from tbps_lib.data.formats import TBPSDataset
from tbps_lib.data.loaders import build_tokenizer, prepare_dataset, train_captions
from tbps_lib.data.text import CaptionTokenizer
from tbps_lib.engine import trainer
from tbps_lib.engine.evaluate import Encoded, encode, evaluate
from tbps_lib.engine.metrics import METRIC_NAMES
from tbps_lib.models.registry import build_model
from tbps_lib.utils import atomic_torch_save, atomic_write_json, read_jsonl, seed_everything, select_device

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
TOKENIZER_DIR = "tokenizer"
EMBEDDINGS_DIR = "embeddings"
LOCK_FILE = ".lock"


class RunError(FileNotFoundError):
    """A run folder is missing, incomplete, or does not match the config asked for."""


def library_version() -> str:
    """The installed tbps_lib version (package metadata, else the source tree's ``__version__``)."""
    try:
        return importlib.metadata.version("tbps_lib")
    except importlib.metadata.PackageNotFoundError:
        import tbps_lib

        return getattr(tbps_lib, "__version__", "unknown")


def runs_root(runs_dir: str | Path | None = None) -> Path:
    """The registry root: ``runs_dir``, else ``$TBPS_RUNS``, else ``runs/`` at the workbook root."""
    return Path(runs_dir).expanduser() if runs_dir else default_runs_dir()


def run_name(cfg: Config) -> str:
    """``<method>-<config_hash>``: the folder name of a (resolved) config."""
    return f"{cfg.method}-{config_hash(cfg)}"


def resolve_config(cfg: Config, ds: TBPSDataset) -> Config:
    """Fill the fields that come from the data; the resolved config names and builds the run.

    ``model.num_classes`` (when the method has it and it is 0) becomes the number of training identities;
    a method config with a ``resolve_from_data(ds)`` method fills its own data-derived fields (e.g. the Sew
    paper's caption-length bounds T_min/T_max).
    """
    model = cfg.model
    fields = {f.name for f in dataclasses.fields(model)}
    if "num_classes" in fields and model.num_classes == 0:
        model = dataclasses.replace(model, num_classes=len(ds.train_labels()))
    if hasattr(model, "resolve_from_data"):
        model = model.resolve_from_data(ds)
    return cfg if model is cfg.model else dataclasses.replace(cfg, model=model)


@contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.lock`` (blocks while another process holds it)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON ({e})") from e


def _encoder_init(cfg: Config, model: torch.nn.Module | None) -> dict[str, str]:
    """``pretrained:<where>`` or ``random`` for each encoder (the model's own report when it has one)."""
    sources = getattr(model, "pretrained_sources", None)
    found = sources() if callable(sources) else {"image": cfg.image.pretrained, "text": cfg.text.pretrained}
    return {k: f"pretrained:{v}" if v else "random" for k, v in found.items()}


class Run:
    """A run folder: its config, tokenizer, selected model, metrics, history and cached embeddings.

    Everything is loaded lazily; ``trained_now`` says whether this call trained (or resumed) it.
    """

    def __init__(self, directory: str | Path, config: Config, device: str | torch.device | None = None,
                 dataset: TBPSDataset | None = None, trained_now: bool = False) -> None:
        self.dir = Path(directory)
        self.config = config
        self.device = select_device(device)
        self.trained_now = trained_now
        if dataset is not None:
            self.__dict__["dataset"] = dataset

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, status={self.status!r})"

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def status(self) -> str:
        """``done`` (metrics written), ``partial`` (a checkpoint, not finished) or ``empty``."""
        if (self.dir / METRICS_FILE).is_file():
            return "done"
        return "partial" if (self.dir / trainer.LAST).is_file() else "empty"

    @cached_property
    def dataset(self) -> TBPSDataset:
        return prepare_dataset(self.config)

    @cached_property
    def tokenizer(self) -> CaptionTokenizer:
        path = self.dir / TOKENIZER_DIR
        if not path.is_dir():
            raise RunError(f"run {self.dir} has no tokenizer folder ({path})")
        return CaptionTokenizer.load(path)

    @property
    def metrics(self) -> dict[str, Any]:
        """The contents of ``metrics.json`` (selected checkpoint's val metrics, test metrics, provenance)."""
        path = self.dir / METRICS_FILE
        if not path.is_file():
            raise RunError(f"run {self.dir} has not finished training (no {METRICS_FILE}); "
                           "call tbps_lib.engine.runs.train_or_load(config) or `tbps train`")
        return _read_json(path)

    @property
    def history(self) -> pd.DataFrame:
        """One row per epoch: epoch, step, loss terms, lr, val_* metrics, time_s."""
        path = self.dir / trainer.HISTORY
        return pd.DataFrame(read_jsonl(path) if path.is_file() else [])

    @cached_property
    def model(self) -> torch.nn.Module:
        """The method's model with the selected (best-validation) weights, in eval mode on ``device``."""
        path = self.dir / trainer.BEST
        if not path.is_file():
            raise RunError(f"run {self.dir} has no selected checkpoint ({path}); train it first")
        model = build_model(self.config)
        trainer.load_weights(model, trainer.load_checkpoint(path)["model"], path)
        return model.to(self.device).eval()

    def _checkpoint_id(self) -> dict[str, int]:
        best = trainer.load_checkpoint(self.dir / trainer.BEST)
        return {"epoch": int(best["epoch"]), "step": int(best["step"])}

    def other_dataset(self, spec: str, root: str | None = None) -> TBPSDataset:
        """Another dataset prepared as this run's would be (same validation hold-out), for cross-domain
        evaluation: ``spec`` is a dataset spec like ``cfg.data.dataset`` (e.g. ``"synthetic:icfg-like"``)."""
        key = (spec, root)
        cache = self.__dict__.setdefault("_other_datasets", {})
        if key not in cache:
            data = dataclasses.replace(self.config.data, dataset=spec, root=root)
            cache[key] = prepare_dataset(dataclasses.replace(self.config, data=data))
        return cache[key]

    def embeddings(self, split: str = "test", progress: bool = False, dataset: str | None = None,
                   root: str | None = None) -> Encoded:
        """The model's encoding of ``split`` (gallery images and query captions), cached on disk.

        ``dataset`` (a spec, with ``root`` for real data) encodes another dataset's split with this run's
        model and tokenizer (cross-domain evaluation, Sew Table 6); by default the run's own dataset.
        The cache is tied to the selected checkpoint and to the split's size; either changing recomputes it.
        """
        own = dataset is None or (dataset == self.config.data.dataset and root == self.config.data.root)
        ds = self.dataset if own else self.other_dataset(dataset, root)
        folder = self.dir / EMBEDDINGS_DIR
        if not own:
            folder = folder / re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}@{root or ''}")
        path = folder / f"{split}.pt"
        ckpt = self._checkpoint_id()
        records = ds.split(split)
        sizes = {"images": len(records), "captions": sum(len(r.captions) for r in records)}
        if path.is_file():
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("checkpoint") == ckpt and cached.get("sizes") == sizes:
                return Encoded.from_state(cached["encoded"])
        encoded = encode(self.model, ds, split, self.tokenizer, self.config, self.device, progress)
        atomic_torch_save({"checkpoint": ckpt, "sizes": sizes, "encoded": encoded.to_state()}, path)
        return encoded

    def evaluate(self, split: str = "test", rerank: str | None = None,
                 rerank_params: Mapping[str, Any] | None = None, dataset: str | None = None,
                 root: str | None = None) -> dict[str, float]:
        """R1/R5/R10/mAP/mINP of ``split`` with the selected model, optionally re-ranked; ``dataset`` /
        ``root`` evaluate on another dataset's split (see :meth:`embeddings`).

        ``rerank``: None, ``"visual_neighbors"``, ``"k_reciprocal"`` or ``"rescore"`` (two-stage inference:
        the method's ``rescore`` of the top ``eval.rescore_k`` of each query; a method without one raises
        ``RescoreNotSupported``); see ``engine.evaluate.evaluate``."""
        return evaluate(self.model, self.embeddings(split, dataset=dataset, root=root), rerank=rerank,
                        rerank_params=rerank_params)

    def provenance(self, split: str | None = None) -> dict[str, Any]:
        """Where a number comes from: the provenance fields of ``metrics.json`` (plus ``split``)."""
        keep = ("method", "config_hash", "preset", "dataset", "seed", "device", "library_version", "init",
                "dataset_notes", "selected", "wall_time_s")
        prov = {k: v for k, v in self.metrics.items() if k in keep}
        if split is not None:
            prov["split"] = split
        return prov


def load_run(directory: str | Path, device: str | torch.device | None = None) -> Run:
    """Open an existing run folder (the one ``tbps train`` printed)."""
    directory = Path(directory).expanduser()
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{directory} is not a run folder: {path} does not exist")
    return Run(directory, config_from_dict(_read_json(path)), device)


def _prepare_folder(run_dir: Path, cfg: Config, ds: TBPSDataset) -> CaptionTokenizer:
    """Write (or check) config.json and build (or reload) the tokenizer; rank 0 only."""
    path = run_dir / CONFIG_FILE
    if path.is_file():
        diff = config_diff(config_from_dict(_read_json(path)), cfg)
        if diff:
            raise RunError(f"{path} does not match the requested config: {'; '.join(diff)}")
    else:
        atomic_write_json(path, config_to_dict(cfg))
    tok_dir = run_dir / TOKENIZER_DIR
    if tok_dir.is_dir():
        return CaptionTokenizer.load(tok_dir)
    tokenizer = build_tokenizer(cfg, train_captions(ds))
    tokenizer.save(tok_dir)
    return tokenizer


def _write_metrics(run_dir: Path, cfg: Config, ds: TBPSDataset, model: torch.nn.Module, result: trainer.FitResult,
                   device: torch.device) -> None:
    metrics = {
        "method": cfg.method, "config_hash": config_hash(cfg), "preset": cfg.preset,
        "dataset": cfg.data.dataset, "dataset_name": ds.name, "seed": cfg.seed,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"),
        "world_size": trainer.world_info()[0],
        "library_version": library_version(), "torch_version": torch.__version__,
        "init": _encoder_init(cfg, model), "dataset_notes": list(ds.report.notes),
        "selected": {"epoch": result.best_epoch, "step": result.best_step,
                     "select_metric": cfg.eval.select_metric},
        "epochs": result.epochs, "steps": result.steps,
        "wall_time_s": round(result.train_time_s + result.test_time_s, 2),
        "val": {"split": "val", **result.val}, "test": {"split": "test", **(result.test or {})},
    }
    atomic_write_json(run_dir / METRICS_FILE, metrics)


def _train(run_dir: Path, cfg: Config, ds: TBPSDataset, tokenizer: CaptionTokenizer, device: torch.device,
           progress: bool) -> None:
    """Build the model and fit (resuming ``last.pt`` if there is one); rank 0 writes metrics.json."""
    seed_everything(cfg.seed)
    model = build_model(cfg)
    result = trainer.fit(model, ds, tokenizer, cfg, run_dir, device=device, progress=progress)
    if trainer.world_info()[1] == 0:
        _write_metrics(run_dir, cfg, ds, model, result, device)


def train_or_load(cfg: Config, runs_dir: str | Path | None = None, progress: bool = True,
                  device: str | torch.device | None = None) -> Run:
    """The run of ``cfg``: trained (or its interruption resumed) if ``metrics.json`` is missing, else loaded.

    Safe to call from several processes at once (a file lock serialises them) and under ``torchrun``
    (every rank trains its share; rank 0 writes).
    """
    ds = prepare_dataset(cfg)
    cfg = resolve_config(cfg, ds)
    run_dir = runs_root(runs_dir) / run_name(cfg)
    chosen = select_device(device)
    if (run_dir / METRICS_FILE).is_file():
        return Run(run_dir, cfg, chosen, ds)
    world, rank = trainer.world_info()
    if world > 1:  # rank 0 prepares the folder, the others wait and read its tokenizer
        tokenizer = _prepare_folder(run_dir, cfg, ds) if rank == 0 else None
        trainer._barrier()
        tokenizer = tokenizer or CaptionTokenizer.load(run_dir / TOKENIZER_DIR)
        _train(run_dir, cfg, ds, tokenizer, chosen, progress)
        trainer._barrier()
        return Run(run_dir, cfg, chosen, ds, trained_now=True)
    with run_lock(run_dir):
        if (run_dir / METRICS_FILE).is_file():  # another process finished it while we waited
            return Run(run_dir, cfg, chosen, ds)
        tokenizer = _prepare_folder(run_dir, cfg, ds)
        _train(run_dir, cfg, ds, tokenizer, chosen, progress)
    return Run(run_dir, cfg, chosen, ds, trained_now=True)


def _may_have_finished_run(root: Path, cfg: Config) -> bool:
    """Cheap pre-check for :func:`find_run`: is there a finished run of the same method, preset and data
    under ``root``? (Reads the small ``config.json`` files only; no dataset is loaded.)"""
    for path in root.glob(f"{cfg.method}-*/{METRICS_FILE}") if root.is_dir() else []:
        try:
            stored = json.loads((path.parent / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        data = stored.get("data", {})
        if (stored.get("preset") == cfg.preset and data.get("dataset") == cfg.data.dataset
                and data.get("root") == cfg.data.root):
            return True
    return False


def find_run(cfg: Config, runs_dir: str | Path | None = None,
             load: Callable[[Config], TBPSDataset] = prepare_dataset,
             device: str | torch.device | None = None) -> Run | None:
    """The finished run of ``cfg`` (its folder has ``metrics.json``), or None; never trains.

    The run folder is named by the *resolved* config (:func:`resolve_config`), which needs the dataset;
    ``load`` prepares it (pass a caching loader when resolving many configs on the same data). When no
    finished run of the same method, preset and dataset exists at all, None is returned without loading
    anything, so asking about runs that were never trained stays fast.
    """
    root = runs_root(runs_dir)
    if not _may_have_finished_run(root, cfg):
        return None
    ds = load(cfg)
    resolved = resolve_config(cfg, ds)
    run_dir = root / run_name(resolved)
    if not (run_dir / METRICS_FILE).is_file():
        return None
    return Run(run_dir, resolved, select_device(device), ds)


def list_runs(runs_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per run folder under the root: method, hash, preset, dataset, status, epochs, selected
    checkpoint's val metric, test R1/R5/R10/mAP/mINP, wall time and folder."""
    root = runs_root(runs_dir)
    columns = ["method", "hash", "preset", "dataset", "status", "epochs", "val_select", *METRIC_NAMES,
               "wall_time_s", "dir"]
    rows = []
    for path in sorted(root.glob(f"*/{CONFIG_FILE}")) if root.is_dir() else []:
        data = _read_json(path)
        row: dict[str, Any] = {"method": data.get("method"), "hash": path.parent.name.rsplit("-", 1)[-1],
                               "preset": data.get("preset"), "dataset": data.get("data", {}).get("dataset"),
                               "dir": str(path.parent)}
        metrics_path = path.parent / METRICS_FILE
        if metrics_path.is_file():
            m = _read_json(metrics_path)
            select = m["selected"]["select_metric"]
            row.update(status="done", epochs=m.get("epochs"), val_select=m["val"].get(select),
                       wall_time_s=m.get("wall_time_s"),
                       **{k: m["test"].get(k) for k in METRIC_NAMES})
        else:
            row["status"] = "partial" if (path.parent / trainer.LAST).is_file() else "empty"
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


__all__ = ["RunError", "runs_root", "run_name", "resolve_config", "run_lock", "Run", "load_run",
           "train_or_load", "find_run", "list_runs"]
