"""Saving figures the one way every notebook does (PNG and PDF under ``figures/``), and the analysis figures
of notebooks 09-11 built from trained runs, so that notebooks and ``tbps figures`` draw them with the same
code.

Each builder takes ``{method: Run}`` (runs from :func:`load_runs`: by default every registered method) and
returns the figure with the numbers that make it checkable. Every builder works for every method through
the model contract only: the modality gap and t-SNE read the ``"global"`` embedding every ``encode_*``
returns (for methods whose score adds other terms, e.g. part-level's coarse/fine or ACSA's entities, that
is one part of what they retrieve with); the heatmaps differentiate ``pair_scores`` with respect to the
image encoder's tokens; decoder panels come only from the optional ``decoder_attention`` hook (of the
registered methods only Sew/MCM has one; part-level's decoder attends from learnt part tokens, not words,
and has its own registered figure). Each method declares its figures in the registry (``figures`` of
``register_method``: figure name -> builder with the :data:`tbps_lib.models.registry.FigureFn` signature);
:func:`regenerate` trains or loads the runs and saves the figures of every registered method (those that
apply to the runs). Sew/MCM declares these (the functions at the end of the "Figure builders" section):

====================================  ===================================================================
figure name                           what it rebuilds
====================================  ===================================================================
``sew_fig4_singular_values``          Sew Fig. 4: singular values of image / text embeddings, log gap
``sew_fig6_tsne``                     Sew Fig. 6: t-SNE of image and text features of a few identities
``sew_fig5_attention``                Sew Fig. 5: caption- and word-level heatmaps per method
``pointing_game``                     no paper: word-heatmap peaks in the named part's mask (synthetic)
``sew_mcm_decoder_cross_attention``   the MCM decoder's word-to-image cross-attention (methods that
                                      expose ``decoder_attention``; cf. the part-level paper's Fig. 4)
``steps_<paper>``                     no paper figure: each ablation step's paper Δ beside ours with its
                                      noise band (:func:`step_delta_figure`, notebooks 03 and 13)
====================================  ===================================================================
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tbps_lib.config import WORKBOOK_ROOT
from tbps_lib.models.sew_mcm import DECODER, FIG4, FIG5, FIG6, POINTING  # Sew/MCM's figure names

def figures_dir() -> Path:
    """``$TBPS_FIGURES`` if set, else ``figures/`` at the repository root (next to ``tbps_lib/``)."""
    env = os.environ.get("TBPS_FIGURES")
    return Path(env) if env else WORKBOOK_ROOT / "figures"


def save_figure(fig: Figure, name: str, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``NAME.png`` and ``NAME.pdf``; return the two paths.

    PDF metadata carries no creation date, so regenerating an unchanged figure gives the same bytes.
    """
    if not name or "/" in name or name.endswith((".png", ".pdf")):
        raise ValueError(f"figure name must be a bare name without extension or folder, got {name!r}")
    out = figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return paths


# ------------------------------------------------------------------------------------------------------
# Runs


STEP_COLORS = {"agree": "tab:green", "disagree": "tab:red", "within noise": "tab:gray"}
"""Colour of our Δ per step result (:data:`tbps_lib.analysis.tables.COUNTED`); uncounted steps are not drawn."""


def step_delta_figure(steps: pd.DataFrame, paper: str) -> Figure:
    """One paper's ablation steps side by side: the paper's Δ (black diamond) and ours (dot, coloured by
    result) with its noise band as an error bar (the ± ``noise`` of
    :func:`tbps_lib.analysis.tables.paired_difference`, 2 standard errors of the paired difference).

    ``steps``: :func:`~tbps_lib.analysis.tables.all_steps` lines (or :func:`sign_agreement`'s with a
    ``repeat`` column); drawn are the lines of ``paper`` with a counted result that are not repetitions of
    a pair already drawn. Paper and workbook Δ share one axis (points of the metric); the workbook's
    absolute scale differs from the paper's, so read the sign and whether the bar crosses zero. A paper
    with no such step gives a figure that says so.
    """
    import matplotlib.pyplot as plt

    from tbps_lib.analysis.tables import COUNTED

    mine = steps[(steps["paper"] == paper) & steps["result"].isin(COUNTED)]
    if "repeat" in mine.columns:
        mine = mine[~mine["repeat"].astype(bool)]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * max(len(mine), 2) + 1.2))
    if mine.empty:
        ax.text(0.5, 0.5, f"{paper}: no step measured with two or more seeds yet", ha="center", va="center")
        ax.axis("off")
        return fig
    y = np.arange(len(mine))[::-1]
    labels = [f"T{r.table} {r.what} [{r.dataset}]" for r in mine.itertuples()]
    ax.axvline(0.0, color="black", lw=0.8)
    ax.scatter(mine["paper Δ"], y + 0.15, marker="D", color="black", label="paper Δ", zorder=3)
    for yy, (_, r) in zip(y, mine.iterrows()):
        ax.errorbar(r["ours Δ"], yy - 0.15, xerr=r["noise"], fmt="o", color=STEP_COLORS[r["result"]],
                    capsize=3, zorder=3)
    for result, color in STEP_COLORS.items():
        ax.errorbar([], [], xerr=[], fmt="o", color=color, capsize=3, label=f"ours ± noise: {result}")
    ax.set_yticks(y, labels, fontsize=8)
    metric = mine["metric"].iloc[0]
    ax.set_xlabel(f"Δ {metric} (points): to-row minus from-row")
    counts = mine["result"].value_counts()
    ax.set_title(f"{paper}: " + ", ".join(f"{counts.get(c, 0)} {c}" for c in COUNTED), fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a point
    fig.tight_layout()
    return fig


def load_runs(methods: Sequence[str] | None = None, mode: str = "smoke", data: str | None = None,
              runs_dir: str | os.PathLike | None = None, progress: bool = False,
              changes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{method: Run}`` from the run registry, training the runs that are missing (``train_or_load``):
    each method's default config (``make_config(method, mode, data, changes)``) plus ``changes``, the
    budget's (``NotebookParams.changes``: in the ``ci`` budget 12-step runs; none in ``full``, so the runs
    are the default runs ``tbps reproduce`` trains). ``methods`` None: every registered method
    (``models.registry.list_methods``)."""
    from tbps_lib.config import make_config
    from tbps_lib.engine.runs import train_or_load
    from tbps_lib.models.registry import list_methods

    methods = list_methods() if methods is None else list(methods)
    if not methods:
        raise ValueError("at least one method is needed")
    return {m: train_or_load(make_config(m, mode, data, changes), runs_dir=runs_dir, progress=progress)
            for m in methods}


def _data_label(runs: Mapping[str, Any], split: str) -> str:
    run = next(iter(runs.values()))
    return f"{run.config.data.dataset}, {split} split, {run.config.preset} preset"


# ------------------------------------------------------------------------------------------------------
# Figure builders


def modality_gap_figure(runs: Mapping[str, Any], split: str = "test") -> tuple[Figure, pd.DataFrame]:
    """Sew Fig. 4: spectra of each run's global image and text embeddings of ``split`` (every gallery image
    and every caption), and the gap table (:func:`tbps_lib.analysis.modality_gap.gap_table`)."""
    from tbps_lib.analysis.modality_gap import gap_table, modality_spectra, plot_spectra

    spectra = {}
    for name, run in runs.items():
        enc = run.embeddings(split)
        spectra[name] = modality_spectra(enc.image_feats["global"], enc.text_feats["global"])
    return plot_spectra(spectra, title=f"Singular values of the embedding covariance ({_data_label(runs, split)})"), \
        gap_table(spectra)


def tsne_figure(runs: Mapping[str, Any], split: str = "test", n_ids: int = 12,
                seed: int = 0) -> tuple[Figure, pd.DataFrame]:
    """Sew Fig. 6: t-SNE maps of the same ``n_ids`` identities (fewer if the split has fewer) for every run,
    and their purity / silhouette scores in the feature space and on the map (one row per method and space).
    ``table.attrs["sample"]`` counts the images and captions of each drawn identity (the same for every run
    of the same data)."""
    from tbps_lib.analysis.embedding_map import map_scores, plot_maps, sample_identities, sample_table, tsne_map

    maps, tables = {}, []
    for name, run in runs.items():
        enc = run.embeddings(split)
        n_ids = min(n_ids, len(set(enc.gallery_pids.tolist()) & set(enc.query_pids.tolist())))
        sample = sample_identities(enc.image_feats["global"], enc.text_feats["global"], enc.gallery_pids,
                                   enc.query_pids, n_ids=n_ids, seed=seed)
        coords = tsne_map(sample.features, seed=seed)
        maps[name] = (sample, coords)
        tables.append(map_scores(sample, coords).assign(method=name))
    table = pd.concat(tables).rename_axis("space").reset_index().set_index(["method", "space"])
    table.attrs["sample"] = sample_table(next(iter(maps.values()))[0])
    n_img = int((next(iter(maps.values()))[0].modality == "image").sum())
    title = f"t-SNE of {n_ids} identities ({n_img} images, {len(next(iter(maps.values()))[0].pids) - n_img} " \
            f"captions; {_data_label(runs, split)})"
    return plot_maps(maps, title=title), table


def _display_image(path: str | os.PathLike) -> "Any":
    """The dataset image as uint8 [3, H, W] at its own size (for overlays)."""
    import torch
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def attention_examples(runs: Mapping[str, Any], split: str = "test", n_examples: int = 3, n_words: int = 2,
                       seed: int = 0) -> list[Any]:
    """``n_examples`` captions of ``split`` (drawn reproducibly among those naming at least ``n_words``
    different visible parts) with every run's caption-level map and the word-level maps of the first word
    of each of their first ``n_words`` parts (:func:`tbps_lib.analysis.attention.word_maps`)."""
    from tbps_lib.analysis.attention import AttentionExample, pointing_targets, word_maps
    from tbps_lib.data.loaders import load_image, normalize_image

    first = next(iter(runs.values()))
    records = first.dataset.split(split)
    pairs = [(r, c) for r in records for c in r.captions]
    chosen = []
    for i in np.random.default_rng(seed).permutation(len(pairs)):
        record, caption = pairs[i]
        by_slot = {}  # the first word naming each slot, so that the maps show different parts
        for index, word, slot in pointing_targets(caption, record.meta):
            by_slot.setdefault(slot, (index, word))
        words = list(by_slot.values())[:n_words]
        if len(words) == n_words:
            chosen.append((record, caption, words))
        if len(chosen) == n_examples:
            break
    examples = []
    for record, caption, words in chosen:
        path = first.dataset.image_path(record)
        cap_maps, w_maps = {}, {}
        for name, run in runs.items():
            image = normalize_image(load_image(path, tuple(run.config.image.img_size)))
            whole, per_word = word_maps(run.model, image, caption, [(w, w + 1) for w, _ in words], run.tokenizer)
            cap_maps[name], w_maps[name] = whole.maps[0].cpu(), per_word.maps.cpu()
        examples.append(AttentionExample(_display_image(path), caption, words, cap_maps, w_maps, str(path)))
    return examples


def attention_figure(runs: Mapping[str, Any], split: str = "test", n_examples: int = 3, n_words: int = 2,
                     seed: int = 0) -> tuple[Figure, list[Any]]:
    """Sew Fig. 5 for every run: caption-level and word-level heatmaps of the same examples."""
    from tbps_lib.analysis.attention import plot_attention_examples

    examples = attention_examples(runs, split, n_examples, n_words, seed)
    if not examples:
        raise ValueError(f"no caption of {split} names {n_words} parts")
    return plot_attention_examples(examples), examples


def pointing_tables(runs: Mapping[str, Any], split: str = "test", n_captions: int = 120, seed: int = 0,
                    unit: str = "word", source: str = "gradient") -> pd.DataFrame:
    """The pointing game (:func:`tbps_lib.analysis.attention.pointing_game`) of every run on the same
    captions, one row per (method, caption, part word). ``source="decoder"`` runs only the methods that
    expose decoder cross-attention. Empty when the data has no part masks (real datasets)."""
    from tbps_lib.analysis.attention import has_decoder_attention, pointing_game

    tables = []
    for name, run in runs.items():
        records = run.dataset.split(split)
        if not records or not run.dataset.has_part_masks:
            return pd.DataFrame()
        if source == "decoder" and not has_decoder_attention(run.model):
            continue
        table = pointing_game(run.model, run.tokenizer, run.dataset, tuple(run.config.image.img_size), split,
                              n_captions=n_captions, seed=seed, unit=unit, source=source)
        tables.append(table.assign(method=name))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def pointing_figure(summary: pd.DataFrame,
                    title: str = "Pointing game: peak of the word map inside the named part") -> Figure:
    """Bars of the word-map hit rate per part and method (from ``pointing_summary(table)``), with the
    caption-level map's hit rate and the chance level (a random peak cell) as markers."""
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(summary.index.get_level_values(0)))
    slots = list(dict.fromkeys(summary.index.get_level_values(1)))
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * len(slots) * max(1, len(methods)) / 2, 3.2))
    width = 0.8 / len(methods)
    x = np.arange(len(slots))
    for i, m in enumerate(methods):
        rows = summary.loc[m].reindex(slots)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, rows["hit_%"], width, label=f"{m}: word map")
        ax.scatter(pos, rows["caption_hit_%"], marker="_", s=120, color="k", zorder=3,
                   label="caption map" if i == 0 else None)
        ax.scatter(pos, rows["chance_grid_%"], marker="x", s=25, color="0.4", zorder=3,
                   label="chance (random cell)" if i == 0 else None)
    ax.set_xticks(x, [f"{s}\n(n={int(summary.loc[methods[0]].reindex(slots).loc[s, 'n'])})" for s in slots],
                  fontsize=7)
    ax.set_ylabel("peak inside the part (%)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def decoder_attention_figure(runs: Mapping[str, Any], examples: Sequence[Any]) -> Figure | None:
    """Cross-attention of each decoder-equipped run's decoder from the examples' part words to the image
    (one row per example and run); None when no run exposes ``decoder_attention``."""
    import matplotlib.pyplot as plt

    from tbps_lib.analysis.attention import clear_image_axes, decoder_word_maps, has_decoder_attention, overlay
    from tbps_lib.data.loaders import load_image, normalize_image

    runs = {n: r for n, r in runs.items() if has_decoder_attention(r.model)}
    if not runs or not examples:
        return None
    n_words = max(len(e.words) for e in examples)
    rows = [(ex, name, run) for ex in examples for name, run in runs.items()]
    fig, axes = plt.subplots(len(rows), 1 + n_words, figsize=(1.4 * (1 + n_words) + 0.6, 2.6 * len(rows)),
                             squeeze=False)
    for i, (ex, name, run) in enumerate(rows):
        image = normalize_image(load_image(ex.path, tuple(run.config.image.img_size)))
        maps = decoder_word_maps(run.model, image, ex.caption, [k for k, _ in ex.words], run.tokenizer).maps.cpu()
        axes[i, 0].imshow(ex.image.permute(1, 2, 0).numpy())
        axes[i, 0].set_title(name, fontsize=7)
        for k, (_, word) in enumerate(ex.words):
            axes[i, k + 1].imshow(overlay(ex.image, maps[k]))
            axes[i, k + 1].set_title(f"decoder: '{word}'", fontsize=7)
        clear_image_axes(axes[i])
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------------
# The registered builders: fn(runs, *, split, n_captions) -> (Figure | None, {table name: DataFrame})

FigureResult = tuple[Figure | None, dict[str, pd.DataFrame]]


def sew_fig4(runs: Mapping[str, Any], *, split: str = "test", **_: Any) -> FigureResult:
    """Sew Fig. 4 with its ``gap`` table (:func:`modality_gap_figure`)."""
    fig, gap = modality_gap_figure(runs, split)
    return fig, {"gap": gap}


def sew_fig6(runs: Mapping[str, Any], *, split: str = "test", **_: Any) -> FigureResult:
    """Sew Fig. 6 with its ``tsne`` table (:func:`tsne_figure`)."""
    fig, table = tsne_figure(runs, split)
    return fig, {"tsne": table}


def sew_fig5(runs: Mapping[str, Any], *, split: str = "test", **_: Any) -> FigureResult:
    """Sew Fig. 5 (:func:`attention_figure`)."""
    return attention_figure(runs, split)[0], {}


def sew_decoder_figure(runs: Mapping[str, Any], *, split: str = "test", n_captions: int = 120,
                       **_: Any) -> FigureResult:
    """The MCM decoder's cross-attention on Fig. 5's examples (:func:`decoder_attention_figure`) and the
    ``pointing_decoder`` table (the pointing game on decoder cross-attention); None without a decoder."""
    from tbps_lib.analysis.attention import has_decoder_attention, pointing_summary

    if not any(has_decoder_attention(r.model) for r in runs.values()):
        return None, {}
    fig = decoder_attention_figure(runs, attention_examples(runs, split))
    decoder = pointing_tables(runs, split, n_captions=n_captions, source="decoder")
    return fig, ({} if decoder.empty else {"pointing_decoder": pointing_summary(decoder, by="slot")})


def pointing_game_figure(runs: Mapping[str, Any], *, split: str = "test", n_captions: int = 120,
                         **_: Any) -> FigureResult:
    """The pointing game of word heatmaps (:func:`pointing_figure`) with the ``pointing`` and
    ``pointing_by_word`` tables; None on data without part masks (real datasets)."""
    from tbps_lib.analysis.attention import pointing_summary

    table = pointing_tables(runs, split, n_captions=n_captions)
    if table.empty:
        return None, {}
    tables = {"pointing": pointing_summary(table, by="slot"), "pointing_by_word": pointing_summary(table, by="word")}
    return pointing_figure(tables["pointing"]), tables


# ------------------------------------------------------------------------------------------------------
# Everything at once


@dataclass
class Regenerated:
    """What :func:`regenerate` wrote (figure name -> paths) and the numbers behind the figures."""

    paths: dict[str, list[Path]] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def regenerate(methods: Sequence[str] | None = None, mode: str = "smoke", data: str | None = None,
               runs_dir: str | os.PathLike | None = None, split: str = "test", n_captions: int = 120,
               progress: bool = False, figures: Sequence[str] | None = None) -> Regenerated:
    """The figures every registered method declares (``figures`` of ``register_method``; all of them, or
    those named in ``figures``), drawn over the default runs of ``methods`` (None: every registered method;
    trained if missing, :func:`load_runs`) and saved under
    :func:`figures_dir`, with their tables. A builder that does not apply to these runs (e.g. no decoder,
    no part masks) returns None and is skipped. With Sew/MCM registered: ``gap`` (Fig. 4), ``tsne``
    (Fig. 6), ``pointing`` and ``pointing_by_word`` (the pointing game; synthetic data only) and
    ``pointing_decoder`` (the same game on decoder cross-attention, for methods that have a decoder)."""
    import matplotlib.pyplot as plt

    from tbps_lib.models.registry import method_figures

    builders = method_figures()
    unknown = sorted(set(figures or ()) - set(builders))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; registered figures: {list(builders)}")
    runs = load_runs(methods, mode, data, runs_dir, progress)
    out = Regenerated()
    for name, (_, build) in builders.items():
        if figures is not None and name not in figures:
            continue
        fig, tables = build(runs, split=split, n_captions=n_captions)
        out.tables.update(tables)
        if fig is not None:
            out.paths[name] = save_figure(fig, name)
            plt.close(fig)
    return out


__all__ = ["FIG4", "FIG5", "FIG6", "POINTING", "DECODER", "figures_dir", "save_figure",
           "load_runs", "modality_gap_figure", "tsne_figure", "attention_examples", "attention_figure",
           "pointing_tables", "pointing_figure", "decoder_attention_figure", "FigureResult", "sew_fig4", "sew_fig6",
           "sew_fig5", "sew_decoder_figure", "pointing_game_figure", "Regenerated", "regenerate"]
