"""The method framework end to end with a test method that uses every training-side hook (CPU, seconds).

The method ("momentum_toy", registered in this module only) is the engine tests' toy dual encoder plus:

* batch fields: noun phrases (``noun_phrases``, also in evaluation: ``encode_texts`` adds the mean of the
  phrase embeddings) and LAIP-style phrase-word masking (``phrase_word_mask``, training only);
* the training context (a loss weight warmed up with ``ctx.progress``) and the per-step hook: ALBEF-style
  momentum copies of both encoders (EMA) and a queue of momentum text features, all buffers;
* init from a run (stage 2 starts from stage 1's selected weights), then evaluation and caption search.
"""
from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_trainer import _toy_smoke, _train, _without_time, write_toy_dataset
from tbps_lib.config import config_hash, make_config, override
from tbps_lib.data.loaders import build_eval_loaders, build_tokenizer, collate, prepare_dataset, train_captions
from tbps_lib.engine import runs, trainer
from tbps_lib.engine.distributed import all_gather_no_grad, all_gather_with_grad
from tbps_lib.models import registry
from tbps_lib.models.base import MethodConfig, RetrievalModel, TrainingContext
from tbps_lib.search import CaptionSearch
from tbps_lib.utils import seed_everything

NAME = "momentum_toy"


@dataclass(frozen=True)
class MomentumToyConfig(MethodConfig):
    dim: int = 16
    queue_size: int = 24  # not a multiple of the batch: the pointer wraps mid-batch
    momentum: float = 0.9
    temperature: float = 0.1
    max_phrases: int = 3
    phrase_length: int = 6

    def batch_fields(self, training: bool):
        fields = {"noun_phrases": {"max_phrases": self.max_phrases, "phrase_length": self.phrase_length,
                                   "tagger": "builtin"}}
        if training:
            fields["phrase_word_mask"] = {"tagger": "builtin"}
        return fields


class MomentumToy(RetrievalModel):
    """Pooled colours / mean token embeddings (+ mean phrase embedding), momentum encoders and a queue."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        m = cfg.model
        self.image_encoder = nn.Sequential(nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(), nn.Linear(6, m.dim))
        self.text_encoder = nn.Embedding(cfg.text.vocab_size, m.dim)
        self.classifier = nn.Linear(m.dim, m.num_classes)
        # the pairwise second stage (rescore); a fixed random map here: the test checks the plumbing
        self.itm = nn.Linear(m.dim, m.dim, bias=False).requires_grad_(False)
        self.image_encoder_m = copy.deepcopy(self.image_encoder).requires_grad_(False)
        self.text_encoder_m = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(m.queue_size, m.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("hook_calls", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None

    def _text(self, encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.unsqueeze(-1).float()
        return (encoder(ids) * mask).sum(-2) / mask.sum(-2).clamp_min(1)

    def encode_images(self, images):
        return {"global": self.image_encoder(images)}

    def encode_texts(self, batch):
        caption = self._text(self.text_encoder, batch["input_ids"], batch["attention_mask"])
        phrases = self._text(self.text_encoder, batch["phrase_ids"], batch["phrase_attention_mask"])  # [B, M, d]
        present = (torch.arange(phrases.shape[1], device=phrases.device) < batch["phrase_counts"][:, None]).float()
        phrase_mean = (phrases * present[..., None]).sum(1) / present.sum(1, keepdim=True).clamp_min(1)
        return {"global": caption + 0.5 * phrase_mean}

    def forward(self, batch):
        m, ctx = self.cfg.model, self.training_context
        img = F.normalize(self.encode_images(batch["images"])["global"], dim=-1)
        txt = F.normalize(self.encode_texts(batch)["global"], dim=-1)
        with torch.no_grad():
            keys = F.normalize(self._text(self.text_encoder_m, batch["input_ids"], batch["attention_mask"]), dim=-1)
        self._pending = keys
        negatives = torch.cat([txt, self.queue.clone()], dim=0)  # in-batch texts + queued momentum texts
        logits = img @ negatives.T / m.temperature
        itc = F.cross_entropy(logits, torch.arange(len(img)))
        masked = F.normalize(self._text(self.text_encoder, batch["mpm_input_ids"], batch["attention_mask"]), dim=-1)
        mpm = (masked - img).pow(2).sum(1).mean()
        ident = F.cross_entropy(self.classifier(txt), batch["labels"])
        warm = torch.tensor(ctx.progress if ctx is not None else 1.0)
        return {"itc": itc, "mpm": mpm, "id": ident, "loss": itc + warm * 0.1 * mpm + 0.1 * ident}

    def rescore(self, image_feats, text_feats, candidates):
        """Pairwise second stage: -|normalised itm(text) - image|^2 for each candidate image."""
        mapped = F.normalize(self.itm(text_feats["global"]), dim=-1)  # [n, d]
        images = F.normalize(image_feats["global"], dim=-1)[candidates]  # [n, k, d]
        return -(images - mapped[:, None]).pow(2).sum(-1)

    def after_optimizer_step(self, ctx: TrainingContext) -> None:
        m = self.cfg.model
        for online, target in ((self.image_encoder, self.image_encoder_m), (self.text_encoder, self.text_encoder_m)):
            for p, q in zip(online.parameters(), target.parameters()):
                q.mul_(m.momentum).add_(p.detach(), alpha=1 - m.momentum)
        keys = all_gather_no_grad(self._pending)
        slots = (self.queue_ptr + torch.arange(len(keys))) % m.queue_size  # device ops only, no host sync
        self.queue[slots] = keys
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % m.queue_size)
        self.hook_calls += 1
        self.last_ctx = ctx


def _smoke(dataset: str) -> dict:
    return {**_toy_smoke(dataset), "optim.epochs": 2, "optim.max_steps": 8}


def register() -> None:
    if NAME not in registry._REGISTRY:
        registry.register_method(NAME, MomentumToyConfig, {"smoke": _smoke})(MomentumToy)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register()
    yield
    registry._REGISTRY.pop(NAME, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("framework") / "data")


def _cfg(data: Path, **changes):
    return make_config(NAME, "smoke", dataset=str(data), changes=changes)


def _resolved(data: Path, **changes):
    cfg = _cfg(data, **changes)
    return runs.resolve_config(cfg, prepare_dataset(cfg))


# ----------------------------------------------------------------------------------------------------
# Contract and registry


def test_registry_requires_the_base_classes():
    @dataclass(frozen=True)
    class Plain:
        x: int = 0

    with pytest.raises(TypeError, match="MethodConfig"):
        registry.register_method("_plain", Plain, {})
    with pytest.raises(TypeError, match="RetrievalModel"):
        registry.register_method("_plain", MomentumToyConfig, {})(nn.Linear)
    assert "_plain" not in registry._REGISTRY


def test_method_config_resolves_num_classes_and_keeps_a_set_value(data):
    assert _resolved(data).model.num_classes == 30  # the toy data's training identities
    assert _resolved(data, **{"model.num_classes": 7}).model.num_classes == 7
    with pytest.raises(ValueError, match="model.num_classes"):
        MomentumToyConfig(num_classes=-1)


# ----------------------------------------------------------------------------------------------------
# Batch fields


def test_collate_builds_the_declared_fields_with_fixed_shapes(data):
    cfg = _resolved(data)
    ds = prepare_dataset(cfg)
    tok = build_tokenizer(cfg, train_captions(ds))
    items = [{"caption": c, "pid": i, "label": i, "image_index": i, "draw_seed": 100 + i}
             for i, c in enumerate(["a person in a red shirt and green trousers", "someone",
                                    "someone wearing blue pants with a black top"])]
    batch = collate(items, tok, cfg.model.batch_fields(True))
    assert batch["phrase_ids"].shape == batch["phrase_attention_mask"].shape == (3, 3, 6)
    assert batch["phrase_counts"].tolist()[1] == 0 and batch["phrase_attention_mask"][1].sum() == 0
    assert batch["phrase_word_spans"].shape == (3, 3, 2) and batch["phrase_word_spans"][0, 0].tolist() == [0, 2]
    assert (batch["phrase_ids"][0, :2, 0] == tok.cls_id).all()  # phrases are tokenized on their own
    assert batch["mpm_input_ids"].shape == batch["mpm_labels"].shape == batch["input_ids"].shape
    masked = batch["mpm_input_ids"] == tok.mask_id
    assert masked[0].any() and not masked[1].any() and batch["mpm_word"][1] == -1
    assert (batch["mpm_labels"][masked] == batch["input_ids"][masked]).all()
    again = collate(items, tok, cfg.model.batch_fields(True))
    assert torch.equal(again["mpm_input_ids"], batch["mpm_input_ids"])  # the draw follows the item seeds
    eval_batch = next(iter(build_eval_loaders(ds, "test", cfg, tok)[1]))
    assert "phrase_ids" in eval_batch and "mpm_input_ids" not in eval_batch
    with pytest.raises(ValueError, match="unknown batch field 'nope'"):
        collate(items, tok, {"nope": {}})
    with pytest.raises(ValueError, match="phrase_length"):
        collate(items, tok, {"noun_phrases": {"max_phrases": 2, "phrase_length": 99}})


# ----------------------------------------------------------------------------------------------------
# Training context, step hook, exact resume with momentum encoders and queues


def test_context_and_step_hook_reach_the_model(data, tmp_path):
    cfg = _resolved(data)
    result, model = _train(cfg, tmp_path / "run", run_test=False)
    assert result.steps == 8 and int(model.hook_calls) == 8
    steps_per_epoch = result.history[0]["step"]
    assert steps_per_epoch < 8  # so the last step is in the second epoch
    assert model.last_ctx == TrainingContext(step=7, epoch=1, total_steps=8, steps_per_epoch=steps_per_epoch)
    assert int(model.queue_ptr) == (8 * 16) % 24
    assert not torch.equal(model.image_encoder_m[2].weight, model.image_encoder[2].weight)  # EMA lags behind


def test_resume_is_exact_with_momentum_encoders_and_queue(data, tmp_path):
    cfg = _resolved(data)
    full, full_model = _train(cfg, tmp_path / "full", run_test=False)
    part, _ = _train(cfg, tmp_path / "split", run_test=False, stop_after_steps=3)
    assert part.interrupted and part.steps == 3
    rest, rest_model = _train(cfg, tmp_path / "split", run_test=False)
    assert rest.resumed_from_step == 3
    assert _without_time(rest.history) == _without_time(full.history)
    # The selected weights are loaded back into both; compare the full training state in last.pt.
    a = trainer.load_checkpoint(tmp_path / "full" / trainer.LAST)["model"]
    b = trainer.load_checkpoint(tmp_path / "split" / trainer.LAST)["model"]
    assert {"queue", "queue_ptr", "image_encoder_m.2.weight"} <= set(a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# Freezing and init from a run or checkpoint


def test_freeze_keeps_prefixed_parameters_fixed(data, tmp_path):
    cfg = _resolved(data, **{"optim.freeze": "image_encoder,classifier"})
    torch.manual_seed(0)
    before = registry.build_model(cfg).state_dict()
    _, model = _train(cfg, tmp_path / "run", run_test=False)
    after = model.state_dict()
    assert torch.equal(before["image_encoder.2.weight"], after["image_encoder.2.weight"])
    assert torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert not torch.equal(before["text_encoder.weight"], after["text_encoder.weight"])
    with pytest.raises(ValueError, match=r"optim.freeze: prefix\(es\) \['vision'\] match no parameter"):
        _train(_resolved(data, **{"optim.freeze": "vision"}), tmp_path / "bad", run_test=False)


def test_init_checks_every_key_and_honours_skip(data, tmp_path):
    cfg = _resolved(data)
    model = registry.build_model(cfg)
    state = registry.build_model(cfg).state_dict()
    assert trainer.init_weights(model, state, (), "src") == len(state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    bad = dict(state, extra=torch.zeros(1), **{"classifier.weight": torch.zeros(3, 16)})
    del bad["queue"]
    with pytest.raises(ValueError) as err:
        trainer.init_weights(model, bad, (), "src")
    message = str(err.value)
    for piece in ("missing in the source (1): queue", "not in the model (1): extra",
                  "classifier.weight (3, 16) -> (30, 16)", "init.skip"):
        assert piece in message
    fresh = model.state_dict()["classifier.weight"].clone()
    # Prefixes: "classifier" skips its weight and bias, "queue" both queue and queue_ptr.
    taken = trainer.init_weights(model, bad, ("classifier", "queue", "extra"), "src")
    assert taken == len(state) - 4 and torch.equal(model.state_dict()["classifier.weight"], fresh)
    with pytest.raises(ValueError, match=r"init.skip: prefix\(es\) \['nothing'\]"):
        trainer.init_weights(model, state, ("nothing",), "src")


def test_two_stages_chained_runs_then_evaluate_and_search(data, tmp_path):
    root = tmp_path / "runs"
    stage1 = runs.train_or_load(_cfg(data, **{"optim.freeze": "image_encoder"}), runs_dir=root, progress=False,
                                device="cpu")
    assert stage1.metrics["init_from"] is None
    with pytest.raises(runs.RunError, match="no run folder"):
        runs.init_source(_cfg(data, **{"init.from_run": "0123456789ab"}), root)

    # Stage 2 names stage 1's run (its folder name; the bare hash works too) and trains everything.
    for ref in (stage1.name, stage1.name.rsplit("-", 1)[1]):
        path, prov = runs.init_source(_cfg(data, **{"init.from_run": ref}), root)
        assert path == stage1.dir / trainer.BEST and prov["config_hash"] == config_hash(stage1.config)
    cfg2 = _cfg(data, **{"init.from_run": stage1.name})
    started = registry.build_model(runs.resolve_config(cfg2, stage1.dataset))
    runs.initialise(started, cfg2, root)
    best1 = trainer.load_checkpoint(stage1.dir / trainer.BEST)["model"]
    assert all(torch.equal(v, best1[k]) for k, v in started.state_dict().items())
    stage2 = runs.train_or_load(cfg2, runs_dir=root, progress=False, device="cpu")
    prov = stage2.provenance()["init_from"]
    assert prov["kind"] == "run" and prov["run"] == stage1.name and prov["config_hash"] == config_hash(stage1.config)
    assert prov["tensors"] == len(best1)

    # A checkpoint file works the same way; naming both is an error.
    path, prov = runs.init_source(override(cfg2, {"init.from_run": None,
                                                  "init.checkpoint": str(stage1.dir / trainer.BEST)}), root)
    assert prov == {"kind": "checkpoint", "path": str(stage1.dir / trainer.BEST)}
    with pytest.raises(ValueError, match="both"):
        runs.init_source(override(cfg2, {"init.checkpoint": "x.pt"}), root)

    # Evaluation and search use the evaluation batch fields (phrases) through encode_texts.
    metrics = stage2.evaluate("test")
    assert metrics == pytest.approx({k: v for k, v in stage2.metrics["test"].items() if k != "split"})
    searcher = CaptionSearch.from_run(stage2)
    caption = searcher.encoded.captions[0]
    table = searcher.search(caption, k=3)
    assert len(table) == 3 and table["rank"].tolist() == [1, 2, 3]

    # Two-stage inference: the first-stage top-k re-scored by the method's pairwise head, in evaluation
    # and in search; the search's order is the head's order of the first stage's top-k.
    assert stage2.model.can_rescore
    rescored = stage2.evaluate("test", rerank="rescore")
    assert rescored["rerank"] == "rescore" and set(metrics) <= set(rescored)
    k = 4
    found = searcher.search(caption, k=k, rerank="rescore", rerank_params={"k": k})
    text = searcher.encode_caption(caption)
    first = searcher.scores(text).topk(k).indices
    head = stage2.model.rescore(searcher.encoded.image_feats, text, first[None])[0]
    expected = first[torch.argsort(head, descending=True, stable=True)]
    assert found["gallery_index"].tolist() == expected.tolist()


# ----------------------------------------------------------------------------------------------------
# DDP: the differentiable gather, two gloo processes on the CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_loss(local_img: torch.Tensor, all_txt: torch.Tensor, offset: int) -> torch.Tensor:
    """ITC of this process's images against every process's texts (the positives at ``offset``)."""
    logits = local_img @ all_txt.T
    return F.cross_entropy(logits, torch.arange(len(local_img)) + offset)


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        img, txt = torch.randn(2 * world, 4), torch.randn(2 * world, 4)
        mine = slice(2 * rank, 2 * rank + 2)
        local_img, local_txt = img[mine].clone().requires_grad_(), txt[mine].clone().requires_grad_()
        all_txt = all_gather_with_grad(local_txt)
        _gather_loss(local_img, all_txt, 2 * rank).backward()
        torch.save({"gathered": all_txt.detach(), "img_grad": local_img.grad, "txt_grad": local_txt.grad,
                    "no_grad": all_gather_no_grad(local_img.detach())}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_all_gather_with_grad_matches_one_process(tmp_path):
    world = 2
    torch.multiprocessing.start_processes(_gather_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world,
                                          start_method="fork")
    torch.manual_seed(0)
    img, txt = torch.randn(2 * world, 4).requires_grad_(), torch.randn(2 * world, 4).requires_grad_()
    # One process with the global batch: the sum over processes of their local losses.
    sum(_gather_loss(img[2 * r:2 * r + 2], txt, 2 * r) for r in range(world)).backward()
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert torch.equal(got["gathered"], txt.detach()) and torch.equal(got["no_grad"], img.detach())
        torch.testing.assert_close(got["img_grad"], img.grad[2 * r:2 * r + 2])
        torch.testing.assert_close(got["txt_grad"], txt.grad[2 * r:2 * r + 2])  # gradients of every rank's loss
    assert all_gather_with_grad(img) is img  # identity outside DDP


def _fit_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), TBPS_PROGRESS="0")
    torch.set_num_threads(1)
    register()
    trainer.init_distributed()
    try:
        cfg = _resolved(Path(data), **{"optim.max_steps": 4})
        result, model = _train(cfg, Path(out) / "run", run_test=False)
        last = trainer.load_checkpoint(Path(out) / "run" / trainer.LAST)["model"] if rank == 0 else None
        torch.save({"state": last, "live": {k: v.clone() for k, v in model.state_dict().items()},
                    "hook_calls": int(model.hook_calls)}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_keeps_momentum_encoders_and_queue_in_step(data, tmp_path):
    """Two gloo processes: the queue takes the gathered momentum features of the global batch (16 per step),
    so both ranks hold the same queue, pointer and momentum encoders."""
    torch.multiprocessing.start_processes(_fit_worker, args=(2, _free_port(), str(data), str(tmp_path)), nprocs=2,
                                          start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["hook_calls"] == r1["hook_calls"] == 4
    assert int(r0["state"]["queue_ptr"]) == (4 * 16) % 24
    assert r0["live"].keys() == r1["live"].keys() and {"queue", "text_encoder_m.weight"} <= set(r0["live"])
    assert all(torch.equal(r0["live"][k], r1["live"][k]) for k in r0["live"])
    seed_everything(0)  # the queue the runs started with (as _train builds the model)
    initial = registry.build_model(_resolved(data, **{"optim.max_steps": 4})).queue
    assert not torch.equal(r0["state"]["queue"], initial)  # 64 keys went through the 24 slots
