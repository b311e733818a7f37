"""The workbook's pretrained smoke backbones (tbps_lib.pretrain): corpus, save/load, cache, names."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from tbps_lib import pretrain
from tbps_lib.config import ImageEncoderConfig, TextEncoderConfig, make_config
from tbps_lib.data import synthetic
from tbps_lib.data.formats import read_synthetic
from tbps_lib.data.loaders import build_tokenizer, load_image
from tbps_lib.data.synthetic_attributes import signature
from tbps_lib.models.encoders import build_image_encoder, build_text_encoder

TINY_BENCH = 10  # identities of each benchmark the tiny corpus avoids


@pytest.fixture
def tiny(tmp_path_factory, monkeypatch):
    """A private cache (shared by this module's tests: the tiny sets are generated once), a 30-identity
    corpus preset that avoids 10-identity benchmarks, tiny pretraining configs."""
    monkeypatch.setenv("TBPS_CACHE", str(tmp_path_factory.getbasetemp() / "pretrain-cache"))
    corpus = dataclasses.replace(synthetic.CORPUS_PRESETS["pretrain-corpus"], name="pretrain-corpus-tiny",
                                 avoid=tuple((name, 0, TINY_BENCH) for name in synthetic.PRESETS))
    monkeypatch.setitem(synthetic.CORPUS_PRESETS, corpus.name, corpus)
    base = dict(corpus_preset=corpus.name, corpus_ids=30, steps=3, batch_size=8, log_every=2, vocab_size=300)
    configs = {arch: pretrain.PretrainConfig(arch, **base) for arch in pretrain.WORKBOOK_WEIGHTS}
    monkeypatch.setattr(pretrain, "WORKBOOK_WEIGHTS", configs)
    return configs


def _pixels(ds, record, size):
    return hashlib.sha1(load_image(ds.image_path(record), size).numpy()).hexdigest()


def test_default_corpus_avoids_every_benchmark_as_smoke_runs_generate_it():
    avoid = synthetic.CORPUS_PRESETS["pretrain-corpus"].avoid
    assert set(avoid) == {(name, 0, p.default_ids) for name, p in synthetic.PRESETS.items()}
    assert "pretrain-corpus" not in synthetic.PRESETS  # not a benchmark
    assert all(c.corpus_preset == "pretrain-corpus" for c in pretrain.WORKBOOK_WEIGHTS.values())


def test_corpus_shares_no_identity_image_or_caption_with_the_benchmarks(tiny, monkeypatch):
    cfg = tiny["bigru_smoke"]
    corpus = pretrain.load_corpus(cfg)
    avoided = synthetic.avoided_signatures(synthetic.get_preset(cfg.corpus_preset))
    corpus_sigs = {signature(r.meta["attributes"]) for r in corpus.records}
    size = tuple(cfg.img_size)
    corpus_pixels = {_pixels(corpus, r, size) for r in corpus.records}
    for name in synthetic.PRESETS:
        bench = read_synthetic(synthetic.ensure_synthetic(name, ids=TINY_BENCH))
        sigs = {signature(r.meta["attributes"]) for r in bench.records}
        assert sigs <= avoided  # the avoided set really is the benchmark's identities
        assert not corpus_sigs & sigs
        assert not corpus_pixels & {_pixels(bench, r, size) for r in bench.records}
    kept, dropped = pretrain.corpus_captions(cfg)
    assert not set(kept) & pretrain.benchmark_captions(cfg.corpus_preset)
    # a corpus caption that is also a benchmark caption is dropped from the text corpus
    every = [c for r in corpus.records for c in r.captions]
    monkeypatch.setattr(pretrain, "benchmark_captions", lambda name: {every[0]})
    kept2, dropped2 = pretrain.corpus_captions(cfg)
    assert every[0] not in kept2 and dropped2 == every.count(every[0]) and len(kept2) == len(every) - dropped2


@pytest.mark.parametrize("arch", ["resnet_smoke", "vit_smoke", "swin_smoke"])
def test_image_weights_load_like_a_timm_checkpoint(tiny, arch):
    folder = pretrain.ensure_pretrained(arch)
    from tbps_lib.models.encoders import load_state_dict_file
    saved = load_state_dict_file(folder / "model.safetensors", "image.pretrained")
    enc = build_image_encoder(ImageEncoderConfig(arch=arch, img_size=(64, 32), pretrained=f"workbook:{arch}"))
    own = enc.model.state_dict()
    assert own.keys() == saved.keys() and all(torch.equal(own[k], saved[k]) for k in own)
    assert enc.pretrained_source == f"workbook:{arch}@{pretrain.pretrain_hash(tiny[arch])}"
    # the same file through a plain path, as a real ImageNet checkpoint is given
    assert build_image_encoder(ImageEncoderConfig(arch=arch, img_size=(64, 32), pretrained=str(folder))).pretrained_source
    history = pretrain.pretraining_history(arch)
    assert [h["step"] for h in history] == [2, 3] and all(0 <= h["val_accuracy"] <= 1 for h in history)
    if arch == "vit_smoke":  # trained at 64x32, loads at another size (position embeddings resampled)
        build_image_encoder(ImageEncoderConfig(arch=arch, img_size=(128, 64), pretrained=f"workbook:{arch}"))
    with pytest.raises(ValueError, match="do not fit"):
        other = "swin_smoke" if arch != "swin_smoke" else "resnet_smoke"
        build_image_encoder(ImageEncoderConfig(arch=other, img_size=(64, 32), pretrained=f"workbook:{arch}"))


def test_recurrent_weights_keep_their_hash():
    # bilstm_smoke joined through the arch's cell: bigru_smoke's cached weights must keep their name. A
    # deliberate change of its recipe or of FORMAT_VERSION updates this literal.
    assert pretrain.pretrain_hash(pretrain.WORKBOOK_WEIGHTS["bigru_smoke"]) == "44a93d90b09d"
    lstm = pretrain.WORKBOOK_WEIGHTS["bilstm_smoke"]
    assert lstm.kind == "text"
    assert dataclasses.replace(lstm, arch="bigru_smoke") == pretrain.WORKBOOK_WEIGHTS["bigru_smoke"]  # same recipe


@pytest.mark.parametrize("arch", ["bert_smoke", "bigru_smoke", "bilstm_smoke"])
def test_text_weights_and_vocabulary_round_trip(tiny, arch):
    folder = pretrain.ensure_pretrained(arch)
    cfg = dataclasses.replace(make_config("baseline"), text=TextEncoderConfig(arch=arch, pretrained=f"workbook:{arch}"))
    tok = build_tokenizer(cfg, ["ignored: the pretrained vocabulary is used"])
    enc = build_text_encoder(cfg.text)
    info = pretrain.pretraining_info(arch)
    assert tok.vocab_size == enc.vocab_size == info["vocab_size"] != cfg.text.vocab_size
    assert enc.pretrained_source == f"workbook:{arch}@{pretrain.pretrain_hash(tiny[arch])}"
    if arch == "bert_smoke":  # a Hugging Face folder, loaded like bert-base-uncased
        from transformers import BertModel, BertTokenizerFast
        hf = BertModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
        assert all(torch.equal(v, enc.bert.state_dict()[k]) for k, v in hf.state_dict().items())
        hf_tok = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        text = "a woman in a red coat and black boots"
        assert hf_tok(text)["input_ids"] == tok([text])["input_ids"][0][: len(hf_tok(text)["input_ids"])].tolist()
    else:  # the library's own format: the encoder's state dict and the CaptionTokenizer files
        assert (folder / "model.safetensors").is_file() and (folder / "caption_tokenizer.json").is_file()
    batch = tok(["a man with a blue backpack"])
    assert enc(batch["input_ids"], batch["attention_mask"]).pooled.shape == (1, enc.out_dim)


def test_cache_is_keyed_by_config_and_reused(tiny, monkeypatch):
    first = pretrain.ensure_pretrained("resnet_smoke")
    assert first.name == f"resnet_smoke-{pretrain.pretrain_hash(tiny['resnet_smoke'])}"

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(pretrain, "_train_image", no_training)
    assert pretrain.ensure_pretrained("resnet_smoke") == first  # second call: loaded, not trained
    other = dataclasses.replace(tiny["resnet_smoke"], steps=4)
    assert pretrain.pretrain_hash(other) != pretrain.pretrain_hash(tiny["resnet_smoke"])
    with pytest.raises(AssertionError, match="trained again"):
        pretrain.ensure_pretrained(other)
    assert not pretrain.weights_dir(other).exists()  # a failed training leaves no folder behind


def test_unknown_workbook_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"image.pretrained='workbook:'?resnet_huge.*known: workbook:bert_smoke"):
        build_image_encoder(ImageEncoderConfig(arch="resnet_smoke", img_size=(64, 32), pretrained="workbook:resnet_huge"))
    with pytest.raises(ValueError, match=r"text.pretrained=.*unknown workbook weights"):
        build_text_encoder(TextEncoderConfig(arch="bigru_smoke", pretrained="workbook:gru"))


def _tiny_bert_folder(folder, **sizes):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=50, **sizes)).save_pretrained(folder)


def test_any_size_bert_folder_takes_its_sizes_from_config_json(tmp_path):
    _tiny_bert_folder(tmp_path / "mini", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=48)
    _tiny_bert_folder(tmp_path / "wide", hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=64)
    for name, dim, layers in (("mini", 32, 1), ("wide", 48, 3)):
        enc = build_text_encoder(TextEncoderConfig(arch="bert", pretrained=str(tmp_path / name)))
        assert enc.out_dim == dim and enc.bert.config.num_hidden_layers == layers
        out = enc(torch.tensor([[2, 7, 9, 3]]), torch.ones(1, 4, dtype=torch.long))
        assert out.pooled.shape == (1, dim)
    # a named arch (the paper presets' bert_base) still checks its sizes
    with pytest.raises(ValueError, match=r"does not fit text.arch='bert_base': hidden_size 32 \(expected 768\)"):
        build_text_encoder(TextEncoderConfig(arch="bert_base", pretrained=str(tmp_path / "mini")))
    with pytest.raises(ValueError, match="text.arch='bert' takes its sizes from a pretrained folder"):
        build_text_encoder(TextEncoderConfig(arch="bert"))


def test_cli_pretrain(tiny, capsys):
    from tbps_lib.cli import main

    assert main(["pretrain", "--arch", "resnet_smoke", "--quiet"]) == 0
    assert "workbook:resnet_smoke:" in capsys.readouterr().out
    assert main(["pretrain", "--arch", "resnet_huge"]) == 2
    assert "--arch='workbook:resnet_huge': unknown workbook weights" in capsys.readouterr().err


def test_pretraining_inputs_are_the_images_normalised_once(tiny):
    corpus = pretrain.load_corpus(tiny["resnet_smoke"])
    records = corpus.split("train")[:2]
    images = pretrain._load_images(corpus, records, (64, 32), False)
    assert images.dtype == torch.uint8 and torch.equal(images[0], load_image(corpus.image_path(records[0]), (64, 32)))
    from tbps_lib.data.loaders import normalize_image
    assert torch.allclose(pretrain._as_input(images), normalize_image(images))
    flipped = pretrain._as_input(images, torch.tensor([True, False]))
    assert torch.allclose(flipped[0], normalize_image(images[0]).flip(-1)) and torch.allclose(flipped[1], normalize_image(images[1]))
