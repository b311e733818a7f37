"""The Sew/MCM method: presets, loss terms against the loss functions, masking, the training-only decoder,
the Table 5 variants, data-derived margin bounds and the mapping of the paper's table rows to configs."""
from __future__ import annotations

import pytest
import torch

from tbps_lib.config import make_config, override
from tbps_lib.data.text import IGNORE_INDEX
from tbps_lib.engine.runs import resolve_config
from tbps_lib.losses import (adaptive_margin, cmpc_loss, cmpm_loss, masked_caption_loss, sew_id_loss,
                             sew_matching_loss)
from tbps_lib.models.registry import NotReproducible, build_model, list_methods, method_spec
from tbps_lib.models.sew_mcm import MCM_VARIANTS, SewMCM, SewMCMConfig, paper_rows
from tbps_lib.pretrain import RANDOM_INIT  # unit tests of untrained models
from test_baseline import N_CLASSES, make_batch
from test_trainer import write_toy_dataset

T_BOUNDS = {"model.t_min": 4.0, "model.t_max": 9.0}


def sew_model(**changes) -> SewMCM:
    torch.manual_seed(0)
    return build_model(make_config("sew_mcm", changes={**RANDOM_INIT, "model.num_classes": N_CLASSES, **T_BOUNDS, **changes}))


def test_registered_with_presets_and_paper_settings():
    assert list_methods().index("sew_mcm") == list_methods().index("baseline") + 1
    smoke = make_config("sew_mcm")
    assert (smoke.model.matching, smoke.model.margin, smoke.model.mcm) == ("sew", "adaptive", "full")
    assert smoke.model.batchnorm and smoke.model.pool == "max"
    paper = make_config("sew_mcm", "paper", dataset="cuhk-pedes")
    assert (paper.image.arch, paper.image.img_size, paper.text.arch) == ("vit_base_patch16", (224, 224), "bert_base")
    assert (paper.data.batch_size, paper.optim.epochs, paper.optim.optimizer, paper.optim.lr) == (64, 60, "adam", 1e-3)
    assert paper.data.flip and paper.model.pool == "cls" and paper.model.batchnorm
    m = paper.model
    assert (m.mask_ratio, m.alpha, m.margin_min, m.margin_max, m.sew_weight, m.mcm_weight) == (0.1, 32, 0.4, 0.6, 1, 1)
    assert (m.t_min, m.t_max) == (20, 60)
    assert (make_config("sew_mcm", "paper", "icfg-pedes").model.t_min, make_config("sew_mcm", "paper", "rstpreid")
            .model.t_max) == (25, 60)


def test_full_method_terms_are_the_loss_functions_of_its_features():
    model = sew_model()
    model.eval()  # BatchNorm on running statistics, so the features can be recomputed
    batch = make_batch()
    torch.manual_seed(1)
    out = model(batch)
    assert set(out) == {"match", "id", "mcm", "loss"}
    torch.manual_seed(1)  # the same masked positions
    masked = model.choose_masked(batch)
    img = model.image_encoder(batch["images"])
    txt = model.text_encoder(batch["input_ids"], batch["attention_mask"], masked, model.mask_embedding)
    image, text = model.image_proj(img.pooled, img.tokens), model.text_proj(txt.pooled, txt.tokens, txt.mask)
    margin = adaptive_margin(batch["word_lengths"], 4.0, 9.0, 0.4, 0.6)
    assert out["match"].item() == pytest.approx(sew_matching_loss(image, text, batch["pids"], margin, 32).item(), rel=1e-5)
    w = model.classifier.weight
    assert out["id"].item() == pytest.approx(sew_id_loss(image, text, batch["labels"], w, margin, 32).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["match"].item() + out["id"].item() + out["mcm"].item(), rel=1e-6)


def test_lambdas_weight_eq_12():
    model = sew_model(**{"model.sew_weight": 0.5, "model.mcm_weight": 3.0})
    model.eval()
    out = model(make_batch())
    assert out["loss"].item() == pytest.approx(0.5 * (out["match"] + out["id"]).item() + 3 * out["mcm"].item(), rel=1e-6)


def test_baseline_matching_uses_cmpm_and_cmpc():
    model = sew_model(**{"model.matching": "cmpm_cmpc", "model.mcm": "none"})
    model.eval()
    batch = make_batch()
    out = model(batch)
    assert set(out) == {"cmpm", "cmpc", "loss"}
    image, text = model.encode_images(batch["images"])["global"], model.encode_texts(batch)["global"]
    assert out["cmpm"].item() == pytest.approx(cmpm_loss(image, text, batch["pids"]).item(), rel=1e-5)
    assert out["cmpc"].item() == pytest.approx(
        cmpc_loss(image, text, batch["labels"], model.classifier.weight).item(), rel=1e-5)


def test_margins_fixed_and_adaptive_end_points():
    batch = make_batch()
    assert sew_model(**{"model.margin": "fixed"}).margins(batch) == 0.5
    assert sew_model(**{"model.margin": "fixed", "model.fixed_margin": 0.3}).margins(batch) == 0.3
    batch["word_lengths"] = torch.tensor([2, 4, 9, 20, 6, 6, 6, 6])  # below, T_min, T_max, above, inside
    got = sew_model().margins(batch)
    assert got[:4].tolist() == pytest.approx([0.4, 0.4, 0.6, 0.6])
    assert got[4].item() == pytest.approx(0.4 + 0.2 * (6 - 4) / (9 - 4))
    unresolved = build_model(make_config("sew_mcm", changes={**RANDOM_INIT, "model.num_classes": N_CLASSES}))
    with pytest.raises(ValueError, match="t_min/t_max are 0"):
        unresolved.margins(batch)


def test_masking_picks_content_tokens_only_and_ten_percent():
    model = sew_model()
    n, length = 6, 40
    ids = torch.randint(5, 2000, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[:, 32:] = 0  # 30 content tokens at 1..30, [SEP] at 31, padding after
    batch = {"input_ids": ids, "attention_mask": mask, "token_lengths": torch.full((n,), 30)}
    for seed in range(5):
        torch.manual_seed(seed)
        chosen = model.choose_masked(batch)
        assert chosen.sum(1).tolist() == [3] * n  # round(0.1 * 30)
        assert not chosen[:, 0].any() and not chosen[:, 31:].any()
    short = {**batch, "token_lengths": torch.full((n,), 2)}
    assert model.choose_masked(short).sum(1).tolist() == [1] * n  # at least one


def test_reconstruction_targets_are_the_original_ids_at_masked_positions():
    model = sew_model()
    batch = make_batch()
    masked = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    masked[0, 2] = masked[3, 1] = True
    decoded = torch.randn(*batch["input_ids"].shape, model.text_encoder.out_dim)
    got = model._reconstruction_loss(decoded, masked, batch["input_ids"])
    logits = model.vocab_head(decoded)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(logits[0, 2:3], batch["input_ids"][0, 2:3]) + ce(logits[3, 1:2], batch["input_ids"][3, 1:2])) / 8
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_masked_caption_loss_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]],
                                     [[0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    targets = torch.tensor([[0, 2], [1, IGNORE_INDEX]])
    # Eq. (11): per caption, the sum over its masked tokens; then the mean over the two captions
    expected = (-torch.log(torch.tensor(0.5)) - torch.log(torch.tensor(1 / 3)) - torch.log(torch.tensor(0.8))) / 2
    assert masked_caption_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="logits"):
        masked_caption_loss(logits[0], targets)


def test_gradients_reach_both_encoders_decoder_and_mask_embedding():
    model = sew_model()
    model(make_batch())["loss"].backward()
    for name in ("image_encoder", "text_encoder", "image_proj", "text_proj", "classifier", "decoder",
                 "image_to_decoder", "vocab_head"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert model.mask_embedding.grad is not None and model.mask_embedding.grad.abs().sum() > 0


def test_inference_ignores_the_decoder_and_the_mask_embedding():
    model = sew_model()
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        before = (model.encode_images(batch["images"]), model.encode_texts(batch))
        sim_before = model.similarity(*before)
        for module in (model.decoder, model.image_to_decoder, model.vocab_head):
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        model.mask_embedding.add_(1.0)
        after = (model.encode_images(batch["images"]), model.encode_texts(batch))
    assert torch.equal(before[0]["global"], after[0]["global"]) and torch.equal(before[1]["global"], after[1]["global"])
    assert torch.equal(sim_before, model.similarity(*after))
    # ... while the training loss does depend on them
    model.train()
    torch.manual_seed(0)
    assert torch.isfinite(model(batch)["mcm"])


@pytest.mark.parametrize("variant,terms,modules", [
    ("none", {"match", "id"}, set()),
    ("mask_only", {"match", "id"}, {"mask_embedding"}),
    ("attention_only", {"match", "id", "mcm"}, {"decoder", "image_to_decoder", "decoder_cls_proj"}),
    ("no_cross", {"match", "id", "mcm"}, {"mask_embedding", "decoder", "vocab_head"}),
    ("full", {"match", "id", "mcm"}, {"mask_embedding", "decoder", "image_to_decoder", "vocab_head"}),
])
def test_table5_variants(variant, terms, modules):
    model = sew_model(**{"model.mcm": variant})
    present = {name for name in ("mask_embedding", "decoder", "image_to_decoder", "vocab_head", "decoder_cls_proj")
               if getattr(model, name) is not None}
    assert present == modules
    if model.decoder is not None:
        assert (model.decoder.cross_attn is None) == (variant == "no_cross")
    out = model(make_batch())
    assert set(out) == terms | {"loss"} and all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_encoder.parameters())


def test_mask_only_changes_the_text_features_in_training():
    model = sew_model(**{"model.mcm": "mask_only", "model.mask_ratio": 0.5})
    model.eval()
    batch = make_batch()
    torch.manual_seed(0)
    masked = model.choose_masked(batch)
    plain = model.text_encoder(batch["input_ids"], batch["attention_mask"]).tokens
    replaced = model.text_encoder(batch["input_ids"], batch["attention_mask"], masked, model.mask_embedding).tokens
    assert not torch.allclose(plain, replaced)


def test_decoder_attention_maps():
    model = sew_model()
    batch = make_batch(4)
    weights, grid = model.decoder_attention(batch["images"], batch)
    assert weights.shape == (4, batch["input_ids"].shape[1], grid[0] * grid[1]) and grid == (8, 4)
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:2]), atol=1e-5)
    with pytest.raises(ValueError, match="no cross-attention"):
        sew_model(**{"model.mcm": "no_cross"}).decoder_attention(batch["images"], batch)


def test_t_bounds_resolved_from_the_training_captions(tmp_path):
    data = write_toy_dataset(tmp_path / "toy")
    cfg = make_config("sew_mcm", dataset=str(data))
    from tbps_lib.data.loaders import prepare_dataset

    ds = prepare_dataset(cfg)
    assert ds.name == "cuhk-pedes"  # a folder in the CUHK-PEDES layout is read as CUHK-PEDES: the paper's bounds
    m = resolve_config(cfg, ds).model
    assert (m.t_min, m.t_max, m.t_source) == (20.0, 60.0, "Sew paper values for cuhk-pedes")
    ds.name = "my-data"  # any other dataset: percentiles of its training captions' word counts
    m = resolve_config(cfg, ds).model
    # toy captions have 9 and 8 words ("a person in a red shirt and blue trousers", "someone wearing ...")
    assert (m.t_min, m.t_max) == (8.0, 9.0) and "percentiles of training caption lengths" in m.t_source
    assert m.num_classes == 30
    fixed = override(cfg, {"model.t_min": 3, "model.t_max": 30})
    assert resolve_config(fixed, prepare_dataset(fixed)).model.t_min == 3


def test_config_errors():
    with pytest.raises(ValueError, match="model.mcm must be one of"):
        SewMCMConfig(mcm="decoder")
    with pytest.raises(ValueError, match="model.matching must be one of"):
        SewMCMConfig(matching="triplet")
    with pytest.raises(ValueError, match="t_min < t_max"):
        SewMCMConfig(t_min=30, t_max=20)
    with pytest.raises(ValueError, match="mask_ratio"):
        SewMCMConfig(mask_ratio=0)


def test_paper_rows_map_table_flags_to_configs():
    assert method_spec("sew_mcm").paper_rows is paper_rows
    assert paper_rows({"image_encoder": "vit_b16", "sew_margin": "none", "mcm": "0"}, "smoke") == {
        "model.matching": "cmpm_cmpc", "model.mcm": "none"}
    assert paper_rows({"sew_margin": "fixed", "mcm": "0"}, "smoke") == {
        "model.matching": "sew", "model.margin": "fixed", "model.mcm": "none"}
    assert paper_rows({"sew_margin": "adaptive", "mcm": "1"}, "smoke")["model.mcm"] == "full"
    table5 = {"sew_margin": "none", "mcm_mask": "0", "mcm_attention": "1", "mcm_modeling": "0"}
    assert paper_rows(table5, "smoke")["model.mcm"] == "attention_only"
    assert paper_rows({**table5, "mcm_mask": "1", "mcm_attention": "0", "mcm_modeling": "1"}, "smoke")[
        "model.mcm"] == "no_cross"
    assert paper_rows({"image_encoder": "resnet50", "sew_margin": "none", "mcm": "0"}, "paper")["image.arch"] == "resnet50"
    with pytest.raises(NotReproducible, match="needs the paper preset"):
        paper_rows({"image_encoder": "resnet50", "sew_margin": "none", "mcm": "0"}, "smoke")
    for variant in MCM_VARIANTS:  # every variant is reachable from some row
        assert variant in {paper_rows(f, "smoke")["model.mcm"] for f in (
            {"mcm": "0"}, {"mcm": "1"}, {"mcm_mask": "1"}, {"mcm_mask": "0", "mcm_attention": "1"},
            {"mcm_mask": "1", "mcm_modeling": "1"})}


# ----------------------------------------------------------------------------------------------------
# Eq. (5)-(6): the positive set with two captions per image


def test_the_other_caption_of_the_same_image_is_not_a_positive_by_hand():
    """Two pairs of one person showing the same image I = e1, captions e1 and e2; alpha 2, M 0.5.

    Literal P(i) (every other pair of the person): sim = [[1, 0], [1, 0]], no negatives (push 0);
    I2T pulls log(1 + e^{2(0 - 1 + .5)}) and log(1 + e^{2(1 - 0 + .5)}), T2I (sim^T = [[1, 1], [0, 0]])
    pulls log(1 + e^{2(.5)}) twice; the loss is their sum over 2 anchors. Positives of another image only:
    both P(i) are empty, so the loss is 0 (the two captions are both perfect pairs of I, Eq. (1)).
    """
    import math

    from tbps_lib.losses.sew import sew_pair_masks

    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pids, same_image = torch.tensor([7, 7]), torch.tensor([3, 3])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    literal = (sp(2 * -0.5) + sp(2 * 1.5) + 2 * sp(2 * 0.5)) / 2
    assert sew_matching_loss(image, text, pids, 0.5, alpha=2.0).item() == pytest.approx(literal, rel=1e-6)
    assert sew_matching_loss(image, text, pids, 0.5, alpha=2.0, image_index=same_image).item() == 0.0
    # a third pair of the person showing another image stays a positive of both
    positive, negative = sew_pair_masks(torch.tensor([7, 7, 7, 9]), torch.tensor([3, 3, 4, 5]))
    assert positive.int().tolist() == [[0, 0, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert negative[:3, 3].all() and not negative[:3, :3].any()


def test_model_uses_the_image_index_unless_configured_literally():
    batch = make_batch()
    batch["image_index"] = torch.arange(8) // 2  # each person's two pairs show one image
    out = {}
    for literal in (False, True):
        model = sew_model(**{"model.same_image_positives": literal, "model.mcm": "none"})
        model.eval()
        out[literal] = model(batch)["match"].item()
    assert out[False] == pytest.approx(0.0)  # no pair has a positive of another image: Eq. (5)-(6) are empty
    assert out[True] > 0.0


def test_sew_positive_census_counts_same_image_positives():
    from tbps_lib.losses.sew import sew_positive_census

    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    pids, index = torch.tensor([1, 1, 1, 2, 2, 3]), torch.tensor([0, 0, 1, 2, 3, 4])
    got = sew_positive_census(image, text, pids, index, 0.5, alpha=32.0)
    # literal positive pairs: person 1: 6 ordered pairs, 2 of them (0,1), (1,0) same image; person 2: 2
    assert got["same-image share"] == pytest.approx(2 / 8)
    assert got["anchors with only same-image positives"] == 0.0 and got["anchors"] == 6
    assert got["pull (literal)"] >= got["pull (other images)"] >= 0.0
