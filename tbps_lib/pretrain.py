"""The workbook's own pretrained smoke backbones: its "ImageNet" and its "BERT".

Every paper starts from pretrained encoders; nothing can be downloaded here, so the smoke encoders are
pretrained on a corpus of the synthetic generator that shares no identity, image or caption with the
benchmarks (``data/synthetic.py``, preset ``pretrain-corpus``: its own random streams, the identities of
the three benchmark presets as smoke runs generate them (seed 0, default ids) taken out before drawing, and
every corpus caption that is also a caption of one of those benchmarks dropped from the text corpus).

* Image encoders (``resnet_smoke``, ``vit_smoke``, ``swin_smoke``): supervised multi-label attribute
  classification from the sidecar (one sigmoid per ``attribute=value`` pair, binary cross-entropy); the
  task never sees a caption. Saved as the timm model's state dict (no classifier) in
  ``model.safetensors``, loaded through ``image.pretrained`` like an ImageNet checkpoint.
* Text encoders (``bert_smoke``, ``bigru_smoke``, ``bilstm_smoke``): BERT masked language modelling
  (``data.text.mask_mlm``: 15 % of the tokens, 80/10/10) on the corpus captions with the corpus's own
  WordPiece vocabulary.
  ``bert_smoke`` is a Hugging Face folder (``save_pretrained`` of ``BertForMaskedLM`` and of a
  ``BertTokenizerFast``), loaded like bert-base-uncased; ``bigru_smoke`` / ``bilstm_smoke`` (one code path,
  the cell is the arch's: ``encoders.RECURRENT_CELLS``) are the library's own format
  (``model.safetensors`` of the encoder + the ``CaptionTokenizer.save`` files). A run whose text encoder is
  pretrained tokenizes with this vocabulary (``data.loaders.build_tokenizer``).

Configs name the weights symbolically (``image.pretrained="workbook:resnet_smoke"``), so a run's hash does
not depend on the machine; :func:`resolve_pretrained` turns the name into a local folder when the encoder
is built, training the weights on first use. They are cached like runs: ``$TBPS_CACHE/pretrained`` (else
``~/.cache/tbps_lib/pretrained``), one folder per architecture and hash of its :class:`PretrainConfig`,
written to a temporary folder and renamed into place, under a file lock so two processes never train the
same weights twice. ``tbps pretrain`` trains them ahead of time.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

WORKBOOK_PREFIX = "workbook:"
FORMAT_VERSION = 1  # bump when the training or the saved format changes: every hash changes with it
INFO_FILE = "pretrain.json"  # written last: marks a complete weights folder
HISTORY_FILE = "history.jsonl"


@dataclass(frozen=True)
class PretrainConfig:
    """How one smoke encoder is pretrained. Its hash (with ``FORMAT_VERSION``) names the cached folder.

    ``corpus_*`` select the synthetic corpus (``data.synthetic.CORPUS_PRESETS``), rendered at ``img_size``
    (the smoke size); ``steps`` optimiser steps of ``batch_size`` examples drawn at random (seeded by
    ``seed``), AdamW with ``lr``, ``weight_decay``, a linear warm-up over 5 % of the steps and a cosine decay.
    Text only: ``vocab_size`` of the WordPiece vocabulary, ``max_length``, ``mask_ratio`` (MLM).
    """

    arch: str
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    corpus_preset: str = "pretrain-corpus"
    corpus_seed: int = 0
    corpus_ids: int = 3000
    img_size: tuple[int, int] = (64, 32)
    vocab_size: int = 2000
    max_length: int = 64
    mask_ratio: float = 0.15
    log_every: int = 25

    @property
    def kind(self) -> str:
        """``"image"`` or ``"text"``, from the architecture."""
        from tbps_lib.models.encoders import IMAGE_ARCHS, TEXT_ARCHS

        if self.arch in IMAGE_ARCHS:
            return "image"
        if self.arch in TEXT_ARCHS:
            return "text"
        if self.arch in VLP_STARTS:
            return "vlp"
        raise ValueError(f"PretrainConfig.arch: unknown architecture {self.arch!r}")


# The weights a config can name as ``workbook:<name>``. Steps chosen to fit the budget: all image
# pretraining within 5 minutes and all text pretraining within 5 minutes on 2 cores (see the README).
WORKBOOK_WEIGHTS: dict[str, PretrainConfig] = {c.arch: c for c in (
    PretrainConfig("resnet_smoke", steps=600, lr=2e-3),
    PretrainConfig("vit_smoke", steps=600, lr=5e-4, weight_decay=0.05),
    PretrainConfig("swin_smoke", steps=600, lr=1e-3, weight_decay=0.05),
    # bert_smoke at lr 5e-4 reached 0.40 masked-word accuracy on held-out corpus captions after 800 steps
    # (still rising); at 2e-3 it reaches 0.68 in the same steps (bigru_smoke: 0.70).
    PretrainConfig("bert_smoke", steps=800, lr=2e-3),
    PretrainConfig("bigru_smoke", steps=800, lr=2e-3),
    # bilstm_smoke (ACSA's Table III Bi-LSTM), the bi-GRU's recipe: 0.69 masked-word accuracy after 800
    # steps, 197 s of CPU on 1 thread (bigru_smoke: 206 s).
    PretrainConfig("bilstm_smoke", steps=800, lr=2e-3),
    # vlp_smoke: held-out text-to-image R@1 (256 captions, chance 0.4%) after 200 / 800 steps: 0.4% / 3.5% with
    # the MLM summed per caption, 1.6% / 14.8% with BERT's mean over masked tokens (``losses.laip.mlm_loss``).
    PretrainConfig("vlp_smoke", steps=800, batch_size=32, lr=5e-4, weight_decay=0.02),
)}

# Vision-language pretraining (LAIP's smoke stand-in for ALBEF): the weights each starts from. Their hashes
# enter its hash, so retrained unimodal weights give new VLP weights.
VLP_STARTS: dict[str, tuple[str, str]] = {"vlp_smoke": ("resnet_smoke", "bert_smoke")}


def training_order(names: set[str] | list[str]) -> list[str]:
    """``names`` (of ``WORKBOOK_WEIGHTS``) with what they start from, in the order to train them: the weights a
    VLP stage starts from first (the VLP stage is the longest job and waits for them), then the other
    unimodal weights, then the VLP stages (``engine.runs.train_many`` gives these jobs to a pool)."""
    wanted = set(names) | {s for n in names for s in VLP_STARTS.get(n, ())}
    starts = {s for n in wanted for s in VLP_STARTS.get(n, ())}
    return sorted(wanted, key=lambda n: (0 if n in starts else 2 if n in VLP_STARTS else 1, n))


def _vlp_model_config(cfg: PretrainConfig) -> Any:
    """The LAIP config the VLP stage ``cfg`` trains: the smoke preset under ``models.laip.VLP_CHANGES``, on the
    unimodal workbook weights of ``VLP_STARTS``, at the corpus's image size and ``cfg.max_length``."""
    from tbps_lib.config import make_config
    from tbps_lib.models.laip import VLP_CHANGES

    image_arch, text_arch = VLP_STARTS[cfg.arch]
    return make_config("laip", changes={**VLP_CHANGES, "image.arch": image_arch, "text.arch": text_arch,
                                        "image.img_size": tuple(cfg.img_size), "text.max_length": cfg.max_length,
                                        "image.pretrained": WORKBOOK_PREFIX + image_arch,
                                        "text.pretrained": WORKBOOK_PREFIX + text_arch})


def pretrain_hash(cfg: PretrainConfig) -> str:
    """12 hex digits: a hash of the canonical JSON of ``cfg`` and the format version; a VLP stage's also of the
    weights it starts from and of the LAIP config it trains (a change to ``VLP_CHANGES`` or to LAIP's smoke
    preset retrains it)."""
    data = {"format": FORMAT_VERSION, **json.loads(json.dumps(dataclasses.asdict(cfg)))}
    if cfg.arch in VLP_STARTS:  # only the VLP weights' hash carries these keys: the others are unchanged
        from tbps_lib.config import config_hash

        data["starts_from"] = [pretrain_hash(WORKBOOK_WEIGHTS[a]) for a in VLP_STARTS[cfg.arch]]
        data["model_config"] = config_hash(_vlp_model_config(cfg))
    return hashlib.sha1(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$TBPS_CACHE/pretrained``, else ``~/.cache/tbps_lib/pretrained``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TBPS_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "tbps_lib") / "pretrained"


def weights_dir(cfg: PretrainConfig, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of ``cfg``'s weights (it may not exist yet)."""
    return cache_root(cache_dir) / f"{cfg.arch}-{pretrain_hash(cfg)}"


def workbook_config(name: str, field_name: str = "pretrained") -> PretrainConfig:
    """The :class:`PretrainConfig` of ``workbook:<name>``; an unknown name is an error naming the field."""
    if name not in WORKBOOK_WEIGHTS:
        raise ValueError(f"{field_name}={WORKBOOK_PREFIX + name!r}: unknown workbook weights; known: "
                         + ", ".join(WORKBOOK_PREFIX + k for k in sorted(WORKBOOK_WEIGHTS)))
    return WORKBOOK_WEIGHTS[name]


def resolve_pretrained(value: str | None, field_name: str) -> tuple[str | None, str | None]:
    """``(local path, provenance label)`` of a ``*.pretrained`` config value.

    ``workbook:<arch>`` is trained on first use (or found in the cache) and labelled
    ``workbook:<arch>@<hash>``; a path is returned as it is (label = the path); ``None`` stays ``None``.
    """
    if value is None or not str(value).startswith(WORKBOOK_PREFIX):
        return value, value
    cfg = workbook_config(str(value)[len(WORKBOOK_PREFIX):], field_name)
    return str(ensure_pretrained(cfg)), f"{WORKBOOK_PREFIX}{cfg.arch}@{pretrain_hash(cfg)}"


def is_complete(folder: Path) -> bool:
    return (folder / INFO_FILE).is_file()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_pretrained(cfg: PretrainConfig | str, cache_dir: str | Path | None = None,
                      progress: bool = True) -> Path:
    """The folder of ``cfg``'s pretrained weights (a config, or the name of a ``WORKBOOK_WEIGHTS`` entry),
    trained on first use: into a temporary sibling folder renamed into place when complete, under a lock
    so that a second process waits for the first instead of training the same weights again."""
    if isinstance(cfg, str):
        cfg = workbook_config(cfg)
    final = weights_dir(cfg, cache_dir)
    if is_complete(final):
        return final
    with _file_lock(final.with_name(final.name + ".lock")):
        if is_complete(final):  # trained by another process while this one waited
            return final
        if final.exists():
            shutil.rmtree(final)  # an incomplete folder (no pretrain.json) left by a crash
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            start, cpu = time.perf_counter(), time.process_time()
            train = {"image": _train_image, "text": _train_text, "vlp": _train_vlp}[cfg.kind]
            history, extra = train(cfg, tmp, progress)
            info = {"config": dataclasses.asdict(cfg), "hash": pretrain_hash(cfg), "format": FORMAT_VERSION,
                    "kind": cfg.kind, "train_time_s": round(time.perf_counter() - start, 1),
                    "cpu_time_s": round(time.process_time() - cpu, 1),
                    "threads": torch.get_num_threads(), **extra}
            (tmp / HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            tmp.chmod(0o755)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def pretraining_info(name: str | PretrainConfig, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """``pretrain.json`` of trained weights (config, hash, wall time, corpus sizes); trains them if needed."""
    return json.loads((ensure_pretrained(name, cache_dir) / INFO_FILE).read_text(encoding="utf-8"))


def pretraining_history(name: str | PretrainConfig, cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The logged curve of the pretraining of ``name``: one dict per ``log_every`` steps with ``step``,
    ``loss`` (training, mean since the last row) and ``val_loss`` / ``val_accuracy`` on held-out corpus data
    (images: mean accuracy of the attribute groups; text: accuracy on the masked tokens)."""
    path = ensure_pretrained(name, cache_dir) / HISTORY_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------
# The corpus


def load_corpus(cfg: PretrainConfig) -> Any:
    """The synthetic pretraining corpus of ``cfg`` (a ``TBPSDataset`` with one ``train`` split)."""
    from tbps_lib.data import synthetic
    from tbps_lib.data.formats import read_synthetic

    root = synthetic.ensure_synthetic(cfg.corpus_preset, seed=cfg.corpus_seed, ids=cfg.corpus_ids,
                                      size=tuple(cfg.img_size))
    return read_synthetic(root)


def benchmark_captions(preset_name: str) -> set[str]:
    """Every caption of every split of the benchmark sets that the corpus preset ``preset_name`` avoids."""
    from tbps_lib.data import synthetic
    from tbps_lib.data.formats import read_synthetic

    out: set[str] = set()
    for name, seed, ids in synthetic.get_preset(preset_name).avoid:
        ds = read_synthetic(synthetic.ensure_synthetic(name, seed=seed, ids=ids), check_images=False)
        out.update(c for r in ds.records for c in r.captions)
    return out


def corpus_captions(cfg: PretrainConfig) -> tuple[list[str], int]:
    """The corpus captions that text pretraining learns from, and how many were dropped: a caption that is
    word for word a caption of an avoided benchmark (short template captions can coincide) is dropped."""
    ds = load_corpus(cfg)
    taken = benchmark_captions(cfg.corpus_preset)
    every = [c for r in ds.records for c in r.captions]
    kept = [c for c in every if c not in taken]
    return kept, len(every) - len(kept)


# ----------------------------------------------------------------------------------------------------
# Attribute targets (image pretraining and the linear probe)


def attribute_groups(records: Sequence[Any]) -> list[tuple[str, list[str]]]:
    """(attribute, sorted values) of the sidecar ``attributes`` of ``records``; a missing value is "none"."""
    values: dict[str, set[str]] = {}
    for r in records:
        for key, value in r.meta["attributes"].items():
            values.setdefault(key, set()).add("none" if value is None else str(value))
    return [(k, sorted(v)) for k, v in sorted(values.items()) if len(v) > 1]


def attribute_targets(records: Sequence[Any], groups: list[tuple[str, list[str]]]) -> Tensor:
    """Long tensor [n, n_groups]: the index of each record's value in each group (-1: value not in it)."""
    out = torch.full((len(records), len(groups)), -1, dtype=torch.long)
    for i, r in enumerate(records):
        attrs = r.meta["attributes"]
        for j, (key, vals) in enumerate(groups):
            v = attrs.get(key)
            v = "none" if v is None else str(v)
            if v in vals:
                out[i, j] = vals.index(v)
    return out


class AttributeHead(nn.Module):
    """One linear layer over a pooled feature giving a logit per ``attribute=value`` pair (multi-label)."""

    def __init__(self, dim: int, groups: list[tuple[str, list[str]]]) -> None:
        super().__init__()
        self.sizes = [len(v) for _, v in groups]
        self.linear = nn.Linear(dim, sum(self.sizes))

    def loss(self, feats: Tensor, targets: Tensor) -> Tensor:
        """Binary cross-entropy over every ``attribute=value`` logit (one-hot targets per group)."""
        logits = self.linear(feats)
        onehot = torch.cat([nn.functional.one_hot(targets[:, j].clamp(min=0), n) * (targets[:, j:j + 1] >= 0)
                            for j, n in enumerate(self.sizes)], dim=1).float()
        return nn.functional.binary_cross_entropy_with_logits(logits, onehot)

    @torch.no_grad()
    def accuracy(self, feats: Tensor, targets: Tensor) -> float:
        """Mean over groups of the share of records whose highest-scoring value is the true one."""
        logits = self.linear(feats).split(self.sizes, dim=1)
        accs = [(lg.argmax(1) == targets[:, j]).float().mean().item() for j, lg in enumerate(logits)]
        return float(np.mean(accs))


def _load_images(ds: Any, records: Sequence[Any], size: tuple[int, int], progress: bool) -> Tensor:
    """uint8 [n, 3, H, W] images of ``records`` at ``size`` (normalised per batch later)."""
    from tbps_lib.data.loaders import load_image
    from tbps_lib.utils import progress as progress_bar

    out = torch.empty((len(records), 3, *size), dtype=torch.uint8)
    for i, r in enumerate(progress_bar(records, enabled=progress, desc="load images", leave=False)):
        out[i] = load_image(ds.image_path(r), size)  # already uint8
    return out


def _as_input(images: Tensor, flip: Tensor | None = None) -> Tensor:
    from tbps_lib.data.loaders import normalize_image

    """uint8 images [B, 3, H, W] (optionally flipped where ``flip``) -> ImageNet-normalised floats."""
    if flip is not None:
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    return normalize_image(images)


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))


def _split_holdout(n: int, seed: int, share: float = 0.05, cap: int = 512) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, 0x9E7]).permutation(n)
    k = max(1, min(cap, int(round(share * n))))
    return order[k:], order[:k]


# ----------------------------------------------------------------------------------------------------
# Training


def _optimise(cfg: PretrainConfig, module: nn.Module, opt: torch.optim.Optimizer,
              sched: torch.optim.lr_scheduler.LambdaLR, gen: torch.Generator, train_idx: np.ndarray,
              step_loss: Callable[[Tensor], Tensor], validate: Callable[[], tuple[float, float]],
              progress: bool) -> list[dict[str, Any]]:
    """The pretraining loop shared by the image and text tasks: ``cfg.steps`` steps on random batches of
    ``train_idx`` (drawn from ``gen``), and every ``cfg.log_every`` steps a history line with the mean
    training loss and ``validate()``'s held-out loss and accuracy (in eval mode, without gradients)."""
    from tbps_lib.utils import progress as progress_bar

    history: list[dict[str, Any]] = []
    running: list[float] = []
    bar = progress_bar(total=cfg.steps, enabled=progress, desc=f"pretrain {cfg.arch}", unit="step")
    for step in range(1, cfg.steps + 1):
        module.train()
        idx = torch.from_numpy(train_idx)[torch.randint(len(train_idx), (cfg.batch_size,), generator=gen)]
        loss = step_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            module.eval()
            with torch.no_grad():
                val_loss, val_acc = validate()
            history.append({"step": step, "loss": float(np.mean(running)), "val_loss": val_loss,
                            "val_accuracy": val_acc})
            running = []
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", val_acc=f"{val_acc:.3f}")
    bar.close()
    return history


def _train_image(cfg: PretrainConfig, out: Path, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Multi-label attribute classification on the corpus images; writes ``model.safetensors``."""
    from safetensors.torch import save_file

    from tbps_lib.models.encoders import ImageEncoder

    torch.manual_seed(cfg.seed)
    ds = load_corpus(cfg)
    records = ds.split("train")
    groups = attribute_groups(records)
    targets = attribute_targets(records, groups)
    images = _load_images(ds, records, tuple(cfg.img_size), progress)
    train_idx, val_idx = _split_holdout(len(records), cfg.seed)
    encoder = ImageEncoder(cfg.arch, tuple(cfg.img_size))
    head = AttributeHead(encoder.out_dim, groups)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    def step_loss(idx: Tensor) -> Tensor:
        flip = torch.rand(len(idx), generator=gen) < 0.5
        return head.loss(encoder(_as_input(images[idx], flip)).pooled, targets[idx])

    def validate() -> tuple[float, float]:
        feats = torch.cat([encoder(_as_input(images[torch.from_numpy(val_idx[i:i + 256])])).pooled
                           for i in range(0, len(val_idx), 256)])
        val_t = targets[torch.from_numpy(val_idx)]
        return head.loss(feats, val_t).item(), head.accuracy(feats, val_t)

    history = _optimise(cfg, encoder, opt, sched, gen, train_idx, step_loss, validate, progress)
    state = {k: v.detach().contiguous() for k, v in encoder.model.state_dict().items()}
    meta = {"format": "pt", "arch": cfg.arch, "img_size": "x".join(map(str, cfg.img_size))}
    if hasattr(encoder.model, "patch_embed") and encoder.spec.kind == "vit":  # a non-square grid cannot be guessed
        meta["grid"] = "x".join(map(str, encoder.model.patch_embed.grid_size))
    save_file(state, str(out / "model.safetensors"), metadata=meta)
    return history, {"images": len(records), "identities": len({r.pid for r in records}),
                     "attribute_groups": [[k, v] for k, v in groups]}


def _train_text(cfg: PretrainConfig, out: Path, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Masked language modelling on the corpus captions; writes a BERT folder or the bi-GRU's files."""
    from tbps_lib.data.text import IGNORE_INDEX, CaptionTokenizer, mask_mlm
    from tbps_lib.models.encoders import TEXT_ARCHS, RecurrentTextEncoder

    torch.manual_seed(cfg.seed)
    captions, dropped = corpus_captions(cfg)
    train_idx, val_idx = _split_holdout(len(captions), cfg.seed)
    tok = CaptionTokenizer.train([captions[i] for i in train_idx], vocab_size=cfg.vocab_size,
                                 max_length=cfg.max_length)
    enc = tok(captions)
    spec = TEXT_ARCHS[cfg.arch]
    if spec.kind == "bert":
        from transformers import BertConfig, BertForMaskedLM

        # max_position_embeddings as BertTextEncoder builds a random one, so both load the same way
        model: nn.Module = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                                                      max_position_embeddings=max(512, cfg.max_length),
                                                      **spec.sizes))

        def logits_of(ids: Tensor, mask: Tensor) -> Tensor:
            return model(input_ids=ids, attention_mask=mask).logits
    else:
        model = RecurrentTextEncoder(cfg.arch, tok.vocab_size)
        head = nn.Linear(model.out_dim, tok.vocab_size)
        model.add_module("mlm_head", head)  # saved without it below

        def logits_of(ids: Tensor, mask: Tensor) -> Tensor:
            return head(model(ids, mask).tokens)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)

    def mlm_loss(idx: Tensor) -> tuple[Tensor, float]:
        ids, mask = enc["input_ids"][idx], enc["attention_mask"][idx]
        width = int(mask.sum(1).max())  # trim the common padding: faster, same result
        ids, mask = ids[:, :width], mask[:, :width]
        masked, labels = mask_mlm(ids, mask, mask_id=tok.mask_id, special_ids=tok.special_ids,
                                  vocab_size=tok.vocab_size, generator=gen, ratio=cfg.mask_ratio)
        logits = logits_of(masked, mask)
        sel = labels != IGNORE_INDEX
        acc = (logits[sel].argmax(-1) == labels[sel]).float().mean().item()
        return nn.functional.cross_entropy(logits[sel], labels[sel]), acc

    def validate() -> tuple[float, float]:
        val_loss, val_acc = mlm_loss(torch.from_numpy(val_idx))
        return val_loss.item(), val_acc

    history = _optimise(cfg, model, opt, sched, gen, train_idx, lambda idx: mlm_loss(idx)[0], validate, progress)
    if spec.kind == "bert":
        from tokenizers import Tokenizer
        from transformers import BertTokenizerFast

        from tbps_lib.data.text import TOKENIZER_FILE
        from tbps_lib.models.encoders import quiet_transformers

        with quiet_transformers():
            model.save_pretrained(str(out))
        with tempfile.TemporaryDirectory() as scratch:  # the WordPiece pipeline as a tokenizers.Tokenizer
            backend = Tokenizer.from_file(str(tok.save(scratch) / TOKENIZER_FILE))
        hf_tok = BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]",
                                   pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                                   model_max_length=cfg.max_length)
        hf_tok.save_pretrained(str(out))
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("mlm_head.")}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "arch": cfg.arch})
        tok.save(out)
    return history, {"captions": len(captions), "captions_dropped_as_benchmark_duplicates": dropped,
                     "vocab_size": tok.vocab_size}


def _train_vlp(cfg: PretrainConfig, out: Path, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """ALBEF-style vision-language pretraining of LAIP's smoke model (``models.laip``): image-text contrastive
    learning with momentum queues, image-text matching with hard negatives and masked language modelling
    (LAIP's ITC + ITM + MLM terms, its Table V MLM on whole captions) on the corpus's image-caption pairs,
    starting from ``workbook:resnet_smoke`` (its 8x4 feature map = the patch tokens) and ``workbook:bert_smoke``
    (2 text layers) with 2 new fusion layers (LAIP's smoke encoders: ``models.laip`` says why not vit_smoke).
    Captions that are also benchmark captions are dropped. The momentum/queue update of a step runs at the
    start of the next one (``_optimise`` has no hook after the optimiser step). Saved with ALBEF's key names
    (``models.laip.laip_to_albef``) in ``model.safetensors``, so ``model.init_albef`` loads it like an ALBEF
    checkpoint. History: loss, and held-out text-to-image R@1 by ITC similarity as the accuracy."""
    from safetensors.torch import save_file

    from tbps_lib.data.loaders import build_tokenizer
    from tbps_lib.models.laip import LAIP, laip_to_albef

    torch.manual_seed(cfg.seed)
    ds = load_corpus(cfg)
    records = ds.split("train")
    taken = benchmark_captions(cfg.corpus_preset)
    pairs = [(i, c) for i, r in enumerate(records) for c in r.captions if c not in taken]
    model_cfg = _vlp_model_config(cfg)
    tok = build_tokenizer(model_cfg, [])
    model = LAIP(model_cfg)
    images = _load_images(ds, records, tuple(cfg.img_size), progress)
    enc = tok([c for _, c in pairs])
    image_of = torch.tensor([i for i, _ in pairs])
    pids = torch.tensor([records[i].pid for i, _ in pairs])
    train_idx, val_idx = _split_holdout(len(pairs), cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)

    def batch_of(idx: Tensor, flip: Tensor | None = None) -> dict[str, Tensor]:
        ids, mask = enc["input_ids"][idx], enc["attention_mask"][idx]
        width = int(mask.sum(1).max())
        return {"images": _as_input(images[image_of[idx]], flip), "input_ids": ids[:, :width],
                "attention_mask": mask[:, :width], "pids": pids[idx]}

    def step_loss(idx: Tensor) -> Tensor:
        if model._pending is not None:
            with torch.no_grad():
                model.after_optimizer_step(None)
        return model(batch_of(idx, torch.rand(len(idx), generator=gen) < 0.5))["loss"]

    def validate() -> tuple[float, float]:
        idx = torch.from_numpy(val_idx[:256])
        batch = batch_of(idx)
        loss = model(batch)["loss"].item()
        model._pending = None  # held-out features never enter the queues
        feats_i, feats_t = model.encode_images(batch["images"]), model.encode_texts(batch)
        top = model.similarity(feats_i, feats_t).argmax(dim=1)
        return loss, float((batch["pids"][top] == batch["pids"]).float().mean())

    history = _optimise(cfg, model, opt, sched, gen, train_idx, step_loss, validate, progress)
    state = {k: v for k, v in model.state_dict().items()
             if not (k.split(".")[0].endswith("_m") or k.endswith("_queue") or k == "queue_ptr")}
    albef = {k: v.detach().contiguous() for k, v in
             laip_to_albef(state, len(model.text_encoder.bert.encoder.layer)).items()}
    save_file(albef, str(out / "model.safetensors"), metadata={"format": "pt", "arch": cfg.arch})
    return history, {"pairs": len(pairs), "images": len(records), "starts_from": list(VLP_STARTS[cfg.arch])}


# ----------------------------------------------------------------------------------------------------
# Do the features mean something?


@torch.no_grad()
def _pooled_features(encoder: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    encoder.eval()
    return torch.cat([encoder(_as_input(images[i:i + batch])).pooled for i in range(0, len(images), batch)])


def linear_probe(arch: str, pretrained: str | None, dataset: str = "synthetic:cuhk-like",
                 img_size: tuple[int, int] = (64, 32), steps: int = 300, progress: bool = False) -> dict[str, float]:
    """Attribute accuracy of a linear classifier on frozen pooled features of ``arch``.

    The encoder gets ``pretrained`` (e.g. ``"workbook:resnet_smoke"``; ``None`` = random initialisation);
    the probe (:class:`AttributeHead`, full-batch Adam, ``steps`` steps) is fitted on the training images of
    ``dataset`` and scored on its test images: the mean over attribute groups of the share predicted right.
    Returns ``{"train_accuracy", "test_accuracy", "majority_accuracy"}`` (the last: always guessing each
    group's most frequent training value).
    """
    from tbps_lib.config import ImageEncoderConfig
    from tbps_lib.data.catalog import load_dataset
    from tbps_lib.models.encoders import build_image_encoder

    torch.manual_seed(0)
    ds = load_dataset(dataset)
    train, test = ds.split("train"), ds.split("test")
    groups = attribute_groups(train)
    y_train, y_test = attribute_targets(train, groups), attribute_targets(test, groups)
    encoder = build_image_encoder(ImageEncoderConfig(arch=arch, img_size=tuple(img_size), pretrained=pretrained))
    f_train = _pooled_features(encoder, _load_images(ds, train, tuple(img_size), progress))
    f_test = _pooled_features(encoder, _load_images(ds, test, tuple(img_size), progress))
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    head = AttributeHead(f_train.shape[1], groups)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = head.loss(f_train, y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
    majority = [float((y_test[:, j] == torch.mode(y_train[:, j]).values).float().mean()) for j in range(len(groups))]
    return {"train_accuracy": head.accuracy(f_train, y_train), "test_accuracy": head.accuracy(f_test, y_test),
            "majority_accuracy": float(np.mean(majority))}


def plot_pretraining_curves(names: Sequence[str], cache_dir: str | Path | None = None) -> Any:
    """One panel per ``workbook:`` weights name: training and held-out loss, and held-out accuracy
    (attribute groups for images, masked tokens for text) against the step. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        hist = pretraining_history(name, cache_dir)
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["loss"] for h in hist], label="train loss")
        ax.plot(steps, [h["val_loss"] for h in hist], label="held-out loss")
        ax.set_xlabel("step")
        ax.set_title(f"{WORKBOOK_PREFIX}{name}", fontsize=9)
        acc = ax.twinx()
        acc.plot(steps, [h["val_accuracy"] for h in hist], color="C2", label="held-out accuracy")
        acc.set_ylim(0, 1)
        if ax is axes[0][-1]:
            acc.set_ylabel("accuracy")
        lines = ax.get_lines() + acc.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="center right")
    fig.tight_layout()
    return fig


RANDOM_INIT: dict[str, str] = {"image.pretrained": "none", "text.pretrained": "none"}
"""The config changes that start both encoders from random weights instead of pretrained ones (notebook 02's
comparison; ``tbps reproduce`` trains that baseline run too, table ``random init``)."""


def compare_runs(runs: Mapping[str, Any]) -> Any:
    """A table (pandas) of labelled runs: how each encoder was initialised, the selected epoch, validation
    and test R@1 and mAP, and the wall time of training + test evaluation."""
    import pandas as pd

    rows = {}
    for label, run in runs.items():
        m = run.metrics
        rows[label] = {"image init": m["init"]["image"], "text init": m["init"]["text"],
                       "epoch": m["selected"]["epoch"], "val R1": m["val"]["R1"], "val mAP": m["val"]["mAP"],
                       "test R1": m["test"]["R1"], "test mAP": m["test"]["mAP"], "wall s": m["wall_time_s"]}
    return pd.DataFrame.from_dict(rows, orient="index")


__all__ = ["plot_pretraining_curves", "compare_runs", "RANDOM_INIT", "PretrainConfig", "WORKBOOK_WEIGHTS", "WORKBOOK_PREFIX",
           "ensure_pretrained", "resolve_pretrained",
           "pretrain_hash", "weights_dir", "cache_root", "pretraining_history", "pretraining_info",
           "corpus_captions", "benchmark_captions", "load_corpus", "linear_probe", "workbook_config",
           "training_order"]
