"""The training engine every method reuses unchanged: :func:`fit`.

What it does, in order (``CONTRIBUTING.md``, "The engine"):

* Optimiser: Adam or AdamW over parameter groups. Backbone parameters (``model.backbone_parameters()``)
  get ``lr * backbone_lr_factor``; biases and normalisation weights (1-D parameters) get no weight decay.
* Schedule (:class:`LRSchedule`), stepped per iteration: ``cosine`` (to ``min_lr``), ``multistep``
  (x ``gamma`` at each milestone epoch) or ``constant``, each after a linear warm-up of ``warmup_epochs``.
  The learning rate is a pure function of the step, so a resumed run needs no scheduler state but its step.
* Length: ``optim.epochs`` epochs, cut short by ``optim.max_steps`` when set.
* Frozen parameters: ``optim.freeze`` prefixes of parameter names get ``requires_grad=False`` before the
  optimiser is built (:func:`freeze_parameters`); they stay out of it.
* Training context: before each training forward the model gets ``set_training_context(ctx)`` with a
  :class:`~tbps_lib.models.base.TrainingContext` (step, epoch, total steps, steps per epoch); after each
  optimiser step ``after_optimizer_step(ctx)`` (momentum encoders, queues), under ``torch.no_grad``.
* Precision: bf16 autocast on CUDA, fp32 on CPU (no gradient scaler is needed for bf16).
* No host synchronisation inside the step loop: loss terms are summed on the device, and the first step
  at which each term is NaN/inf is tracked on the device too; values reach the host only every
  ``log_every`` steps, at checkpoints and at epoch ends, where a non-finite term stops training with
  :class:`TrainingError` naming the term and the step.
* Validation every ``eval.every`` epochs and after the last, on the ``val`` split with ``rank_metrics``;
  ``best.pt`` keeps the weights with the best ``eval.select_metric`` (ties keep the earlier epoch) and
  ``last.pt`` the full training state. When training ends, the best weights are loaded back and the test
  split is evaluated once.
* Checkpoints are written atomically and read with ``torch.load(..., weights_only=True)``. ``last.pt``
  holds model, optimiser, schedule step, the RNG states of every rank (torch, CUDA, NumPy, Python),
  epoch, step, position in the epoch, running loss sums, the history and the best metric, so a resumed run
  continues exactly (samplers and flips are fixed per (seed, epoch), see ``data/loaders.py``). Resuming
  under a different config is refused with the list of differing fields.
* DDP (``torchrun``): call ``engine.distributed.init_distributed`` first; each rank gets its slice of every
  batch, only rank 0 writes files and validates; losses that need every rank's features gather them with
  ``engine.distributed.all_gather_with_grad``.
* Progress bar (``utils.progress``; ``TBPS_PROGRESS=0`` turns it off) and ``history.jsonl``: one JSON
  line per epoch with each loss term's mean, the learning rate, validation metrics and wall time.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from tbps_lib.config import config_diff, config_from_dict, config_hash, config_to_dict
from tbps_lib.data.formats import TBPSDataset
from tbps_lib.data.loaders import TrainPairs, build_eval_loaders, build_train_loader
from tbps_lib.data.text import CaptionTokenizer
from tbps_lib.engine.distributed import barrier, init_distributed, world_info
from tbps_lib.engine.evaluate import autocast_context, encode_loaders, evaluate, to_device
from tbps_lib.models.base import TrainingContext
from tbps_lib.engine.metrics import METRIC_NAMES
from tbps_lib.utils import atomic_torch_save, atomic_write_jsonl, progress as progress_bar
from tbps_lib.utils import seed_everything, select_device

LAST = "last.pt"
BEST = "best.pt"
HISTORY = "history.jsonl"
SCHEDULES = ("cosine", "multistep", "constant")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a malformed loss dict)."""


class ResumeError(ValueError):
    """A checkpoint cannot be resumed under this config."""


# ----------------------------------------------------------------------------------------------------
# Devices


def _device_for_rank(device: str | torch.device | None) -> torch.device:
    """Under DDP on CUDA every rank runs on ``cuda:LOCAL_RANK``; otherwise ``select_device``."""
    chosen = select_device(device)
    if chosen.type == "cuda" and world_info()[0] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return chosen


# ----------------------------------------------------------------------------------------------------
# Optimiser and schedule


def freeze_parameters(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter whose name starts with one of ``prefixes``
    (``optim.freeze``); return their names. A prefix that matches no parameter is an error listing the
    top-level modules."""
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unmatched:
        top = sorted({n.split(".")[0] for n in names})
        raise ValueError(f"optim.freeze: prefix(es) {unmatched} match no parameter of {type(model).__name__}; "
                         f"its top-level modules: {top}")
    frozen = []
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """Adam/AdamW with four parameter groups: {backbone, head} x {decay, no decay}.

    Each group records its ``base_lr`` (``optim.lr``, times ``optim.backbone_lr_factor`` for backbones);
    :class:`LRSchedule` scales it per step. Frozen parameters are left out.
    """
    opt = cfg.optim
    backbone = {id(p) for p in model.backbone_parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in backbone, p.ndim >= 2), []).append(p)
    if not groups:
        raise TrainingError(f"{type(model).__name__} has no trainable parameters")
    param_groups = []
    for (is_backbone, decay), params in sorted(groups.items()):
        lr = opt.lr * (opt.backbone_lr_factor if is_backbone else 1.0)
        param_groups.append({"params": params, "lr": lr, "base_lr": lr,
                             "weight_decay": opt.weight_decay if decay else 0.0,
                             "name": f"{'backbone' if is_backbone else 'head'}/{'decay' if decay else 'no_decay'}"})
    fused = {"fused": True} if all(p.is_cuda for p in model.parameters()) else {}
    if opt.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=opt.lr, **fused)
    if opt.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=opt.lr, **fused)
    raise ValueError(f"optim.optimizer must be 'adam' or 'adamw', got {opt.optimizer!r}")


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor as a function of the step (0-based count of finished steps).

    Linear warm-up over ``warmup_steps`` (the factor reaches 1 at the end), then ``cosine`` from 1 to
    ``min_ratio`` at ``total_steps``, ``multistep`` (``gamma`` per milestone step passed), or ``constant``.
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    milestone_steps: tuple[int, ...] = ()
    gamma: float = 0.1
    min_ratio: float = 0.0

    @classmethod
    def from_config(cls, cfg: Any, steps_per_epoch: int, total_steps: int) -> "LRSchedule":
        opt = cfg.optim
        if opt.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {list(SCHEDULES)}, got {opt.schedule!r}")
        if opt.schedule == "multistep" and not opt.milestones:
            raise ValueError("optim.schedule = 'multistep' needs optim.milestones (epochs), e.g. 20,40")
        warmup = round(opt.warmup_epochs * steps_per_epoch)
        return cls(kind=opt.schedule, total_steps=total_steps, warmup_steps=min(warmup, total_steps),
                   milestone_steps=tuple(m * steps_per_epoch for m in opt.milestones), gamma=opt.gamma,
                   min_ratio=opt.min_lr / opt.lr if opt.lr > 0 else 0.0)

    def factor(self, step: int) -> float:
        warm = (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            return warm * (self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))
        if self.kind == "multistep":
            return warm * self.gamma ** sum(step >= m for m in self.milestone_steps)
        return warm

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every group's lr for ``step``."""
        f = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * f

    def head_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """The learning rate of the head groups (or the first group) at ``step``, for the log."""
        heads = [g for g in optimizer.param_groups if g.get("name", "").startswith("head")]
        return (heads or optimizer.param_groups)[0]["base_lr"] * self.factor(step)


def plan_steps(cfg: Any, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, epochs to run): ``optim.epochs`` epochs, cut at ``optim.max_steps`` when set."""
    if cfg.optim.epochs < 1:
        raise ValueError(f"optim.epochs must be at least 1, got {cfg.optim.epochs}")
    if steps_per_epoch < 1:
        raise ValueError("the training split yields no full batch; lower data.batch_size")
    total = cfg.optim.epochs * steps_per_epoch
    if cfg.optim.max_steps is not None:
        if cfg.optim.max_steps < 1:
            raise ValueError(f"optim.max_steps must be positive, got {cfg.optim.max_steps}")
        total = min(total, cfg.optim.max_steps)
    return total, math.ceil(total / steps_per_epoch)


# ----------------------------------------------------------------------------------------------------
# Training state and checkpoints


@dataclass
class TrainState:
    """Everything beyond model and optimiser that a resumed run needs to continue exactly."""

    epoch: int = 0  # finished epochs
    batch_in_epoch: int = 0  # finished steps of the current epoch
    step: int = 0  # finished steps overall
    epoch_sums: dict[str, float] = field(default_factory=dict)  # loss sums of the current epoch
    best_metric: float | None = None
    best_epoch: int = 0
    best_step: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    train_time_s: float = 0.0
    finished: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), NumPy and Python, as weights-only-loadable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(py_state), "gauss": gauss}}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _gather_rng() -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order); a list of one outside DDP."""
    mine = rng_state()
    world, _ = world_info()
    if world == 1:
        return [mine]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary unpickling), on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise ResumeError(f"cannot read checkpoint {path}: {e}") from e


def load_weights(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """``model.load_state_dict(state)``; weights that do not fit (the method's or an encoder's code changed
    since ``path`` was written) give an error naming the file and the first mismatches."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        shown = "; ".join(details[:3]) + (f"; ... ({len(details)} problems)" if len(details) > 3 else "")
        raise ResumeError(f"the weights in {path} do not fit the {type(model).__name__} built from its config "
                          f"(did the model code change since it was trained?): {shown}. Delete the run folder "
                          f"to retrain it.") from None


def init_weights(model: nn.Module, state: dict[str, Tensor], skip: tuple[str, ...], source: str) -> int:
    """Initialise ``model`` from ``state`` (``init.from_run`` / ``init.checkpoint``); return the number of
    tensors taken.

    Every key must be present on both sides with the same shape, except keys starting with a ``skip``
    prefix (``init.skip``): the source's are ignored and the model's keep their fresh initialisation. A
    mismatch is an error listing every missing, unexpected and mis-shaped key; a skip prefix matching no key
    on either side is an error too.
    """
    own = model.state_dict()
    skipped = [p for p in skip if not any(k.startswith(p) for k in (*own, *state))]
    if skipped:
        raise ValueError(f"init.skip: prefix(es) {skipped} match no key of {source} or of the "
                         f"{type(model).__name__}")

    def keep(key: str) -> bool:
        return not any(key.startswith(p) for p in skip)

    missing = [k for k in own if keep(k) and k not in state]
    unexpected = [k for k in state if keep(k) and k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in own
              if keep(k) and k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(keys)}): {', '.join(keys)}" for name, keys in
                 (("missing in the source", missing), ("not in the model", unexpected),
                  ("shape source -> model", shapes)) if keys]
        raise ValueError(f"cannot initialise the {type(model).__name__} from {source}: " + "; ".join(parts)
                         + ". List prefixes to leave out in init.skip (e.g. init.skip=classifier).")
    taken = {k: v for k, v in state.items() if keep(k)}
    model.load_state_dict(taken, strict=False)
    return len(taken)


def check_same_config(saved: dict[str, Any], cfg: Any, path: Path) -> None:
    """Refuse to resume ``path`` (saved under config ``saved``) with a different ``cfg`` (fields that do not
    change results, ``config.RESULT_NEUTRAL_FIELDS``, may differ)."""
    diff = config_diff(config_from_dict(saved), cfg, results_only=True)
    if diff:
        raise ResumeError(f"{path} was trained with a different config; refusing to resume. "
                          f"Differing fields (checkpoint -> now): {'; '.join(diff)}")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------------
# The step loop pieces


class LossMeter:
    """Sums of loss terms and, per term, the first step where it was NaN/inf, all kept on the device."""

    def __init__(self, device: torch.device, sums: dict[str, float] | None = None) -> None:
        self.device = device
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in (sums or {}).items()}
        self.first_bad: dict[str, Tensor] = {}

    def add(self, losses: dict[str, Tensor], step: int) -> None:
        """Accumulate one step's terms (device ops only: no host synchronisation)."""
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            bad = self.first_bad.get(k)
            if bad is None:
                bad = torch.full((), -1, dtype=torch.long, device=self.device)
            self.first_bad[k] = torch.where((bad < 0) & ~torch.isfinite(v), torch.full_like(bad, step), bad)

    def read(self) -> tuple[dict[str, float], dict[str, int]]:
        """Host copies (one transfer) of the sums, averaged over ranks under DDP, and the first bad steps."""
        names = sorted(self.sums)
        if not names:
            return {}, {}
        sums = torch.stack([self.sums[k] for k in names])
        bad = torch.stack([self.first_bad.get(k, torch.full((), -1, dtype=torch.long, device=self.device))
                           for k in names])
        world, _ = world_info()
        if world > 1:
            dist.all_reduce(sums)
            sums = sums / world
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        sum_list, bad_list = sums.tolist(), bad.tolist()
        return dict(zip(names, sum_list)), {k: b for k, b in zip(names, bad_list) if b >= 0}


def _check_finite(bad: dict[str, int], epoch: int, last_ckpt: Path) -> None:
    if bad:
        term, step = min(bad.items(), key=lambda kv: kv[1])
        raise TrainingError(f"loss term {term!r} became NaN/inf at step {step + 1} (epoch {epoch + 1}); "
                            f"training stopped. The last good checkpoint is {last_ckpt} (if it exists); "
                            f"lower optim.lr or set optim.clip_grad.")


def _check_losses(out: Any, model: nn.Module) -> dict[str, Tensor]:
    """The model's loss dict must hold scalar tensors and a ``loss`` entry (checked on the host, cheaply)."""
    name = type(_unwrap(model)).__name__
    if not isinstance(out, dict) or "loss" not in out:
        raise TrainingError(f"{name}(batch) must return a dict of loss terms with a 'loss' entry, "
                            f"got {type(out).__name__}{'' if not isinstance(out, dict) else ' ' + str(sorted(out))}")
    for k, v in out.items():
        if not isinstance(v, Tensor) or v.dim() != 0:
            raise TrainingError(f"{name}(batch)[{k!r}] must be a scalar tensor, got "
                                f"{type(v).__name__}{tuple(v.shape) if isinstance(v, Tensor) else ''}")
    return out


def train_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer, device: torch.device,
               clip_grad: float | None, ctx: TrainingContext | None = None) -> dict[str, Tensor]:
    """One optimisation step; returns the loss terms (still on the device).

    With ``ctx``, the (unwrapped) model gets ``set_training_context(ctx)`` before the forward and
    ``after_optimizer_step(ctx)`` after the optimiser step (under ``torch.no_grad``).
    """
    inner = _unwrap(model)
    if ctx is not None:
        inner.set_training_context(ctx)
    with autocast_context(device):
        out = _check_losses(model(to_device(batch, device)), model)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    optimizer.step()
    if ctx is not None:
        with torch.no_grad():
            inner.after_optimizer_step(ctx)
    return out


# ----------------------------------------------------------------------------------------------------
# fit


@dataclass
class FitResult:
    """What :func:`fit` returns: the selected checkpoint's validation metrics and the test metrics."""

    out_dir: Path
    best_epoch: int
    best_step: int
    val: dict[str, float]
    test: dict[str, float] | None
    epochs: int
    steps: int
    train_time_s: float
    history: list[dict[str, Any]]
    interrupted: bool = False
    resumed_from_step: int = 0
    test_time_s: float = 0.0


class _Fit:
    """One call of :func:`fit`: holds the pieces the step loop, validation and checkpoints share."""

    def __init__(self, model: nn.Module, ds: TBPSDataset, tokenizer: CaptionTokenizer, cfg: Any, out_dir: Path,
                 device: torch.device, show: bool, log_every: int) -> None:
        self.world, self.rank = world_info()
        self.cfg, self.ds, self.tokenizer, self.device = cfg, ds, tokenizer, device
        self.out_dir, self.log_every = Path(out_dir), max(1, log_every)
        self.show = show and self.rank == 0
        self.model = model.to(device)
        freeze_parameters(self.model, tuple(cfg.optim.freeze))
        self.pairs = TrainPairs(ds, cfg.image.img_size, cfg.data.flip, cfg.seed, cache=cfg.data.num_workers == 0)
        self.loader, self.sampler = build_train_loader(self.pairs, cfg, tokenizer, device.type == "cuda",
                                                       self.world, self.rank)
        self.steps_per_epoch = self.sampler.num_batches
        self.total_steps, self.n_epochs = plan_steps(cfg, self.steps_per_epoch)
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = LRSchedule.from_config(cfg, self.steps_per_epoch, self.total_steps)
        self.val_loaders = build_eval_loaders(ds, "val", cfg, tokenizer, device.type == "cuda") \
            if self.rank == 0 else None
        self.state = TrainState()
        self.ddp: nn.Module = self.model
        self._clock = time.perf_counter()
        if cfg.eval.select_metric not in METRIC_NAMES:
            raise ValueError(f"eval.select_metric must be one of {list(METRIC_NAMES)}, got {cfg.eval.select_metric!r}")

    # -- messages, checkpoints ----------------------------------------------------------------------
    def tick(self) -> None:
        """Add the wall time since the last tick to the run's training time."""
        now = time.perf_counter()
        self.state.train_time_s += now - self._clock
        self._clock = now

    def say(self, message: str) -> None:
        if self.show:
            print(message, file=sys.stderr, flush=True)

    def resume(self) -> int:
        """Load ``last.pt`` if present (refusing a different config); return the step resumed from."""
        path = self.out_dir / LAST
        if not path.is_file():
            seed_everything(self.cfg.seed + self.rank)
            return 0
        ckpt = load_checkpoint(path)
        check_same_config(ckpt["config"], self.cfg, path)
        load_weights(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["state"])
        rngs = ckpt["rng"]
        if len(rngs) != self.world:
            self.say(f"note: {path} was written by {len(rngs)} process(es), now {self.world}: "
                     "the run continues but not bit-for-bit")
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        self.say(f"resumed {path} at epoch {self.state.epoch}, step {self.state.step}")
        return self.state.step

    def save_last(self) -> None:
        rngs = _gather_rng()  # collective: every rank takes part
        if self.rank == 0:
            atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                               "schedule": {"kind": self.schedule.kind, "step": self.state.step},
                               "state": self.state.to_dict(), "rng": rngs, "config": config_to_dict(self.cfg),
                               "config_hash": config_hash(self.cfg), "world_size": self.world},
                              self.out_dir / LAST)
            atomic_write_jsonl(self.out_dir / HISTORY, self.state.history)

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> dict[str, float] | None:
        """Metrics of the val split (rank 0 only; other ranks wait and get None)."""
        metrics = None
        if self.rank == 0:
            images, captions = self.val_loaders
            encoded = encode_loaders(self.model, images, captions, "val", self.device, progress=False)
            metrics = evaluate(self.model, encoded)
        barrier()
        return metrics

    def end_epoch(self, epoch: int, meter: LossMeter) -> None:
        """Epoch means, validation when due, best/last checkpoints and the history line."""
        sums, bad = meter.read()
        _check_finite(bad, epoch, self.out_dir / LAST)
        steps = max(1, self.state.batch_in_epoch)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.state.step}
        row.update({k: v / steps for k, v in sums.items()})
        row["lr"] = self.schedule.head_lr(self.optimizer, max(0, self.state.step - 1))
        if (epoch + 1) % max(1, self.cfg.eval.every) == 0 or epoch + 1 == self.n_epochs:
            val = self.validate()
            if val is not None:
                row.update({f"val_{k}": v for k, v in val.items()})
                score = val[self.cfg.eval.select_metric]
                if self.state.best_metric is None or score > self.state.best_metric:
                    self.state.best_metric, self.state.best_val = score, val
                    self.state.best_epoch, self.state.best_step = epoch + 1, self.state.step
                    atomic_torch_save({"model": self.model.state_dict(), "epoch": epoch + 1,
                                       "step": self.state.step, "val": val, "config_hash": config_hash(self.cfg)},
                                      self.out_dir / BEST)
        self.tick()
        row["time_s"] = round(self.state.train_time_s, 3)
        self.state.history.append(row)
        self.state.epoch, self.state.batch_in_epoch, self.state.epoch_sums = epoch + 1, 0, {}

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stop_after_steps: int | None, checkpoint_every: int | None) -> bool:
        """Train to the end (True) or until ``stop_after_steps`` (False, with ``last.pt`` saved)."""
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.model.train()
        bar = progress_bar(total=self.total_steps, initial=self.state.step, enabled=self.show,
                           desc=f"train {self.cfg.method}")
        self._clock = time.perf_counter()
        try:
            for epoch in range(self.state.epoch, self.n_epochs):
                meter = LossMeter(self.device, self.state.epoch_sums)
                epoch_steps = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
                if self.state.batch_in_epoch < epoch_steps:
                    self.pairs.set_epoch(epoch)
                    self.sampler.set_epoch(epoch, self.state.batch_in_epoch)
                    for batch in self.loader:
                        self.schedule.apply(self.optimizer, self.state.step)
                        ctx = TrainingContext(self.state.step, epoch, self.total_steps, self.steps_per_epoch)
                        losses = train_step(self.ddp, batch, self.optimizer, self.device, self.cfg.optim.clip_grad,
                                            ctx)
                        meter.add(losses, self.state.step)
                        self.state.step += 1
                        self.state.batch_in_epoch += 1
                        bar.update(1)
                        at_ckpt = bool(checkpoint_every) and self.state.step % checkpoint_every == 0
                        stop = stop_after_steps is not None and self.state.step >= stop_after_steps
                        if at_ckpt or stop or self.state.step % self.log_every == 0:
                            self.sync(meter, epoch, bar, save=at_ckpt or stop)
                        if stop:
                            return False
                        if self.state.batch_in_epoch >= epoch_steps:
                            break
                self.end_epoch(epoch, meter)
                if epoch + 1 < self.n_epochs:  # after the last one `fit` saves the finished state instead
                    self.save_last()
        finally:
            bar.close()
        return True

    def sync(self, meter: LossMeter, epoch: int, bar: Any, save: bool) -> None:
        """A logging point: read the sums, stop on NaN/inf, show the running means, maybe checkpoint."""
        sums, bad = meter.read()
        _check_finite(bad, epoch, self.out_dir / LAST)
        steps = max(1, self.state.batch_in_epoch)
        bar.set_postfix({k: f"{v / steps:.3f}" for k, v in sums.items()}, refresh=False)
        if save:
            self.state.epoch_sums = sums
            self.tick()
            self.save_last()

    def load_best(self) -> None:
        """Put the selected (best-val) weights into the model."""
        load_weights(self.model, load_checkpoint(self.out_dir / BEST)["model"], self.out_dir / BEST)

    def test(self) -> dict[str, float] | None:
        """Evaluate the test split once with the model as it is (rank 0; other ranks get None)."""
        if self.rank != 0:
            return None
        images, captions = build_eval_loaders(self.ds, "test", self.cfg, self.tokenizer, self.device.type == "cuda")
        encoded = encode_loaders(self.model, images, captions, "test", self.device, progress=self.show)
        return evaluate(self.model, encoded)


def fit(model: nn.Module, dataset: TBPSDataset, tokenizer: CaptionTokenizer, cfg: Any, out_dir: str | Path, *,
        device: str | torch.device | None = None, progress: bool = True, log_every: int = 50,
        checkpoint_every: int | None = None, stop_after_steps: int | None = None,
        run_test: bool = True) -> FitResult:
    """Train ``model`` on ``dataset``'s train split under ``cfg``, writing into ``out_dir``.

    Resumes from ``out_dir/last.pt`` when it exists (same config only). ``checkpoint_every`` also saves
    ``last.pt`` every that many steps (besides every epoch end); ``stop_after_steps`` saves and returns
    early (``interrupted=True``), e.g. to split a run over sessions. After the last epoch the best-val
    weights are loaded into ``model`` and, with ``run_test``, the test split is evaluated once.
    The dataset must have a ``val`` split (``loaders.prepare_dataset`` makes one where it is missing).
    """
    out_dir = Path(out_dir)
    if "val" not in dataset.splits:
        raise ValueError(f"{dataset.name} has no 'val' split; load it with tbps_lib.data.loaders.prepare_dataset")
    job = _Fit(model, dataset, tokenizer, cfg, out_dir, _device_for_rank(device), progress, log_every)
    if job.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    resumed = job.resume()
    if not job.state.finished:
        done = job.run(stop_after_steps, checkpoint_every)
        if not done:
            return FitResult(out_dir, job.state.best_epoch, job.state.best_step, job.state.best_val, None,
                             job.state.epoch, job.state.step, job.state.train_time_s, job.state.history,
                             interrupted=True, resumed_from_step=resumed)
        job.state.finished = True
        job.save_last()
    job.load_best()
    started = time.perf_counter()
    test = job.test() if run_test else None
    barrier()
    return FitResult(out_dir, job.state.best_epoch, job.state.best_step, job.state.best_val, test,
                     job.state.epoch, job.state.step, job.state.train_time_s, job.state.history,
                     resumed_from_step=resumed, test_time_s=time.perf_counter() - started)


__all__ = ["LAST", "BEST", "HISTORY", "TrainingError", "ResumeError", "init_distributed", "world_info",
           "freeze_parameters", "build_optimizer", "LRSchedule", "plan_steps", "TrainState", "rng_state",
           "set_rng_state", "load_checkpoint", "load_weights", "init_weights", "check_same_config", "LossMeter",
           "train_step", "FitResult", "fit"]
