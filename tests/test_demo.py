"""The caption search app without a browser: set widget values, click buttons, read the results grid, the
status line and the heatmap panel (tbps_lib/demo.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tbps_lib.analysis.retrieval import MATCH, MISS
from tbps_lib.demo import SearchApp, SearchController, available_runs, best_run, heatmap_html
from tbps_lib.engine.runs import train_or_load
from test_trainer import _toy_registered, toy_config, write_toy_dataset  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory) -> Path:
    """A run registry holding one trained toy run."""
    data = write_toy_dataset(tmp_path_factory.mktemp("demo") / "data")
    root = tmp_path_factory.mktemp("demo_runs")
    train_or_load(toy_config(data), runs_dir=root, progress=False, device="cpu")
    return root


@pytest.fixture(scope="module")
def run_dir(registry_dir) -> Path:
    (directory,) = [p for p in registry_dir.iterdir() if p.is_dir()]
    return directory


@pytest.fixture
def app(registry_dir) -> SearchApp:
    return SearchApp.from_runs_dir(registry_dir, k=5, device="cpu")


def _cards(app: SearchApp) -> list:
    return list(app.results.children)


def _card_text(card) -> str:
    return card.children[1].description


def test_app_opens_the_registry_run(app, run_dir):
    assert len(app.run_select.options) == 1 and app.run_select.value.startswith(f"toy · {run_dir.name[4:]}")
    assert "12 test images (cosine/torch)" in app.status.value and not _cards(app)
    bundle = app._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_enter_in_the_caption_box_searches(app):
    app.caption.value = "a person in a red shirt and blue trousers"  # what Enter does to the text box
    cards = _cards(app)
    assert len(cards) == 5 and [_card_text(c).split()[0] for c in cards] == ["#1", "#2", "#3", "#4", "#5"]
    assert all(c.children[0].value[:4] == b"\x89PNG" for c in cards)  # the result images themselves
    assert "5 results in" in app.status.value and "ms (cosine/torch)" in app.status.value
    scores = [float(_card_text(c).split()[1]) for c in cards]
    assert scores == sorted(scores, reverse=True)
    table = app.controller.last.table
    assert [f"#{r} {s:.3f}" for r, s in zip(table["rank"], table["score"])] == [_card_text(c) for c in cards]
    assert all("1px solid" in c.layout.border for c in cards)  # free text: the person is unknown, no colour


def test_button_slider_and_reranking_search_again(app):
    app.caption.value = "someone wearing green pants with a white top"
    app.k_slider.value = 3
    assert len(_cards(app)) == 3
    app.rerank_select.value = "visual_neighbors"
    assert len(_cards(app)) == 3 and "+ visual_neighbors" in app.status.value
    assert app.controller.last.table.attrs["rerank"] == "visual_neighbors"
    app.results.children = []
    app.search_button.click()
    assert len(_cards(app)) == 3


def test_random_test_caption_marks_the_true_person(app):
    outcome = app.random_search()
    assert outcome.ok and outcome.true_pid is not None and app.caption.value == outcome.caption
    table = outcome.table
    assert outcome.caption in app.controller.search_engine.encoded.captions
    for card, match in zip(_cards(app), table["match"]):
        assert card.layout.border == f"3px solid {MATCH if match else MISS}"
    assert f"true person {outcome.true_pid}" in app.status.value
    again = app.random_button.click() or app.controller.last  # the button does the same
    assert again.ok and again.true_pid is not None


def test_random_captions_are_reproducible(registry_dir):
    drawn = [SearchController.from_runs_dir(registry_dir, seed=3, device="cpu").random_caption() for _ in range(2)]
    assert drawn[0] == drawn[1] and drawn[0] is not None


@pytest.mark.parametrize("caption, message", [
    ("", "Type a description of a person"),
    ("   ", "Type a description of a person"),
    ("qqqz zzxq", "None of the words of this caption is known to the model"),
])
def test_bad_input_gives_a_friendly_message(app, caption, message):
    app.caption.value = "a red shirt"
    assert len(_cards(app)) == 5
    app.caption.value = caption
    app.search_button.click()
    assert message in app.status.value and not _cards(app) and "Traceback" not in app.status.value
    assert not app.controller.last.ok


def test_unknown_words_are_named_in_the_status(app):
    app.caption.value = "a person in a qqqz red shirt"
    assert len(_cards(app)) == 5 and "not in the vocabulary: qqqz" in app.status.value


def test_no_runs_gives_a_message(tmp_path):
    app = SearchApp.from_runs_dir(tmp_path / "empty")
    assert "No trained run under" in app.status.value and app.run_select.options == ()
    app.caption.value = "a red shirt"
    assert "No trained run under" in app.status.value and not _cards(app)
    assert app.random_search() is None and "No trained run" in app.status.value


def test_missing_run_folder_gives_a_message(tmp_path):
    app = SearchApp.from_run_dirs([tmp_path / "baseline-gone"])
    assert "Run baseline-gone cannot be searched" in app.status.value and "is not a run folder" in app.status.value
    app.caption.value = "a red shirt"
    assert "No run is loaded (baseline-gone)" in app.status.value and not _cards(app)


def _stale_copy(run_dir: Path, name: str, val_r1: float) -> Path:
    """A copy of the run whose config no longer fits its weights (as after a model code change)."""
    stale = run_dir.parent / name
    shutil.copytree(run_dir, stale, ignore=shutil.ignore_patterns(".lock"))
    config = json.loads((stale / "config.json").read_text())
    config["model"]["dim"] = 4
    (stale / "config.json").write_text(json.dumps(config))
    metrics = json.loads((stale / "metrics.json").read_text())
    metrics["val"]["R1"] = val_r1
    (stale / "metrics.json").write_text(json.dumps(metrics))
    return stale


def test_switching_runs_and_a_run_that_no_longer_loads(registry_dir, run_dir):
    stale = _stale_copy(run_dir, "toy-000000000000", 101.0)
    try:
        assert available_runs(registry_dir)["dir"].tolist()[0] == str(stale)  # best validation first
        assert best_run(registry_dir, device="cpu").dir == run_dir  # the stale one is skipped
        app = SearchApp.from_runs_dir(registry_dir, device="cpu")
        assert app.run_select.value.startswith("toy · 000000000000")
        assert "cannot be searched" in app.status.value and "do not fit" in app.status.value
        app.caption.value = "a red shirt"
        assert "No run is loaded" in app.status.value
        good = next(label for label in app.run_select.options if "000000000000" not in label)
        app.run_select.value = good  # switching runs searches the caption in the new gallery
        assert len(_cards(app)) == 10 and "10 results in" in app.status.value
    finally:
        shutil.rmtree(stale)


def test_best_run_filters_and_none(registry_dir, tmp_path):
    assert best_run(registry_dir, preset="paper") is None
    assert best_run(tmp_path / "nothing") is None
    assert available_runs(registry_dir, dataset="synthetic:cuhk-like").empty


def test_unexpected_errors_become_messages(app, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.controller.search_engine, "search", broken)
    app.caption.value = "a red shirt"
    assert "The search failed: RuntimeError: boom" in app.status.value and not _cards(app)


def test_click_on_a_result_without_heatmap_provider(registry_dir):
    app = SearchApp.from_runs_dir(registry_dir, heatmap_provider=None, device="cpu")
    assert "Search for a caption first" in app.show_heatmap(0).message
    app.caption.value = "a person in a red shirt"
    _cards(app)[0].children[1].click()
    assert "Word heatmaps are not available" in app.heatmap_view.value


def test_default_heatmap_on_a_model_without_image_tokens_is_a_message(app):
    # the toy's image encoder has no token grid, so attention.word_maps cannot explain it
    app.caption.value = "a person in a red shirt"
    _cards(app)[0].children[1].click()
    assert "No heatmap for this result" in app.heatmap_view.value and "Traceback" not in app.heatmap_view.value


def _toy_search(tmp_path, method: str, changes: dict | None = None):
    """(config, model, tokenizer, CaptionSearch) of a smoke ``method`` model (seed 0, not trained further) over
    the toy dataset's test split."""
    import torch

    from tbps_lib.config import make_config
    from tbps_lib.data.loaders import build_tokenizer, prepare_dataset, train_captions
    from tbps_lib.engine.evaluate import encode
    from tbps_lib.models import build_model
    from tbps_lib.search import CaptionSearch

    cfg = make_config(method, "smoke", dataset=str(write_toy_dataset(tmp_path / "data")), changes=changes or {})
    ds = prepare_dataset(cfg)
    tokenizer = build_tokenizer(cfg, train_captions(ds))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return cfg, model, tokenizer, CaptionSearch(model, tokenizer, encode(model, ds, "test", tokenizer, cfg,
                                                                         torch.device("cpu")))


def test_attention_heatmap_of_a_baseline_model(tmp_path):
    """The default provider on a (randomly initialised) smoke baseline over the toy test split."""
    import numpy as np

    from tbps_lib.data.text import caption_words
    from tbps_lib.demo import attention_heatmap

    cfg, _, _, searcher = _toy_search(tmp_path, "baseline")
    caption = "a person in a red shirt, and blue trousers"
    heat = attention_heatmap(searcher, caption, 3)
    assert [w for w, _ in heat.words] == caption_words(caption)
    assert all(v >= 0 for _, v in heat.words) and any(v > 0 for _, v in heat.words)
    assert dict(heat.words)[","] == 0.0  # punctuation is not weighed
    h, w = cfg.image.img_size
    assert heat.image.shape == (h, w, 3) and 0.0 <= heat.image.min() and heat.image.max() <= 1.0
    controller = SearchController({}, heatmap_provider=attention_heatmap)
    controller.search_engine = searcher
    table = controller.search(caption, k=4).table
    second = int(table["gallery_index"][1])
    outcome = controller.heatmap(second)
    direct = attention_heatmap(searcher, caption, second)
    assert outcome.ok and "result #2" in outcome.message and outcome.gallery_index == second
    assert [w for w, _ in outcome.words] == [w for w, _ in direct.words]
    assert np.allclose([v for _, v in outcome.words], [v for _, v in direct.words], atol=1e-6)
    assert np.allclose(outcome.image, direct.image)
    assert '<img src="data:image/png;base64,' in heatmap_html(outcome)


def test_phrase_heatmap_of_a_laip_model(tmp_path):
    """The default provider on a (randomly initialised) smoke LAIP model: one bidirectional map per noun
    phrase (issue: the demo shows a phrase's map when a result is clicked), the phrases' words shaded; a model
    without the MPM head gets the word heatmap instead, and phrase_heatmap refuses it."""
    import numpy as np

    from tbps_lib.analysis.laip_figures import image_phrase_maps
    from tbps_lib.data.loaders import load_image, normalize_image
    from tbps_lib.data.text import caption_words, extract_noun_phrases
    from tbps_lib.demo import method_heatmap, phrase_heatmap
    from tbps_lib.pretrain import RANDOM_INIT

    cfg, model, tokenizer, searcher = _toy_search(tmp_path, "laip", {**RANDOM_INIT, "model.init_albef": "none"})
    caption = "a person in a red shirt, and blue trousers"
    spans = extract_noun_phrases(caption).word_spans
    assert len(spans) >= 2
    heat = method_heatmap(searcher, caption, 2)
    assert [w for w, _ in heat.words] == caption_words(caption)
    shaded = {i for start, end in spans[:3] for i in range(start, end)}
    assert [i for i, (_, v) in enumerate(heat.words) if v > 0] == sorted(shaded)
    h, w = cfg.image.img_size
    n = min(3, len(spans))
    assert heat.image.shape == (h, n * w + 2 * (n - 1), 3) and 0.0 <= heat.image.min() <= heat.image.max() <= 1.0
    assert "bidirectional attention" in heat.title
    # the first panel is the first phrase's map (its head noun masked) drawn over the image
    from tbps_lib.analysis.attention import overlay

    image = load_image(Path(searcher.encoded.image_paths[2]), (h, w))
    first = image_phrase_maps(model, tokenizer, normalize_image(image), caption, [spans[0][1] - 1])
    assert np.allclose(heat.image[:, :w], overlay(image, first["maps"]["bidirectional"][0]), atol=1e-5)
    controller = SearchController({})
    controller.search_engine = searcher
    controller.search(caption, k=3)
    outcome = controller.heatmap(2)
    assert outcome.ok and outcome.message.startswith("LAIP's bidirectional attention") and outcome.image is not None
    model.mpm_head = None  # no MPM head (e.g. Table IV's ITC+ITM rows): the word heatmap, not a failure
    assert "bidirectional" not in (method_heatmap(searcher, caption, 2).title or "")
    with pytest.raises(ValueError, match="masked phrase head"):
        phrase_heatmap(searcher, caption, 2)


def test_click_on_a_result_asks_the_heatmap_provider(registry_dir):
    asked = []

    def provider(search, caption, gallery_index):
        asked.append((caption, gallery_index))
        return [(w, float(i)) for i, w in enumerate(caption.split())]

    app = SearchApp.from_runs_dir(registry_dir, heatmap_provider=provider, k=3, device="cpu")
    app.caption.value = "a <red> shirt"
    first = app.controller.last.table["gallery_index"][1]
    _cards(app)[1].children[1].click()
    assert asked == [("a <red> shirt", first)]
    view = app.heatmap_view.value
    assert "&lt;red&gt;" in view and "rgba(215, 48, 39, 0.50)" in view and "rgba(215, 48, 39, 1.00)" in view
    app.caption.value = "a blue shirt"  # a new search clears the panel
    assert app.heatmap_view.value == ""


def test_a_failing_heatmap_provider_is_reported(registry_dir):
    def provider(search, caption, gallery_index):
        raise NotImplementedError("no attention maps for this method")

    app = SearchApp.from_runs_dir(registry_dir, heatmap_provider=provider, device="cpu")
    app.caption.value = "a red shirt"
    outcome = app.show_heatmap(int(app.controller.last.table["gallery_index"][0]))
    assert not outcome.ok and "NotImplementedError: no attention maps" in heatmap_html(outcome)


def test_a_selected_run_object_is_used_as_it_is(registry_dir, run_dir):
    from tbps_lib.engine.runs import load_run

    run = load_run(run_dir, device="cpu")
    app = SearchApp.from_runs_dir(registry_dir, dataset="synthetic:cuhk-like", selected=run)  # filtered out
    assert app.run_select.options == (run.name,) and app.controller.search_engine.model is run.model
    assert "12 test images" in app.status.value


def test_an_unknown_selected_run_falls_back_to_the_best(registry_dir, run_dir):
    controller = SearchController.from_runs_dir(registry_dir, selected="toy-ffffffffffff", device="cpu")
    assert controller.selection.ok and controller.runs[controller.selected] == run_dir


# ----------------------------------------------------------------------------------------------------
# Folder galleries and exported runs


@pytest.fixture
def photo_folder(run_dir, tmp_path) -> Path:
    """The run's test images in a plain folder, with one file that is not an image."""
    from tbps_lib.engine.runs import load_run

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in load_run(run_dir, device="cpu").embeddings("test").image_paths:
        shutil.copy2(path, folder / Path(path).name)
    (folder / "broken.jpg").write_text("not a picture", encoding="utf-8")
    return folder


def test_the_gallery_chooser_searches_a_typed_folder(app, photo_folder):
    assert app.gallery_select.value == "split" and app.gallery_path.disabled
    assert app.skipped_view.layout.display == "none"
    app.caption.value = "a person in a red shirt and blue trousers"
    app.gallery_select.value = "folder"
    assert not app.gallery_path.disabled and "Type the path" in app.use_gallery().message
    app.gallery_path.value = str(photo_folder)  # Enter in the path box indexes the folder
    assert "photos: 12 images (1 skipped)" in app.controller.selection.message and "5 results in" in app.status.value
    assert app.controller.search_engine.folder_gallery is not None
    assert app.skipped_view.layout.display == "flex" and app.skipped_view.titles == ("Skipped files (1)",)
    assert "broken.jpg" in app.skipped_view.children[0].value and "not an image" in app.skipped_view.children[0].value
    cards = _cards(app)  # the caption in the box was searched again in the folder
    assert len(cards) == 5 and all("1px solid" in c.layout.border for c in cards)  # no truth in a folder
    assert all(Path(p).parent == photo_folder for p in app.controller.last.table["image"])
    assert app.random_search() is None and "a folder has no captions" in app.status.value
    app.gallery_select.value = "split"
    assert "12 test images" in app.controller.selection.message and app.skipped_view.layout.display == "none"
    assert len(_cards(app)) == 5 and app.controller.search_engine.folder_gallery is None
    app.gallery_select.value = "folder"  # back to the folder: the cached engine, no re-indexing
    assert app.controller.search_engine.folder_gallery.folder == photo_folder.resolve()


def test_a_folder_without_images_gives_a_message(app, tmp_path):
    (tmp_path / "nothing").mkdir()
    app.gallery_path.value = str(tmp_path / "nothing")
    outcome = app.use_gallery()
    assert not outcome.ok and "cannot search the folder" in app.status.value
    assert "has no usable image" in app.status.value
    app.caption.value = "a red shirt"
    assert "No run is loaded" in app.status.value and not _cards(app)


def test_an_exported_run_needs_a_folder_and_then_searches_it(run_dir, photo_folder, tmp_path, monkeypatch):
    from tbps_lib.engine.runs import load_run
    from tbps_lib.export import export_run

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache-home"))
    path = export_run(load_run(run_dir, device="cpu"), tmp_path / "toy.tbps")
    alone = SearchController.from_run_dirs([path], device="cpu")
    assert not alone.selection.ok and "toy.tbps is an exported model: choose a folder" in alone.selection.message
    outcome = alone.set_gallery(photo_folder)
    assert outcome.ok and "12 images (1 skipped)" in outcome.message
    result = alone.search("a person in a red shirt and blue trousers", k=3)
    direct = SearchController.from_run_dirs([run_dir], device="cpu", gallery=photo_folder)
    assert result.table["image"].tolist() == direct.search(result.caption, k=3).table["image"].tolist()
