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
* :func:`collate` builds exactly the batch keys of ``tbps_lib/models/base.py``.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from tbps_lib.data.formats import DatasetError, Record, TBPSDataset, hold_out_validation, load_dataset
from tbps_lib.data.text import CaptionTokenizer, caption_words

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_ENV = "TBPS_IMAGE_CACHE_MB"
DEFAULT_CACHE_MB = 2048
_FLIP_STREAM = 0x5F11  # keeps the flip draws apart from the samplers' draws of the same (seed, epoch)


# ----------------------------------------------------------------------------------------------------
# Dataset and tokenizer of a run


def prepare_dataset(cfg: Any) -> TBPSDataset:
    """Load ``cfg.data.dataset`` and give it a validation split when it has none.

    Datasets without one (ICFG-PEDES, the icfg-like synthetic preset) get
    ``hold_out_validation(ds, cfg.data.val_holdout, cfg.seed)``; the note it adds to ``ds.report.notes``
    travels into the run's metrics.
    """
    ds = load_dataset(cfg.data.dataset, root=cfg.data.root)
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
            img = img.convert("RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            array = np.array(img, dtype=np.uint8)  # a writable copy
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read image {path}{f' ({where})' if where else ''}: {e}") from e
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
    ``label`` (contiguous training label) and ``image_index`` (the record's index in the split).
    Call :meth:`set_epoch` before each epoch: it draws that epoch's flips.
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

    def set_epoch(self, epoch: int) -> None:
        """Draw the horizontal flips of ``epoch`` (fixed per seed and epoch; none if flip is off)."""
        if self.flip:
            rng = np.random.default_rng([self.seed, epoch, _FLIP_STREAM])
            self._flips = rng.random(len(self.pairs)) < 0.5

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec_idx, cap_idx = self.pairs[index]
        image = self.images[rec_idx]
        if self._flips[index]:
            image = image.flip(-1)
        return {"image": normalize_image(image), "caption": self.records[rec_idx].captions[cap_idx],
                "pid": int(self.pids[index]), "label": int(self.labels[index]), "image_index": rec_idx}


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


def collate(items: Sequence[dict[str, Any]], tokenizer: CaptionTokenizer | None = None) -> dict[str, Any]:
    """Stack items into a batch with the keys of ``models/base.py``.

    ``images`` [B, 3, H, W] when the items carry images; ``input_ids``, ``attention_mask``,
    ``token_lengths`` (from ``tokenizer``), ``word_lengths`` and ``captions`` when they carry captions; always ``pids``,
    ``labels`` and ``image_index``.
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
        # Eq. (10), in the unit of data.explore.length_bounds, and independent of the tokenizer.
        batch["word_lengths"] = torch.tensor([len(caption_words(c, punctuation=False)) for c in captions],
                                             dtype=torch.long)
        batch["captions"] = captions
    return batch


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
    loader = DataLoader(pairs, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=functools.partial(collate, tokenizer=tokenizer), pin_memory=pin_memory,
                        generator=_loader_generator(cfg.seed))
    return loader, sampler


def build_eval_loaders(ds: TBPSDataset, split: str, cfg: Any, tokenizer: CaptionTokenizer,
                       pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """(gallery images loader, query captions loader) of ``split``, in record order."""
    cache = cfg.data.num_workers == 0
    common = {"batch_size": cfg.eval.batch_size, "shuffle": False, "pin_memory": pin_memory,
              "collate_fn": functools.partial(collate, tokenizer=tokenizer)}
    images = DataLoader(SplitImages(ds, split, cfg.image.img_size, cache), num_workers=cfg.data.num_workers,
                        generator=_loader_generator(cfg.seed), **common)
    captions = DataLoader(SplitCaptions(ds, split), num_workers=0, generator=_loader_generator(cfg.seed),
                          **common)
    return images, captions


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "prepare_dataset", "train_captions", "build_tokenizer", "load_image",
    "normalize_image", "ImageStore", "TrainPairs", "SplitImages", "SplitCaptions", "collate",
    "EpochBatchSampler", "RandomBatchSampler", "IdentityBalancedSampler", "build_train_loader",
    "build_eval_loaders",
]
