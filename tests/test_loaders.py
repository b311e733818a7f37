"""Loaders: datasets in record order, transforms, the samplers (against slow checks), collate, tokenizer."""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbps_lib.data import loaders
from tbps_lib.data.catalog import load_dataset
from tbps_lib.data.formats import DatasetError, caption_pairs
from tbps_lib.data.loaders import (IdentityBalancedSampler, RandomBatchSampler, SplitCaptions, SplitImages,
                                   TrainPairs, build_tokenizer, collate, prepare_dataset, train_captions)
from test_trainer import _toy_registered, toy_config, write_toy_dataset  # noqa: F401 (autouse fixture)

BATCH_KEYS = {"images", "input_ids", "attention_mask", "token_lengths", "word_lengths", "pids", "labels",
              "image_index", "captions"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("loaders") / "data")


@pytest.fixture(scope="module")
def ds(data):
    return load_dataset(str(data))


# ----------------------------------------------------------------------------------------------------
# Datasets and transforms


def test_train_pairs_one_item_per_caption_with_contiguous_labels(ds):
    pairs = TrainPairs(ds, (16, 8), flip=False, seed=0)
    train = ds.split("train")
    assert len(pairs) == sum(len(r.captions) for r in train) == 120
    labels = ds.train_labels()
    for i in (0, 1, 2, 57, 119):
        item = pairs[i]
        rec_idx, cap_idx = caption_pairs(train)[i]
        assert item["caption"] == train[rec_idx].captions[cap_idx]
        assert item["pid"] == train[rec_idx].pid and item["label"] == labels[item["pid"]]
        assert item["image_index"] == rec_idx
        assert item["image"].shape == (3, 16, 8) and item["image"].dtype == torch.float32
    assert sorted(set(pairs.labels.tolist())) == list(range(30))


def test_normalisation_is_imagenet_mean_std(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (4, 8), (128, 64, 255)).save(path)
    image = loaders.normalize_image(loaders.load_image(path, (8, 4)))
    expected = [(128 / 255 - 0.485) / 0.229, (64 / 255 - 0.456) / 0.224, (255 / 255 - 0.406) / 0.225]
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-6)


def test_load_image_resizes_and_names_a_bad_file(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (10, 30), (1, 2, 3)).save(path)
    assert loaders.load_image(path, (16, 8)).shape == (3, 16, 8)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"cannot read image .*broken\.png \(record 7\)"):
        loaders.load_image(bad, (16, 8), where="record 7")


def test_flips_are_fixed_per_seed_and_epoch(ds):
    pairs = TrainPairs(ds, (16, 8), flip=True, seed=3)
    raw = TrainPairs(ds, (16, 8), flip=False, seed=3)
    pairs.set_epoch(0)
    first = [torch.equal(pairs[i]["image"], raw[i]["image"].flip(-1)) for i in range(len(pairs))]
    pairs.set_epoch(1)
    second = [torch.equal(pairs[i]["image"], raw[i]["image"].flip(-1)) for i in range(len(pairs))]
    pairs.set_epoch(0)
    again = [torch.equal(pairs[i]["image"], raw[i]["image"].flip(-1)) for i in range(len(pairs))]
    assert first == again and first != second
    assert 30 < sum(first) < 90  # about half of 120
    raw.set_epoch(5)
    assert torch.equal(raw[0]["image"], TrainPairs(ds, (16, 8), flip=False, seed=3)[0]["image"])


def test_image_cache_respects_budget_and_gives_same_pixels(ds, monkeypatch):
    cached = TrainPairs(ds, (16, 8), flip=False, seed=0, cache=True)
    assert cached.images.cache_enabled
    monkeypatch.setenv(loaders.CACHE_ENV, "0")
    uncached = TrainPairs(ds, (16, 8), flip=False, seed=0, cache=True)
    assert not uncached.images.cache_enabled
    for i in (0, 5, 0):
        assert torch.equal(cached[i]["image"], uncached[i]["image"])
    assert len(cached.images._cache) == 2 and not uncached.images._cache
    monkeypatch.setenv(loaders.CACHE_ENV, "lots")
    with pytest.raises(ValueError, match="TBPS_IMAGE_CACHE_MB"):
        TrainPairs(ds, (16, 8), flip=False, seed=0)


def test_gallery_and_queries_line_up_in_record_order(ds):
    images, captions = SplitImages(ds, "test", (16, 8)), SplitCaptions(ds, "test")
    test = ds.split("test")
    assert [images[i]["pid"] for i in range(len(images))] == [r.pid for r in test]
    assert [it["pid"] for it in captions.items] == [test[i].pid for i, _ in caption_pairs(test)]
    assert [it["image_index"] for it in captions.items] == [i for i, _ in caption_pairs(test)]
    assert {it["label"] for it in captions.items} == {-1} and images[0]["label"] == -1


def test_collate_builds_exactly_the_contract_keys(ds, data):
    cfg = toy_config(data)
    tok = build_tokenizer(cfg, train_captions(ds))
    pairs = TrainPairs(ds, (16, 8), flip=False, seed=0)
    batch = collate([pairs[i] for i in (0, 4, 9)], tokenizer=tok)
    assert set(batch) == BATCH_KEYS
    assert batch["images"].shape == (3, 3, 16, 8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, cfg.text.max_length)
    assert batch["captions"] == [pairs[i]["caption"] for i in (0, 4, 9)]
    assert batch["word_lengths"].tolist() == [len(c.replace(",", " ").replace(".", " ").split())
                                              for c in batch["captions"]]
    assert batch["labels"].tolist() == [int(pairs.labels[i]) for i in (0, 4, 9)]
    assert batch["token_lengths"].tolist() == [len(tok.tokenize(c)) for c in batch["captions"]]
    text_only = collate([SplitCaptions(ds, "val")[0]], tokenizer=tok)
    assert "images" not in text_only and text_only["labels"].tolist() == [-1]
    with pytest.raises(ValueError, match="no tokenizer"):
        collate([pairs[0]])


# ----------------------------------------------------------------------------------------------------
# Samplers


def _pids(n_ids: int, per_id) -> list[int]:
    return [pid for pid in range(n_ids) for _ in range(per_id(pid))]


def test_identity_sampler_batches_p_distinct_ids_times_k():
    pids = _pids(12, lambda p: 2 + p % 5)  # 2..6 pairs per identity
    s = IdentityBalancedSampler(pids, batch_size=8, instances_per_id=2, seed=1)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == s.num_batches == len(s) > 0
    for batch in batches:
        assert len(batch) == 8
        ids = [pids[i] for i in batch]
        assert all(ids[j] == ids[j + 1] for j in range(0, 8, 2))  # K consecutive pairs of one id
        assert len(set(ids)) == 4  # P distinct identities
    seen = Counter(i for b in batches for i in b)
    assert len(seen) >= 0.8 * len(pids)  # about every pair once per epoch


def test_identity_sampler_is_deterministic_per_seed_and_epoch_and_skips():
    pids = _pids(10, lambda p: 4)
    s = IdentityBalancedSampler(pids, batch_size=8, instances_per_id=2, seed=7)
    t = IdentityBalancedSampler(pids, batch_size=8, instances_per_id=2, seed=7)
    assert s.global_batches(2) == t.global_batches(2)
    assert s.global_batches(2) != s.global_batches(3)
    assert s.global_batches(2) != IdentityBalancedSampler(pids, 8, 2, seed=8).global_batches(2)
    s.set_epoch(2, start_batch=3)
    assert list(s) == t.global_batches(2)[3:] and len(s) == s.num_batches - 3


def test_identity_sampler_number_of_batches_matches_a_slow_count():
    for per_id, p, k in ((lambda q: 1, 3, 2), (lambda q: 9 if q == 0 else 2, 4, 2), (lambda q: 3 + q, 2, 3)):
        pids = _pids(6, per_id)
        s = IdentityBalancedSampler(pids, batch_size=p * k, instances_per_id=k, seed=0)
        chunks = [int(np.ceil(pids.count(q) / k)) for q in range(6)]
        slow = max(n for n in range(0, sum(chunks) + 1) if sum(min(c, n) for c in chunks) >= n * p)
        assert s.num_batches == slow
        for batch in s.global_batches(0):
            assert len({pids[i] for i in batch}) == p


def test_identity_sampler_ddp_ranks_share_each_batch():
    pids = _pids(16, lambda p: 4)
    full = IdentityBalancedSampler(pids, batch_size=16, instances_per_id=2, seed=0).global_batches(4)
    parts = []
    for rank in range(2):
        s = IdentityBalancedSampler(pids, batch_size=16, instances_per_id=2, seed=0, num_replicas=2, rank=rank)
        s.set_epoch(4)
        parts.append(list(s))
    for whole, a, b in zip(full, *parts):
        assert len(a) == len(b) == 8 and a + b == whole
        assert {pids[i] for i in a}.isdisjoint({pids[i] for i in b})  # an identity's K pairs stay together


def test_identity_sampler_errors_name_the_fields():
    with pytest.raises(ValueError, match=r"data.batch_size = 9 is not a multiple of data.instances_per_id = 2"):
        IdentityBalancedSampler(_pids(10, lambda p: 2), 9, 2, 0)
    with pytest.raises(ValueError, match=r"3 identities, fewer than the 4 identities per batch"):
        IdentityBalancedSampler(_pids(3, lambda p: 4), 8, 2, 0)
    with pytest.raises(ValueError, match=r"do not split evenly over 2 processes"):
        IdentityBalancedSampler(_pids(10, lambda p: 4), 6, 2, 0, num_replicas=2)


def test_random_sampler_is_a_permutation_cut_into_batches():
    s = RandomBatchSampler(23, batch_size=5, seed=0)
    batches = s.global_batches(0)
    flat = list(itertools.chain(*batches))
    assert len(batches) == 4 and len(set(flat)) == 20 and set(flat) <= set(range(23))
    assert batches != s.global_batches(1) and batches == RandomBatchSampler(23, 5, 0).global_batches(0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        RandomBatchSampler(3, 5, 0)
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        RandomBatchSampler(30, 5, 0, num_replicas=2)


# ----------------------------------------------------------------------------------------------------
# Dataset preparation and tokenizer


def test_prepare_dataset_holds_out_val_when_missing(tmp_path):
    root = write_toy_dataset(tmp_path / "icfg_like", splits=("train", "test"))
    cfg = toy_config(root, **{"data.val_holdout": 0.2})
    ds = prepare_dataset(cfg)
    assert ds.splits == ("train", "val", "test")
    assert len({r.pid for r in ds.split("val")}) == round(0.2 * 36)  # the 30 + 6 training ids
    assert any("held out as 'val'" in note for note in ds.report.notes)
    assert not {r.pid for r in ds.split("val")} & {r.pid for r in ds.split("train")}


def test_prepare_dataset_keeps_an_official_val(data):
    ds = prepare_dataset(toy_config(data))
    assert len(ds.split("val")) == 12 and not ds.report.notes


def test_build_tokenizer_trains_wordpiece_or_reads_local_bert(ds, data, tmp_path):
    cfg = toy_config(data)
    trained = build_tokenizer(cfg, train_captions(ds))
    assert trained.source.startswith("trained") and trained.vocab_size <= cfg.text.vocab_size
    assert trained.tokenize("a red shirt") == ["a", "red", "shirt"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "shirt", "##s"]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    local = build_tokenizer(toy_config(data, **{"text.pretrained": str(tmp_path / "bert")}), [])
    assert local.source.startswith("pretrained:") and local.vocab_size == len(vocab)
    assert local(["a red shirts"])["input_ids"][0, :6].tolist() == [2, 5, 6, 7, 8, 3]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer(toy_config(data, **{"text.pretrained": str(tmp_path / "nowhere")}), [])
