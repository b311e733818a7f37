"""Encoders: output shapes of every architecture, loading local weights, and clear errors on bad weights."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tbps_lib.config import ImageEncoderConfig, TextEncoderConfig
from tbps_lib.models.encoders import (IMAGE_ARCHS, TEXT_ARCHS, build_image_encoder, build_text_encoder)

SMOKE_GRIDS = {"vit_smoke": (8, 4), "resnet_smoke": (16, 8), "swin_smoke": (4, 2)}  # at 128x64


def _images(n: int = 2, size=(128, 64)) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(0))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", sorted(SMOKE_GRIDS))
def test_smoke_image_encoders_shapes(arch):
    enc = build_image_encoder(ImageEncoderConfig(arch=arch, img_size=(128, 64)))
    out = enc(_images())
    h, w = SMOKE_GRIDS[arch]
    assert out.grid == (h, w)
    assert out.pooled.shape == (2, enc.out_dim)
    assert out.tokens.shape == (2, h * w, enc.out_dim)
    assert enc.pretrained_source is None  # random initialisation is visible


def test_cnn_pooled_is_the_mean_of_the_feature_map():
    enc = build_image_encoder(ImageEncoderConfig(arch="resnet_smoke")).eval()
    out = enc(_images())
    assert torch.allclose(out.pooled, out.tokens.mean(dim=1))


def test_vit_base_at_384x128_has_24x8_patches_plus_cls():
    enc = build_image_encoder(ImageEncoderConfig(arch="vit_base_patch16", img_size=(384, 128)))
    assert tuple(enc.model.pos_embed.shape) == (1, 24 * 8 + 1, 768)
    assert enc.out_dim == 768
    with torch.no_grad():
        out = enc(_images(1, (384, 128)))
    assert out.grid == (24, 8) and out.tokens.shape == (1, 192, 768) and out.pooled.shape == (1, 768)


@pytest.mark.parametrize("arch,grid,dim", [("resnet50", (4, 2), 2048), ("swin_tiny", (4, 2), 768)])
def test_big_image_encoders_at_128x64(arch, grid, dim):
    enc = build_image_encoder(ImageEncoderConfig(arch=arch, img_size=(128, 64)))
    with torch.no_grad():
        out = enc(_images(1))
    assert out.grid == grid and out.tokens.shape == (1, grid[0] * grid[1], dim) and out.pooled.shape == (1, dim)


def test_swin_tiny_non_square_384x128_grid():
    enc = build_image_encoder(ImageEncoderConfig(arch="swin_tiny", img_size=(384, 128)))
    with torch.no_grad():
        out = enc(_images(1, (384, 128)))
    assert out.grid == (12, 4) and out.tokens.shape == (1, 48, 768)


def test_image_encoder_refuses_other_image_sizes_and_unknown_archs():
    enc = build_image_encoder(ImageEncoderConfig(arch="vit_smoke", img_size=(128, 64)))
    with pytest.raises(ValueError, match=r"built for images of \(height, width\) \(128, 64\)"):
        enc(_images(1, (64, 128)))
    with pytest.raises(ValueError, match="unknown image architecture 'vit_huge'"):
        build_image_encoder(ImageEncoderConfig(arch="vit_huge"))
    assert {"vit_base_patch16", "resnet50", "swin_tiny", "vit_smoke", "resnet_smoke", "swin_smoke"} <= set(IMAGE_ARCHS)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_round_trip(tmp_path, suffix):
    src = build_image_encoder(ImageEncoderConfig(arch="vit_smoke"))
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = build_image_encoder(ImageEncoderConfig(arch="vit_smoke", pretrained=str(path)))
    assert _same_weights(src.model, loaded.model)
    assert loaded.pretrained_source == str(path)


def test_timm_checkpoint_with_classifier_and_wrapper_loads(tmp_path):
    src = build_image_encoder(ImageEncoderConfig(arch="resnet_smoke"))
    state = dict(src.model.state_dict(), **{"fc.weight": torch.zeros(10, 256), "fc.bias": torch.zeros(10)})
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    loaded = build_image_encoder(ImageEncoderConfig(arch="resnet_smoke", pretrained=str(tmp_path / "ckpt.pth")))
    assert _same_weights(src.model, loaded.model)


def test_vit_position_embeddings_are_resized(tmp_path):
    # A checkpoint trained at 64x64 (4x4 patches) loads into a 128x64 model (8x4 patches).
    src = build_image_encoder(ImageEncoderConfig(arch="vit_smoke", img_size=(64, 64)))
    with torch.no_grad():
        src.model.pos_embed[:, 0] = 3.0  # the [CLS] position
        src.model.pos_embed[:, 1:] = torch.linspace(-1, 1, src.out_dim)  # the same vector at every patch
    torch.save(src.model.state_dict(), tmp_path / "vit64.pth")
    cfg = ImageEncoderConfig(arch="vit_smoke", img_size=(128, 64), pretrained=str(tmp_path / "vit64.pth"))
    enc = build_image_encoder(cfg)
    pos = enc.model.pos_embed
    d = enc.out_dim
    assert tuple(pos.shape) == (1, 8 * 4 + 1, d)
    assert torch.equal(pos[0, 0], torch.full((d,), 3.0))  # [CLS] untouched
    assert torch.allclose(pos[0, 1:], torch.linspace(-1, 1, d).expand(32, d), atol=1e-5)  # constant stays
    assert torch.equal(enc.model.blocks[0].attn.qkv.weight, src.model.blocks[0].attn.qkv.weight)


def test_swin_state_dict_round_trip(tmp_path):
    src = build_image_encoder(ImageEncoderConfig(arch="swin_smoke"))
    torch.save(src.model.state_dict(), tmp_path / "swin.pth")
    loaded = build_image_encoder(ImageEncoderConfig(arch="swin_smoke", pretrained=str(tmp_path / "swin.pth")))
    assert _same_weights(src.model, loaded.model)


def test_swin_window_tables_are_resized_for_another_image_size(tmp_path):
    # At 256x128 every stage has a 4x4 window; at 128x64 the last stage's grid is 4x2, so its window is 4x2.
    src = build_image_encoder(ImageEncoderConfig(arch="swin_smoke", img_size=(256, 128)))
    torch.save(src.model.state_dict(), tmp_path / "swin256.pth")
    small = build_image_encoder(ImageEncoderConfig(arch="swin_smoke", pretrained=str(tmp_path / "swin256.pth")))
    table = "layers.3.blocks.0.attn.relative_position_bias_table"
    assert src.model.state_dict()[table].shape[0] == (2 * 4 - 1) * (2 * 4 - 1)
    assert small.model.state_dict()[table].shape[0] == (2 * 4 - 1) * (2 * 2 - 1)
    same = "layers.0.blocks.0.attn.relative_position_bias_table"  # window 4x4 at both sizes: unchanged
    assert torch.equal(small.model.state_dict()[same], src.model.state_dict()[same])
    with torch.no_grad():
        assert small(_images(1)).grid == (4, 2)
    # The other way round the 4x2 source window cannot be inferred from its table: a clear error.
    torch.save(small.model.state_dict(), tmp_path / "swin128.pth")
    with pytest.raises(ValueError, match=r"cannot adapt .*swin128.pth to swin_smoke at \(256, 128\)"):
        build_image_encoder(ImageEncoderConfig(arch="swin_smoke", img_size=(256, 128),
                                               pretrained=str(tmp_path / "swin128.pth")))


def test_image_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image.pretrained=.*nowhere.pth.*no such file"):
        build_image_encoder(ImageEncoderConfig(arch="vit_smoke", pretrained=str(tmp_path / "nowhere.pth")))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        build_image_encoder(ImageEncoderConfig(arch="vit_smoke", pretrained=str(tmp_path)))
    resnet = build_image_encoder(ImageEncoderConfig(arch="resnet_smoke"))
    torch.save(resnet.model.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet.pth do not fit VisionTransformer: 54 missing .*unexpected .*conv1"):
        build_image_encoder(ImageEncoderConfig(arch="vit_smoke", pretrained=str(tmp_path / "resnet.pth")))
    vit = build_image_encoder(ImageEncoderConfig(arch="vit_smoke"))
    state = vit.model.state_dict()
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"][:10]
    torch.save(state, tmp_path / "cut.pth")
    cut = rf"1 mis-shaped key\(s\): blocks.0.mlp.fc1.weight: checkpoint \(10, {vit.out_dim}\) vs model"
    with pytest.raises(ValueError, match=cut):
        build_image_encoder(ImageEncoderConfig(arch="vit_smoke", pretrained=str(tmp_path / "cut.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights from .*junk.pth"):
        build_image_encoder(ImageEncoderConfig(arch="vit_smoke", pretrained=str(tmp_path / "junk.pth")))


# ------------------------------------------------------------------------------------------------------
# Text


def _ids(n=3, length=12, vocab=50):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return ids, mask


@pytest.mark.parametrize("arch,dim", [("bert_smoke", 128), ("bigru", 1024), ("bigru_smoke", 128), ("bilstm", 1024),
                                      ("bilstm_smoke", 128)])
def test_text_encoder_shapes(arch, dim):
    enc = build_text_encoder(TextEncoderConfig(arch=arch, vocab_size=50))
    ids, mask = _ids()
    out = enc(ids, mask)
    assert enc.out_dim == dim and enc.vocab_size == 50 and enc.pretrained_source is None
    assert out.pooled.shape == (3, dim) and out.tokens.shape == (3, 12, dim) and torch.equal(out.mask, mask)


def test_bert_pooled_is_the_cls_token():
    enc = build_text_encoder(TextEncoderConfig(arch="bert_smoke", vocab_size=50)).eval()
    out = enc(*_ids())
    assert torch.equal(out.pooled, out.tokens[:, 0])


def test_bert_base_builds_with_the_configured_vocabulary():
    enc = build_text_encoder(TextEncoderConfig(arch="bert_base", vocab_size=300, max_length=100))
    assert enc.out_dim == 768 and enc.bert.config.num_hidden_layers == 12
    assert enc.bert.embeddings.word_embeddings.weight.shape == (300, 768)


@pytest.mark.parametrize("arch", ["bigru_smoke", "bilstm_smoke"])
def test_recurrent_encoder_ignores_padding(arch):
    enc = build_text_encoder(TextEncoderConfig(arch=arch, vocab_size=50)).eval()
    ids = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0]])
    a = enc(ids, torch.ones(1, 3, dtype=torch.long))
    b = enc(padded, torch.tensor([[1, 1, 1, 0, 0]]))
    assert torch.allclose(a.pooled, b.pooled, atol=1e-6)
    assert torch.allclose(a.tokens, b.tokens[:, :3], atol=1e-6) and torch.equal(b.tokens[:, 3:], torch.zeros(1, 2, 128))
    with pytest.raises(ValueError, match="no tokens"):
        enc(padded, torch.tensor([[1, 1, 1, 0, 0]]) * 0)


@pytest.mark.parametrize("arch,cell", [("bigru_smoke", torch.nn.GRU), ("bilstm_smoke", torch.nn.LSTM)])
def test_recurrent_encoder_cell_and_pooled_states(arch, cell):
    enc = build_text_encoder(TextEncoderConfig(arch=arch, vocab_size=50)).eval()
    assert sum(isinstance(m, torch.nn.RNNBase) for m in enc.modules()) == 1
    assert isinstance(getattr(enc, cell.__name__.lower()), cell)  # state-dict keys gru.* / lstm.*
    ids, mask = _ids()
    out = enc(ids, mask)
    half = enc.out_dim // 2
    last = mask.sum(1) - 1  # pooled = forward hidden state at the last real token, backward at the first
    assert torch.allclose(out.pooled[:, :half], out.tokens[torch.arange(3), last, :half], atol=1e-6)
    assert torch.allclose(out.pooled[:, half:], out.tokens[:, 0, half:], atol=1e-6)


def test_bigru_checkpoint_does_not_load_into_the_bilstm(tmp_path):
    torch.save(build_text_encoder(TextEncoderConfig(arch="bigru_smoke", vocab_size=40)).state_dict(), tmp_path / "g.pt")
    with pytest.raises(ValueError, match="gru.weight_ih_l0"):
        build_text_encoder(TextEncoderConfig(arch="bilstm_smoke", vocab_size=40, pretrained=str(tmp_path / "g.pt")))


def _save_small_bert(folder, vocab=77):
    from transformers import BertConfig, BertModel
    sizes = dict(TEXT_ARCHS["bert_smoke"].sizes)
    model = BertModel(BertConfig(vocab_size=vocab, **sizes), add_pooling_layer=True)
    model.save_pretrained(folder)
    return model


def test_bert_folder_round_trip(tmp_path):
    saved = _save_small_bert(tmp_path / "bert")
    enc = build_text_encoder(TextEncoderConfig(arch="bert_smoke", pretrained=str(tmp_path / "bert"), vocab_size=2000))
    assert enc.vocab_size == 77  # from the folder's config, not text.vocab_size
    assert enc.pretrained_source == str(tmp_path / "bert")
    ours = enc.bert.state_dict()
    theirs = {k: v for k, v in saved.state_dict().items() if not k.startswith("pooler.")}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bert_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text.pretrained=.*missing.*config.json"):
        build_text_encoder(TextEncoderConfig(arch="bert_smoke", pretrained=str(tmp_path / "missing")))
    _save_small_bert(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"does not fit text.arch='bert_base': hidden_size 128 \(expected 768\)"):
        build_text_encoder(TextEncoderConfig(arch="bert_base", pretrained=str(tmp_path / "bert")))
    weights = tmp_path / "bert" / "model.safetensors"
    state = load_file(str(weights))
    dropped = next(k for k in state if "layer.1.output.dense.weight" in k)
    del state[dropped]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"do not fit 'bert_smoke': missing .*layer.1.output.dense.weight"):
        build_text_encoder(TextEncoderConfig(arch="bert_smoke", pretrained=str(tmp_path / "bert")))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="folder without weights"):
        build_text_encoder(TextEncoderConfig(arch="bert_smoke", pretrained=str(tmp_path / "bert")))
    with pytest.raises(ValueError, match="unknown text architecture 'gpt'"):
        build_text_encoder(TextEncoderConfig(arch="gpt"))


def test_bert_folder_with_mis_shaped_weights(tmp_path):
    _save_small_bert(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("layer.0.intermediate.dense.weight"))
    state[key] = state[key][:100].contiguous()
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="weights in .* do not fit 'bert_smoke'"):
        build_text_encoder(TextEncoderConfig(arch="bert_smoke", pretrained=str(tmp_path / "bert")))


def test_bigru_state_dict_round_trip_and_mismatch(tmp_path):
    src = build_text_encoder(TextEncoderConfig(arch="bigru_smoke", vocab_size=40))
    torch.save(src.state_dict(), tmp_path / "gru.pt")
    cfg = TextEncoderConfig(arch="bigru_smoke", vocab_size=40, pretrained=str(tmp_path / "gru.pt"))
    loaded = build_text_encoder(cfg)
    assert _same_weights(src, loaded) and loaded.pretrained_source == str(tmp_path / "gru.pt")
    # the checkpoint's vocabulary decides the embedding size (as a BERT folder's config does)
    assert build_text_encoder(dataclasses.replace(cfg, vocab_size=41)).vocab_size == 40
    with pytest.raises(ValueError, match=r"mis-shaped key\(s\): embedding.weight: \w+ \(40, 128\) vs model \(40, 300"):
        build_text_encoder(dataclasses.replace(cfg, arch="bigru"))


def test_frozen_text_encoder_has_no_trainable_parameters_and_stays_in_eval():
    enc = build_text_encoder(TextEncoderConfig(arch="bert_smoke", vocab_size=50, freeze=True))
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())


def test_text_max_length_beyond_positions_is_refused(tmp_path):
    _save_small_bert(tmp_path / "bert")
    cfg = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 512
    with pytest.raises(ValueError, match="text.max_length=600 exceeds the 512 positions"):
        build_text_encoder(TextEncoderConfig(arch="bert_smoke", pretrained=str(tmp_path / "bert"), max_length=600))
