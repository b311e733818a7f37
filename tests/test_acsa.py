"""ACSA: ACAM's two directions and the ACSA loss against hand computations, the model's terms, gradients,
inference, the Table III-VI variants, regions and phrases, config errors and the paper rows."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tbps_lib.analysis.tables import plan_row, table_configs
from tbps_lib.config import make_config
from tbps_lib.losses import acam_similarity, acsa_loss, cmpc_loss, cmpm_loss
from tbps_lib.losses.acsa import acam_attention, matching_logits
from tbps_lib.models import acsa as acsa_module
from tbps_lib.models.acsa import RELATIONS, Acsa, AcsaConfig, paper_rows, parse_partition
from tbps_lib.models.layers import pool_row_ranges, stripe_rows
from tbps_lib.models.registry import NotReproducible, build_model, list_methods, method_spec
from tbps_lib.pretrain import RANDOM_INIT  # unit tests of untrained models
from test_baseline import N_CLASSES, make_batch

E = math.e


def with_phrases(batch: dict, m: int = 10, lp: int = 12, counts=(1, 2, 3, 0, 2, 1, 3, 2), vocab: int = 2000,
                 seed: int = 0) -> dict:
    """``batch`` plus a hand-made ``noun_phrases`` field: caption i has counts[i] phrases of 3-5 tokens."""
    g = torch.Generator().manual_seed(seed)
    n = batch["input_ids"].shape[0]
    ids = torch.zeros(n, m, lp, dtype=torch.long)
    mask = torch.zeros(n, m, lp, dtype=torch.long)
    for i in range(n):
        for j in range(counts[i % len(counts)]):
            length = 3 + (i + j) % 3
            ids[i, j, :length] = torch.randint(5, vocab, (length,), generator=g)
            mask[i, j, :length] = 1
    return {**batch, "phrase_ids": ids, "phrase_attention_mask": mask, "phrase_counts": mask[..., 0].sum(1)}


def acsa_model(**changes) -> Acsa:
    torch.manual_seed(0)
    return build_model(make_config("acsa", changes={**RANDOM_INIT, "model.num_classes": N_CLASSES, **changes}))


# ------------------------------------------------------------------------------------------------------
# Equations by hand


def test_acam_both_directions_by_hand():
    # v0 = (1, 0), v1 = (0, 1); t1 = (2, 0), t2 = (0, 1): cos = identity; lambda = 1 for readable numbers.
    visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    texts = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    S, S_prime = acam_similarity(visual, texts, torch.ones(1, 2, dtype=torch.bool), 1.0, 1.0)
    # Eq. (2): s~ = cos (each column has one positive entry of 1); Eq. (4): alpha_0 = (e, 1) / (e + 1).
    a, b = E / (E + 1), 1 / (E + 1)
    t_v0, t_v1 = (2 * a, b), (2 * b, a)  # Eq. (3)
    s0 = t_v0[0] / math.hypot(*t_v0)  # Eq. (5): cos((1, 0), T_v0)
    s1 = t_v1[1] / math.hypot(*t_v1)
    assert S.item() == pytest.approx((s0 + s1) / 2, abs=1e-6)  # Eq. (6)
    assert S.item() == pytest.approx(0.89450, abs=1e-4)
    # Eq. (8)-(11): phrase 1 attends (a, b) over (v0, v1): V_t1 = (a, b), cos(t1, V_t1) = a / |(a, b)|.
    assert S_prime.item() == pytest.approx(a / math.hypot(a, b), abs=1e-6)
    assert S_prime.item() == pytest.approx(0.93854, abs=1e-4)


def test_acam_clips_negative_cosines_and_skips_absent_phrases():
    # v0 = (1, 0), v1 = (-1, 0) (opposite), one real phrase t1 = (1, 0) and a padding slot.
    visual = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    texts = torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, False]])
    S, S_prime = acam_similarity(visual, texts, mask, 20.0, 20.0)
    # Image-to-text: one phrase, so alpha = 1 for both entities: T_v = t1; cos = 1 and -1 -> S = 0.
    assert S.item() == pytest.approx(0.0, abs=1e-6)
    # Text-to-image: [s]_+ = (1, 0), Eq. (8) over the one phrase: (1, 0); alpha' = softmax(20, 0) over i.
    w = 1 / (1 + math.exp(-20.0))
    v = (w - (1 - w), 0.0)  # V_t1 = w v0 + (1 - w) v1
    assert S_prime.item() == pytest.approx(v[0] / abs(v[0]), abs=1e-6)  # cos(t1, V_t1) = 1, padding ignored
    alpha, alpha_t = acam_attention(visual, texts, mask, 20.0, 20.0)
    assert alpha[0, :, 1].tolist() == [0.0, 0.0]  # the padding phrase gets no attention
    assert alpha_t[0, 0].tolist() == pytest.approx([w, 1 - w]) and alpha_t[0, 1].tolist() == [0.0, 0.0]


def test_acam_matrix_equals_a_loop_over_pairs():
    torch.manual_seed(0)
    visual, texts = torch.randn(3, 5, 7), torch.randn(4, 6, 7)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False
    S, S_prime = acam_similarity(visual, texts, mask)
    for b in range(4):
        for a in range(3):
            one_s, one_sp = acam_similarity(visual[a:a + 1], texts[b:b + 1, mask[b]],
                                            torch.ones(1, int(mask[b].sum()), dtype=torch.bool))
            assert S[b, a].item() == pytest.approx(one_s.item(), abs=1e-5)
            assert S_prime[b, a].item() == pytest.approx(one_sp.item(), abs=1e-5)


def test_acsa_loss_by_hand_softmax_form():
    scores = torch.tensor([[0.5, 0.1], [0.2, 0.4]])  # scores[a, b] = S(image a, text b)
    pids = torch.tensor([1, 2])  # two people: q = identity
    eps = 1e-8

    def kl(row):  # Eq. (14) with q = (1, 0): p0 log(p0 / (1 + eps)) + p1 log(p1 / eps)
        p0 = math.exp(row[0]) / (math.exp(row[0]) + math.exp(row[1]))
        return p0 * math.log(p0 / (1 + eps)) + (1 - p0) * math.log((1 - p0) / eps)

    i2t = (kl((0.5 * 2, 0.1 * 2)) + kl((0.4 * 2, 0.2 * 2))) / 2  # Eq. (15), scale 2, row a over texts b
    t2i = (kl((0.5 * 2, 0.2 * 2)) + kl((0.4 * 2, 0.1 * 2))) / 2  # Eq. (16), column b over images a
    got = acsa_loss(scores, pids, "softmax", scale=2.0, eps=eps)
    assert got.item() == pytest.approx(i2t + t2i, rel=1e-5)


def test_acsa_loss_ratio_form_is_the_printed_eq_12():
    scores = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
    pids = torch.tensor([7, 7])  # one person: q = (1/2, 1/2)
    p = [(0.5 / 0.6, 0.1 / 0.6), (0.4 / 0.6, 0.2 / 0.6)]  # Eq. (12): S / sum S over the texts
    p_t = [(0.5 / 0.7, 0.2 / 0.7), (0.4 / 0.5, 0.1 / 0.5)]  # over the images of each text
    kl = lambda row: sum(x * math.log(x / (0.5 + 1e-8)) for x in row)  # noqa: E731
    expected = sum(map(kl, p)) / 2 + sum(map(kl, p_t)) / 2
    assert acsa_loss(scores, pids, "ratio").item() == pytest.approx(expected, rel=1e-5)
    # Where the printed form is defined (all similarities > 0) it is the softmax of log S:
    s = torch.rand(5, 5) + 0.05
    assert torch.allclose(torch.softmax(matching_logits(s, "ratio"), 1), s / s.sum(1, keepdim=True), atol=1e-6)
    # The softmax form stays a distribution for negative similarities (where Eq. (12) is not one).
    neg = torch.tensor([[0.3, -0.2], [-0.5, 0.1]])
    assert torch.isfinite(acsa_loss(neg, torch.tensor([1, 2]))).item()
    assert (torch.softmax(matching_logits(neg, "softmax", 20.0), 1) > 0).all()


def test_acsa_loss_is_zero_for_a_perfect_match_and_rejects_bad_shapes():
    scores = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert acsa_loss(scores, torch.tensor([1, 2]), scale=50.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="scores"):
        acsa_loss(torch.zeros(2, 3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one of"):
        matching_logits(scores, "sum")


def test_stripes_and_partition_rows():
    assert stripe_rows(6, 6) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert stripe_rows(8, 6) == [(0, 2), (1, 3), (2, 4), (4, 6), (5, 7), (6, 8)]
    assert stripe_rows(7, 6)[0] == (0, 2) and stripe_rows(7, 6)[-1] == (5, 7)  # Swin-T at 224: 7 rows
    with pytest.raises(ValueError, match="cannot cut 2 feature rows into 6"):
        stripe_rows(2, 6)
    assert parse_partition("1-2,2-3,4-5,6", 6) == ((0, 1), (1, 2), (3, 4), (5, 5))
    tokens = torch.arange(12.0).view(1, 6, 2).flatten(1, 2).unsqueeze(-1)  # value = cell index, grid 6x2
    pooled = pool_row_ranges(tokens.view(1, 12, 1), (6, 2), [(0, 2), (5, 6)], "mean")
    assert pooled.flatten().tolist() == [1.5, 10.5]
    assert pool_row_ranges(tokens.view(1, 12, 1), (6, 2), [(0, 2)], "max").item() == 3.0


# ------------------------------------------------------------------------------------------------------
# The model


def test_registered_with_presets_and_paper_settings():
    assert list_methods().index("acsa") > list_methods().index("sew_mcm")
    smoke = make_config("acsa")
    assert (smoke.image.arch, smoke.text.arch) == ("resnet_smoke", "bigru_smoke")
    assert smoke.model.relations == "I+II+III" and smoke.model.local_parts == "partition"
    assert (smoke.model.mu, smoke.model.gamma, smoke.model.pool) == (1.0, 0.1, "max")
    paper = make_config("acsa", "paper", dataset="cuhk-pedes")
    assert (paper.image.arch, paper.image.img_size, paper.text.arch) == ("swin_tiny", (224, 224), "bert_base")
    assert (paper.embed_dim, paper.text.max_length, paper.data.batch_size) == (768, 100, 16)
    o = paper.optim
    assert (o.optimizer, o.lr, o.min_lr, o.schedule, o.warmup_epochs, o.epochs) == ("adamw", 1e-4, 5e-6, "cosine", 5.0, 30)
    m = paper.model
    assert (m.mu, m.gamma, m.lambda_i2t, m.lambda_t2i, m.max_phrases, m.pool) == (4, 0.1, 20, 20, 10, "cls")


def test_terms_are_the_loss_functions_of_its_features():
    model = acsa_model()
    model.eval()
    batch = with_phrases(make_batch())
    out = model(batch)
    assert set(out) == {"cmpm", "cmpc", "acsa", "loss"}
    image, visual = model.image_entities(batch["images"])
    text, texts, mask = model.text_entities(batch)
    assert visual.shape == (8, 5, 256) and texts.shape == (8, 10, 256)  # [I_g, 4 regions]; M = 10 phrases
    assert out["cmpm"].item() == pytest.approx(cmpm_loss(image, text, batch["pids"]).item(), rel=1e-5)
    assert out["cmpc"].item() == pytest.approx(
        cmpc_loss(image, text, batch["labels"], model.classifier.weight).item(), rel=1e-5)
    s, s_prime = acam_similarity(visual, texts, mask, 20.0, 20.0)
    expected = acsa_loss(((s + s_prime) / 2).T, batch["pids"], "softmax", 20.0)
    assert out["acsa"].item() == pytest.approx(expected.item(), rel=1e-5)
    # Eq. (17): cmpm + mu cmpc + gamma acsa (mu = 1 in the smoke preset)
    assert out["loss"].item() == pytest.approx((out["cmpm"] + out["cmpc"] + 0.1 * out["acsa"]).item(), rel=1e-6)
    model.cfg = model.cfg.__class__(**{**model.cfg.__dict__, "model": AcsaConfig(mu=4.0, num_classes=N_CLASSES,
                                                                                pool="max", region_pool="max")})
    out = model(batch)
    assert out["loss"].item() == pytest.approx((out["cmpm"] + 4 * out["cmpc"] + 0.1 * out["acsa"]).item(), rel=1e-6)


def test_entities_regions_phrases_and_the_caption_without_phrases():
    model = acsa_model()
    model.eval()
    batch = with_phrases(make_batch())
    feats = model.image_encoder(batch["images"])
    image, visual = model.image_entities(batch["images"])
    assert torch.allclose(visual[:, 0], image)  # v_0 = I_g
    # head = parts 1-2 = rows 0..2 of the 8-row grid (stripe_rows(8, 6)), max-pooled projected tokens
    head = model.region_proj(feats.tokens).view(8, 8, 4, -1)[:, 0:3].amax(dim=(1, 2))
    assert torch.allclose(visual[:, 1], head, atol=1e-6)
    assert model.region_rows == [(0, 3), (1, 4), (4, 7), (6, 8)]
    text, texts, mask = model.text_entities(batch)
    assert mask.sum(1).tolist() == [1, 2, 3, 1, 2, 1, 3, 2]  # caption 3 has no phrase: its caption stands in
    assert torch.allclose(texts[3, 0], text[3])
    one = {"input_ids": batch["phrase_ids"][1, 1:2], "attention_mask": batch["phrase_attention_mask"][1, 1:2]}
    assert torch.allclose(texts[1, 1], model.embed_texts(one)[0], atol=1e-5)  # a phrase alone, same encoder
    assert (texts[1, 2:] == 0).all() and not mask[1, 2:].any()


def test_gradients_reach_encoders_regions_and_classifier():
    model = acsa_model()
    model(with_phrases(make_batch()))["loss"].backward()
    for name in ("image_encoder", "text_encoder", "image_proj", "text_proj", "region_proj", "classifier"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    # L_ACSA alone reaches the regions and both encoders, not the classifier
    model.zero_grad()
    out = model(with_phrases(make_batch()))
    out["acsa"].backward()
    assert model.region_proj.weight.grad.abs().sum() > 0 and model.classifier.weight.grad is None
    assert next(model.text_encoder.parameters()).grad is not None


def encoded_batch(**changes):
    """An eval-mode model, a batch with phrases, and the batch's image and text encodings."""
    model = acsa_model(**changes)
    model.eval()
    batch = with_phrases(make_batch())
    with torch.no_grad():
        return model, batch, model.encode_images(batch["images"]), model.encode_texts(batch)


def test_inference_ignores_the_classifier_and_scores_global_plus_acam():
    model, batch, img, txt = encoded_batch()
    with torch.no_grad():
        sim = model.similarity(img, txt)
        model.classifier.weight.normal_()  # training-only: perturbing it changes nothing at inference
        img2, txt2 = model.encode_images(batch["images"]), model.encode_texts(batch)
        assert all(torch.equal(img[k], img2[k]) for k in img) and all(torch.equal(txt[k], txt2[k]) for k in txt)
        assert torch.equal(sim, model.similarity(img2, txt2))
        cos = F.normalize(txt["global"], dim=1) @ F.normalize(img["global"], dim=1).T
        s, s_prime = acam_similarity(img["entities"], txt["entities"], txt["entity_mask"] > 0.5)
        assert torch.allclose(sim, cos + (s + s_prime) / 2, atol=1e-5)


def test_inference_chunks_give_the_same_scores(monkeypatch):
    model, _, img, txt = encoded_batch()
    with torch.no_grad():
        whole = model.pair_scores(img, txt)
        monkeypatch.setattr(acsa_module, "_SCORE_ELEMENTS", 100)  # one text per ACAM chunk
        assert torch.allclose(model.pair_scores(img, txt), whole, atol=1e-6)


@pytest.mark.parametrize("relations", RELATIONS)
def test_table5_relations_build_and_step(relations):
    model = acsa_model(**{"model.relations": relations})
    use_image, use_regions, use_caption, use_phrases = model.cfg.model.entities
    batch = with_phrases(make_batch())
    out = model(batch)
    assert ("acsa" in out) == (relations != "I")
    out["loss"].backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval()
    with torch.no_grad():
        img, txt = model.encode_images(batch["images"]), model.encode_texts(batch)
    if relations == "I":
        assert set(img) == {"global"} and model.region_proj is None
        assert model.cfg.model.batch_fields(True) == {}
    else:
        assert img["entities"].shape[1] == int(use_image) + 4
        assert txt["entities"].shape[1] == 10 + int(use_caption)
        assert model.cfg.model.batch_fields(False) == {"noun_phrases": {"max_phrases": 10, "phrase_length": 12}}


def test_six_slices_and_ratio_form_build_and_step():
    model = acsa_model(**{"model.local_parts": "six_slices", "model.acsa_probability": "ratio"})
    assert len(model.region_rows) == 6 and model.region_rows[0] == (0, 2)
    out = model(with_phrases(make_batch()))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("table", ["III", "IV", "V", "VI"])
def test_every_paper_row_config_builds_and_takes_a_step(table):
    plan = table_configs("acsa", table, "smoke")
    plan = plan[plan["seed"] == 0]
    assert len(plan) > 0
    for cfg in plan["config"].drop_duplicates():
        cfg_changes = {**RANDOM_INIT, "model.num_classes": N_CLASSES, "text.vocab_size": 2000}
        from tbps_lib.config import override
        torch.manual_seed(0)
        model = build_model(override(cfg, cfg_changes))
        batch = with_phrases(make_batch())
        out = model(batch)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]), cfg


def test_paper_rows_map_table_flags_to_configs():
    assert method_spec("acsa").paper_rows is paper_rows
    v = {"image": "1", "region": "1", "text": "0", "phrase": "1"}
    assert paper_rows({"relations": "I+II+III", **v}, "smoke") == {"model.relations": "I+II+III"}
    assert paper_rows({"local_parts": "six_slices"}, "smoke") == {"model.local_parts": "six_slices"}
    assert paper_rows({"text_encoder": "bert"}, "paper") == {}
    with pytest.raises(NotReproducible, match="XLNet"):
        paper_rows({"text_encoder": "xlnet"}, "smoke")
    with pytest.raises(NotReproducible, match="is not what the paper describes"):
        paper_rows({"relations": "I+II", **v}, "smoke")
    smoke = paper_rows({"image_encoder": "swin_t", "text_encoder": "bilstm"}, "smoke")
    assert smoke == {"model.relations": "I", "image.arch": "swin_smoke", "text.arch": "bilstm_smoke",
                     "image.pretrained": "workbook:swin_smoke", "text.pretrained": "workbook:bilstm_smoke",
                     "optim.backbone_lr_factor": 0.1}
    assert paper_rows({"image_encoder": "resnet50", "text_encoder": "bilstm"}, "smoke") == {
        "model.relations": "I", "image.arch": "resnet_smoke", "text.arch": "bilstm_smoke",
        "image.pretrained": "workbook:resnet_smoke", "text.pretrained": "workbook:bilstm_smoke"}
    assert paper_rows({"image_encoder": "vit", "text_encoder": "bert"}, "paper") == {
        "model.relations": "I", "image.arch": "vit_base_patch16", "text.arch": "bert_base"}
    assert paper_rows({"image_encoder": "resnet50", "text_encoder": "bilstm"}, "paper") == {
        "model.relations": "I", "image.arch": "resnet50", "text.arch": "bilstm"}
    with pytest.raises(NotReproducible, match="XLNet weights are not available"):
        paper_rows({"text_encoder": "xlnet"}, "paper")
    with pytest.raises(NotReproducible, match="not a text backbone of the ACSA paper's Table III"):
        paper_rows({"image_encoder": "resnet50", "text_encoder": "xlnet"}, "smoke")


def test_table_iii_bilstm_rows_train_the_bilstm_and_xlnet_rows_say_why_not():
    plan = table_configs("acsa", "III", "smoke")
    plan = plan[plan["seed"] == 0]
    lstm = plan[plan["row"].str.contains("Bi-LSTM")]
    assert len(lstm) == 3 and {c.text.arch for c in lstm["config"]} == {"bilstm_smoke"}
    assert {c.text.arch for c in plan.loc[~plan.index.isin(lstm.index), "config"]} == {"bert_smoke"}
    relation_i = table_configs("acsa", "V", "smoke").query("seed == 0 and row == 'I'")["hash"].iloc[0]
    assert relation_i not in set(lstm["hash"])  # ResNet + Bi-LSTM is no longer the bi-GRU relation-I run
    for preset in ("smoke", "paper"):
        xlnet = plan_row("acsa", "VI", 4, "ACSA (Ours)", "Swin Transformer+XLNet", "text_encoder=xlnet", preset)
        assert xlnet.status == "not reproducible" and "XLNet weights are not available" in xlnet.reason
        lstm = plan_row("acsa", "III", 1, "ResNet50 + Bi-LSTM", "ResNet50+Bi-LSTM",
                        "image_encoder=resnet50;text_encoder=bilstm", preset)
        assert not lstm.status, lstm.reason


def test_full_method_with_the_bilstm_encodes_phrases_and_steps():
    model = acsa_model(**{"text.arch": "bilstm_smoke", "text.vocab_size": 2000})
    assert isinstance(model.text_encoder.lstm, torch.nn.LSTM)
    batch = with_phrases(make_batch())
    phrases, present = model.phrase_embeddings(batch)
    assert phrases.shape == (8, 10, model.cfg.embed_dim) and present.sum(1).tolist() == [1, 2, 3, 0, 2, 1, 3, 2]
    assert phrases[~present].abs().sum() == 0 and phrases[present].norm(dim=-1).gt(0).all()
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["acsa"] > 0
    assert model.text_encoder.lstm.weight_ih_l0.grad.abs().sum() > 0


def test_config_errors_name_the_field():
    for field, value in (("relations", "I+III"), ("local_parts", "stripes"), ("region_pool", "sum"),
                         ("acsa_probability", "sum"), ("pool", "first"), ("n_slices", 0), ("max_phrases", 0),
                         ("phrase_length", 2), ("lambda_i2t", 0.0), ("gamma", -1.0), ("acsa_eps", 0.0)):
        with pytest.raises(ValueError, match=f"model.{field}"):
            AcsaConfig(**{field: value})
    with pytest.raises(ValueError, match="model.partition"):
        AcsaConfig(partition="1-2,2-3,6")  # three regions
    with pytest.raises(ValueError, match="model.partition"):
        AcsaConfig(partition="1-2,2-3,4-7,6")  # beyond the six parts
    with pytest.raises(ValueError, match=r"model.n_slices=9: the image encoder's feature map has only 8 rows"):
        acsa_model(**{"model.n_slices": 9, "model.partition": "1-2,2-3,4-5,9"})


def test_paper_preset_builds_swin_t_regions_on_a_7_row_grid():
    cfg = make_config("acsa", "paper", dataset="cuhk-pedes", changes={"model.num_classes": 3, "text.arch": "bert_smoke",
                                                                   "text.vocab_size": 100})
    model = build_model(cfg)  # Swin-T at 224x224, random weights (the text encoder kept small here)
    assert model.grid == (7, 7) and model.region_rows == [(0, 3), (1, 4), (3, 6), (5, 7)]
    assert model.region_proj.out_features == 768


# ------------------------------------------------------------------------------------------------------
# Figure helpers


def test_entity_map_and_target_region():
    import numpy as np

    from tbps_lib.analysis.acsa_figures import _target_region, entity_map, region_names

    model = acsa_model()  # 8x4 grid; regions head rows 0-2, upper 1-3, lower 4-6, feet 6-7
    heat = entity_map(torch.tensor([0.2, 0.8, 0.0, 0.0, 0.0]), model, has_global=True)
    assert heat.shape == (8, 4) and heat[:3].eq(1.0).all() and heat[3:].eq(0.2).all()
    assert region_names(model) == ["head", "upper body", "lower body", "feet"]
    mask = np.zeros((64, 32), dtype=bool)
    mask[60:64, 10:20] = True  # shoes: the last rows of the image
    assert _target_region(mask, model) == (3, 1.0)
    mask[:] = False
    mask[2:6] = True  # hair: only the head region's rows
    assert _target_region(mask, model)[0] == 0
