"""The analysis figures of notebooks 09-11 (``analysis.figures``) draw every registered method: each builder
runs on tiny untrained models of all of them at once, as ``load_runs`` gives them to the notebooks."""
from __future__ import annotations

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from tbps_lib.analysis import figures
from tbps_lib.analysis.attention import has_decoder_attention
from tbps_lib.config import checkpoint_config, make_config
from tbps_lib.data.loaders import build_tokenizer, prepare_dataset, train_captions
from tbps_lib.engine.evaluate import encode
from tbps_lib.engine.runs import resolve_config
from tbps_lib.models.registry import METHOD_MODULES, build_model

# Random weights, small widths: each method's smallest config that still has all of its modules.
TINY = {"image.pretrained": "none", "text.pretrained": "none", "embed_dim": 64}
TINY_METHOD = {"laip": {"model.init_albef": "none"}, "dssl": {"model.gn_groups": 8}}


class UntrainedRun:
    """What the figure builders read of a ``Run`` (config, dataset, tokenizer, model, embeddings), for an
    untrained model built the way training builds it."""

    def __init__(self, method: str, data: str) -> None:
        cfg = make_config(method, "smoke", data, {**TINY, **TINY_METHOD.get(method, {})})
        self.dataset = prepare_dataset(cfg)
        self.config = resolve_config(cfg, self.dataset)
        self.tokenizer = build_tokenizer(self.config, train_captions(self.dataset))
        torch.manual_seed(0)
        self.model = build_model(checkpoint_config(self.config, self.tokenizer.vocab_size)).eval()
        self._encoded = {}

    def embeddings(self, split: str = "test"):
        if split not in self._encoded:
            self._encoded[split] = encode(self.model, self.dataset, split, self.tokenizer, self.config)
        return self._encoded[split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tbps_lib.data import synthetic

    data = synthetic.generate("cuhk-like", tmp_path_factory.mktemp("every") / "set", ids=16, progress=False,
                              workers=1)
    return {m: UntrainedRun(m, str(data)) for m in METHOD_MODULES}  # not test toys others register


def test_the_registry_has_the_methods_the_notebooks_compare(runs):
    assert {"baseline", "sew_mcm", "part_level", "acsa", "laip", "dssl"} <= set(runs)


def test_modality_gap_and_tsne_draw_every_method(runs):
    fig, tables = figures.sew_fig4(runs)
    gap = tables["gap"]
    assert list(gap.index) == list(runs) and len(fig.axes) == 2
    assert (gap[["rank_image", "rank_text"]] <= 64).all().all() and (gap["area_between"] >= 0).all()
    fig, tables = figures.sew_fig6(runs)
    assert list(dict.fromkeys(tables["tsne"].index.get_level_values("method"))) == list(runs)
    assert len(fig.axes) == len(runs)  # one panel each (3 a row), no empty panels left
    assert tables["tsne"].attrs["sample"].shape[0] >= 2


def test_heatmaps_pointing_and_decoder_attention_of_every_method(runs):
    examples = figures.attention_examples(runs, n_examples=1, n_words=2)
    assert len(examples) == 1
    for name, run in runs.items():
        maps = examples[0].word_maps[name]
        assert maps.shape[0] == 2 and torch.isfinite(maps).all() and (maps >= 0).all(), name
        assert examples[0].caption_maps[name].shape == maps.shape[1:], name
    fig = figures.attention_figure(runs, n_examples=1, n_words=2)[0]
    assert len([ax for ax in fig.axes if ax.images]) == 1 + len(runs) * 3

    table = figures.pointing_tables(runs, n_captions=2)
    assert list(dict.fromkeys(table["method"])) == list(runs)
    # Only the contract's decoder_attention hook gives decoder maps: Sew/MCM's decoder, nobody else's.
    decoders = [m for m, r in runs.items() if has_decoder_attention(r.model)]
    assert "sew_mcm" in decoders
    decoder = figures.pointing_tables(runs, n_captions=2, source="decoder")
    assert list(dict.fromkeys(decoder["method"])) == decoders
    fig = figures.decoder_attention_figure(runs, examples)
    assert [ax.get_title() for ax in fig.axes if ax.get_title() in runs] == decoders


def test_part_level_scoring_table_splits_eq14(runs):
    """Notebook 04's diagnostic: each subset of Eq. (14)'s terms scored alone; the full subset is the method's
    own ranking and the global subset the plain cosine of the global embeddings."""
    import torch.nn.functional as F

    from tbps_lib.analysis.part_level_figures import SCORINGS, scoring_table
    from tbps_lib.engine.evaluate import evaluate
    from tbps_lib.engine.metrics import rank_metrics

    run = runs["part_level"]
    table = scoring_table({"ours": run}, "test").set_index("scoring")
    assert list(table.index) == list(SCORINGS)
    enc = run.embeddings("test")
    assert table.loc["Eq. (14): all", "R1"] == pytest.approx(evaluate(run.model, enc)["R1"])
    cos = F.normalize(enc.text_feats["global"], dim=-1) @ F.normalize(enc.image_feats["global"], dim=-1).T
    assert table.loc["global", "mAP"] == pytest.approx(rank_metrics(cos, enc.query_pids, enc.gallery_pids)["mAP"])
    assert set(scoring_table({"base": runs["baseline"]}, "test")["scoring"]) <= {"global"}  # no part embeddings


def test_itm_separation_reads_the_itm_head_on_own_hard_and_random_pairs(runs):
    """Notebook 06's ITM diagnostic: the own-image row is the head's score of each caption's own image; a
    head that ignores its input (weights zeroed) gives every kind the same logit and no separation."""
    from tbps_lib.analysis.laip_figures import itm_separation

    run = runs["laip"]
    table = itm_separation(run, "test", n_queries=12)
    assert list(table.index) == ["own image", "ITC-hardest other person", "random other person"]
    assert (table["n"] == 12).all() and table["own image higher"].iloc[1:].between(0, 1).all()
    head = run.model.itm_head
    saved = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()
        flat = itm_separation(run, "test", n_queries=12)
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)
    assert flat["ITM logit mean"].tolist() == pytest.approx([head.bias.item()] * 3)
    assert flat["own image higher"].iloc[1:].tolist() == [0.0, 0.0]
