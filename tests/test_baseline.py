"""The baseline method: registry and presets, the batch contract, gradients, learning, shared layers."""
from __future__ import annotations

import math

import pytest
import torch

from tbps_lib.config import SMOKE_DEFAULTS, make_config, override
from tbps_lib.models.baseline import Baseline, BaselineConfig
from tbps_lib.models.layers import PooledProjection, masked_max_pool, masked_mean_pool
from tbps_lib.models.registry import build_model, list_methods
from tbps_lib.pretrain import RANDOM_INIT  # unit tests of untrained models

N_CLASSES = 4


def make_batch(n: int = 8, length: int = 10, vocab: int = 2000, seed: int = 0) -> dict:
    """A hand-made batch with the keys of ``tbps_lib.models.base``: 2 pairs per person."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # captions of different lengths, padded with 0
        mask[i, length - (i % 4):] = 0
    ids = ids * mask
    labels = torch.arange(n) // 2 % N_CLASSES
    return {"images": torch.randn(n, 3, *SMOKE_DEFAULTS["image.img_size"], generator=g), "input_ids": ids,
            "attention_mask": mask, "token_lengths": mask.sum(1) - 2, "word_lengths": mask.sum(1) - 2,
            "pids": labels + 100, "labels": labels,
            "image_index": torch.arange(n), "captions": [f"caption {i}" for i in range(n)]}


def smoke_model(**changes) -> Baseline:
    torch.manual_seed(0)
    return build_model(make_config("baseline", changes={**RANDOM_INIT, "model.num_classes": N_CLASSES, **changes}))


def test_registered_with_smoke_and_paper_presets():
    assert "baseline" in list_methods()
    smoke = make_config("baseline")
    for key, value in SMOKE_DEFAULTS.items():
        section, _, name = key.rpartition(".")
        node = getattr(smoke, section) if section else smoke
        assert getattr(node, name) == value, key
    paper = make_config("baseline", "paper", dataset="cuhk-pedes")
    assert (paper.image.arch, paper.image.img_size, paper.text.arch) == ("vit_base_patch16", (384, 128), "bert_base")
    assert (paper.embed_dim, paper.text.max_length, paper.data.batch_size) == (768, 100, 64)
    assert (paper.optim.optimizer, paper.optim.lr, paper.optim.epochs) == ("adam", 1e-3, 60)
    assert paper.image.pretrained is None and paper.text.pretrained is None
    assert paper.model.loss == "cmpm_cmpc" and paper.model.resolved_pool == "cls"


def test_default_config_builds_and_encodes_but_needs_num_classes_for_the_loss():
    cfg = make_config("baseline")
    assert (cfg.image.pretrained, cfg.text.pretrained) == ("workbook:resnet_smoke", "workbook:bigru_smoke")
    # random initialisation (one --set away) keeps this test free of pretraining and of its vocabulary
    model = build_model(override(cfg, {"image.pretrained": "none", "text.pretrained": "none"}))
    batch = make_batch(4)
    model.eval()
    with torch.no_grad():
        img, txt = model.encode_images(batch["images"]), model.encode_texts(batch)
    assert img["global"].shape == (4, 256) and txt["global"].shape == (4, 256)
    assert model.similarity(img, txt, chunk_size=3).shape == (4, 4)
    assert model.pretrained_sources() == {"image": None, "text": None}
    model.train()
    with pytest.raises(ValueError, match="model.num_classes is 0.*number of training identities"):
        model(batch)


@pytest.mark.parametrize("loss,terms", [("cmpm_cmpc", {"cmpm", "cmpc"}), ("id_ranking", {"id", "ranking"})])
def test_forward_returns_finite_terms_that_sum_to_loss(loss, terms):
    model = smoke_model(**{"model.loss": loss})
    out = model(make_batch())
    assert set(out) == terms | {"loss"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in terms), rel=1e-6)


def test_loss_weights_scale_the_total():
    model = smoke_model(**{"model.cmpm_weight": 2.0, "model.cmpc_weight": 0.5})
    model.eval()  # no dropout: the terms are comparable
    out = model(make_batch())
    assert out["loss"].item() == pytest.approx(2 * out["cmpm"].item() + 0.5 * out["cmpc"].item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["cmpm_cmpc", "id_ranking"])
def test_gradients_reach_both_encoders_and_the_classifier(loss):
    model = smoke_model(**{"model.loss": loss})
    model(make_batch())["loss"].backward()
    for name in ("image_encoder", "text_encoder", "image_proj", "text_proj", "classifier"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("loss", ["cmpm_cmpc", "id_ranking"])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(loss):
    model = smoke_model(**{"model.loss": loss})
    model.eval()  # deterministic forward (no dropout), parameters still train
    batch = make_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = model(batch)["loss"].item()
    for _ in range(8):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    assert model(batch)["loss"].item() < 0.7 * first


def test_id_ranking_max_pools_projected_tokens():
    model = smoke_model(**{"model.loss": "id_ranking"})
    model.eval()
    batch = make_batch(4)
    feats = model.text_encoder(batch["input_ids"], batch["attention_mask"])
    projected = model.text_proj.linear(feats.tokens)
    for i in range(4):  # by hand: max over the real tokens of caption i
        n = int(batch["attention_mask"][i].sum())
        expected = projected[i, :n].max(dim=0).values
        assert torch.allclose(model.encode_texts(batch)["global"][i], expected, atol=1e-6)


def test_labels_outside_the_classifier_are_refused():
    model = smoke_model()
    batch = make_batch()
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0] = -1
    with pytest.raises(ValueError, match=r"training labels in \[0, 4\).*from -1 to 3"):
        model(batch)
    batch["labels"][0] = 4
    with pytest.raises(ValueError, match=r"model.num_classes=4"):
        model(batch)


def test_config_errors_name_the_field():
    cfg = make_config("baseline")
    with pytest.raises(ValueError, match="model.loss must be one of"):
        override(cfg, {"model.loss": "triplet"})
    with pytest.raises(ValueError, match="model.pool must be"):
        override(cfg, {"model.pool": "attention"})
    with pytest.raises(ValueError, match="model.num_classes must be >= 0"):
        BaselineConfig(num_classes=-3)
    assert BaselineConfig(loss="id_ranking").resolved_pool == "max"
    assert BaselineConfig(loss="id_ranking", pool="cls").resolved_pool == "cls"


def test_batchnorm_head_option():
    model = smoke_model(**{"model.batchnorm": True})
    assert isinstance(model.image_proj.norm, torch.nn.BatchNorm1d)
    out = model(make_batch())
    assert torch.isfinite(out["loss"])


def test_losses_stay_float32_under_bf16_autocast():
    model = smoke_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


# ------------------------------------------------------------------------------------------------------
# Shared layers


def test_masked_pools_by_hand():
    tokens = torch.tensor([[[1.0, -5.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding
    assert torch.equal(masked_max_pool(tokens, mask), torch.tensor([[3.0, 2.0]]))
    assert torch.equal(masked_mean_pool(tokens, mask), torch.tensor([[2.0, -1.5]]))
    assert torch.equal(masked_max_pool(tokens), torch.tensor([[100.0, 100.0]]))
    with pytest.raises(ValueError, match="does not match tokens"):
        masked_max_pool(tokens, torch.ones(1, 2))


def test_pooled_projection_modes():
    head = PooledProjection(2, 1, pool="mean")
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 1.0]]))
        head.linear.bias.zero_()
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert head(torch.zeros(1, 2), tokens).item() == pytest.approx(5.0)  # mean of 3 and 7
    head.pool = "cls"
    assert head(torch.tensor([[0.5, 0.25]]), tokens).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown pool"):
        PooledProjection(2, 1, pool="gem")
    assert math.isfinite(head(torch.zeros(1, 2), tokens).item())
