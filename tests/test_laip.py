"""LAIP: each loss and scoring equation against hand computations, the staged schedule, gradients, the
training-only modules, rescore, momentum/queue updates, every Table IV/V variant, config errors, presets and
the ALBEF key mapping."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tbps_lib.config import make_config
from tbps_lib.data.text import IGNORE_INDEX
from tbps_lib.losses import (attention_weights, biatt_loss, fusion_triplet_loss, itc_loss, itm_loss,
                             mask_phrase_loss, mlm_loss, phrase_guided_feature)
from tbps_lib.models.base import TrainingContext
from tbps_lib.models.laip import LAIP, LAIPConfig, albef_to_laip, paper_rows
from tbps_lib.models.registry import NotReproducible, build_model, list_methods, method_spec
from tbps_lib.pretrain import RANDOM_INIT as RANDOM_ENCODERS
from test_baseline import make_batch
from test_pretrain import tiny  # noqa: F401 (fixture: tiny pretraining configs in a private cache)

RANDOM_INIT = {**RANDOM_ENCODERS, "model.init_albef": "none"}  # and no VLP weights


def laip_model(**changes) -> LAIP:
    torch.manual_seed(0)
    return build_model(make_config("laip", changes={**RANDOM_INIT, "model.num_classes": 4, **changes}))


def phrase_batch(n: int = 8, seed: int = 0) -> dict:
    batch = make_batch(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    m, lp = 3, 6
    mask = torch.ones(n, m, lp, dtype=torch.long)
    mask[:, :, 4:] = 0
    mask[:, 1, 3:] = 0
    batch["phrase_ids"] = torch.randint(5, 2000, (n, m, lp), generator=g) * mask
    batch["phrase_attention_mask"] = mask
    batch["phrase_counts"] = torch.tensor([3, 2, 1, 0, 3, 3, 2, 1])[:n]
    return batch


# ---- the equations, by hand ------------------------------------------------------------------------------

def test_itc_loss_eq_16_17_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised inside
    text = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    pos = torch.tensor([[True, False, True], [False, True, False]])
    tau = 0.5
    # image 0: sims (1, 0, 0.6)/tau = (2, 0, 1.2), two positives -> targets 1/2, 1/2
    lse0 = math.log(math.exp(2) + 1 + math.exp(1.2))
    i2t_0 = -0.5 * (2 - lse0) - 0.5 * (1.2 - lse0)
    lse1 = math.log(1 + math.exp(2) + math.exp(1.6))  # image 1: sims (0, 1, 0.8)/tau
    i2t_1 = -(2 - lse1)
    expected = 0.5 * ((i2t_0 + i2t_1) / 2 + (i2t_0 + i2t_1) / 2)  # texts are the same directions
    got = itc_loss(image, text, bank, bank, pos, pos, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="positives"):
        itc_loss(image, text, bank, bank, pos[:, :2], pos, tau)


def test_itm_loss_eq_19_by_hand():
    pos, neg = torch.tensor([2.0]), torch.tensor([0.0, -1.0])
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(-1))) / 3
    assert itm_loss(pos, neg).item() == pytest.approx(expected, rel=1e-6)


def test_fusion_triplet_eq_20_by_hand_with_the_hinge_the_right_way_round():
    pos = torch.tensor([1.0, 0.2])
    neg_img, neg_txt = torch.tensor([0.1, 0.5]), torch.tensor([0.9, -1.0])
    # pair 0: [0.6 - 1 + 0.1]+ = 0, [0.6 - 1 + 0.9]+ = 0.5; pair 1: [0.6 - 0.2 + 0.5] = 0.9, [0.6-0.2-1]+ = 0
    assert fusion_triplet_loss(pos, neg_img, neg_txt, 0.6).item() == pytest.approx((0.25 + 0.81) / 2)
    assert fusion_triplet_loss(torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.6).item() == 0.0


def test_attention_weights_eq_7_by_hand():
    forward = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]]])  # [1 pair, 2 heads, 3 patches]
    backward = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]]])
    # head means: forward (0.3, 0.3, 0.4); backward (2, -1, -0.5) -> positive part (2, 0, 0)
    assert torch.allclose(attention_weights(forward, None, "forward"), torch.tensor([[0.3, 0.3, 0.4]]))
    assert torch.allclose(attention_weights(forward, backward, "backward"), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(attention_weights(forward, backward, "bidirectional"), torch.tensor([[1.0, 0.0, 0.0]]))
    backward2 = torch.tensor([[[1.0, 1.0, 2.0], [1.0, 1.0, 2.0]]])  # means (1, 1, 2): product (0.3, 0.3, 0.8)
    assert torch.allclose(attention_weights(forward, backward2, "bidirectional"), torch.tensor([[0.3, 0.3, 0.8]]) / 1.4)
    zero = attention_weights(forward, torch.zeros_like(forward), "bidirectional")  # last layer: no gradient
    assert torch.allclose(zero, torch.full((1, 3), 1 / 3))
    with pytest.raises(ValueError, match="backward attention"):
        attention_weights(forward, None, "bidirectional")


def test_phrase_guided_feature_biatt_and_mpm_by_hand():
    w = torch.tensor([[0.25, 0.75]])
    patches = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])
    assert torch.allclose(phrase_guided_feature(w, patches), torch.tensor([[1.0, 3.0]]))  # Eq. (8)
    image = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    phrase = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    valid = torch.tensor([True, True, False])
    # (1 - 0) + (1 - 1) over 2 captions; the padding phrase does not count
    assert biatt_loss(image, phrase, valid, 2).item() == pytest.approx(0.5)
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1], [1, IGNORE_INDEX]])
    expected = (math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1))) / 2  # Eq. (11), 2 captions
    assert mask_phrase_loss(logits, labels, 2).item() == pytest.approx(expected, rel=1e-6)
    # Table V's MLM averages over the masked tokens instead (BERT): 3 tokens in 2 captions -> / 3, not / 2
    labels3 = torch.tensor([[0, 1], [1, IGNORE_INDEX]])
    expected3 = (math.log(2) + math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1))) / 3
    assert mlm_loss(logits, labels3).item() == pytest.approx(expected3, rel=1e-6)


# ---- the model ----------------------------------------------------------------------------------------------

def test_registered_with_presets():
    assert "laip" in list_methods()
    smoke = make_config("laip")
    assert (smoke.image.arch, smoke.text.arch) == ("resnet_smoke", "bert_smoke")
    assert (smoke.image.pretrained, smoke.text.pretrained) == ("workbook:resnet_smoke", "workbook:bert_smoke")
    assert (smoke.model.itc_batch, smoke.model.itm_pairs) == ("online", 16)
    m = smoke.model
    assert (m.ftri, m.foratt, m.backatt, m.masked_modeling, m.delta, m.momentum) == (True, True, True, "phrase", 0.6, 0.995)
    paper = make_config("laip", "paper", dataset="cuhk-pedes")
    assert (paper.image.arch, paper.image.img_size, paper.text.arch, paper.text.max_length) == (
        "vit_base_patch16", (384, 384), "bert_base", 50)
    assert (paper.embed_dim, paper.optim.optimizer, paper.optim.lr, paper.optim.schedule) == (256, "adamw", 1e-5, "cosine")
    assert (paper.model.itc_batch, paper.model.itm_pairs) == ("momentum", 0)  # ALBEF's, not the smoke deviations
    pm = paper.model
    assert (pm.text_layers, pm.fusion_layers, pm.attention_layer, pm.mask_token_id) == (6, 6, 3, 103)
    assert paper.eval.rescore_k == 128 and pm.stage1_share == pytest.approx(30 / 45)


def test_full_method_terms_and_eq_12_sum():
    model = laip_model()
    out = model(phrase_batch())
    assert set(out) == {"itc", "itm", "ftri", "mpm", "biatt", "loss"}
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in ("itc", "itm", "ftri", "mpm", "biatt")), rel=1e-5)
    assert all(torch.isfinite(v) for v in out.values())


def test_stage_1_is_itc_and_itm_only():
    model = laip_model()
    model.set_training_context(TrainingContext(step=5, epoch=0, total_steps=30, steps_per_epoch=30))
    assert set(model(phrase_batch())) == {"itc", "itm", "loss"}
    model.set_training_context(TrainingContext(step=20, epoch=0, total_steps=30, steps_per_epoch=30))
    assert set(model(phrase_batch())) == {"itc", "itm", "ftri", "mpm", "biatt", "loss"}


@pytest.mark.parametrize("itc_batch", ["momentum", "online"])
def test_itc_term_is_eq_17_against_the_banks(itc_batch):
    model = laip_model(**{"model.itc_batch": itc_batch, "model.foratt": False, "model.backatt": False,
                          "model.masked_modeling": "none", "model.ftri": False})
    model.eval()
    batch = make_batch()
    model.pid_queue[:4] = batch["pids"][:4]  # queued features of the batch's people are positives too
    out = model(batch)
    img = model.encode_images(batch["images"])["global"]
    txt = model.encode_texts(batch)["global"]
    if itc_batch == "momentum":
        img_b, txt_b = F.normalize(model._pending[0], dim=-1), F.normalize(model._pending[1], dim=-1)
    else:
        img_b, txt_b = img, txt
    pids = batch["pids"]
    pos = pids[:, None] == torch.cat([pids, model.pid_queue])[None]
    assert pos[:, 8:].any()
    expected = itc_loss(img, txt, torch.cat([img_b, model.image_queue]), torch.cat([txt_b, model.text_queue]), pos, pos,
                        model.temp)
    assert out["itc"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("itm_pairs", [0, 3])
def test_itm_and_triplet_use_the_fused_score_of_eq_18(itm_pairs):
    model = laip_model(**{"model.foratt": False, "model.backatt": False, "model.masked_modeling": "none",
                          "model.itm_pairs": itm_pairs})
    model.eval()
    batch = make_batch()
    torch.manual_seed(3)
    out = model(batch)
    img = model.image_encoder(batch["images"])
    txt = model.text_encoder(batch["input_ids"], batch["attention_mask"])
    torch.manual_seed(3)
    sel = torch.randperm(8)[:itm_pairs] if itm_pairs else torch.arange(8)  # the pairs that enter Eq. (19)-(20)
    neg_image, neg_text = model._hard_negatives(model.vision_proj(img.pooled), model.text_proj(txt.pooled), batch["pids"])
    assert not (batch["pids"][neg_image] == batch["pids"]).any() and not (batch["pids"][neg_text] == batch["pids"]).any()
    neg_image, neg_text = neg_image[sel], neg_text[sel]
    tokens = model._image_tokens(img)[sel]
    score = lambda t, mk, i: model.itm_score(model.fuse(t, mk, i)[0])  # noqa: E731
    mask = batch["attention_mask"][sel]
    full_tokens, full_mask = model._image_tokens(img), batch["attention_mask"]
    s_pos = score(txt.tokens[sel], mask, tokens)
    s_ni = score(txt.tokens[sel], mask, full_tokens[neg_image])
    s_nt = score(txt.tokens[neg_text], full_mask[neg_text], tokens)
    assert len(s_pos) == (itm_pairs or 8)
    assert out["itm"].item() == pytest.approx(itm_loss(s_pos, torch.cat([s_ni, s_nt])).item(), rel=1e-5)
    assert out["ftri"].item() == pytest.approx(fusion_triplet_loss(s_pos, s_ni, s_nt, 0.6).item(), rel=1e-5)


def test_backward_attention_is_the_gradient_of_the_masked_word_score():
    model = laip_model()
    model.eval()
    batch = phrase_batch(3)
    ids, mask = batch["phrase_ids"][:, 0], batch["phrase_attention_mask"][:, 0]
    maps = model.phrase_attention(batch["images"], ids, mask, torch.tensor([1, 2, 1]))
    n = math.prod(model.image_encoder(batch["images"][:1]).grid)  # image patches (cells of the feature map)
    for v in maps.values():
        assert v.shape == (3, n) and torch.allclose(v.sum(1), torch.ones(3), atol=1e-5) and (v >= 0).all()
    # the forward map is the head mean of the [CLS] row at layer L, renormalised over the patches
    img = model.image_encoder(batch["images"])
    masked = ids.clone()
    masked[torch.arange(3), torch.tensor([1, 2, 1])] = 4
    _, probs = model.fuse(model.text_encoder(masked, mask).tokens, mask, model._image_tokens(img), keep=1)
    row = probs[:, :, 0, 1:].mean(1)
    assert torch.allclose(maps["forward"], row / row.sum(1, keepdim=True), atol=1e-5)
    assert not torch.allclose(maps["backward"], torch.full((3, n), 1 / n))
    # at the last fusion layer the gradient to the [CLS] row is zero (the paper's remark): uniform weights
    last = laip_model(**{"model.attention_layer": 2})
    last.eval()
    assert torch.allclose(last.phrase_attention(batch["images"], ids, mask, torch.tensor([1, 2, 1]))["backward"],
                          torch.full((3, n), 1 / n))


def test_gradients_reach_what_they_should():
    model = laip_model()
    out = model(phrase_batch())
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = {k: torch.autograd.grad(out[k], [p for _, p in params], allow_unused=True, retain_graph=True)
             for k in ("itm", "biatt", "mpm", "itc")}
    names = [n for n, _ in params]
    touched = {k: {n.split(".")[0] for n, g in zip(names, gs) if g is not None and g.abs().sum() > 0} for k, gs in grads.items()}
    assert {"fusion", "itm_head", "image_encoder", "text_encoder"} <= touched["itm"]
    assert {"vision_proj", "text_proj", "image_encoder", "text_encoder", "fusion"} <= touched["biatt"]  # fusion: w^Fa
    assert {"mpm_head", "fusion"} <= touched["mpm"] and "itm_head" not in touched["mpm"]
    assert {"temp", "vision_proj", "text_proj"} <= touched["itc"] and "fusion" not in touched["itc"]
    assert not any(n.endswith("_m") or "_m." in n for k in touched for n in touched[k])
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.split(".")[0].endswith("_m"))


def test_inference_never_uses_training_only_modules():
    model = laip_model()
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        before_i, before_t = model.encode_images(batch["images"]), model.encode_texts(batch)
        cand = torch.tensor([[0, 1, 2]] * 8)
        before_r = model.rescore(before_i, before_t, cand)
        for name in ("mpm_head", "image_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m"):
            for p in getattr(model, name).parameters():
                p.add_(torch.randn_like(p))
        model.image_queue.normal_()
        model.pid_queue.fill_(3)
        model.temp.fill_(0.3)
        after_i, after_t = model.encode_images(batch["images"]), model.encode_texts(batch)
        assert all(torch.equal(before_i[k], after_i[k]) for k in before_i)
        assert all(torch.equal(before_t[k], after_t[k]) for k in before_t)
        assert torch.equal(before_r, model.rescore(after_i, after_t, cand))
        for p in model.fusion.parameters():  # the ITC ranking does not use the fusion encoder either
            p.add_(1.0)
        assert torch.equal(model.similarity(before_i, before_t),
                           model.similarity(model.encode_images(batch["images"]), model.encode_texts(batch)))


def test_rescore_is_the_itm_score_of_each_candidate_pair():
    model = laip_model()
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        fi, ft = model.encode_images(batch["images"]), model.encode_texts(batch)
        cand = torch.tensor([[3, 0], [1, 7], [2, 2], [0, 5], [6, 4], [5, 1], [4, 3], [7, 6]])
        got = model.rescore(fi, ft, cand)
        for t in (0, 4):
            for j in range(2):
                fused, _ = model.fuse(ft["tokens"][t:t + 1], ft["mask"][t:t + 1], fi["tokens"][cand[t, j]:cand[t, j] + 1])
                assert got[t, j].item() == pytest.approx(model.itm_score(fused).item(), abs=1e-5)
    assert model.can_rescore


def test_momentum_encoders_run_without_dropout():
    model = laip_model()
    model.train()
    assert model.training and model.text_encoder.training and model.image_encoder.training
    assert not any(getattr(model, t).training for _, t in model._MOMENTUM_PAIRS)
    batch = phrase_batch()
    model(batch)
    first = [t.clone() for t in model._pending[:2]]
    model(batch)  # online dropout differs between the calls, the momentum targets do not
    assert all(torch.equal(a, b) for a, b in zip(first, model._pending[:2]))


def test_momentum_update_and_queue_wraparound():
    model = laip_model(**{"model.queue_size": 12, "model.momentum": 0.5})
    batch = phrase_batch()
    out = model(batch)
    image_m = model._pending[0].clone()
    online = next(model.vision_proj.parameters()).detach().clone()
    with torch.no_grad():
        next(model.vision_proj.parameters()).add_(1.0)
        target_before = next(model.vision_proj_m.parameters()).clone()
        model.after_optimizer_step(None)
        expected = 0.5 * target_before + 0.5 * (online + 1.0)
    assert torch.allclose(next(model.vision_proj_m.parameters()), expected)
    assert torch.equal(model.image_queue[:8], image_m) and model.queue_ptr.item() == 8
    assert torch.equal(model.pid_queue[:8], batch["pids"])
    model(batch)
    with torch.no_grad():
        model.after_optimizer_step(None)
    assert model.queue_ptr.item() == 4 and torch.equal(model.pid_queue[8:], batch["pids"][:4])
    assert out["itc"].requires_grad


@pytest.mark.parametrize("flags", [
    {"coco": "0", "itc_itm": "1", "ftri": "0", "foratt": "0", "backatt": "0", "mpm": "0"},
    {"coco": "1", "itc_itm": "1", "ftri": "0", "foratt": "1", "backatt": "0", "mpm": "0"},
    {"coco": "0", "itc_itm": "1", "ftri": "0", "foratt": "0", "backatt": "1", "mpm": "0"},
    {"coco": "0", "itc_itm": "1", "ftri": "0", "foratt": "1", "backatt": "1", "mpm": "0"},
    {"coco": "0", "itc_itm": "1", "ftri": "0", "foratt": "0", "backatt": "0", "mpm": "1"},
    {"coco": "0", "itc_itm": "1", "ftri": "1", "foratt": "1", "backatt": "1", "mpm": "1"},
    {"coco": "0", "itc_itm": "1", "ftri": "1", "foratt": "1", "backatt": "1", "mpm": "0", "mlm": "1"},
])
def test_every_variant_builds_and_takes_a_step(flags):
    model = laip_model(**{**paper_rows(flags, "smoke"), "model.init_albef": None})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(phrase_batch())
    expected = {"itc", "itm", "loss"} | ({"ftri"} if flags["ftri"] == "1" else set())
    expected |= {"biatt"} if "1" in (flags["foratt"], flags["backatt"]) else set()
    expected |= {"mpm"} if flags["mpm"] == "1" else {"mlm"} if flags.get("mlm") == "1" else set()
    assert set(out) == expected
    out["loss"].backward()
    opt.step()
    with torch.no_grad():
        model.after_optimizer_step(None)


def test_paper_rows_and_coco_rows_are_not_reproducible():
    assert method_spec("laip").paper_rows is paper_rows
    assert paper_rows({"coco": "0", "itc_itm": "1", "ftri": "1", "foratt": "1", "backatt": "0", "mpm": "1"}, "smoke") == {
        "model.init_albef": None, "model.ftri": True, "model.foratt": True, "model.backatt": False,
        "model.masked_modeling": "phrase"}
    assert paper_rows({"mpm": "1", "mlm": "1"}, "smoke")["model.masked_modeling"] == "caption"
    # smoke: the workbook's VLP stage stands in for the extra image-text stage (COCO); paper: not reproducible
    assert paper_rows({"coco": "1", "itc_itm": "1"}, "smoke")["model.init_albef"] == "workbook:vlp_smoke"
    assert "model.init_albef" not in paper_rows({"coco": "0", "itc_itm": "1"}, "paper")
    with pytest.raises(NotReproducible, match="COCO"):
        paper_rows({"coco": "1", "itc_itm": "1"}, "paper")
    assert LAIPConfig(foratt=False, backatt=False, masked_modeling="none").batch_fields(True) == {}
    assert LAIPConfig().batch_fields(False) == {}
    assert LAIPConfig().batch_fields(True) == {"noun_phrases": {"max_phrases": 3, "phrase_length": 8}}


@pytest.mark.parametrize("field,value", [
    ("masked_modeling", "words"), ("fusion_layers", 0), ("attention_layer", 3), ("attention_layer", 0),
    ("queue_size", 0), ("max_phrases", 0), ("phrase_length", 2), ("delta", -0.1), ("mlm_ratio", 0.0),
    ("momentum", 1.0), ("temperature", 0.0), ("stage1_share", 1.0), ("text_layers", -1), ("mask_token_id", -1),
    ("itc_batch", "queue"), ("itm_pairs", -1)])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        LAIPConfig(**{field: value})


def test_text_layers_larger_than_the_encoder_is_an_error():
    with pytest.raises(ValueError, match="model.text_layers"):
        laip_model(**{"model.text_layers": 5})


def _albef_names(model: LAIP, text_layers: int) -> dict[str, torch.Tensor]:
    """A synthetic ALBEF retrieval checkpoint (ALBEF's key names, this model's sizes, random values)."""
    g = torch.Generator().manual_seed(7)
    rnd = lambda t: torch.randn(t.shape, generator=g)  # noqa: E731
    state = {"visual_encoder." + k: rnd(v) for k, v in model.image_encoder.model.state_dict().items()}
    state.update({"visual_encoder_m." + k: rnd(v) for k, v in model.image_encoder.model.state_dict().items()})
    for k, v in model.text_encoder.bert.state_dict().items():
        state["text_encoder." + k] = rnd(v)
    inverse = {"self_attn.query.": "attention.self.query.", "self_attn.key.": "attention.self.key.",
               "self_attn.value.": "attention.self.value.", "self_attn.dense.": "attention.output.dense.",
               "self_attn.norm.": "attention.output.LayerNorm.", "cross_attn.query.": "crossattention.self.query.",
               "cross_attn.key.": "crossattention.self.key.", "cross_attn.value.": "crossattention.self.value.",
               "cross_attn.dense.": "crossattention.output.dense.", "cross_attn.norm.": "crossattention.output.LayerNorm.",
               "intermediate.": "intermediate.dense.", "output.": "output.dense.", "norm.": "output.LayerNorm."}
    for k, v in model.fusion.state_dict().items():
        index, _, rest = k.partition(".")
        part = next(p for p in inverse if rest.startswith(p))
        state[f"text_encoder.encoder.layer.{int(index) + text_layers}.{inverse[part]}{rest[len(part):]}"] = rnd(v)
    width = model.text_encoder.out_dim
    state.update({"vision_proj.weight": rnd(model.vision_proj.weight), "vision_proj.bias": rnd(model.vision_proj.bias),
                  "text_proj.weight": rnd(model.text_proj.weight), "text_proj.bias": rnd(model.text_proj.bias),
                  "itm_head.weight": torch.randn(2, width, generator=g), "itm_head.bias": torch.randn(2, generator=g),
                  "temp": torch.tensor(0.05), "image_queue": torch.randn(256, 12), "queue_ptr": torch.zeros(1),
                  "idx_queue": torch.zeros(1, 12)})
    return state


def test_albef_checkpoint_key_mapping(tmp_path):
    vit = {"image.arch": "vit_smoke"}  # ALBEF's image encoder is a ViT (the smoke preset's is a CNN)
    model = laip_model(**vit)
    state = _albef_names(model, text_layers=2)
    mapped, ignored = albef_to_laip(state, text_layers=2)
    assert set(ignored) >= {"image_queue", "queue_ptr", "idx_queue"} and all("_m." in k or "queue" in k for k in ignored)
    assert torch.equal(mapped["fusion.1.cross_attn.key.weight"], state["text_encoder.encoder.layer.3.crossattention.self.key.weight"])
    assert torch.equal(mapped["text_encoder.bert.encoder.layer.1.output.dense.weight"],
                       state["text_encoder.encoder.layer.1.output.dense.weight"])
    w = state["itm_head.weight"]
    assert torch.equal(mapped["itm_head.weight"], (w[1] - w[0])[None])  # softmax of 2 = sigmoid of the difference
    path = tmp_path / "albef.pth"
    torch.save(state, path)
    loaded = laip_model(**vit, **{"model.init_albef": str(path)})
    assert torch.equal(loaded.image_encoder.model.pos_embed, state["visual_encoder.pos_embed"])
    assert torch.equal(loaded.fusion[0].self_attn.norm.weight,
                       state["text_encoder.encoder.layer.2.attention.output.LayerNorm.weight"])
    assert torch.equal(loaded.image_encoder_m.model.pos_embed, loaded.image_encoder.model.pos_embed)  # momentum = copy
    assert loaded.pretrained_sources()["image"].startswith("albef:")
    del state["text_encoder.encoder.layer.3.crossattention.self.key.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing.*fusion.1.cross_attn.key.weight"):
        laip_model(**vit, **{"model.init_albef": str(path)})


def test_vlp_stage_trains_and_loads_like_an_albef_checkpoint(tiny):
    """The workbook's ALBEF stand-in (``workbook:vlp_smoke``): ITC + ITM + MLM from resnet_smoke + bert_smoke,
    cached under a hash that follows the weights it starts from, loaded by the smoke preset."""
    import dataclasses

    from safetensors.torch import load_file

    from tbps_lib import pretrain

    folder = pretrain.ensure_pretrained("vlp_smoke", progress=False)
    info = pretrain.pretraining_info("vlp_smoke")
    assert info["kind"] == "vlp" and info["pairs"] > 0 and info["starts_from"] == ["resnet_smoke", "bert_smoke"]
    assert [h["step"] for h in pretrain.pretraining_history("vlp_smoke")] == [2, 3]
    assert (pretrain.weights_dir(tiny["resnet_smoke"])).is_dir() and (pretrain.weights_dir(tiny["bert_smoke"])).is_dir()
    state = load_file(str(folder / "model.safetensors"))
    assert "text_encoder.encoder.layer.3.crossattention.self.key.weight" in state and "itm_head.weight" in state
    model = build_model(make_config("laip", changes={"model.num_classes": 4}))  # the smoke preset's weights
    assert torch.equal(model.fusion[1].cross_attn.key.weight,
                       state["text_encoder.encoder.layer.3.crossattention.self.key.weight"])
    assert torch.equal(model.itm_head.weight[0], state["itm_head.weight"][1] - state["itm_head.weight"][0])
    assert model.pretrained_sources()["text"].startswith("albef:workbook:vlp_smoke@")
    bare = build_model(make_config("laip", changes={"model.num_classes": 4, "model.backatt": False,
                                                    "model.masked_modeling": "none"}))  # no MLM head: skipped
    assert bare.mpm_head is None and torch.equal(bare.itm_head.weight, model.itm_head.weight)
    before = pretrain.pretrain_hash(tiny["vlp_smoke"])
    pretrain.WORKBOOK_WEIGHTS["bert_smoke"] = dataclasses.replace(tiny["bert_smoke"], steps=4)
    assert pretrain.pretrain_hash(tiny["vlp_smoke"]) != before  # new text weights, new VLP weights


def test_phrase_maps_pointing_game_and_figures(tmp_path):
    """Figures 2/7 and the pointing game of forward / backward / bidirectional phrase maps, on a tiny synthetic
    benchmark with an untrained model (the plumbing, not the numbers)."""
    import types

    import matplotlib

    matplotlib.use("Agg")
    from tbps_lib.analysis.laip_figures import (MODES, laip_attention_figure, laip_pointing_figure,
                                                phrase_pointing_game)
    from tbps_lib.data import synthetic
    from tbps_lib.data.formats import read_synthetic
    from tbps_lib.data.loaders import train_captions
    from tbps_lib.data.text import CaptionTokenizer
    from tbps_lib.models.registry import method_figures

    ds = read_synthetic(synthetic.generate("cuhk-like", tmp_path / "set", ids=12, progress=False, workers=1))
    tok = CaptionTokenizer.train(train_captions(ds), vocab_size=300, max_length=40)
    model = laip_model()
    run = types.SimpleNamespace(model=model, tokenizer=tok, dataset=ds, config=model.cfg)
    table = phrase_pointing_game(run, "test", n_captions=4)
    assert len(table) and set(table["mode"]) == set(MODES) and len(table) % 3 == 0
    assert table[["hit", "energy", "chance_grid", "chance_area"]].apply(lambda c: c.between(0, 1).all()).all()
    fig, tables = laip_pointing_figure({"laip": run}, split="test", n_captions=4)
    assert fig is not None and ("bidirectional", "all") in tables["laip_pointing"].index
    fig, _ = laip_attention_figure({"laip": run}, split="test", n_examples=2)
    assert len([ax for ax in fig.axes if ax.images]) == 2 * 4
    assert laip_pointing_figure({"baseline": types.SimpleNamespace(model=torch.nn.Linear(1, 1))})[0] is None
    figures = method_figures()
    assert figures["laip_pointing_game"][0] == "laip" and figures["laip_fig7_attention_maps"][0] == "laip"
