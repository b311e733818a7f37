"""Guards of the evaluation protocol: each test fails when its rule is broken.

The rules (DESIGN.md, "Evaluation protocol"; the papers' protocol for CUHK-PEDES, ICFG-PEDES, RSTPReid):

a. the checkpoint is selected on the validation split, never on the test split;
b. the test split is evaluated once per run, with the selected checkpoint;
c. the tokenizer learns its vocabulary from the training captions only, so a word seen only in
   validation or test captions is unknown to it;
d. at evaluation the model sees images and captions only: person ids, training labels and the
   caption-to-image index never reach ``encode_texts`` / ``encode_images``.

Each was checked by breaking it in the library once (see the report of the change that added this file).
The toy method and dataset of ``test_trainer`` keep every run to a few CPU seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tbps_lib.engine import trainer
from tbps_lib.engine.runs import train_or_load
from test_trainer import ToyModel, _toy_registered, toy_config, write_toy_dataset  # noqa: F401

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
#: Names a ground-truth field could have in a batch; none may reach the encoders at evaluation.
GROUND_TRUTH = {"pid", "pids", "label", "labels", "image_index", "person_id", "person_ids", "target", "targets"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("protocol") / "data")


def _split_of(paths) -> str:
    """The split whose images these are, read from the data (the toy keeps each split's images in a folder
    named after it), not from the label the caller gives."""
    (split,) = {Path(p).parent.name for p in paths}
    return split


def _spy_evaluations(monkeypatch, scores: dict[str, list[float]] | None = None) -> list[dict]:
    """Record every evaluation the trainer runs: the split its images come from, the split it is labelled
    with, and a copy of the model's weights.

    With ``scores``, the trainer's evaluation is replaced by one returning ``scores[split][n]`` for every
    metric at the split's n-th evaluation (and 0 after the list ends), so the test decides which epoch
    each split prefers.
    """
    calls: list[dict] = []
    real = trainer.evaluate

    def spy(model, encoded, *args, **kwargs):
        split = _split_of(encoded.image_paths)
        n = sum(c["split"] == split for c in calls)
        calls.append({"split": split, "label": encoded.split,
                      "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}})
        if scores is None:
            return real(model, encoded, *args, **kwargs)
        listed = scores.get(split, [])
        value = listed[n] if n < len(listed) else 0.0
        return {k: value for k in METRICS}

    monkeypatch.setattr(trainer, "evaluate", spy)
    return calls


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# a. selection on the validation split


def test_checkpoint_selection_follows_the_validation_split(data, tmp_path, monkeypatch):
    # Validation prefers epoch 2; the test split would prefer epoch 3 (and epoch 1 over epoch 2).
    calls = _spy_evaluations(monkeypatch, {"val": [10.0, 50.0, 20.0], "test": [30.0, 5.0, 60.0]})
    run = train_or_load(toy_config(data), runs_dir=tmp_path, progress=False, device="cpu")
    assert [c["split"] for c in calls] == ["val", "val", "val", "test"]  # one validation per epoch, one test
    assert all(c["label"] == c["split"] for c in calls)
    val_calls = calls[:3]
    metrics = run.metrics
    assert metrics["selected"]["epoch"] == 2 and metrics["val"]["R1"] == 50.0
    best = torch.load(run.dir / trainer.BEST, weights_only=True)
    assert best["epoch"] == 2 and best["val"]["R1"] == 50.0
    assert _same_weights(best["model"], val_calls[1]["weights"])  # the weights validation scored best
    assert not _same_weights(best["model"], val_calls[2]["weights"])  # ... not the last ones
    assert _same_weights(run.model.state_dict(), val_calls[1]["weights"])


# ----------------------------------------------------------------------------------------------------
# b. the test split once per run


def test_the_test_split_is_evaluated_once_per_run(data, tmp_path, monkeypatch):
    calls = _spy_evaluations(monkeypatch)
    encoded_splits: list[str] = []
    real_encode = trainer.encode_loaders

    def spy_encode(model, images, captions, split, *args, **kwargs):
        encoded_splits.append(_split_of(images.dataset.paths))
        return real_encode(model, images, captions, split, *args, **kwargs)

    monkeypatch.setattr(trainer, "encode_loaders", spy_encode)
    cfg = toy_config(data)
    run = train_or_load(cfg, runs_dir=tmp_path, progress=False, device="cpu")
    assert [c["split"] for c in calls] == ["val", "val", "val", "test"]  # every epoch, then the test once
    assert encoded_splits == ["val", "val", "val", "test"]
    test_call = calls[-1]
    assert _same_weights(test_call["weights"], run.model.state_dict())  # ... with the selected checkpoint
    again = train_or_load(cfg, runs_dir=tmp_path, progress=False, device="cpu")  # loading never re-tests
    assert not again.trained_now and again.metrics["test"] == run.metrics["test"]
    assert len(calls) == 4 and len(encoded_splits) == 4
    assert set(run.metrics["test"]) == {"split", *METRICS} and run.metrics["test"]["split"] == "test"


# ----------------------------------------------------------------------------------------------------
# c. a tokenizer of the training captions only

UNSEEN_CHARS = "qvjxz"  # letters no training caption of the toy dataset has
SEEN_CHARS = "trenchcoat"  # letters every one of which occurs in the training captions


def _with_held_out_words(root: Path) -> Path:
    """Add ``UNSEEN_CHARS`` to every val and test caption and ``SEEN_CHARS`` to every test caption."""
    path = root / "reid_raw.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    for e in entries:
        if e["split"] in ("val", "test"):
            e["captions"] = [f"{c} with a {UNSEEN_CHARS} bag" for c in e["captions"]]
        if e["split"] == "test":
            e["captions"] = [f"{c} and a {SEEN_CHARS}" for c in e["captions"]]
    path.write_text(json.dumps(entries), encoding="utf-8")
    return root


def test_a_word_seen_only_in_held_out_captions_is_unknown_to_the_tokenizer(tmp_path):
    root = _with_held_out_words(write_toy_dataset(tmp_path / "data"))
    train_text = " ".join(c for e in json.loads((root / "reid_raw.json").read_text())
                          for c in e["captions"] if e["split"] == "train")
    assert not set(UNSEEN_CHARS) & set(train_text) and set(SEEN_CHARS) <= set(train_text)
    run = train_or_load(toy_config(root, **{"optim.max_steps": 2}), runs_dir=tmp_path / "runs", progress=False,
                        device="cpu")
    tok = run.tokenizer
    assert tok.tokenize(UNSEEN_CHARS) == ["[UNK]"]
    ids = tok([f"a person with a {UNSEEN_CHARS} bag"])["input_ids"][0]
    assert (ids == tok.unk_id).sum().item() == 1
    # made of known letters, a test-only word is spelled in pieces: it is not a word of the vocabulary
    assert tok.tokenize(SEEN_CHARS) != [SEEN_CHARS] and "[UNK]" not in tok.tokenize(SEEN_CHARS)
    assert tok.tokenize("trousers") == ["trousers"]  # a training word is (the vocabulary did learn words)


# ----------------------------------------------------------------------------------------------------
# d. no ground truth reaches the encoders at evaluation


def test_ids_and_labels_never_reach_the_encoders_at_evaluation(data, tmp_path, monkeypatch):
    text_keys: list[set[str]] = []
    image_args: list[type] = []
    real_texts, real_images = ToyModel.encode_texts, ToyModel.encode_images

    def spy_texts(self, batch):
        if not self.training:  # evaluation (training's forward may use labels for its losses)
            text_keys.append(set(batch))
        return real_texts(self, batch)

    def spy_images(self, images):
        if not self.training:
            image_args.append(type(images))
        return real_images(self, images)

    monkeypatch.setattr(ToyModel, "encode_texts", spy_texts)
    monkeypatch.setattr(ToyModel, "encode_images", spy_images)
    run = train_or_load(toy_config(data), runs_dir=tmp_path, progress=False, device="cpu")  # val + test
    n_training = len(text_keys)
    run.embeddings("val")  # the registry's evaluation path
    from tbps_lib.search import CaptionSearch

    CaptionSearch.from_run(run, "test").search("a person in a red shirt and blue trousers", k=3)
    assert n_training >= 4 and len(text_keys) > n_training + 1
    assert all("input_ids" in keys for keys in text_keys)
    leaked = sorted({k for keys in text_keys for k in keys} & GROUND_TRUTH)
    assert leaked == [], f"ground-truth fields reached encode_texts at evaluation: {leaked}"
    assert image_args and set(image_args) == {torch.Tensor}  # images alone, no batch dict with ids
