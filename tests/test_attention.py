"""Heatmaps: gradient maps, word maps, decoder and bidirectional attention, overlays, the pointing game."""
from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from torch import Tensor, nn

matplotlib.use("Agg")

from tbps_lib.analysis.attention import (AttentionExample, ImageTokenCapture, bidirectional_attention,
                                         caption_maps, cell_centre_share, cross_attention_maps, gradient_map,
                                         image_token_layer, overlay, peak_point, plot_attention_examples,
                                         plot_query_maps, point_scores, pointing_game, pointing_summary,
                                         pointing_targets, text_batch, upsample_map, without_span, word_maps)
from tbps_lib.config import make_config
from tbps_lib.data.text import CaptionTokenizer
from tbps_lib.models.base import RetrievalModel
from tbps_lib.models.encoders import ImageFeatures, TextFeatures
from tbps_lib.models.registry import build_model
from tbps_lib.pretrain import RANDOM_INIT  # unit tests of untrained models

CAPTIONS = ["a man in a red shirt with a blue bag", "a woman wears green shoes and a red bag",
            "the person has black hair and a blue shirt"] * 3


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=120, max_length=16)


# ------------------------------------------------------------------------------------------------------
# A model whose maps are known: image tokens are the mean colour of 16x16 cells, a caption's embedding is
# the sum of its words' colour vectors ("red" = R, "green" = G, "blue" = B, other words 0), the image
# embedding is the per-channel max over cells, and the score is the dot product.


class CellColours(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(16)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: Tensor) -> ImageFeatures:
        fmap = self.pool(images) * self.scale  # [B, 3, h, w]
        tokens = fmap.flatten(2).transpose(1, 2)
        return ImageFeatures(tokens.mean(dim=1), tokens, (fmap.shape[2], fmap.shape[3]))


class WordColours(nn.Module):
    def __init__(self, tokenizer: CaptionTokenizer) -> None:
        super().__init__()
        table = torch.zeros(tokenizer.vocab_size, 3)
        for channel, word in enumerate(("red", "green", "blue")):
            pieces = tokenizer.tokenize(word)
            assert pieces == [word], pieces  # one token per colour word
            table[int(tokenizer([word])["input_ids"][0, 1]), channel] = 1.0  # the token after [CLS]
        self.embedding = nn.Embedding.from_pretrained(table, freeze=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        tokens = self.embedding(input_ids) * attention_mask[..., None]
        return TextFeatures(tokens.sum(dim=1), tokens, attention_mask)


class ColourModel(RetrievalModel):
    def __init__(self, tokenizer: CaptionTokenizer) -> None:
        super().__init__(cfg=None)
        self.image_encoder = CellColours()
        self.text_encoder = WordColours(tokenizer)

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        return {"global": self.image_encoder(images).tokens.amax(dim=1)}

    def encode_texts(self, batch: dict) -> dict[str, Tensor]:
        return {"global": self.text_encoder(batch["input_ids"], batch["attention_mask"]).pooled}

    def pair_scores(self, image_feats: dict, text_feats: dict) -> Tensor:
        return text_feats["global"] @ image_feats["global"].T


def coloured_image(cells: dict[tuple[int, int], int], grid: tuple[int, int] = (4, 2)) -> Tensor:
    """[3, 16h, 16w] zeros, with channel c = 1 in each given cell (row, col) -> c."""
    img = torch.zeros(3, 16 * grid[0], 16 * grid[1])
    for (r, c), ch in cells.items():
        img[ch, 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)] = 1.0
    return img


def test_word_maps_point_at_the_word_colour(tokenizer):
    model = ColourModel(tokenizer)
    image = coloured_image({(0, 1): 0, (3, 0): 2})  # red top right, blue bottom left
    caption = "a man in a red shirt with a blue bag"
    words = caption.split()
    spans = [(words.index(w), words.index(w) + 1) for w in ("red", "blue", "shirt")]
    whole, per_word = word_maps(model, image, caption, spans, tokenizer)
    assert per_word.grid == (4, 2) and per_word.maps.shape == (3, 4, 2)
    torch.testing.assert_close(per_word.scores, torch.tensor([1.0, 1.0, 0.0]))
    assert whole.scores.item() == pytest.approx(2.0)
    red, blue, shirt = per_word.maps
    assert red[0, 1] == 1.0 and red.sum() == 1.0
    assert blue[3, 0] == 1.0 and blue.sum() == 1.0
    assert shirt.abs().sum() == 0.0  # "shirt" adds nothing to this model's score
    assert whole.maps[0, 0, 1] == 1.0 and whole.maps[0, 3, 0] == 1.0  # the caption map shows both
    assert model.training  # maps are computed in eval mode, and the training mode is restored


def test_caption_maps_batch_equals_single_pairs(tokenizer):
    model = ColourModel(tokenizer)
    images = torch.stack([coloured_image({(1, 0): 0}), coloured_image({(2, 1): 1})])
    captions = ["a red bag", "green shoes"]
    batch = caption_maps(model, images, captions, tokenizer)
    for i in range(2):
        single = caption_maps(model, images[i:i + 1], captions[i:i + 1], tokenizer)
        torch.testing.assert_close(batch.maps[i], single.maps[0])
    assert batch.maps[0, 1, 0] == 1.0 and batch.maps[1, 2, 1] == 1.0
    with pytest.raises(ValueError, match="pairs"):
        caption_maps(model, images, captions[:1], tokenizer)


def test_without_span_and_text_batch(tokenizer):
    assert without_span("A red bag, blue shoes.", (1, 3)) == "a , blue shoes ."
    with pytest.raises(ValueError, match="outside"):
        without_span("a red bag", (2, 5))
    batch = text_batch(["a red bag"], tokenizer, torch.device("cpu"))
    assert batch["input_ids"].shape == (1, 16) and batch["captions"] == ["a red bag"]


# ------------------------------------------------------------------------------------------------------
# Real encoders with random weights: every method's maps come from hooks, whatever the backbone.


@pytest.mark.parametrize("arch,pool", [("resnet_smoke", "max"), ("vit_smoke", "cls"), ("swin_smoke", "cls")])
def test_maps_for_random_smoke_models(tokenizer, arch, pool):
    torch.manual_seed(0)
    cfg = make_config("baseline", "smoke", changes={**RANDOM_INIT, "image.arch": arch, "model.pool": pool,
                                                    "text.max_length": 16})
    model = build_model(cfg)
    model.train()
    images = torch.randn(2, 3, *cfg.image.img_size)
    result = caption_maps(model, images, CAPTIONS[:2], tokenizer)
    h, w = result.grid
    assert result.maps.shape == (2, h, w) and (result.maps >= 0).all()
    assert result.maps.flatten(1).amax(dim=1).gt(0).all()  # the gradient reaches the tokens
    assert model.training  # the mode is restored
    with torch.no_grad():
        model.eval()
        expected = model.similarity(model.encode_images(images),
                                    model.encode_texts(text_batch(CAPTIONS[:2], tokenizer, torch.device("cpu"))))
    torch.testing.assert_close(result.scores, expected.diagonal())
    whole, words = word_maps(model, images[0], CAPTIONS[0], [(4, 5), (8, 10)], tokenizer)
    assert words.maps.shape == (2, h, w)
    torch.testing.assert_close(whole.maps[0], result.maps[0], rtol=1e-4, atol=1e-6)


def test_vit_cls_needs_the_last_block_input(tokenizer):
    cfg = make_config("baseline", "smoke", changes={**RANDOM_INIT, "image.arch": "vit_smoke", "model.pool": "cls",
                                                    "text.max_length": 16})
    model = build_model(cfg)
    assert image_token_layer(model) is model.image_encoder.model.blocks[-1].norm1
    images = torch.randn(1, 3, *cfg.image.img_size)
    with pytest.raises(ValueError, match="does not depend"):
        caption_maps(model, images, CAPTIONS[:1], tokenizer, layer=model.image_encoder)
    with ImageTokenCapture(model) as cap:
        model.encode_images(images)
    h, w = cfg.image.img_size[0] // 16, cfg.image.img_size[1] // 16  # patch 16
    assert cap.output.shape[1] == 1 + h * w
    assert cap.grid == (h, w) and cap.grid_tokens(cap.output).shape == (1, h * w, 128)  # [CLS] dropped


def test_rooted_vit_graph_gives_the_full_graph_gradient(tokenizer):
    """The ViT map roots the graph at the last block's input; it must equal the map from a full graph."""
    torch.manual_seed(1)
    cfg = make_config("baseline", "smoke", changes={**RANDOM_INIT, "image.arch": "vit_smoke", "model.pool": "cls",
                                                    "text.max_length": 16})
    model = build_model(cfg).eval()
    images = torch.randn(1, 3, *cfg.image.img_size)
    layer = image_token_layer(model)
    kept = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.__setitem__("tokens", out))
    with torch.enable_grad():
        batch = text_batch(CAPTIONS[:1], tokenizer, torch.device("cpu"))
        score = model.pair_scores(model.encode_images(images), model.encode_texts(batch))[0, 0]
        grads, = torch.autograd.grad(score, kept["tokens"])
    handle.remove()
    h, w = cfg.image.img_size[0] // 16, cfg.image.img_size[1] // 16
    expected = torch.relu((grads * kept["tokens"]).sum(-1))[:, 1:].reshape(1, h, w)
    with torch.no_grad():  # the maps switch autograd on where they need it, and the mode is restored
        result = caption_maps(model, images, CAPTIONS[:1], tokenizer)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(result.maps, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.scores[0], score.detach())
    assert not images.requires_grad  # the caller's tensor is untouched


# ------------------------------------------------------------------------------------------------------
# Pure functions


def test_gradient_map_known_answer():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, -1.0]]])  # 4 tokens, 2 channels
    grads = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]]])
    hires = gradient_map(tokens, grads, (2, 2), "hirescam")
    torch.testing.assert_close(hires, torch.tensor([[[1.0, 2.0], [0.0, 0.0]]]))
    # Grad-CAM: alpha = (0, 0.25); map = relu(0.25 * channel 1).
    cam = gradient_map(tokens, grads, (2, 2), "gradcam")
    torch.testing.assert_close(cam, torch.tensor([[[0.0, 0.5], [0.25, 0.0]]]))
    with pytest.raises(ValueError, match="weighting"):
        gradient_map(tokens, grads, (2, 2), "other")


def test_cross_attention_maps_drop_prefix_and_average_heads():
    w = torch.arange(2 * 3 * 7, dtype=torch.float32).reshape(2, 3, 7)  # heads, queries, 1 prefix + 3x2 grid
    maps = cross_attention_maps(w, (3, 2), head_dim=0)
    assert maps.shape == (3, 3, 2)
    mean = w.mean(dim=0)
    torch.testing.assert_close(maps[1, 2, 0], mean[1, 1 + 4])  # row-major: cell (2, 0) is key 1 + 4
    with pytest.raises(ValueError, match="cannot cover"):
        cross_attention_maps(torch.ones(1, 5), (3, 2))


def test_bidirectional_attention_eq_4_to_7():
    attn = torch.tensor([[[0.5, 0.3, 0.2]], [[0.1, 0.3, 0.6]]])  # 2 heads, 1 query, 3 keys
    grad = torch.tensor([[[1.0, -1.0, 2.0]], [[3.0, -1.0, -4.0]]])
    out = bidirectional_attention(attn, grad)
    forward = torch.tensor([0.3, 0.3, 0.4])
    backward = torch.tensor([2.0, 0.0, 0.0])  # head means 2, -1, -1 -> positive part
    expected = forward * backward / (forward * backward).sum()
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(bidirectional_attention(attn, forward_only=True)[0], forward)
    zero = bidirectional_attention(attn, -grad.abs())
    assert zero.abs().sum() == 0.0  # no positive gradient: the row stays zero
    with pytest.raises(ValueError, match="gradient"):
        bidirectional_attention(attn)
    batched = bidirectional_attention(torch.rand(4, 2, 3, 5), torch.randn(4, 2, 3, 5))
    assert batched.shape == (4, 3, 5)
    sums = batched.sum(dim=-1)
    assert torch.all((sums - 1).abs().lt(1e-5) | sums.eq(0))


def test_upsample_and_overlay():
    m = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    up = upsample_map(m, (8, 4))
    assert up.shape == (8, 4) and up.argmax() == 3  # first row, last column: the hot cell's side
    assert upsample_map(m[None].repeat(3, 1, 1), (8, 4)).shape == (3, 8, 4)
    image = torch.randint(0, 256, (3, 8, 4), dtype=torch.uint8)
    blended = overlay(image, m, alpha=0.0)
    np.testing.assert_allclose(blended, image.permute(1, 2, 0).numpy() / 255.0)
    assert overlay(image.permute(1, 2, 0).numpy(), m).shape == (8, 4, 3)


def test_peak_point_and_chance_levels():
    m = torch.zeros(4, 2)
    m[2, 1] = 3.0
    row, col = peak_point(m, (128, 64))
    assert (int(row), int(col)) == (80, 48)  # centre of cell (2, 1): 2.5 * 32, 1.5 * 32
    part = torch.zeros(128, 64, dtype=torch.bool)
    part[64:96, 32:64] = True  # exactly cell (2, 1)
    scores = point_scores(m, part)
    assert scores["hit"] == 1.0 and scores["empty"] == 0.0
    assert scores["chance_area"] == pytest.approx(1 / 8) and scores["chance_grid"] == pytest.approx(1 / 8)
    assert 0.5 < scores["energy"] <= 1.0
    assert point_scores(torch.zeros(4, 2), part)["empty"] == 1.0
    assert cell_centre_share(part[:, :40], (4, 2)) == 0.0  # the strip holds no cell centre


def test_pointing_targets_only_visible_slot_words():
    meta = {"visible": ["gender", "upper", "bag"]}
    targets = pointing_targets("A man in a red shirt, blue jeans and a black backpack.", meta)
    assert targets == [(5, "shirt", "upper"), (12, "backpack", "bag")]  # jeans: lower is not visible


# ------------------------------------------------------------------------------------------------------
# The pointing game and the figures on a tiny synthetic benchmark


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    from tbps_lib.data import synthetic
    from tbps_lib.data.formats import read_synthetic

    root = synthetic.generate("cuhk-like", tmp_path_factory.mktemp("syn") / "set", ids=12, progress=False,
                              workers=1)
    return read_synthetic(root)


def test_pointing_game_on_synthetic(tiny_synthetic):
    from tbps_lib.data.loaders import train_captions
    from tbps_lib.data.synthetic import load_mask

    tok = CaptionTokenizer.train(train_captions(tiny_synthetic), vocab_size=300, max_length=40)
    cfg = make_config("baseline", "smoke", changes={"text.max_length": 40})
    torch.manual_seed(0)
    model = build_model(cfg)
    table = pointing_game(model, tok, tiny_synthetic, cfg.image.img_size, split="test", n_captions=4, seed=1)
    assert set(table["slot"]) <= {"hair", "headwear", "eyewear", "upper", "lower", "shoes", "bag", "held"}
    for col in ("hit", "energy", "chance_area", "chance_grid", "caption_hit", "caption_energy"):
        assert table[col].between(0, 1).all(), col
    first = table.iloc[0]
    record = next(r for r in tiny_synthetic.split("test") if r.image == first["record"])
    from tbps_lib.analysis.attention import part_mask

    share = part_mask(load_mask(tiny_synthetic.root, record.meta), first["slot"], first["word"]).mean()
    assert first["chance_area"] == pytest.approx(share)
    again = pointing_game(model, tok, tiny_synthetic, cfg.image.img_size, split="test", n_captions=4, seed=1)
    assert table.equals(again)
    summary = pointing_summary(table.assign(method="m"))
    assert ("m", "all") in summary.index and summary.loc[("m", "all"), "n"] == len(table)
    assert summary["hit_%"].between(0, 100).all()


def test_figures_draw(tiny_synthetic):
    image = torch.randint(0, 256, (3, 128, 64), dtype=torch.uint8)
    ex = AttentionExample(image, "a red shirt", [(1, "red"), (2, "shirt")],
                          {"a": torch.rand(4, 2), "b": torch.rand(4, 2)},
                          {"a": torch.rand(2, 4, 2), "b": torch.rand(2, 4, 2)})
    fig = plot_attention_examples([ex, ex])
    assert len([ax for ax in fig.axes if ax.images]) == 2 * (1 + 2 + 4)
    fig = plot_query_maps(image, torch.rand(3, 4, 2), ["q0", "q1", "q2"], title="t")
    assert len(fig.axes) == 4
