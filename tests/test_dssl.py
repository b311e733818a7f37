"""DSSL: its losses and scores against hand computations, the two training stages, what inference uses, every
ablation row of the paper as a config that trains, and config errors naming the field."""
from __future__ import annotations

import math

import pytest
import torch

from tbps_lib.config import SMOKE_DEFAULTS, make_config
from tbps_lib.losses import (attended_cosine, cosine_ranking_loss, euclidean_reconstruction_loss,
                             mutual_exclusion_loss, ranking_loss_from_scores)
from tbps_lib.models.base import TrainingContext
from tbps_lib.models.dssl import DSSL, paper_rows, zero_elements
from tbps_lib.models.registry import NotReproducible, build_model, list_methods, method_spec
from tbps_lib.reported import load_reported, parse_config
from tbps_lib.pretrain import RANDOM_INIT  # unit tests of untrained models
from test_baseline import N_CLASSES, make_batch

TINY = {"embed_dim": 64, "model.gn_groups": 8}


def dssl_model(**changes) -> DSSL:
    torch.manual_seed(0)
    return build_model(make_config("dssl", changes={**RANDOM_INIT, **TINY, "model.num_classes": N_CLASSES, **changes}))


def dssl_batch(n: int = 8) -> dict:
    """``make_batch`` + the ``noun_phrases`` fields: 0 to 4 phrases per caption, of different lengths."""
    batch = make_batch(n)
    g = torch.Generator().manual_seed(1)
    m, length = 4, 6
    counts = torch.tensor([i % 5 for i in range(n)])
    mask = torch.zeros(n, m, length, dtype=torch.long)
    for i in range(n):
        for j in range(int(counts[i])):
            mask[i, j, :3 + j % 3] = 1
    batch.update(phrase_ids=torch.randint(5, 2000, (n, m, length), generator=g) * mask,
                 phrase_attention_mask=mask, phrase_counts=counts)
    return batch


# -- losses and scores by hand -------------------------------------------------------------------------------

def test_ranking_loss_eq3_sums_every_negative_by_hand():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.6, 0.3], [0.2, 0.7, 0.4]])
    pids = torch.tensor([1, 2, 2])  # pairs 1 and 2 are the same person: not negatives of each other
    # pair 0: row [0.2 - 0.9 + 0.5]+ + [0.2 - 0.9 + 0.1]+ = 0; column [0.2 - 0.9 + 0.8]+ + [0.2 - 0.9 + 0.2]+ = 0.1
    # pair 1: row [0.2 - 0.6 + 0.8]+ = 0.4; column [0.2 - 0.6 + 0.5]+ = 0.1
    # pair 2: row [0.2 - 0.4 + 0.2]+ = 0; column [0.2 - 0.4 + 0.1]+ = 0
    total = 0.1 + 0.4 + 0.1
    assert ranking_loss_from_scores(scores, pids, 0.2, "sum").item() == pytest.approx(total)
    assert ranking_loss_from_scores(scores, pids, 0.2, "mean").item() == pytest.approx(total / 3)
    x1, x2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cosines: S = [[1, 1/sqrt2], [0, 1/sqrt2]]; pair 0: row [0.2 - 1 + 0.7071]+ = 0, column [0.2 - 1 + 0]+ = 0;
    # pair 1: row [0.2 - 0.7071 + 0]+ = 0, column [0.2 - 0.7071 + 0.7071]+ = 0.2
    assert cosine_ranking_loss(x1, x2, torch.tensor([0, 1]), 0.2, "sum").item() == pytest.approx(0.2, abs=1e-6)


def test_euclidean_and_mutual_exclusion_by_hand():
    x, y = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert euclidean_reconstruction_loss(x, y).item() == pytest.approx((5.0 + 0.0) / 2)
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    # P^T S = [[0, 2], [0, 0]]: Frobenius norm 2
    assert mutual_exclusion_loss(p, s).item() == pytest.approx(2.0)
    assert mutual_exclusion_loss(p, torch.tensor([[0.0, 0.0], [3.0, 0.0]])).item() == pytest.approx(3.0)


def test_attended_cosine_eq12_by_hand():
    parts = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # one owner, three parts
    q = torch.tensor([[1.0, 0.0]])
    # cos = (1, 0, -1); alpha = softmax = e / (e + 1 + 1/e) etc.; only part 0 exceeds 1/3
    a = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0)
    assert a[0] > 1 / 3 > a[1]
    assert attended_cosine(parts, q).item() == pytest.approx(1.0)  # CA = alpha_0 * part_0: cosine 1
    q2 = torch.tensor([[1.0, 1.0]])
    # cos = (0.7071, 0.7071, -0.7071): parts 0 and 1 tie above 1/3 with equal weight -> CA ~ (1, 1): cosine 1
    assert attended_cosine(parts, q2).item() == pytest.approx(1.0, abs=1e-6)
    # a mask: only part 2 is real -> alpha = 1 = 1/n (kept), CA = part 2, cosine with q = -1
    assert attended_cosine(parts, q, torch.tensor([[0, 0, 1]])).item() == pytest.approx(-1.0)
    # an owner without parts scores 0 (and no NaN)
    out = attended_cosine(parts, q, torch.tensor([[0, 0, 0]]))
    assert out.item() == 0.0
    # two parts kept with different weights: parts (1,0), (0,1), (0,-1); q = (2, 1)
    parts = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    q = torch.tensor([[2.0, 1.0]])
    c = torch.tensor([2 / math.sqrt(5), 1 / math.sqrt(5), -1 / math.sqrt(5)])
    w = torch.softmax(c, 0)
    assert w[1] > 1 / 3 > w[2]
    ca = w[0] * torch.tensor([1.0, 0.0]) + w[1] * torch.tensor([0.0, 1.0])
    expected = torch.nn.functional.cosine_similarity(ca, q[0], dim=0)
    assert attended_cosine(parts, q).item() == pytest.approx(expected.item(), rel=1e-6)


def test_zeroing_sets_exactly_r_of_the_elements():
    x = torch.arange(1, 41, dtype=torch.float).view(4, 10)
    torch.manual_seed(0)
    z = zero_elements(x, 0.5)
    assert ((z == 0).sum(dim=1) == 5).all()
    assert torch.equal(z[z != 0], x[z != 0])  # no rescaling
    assert torch.equal(zero_elements(x, 0.0), x)


# -- the model -------------------------------------------------------------------------------------------------

def test_registered_with_presets_and_paper_settings():
    assert "dssl" in list_methods()
    smoke = make_config("dssl")
    for key, value in SMOKE_DEFAULTS.items():
        section, _, name = key.rpartition(".")
        assert getattr(getattr(smoke, section) if section else smoke, name) == value, key
    m = smoke.model
    assert (m.num_strips, m.max_phrases, m.zero_rate, m.margin, m.lambda1, m.lambda2) == (6, 26, 0.5, 0.2, 0.5, 0.5)
    assert m.text_pool == "max" and make_config("dssl", "paper").model.text_pool == "final"
    assert m.batch_fields(True) == {"noun_phrases": {"max_phrases": 26, "phrase_length": 8}}
    paper = make_config("dssl", "paper", dataset="cuhk-pedes")
    assert (paper.image.arch, paper.text.arch, paper.embed_dim) == ("resnet50", "bigru", 1024)
    assert paper.data.batch_size == 32
    assert (paper.optim.optimizer, paper.optim.lr, paper.optim.epochs, paper.optim.milestones) == ("adam", 1e-3, 40,
                                                                                                  (10, 20, 30))
    assert paper.model.stage1_fraction == 0.25


def test_paper_preset_builds_with_random_weights():
    cfg = make_config("dssl", "paper", dataset="cuhk-pedes", changes={"model.num_classes": 5})
    model = build_model(cfg)
    assert model.text_encoder.out_dim == 1024 and model.person_mlp[0].out_features == 2048  # p -> 2p -> p
    assert model.pretrained_sources() == {"image": None, "text": None}


def test_full_method_terms_and_eq21_sum():
    model = dssl_model()
    out = model(dssl_batch())
    assert set(out) == {"sdm", "align1", "align2", "align3", "align4", "align5", "mec", "id", "loss"}
    parts = sum(v for k, v in out.items() if k != "loss")
    assert out["loss"].item() == pytest.approx(parts.item(), rel=1e-6)
    weighted = dssl_model(**{"model.mec_weight": 0.0, "model.sdm_weight": 2.0})
    out = weighted(dssl_batch())
    expected = sum(v for k, v in out.items() if k not in ("loss", "mec", "sdm")) + 2 * out["sdm"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_align_terms_are_the_loss_functions_of_the_features():
    model = dssl_model(**{"model.zero_rate": 0.0})  # no random zeroing: the features can be recomputed
    batch = dssl_batch()
    out = model(batch)
    vg, strips = model.image_features(batch["images"])
    tg = model.text_global(batch)
    mt, real = model.phrase_features(batch)
    tp, tl = model.sdm_global(tg), model.sdm_local(mt)
    vp, vs = model.person_mlp(vg), model.surroundings_mlp(vg)
    pids = batch["pids"]
    assert out["align1"].item() == pytest.approx(cosine_ranking_loss(vp, tp, pids).item(), rel=1e-5)
    assert out["align2"].item() == pytest.approx(cosine_ranking_loss(vg, model.spfm(tp + vs), pids).item(), rel=1e-5)
    assert out["align3"].item() == pytest.approx(cosine_ranking_loss(tg, model.pdm(vp), pids).item(), rel=1e-5)
    vl = strips * model.sam(vp).unsqueeze(1)
    s4 = attended_cosine(vl, tp)
    assert out["align4"].item() == pytest.approx(ranking_loss_from_scores(s4, pids).item(), rel=1e-5)
    s5 = attended_cosine(tl, vp, real).T
    assert out["align5"].item() == pytest.approx(ranking_loss_from_scores(s5, pids).item(), rel=1e-5)
    assert out["mec"].item() == pytest.approx(mutual_exclusion_loss(vp, vs).item(), rel=1e-5)
    flat = pids.unsqueeze(1).expand_as(real)[real]
    sdm = cosine_ranking_loss(tg, tp, pids) + cosine_ranking_loss(mt[real], tl[real], flat)
    assert out["sdm"].item() == pytest.approx(sdm.item(), rel=1e-5)


def test_stage1_trains_the_id_loss_with_a_fixed_image_backbone():
    model = dssl_model()
    model.train()
    model.set_training_context(TrainingContext(step=0, epoch=0, total_steps=100, steps_per_epoch=10))
    assert model.in_stage1()
    bn = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    before = bn.running_mean.clone()
    out = model(dssl_batch())
    assert set(out) == {"id", "loss"}
    out["loss"].backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())  # fixed (Sec. 3.3.1)
    assert torch.equal(bn.running_mean, before)  # its BatchNorm statistics too
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_encoder.parameters())
    assert model.global_image_head[1].weight.grad.abs().sum() > 0
    assert model.person_mlp[0].weight.grad is None
    model.zero_grad()
    model.set_training_context(TrainingContext(step=30, epoch=3, total_steps=100, steps_per_epoch=10))
    assert not model.in_stage1()
    model(dssl_batch())["loss"].backward()
    for name in ("image_encoder", "text_encoder", "person_mlp", "surroundings_mlp", "spfm", "pdm", "sam",
                 "sdm_global", "sdm_local", "strip_head", "phrase_head", "classifier", "id_norm"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name


def test_inference_never_uses_training_only_modules_and_sim_ti_by_hand():
    model = dssl_model()
    model.eval()
    batch = dssl_batch()
    with torch.no_grad():
        img, txt = model.encode_images(batch["images"]), model.encode_texts(batch)
        sim = model.similarity(img, txt)
        for name in ("surroundings_mlp", "spfm", "pdm", "classifier", "id_norm"):
            for p in getattr(model, name).parameters():
                p.add_(torch.randn_like(p))
        img2, txt2 = model.encode_images(batch["images"]), model.encode_texts(batch)
        assert all(torch.equal(img[k], img2[k]) for k in img) and all(torch.equal(txt[k], txt2[k]) for k in txt)
        assert torch.equal(model.similarity(img2, txt2), sim)
    # no zeroing at inference: T_P = Dec(Enc(T_G))
    assert torch.allclose(txt["global"], model.sdm_global(txt["text_global"]))
    vp, tp = img["global"], txt["global"]
    cos = torch.nn.functional.normalize(tp, dim=1) @ torch.nn.functional.normalize(vp, dim=1).T
    expected = (cos + 0.5 * attended_cosine(img["strips"], tp).T
                + 0.5 * attended_cosine(txt["phrases"], vp, txt["phrase_mask"]))
    assert torch.allclose(sim, expected, atol=1e-6)
    assert sim.shape == (8, 8)


def test_baseline_row_is_the_global_branch():
    model = dssl_model(**{"model.baseline": True, **{f"model.align{i}": False for i in range(1, 6)}})
    assert model.cfg.model.batch_fields(True) == {}
    batch = make_batch()
    out = model(batch)
    assert set(out) == {"align", "id", "loss"}
    vg, tg = model.image_features(batch["images"])[0], model.text_global(batch)
    assert out["align"].item() == pytest.approx(cosine_ranking_loss(vg, tg, batch["pids"]).item(), rel=1e-5)
    assert set(model.encode_images(batch["images"])) == {"global"}


def _dssl_rows():
    reported = load_reported("dssl")
    rows = reported[(reported["table"].astype(str).isin(["1", "2", "3", "4", "5"]))]
    return sorted({(str(t), c) for t, c in zip(rows["table"], rows["config"])})


@pytest.mark.parametrize("table,config", _dssl_rows())
def test_every_ablation_row_builds_and_takes_a_step(table, config):
    changes = paper_rows(parse_config(config), "smoke")
    model = dssl_model(**changes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(dssl_batch())
    out["loss"].backward()
    opt.step()
    assert torch.isfinite(out["loss"])
    model.eval()
    with torch.no_grad():
        batch = dssl_batch()
        assert model.similarity(model.encode_images(batch["images"]), model.encode_texts(batch)).shape == (8, 8)


def test_paper_rows_map_the_flags():
    assert method_spec("dssl").paper_rows is paper_rows
    assert paper_rows(parse_config("baseline=0;align1=1;align2=0;align3=0;align4=1;align5=1"), "smoke") == {
        "model.baseline": False, "model.align1": True, "model.align2": False, "model.align3": False,
        "model.align4": True, "model.align5": True}
    assert paper_rows({"mec": "0", "spsm_spfm": "0", "sam": "1", "sdm": "1"}, "smoke") == {
        "model.mec": False, "model.separation": False, "model.align2": False, "model.sam": True, "model.sdm": True}
    assert paper_rows({"spfm_fusion": "concat"}, "smoke") == {"model.fusion": "concat"}
    assert paper_rows({"sdm_zero_rate": "0.75"}, "paper") == {"model.zero_rate": 0.75}
    assert paper_rows({"sdm_loss": "euclidean"}, "smoke") == {"model.sdm_loss": "euclidean"}
    with pytest.raises(NotReproducible, match="not settings of the DSSL paper"):
        paper_rows({"xlnet": "1"}, "smoke")


@pytest.mark.parametrize("changes,field", [
    ({"model.num_strips": 9}, "model.num_strips"),  # the smoke ResNet has 8 feature rows at 64x32
    ({"model.zero_rate": 1.0}, "model.zero_rate"),
    ({"model.fusion": "multiply"}, "model.fusion"),
    ({"model.sdm_loss": "l1"}, "model.sdm_loss"),
    ({"model.baseline": True}, "model.baseline"),
    ({f"model.align{i}": False for i in range(1, 6)}, "model.align1..align5"),
    ({"model.separation": False}, "model.align2"),
    ({"model.gn_groups": 7}, "model.gn_groups"),
    ({"model.stage1_fraction": 1.5}, "model.stage1_fraction"),
    ({"model.margin": -0.1}, "model.margin"),
    ({"model.num_strips": 0}, "model.num_strips"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dssl_model(**changes)


# -- figures: the scene swap -----------------------------------------------------------------------------------

def test_scene_swap_changes_by_hand_and_figure(tmp_path):
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from tbps_lib.analysis.dssl_figures import feature_functions, scene_swap_figure, swap_changes, swap_images
    from tbps_lib.data import synthetic
    from tbps_lib.data.formats import read_synthetic
    from tbps_lib.data.loaders import image_tensor, normalize_image

    ds = read_synthetic(synthetic.generate("cuhk-like", tmp_path / "set", ids=40, progress=False, workers=1))
    chosen, images = swap_images(ds, "test", n_ids=3, seed=0)
    pid = {r.image: r.pid for r in ds.split("test")}
    assert len({pid[rel] for rel in chosen}) == 3  # distinct test identities
    for rel, img in zip(chosen, images["original"]):
        assert np.array_equal(img, np.asarray(Image.open(ds.image_dir / rel)))
    for swap in ("scene swap", "person swap"):
        assert all(not np.array_equal(a, b) for a, b in zip(images["original"], images[swap]))
    model, size = dssl_model(), (64, 32)
    table = swap_changes(model, ds, size, "test", n_ids=3, seed=0)
    assert len(table) == 3 * 3 * 2 and set(table["feature"]) == set(feature_functions(model))
    model.eval()
    x = torch.stack([normalize_image(image_tensor(Image.fromarray(a), size))
                     for a in (images["original"][1], images["scene swap"][1])])
    with torch.no_grad():
        v = feature_functions(model)["V_S (surroundings)"](x)
    want = 1 - float(torch.nn.functional.cosine_similarity(v[:1], v[1:]))
    got = table.query("feature == 'V_S (surroundings)' and swap == 'scene swap'")["change"].iloc[1]
    assert got == pytest.approx(want, abs=1e-5) and want > 0
    run = SimpleNamespace(model=model, dataset=ds, config=SimpleNamespace(image=SimpleNamespace(img_size=size)))
    fig, tables = scene_swap_figure({"dssl": run}, split="test", n_captions=3)
    summary = tables["dssl_scene_swap"]
    assert list(summary["feature"]) == list(feature_functions(model)) and (summary["n images"] == 3).all()
    assert np.allclose(summary["scene / person"], summary["scene swap change"] / summary["person swap change"])
    assert len(fig.axes[0].patches) == 2 * 3
    assert "dssl_scene_swap" in method_spec("dssl").figures
