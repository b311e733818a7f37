"""The run registry: one folder per config under ``runs/``, trained once and reused by every notebook.

Layout of ``<runs>/<method>-<config_hash>/``::

    config.json       the resolved config (data-derived fields such as model.num_classes filled in)
    tokenizer/        the run's tokenizer (CaptionTokenizer.save)
    last.pt best.pt   the training state (while training; deleted once metrics.json is written) and the
                      selected (best-validation) weights (engine/trainer.py)
    history.jsonl     one line per epoch: loss terms, lr, validation metrics, wall time
    metrics.json      val metrics of the selected checkpoint and the test metrics (evaluated once), with
                      provenance: method, config hash, dataset, seed, preset, device, wall time, library
                      version, the initialisation of each encoder, the run or checkpoint the model started
                      from (``init_from``, with the source run's config hash) and the dataset's notes
    embeddings/       cached encodings per split (Run.embeddings)

``train_or_load(cfg)`` trains only what is missing: nothing when ``metrics.json`` exists, the rest of an
interrupted run otherwise (resuming ``last.pt``).

Provenance of the code: a finished run records ``code_fingerprint`` in ``metrics.json``, a hash of the library
sources that decide its result (:func:`code_fingerprint`; everything under ``tbps_lib/`` except
:data:`FINGERPRINT_EXCLUDE`) with the git commit and a dirty flag when the library is a git checkout. A run
whose recorded hash differs from the current sources, or that has none (made before fingerprints existed:
"unknown code"), is *stale* (:attr:`Run.stale`, the ``stale`` column of :func:`list_runs`, ``tbps runs list
--stale``). ``train_or_load(cfg, stale=...)`` says what to do with a stale finished run: ``"warn"`` (the
default: load it and print a warning), ``"retrain"`` (move its files to ``<runs>/.stale/`` and train again)
or ``"ok"`` (load it silently); ``$TBPS_STALE`` sets the default (e.g. ``TBPS_STALE=retrain make reproduce``). Two processes asking for the same run serialise on an
``fcntl.flock`` of ``<run>/.lock``: the second waits, then finds the finished run and loads it.
The root is the ``runs_dir`` argument, else ``TBPS_RUNS``, else ``./runs``.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pandas as pd
import torch

from tbps_lib.config import Config, checkpoint_config, config_diff, config_from_dict, config_hash, config_to_dict, default_runs_dir
from tbps_lib.data.formats import TBPSDataset
from tbps_lib.data.loaders import build_tokenizer, prepare_dataset, train_captions
from tbps_lib.data.text import CaptionTokenizer
from tbps_lib.engine import trainer
from tbps_lib.engine.distributed import barrier, world_info
from tbps_lib.engine.evaluate import Encoded, encode, evaluate
from tbps_lib.models.base import RetrievalModel
from tbps_lib.engine.metrics import METRIC_NAMES
from tbps_lib.models.registry import build_model
from tbps_lib.utils import atomic_torch_save, atomic_write_json, read_jsonl, seed_everything, select_device

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
TOKENIZER_DIR = "tokenizer"
EMBEDDINGS_DIR = "embeddings"
LOCK_FILE = ".lock"


STALE_DIR = ".stale"
#: What ``train_or_load`` does with a finished run made by other code (see the module docstring).
STALE_POLICIES = ("warn", "retrain", "ok")
#: Parts of the library that cannot change a trained run's numbers, left out of its code fingerprint:
#: analysis and figures, the command line, caption search, the demo, the papers' reported numbers and
#: the dataset explorer. (Paths relative to the package; a trailing "/" names a folder.)
FINGERPRINT_EXCLUDE = ("analysis/", "reported/", "cli.py", "demo.py", "search.py", "data/explore.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]


class RunError(FileNotFoundError):
    """A run folder is missing, incomplete, or does not match the config asked for."""


def _fingerprint_files(package_dir: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every library file the fingerprint covers, sorted."""
    files = []
    for path in package_dir.rglob("*"):
        rel = path.relative_to(package_dir).as_posix()
        if ("__pycache__" in path.parts or path.suffix in (".pyc", ".pyo") or not path.is_file()
                or any(rel.startswith(e) if e.endswith("/") else rel == e for e in FINGERPRINT_EXCLUDE)):
            continue
        files.append((rel, path))
    return sorted(files)


_SOURCES_CACHE: dict[tuple, str] = {}


def sources_hash(package_dir: str | Path | None = None) -> str:
    """16 hex digits: SHA-1 of the names and bytes of the library files that decide a run's result.

    Recomputed only when a file's size or modification time changed (cached per process on them).
    """
    files = _fingerprint_files(Path(package_dir) if package_dir else PACKAGE_DIR)
    key = tuple((rel, p.stat().st_mtime_ns, p.stat().st_size) for rel, p in files)
    if key not in _SOURCES_CACHE:
        digest = hashlib.sha1()
        for rel, path in files:
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
        _SOURCES_CACHE[key] = digest.hexdigest()[:16]
    return _SOURCES_CACHE[key]


def _git(package_dir: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_fingerprint(package_dir: str | Path | None = None) -> dict[str, Any]:
    """The code a run is trained by: ``sources`` (:func:`sources_hash`, what staleness compares), ``files``
    (how many files it covers), ``commit`` (git HEAD, or None outside a git checkout) and ``dirty`` (whether
    the library folder has uncommitted changes; None without git)."""
    package_dir = Path(package_dir) if package_dir else PACKAGE_DIR
    status = _git(package_dir, "status", "--porcelain", "--", ".")
    return {"sources": sources_hash(package_dir), "files": len(_fingerprint_files(package_dir)),
            "commit": _git(package_dir, "rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def stale_reason(metrics: Mapping[str, Any], current: str | None = None) -> str | None:
    """Why a finished run's numbers may not come from the current code (None: they do).

    ``metrics``: the run's ``metrics.json``; ``current``: :func:`sources_hash` of the library now.
    """
    recorded = metrics.get("code_fingerprint")
    if not isinstance(recorded, Mapping) or not recorded.get("sources"):
        return "unknown code: trained before runs recorded a code fingerprint"
    current = current or sources_hash()
    if recorded["sources"] == current:
        return None
    commit = recorded.get("commit")
    made = f"commit {commit[:10]}" + (" with uncommitted changes" if recorded.get("dirty") else "") \
        if commit else "code outside git"
    return f"trained by other code (sources {recorded['sources']}, {made}; the library is now {current})"


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

    The method config's ``resolve_from_data(ds)`` (``models.base.MethodConfig``) does it: by default
    ``model.num_classes`` (when 0) becomes the number of training identities; methods add their own (e.g.
    the Sew paper's caption-length bounds T_min/T_max).
    """
    model = cfg.model.resolve_from_data(ds)
    return cfg if model == cfg.model else dataclasses.replace(cfg, model=model)


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


def init_source(cfg: Config, runs_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The weights file ``cfg.init`` names and its provenance, or None when the model starts fresh.

    ``init.from_run``: a folder path, a run name (``<method>-<config_hash>``) or a bare config hash under the
    runs root; the run must be finished (its selected weights, ``best.pt``, are taken). ``init.checkpoint``:
    a checkpoint file. The provenance names the source and, for a run, its method and config hash.
    """
    init = cfg.init
    if init.from_run and init.checkpoint:
        raise ValueError(f"init.from_run ({init.from_run!r}) and init.checkpoint ({init.checkpoint!r}) are both "
                         "set; give one")
    if init.checkpoint:
        path = Path(init.checkpoint).expanduser()
        if not path.is_file():
            raise RunError(f"init.checkpoint: {path} is not a file")
        return path, {"kind": "checkpoint", "path": str(path)}
    if not init.from_run:
        return None
    root, ref = runs_root(runs_dir), init.from_run
    candidates = [Path(ref).expanduser(), root / ref]
    found = [c for c in candidates if (c / CONFIG_FILE).is_file()]
    if not found:
        found = sorted(p.parent for p in root.glob(f"*-{ref}/{CONFIG_FILE}")) if root.is_dir() else []
    if len(found) != 1:
        what = "no run folder" if not found else f"{len(found)} run folders ({', '.join(map(str, found))})"
        raise RunError(f"init.from_run = {ref!r}: {what} found (as a folder, a run name or a config hash under "
                       f"{root}); train the source run first (train_or_load of its config)")
    source = found[0]
    if not (source / METRICS_FILE).is_file():
        raise RunError(f"init.from_run = {ref!r}: {source} has not finished training (no {METRICS_FILE})")
    stored = config_from_dict(_read_json(source / CONFIG_FILE))
    best = trainer.load_checkpoint(source / trainer.BEST)
    return source / trainer.BEST, {"kind": "run", "run": source.name, "path": str(source / trainer.BEST),
                                   "method": stored.method, "config_hash": config_hash(stored),
                                   "selected": {"epoch": int(best["epoch"]), "step": int(best["step"])}}


def initialise(model: torch.nn.Module, cfg: Config, runs_dir: str | Path | None = None) -> dict[str, Any] | None:
    """Load the weights ``cfg.init`` names into ``model`` (``trainer.init_weights``: every key must match
    unless ``init.skip`` exempts it); return the provenance for ``metrics.json`` (None: fresh model)."""
    found = init_source(cfg, runs_dir)
    if found is None:
        return None
    path, provenance = found
    ckpt = trainer.load_checkpoint(path)
    state = ckpt["model"] if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
    provenance["tensors"] = trainer.init_weights(model, state, tuple(cfg.init.skip), str(path))
    if cfg.init.skip:
        provenance["skip"] = list(cfg.init.skip)
    return provenance


def _encoder_init(model: RetrievalModel) -> dict[str, str]:
    """``pretrained:<where>`` or ``random`` for each encoder (``model.pretrained_sources()``)."""
    return {k: f"pretrained:{v}" if v else "random" for k, v in model.pretrained_sources().items()}


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
    def stale_reason(self) -> str | None:
        """Why this run's numbers may not come from the current library code, or None when they do
        (:func:`stale_reason`); None for a run that has not finished."""
        if not (self.dir / METRICS_FILE).is_file():
            return None
        return stale_reason(self.metrics)

    @property
    def stale(self) -> bool:
        """True when the run was made by other code than the current library (or by unknown code)."""
        return self.stale_reason is not None

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
        model = build_model(checkpoint_config(self.config, self.tokenizer.vocab_size))
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
                 root: str | None = None) -> dict[str, Any]:
        """R1/R5/R10/mAP/mINP of ``split`` with the selected model, optionally re-ranked (the result then
        names the re-ranking under ``"rerank"``; ``"rescore"`` is two-stage inference, see
        ``engine.evaluate.evaluate``); ``dataset`` / ``root`` evaluate on another dataset's split
        (see :meth:`embeddings`)."""
        return evaluate(self.model, self.embeddings(split, dataset=dataset, root=root), rerank=rerank,
                        rerank_params=rerank_params)

    def provenance(self, split: str | None = None) -> dict[str, Any]:
        """Where a number comes from: the provenance fields of ``metrics.json`` (plus ``split``)."""
        keep = ("method", "config_hash", "preset", "dataset", "seed", "device", "library_version", "init",
                "init_from", "dataset_notes", "selected", "wall_time_s", "code_fingerprint")
        prov = {k: v for k, v in self.metrics.items() if k in keep}
        prov["stale"] = self.stale
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
        diff = config_diff(config_from_dict(_read_json(path)), cfg, results_only=True)
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
                   device: torch.device, init_from: dict[str, Any] | None) -> None:
    metrics = {
        "method": cfg.method, "config_hash": config_hash(cfg), "preset": cfg.preset,
        "dataset": cfg.data.dataset, "dataset_name": ds.name, "seed": cfg.seed,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"),
        "world_size": world_info()[0],
        "library_version": library_version(), "torch_version": torch.__version__,
        "code_fingerprint": code_fingerprint(),
        "init": _encoder_init(model), "init_from": init_from, "dataset_notes": list(ds.report.notes),
        "selected": {"epoch": result.best_epoch, "step": result.best_step,
                     "select_metric": cfg.eval.select_metric},
        "epochs": result.epochs, "steps": result.steps,
        "wall_time_s": round(result.train_time_s + result.test_time_s, 2),
        "val": {"split": "val", **result.val}, "test": {"split": "test", **(result.test or {})},
    }
    atomic_write_json(run_dir / METRICS_FILE, metrics)


def _train(run_dir: Path, cfg: Config, ds: TBPSDataset, tokenizer: CaptionTokenizer, device: torch.device,
           progress: bool, runs_dir: str | Path | None) -> None:
    """Build the model, initialise it as ``cfg.init`` says and fit (resuming ``last.pt`` if there is one);
    rank 0 writes metrics.json."""
    seed_everything(cfg.seed)
    model = build_model(cfg)
    init_from = initialise(model, cfg, runs_dir)
    result = trainer.fit(model, ds, tokenizer, cfg, run_dir, device=device, progress=progress)
    if world_info()[1] == 0:
        _write_metrics(run_dir, cfg, ds, model, result, device, init_from)
        # A finished run never resumes (metrics.json marks it done): its training state (weights and optimiser
        # moments: 1.6 GB for ViT-B/16 + BERT-base) goes; best.pt holds the selected weights.
        (run_dir / trainer.LAST).unlink(missing_ok=True)


def _stale_policy(stale: str | None) -> str:
    policy = (stale or os.environ.get("TBPS_STALE") or "warn").strip().lower()
    if policy not in STALE_POLICIES:
        where = "stale" if stale else "$TBPS_STALE"
        raise ValueError(f"{where} must be one of {list(STALE_POLICIES)}, got {policy!r}")
    return policy


def _keep_finished(run: Run, policy: str) -> bool:
    """Whether to use the finished ``run`` as it is under the stale-run ``policy`` (warning if asked)."""
    reason = run.stale_reason
    if reason is None or policy == "ok":
        return True
    if policy == "warn":
        print(f"warning: stale run {run.dir}: {reason}. Its numbers may not be what the current code gives; "
              "retrain it with train_or_load(cfg, stale='retrain') or TBPS_STALE=retrain (list them with "
              "`tbps runs list --stale`).", file=sys.stderr, flush=True)
        return True
    return False


def _set_aside(run_dir: Path) -> Path:
    """Move a stale run's files (not its lock) to ``<runs>/.stale/<name>-<sources>``; return that folder."""
    recorded = _read_json(run_dir / METRICS_FILE).get("code_fingerprint") or {}
    base = run_dir.parent / STALE_DIR / f"{run_dir.name}-{recorded.get('sources') or 'unknown'}"
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}.{n}")
    target.mkdir(parents=True)
    for child in run_dir.iterdir():
        if child.name != LOCK_FILE:
            shutil.move(str(child), str(target / child.name))
    print(f"retraining stale run {run_dir}; its old files are in {target}", file=sys.stderr, flush=True)
    return target


def train_or_load(cfg: Config, runs_dir: str | Path | None = None, progress: bool = True,
                  device: str | torch.device | None = None, stale: str | None = None) -> Run:
    """The run of ``cfg``: trained (or its interruption resumed) if ``metrics.json`` is missing, else loaded.

    ``stale``: what to do when the finished run was made by other code (:attr:`Run.stale`): ``"warn"``
    (load it and print a warning to stderr), ``"retrain"`` (move its files to ``<runs>/.stale/`` and train
    it again) or ``"ok"`` (load it silently); default ``$TBPS_STALE``, else ``"warn"``.
    Safe to call from several processes at once (a file lock serialises them) and under ``torchrun``
    (every rank trains its share; rank 0 writes).
    """
    policy = _stale_policy(stale)
    ds = prepare_dataset(cfg)
    cfg = resolve_config(cfg, ds)
    run_dir = runs_root(runs_dir) / run_name(cfg)
    chosen = select_device(device)
    if (run_dir / METRICS_FILE).is_file():
        existing = Run(run_dir, cfg, chosen, ds)
        if _keep_finished(existing, policy):
            return existing
    world, rank = world_info()
    if world > 1:  # rank 0 prepares the folder, the others wait and read its tokenizer
        if rank == 0 and (run_dir / METRICS_FILE).is_file():
            _set_aside(run_dir)
        tokenizer = _prepare_folder(run_dir, cfg, ds) if rank == 0 else None
        barrier()
        tokenizer = tokenizer or CaptionTokenizer.load(run_dir / TOKENIZER_DIR)
        _train(run_dir, cfg, ds, tokenizer, chosen, progress, runs_dir)
        barrier()
        return Run(run_dir, cfg, chosen, ds, trained_now=True)
    with run_lock(run_dir):
        if (run_dir / METRICS_FILE).is_file():  # another process finished it while we waited, or it is stale
            existing = Run(run_dir, cfg, chosen, ds)
            if policy != "retrain" or not existing.stale:
                return existing
            _set_aside(run_dir)
        tokenizer = _prepare_folder(run_dir, cfg, ds)
        _train(run_dir, cfg, ds, tokenizer, chosen, progress, runs_dir)
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


def list_runs(runs_dir: str | Path | None = None, only_stale: bool = False) -> pd.DataFrame:
    """One row per run folder under the root: method, hash, preset, dataset, status, stale, epochs, selected
    checkpoint's val metric, test R1/R5/R10/mAP/mINP, wall time and folder.

    ``stale`` (finished runs): True when the run was made by other code than the current library, or by
    unknown code (:attr:`Run.stale`); None for unfinished runs. ``only_stale`` keeps the stale runs only.
    """
    root = runs_root(runs_dir)
    columns = ["method", "hash", "preset", "dataset", "status", "stale", "epochs", "val_select", *METRIC_NAMES,
               "wall_time_s", "dir"]
    current = sources_hash()
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
            row.update(status="done", stale=stale_reason(m, current) is not None, epochs=m.get("epochs"),
                       val_select=m["val"].get(select),
                       wall_time_s=m.get("wall_time_s"),
                       **{k: m["test"].get(k) for k in METRIC_NAMES})
        else:
            row["status"] = "partial" if (path.parent / trainer.LAST).is_file() else "empty"
        rows.append(row)
    table = pd.DataFrame(rows, columns=columns)
    return table[table["stale"] == True].reset_index(drop=True) if only_stale else table  # noqa: E712


__all__ = ["RunError", "STALE_POLICIES", "FINGERPRINT_EXCLUDE", "sources_hash", "code_fingerprint", "stale_reason",
           "runs_root", "run_name", "resolve_config", "init_source", "initialise", "run_lock", "Run", "load_run",
           "train_or_load", "find_run", "list_runs", "run_parallel", "train_many", "workbook_weights"]


# ----------------------------------------------------------------------------------------------------
# Many runs at once (``tbps reproduce``)

def _pool_init(threads: int) -> None:
    """Worker start-up: ``threads`` intra-op threads per process (runs, not threads, share the cores)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["TBPS_PROGRESS"] = "0"
    torch.set_num_threads(threads)


def run_parallel(fn: Callable[..., Any], calls: list[tuple[Any, ...]], jobs: int = 1, threads: int = 1,
                 progress: bool = True, desc: str = "") -> list[Any]:
    """``[fn(*args) for args in calls]``, ``jobs`` processes at a time with ``threads`` torch threads each
    (``fn`` must be a module-level function; ``jobs=1`` runs here, in order). Results come back in the
    order of ``calls``; a failing call raises after the calls already started have finished."""
    import concurrent.futures as cf
    import multiprocessing

    from tbps_lib.utils import progress as progress_bar

    results: list[Any] = [None] * len(calls)
    bar = progress_bar(total=len(calls), enabled=progress, desc=desc)
    try:
        if jobs <= 1:
            for i, args in enumerate(calls):
                results[i] = fn(*args)
                bar.update(1)
            return results
        ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads is unsafe
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_pool_init,
                                    initargs=(threads,)) as pool:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
            for future in cf.as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    finally:
        bar.close()
    return results


def _train_one(cfg: Config, runs_dir: str | None, stale: str | None, device: str | None
               ) -> tuple[str, bool, float]:
    run = train_or_load(cfg, runs_dir, progress=False, device=device, stale=stale)
    wall = float(run.metrics.get("wall_time_s", 0.0)) if run.trained_now else 0.0
    return run.name, run.trained_now, wall


def _pretrain_one(name: str) -> None:
    from tbps_lib import pretrain

    pretrain.ensure_pretrained(name, progress=False)


def _task(what: str, arg: Any, *rest: Any) -> Any:
    """One job of :func:`train_many`'s pool: ``("weights", name)`` or ``("run", config, ...)``."""
    return _pretrain_one(arg) if what == "weights" else _train_one(arg, *rest)


def workbook_weights(value: object) -> set[str]:
    """Every ``workbook:<name>`` string inside a (nested) config or config dict: the workbook's pretrained
    weights a run loads (``tbps_lib.pretrain``)."""
    from tbps_lib.pretrain import WORKBOOK_PREFIX

    if isinstance(value, Config):
        value = config_to_dict(value)
    if isinstance(value, dict):
        return set().union(*(workbook_weights(v) for v in value.values())) if value else set()
    if isinstance(value, str) and value.startswith(WORKBOOK_PREFIX):
        return {value[len(WORKBOOK_PREFIX):]}
    return set()


def train_many(configs: list[Config], runs_dir: str | Path | None = None, jobs: int = 1, threads: int = 1,
               stale: str | None = None, progress: bool = True, device: str | None = None) -> pd.DataFrame:
    """Train (or load) the run of every config, ``jobs`` processes at a time with ``threads`` threads each
    (:func:`run_parallel`): on a laptop, two one-thread runs side by side finish sooner than one two-thread
    run after the other (small models do not scale across threads). Duplicate configs train once.

    The workbook weights the runs load (``workbook:<name>``) are jobs of the same pool, first, in
    ``pretrain.training_order``; then the runs, those whose weights come last in that order last. So runs on
    the unimodal smoke backbones train beside LAIP's vision-language stage instead of after it (a run whose
    weights another process is still training waits for them: ``pretrain.ensure_pretrained`` holds a lock).
    A config whose ``init.from_run`` names another run waits for the first wave (everything else).
    Returns one line per distinct config: ``run``, ``trained_now``, ``wall_time_s`` (0 for a loaded run)."""
    from tbps_lib.pretrain import is_complete, training_order, weights_dir, workbook_config

    distinct = list({config_hash(c): c for c in configs}.values())
    folder = None if runs_dir is None else str(runs_dir)
    order = training_order(set().union(*(workbook_weights(c) for c in distinct)) if distinct else set())
    rank = {name: i for i, name in enumerate(order)}
    weights = [("weights", w) for w in order if not is_complete(weights_dir(workbook_config(w)))]
    rows: list[tuple[str, bool, float]] = []
    for i, wave in enumerate(([c for c in distinct if not c.init.from_run], [c for c in distinct if c.init.from_run])):
        wave = sorted(wave, key=lambda c: max((rank[w] for w in workbook_weights(c)), default=-1))
        jobs_ = (weights if i == 0 else []) + [("run", c, folder, stale, device) for c in wave]
        if jobs_:
            done = run_parallel(_task, jobs_, jobs, threads, progress, desc="weights and runs" if i == 0 and weights
                                else "runs")
            rows += [r for r in done if r is not None]
    return pd.DataFrame(rows, columns=["run", "trained_now", "wall_time_s"])
