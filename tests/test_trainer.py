"""The training engine on a toy method and a tiny compositional dataset (CPU, seconds).

The toy method ("toy") is a few-parameter dual encoder that keeps the RetrievalModel contract: images are
pooled to a top and a bottom colour and projected; captions are a masked mean of token embeddings. The
dataset gives each person a (top colour, bottom colour) pair, drawn as the two halves of an image and
written into the captions, so the toy can learn it and retrieval metrics move.

Other test modules import the helpers from here (``toy_config``, ``write_toy_dataset``).
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tbps_lib.config import make_config, override
from tbps_lib.engine import trainer
from tbps_lib.engine.trainer import LRSchedule, ResumeError, TrainingError, fit
from tbps_lib.models import registry
from tbps_lib.models.base import MethodConfig, RetrievalModel

TOY = "toy"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40),
          "black": (15, 15, 15), "white": (240, 240, 240)}
HAVE_BASELINE = (Path(registry.__file__).parent / "baseline.py").is_file()


# ----------------------------------------------------------------------------------------------------
# The toy method


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    """The toy's own config: embedding width, an injected NaN (for the stop test), dropout."""

    dim: int = 16
    nan_at_step: int = -1  # forward returns a NaN "align" term from this training step on (-1: never)
    dropout: float = 0.1


FAIL_AT_STEP: dict[str, int] = {}  # {"step": n}: forward raises once at training call n (crash injection)


class ToyModel(RetrievalModel):
    """Pooled image colours and averaged token embeddings, both projected to ``cfg.model.dim``."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        dim = cfg.model.dim
        self.image_encoder = nn.Sequential(nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(), nn.Linear(6, dim))
        self.text_encoder = nn.Embedding(cfg.text.vocab_size, dim)
        self.image_head = nn.Linear(dim, dim)
        self.text_head = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(cfg.model.dropout)
        self.calls = 0

    def encode_images(self, images):
        return {"global": self.image_head(torch.relu(self.image_encoder(images)))}

    def encode_texts(self, batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (self.text_encoder(batch["input_ids"]) * mask).sum(1) / mask.sum(1)
        return {"global": self.text_head(torch.relu(self.dropout(mean)))}

    def forward(self, batch):
        self.calls += 1
        if FAIL_AT_STEP.get("step") == self.calls:
            FAIL_AT_STEP.clear()
            raise RuntimeError("injected crash")
        img = F.normalize(self.encode_images(batch["images"])["global"], dim=-1)
        txt = F.normalize(self.encode_texts(batch)["global"], dim=-1)
        logits = txt @ img.T / 0.1
        same = (batch["pids"][:, None] == batch["pids"][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        itc = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()
        align = (img - txt).pow(2).sum(1).mean()
        if 0 <= self.cfg.model.nan_at_step < self.calls:
            align = align * float("nan")
        return {"itc": itc, "align": align, "loss": itc + 0.1 * align}


def _toy_smoke(dataset: str) -> dict:
    return {"image.img_size": (16, 8), "text.max_length": 16, "text.vocab_size": 200, "embed_dim": 16,
            "data.batch_size": 16, "data.instances_per_id": 2, "optim.lr": 3e-2, "optim.epochs": 3,
            "optim.warmup_epochs": 1.0, "eval.every": 1, "eval.batch_size": 32}


def register_toy() -> None:
    """Register the toy method (idempotent; also called inside spawned worker processes)."""
    if TOY not in registry._REGISTRY:
        registry.register_method(TOY, ToyConfig, {"smoke": _toy_smoke})(ToyModel)


@pytest.fixture(autouse=True, scope="module")
def _toy_registered():
    """Register the toy for this module's tests, and take it out again so list_methods() stays clean."""
    register_toy()
    yield
    registry._REGISTRY.pop(TOY, None)


# ----------------------------------------------------------------------------------------------------
# The tiny dataset


def write_toy_dataset(root: Path, n_val: int = 6, n_test: int = 6, images_per_id: int = 2,
                      size: tuple[int, int] = (16, 8), splits: tuple[str, ...] = ("train", "val", "test"),
                      seed: int = 0) -> Path:
    """A CUHK-PEDES-layout dataset: person = (top colour, bottom colour), two captions per image.

    Training has one person per ordered colour pair (30); val and test persons (new ids) wear pairs drawn
    without their mirror image, so a bag of words can tell every val/test person apart.
    """
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    ordered = [(a, b) for a in names for b in names if a != b]
    unordered = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    people = {"train": ordered,
              "val": [unordered[i] for i in rng.choice(len(unordered), n_val, replace=False)],
              "test": [unordered[i] for i in rng.choice(len(unordered), n_test, replace=False)]}
    entries, pid = [], 0
    for split, combos in people.items():
        for top, bottom in combos:
            pid += 1
            for k in range(images_per_id):
                arr = np.zeros((size[0], size[1], 3), dtype=np.int16)
                arr[: size[0] // 2] = COLORS[top]
                arr[size[0] // 2:] = COLORS[bottom]
                arr += rng.integers(-25, 26, size=arr.shape)
                rel = f"{split}/{pid:03d}_{k}.png"
                (root / "imgs" / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / "imgs" / rel)
                caps = [f"a person in a {top} shirt and {bottom} trousers",
                        f"someone wearing {bottom} pants with a {top} top"]
                entries.append({"id": pid, "file_path": rel, "captions": caps,
                                "split": split if split in splits else "train"})
    root.mkdir(parents=True, exist_ok=True)
    (root / "reid_raw.json").write_text(json.dumps(entries), encoding="utf-8")
    return root


def toy_config(dataset: Path, **changes):
    """The toy's smoke config on ``dataset`` plus dotted ``changes``."""
    register_toy()
    return make_config(TOY, "smoke", dataset=str(dataset), changes=changes)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "data")


def _train(cfg, out: Path, **kwargs):
    from tbps_lib.data.loaders import build_tokenizer, prepare_dataset, train_captions
    from tbps_lib.utils import seed_everything

    ds = prepare_dataset(cfg)
    tok = build_tokenizer(cfg, train_captions(ds))
    seed_everything(cfg.seed)
    model = registry.build_model(cfg)
    return fit(model, ds, tok, cfg, out, progress=False, device="cpu", **kwargs), model  # CPU: bit-exact


def _without_time(history):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


# ----------------------------------------------------------------------------------------------------
# Schedules and optimiser


def test_cosine_schedule_warms_up_then_decays_to_min():
    s = LRSchedule("cosine", total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [round(s.factor(i), 6) for i in (0, 1)] == [0.5, 1.0]
    assert s.factor(2) == pytest.approx(1.0)
    assert s.factor(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert s.factor(10) == pytest.approx(0.1)
    assert all(s.factor(i) >= s.factor(i + 1) for i in range(2, 10))


def test_multistep_schedule_counts_passed_milestones():
    s = LRSchedule("multistep", total_steps=100, milestone_steps=(20, 40), gamma=0.1)
    assert [s.factor(i) for i in (0, 19, 20, 39, 40, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_schedule_from_config_rejects_multistep_without_milestones(toy_data):
    cfg = toy_config(toy_data, **{"optim.schedule": "multistep"})
    with pytest.raises(ValueError, match="milestones"):
        LRSchedule.from_config(cfg, 6, 18)
    with pytest.raises(ValueError, match="optim.schedule must be one of"):
        LRSchedule.from_config(toy_config(toy_data, **{"optim.schedule": "step"}), 6, 18)


def test_plan_steps_caps_at_max_steps(toy_data):
    assert trainer.plan_steps(toy_config(toy_data), 4) == (12, 3)
    assert trainer.plan_steps(toy_config(toy_data, **{"optim.max_steps": 5}), 4) == (5, 2)
    assert trainer.plan_steps(toy_config(toy_data, **{"optim.max_steps": 50}), 4) == (12, 3)


def test_optimizer_groups_give_backbones_their_factor_and_biases_no_decay(toy_data):
    cfg = toy_config(toy_data, **{"optim.backbone_lr_factor": 0.1, "optim.weight_decay": 0.05,
                                  "optim.optimizer": "adamw"})
    model = registry.build_model(cfg)
    opt = trainer.build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone/decay"]["lr"] == pytest.approx(3e-3)
    assert groups["head/decay"]["lr"] == pytest.approx(3e-2)
    assert groups["head/no_decay"]["weight_decay"] == 0.0 and groups["head/decay"]["weight_decay"] == 0.05
    backbone = {id(p) for p in model.backbone_parameters()}
    assert {id(p) for p in groups["backbone/decay"]["params"] + groups["backbone/no_decay"]["params"]} == backbone
    n_params = sum(1 for p in model.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params


# ----------------------------------------------------------------------------------------------------
# fit


def test_fit_trains_logs_selects_and_tests_once(toy_data, tmp_path):
    cfg = toy_config(toy_data)
    result, model = _train(cfg, tmp_path / "run", log_every=2)
    # 120 pairs = 60 chunks of K=2 pairs -> 7 batches of P=8 identities per epoch
    assert result.steps == 3 * 7 and result.epochs == 3 and not result.interrupted
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert {"itc", "align", "loss", "lr", "val_R1", "val_mAP", "time_s", "step"} <= set(history[0])
    assert history[-1]["loss"] < history[0]["loss"]
    best = max(history, key=lambda r: r["val_R1"])  # ties keep the earlier epoch
    assert result.best_epoch == best["epoch"] and result.val["R1"] == best["val_R1"]
    assert set(result.test) == {"R1", "R5", "R10", "mAP", "mINP"}
    assert result.test["R1"] > 2 * 100 / 6  # twice chance (2 matching images among 12)
    saved = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert saved["epoch"] == result.best_epoch
    for k, v in saved["model"].items():  # the model holds the selected weights when fit returns
        assert torch.equal(v, model.state_dict()[k])


def test_resume_after_stop_equals_uninterrupted_run(toy_data, tmp_path):
    cfg = toy_config(toy_data)
    straight, _ = _train(cfg, tmp_path / "a")
    first, _ = _train(cfg, tmp_path / "b", stop_after_steps=10)  # stops in the middle of epoch 2
    assert first.interrupted and first.steps == 10 and len(first.history) == 1
    second, _ = _train(cfg, tmp_path / "b")
    assert second.resumed_from_step == 10
    assert second.test == straight.test and second.val == straight.val
    assert _without_time(second.history) == _without_time(straight.history)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_crash_continues_from_last_checkpoint(toy_data, tmp_path):
    cfg = toy_config(toy_data)
    straight, _ = _train(cfg, tmp_path / "a")
    FAIL_AT_STEP["step"] = 12  # crash during epoch 2, after the step-10 checkpoint
    with pytest.raises(RuntimeError, match="injected crash"):
        _train(cfg, tmp_path / "b", checkpoint_every=5)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state"]
    assert state["step"] == 10 and state["batch_in_epoch"] == 3
    resumed, _ = _train(cfg, tmp_path / "b")
    assert resumed.resumed_from_step == 10
    assert resumed.test == straight.test
    assert _without_time(resumed.history) == _without_time(straight.history)


def test_resume_with_another_config_is_refused_naming_fields(toy_data, tmp_path):
    cfg = toy_config(toy_data)
    _train(cfg, tmp_path / "run", stop_after_steps=2)
    other = override(cfg, {"optim.lr": 0.5, "model.dim": 8})
    with pytest.raises(ResumeError, match=r"model\.dim: 16 -> 8.*optim\.lr: 0\.03 -> 0\.5"):
        _train(other, tmp_path / "run")


def test_nan_loss_stops_with_term_and_step(toy_data, tmp_path):
    cfg = toy_config(toy_data, **{"model.nan_at_step": 4})
    with pytest.raises(TrainingError, match=r"loss term 'align' became NaN/inf at step 5 \(epoch 1\)"):
        _train(cfg, tmp_path / "run", log_every=3)
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing non-finite was checkpointed


def test_max_steps_and_random_sampler(toy_data, tmp_path):
    cfg = toy_config(toy_data, **{"optim.max_steps": 10, "data.sampler": "random", "eval.every": 5})
    result, _ = _train(cfg, tmp_path / "run")
    assert result.steps == 10 and result.epochs == 2  # 120 pairs: 7 batches of 16 per epoch
    history = result.history
    assert [r["step"] for r in history] == [7, 10]
    assert "val_R1" not in history[0] and "val_R1" in history[1]  # validated after the last epoch only


def test_fit_refuses_a_dataset_without_val(toy_data, tmp_path):
    from tbps_lib.data.catalog import load_dataset
    from tbps_lib.data.loaders import build_tokenizer, train_captions

    root = write_toy_dataset(tmp_path / "noval", splits=("train", "test"))
    cfg = toy_config(root)
    ds = load_dataset(str(root))
    with pytest.raises(ValueError, match="no 'val' split"):
        fit(registry.build_model(cfg), ds, build_tokenizer(cfg, train_captions(ds)), cfg, tmp_path / "r")


# ----------------------------------------------------------------------------------------------------
# DDP: two gloo processes on the CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), TBPS_PROGRESS="0")
    torch.set_num_threads(1)
    register_toy()
    assert trainer.init_distributed() == (world, rank)
    try:
        cfg = toy_config(Path(data), **{"optim.max_steps": 4})
        result, model = _train(cfg, Path(out) / "run")
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"params": flat, "test": result.test, "steps": result.steps}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_gloo_processes(toy_data, tmp_path):
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(toy_data), str(tmp_path)),
                                          nprocs=2, start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == 4
    assert torch.equal(r0["params"], r1["params"])  # gradients were averaged: replicas agree
    assert r0["test"] is not None and r1["test"] is None  # only rank 0 evaluates
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["best.pt", "history.jsonl", "last.pt"]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["world_size"] == 2
