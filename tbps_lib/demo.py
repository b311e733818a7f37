"""The caption search demo: an ipywidgets app over :class:`tbps_lib.search.CaptionSearch`.

Two layers, so that the logic is tested without a browser:

* :class:`SearchController` - the app's logic in plain Python: which runs can be searched (run folders
  or files written by ``tbps export``), loading one, choosing the gallery (the run's dataset split or a folder
  of images, indexed by ``tbps_lib.gallery`` with bad files skipped and listed), running a search, drawing a random test caption (whose person is then known), and the word-level
  heatmap of a result. Every call returns an outcome with a message for the person using the app;
  problems (empty input, a caption of unknown words only, a run that is missing or does not load) become
  friendly messages, never tracebacks.
* :class:`SearchApp` - the widgets (run selector, gallery chooser with a folder path box and a collapsible
  list of skipped files, caption box searched on Enter or with the button, top-k
  slider, re-ranking selector, "random test caption" button, a grid of result images with rank and score,
  framed green or red when the described person is known, a heatmap panel and a status line with the
  latency), wired to a controller. Display it as the last expression of a notebook cell.

Word heatmaps come from a *heatmap provider*: a callable ``provider(search, caption, gallery_index)``
returning a :class:`WordHeatmap` (or plain ``(word, weight)`` pairs, weights >= 0). The default,
:func:`method_heatmap`, picks by model: for LAIP, :func:`phrase_heatmap` draws the bidirectional attention
map of each noun phrase of the caption over the result (the paper's Figures 2 and 7); for the other methods,
:func:`attention_heatmap` uses ``tbps_lib.analysis.attention``: each word's weight is the share of the
image-caption score it adds (``word_maps``' delta_w: the score minus the score without that word), and the
image shows the caption's gradient map over the result (``overlay``). None shows a message instead; a
provider that cannot explain a model (no image token grid, say) is reported in the panel.
"""
from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from tbps_lib.analysis.retrieval import MATCH, MISS
from tbps_lib.data.loaders import load_image, normalize_image
from tbps_lib.data.text import caption_words
from tbps_lib.engine.evaluate import RERANKERS
from tbps_lib.engine.runs import Run, list_runs, load_run, runs_root
from tbps_lib.export import is_exported_file
from tbps_lib.search import CaptionSearch, SearchInputError, summary_line

log = logging.getLogger(__name__)



@dataclass
class WordHeatmap:
    """What a heatmap provider returns: the caption's words with weights (>= 0) and, optionally, an RGB
    picture (float [H, W, 3] in [0, 1]) of the result image with the map drawn over it."""

    words: list[tuple[str, float]]
    image: np.ndarray | None = None
    title: str | None = None  # what the shading and the picture show (default: the score each word adds)


#: ``provider(search, caption, gallery_index) -> WordHeatmap`` (or ``[(word, weight), ...]``)
HeatmapProvider = Callable[[CaptionSearch, str, int], "WordHeatmap | Sequence[tuple[str, float]]"]


def attention_heatmap(search: CaptionSearch, caption: str, gallery_index: int) -> WordHeatmap:
    """The word-level heatmap of ``caption`` for gallery image ``gallery_index``, from
    ``tbps_lib.analysis.attention.word_maps``: each word's weight is delta_w, the score it adds (negative
    contributions shown as 0; punctuation gets 0), and the picture is the caption-level gradient map over
    the image. Needs a model whose ``image_encoder`` returns a token grid (every registered method)."""
    from tbps_lib.analysis.attention import overlay, word_maps

    words = caption_words(caption)
    scored = [i for i, w in enumerate(words) if w[0].isalnum()]
    if not scored:
        raise ValueError("the caption has no words to weigh")
    image = load_image(Path(search.encoded.image_paths[gallery_index]), tuple(search.model.cfg.image.img_size))
    whole, per_word = word_maps(search.model, normalize_image(image), caption, [(i, i + 1) for i in scored],
                                search.tokenizer)
    delta = dict(zip(scored, per_word.scores.float().cpu().tolist()))
    return WordHeatmap([(w, max(delta.get(i, 0.0), 0.0)) for i, w in enumerate(words)],
                       overlay(image, whole.maps[0]))
def _has_phrase_maps(model: Any) -> bool:
    """Whether ``model`` draws LAIP's phrase maps: ``phrase_attention`` and the MPM head it predicts with."""
    return hasattr(model, "phrase_attention") and getattr(model, "mpm_head", None) is not None


def phrase_heatmap(search: CaptionSearch, caption: str, gallery_index: int, max_phrases: int = 3) -> WordHeatmap:
    """LAIP's bidirectional attention (Eq. (4)-(7); ``analysis.laip_figures.image_phrase_maps``) of the
    caption's first ``max_phrases`` noun phrases (``data.text.extract_noun_phrases``) on gallery image
    ``gallery_index``: each phrase with its last word (its head noun) masked, the maps drawn over the image
    side by side in the caption's order, the phrases' words shaded. Needs a LAIP model with its MPM head."""
    from tbps_lib.analysis.attention import overlay
    from tbps_lib.analysis.laip_figures import image_phrase_maps
    from tbps_lib.data.text import extract_noun_phrases

    if not _has_phrase_maps(search.model):
        raise ValueError("phrase maps need a LAIP model with its masked phrase head")
    words = caption_words(caption)
    spans = list(extract_noun_phrases(caption).word_spans)[:max_phrases]
    if not spans:
        raise ValueError("the caption has no noun phrase")
    image = load_image(Path(search.encoded.image_paths[gallery_index]), tuple(search.model.cfg.image.img_size))
    out = image_phrase_maps(search.model, search.tokenizer, normalize_image(image), caption,
                            [end - 1 for _, end in spans])
    pictures = [overlay(image, m) for m in out["maps"]["bidirectional"]]
    gap = np.ones((pictures[0].shape[0], 2, 3), dtype=pictures[0].dtype)
    shaded = {i for start, end in spans for i in range(start, end)}
    names = ", ".join(f'"{p}"' for p in out["phrases"])
    return WordHeatmap([(w, 1.0 if i in shaded else 0.0) for i, w in enumerate(words)],
                       np.concatenate([x for p in pictures for x in (p, gap)][:-1], axis=1),
                       f"LAIP's bidirectional attention (Eq. (7)) of the noun phrases {names}, left to right, on")


def method_heatmap(search: CaptionSearch, caption: str, gallery_index: int) -> WordHeatmap:
    """The demo's default provider: :func:`phrase_heatmap` for a LAIP model with its MPM head (the paper's
    phrase maps), :func:`attention_heatmap` for every other model."""
    if _has_phrase_maps(search.model):
        return phrase_heatmap(search, caption, gallery_index)
    return attention_heatmap(search, caption, gallery_index)


#: Errors of opening a run or a gallery that the app reports as a message (missing folder or files, weights
#: that no longer fit the model code, a config of an unknown method, an unreadable dataset, a gallery folder
#: with no usable image).
RUN_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError)


# ----------------------------------------------------------------------------------------------------
# Runs


def available_runs(runs_dir: str | Path | None = None, dataset: str | None = None,
                   preset: str | None = None) -> pd.DataFrame:
    """The finished runs of the registry (``list_runs``), optionally of one dataset spec and preset, best
    validation score (the metric each run was selected by) first."""
    table = list_runs(runs_dir)
    table = table[table["status"] == "done"]
    if dataset is not None:
        table = table[table["dataset"] == dataset]
    if preset is not None:
        table = table[table["preset"] == preset]
    return table.sort_values(["val_select", "dir"], ascending=[False, True], kind="stable").reset_index(drop=True)


def best_run(runs_dir: str | Path | None = None, dataset: str | None = None, preset: str | None = None,
             device: str | None = None) -> Run | None:
    """The finished run with the best validation score whose model loads, or None when there is none.

    Runs whose weights no longer fit the model code (or that cannot be opened) are skipped with a log line.
    """
    for directory in available_runs(runs_dir, dataset, preset)["dir"]:
        try:
            run = load_run(directory, device=device)
            run.model  # noqa: B018 - loads (and checks) the selected weights
            return run
        except RUN_ERRORS as e:
            log.warning("skipping run %s: %s", directory, e)
    return None


def run_label(row: pd.Series) -> str:
    """``method · hash · val <metric> x`` for the run selector."""
    score = "" if pd.isna(row.get("val_select")) else f" · val {row['val_select']:.1f}"
    return f"{row['method']} · {row['hash']}{score}"


# ----------------------------------------------------------------------------------------------------
# Controller


@dataclass
class SearchOutcome:
    """What one action produced: ``ok`` with a result ``table``, or a ``message`` explaining why not."""

    ok: bool
    message: str
    table: pd.DataFrame | None = None
    caption: str = ""
    true_pid: int | None = None


@dataclass
class HeatmapOutcome:
    """The word weights of the current caption for one result image, or a message."""

    ok: bool
    message: str
    words: list[tuple[str, float]] = field(default_factory=list)
    gallery_index: int | None = None
    image: np.ndarray | None = None


class SearchController:
    """The demo's logic: a set of runs (name -> folder), the gallery, the loaded searches, the last result.

    ``runs`` maps a display label to a run folder or an exported file (``tbps export``); one that is missing,
    unfinished or no longer loadable gives a message when it is selected. ``gallery``: None for the run's
    ``split``, or a folder of images (an exported file needs one). ``seed`` makes the random test captions
    reproducible.
    """

    def __init__(self, runs: dict[str, str | Path], split: str = "test",
                 heatmap_provider: HeatmapProvider | None = method_heatmap, seed: int = 0,
                 device: str | None = None, gallery: str | Path | None = None,
                 empty_message: str = "No trained run to search: train one with `tbps train --method baseline` "
                                      "or run notebooks/00_quickstart.ipynb.") -> None:
        self.runs = {label: Path(d) for label, d in runs.items()}
        self.split = split
        self.gallery = None if gallery in (None, "") else str(gallery)
        self.heatmap_provider = heatmap_provider
        self.device = device
        self.empty_message = empty_message
        self.rng = np.random.default_rng(seed)
        self.selected: str | None = None
        self.search_engine: CaptionSearch | None = None
        self.last: SearchOutcome | None = None
        self.selection = SearchOutcome(False, empty_message)  # the outcome of the last select()
        self._engines: dict[tuple[str, str | None], CaptionSearch] = {}
        self._loaded: dict[str, Run] = {}  # runs already open in the caller (not loaded again)

    @classmethod
    def from_runs_dir(cls, runs_dir: str | Path | None = None, dataset: str | None = None,
                      preset: str | None = None, selected: str | Path | Run | None = None,
                      **kwargs: Any) -> "SearchController":
        """Every finished run of the registry (optionally of one dataset and preset), best validation first;
        ``selected`` (a run, folder or name) is opened first, else (or if unknown) the best one. A :class:`Run` given as
        ``selected`` is used as it is (its model is not loaded again) and listed even if the filters miss it."""
        table = available_runs(runs_dir, dataset, preset)
        runs = {run_label(row): row["dir"] for _, row in table.iterrows()}
        message = (f"No trained run under {runs_root(runs_dir)}: train one with `tbps train --method baseline` "
                   f"or run notebooks/00_quickstart.ipynb.")
        controller = cls(runs, empty_message=message, **kwargs)
        if isinstance(selected, Run):
            label = controller.label_of(selected) or selected.name
            controller.runs.setdefault(label, selected.dir)
            controller._loaded[label] = selected
        label = controller.label_of(selected) if selected is not None else None
        controller.select(label or controller.default_label())
        return controller

    @classmethod
    def from_run_dirs(cls, dirs: Iterable[str | Path], **kwargs: Any) -> "SearchController":
        """The given run folders (labelled by folder name), the first one selected."""
        controller = cls({Path(d).name: d for d in dirs}, **kwargs)
        controller.select(controller.default_label())
        return controller

    @property
    def labels(self) -> list[str]:
        return list(self.runs)

    def default_label(self) -> str | None:
        return self.labels[0] if self.runs else None

    def label_of(self, run: str | Path | Run) -> str | None:
        """The label of a run given as a :class:`Run`, a folder or a folder name (None if unknown)."""
        name = run.name if isinstance(run, Run) else Path(run).name
        return next((label for label, d in self.runs.items() if d.name == name), None)

    # -- actions --------------------------------------------------------------------------------
    def select(self, label: str | None) -> SearchOutcome:
        """Open the run ``label`` (its gallery of ``split``); a run that cannot be opened gives a message."""
        self.selected, self.search_engine = label, None
        self.selection = self._open(label)
        return self.selection

    def set_gallery(self, folder: str | Path | None) -> SearchOutcome:
        """Search ``folder`` (a folder of images; indexed on first use, then cached) instead of the run's
        split, or the split again with None or an empty path."""
        self.gallery = None if folder is None or not str(folder).strip() else str(Path(str(folder).strip()).expanduser())
        return self.select(self.selected)

    @property
    def skipped(self) -> list[Any]:
        """The skipped files (``tbps_lib.gallery.SkippedFile``) of the current folder gallery (else empty)."""
        found = self.search_engine.folder_gallery if self.search_engine is not None else None
        return list(found.skipped) if found is not None else []

    def _open(self, label: str | None) -> SearchOutcome:
        if label is None:
            return SearchOutcome(False, self.empty_message)
        if label not in self.runs:
            return SearchOutcome(False, f"Unknown run {label!r}; choose one of {self.labels}.")
        key = (label, self.gallery)
        if key not in self._engines:
            source = self.runs[label]
            try:
                if is_exported_file(source):
                    if self.gallery is None:
                        return SearchOutcome(False, f"{label} is an exported model: choose a folder of images "
                                                    f"to search.")
                    self._engines[key] = CaptionSearch.from_file(source, self.gallery, device=self.device)
                else:
                    run = self._loaded.get(label) or load_run(source, device=self.device)
                    self._loaded.setdefault(label, run)
                    self._engines[key] = CaptionSearch.from_run(run, self.split, gallery=self.gallery)
            except RUN_ERRORS as e:
                if self.gallery is not None:
                    return SearchOutcome(False, f"Run {label} cannot search the folder {self.gallery}: {e}")
                return SearchOutcome(False, f"Run {label} cannot be searched: {e}")
        self.search_engine = self._engines[key]
        found = self.search_engine.folder_gallery
        if found is None:
            return SearchOutcome(True, f"Run {label}: {self.search_engine.gallery_size} {self.split} images "
                                       f"({self.search_engine.scoring}).")
        return SearchOutcome(True, f"Run {label}: {found.summary()} ({self.search_engine.scoring}).")

    def search(self, caption: str, k: int = 10, rerank: str | None = None,
               true_pid: int | None = None) -> SearchOutcome:
        """Search ``caption`` in the selected run's gallery; problems become the outcome's message."""
        if self.search_engine is None:
            outcome = SearchOutcome(False, self.empty_message if not self.runs else
                                    f"No run is loaded ({self.selected or 'none selected'}): choose another run.",
                                    caption=caption)
        else:
            try:
                table = self.search_engine.search(caption, k=k, rerank=rerank, true_pid=true_pid)
                outcome = SearchOutcome(True, summary_line(table), table, caption, table.attrs["true_pid"])
            except SearchInputError as e:
                outcome = SearchOutcome(False, str(e), caption=caption)
            except Exception as e:  # the app shows a message instead of a traceback, and logs the details
                log.exception("search failed")
                outcome = SearchOutcome(False, f"The search failed: {type(e).__name__}: {e}", caption=caption)
        self.last = outcome
        return outcome

    def random_caption(self) -> tuple[str, int] | None:
        """A caption of the selected gallery's split and its person id (None without a loaded run, or for a
        folder gallery, which has no captions)."""
        if self.search_engine is None or self.search_engine.folder_gallery is not None:
            return None
        return self.search_engine.random_query(self.rng)

    def heatmap(self, gallery_index: int) -> HeatmapOutcome:
        """The word-level heatmap of the last searched caption for the gallery image ``gallery_index``."""
        if self.last is None or not self.last.ok or self.search_engine is None:
            return HeatmapOutcome(False, "Search for a caption first.")
        if self.heatmap_provider is None:
            return HeatmapOutcome(False, "Word heatmaps are not available: no heatmap provider is set "
                                         "(they come from tbps_lib.analysis.attention).", gallery_index=gallery_index)
        try:
            found = self.heatmap_provider(self.search_engine, self.last.caption, int(gallery_index))
            heatmap = found if isinstance(found, WordHeatmap) else WordHeatmap(list(found))
            words = [(str(w), float(v)) for w, v in heatmap.words]
        except Exception as e:  # a provider that cannot explain this model is reported, not raised
            log.exception("heatmap failed")
            return HeatmapOutcome(False, f"No heatmap for this result: {type(e).__name__}: {e}",
                                  gallery_index=gallery_index)
        row = self.last.table.loc[self.last.table["gallery_index"] == gallery_index]
        where = f"result #{int(row['rank'].iloc[0])}" if len(row) else f"gallery image {gallery_index}"
        title = heatmap.title or "How much each word of the caption adds to the score of"
        return HeatmapOutcome(True, f"{title} {where} (darker: more).", words, gallery_index, heatmap.image)


# ----------------------------------------------------------------------------------------------------
# Widgets

_RERANK_OPTIONS = [("none", "none")] + [(name.replace("_", " "), name) for name in RERANKERS]


class SearchApp:
    """The ipywidgets front end of a :class:`SearchController` (see the module docstring).

    Widgets are attributes (``run_select``, ``gallery_select``, ``gallery_path``, ``gallery_button``,
    ``skipped_view``, ``caption``, ``search_button``, ``k_slider``, ``rerank_select``, ``random_button``,
    ``results``, ``heatmap_view``, ``status``) so that tests can set values and click.
    """

    image_size = ("48px", "96px")  # width, height of a result thumbnail

    def __init__(self, controller: SearchController, k: int = 10) -> None:
        import ipywidgets as w

        self.controller = controller
        self._w = w
        self.run_select = w.Dropdown(options=controller.labels, value=controller.selected, description="run",
                                     layout=w.Layout(width="420px"))
        folder = controller.gallery is not None
        self.gallery_select = w.Dropdown(options=[(f"{controller.split} split", "split"), ("folder", "folder")],
                                         value="folder" if folder else "split", description="gallery")
        self.gallery_path = w.Text(value=controller.gallery or "", placeholder="a folder of images, e.g. ~/photos",
                                   continuous_update=False, disabled=not folder, layout=w.Layout(width="360px"))
        self.gallery_button = w.Button(description="Index folder", icon="folder-open", disabled=not folder)
        self.skipped_view = w.Accordion(children=[w.HTML()], layout=w.Layout(display="none"))
        self.caption = w.Text(placeholder="describe a person, e.g. a woman in a red coat with a black bag",
                              continuous_update=False, layout=w.Layout(width="560px"))
        self.search_button = w.Button(description="Search", icon="search", button_style="primary")
        self.k_slider = w.IntSlider(value=k, min=1, max=50, description="top k", continuous_update=False)
        self.rerank_select = w.Dropdown(options=_RERANK_OPTIONS, value="none", description="re-rank")
        self.random_button = w.Button(description="Random test caption", icon="random",
                                      layout=w.Layout(width="200px"))
        self.results = w.GridBox(layout=w.Layout(grid_template_columns="repeat(auto-fill, 92px)", grid_gap="6px"))
        self.heatmap_view = w.HTML()
        self.status = w.HTML()
        for widget, css in ((self.caption, "tbps-caption"), (self.search_button, "tbps-search"),
                            (self.random_button, "tbps-random"), (self.results, "tbps-results"),
                            (self.status, "tbps-status"), (self.heatmap_view, "tbps-heatmap"),
                            (self.gallery_select, "tbps-gallery-select"), (self.gallery_path, "tbps-gallery-path"), (self.gallery_button, "tbps-gallery-button"),
                            (self.skipped_view, "tbps-skipped")):
            widget.add_class(css)
        self._true_pid: int | None = None
        self.caption.observe(self._on_caption, names="value")
        self.search_button.on_click(lambda _: self.run_search())
        self.random_button.on_click(lambda _: self.random_search())
        self.run_select.observe(self._on_run, names="value")
        self.gallery_select.observe(self._on_gallery_kind, names="value")
        self.gallery_path.observe(lambda _: self.use_gallery(), names="value")
        self.gallery_button.on_click(lambda _: self.use_gallery())
        self.k_slider.observe(self._on_setting, names="value")
        self.rerank_select.observe(self._on_setting, names="value")
        self.root = w.VBox([
            w.HBox([self.run_select, self.random_button]),
            w.HBox([self.gallery_select, self.gallery_path, self.gallery_button]),
            w.HBox([self.caption, self.search_button]),
            w.HBox([self.k_slider, self.rerank_select]),
            self.status, self.skipped_view, self.results, self.heatmap_view])
        self._show_status(controller.selection.ok, controller.selection.message)
        self._show_skipped()

    @classmethod
    def from_runs_dir(cls, runs_dir: str | Path | None = None, dataset: str | None = None,
                      preset: str | None = None, selected: str | Path | Run | None = None,
                      heatmap_provider: HeatmapProvider | None = method_heatmap, k: int = 10,
                      **kwargs: Any) -> "SearchApp":
        """An app over every finished run of the registry (see :meth:`SearchController.from_runs_dir`)."""
        return cls(SearchController.from_runs_dir(runs_dir, dataset, preset, selected,
                                                  heatmap_provider=heatmap_provider, **kwargs), k=k)

    @classmethod
    def from_run_dirs(cls, dirs: Iterable[str | Path],
                      heatmap_provider: HeatmapProvider | None = method_heatmap, k: int = 10,
                      **kwargs: Any) -> "SearchApp":
        """An app over the given run folders."""
        return cls(SearchController.from_run_dirs(dirs, heatmap_provider=heatmap_provider, **kwargs), k=k)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.root._repr_mimebundle_(**kwargs)

    # -- callbacks ------------------------------------------------------------------------------
    @property
    def rerank(self) -> str | None:
        return None if self.rerank_select.value == "none" else self.rerank_select.value

    def run_search(self, true_pid: int | None = None) -> SearchOutcome:
        """Search the caption box's text with the slider's k and the selected re-ranking; show the result."""
        outcome = self.controller.search(self.caption.value, k=self.k_slider.value, rerank=self.rerank,
                                         true_pid=true_pid)
        self.heatmap_view.value = ""
        self._show_results(outcome.table if outcome.ok else None)
        self._show_status(outcome.ok, outcome.message)
        return outcome

    def random_search(self) -> SearchOutcome | None:
        """Put a random caption of the split in the box and search it, marking its true person."""
        drawn = self.controller.random_caption()
        if drawn is None:
            folder = self.controller.search_engine is not None and self.controller.gallery is not None
            self._show_status(False, "Random test captions come from the dataset split; a folder has no captions: "
                                     "type a description." if folder else self.controller.empty_message)
            return None
        caption, pid = drawn
        if self.caption.value == caption:
            return self.run_search(true_pid=pid)
        self._true_pid = pid
        self.caption.value = caption  # the observer searches it, with the truth
        return self.controller.last

    def _on_caption(self, change: dict) -> None:
        pid, self._true_pid = self._true_pid, None
        self.run_search(true_pid=pid)

    def _on_setting(self, change: dict) -> None:
        if self.caption.value.strip():
            last = self.controller.last
            self.run_search(true_pid=last.true_pid if last and last.caption == self.caption.value else None)

    def _on_run(self, change: dict) -> None:
        self._after_gallery(self.controller.select(change["new"]))

    def _on_gallery_kind(self, change: dict) -> None:
        folder = change["new"] == "folder"
        self.gallery_path.disabled = self.gallery_button.disabled = not folder
        if not folder:
            self._after_gallery(self.controller.set_gallery(None))
        elif self.gallery_path.value.strip():
            self.use_gallery()

    def use_gallery(self) -> SearchOutcome:
        """Search the folder typed in ``gallery_path`` (indexing it on first use; shows the skipped files)."""
        if self.gallery_select.value != "folder":
            self.gallery_select.value = "folder"  # its observer enables the path box and indexes the folder
            return self.controller.selection
        if not self.gallery_path.value.strip():
            outcome = SearchOutcome(False, "Type the path of a folder of images.")
            self._show_status(False, outcome.message)
            return outcome
        self._show_status(True, f"Indexing {self.gallery_path.value.strip()} ...")
        outcome = self.controller.set_gallery(self.gallery_path.value)
        self._after_gallery(outcome)
        return outcome

    def _after_gallery(self, outcome: SearchOutcome) -> None:
        self._show_results(None)
        self._show_status(outcome.ok, outcome.message)
        self._show_skipped()
        if outcome.ok and self.caption.value.strip():
            self.run_search()

    def show_heatmap(self, gallery_index: int) -> HeatmapOutcome:
        """Show the word heatmap of the current caption for one result (the click on a result)."""
        outcome = self.controller.heatmap(gallery_index)
        self.heatmap_view.value = heatmap_html(outcome)
        return outcome

    # -- rendering ------------------------------------------------------------------------------
    def _show_status(self, ok: bool, message: str) -> None:
        colour = "#333" if ok else MISS
        self.status.value = f'<span style="color:{colour}">{html.escape(message)}</span>'

    def _show_skipped(self) -> None:
        """The collapsible list of the folder's skipped files (hidden when there are none)."""
        skipped = self.controller.skipped
        self.skipped_view.layout.display = "flex" if skipped else "none"
        self.skipped_view.titles = (f"Skipped files ({len(skipped)})",)
        rows = "".join(f"<tr><td>{html.escape(s.path)}</td><td>{html.escape(s.reason)}</td></tr>" for s in skipped)
        self.skipped_view.children[0].value = f"<table><tr><th>file</th><th>reason</th></tr>{rows}</table>"
        self.skipped_view.selected_index = None

    def _show_results(self, table: pd.DataFrame | None) -> None:
        self.results.children = [] if table is None else [self._card(row) for row in table.itertuples()]

    def _card(self, row: Any) -> Any:
        w = self._w
        path = Path(row.image)
        image = w.Image(value=path.read_bytes(), format=path.suffix.lstrip(".").lower() or "png",
                        layout=w.Layout(width=self.image_size[0], height=self.image_size[1]))
        button = w.Button(description=f"#{row.rank} {row.score:.3f}", tooltip=f"person {row.pid}: word heatmap",
                          layout=w.Layout(width="88px"))
        button.on_click(lambda _, g=int(row.gallery_index): self.show_heatmap(g))
        border = "3px solid " + (MATCH if row.match is True else MISS) if row.match is not None else "1px solid #ccc"
        card = w.VBox([image, button], layout=w.Layout(border=border, align_items="center", padding="2px"))
        card.add_class("tbps-result")
        return card


def heatmap_html(outcome: HeatmapOutcome) -> str:
    """The caption's words, each shaded by its weight (relative to the largest), or the outcome's message."""
    if not outcome.ok:
        return f"<i>{html.escape(outcome.message)}</i>"
    top = max((v for _, v in outcome.words), default=0.0) or 1.0
    spans = " ".join(f'<span title="{v:.3f}" style="background: rgba(215, 48, 39, {max(v, 0.0) / top:.2f}); '
                     f'padding: 1px 2px">{html.escape(word)}</span>' for word, v in outcome.words)
    picture = "" if outcome.image is None else (
        f'<img src="data:image/png;base64,{png_base64(outcome.image)}" style="height: 160px; margin-right: 12px">')
    return (f"<div>{html.escape(outcome.message)}</div><div style='display: flex; align-items: center'>"
            f"{picture}<div style='line-height: 1.8'>{spans}</div></div>")


def png_base64(image: np.ndarray) -> str:
    """An RGB float [H, W, 3] picture in [0, 1] (or uint8) as base64 PNG, for an inline ``<img>``."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


__all__ = ["WordHeatmap", "HeatmapProvider", "attention_heatmap", "available_runs", "best_run", "run_label",
           "SearchOutcome", "HeatmapOutcome", "SearchController", "SearchApp", "heatmap_html", "png_base64"]
