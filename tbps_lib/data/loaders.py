"""From a :class:`TBPSDataset` to model batches: datasets, transforms, samplers, collate, tokenizer.

* :class:`TrainPairs` - one item per (image, caption) pair of the training split.
* :class:`SplitImages` / :class:`SplitCaptions` - the gallery (every image of a split) and the queries
  (every caption of a split), both in record order, so their person ids line up with ``rank_metrics``.
* Transforms: decode, resize to ``cfg.image.img_size`` (height, width; bicubic), horizontal flip in
  training when ``cfg.data.flip``, ImageNet normalisation. Plain PIL + torch.
* Flips are drawn per (seed, epoch, pair) when the epoch starts, not from a global generator, so a run
  resumed in the middle of an epoch sees exactly the images an uninterrupted run sees, whatever the
  number of loader workers.
* In-memory cache: with ``num_workers == 0`` the decoded, resized images are kept as uint8 tensors when
  the split fits in ``TBPS_IMAGE_CACHE_MB`` (default 2048 MiB; 0 turns the cache off). On the smoke
  preset (128x64 PNGs) decoding costs about 0.4 ms per image on one core, so the cache saves a few
  seconds per epoch; resizing is deterministic, so caching does not change any result.
* Samplers yield whole batches of indices, fixed per (seed, epoch): :class:`IdentityBalancedSampler`
  (P identities x K pairs) and :class:`RandomBatchSampler`. ``cfg.data.batch_size`` is the global batch:
  under DDP each of the ``num_replicas`` ranks takes its own slice of every batch.
* :func:`collate` builds the batch keys of ``tbps_lib/models/base.py`` plus the extra fields a method
  declares (``cfg.model.batch_fields(training)``: builder names of :data:`BATCH_FIELDS` and their
  arguments). Collate runs on the DataLoader workers, so the fields are ready, fixed-shape tensors when the
  training step gets them (no host work or synchronisation in the step). Builders that draw (which word to
  mask) use one generator per item seeded from (seed, epoch, pair) (``TrainPairs`` gives each item a
  ``draw_seed``), so a resumed run draws what an uninterrupted one draws, whatever the number of workers.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from tbps_lib.data.catalog import load_dataset
from tbps_lib.data.formats import DatasetError, Record, TBPSDataset, hold_out_validation
from tbps_lib.data.text import (CaptionTokenizer, caption_words, choose_phrase_words,
                                extract_noun_phrases_batch, mask_phrase_word)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_ENV = "TBPS_IMAGE_CACHE_MB"
DEFAULT_CACHE_MB = 2048
_FLIP_STREAM = 0x5F11  # keeps the flip draws apart from the samplers' draws of the same (seed, epoch)
_DRAW_STREAM = 0xD4A3  # the per-item seeds of the batch-field builders (e.g. which phrase word to mask)


# ----------------------------------------------------------------------------------------------------
# Dataset and tokenizer of a run


def prepare_dataset(cfg: Any, loaded: TBPSDataset | None = None) -> TBPSDataset:
    """Load ``cfg.data.dataset`` and give it a validation split when it has none.

    Datasets without one (ICFG-PEDES, the icfg-like synthetic preset) get
    ``hold_out_validation(ds, cfg.data.val_holdout, cfg.seed)``; the note it adds to ``ds.report.notes``
    travels into the run's metrics. ``loaded``: the dataset ``cfg.data.dataset`` already loaded (as
    ``load_dataset`` returns it), so that preparing several seeds reads the files once.
    """
    ds = loaded if loaded is not None else load_dataset(cfg.data.dataset, root=cfg.data.root)
    for split in ("train", "test"):
        if split not in ds.splits:
            raise DatasetError(f"{ds.name} ({ds.root}) has no {split!r} split; present: {list(ds.splits)}")
    return hold_out_validation(ds, cfg.data.val_holdout, cfg.seed)


def train_captions(ds: TBPSDataset) -> list[str]:
    """Every caption of the training split, in record order (what the WordPiece vocabulary learns)."""
    return [c for r in ds.split("train") for c in r.captions]


def build_tokenizer(cfg: Any, captions: Sequence[str]) -> CaptionTokenizer:
    """The run's tokenizer: the vocabulary of the pretrained text encoder when ``cfg.text.pretrained`` is
    set, otherwise a WordPiece vocabulary of ``cfg.text.vocab_size`` trained on ``captions`` (the training
    captions). A pretrained folder holds either a Hugging Face BERT tokenizer, or (the library's own format,
    e.g. ``workbook:bigru_smoke``) the files of ``CaptionTokenizer.save``; ``workbook:<arch>`` names are
    resolved (trained on first use) by ``tbps_lib.pretrain.resolve_pretrained``."""
    if cfg.text.pretrained:
        from tbps_lib.data.text import META_FILE
        from tbps_lib.pretrain import resolve_pretrained

        folder = Path(resolve_pretrained(cfg.text.pretrained, "text.pretrained")[0]).expanduser()
        if folder.is_file():  # a bare state-dict file: its tokenizer files sit beside it
            folder = folder.parent
        if (folder / META_FILE).is_file():
            return CaptionTokenizer.load(folder, max_length=cfg.text.max_length)
        return CaptionTokenizer.from_pretrained_dir(folder, max_length=cfg.text.max_length)
    return CaptionTokenizer.train(captions, vocab_size=cfg.text.vocab_size, max_length=cfg.text.max_length)


# ----------------------------------------------------------------------------------------------------
# Images


def load_image(path: Path, size: tuple[int, int], where: str = "") -> torch.Tensor:
    """Decode ``path`` as RGB and resize it to ``size`` = (height, width): uint8 tensor [3, H, W].

    An unreadable or missing file is a :class:`DatasetError` naming the file and ``where`` (the record).
    """
    try:
        with Image.open(path) as img:
            return image_tensor(img.convert("RGB"), size)
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read image {path}{f' ({where})' if where else ''}: {e}") from e


def image_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The training transform of an RGB image: resized (bicubic) to ``size`` = (height, width) whatever its
    aspect ratio (person crops are stretched to the input size, as in training): uint8 tensor [3, H, W]."""
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    array = np.array(img, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 with ImageNet mean and standard deviation."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


def _cache_budget_bytes() -> int:
    text = os.environ.get(CACHE_ENV, str(DEFAULT_CACHE_MB)).strip()
    try:
        return int(float(text) * 2**20)
    except ValueError:
        raise ValueError(f"{CACHE_ENV} must be a number of MiB, got {text!r}") from None


class ImageStore:
    """Decoded, resized images of a list of records, optionally cached in memory as uint8 tensors."""

    def __init__(self, ds: TBPSDataset, records: Sequence[Record], size: tuple[int, int], cache: bool) -> None:
        self.paths = [ds.image_path(r) for r in records]
        self.size = (int(size[0]), int(size[1]))
        need = len(self.paths) * 3 * self.size[0] * self.size[1]
        self.cache_enabled = cache and need <= _cache_budget_bytes()
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._cache.get(index)
        if image is None:
            image = load_image(self.paths[index], self.size, where=f"image {index} of its split")
            if self.cache_enabled:
                self._cache[index] = image
        return image


# ----------------------------------------------------------------------------------------------------
# Datasets


class TrainPairs(Dataset):
    """One item per (image, caption) pair of the training split.

    Items are dicts: ``image`` (normalised float [3, H, W], flipped when drawn), ``caption``, ``pid``,
    ``label`` (contiguous training label), ``image_index`` (the record's index in the split) and
    ``draw_seed`` (for the batch-field builders that draw). Call :meth:`set_epoch` before each epoch: it
    draws that epoch's flips and item seeds.
    """

    def __init__(self, ds: TBPSDataset, size: tuple[int, int], flip: bool, seed: int,
                 cache: bool = True) -> None:
        self.records = ds.split("train")
        labels = ds.train_labels()
        self.pairs = [(i, j) for i, r in enumerate(self.records) for j in range(len(r.captions))]
        self.pids = np.array([self.records[i].pid for i, _ in self.pairs], dtype=np.int64)
        self.labels = np.array([labels[p] for p in self.pids], dtype=np.int64)
        self.images = ImageStore(ds, self.records, size, cache)
        self.flip, self.seed = flip, seed
        self._flips = np.zeros(len(self.pairs), dtype=bool)
        self._draw_seeds = self._item_seeds(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the horizontal flips (none if flip is off) and the item seeds of ``epoch`` (fixed per seed
        and epoch)."""
        self._draw_seeds = self._item_seeds(epoch)
        if self.flip:
            rng = np.random.default_rng([self.seed, epoch, _FLIP_STREAM])
            self._flips = rng.random(len(self.pairs)) < 0.5

    def _item_seeds(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _DRAW_STREAM]).integers(0, 2**62, len(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec_idx, cap_idx = self.pairs[index]
        image = self.images[rec_idx]
        if self._flips[index]:
            image = image.flip(-1)
        return {"image": normalize_image(image), "caption": self.records[rec_idx].captions[cap_idx],
                "pid": int(self.pids[index]), "label": int(self.labels[index]), "image_index": rec_idx,
                "draw_seed": int(self._draw_seeds[index])}


class SplitImages(Dataset):
    """The gallery: every image of ``split`` in record order (no augmentation)."""

    def __init__(self, ds: TBPSDataset, split: str, size: tuple[int, int], cache: bool = True) -> None:
        self.records = ds.split(split)
        labels = ds.train_labels() if split == "train" else {}
        self.labels = [labels.get(r.pid, -1) for r in self.records]
        self.images = ImageStore(ds, self.records, size, cache)
        self.paths = [str(p) for p in self.images.paths]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": normalize_image(self.images[index]), "pid": self.records[index].pid,
                "label": self.labels[index], "image_index": index}


class SplitCaptions(Dataset):
    """The queries: every caption of ``split``, record by record (``formats.caption_pairs`` order)."""

    def __init__(self, ds: TBPSDataset, split: str) -> None:
        records = ds.split(split)
        labels = ds.train_labels() if split == "train" else {}
        self.items = [{"caption": c, "pid": r.pid, "label": labels.get(r.pid, -1), "image_index": i}
                      for i, r in enumerate(records) for c in r.captions]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


# ----------------------------------------------------------------------------------------------------
# Collate


def collate(items: Sequence[dict[str, Any]], tokenizer: CaptionTokenizer | None = None,
            fields: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Stack items into a batch with the keys of ``models/base.py``, plus the method's extra ``fields``.

    ``images`` [B, 3, H, W] when the items carry images; ``input_ids``, ``attention_mask``,
    ``token_lengths`` (from ``tokenizer``), ``word_lengths`` and ``captions`` when they carry captions; always
    ``pids``, ``labels`` and ``image_index``. ``fields`` (``cfg.model.batch_fields(training)``) maps builder
    names of :data:`BATCH_FIELDS` to their keyword arguments; builders run on caption batches only.
    """
    if not items:
        raise ValueError("collate got an empty list of items")
    batch: dict[str, Any] = {
        "pids": torch.tensor([it["pid"] for it in items], dtype=torch.long),
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "image_index": torch.tensor([it["image_index"] for it in items], dtype=torch.long),
    }
    if "image" in items[0]:
        batch["images"] = torch.stack([it["image"] for it in items])
    if "caption" in items[0]:
        if tokenizer is None:
            raise ValueError("collate: the items carry captions but no tokenizer was given")
        captions = [it["caption"] for it in items]
        batch.update(tokenizer(captions))
        # Caption length in words (punctuation not counted): T_i of the Sew paper's adaptive margin,
        # Eq. (10), in the unit of data.text.length_bounds, and independent of the tokenizer.
        batch["word_lengths"] = torch.tensor([len(caption_words(c, punctuation=False)) for c in captions],
                                             dtype=torch.long)
        batch["captions"] = captions
        for name, params in (fields or {}).items():
            added = batch_field_builder(name)(batch, items, tokenizer, **dict(params))
            clash = sorted(set(added) & set(batch))
            if clash:
                raise ValueError(f"batch field builder {name!r} would overwrite the batch keys {clash}")
            batch.update(added)
    return batch


# ----------------------------------------------------------------------------------------------------
# Per-method batch fields

#: ``builder(batch, items, tokenizer, **params) -> {key: tensor}``: adds fixed-shape tensors to a caption
#: batch (``batch`` already holds the caption keys). Methods name builders in ``batch_fields``.
BatchFieldBuilder = Callable[..., dict[str, torch.Tensor]]
BATCH_FIELDS: dict[str, BatchFieldBuilder] = {}


def register_batch_field(name: str) -> Callable[[BatchFieldBuilder], BatchFieldBuilder]:
    """Decorator: make ``builder`` available to ``batch_fields`` as ``name`` (define it at module level, so
    DataLoader workers can pickle it)."""
    def deco(builder: BatchFieldBuilder) -> BatchFieldBuilder:
        if BATCH_FIELDS.get(name, builder) is not builder:
            raise ValueError(f"batch field builder {name!r} is registered twice")
        BATCH_FIELDS[name] = builder
        return builder
    return deco


def batch_field_builder(name: str) -> BatchFieldBuilder:
    """The builder registered as ``name``; an unknown name is an error listing the known ones."""
    if name not in BATCH_FIELDS:
        raise ValueError(f"unknown batch field {name!r} (from cfg.model.batch_fields); known: {sorted(BATCH_FIELDS)}")
    return BATCH_FIELDS[name]


def item_generator(item: Mapping[str, Any]) -> torch.Generator:
    """A CPU generator seeded from the item's ``draw_seed`` (0 for evaluation items, which have none)."""
    return torch.Generator().manual_seed(int(item.get("draw_seed", 0)))


@register_batch_field("noun_phrases")
def noun_phrase_field(batch: Mapping[str, Any], items: Sequence[Mapping[str, Any]], tokenizer: CaptionTokenizer,
                      max_phrases: int, phrase_length: int, tagger: str = "auto") -> dict[str, torch.Tensor]:
    """The first ``max_phrases`` (M) noun phrases of each caption (``data.text.extract_noun_phrases``),
    tokenized separately to ``phrase_length`` (Lp) tokens, [CLS] and [SEP] included:

    ``phrase_ids``, ``phrase_attention_mask`` long [B, M, Lp] (padding rows are all [PAD] / 0),
    ``phrase_counts`` long [B] (phrases present, at most M) and ``phrase_word_spans`` long [B, M, 2] (each
    phrase's ``[start, end)`` word range in ``caption_words(caption)``, -1 for padding rows).
    """
    if max_phrases < 1 or not 3 <= phrase_length <= tokenizer.max_length:
        raise ValueError(f"noun_phrases: max_phrases must be >= 1 and phrase_length in [3, text.max_length="
                         f"{tokenizer.max_length}], got {max_phrases}, {phrase_length}")
    captions = batch["captions"]
    found = extract_noun_phrases_batch(captions, max_phrases, tagger)
    n, m, lp = len(captions), max_phrases, phrase_length
    ids = torch.full((n, m, lp), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((n, m, lp), dtype=torch.long)
    spans = torch.full((n, m, 2), -1, dtype=torch.long)
    counts = torch.tensor([len(np_.phrases) for np_ in found], dtype=torch.long)
    flat = [p for np_ in found for p in np_.phrases]
    if flat:
        enc = tokenizer(flat)
        p_ids, p_mask = enc["input_ids"][:, :lp].clone(), enc["attention_mask"][:, :lp].clone()
        cut = enc["attention_mask"].sum(1) > lp  # truncated phrases still end with [SEP]
        p_ids[cut, lp - 1] = tokenizer.sep_id
        rows = torch.repeat_interleave(torch.arange(n), counts)
        slots = torch.cat([torch.arange(int(c)) for c in counts])
        ids[rows, slots], mask[rows, slots] = p_ids, p_mask
        spans[rows, slots] = torch.tensor([s for np_ in found for s in np_.word_spans], dtype=torch.long)
    return {"phrase_ids": ids, "phrase_attention_mask": mask, "phrase_counts": counts,
            "phrase_word_spans": spans}


@register_batch_field("phrase_word_mask")
def phrase_word_mask_field(batch: Mapping[str, Any], items: Sequence[Mapping[str, Any]],
                           tokenizer: CaptionTokenizer, tagger: str = "auto") -> dict[str, torch.Tensor]:
    """LAIP's Mask Phrase Modeling input (its Eq. (11)): one word inside a noun phrase per caption, drawn
    with the item's generator (``data.text.choose_phrase_words``), has all its pieces replaced by [MASK]
    (``data.text.mask_phrase_word``):

    ``word_ids`` long [B, L] (``CaptionTokenizer.encode_with_words``), ``mpm_input_ids`` long [B, L],
    ``mpm_labels`` long [B, L] (the original ids at masked positions, ``IGNORE_INDEX`` elsewhere) and
    ``mpm_word`` long [B] (the masked word's index, -1 when the caption has no phrase word).
    """
    captions = batch["captions"]
    word_ids = tokenizer.encode_with_words(captions)["word_ids"]
    found = extract_noun_phrases_batch(captions, None, tagger)
    chosen = torch.cat([choose_phrase_words(word_ids[i:i + 1], [found[i].word_spans], item_generator(items[i]))
                        for i in range(len(captions))])
    masked, labels = mask_phrase_word(batch["input_ids"], word_ids, chosen, tokenizer.mask_id)
    return {"word_ids": word_ids, "mpm_input_ids": masked, "mpm_labels": labels, "mpm_word": chosen}


# ----------------------------------------------------------------------------------------------------
# Batch samplers


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of each global batch of an epoch; the batches depend on (seed, epoch) only.

    ``set_epoch(epoch, start_batch)`` selects the epoch and skips its first ``start_batch`` batches (how a
    run resumes in the middle of an epoch).
    """

    def __init__(self, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        if batch_size % num_replicas:
            raise ValueError(f"data.batch_size = {batch_size} (the global batch) is not divisible by the "
                             f"{num_replicas} processes")
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start_batch = 0, 0

    @property
    def num_batches(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def global_batches(self, epoch: int) -> list[list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.num_batches}")
        self.epoch, self.start_batch = epoch, start_batch

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch_size // self.num_replicas
        for batch in self.global_batches(self.epoch)[self.start_batch:]:
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


class RandomBatchSampler(EpochBatchSampler):
    """A fresh permutation of the pairs each epoch, cut into full batches (the last partial one dropped)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(batch_size, seed, num_replicas, rank)
        if n_items < batch_size:
            raise ValueError(f"the training split has {n_items} pairs, fewer than one batch "
                             f"(data.batch_size = {batch_size})")
        self.n_items = n_items

    @property
    def num_batches(self) -> int:
        return self.n_items // self.batch_size

    def global_batches(self, epoch: int) -> list[list[int]]:
        order = self._rng(epoch).permutation(self.n_items)
        n = self.num_batches * self.batch_size
        return order[:n].reshape(self.num_batches, self.batch_size).tolist()


class IdentityBalancedSampler(EpochBatchSampler):
    """Batches of P identities x K pairs (K = ``instances_per_id``), every identity at most once per batch.

    Each epoch, every identity's pairs are shuffled and cut into chunks of K (the last chunk topped up with
    repeats of that identity's pairs), so an epoch visits every pair about once. The chunks, grouped by
    identity in a random identity order, are dealt round-robin to the ``num_batches`` batches: chunk j goes
    to batch j mod num_batches, so an identity's chunks land in distinct batches. The number of batches is
    fixed by the data (not by the draw), which the learning-rate schedule needs.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, instances_per_id: int, seed: int,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(batch_size, seed, num_replicas, rank)
        k = instances_per_id
        if k < 1 or batch_size % k:
            raise ValueError(f"data.batch_size = {batch_size} is not a multiple of data.instances_per_id = {k}")
        self.k, self.p = k, batch_size // k
        if self.p % num_replicas:
            raise ValueError(f"the {self.p} identities per batch (data.batch_size / data.instances_per_id) "
                             f"do not split evenly over {num_replicas} processes")
        by_pid: dict[int, list[int]] = {}
        for i, pid in enumerate(pids):
            by_pid.setdefault(int(pid), []).append(i)
        if len(by_pid) < self.p:
            raise ValueError(f"the training split has {len(by_pid)} identities, fewer than the {self.p} "
                             f"identities per batch (data.batch_size = {batch_size} / data.instances_per_id "
                             f"= {k})")
        self.groups = [by_pid[p] for p in sorted(by_pid)]
        self._num_batches = self._count_batches()

    def _count_batches(self) -> int:
        """Largest n such that, with each identity capped at n chunks, at least n * P chunks exist."""
        chunks = [math.ceil(len(g) / self.k) for g in self.groups]
        n = sum(chunks) // self.p
        while n > 0 and sum(min(c, n) for c in chunks) < n * self.p:
            n -= 1
        return n

    @property
    def num_batches(self) -> int:
        return self._num_batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng, n_b, k = self._rng(epoch), self._num_batches, self.k
        chunks: list[np.ndarray] = []
        for g in rng.permutation(len(self.groups)):
            pairs = rng.permutation(self.groups[g])
            pad = (-len(pairs)) % k
            if pad:
                pairs = np.concatenate([pairs, rng.choice(self.groups[g], size=pad, replace=True)])
            chunks.extend(pairs.reshape(-1, k)[:n_b])
        chunks = chunks[:n_b * self.p]
        batches = [np.concatenate(chunks[b::n_b]).tolist() for b in range(n_b)]
        return [batches[i] for i in rng.permutation(n_b)]


# ----------------------------------------------------------------------------------------------------
# Loaders


def _loader_generator(seed: int) -> torch.Generator:
    """A private generator for the DataLoader's worker seeds, so iterating never draws from torch's
    global generator (which would make a resumed run diverge)."""
    return torch.Generator().manual_seed(seed)


def build_train_loader(pairs: TrainPairs, cfg: Any, tokenizer: CaptionTokenizer, pin_memory: bool = False,
                       num_replicas: int = 1, rank: int = 0) -> tuple[DataLoader, EpochBatchSampler]:
    """The training DataLoader over ``pairs`` and its batch sampler (call ``sampler.set_epoch``)."""
    if cfg.data.sampler == "identity":
        sampler: EpochBatchSampler = IdentityBalancedSampler(
            pairs.pids, cfg.data.batch_size, cfg.data.instances_per_id, cfg.seed, num_replicas, rank)
    elif cfg.data.sampler == "random":
        sampler = RandomBatchSampler(len(pairs), cfg.data.batch_size, cfg.seed, num_replicas, rank)
    else:
        raise ValueError(f"data.sampler must be 'identity' or 'random', got {cfg.data.sampler!r}")
    collate_fn = functools.partial(collate, tokenizer=tokenizer, fields=cfg.model.batch_fields(True))
    loader = DataLoader(pairs, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=collate_fn, pin_memory=pin_memory,
                        generator=_loader_generator(cfg.seed))
    return loader, sampler


def build_eval_loaders(ds: TBPSDataset, split: str, cfg: Any, tokenizer: CaptionTokenizer,
                       pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """(gallery images loader, query captions loader) of ``split``, in record order; caption batches carry
    the method's evaluation fields (``cfg.model.batch_fields(False)``)."""
    cache = cfg.data.num_workers == 0
    common = {"batch_size": cfg.eval.batch_size, "shuffle": False, "pin_memory": pin_memory,
              "collate_fn": functools.partial(collate, tokenizer=tokenizer, fields=cfg.model.batch_fields(False))}
    images = DataLoader(SplitImages(ds, split, cfg.image.img_size, cache), num_workers=cfg.data.num_workers,
                        generator=_loader_generator(cfg.seed), **common)
    captions = DataLoader(SplitCaptions(ds, split), num_workers=0, generator=_loader_generator(cfg.seed),
                          **common)
    return images, captions


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "prepare_dataset", "train_captions", "build_tokenizer", "load_image",
    "image_tensor",
    "normalize_image", "ImageStore", "TrainPairs", "SplitImages", "SplitCaptions", "collate", "BATCH_FIELDS",
    "register_batch_field", "batch_field_builder", "item_generator", "noun_phrase_field", "phrase_word_mask_field",
    "EpochBatchSampler", "RandomBatchSampler", "IdentityBalancedSampler", "build_train_loader",
    "build_eval_loaders",
]
