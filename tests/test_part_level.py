"""The part-level method (Park et al.): commonality and CMR loss by hand, stripes, foreground features,
Eq. (14) scoring, the loss terms of Eq. (13), gradients, training-only modules, every ablation variant,
config errors and the mapping of the paper's table rows to configs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tbps_lib.config import make_config
from tbps_lib.losses import cmr_loss, commonality, hardest_negative_ranking_loss, id_loss
from tbps_lib.losses.part_level import ranking_loss
from tbps_lib.models.base import TrainingContext
from tbps_lib.models.part_level import (SMOKE_ALL_NEGATIVES_EPOCHS, PartLevel, PartLevelConfig, horizontal_stripes,
                                        paper_rows)
from tbps_lib.models.registry import NotReproducible, build_model, list_methods, method_spec
from tbps_lib.pretrain import RANDOM_INIT  # unit tests of untrained models
from test_baseline import N_CLASSES, make_batch

TINY = {"embed_dim": 64}  # 1 head of 64 channels: fast


def part_model(**changes) -> PartLevel:
    torch.manual_seed(0)
    return build_model(make_config("part_level", changes={**RANDOM_INIT, **TINY, "model.num_classes": N_CLASSES,
                                                          **changes}))


def test_registered_with_presets_and_paper_settings():
    assert list_methods().index("part_level") == list_methods().index("sew_mcm") + 1
    smoke = make_config("part_level")
    assert smoke.embed_dim == 128 and smoke.image.arch == "resnet_smoke"  # d = resnet_smoke's width
    m = smoke.model
    assert (m.coarse, m.fine, m.cmr, m.cmr_coarse, m.decoder, m.n_coarse, m.n_fine) == (
        True, True, True, False, "shared", 4, 4)
    assert m.margin == 0.2 and m.detach_commonality and m.foreground == "literal"
    assert m.all_negatives_epochs == SMOKE_ALL_NEGATIVES_EPOCHS > 0  # the smoke warm-up (module docstring)
    paper = make_config("part_level", "paper", dataset="cuhk-pedes")
    assert paper.model.all_negatives_epochs == 0  # Eq. (9)/(12) with the hardest negative from the start
    assert (paper.image.arch, paper.image.img_size, paper.text.arch, paper.text.freeze) == (
        "vit_base_patch16", (384, 128), "bert_base", True)
    o = paper.optim
    assert (paper.data.batch_size, o.optimizer, o.lr, o.schedule, o.milestones, o.gamma, o.epochs,
            o.backbone_lr_factor, o.warmup_epochs) == (32, "adam", 5e-4, "multistep", (20, 40, 50, 55), 0.1, 60,
                                                       0.1, 0.0)
    assert paper.data.flip and paper.embed_dim == 768


# ----------------------------------------------------------------------------------------------------
# Eq. (11)-(12) by hand


def test_commonality_by_hand():
    # p = (1/2, 1/4, 1/4): entropy 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2, divided by ln 3
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1.0, 1.0]]))
    got = commonality(logits)
    assert got[0].item() == pytest.approx(1.5 * math.log(2) / math.log(3), rel=1e-6)
    assert got[1].item() == pytest.approx(1.0, rel=1e-6)  # uniform: shared by every identity
    assert commonality(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)  # certain
    with pytest.raises(ValueError, match="c >= 2"):
        commonality(torch.zeros(3, 1))


def test_cmr_loss_by_hand():
    """v = (1, 0), (0, 1); t = (1, 0), (0.6, 0.8); two people. s(v_k, t_j) = [[1, .6], [0, .8]].

    alpha 1, C(v) = (.2, 0), C(t) = (.5, 1): image-anchored terms [.8 - 1 + .6]_+ = .4 and [1 - .8 + 0]_+ = .2;
    text-anchored [.5 - 1 + 0]_+ = 0 and [0 - .8 + .6]_+ = 0; sum .6, mean .3. With C = 0 the CMR loss is
    Eq. (9): .6 + .2 + 0 + .8 = 1.6.
    """
    v, t, pids = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.tensor([1, 2])
    cv, ct = torch.tensor([0.2, 0.0]), torch.tensor([0.5, 1.0])
    assert cmr_loss(v, t, pids, cv, ct, margin=1.0).item() == pytest.approx(0.6, rel=1e-6)
    assert cmr_loss(v, t, pids, cv, ct, margin=1.0, reduction="mean").item() == pytest.approx(0.3, rel=1e-6)
    zero = torch.zeros(2)
    assert cmr_loss(v, t, pids, zero, zero, margin=1.0).item() == pytest.approx(1.6, rel=1e-6)
    assert hardest_negative_ranking_loss(v, t, pids, margin=1.0).item() == pytest.approx(1.6, rel=1e-6)
    # one person only: no negatives, no loss
    assert cmr_loss(v, t, torch.tensor([3, 3]), zero, zero, margin=1.0).item() == 0.0
    with pytest.raises(ValueError, match="one commonality per pair"):
        cmr_loss(v, t, pids, torch.zeros(3), ct)


def test_all_negatives_ranking_by_hand():
    """The warm-up's sum over every negative (VSE0). v = e1, e2, e3; t = e1, (.6, .8, 0), (.6, 0, .8); three
    people: s(v_k, t_j) = [[1, .6, .6], [0, .8, 0], [0, 0, .8]], alpha .5.

    Image-anchored: v_0 [.5 - 1 + .6]_+ twice = .2, v_1 and v_2 0. Text-anchored: t_1 vs v_0 [.5 - .8 + .6]_+ = .3,
    t_2 vs v_0 .3, t_0 0: all negatives .8 (hardest only: .1 + .6 = .7). People (0, 0, 1): v_0 and t_1 are no
    negatives of each other: .1 (v_0 vs t_2) + .3 (t_2 vs v_0) = .4. CMR margins alpha (1 - C) with
    C(v) = (.5, 0, 0), C(t) = (0, 0, .5): v_0 [.25 - 1 + .6]_+ = 0, t_1 .3, t_2 [.25 - .8 + .6]_+ = .05: .35.
    """
    v = torch.eye(3)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.6, 0.0, 0.8]])
    pids = torch.tensor([0, 1, 2])
    assert ranking_loss(v, t, pids, 0.5, negatives="all").item() == pytest.approx(0.8, rel=1e-6)
    assert ranking_loss(v, t, pids, 0.5, "mean", negatives="all").item() == pytest.approx(0.8 / 3, rel=1e-6)
    assert ranking_loss(v, t, pids, 0.5).item() == pytest.approx(0.7, rel=1e-6)
    assert hardest_negative_ranking_loss(v, t, pids, 0.5).item() == pytest.approx(0.7, rel=1e-6)
    assert ranking_loss(v, t, torch.tensor([0, 0, 1]), 0.5, negatives="all").item() == pytest.approx(0.4, rel=1e-6)
    cv, ct = torch.tensor([0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.5])
    assert cmr_loss(v, t, pids, cv, ct, 0.5, negatives="all").item() == pytest.approx(0.35, rel=1e-6)
    with pytest.raises(ValueError, match="negatives must be one of"):
        ranking_loss(v, t, pids, negatives="semi")


def test_all_negatives_warm_up_switches_to_the_hardest_negative():
    """``model.all_negatives_epochs=0.5``: the first half epoch sums every negative, then Eq. (9)/(12)."""
    model = part_model(**{"model.all_negatives_epochs": 0.5})
    model.train()
    batch = make_batch()
    torch.manual_seed(1)
    with torch.no_grad():  # dropout-free model: the embeddings of one batch are deterministic
        img, txt = model.image_embeddings(batch["images"]), model.text_embeddings(batch)
        w, pids = model.classifier.weight, batch["pids"]
        for step, negatives in ((0, "all"), (4, "all"), (5, "hardest"), (40, "hardest")):
            model.set_training_context(TrainingContext(step=step, epoch=0, total_steps=50, steps_per_epoch=10))
            assert model.negatives() == negatives
            out = model(batch)
            assert out["global"].item() == pytest.approx(
                ranking_loss(img["global"], txt["global"], pids, 0.2, negatives=negatives).item(), rel=1e-5)
            fine = sum(cmr_loss(v, t, pids, commonality(v @ w.T), commonality(t @ w.T), 0.2, negatives=negatives)
                       for v, t in zip(img["fine"].unbind(1), txt["fine"].unbind(1)))
            assert out["fine"].item() == pytest.approx(fine.item(), rel=1e-5)
        model.eval()  # evaluation (no training forward) never warms up
        assert model.negatives() == "hardest"


# ----------------------------------------------------------------------------------------------------
# Section 3.2 and Eq. (14)


def test_horizontal_stripes_by_hand():
    # a 4x2 grid of 1-d tokens 0..7 (row-major); 2 stripes = rows 0-1 (max 3) and rows 2-3 (max 7)
    tokens = torch.arange(8.0).reshape(1, 8, 1)
    assert horizontal_stripes(tokens, (4, 2), 2).flatten().tolist() == [3.0, 7.0]
    # 3 stripes of 4 rows: rows {0, 1}, {2}, {3} -> 3, 5, 7
    assert horizontal_stripes(tokens, (4, 2), 3).flatten().tolist() == [3.0, 5.0, 7.0]


def test_eq14_sums_the_cosines_of_every_embedding():
    image = {"global": torch.tensor([[2.0, 0.0]]), "coarse": torch.tensor([[[0.0, 3.0], [1.0, 1.0]]]),
             "fine": torch.tensor([[[1.0, 0.0]]])}
    text = {"global": torch.tensor([[1.0, 1.0]]), "coarse": torch.tensor([[[0.0, 1.0], [1.0, -1.0]]]),
            "fine": torch.tensor([[[-5.0, 0.0]]])}
    # global cos 1/sqrt 2, coarse 1 and 0, fine -1
    expected = 1 / math.sqrt(2) + 1 + 0 - 1
    model = part_model()
    assert model.pair_scores(image, text).item() == pytest.approx(expected, rel=1e-6)
    assert model.similarity(image, text, chunk_size=1).item() == pytest.approx(expected, rel=1e-6)
    only_global = {"global": image["global"]}, {"global": text["global"]}
    assert model.pair_scores(*only_global).item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("foreground", ["literal", "max"])
def test_fine_image_embeddings_are_foreground_weighted_stripes(foreground):
    model = part_model(**{"model.foreground": foreground})
    model.eval()
    images = make_batch(4)["images"]
    with torch.no_grad():
        got = model.image_embeddings(images, with_attention=True)
        tokens = model.image_proj.linear(model.image_encoder(images).tokens)
        encoded = tokens + model.image_pos
        encoded = encoded + model.image_encoder_attn(encoded, encoded, encoded)[0]  # Eq. (3)
        q = model.coarse_tokens.unsqueeze(0).expand(4, -1, -1)
        coarse, attention = model.decoder(q, encoded, encoded)  # Eq. (4), weights averaged over heads
        a = attention.mean(1)  # A_avg
        if foreground == "max":
            a = a / a.amax(1, keepdim=True)
        fine = (encoded * (1 + a.unsqueeze(-1))).reshape(4, 4, 2, 4, -1).amax(dim=(2, 3))  # Eq. (5), 4 stripes
    assert torch.allclose(got["coarse"], coarse, atol=1e-6) and torch.allclose(got["fine"], fine, atol=1e-5)
    assert torch.allclose(got["foreground"].sum(1), torch.ones(4), atol=1e-5)
    assert torch.allclose(got["global"], tokens.amax(1), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Eq. (13): the terms of the training step


def test_full_method_terms_are_the_loss_functions_of_its_embeddings():
    model = part_model()
    model.eval()
    batch = make_batch()
    out = model(batch)
    assert set(out) == {"id", "global", "coarse", "fine", "loss"}
    img, txt = model.image_embeddings(batch["images"]), model.text_embeddings(batch)
    w, labels, pids = model.classifier.weight, batch["labels"], batch["pids"]
    members = [(img["global"], txt["global"])] + list(zip(img["coarse"].unbind(1), txt["coarse"].unbind(1))) + \
        list(zip(img["fine"].unbind(1), txt["fine"].unbind(1)))
    assert len(members) == 9
    ident = sum(id_loss(v, labels, w) + id_loss(t, labels, w) for v, t in members)  # Eq. (8)
    assert out["id"].item() == pytest.approx(ident.item(), rel=1e-5)
    assert out["global"].item() == pytest.approx(hardest_negative_ranking_loss(img["global"], txt["global"], pids,
                                                                                0.2).item(), rel=1e-5)
    coarse = sum(hardest_negative_ranking_loss(v, t, pids, 0.2) for v, t in members[1:5])  # Eq. (10)
    assert out["coarse"].item() == pytest.approx(coarse.item(), rel=1e-5)
    fine = sum(cmr_loss(v, t, pids, commonality(v @ w.T), commonality(t @ w.T), 0.2) for v, t in members[5:])
    assert out["fine"].item() == pytest.approx(fine.item(), rel=1e-5)  # Eq. (12)
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in ("id", "global", "coarse", "fine")),
                                               rel=1e-6)


def test_weights_and_plain_ranking_on_fine():
    model = part_model(**{"model.id_weight": 0.5, "model.ranking_weight": 2.0})
    model.eval()
    out = model(make_batch())
    assert out["loss"].item() == pytest.approx(0.5 * out["id"].item() + 2 * (out["global"] + out["coarse"]
                                                                                + out["fine"]).item(), rel=1e-5)
    plain = part_model(**{"model.cmr": False})
    plain.eval()
    batch = make_batch()
    img, txt = plain.image_embeddings(batch["images"]), plain.text_embeddings(batch)
    expected = sum(hardest_negative_ranking_loss(v, t, batch["pids"], 0.2)
                   for v, t in zip(img["fine"].unbind(1), txt["fine"].unbind(1)))
    assert plain(batch)["fine"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradients_reach_every_module_and_the_commonality_is_detached():
    model = part_model()
    model(make_batch())["loss"].backward()
    for name in ("image_encoder", "text_encoder", "image_proj", "text_proj", "classifier", "image_encoder_attn",
                 "text_encoder_attn", "decoder"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name
    for name in ("image_pos", "text_pos", "coarse_tokens", "fine_text_tokens"):
        assert getattr(model, name).grad.abs().sum() > 0, name
    # the CMR term reaches the classifier only through C, so only when C is not detached
    for detach in (True, False):
        model = part_model(**{"model.detach_commonality": detach})
        model.eval()
        model(make_batch())["fine"].backward()
        reached = model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
        assert reached == (not detach)


def test_inference_never_uses_the_classifier():
    model = part_model()
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        before = (model.encode_images(batch["images"]), model.encode_texts(batch))
        sim_before = model.similarity(*before)
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
        after = (model.encode_images(batch["images"]), model.encode_texts(batch))
    for b, a in zip(before, after):
        assert set(b) == {"global", "coarse", "fine"} and all(torch.equal(b[k], a[k]) for k in b)
    assert torch.equal(sim_before, model.similarity(*after))


# ----------------------------------------------------------------------------------------------------
# Every ablation variant


@pytest.mark.parametrize("flags,terms,modules", [
    ({"coarse": "0", "fine": "0", "cmr": "0"}, {"id", "global"}, set()),
    ({"coarse": "1", "fine": "0", "cmr": "0"}, {"id", "global", "coarse"}, {"decoder"}),
    ({"coarse": "1", "fine": "1", "cmr": "0"}, {"id", "global", "coarse", "fine"}, {"decoder", "fine_text_tokens"}),
    ({"coarse": "1", "fine": "1", "cmr": "1"}, {"id", "global", "coarse", "fine"}, {"decoder", "fine_text_tokens"}),
    ({"cmr_coarse": "1", "cmr_fine": "1"}, {"id", "global", "coarse", "fine"}, {"decoder", "fine_text_tokens"}),
    ({"cmr_coarse": "0", "cmr_fine": "1"}, {"id", "global", "coarse", "fine"}, {"decoder", "fine_text_tokens"}),
    ({"decoder": "separated"}, {"id", "global", "coarse", "fine"}, {"decoder", "fine_text_tokens", "text_decoder"}),
    ({"decoder": "shared"}, {"id", "global", "coarse", "fine"}, {"decoder", "fine_text_tokens"}),
    ({"n_coarse": "2"}, {"id", "global", "coarse", "fine"}, {"decoder", "fine_text_tokens"}),
    ({"n_coarse": "6"}, {"id", "global", "coarse", "fine"}, {"decoder", "fine_text_tokens"}),
])
def test_every_paper_row_builds_and_takes_a_step(flags, terms, modules):
    model = part_model(**paper_rows(flags, "smoke"))
    present = {n for n in ("decoder", "text_decoder", "fine_text_tokens") if getattr(model, n) is not None}
    assert present == modules
    if "n_coarse" in flags:
        assert model.coarse_tokens.shape[0] == int(flags["n_coarse"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(make_batch())
    assert set(out) == terms | {"loss"} and all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        feats = model.encode_images(make_batch(4)["images"])
    assert set(feats) == {"global"} | ({"coarse"} if "coarse" in terms else set()) | ({"fine"} if "fine" in terms else set())


def test_cmr_on_coarse_uses_the_cmr_loss():
    model = part_model(**{"model.cmr_coarse": True})
    model.eval()
    batch = make_batch()
    img, txt = model.image_embeddings(batch["images"]), model.text_embeddings(batch)
    w = model.classifier.weight
    expected = sum(cmr_loss(v, t, batch["pids"], commonality(v @ w.T), commonality(t @ w.T), 0.2)
                   for v, t in zip(img["coarse"].unbind(1), txt["coarse"].unbind(1)))
    assert model(batch)["coarse"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_separated_decoder_gives_the_text_its_own_decoder_and_tokens():
    model = part_model(**{"model.decoder": "separated"})
    assert model.text_decoder is not model.decoder and model.text_coarse_tokens is not None
    batch = make_batch(4)
    model.eval()
    with torch.no_grad():
        before = model.encode_texts(batch)["coarse"]
        model.coarse_tokens.add_(1.0)  # the image's tokens: the text does not use them
        assert torch.equal(before, model.encode_texts(batch)["coarse"])
    shared = part_model()
    assert shared.text_decoder is None and shared.text_coarse_tokens is None


def test_part_attention_maps():
    model = part_model()
    batch = make_batch(4)
    maps = model.part_attention(batch["images"], batch)
    assert maps["image"].shape == (4, 4, 8, 4) and maps["foreground"].shape == (4, 8, 4)
    assert torch.allclose(maps["image"].sum(dim=(2, 3)), torch.ones(4, 4), atol=1e-5)
    text = maps["text"]
    assert text.shape == (4, 8, batch["input_ids"].shape[1])  # D + P text tokens over the words
    assert torch.allclose(text.sum(-1), torch.ones(4, 8), atol=1e-5)
    assert (text * (1 - batch["attention_mask"][:, None, :])).abs().sum() == 0  # padding gets no attention
    with pytest.raises(ValueError, match="no decoder"):
        part_model(**paper_rows({"coarse": "0", "fine": "0", "cmr": "0"}, "smoke")).part_attention(batch["images"], batch)


def test_position_embeddings_and_stripes_follow_the_encoder_grid():
    # resnet_smoke has output stride 8: 128x64 images give a 16x8 grid, 4 stripes of 4 rows
    model = part_model(**{"image.img_size": (128, 64)})
    assert model.grid == (16, 8) and model.image_pos.shape == (128, 64)
    model.eval()
    with torch.no_grad():
        assert model.encode_images(torch.randn(2, 3, 128, 64))["fine"].shape == (2, 4, 64)


# ----------------------------------------------------------------------------------------------------
# Config errors and paper rows


def test_config_errors():
    with pytest.raises(ValueError, match="model.decoder must be one of"):
        PartLevelConfig(decoder="both")
    with pytest.raises(ValueError, match="model.foreground must be one of"):
        PartLevelConfig(foreground="soft")
    with pytest.raises(ValueError, match="model.n_coarse must be >= 1"):
        PartLevelConfig(n_coarse=0)
    with pytest.raises(ValueError, match="model.margin must be >= 0"):
        PartLevelConfig(margin=-0.1)
    with pytest.raises(ValueError, match="model.all_negatives_epochs must be >= 0"):
        PartLevelConfig(all_negatives_epochs=-1.0)
    with pytest.raises(ValueError, match="model.fine=true needs model.coarse=true"):
        PartLevelConfig(coarse=False, cmr=False)
    with pytest.raises(ValueError, match="model.cmr=true needs model.fine=true"):
        PartLevelConfig(fine=False)
    with pytest.raises(ValueError, match="model.cmr_coarse=true needs model.coarse=true"):
        PartLevelConfig(coarse=False, fine=False, cmr=False, cmr_coarse=True)
    with pytest.raises(ValueError, match="model.n_fine=9 stripes but the image encoder's token grid has only 8 rows"):
        part_model(**{"model.n_fine": 9})
    with pytest.raises(ValueError, match="model.heads=3 does not divide embed_dim=64"):
        part_model(**{"model.heads": 3})


def test_paper_rows_map_table_flags_to_configs():
    assert method_spec("part_level").paper_rows is paper_rows
    assert paper_rows({"coarse": "1", "fine": "0", "cmr": "0"}, "smoke") == {
        "model.coarse": True, "model.fine": False, "model.cmr": False}
    assert paper_rows({"cmr_coarse": "1", "cmr_fine": "1"}, "smoke") == {"model.cmr_coarse": True, "model.cmr": True}
    assert paper_rows({"decoder": "separated"}, "smoke") == {"model.decoder": "separated"}
    assert paper_rows({"n_coarse": "6"}, "smoke") == {"model.n_coarse": 6}
    assert paper_rows({"n_coarse": "2"}, "paper") == {"image.arch": "resnet50", "model.n_coarse": 2}  # Sec. 4.4
    with pytest.raises(NotReproducible, match="not part-level paper settings"):
        paper_rows({"stripes": "6"}, "smoke")
    with pytest.raises(NotReproducible, match="not a Table 4 row"):
        paper_rows({"decoder": "none"}, "smoke")
    cfg = make_config("part_level", changes=paper_rows({"coarse": "0", "fine": "0", "cmr": "0"}, "smoke"))
    assert not (cfg.model.coarse or cfg.model.fine or cfg.model.cmr)


def test_every_reported_ablation_row_has_a_config():
    from tbps_lib.analysis.tables import table_configs

    for table, rows in (("2", 4), ("3", 2), ("4", 2), ("S2", 3)):
        plan = table_configs("part_level", table, "smoke")
        assert plan["row"].nunique() == rows, table
    full = table_configs("part_level", "2", "smoke")
    ours = full.loc[(full["row"] == "Ours") & (full["dataset"] == "CUHK-PEDES"), "hash"].iloc[0]
    same = table_configs("part_level", "3", "smoke")
    assert same.loc[same["row"] == "CMR applied to Fine only", "hash"].iloc[0] == ours  # the same run


def test_paper_preset_builds_with_random_weights():
    # ViT-B/16 at 384x128 (24x8 patch grid, 4 stripes of 6 rows) + a frozen BERT-base, d = 768 (12 heads)
    model = build_model(make_config("part_level", "paper", dataset="cuhk-pedes", changes={"model.num_classes": 4}))
    assert model.grid == (24, 8) and model.image_pos.shape == (192, 768) and model.text_pos.shape == (100, 768)
    assert model.decoder.num_heads == 12
    assert not any(p.requires_grad for p in model.text_encoder.parameters())  # BERT is not fine-tuned
