"""Data exploration helpers behind ``notebooks/01_data_exploration.ipynb``.

Tables (per-split statistics, frequent words and noun phrases, attribute frequencies) and figures
(caption-length histogram with the Sew paper's T_min/T_max, an image grid with captions, part-mask
overlays) for any :class:`~tbps_lib.data.formats.TBPSDataset`; the attribute and mask views need the
synthetic sidecar (``Record.meta``). Figures are made with pyplot, so a notebook shows them with
``plt.show()`` after saving them with ``tbps_lib.analysis.figures.save_figure``.
"""
from __future__ import annotations

import textwrap
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from tbps_lib.data.formats import Record, TBPSDataset
from tbps_lib.data.text import (PAPER_LENGTH_BOUNDS, caption_lengths, caption_words,  # noqa: F401 (re-exported)
                                extract_noun_phrases_batch, length_bounds)

STOPWORDS = frozenset(
    "a an the and or of in on at to with is are was has have his her he she its it this that who which "
    "by for as from their there be also pair wearing carrying holding".split()
)
ATTRIBUTES = ("gender", "hair_length", "hair_color", "headwear", "eyewear", "upper", "upper_color",
              "upper_pattern", "sleeve", "lower", "lower_color", "shoes", "shoes_color", "bag", "held")


def stats_table(ds: TBPSDataset) -> pd.DataFrame:
    """Per-split images, identities, captions and caption words (mean, std, min, median, max)."""
    return pd.DataFrame.from_dict(ds.stats(), orient="index").rename_axis("split")


def plot_caption_lengths(ds: TBPSDataset, bounds: tuple[int, int, str] | None = None) -> Figure:
    """Histogram of caption token lengths per split, with T_min and T_max marked."""
    t_min, t_max, source = bounds or length_bounds(ds)
    fig = plt.figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    per_split = {s: caption_lengths(ds.split(s)) for s in ds.splits}
    top = max(int(v.max()) for v in per_split.values())
    bins = np.arange(0, top + 2) - 0.5
    for split, lengths in per_split.items():
        ax.hist(lengths, bins=bins, density=True, histtype="step", linewidth=1.5, label=split)
    for value, name in ((t_min, "$T_{min}$"), (t_max, "$T_{max}$")):
        ax.axvline(value, color="k", linestyle="--", linewidth=1)
        ax.text(value, ax.get_ylim()[1] * 0.95, f" {name}={value}", va="top", fontsize=8)
    ax.set_xlabel("caption length (word tokens)")
    ax.set_ylabel("share of captions")
    ax.set_title(f"{ds.name}: caption lengths ({source})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def frequent_words(records: Iterable[Record], n: int = 20, stopwords: frozenset[str] = STOPWORDS) -> pd.DataFrame:
    """The ``n`` most frequent caption words (lower-cased, punctuation and ``stopwords`` left out)."""
    counts = Counter(w for r in records for c in r.captions for w in caption_words(c, punctuation=False)
                     if w not in stopwords)
    return pd.DataFrame(counts.most_common(n), columns=["word", "count"])


def frequent_noun_phrases(records: Sequence[Record], n: int = 20, max_captions: int | None = 2000,
                          ) -> tuple[pd.DataFrame, str]:
    """The ``n`` most frequent noun phrases (lower-cased, leading determiner dropped) and the tagger used.

    Only the first ``max_captions`` captions are parsed (None: all), which keeps the notebook quick.
    """
    texts = [c for r in records for c in r.captions][:max_captions]
    if not texts:
        raise ValueError("no captions to extract noun phrases from")
    parsed = extract_noun_phrases_batch(texts)
    counts = Counter(_strip_determiner(p) for np_ in parsed for p in np_.phrases)
    return pd.DataFrame(counts.most_common(n), columns=["noun phrase", "count"]), parsed[0].tagger


def _strip_determiner(phrase: str) -> str:
    words = phrase.lower().split()
    if len(words) > 1 and words[0] in ("a", "an", "the", "his", "her", "their", "this"):
        words = words[1:]
    return " ".join(words)


def pick_records(records: Sequence[Record], n: int, seed: int = 0) -> list[Record]:
    """``n`` records drawn reproducibly, one per person where possible."""
    rng = np.random.default_rng(seed)
    first: dict[int, Record] = {}
    for r in records:
        first.setdefault(r.pid, r)
    pool = list(first.values()) if len(first) >= n else list(records)
    idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[int(i)] for i in sorted(idx)]


def plot_image_grid(ds: TBPSDataset, records: Sequence[Record], cols: int = 4, wrap: int = 34) -> Figure:
    """Images with their (first) caption underneath, ``cols`` per row."""
    rows = int(np.ceil(len(records) / cols))
    fig = plt.figure(figsize=(cols * 2.2, rows * 3.3))
    for i, rec in enumerate(records):
        ax = fig.add_subplot(rows, cols, i + 1)
        with Image.open(ds.image_path(rec)) as img:
            ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
        ax.set_title(f"id {rec.pid} ({rec.split})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(textwrap.fill(rec.captions[0], wrap), fontsize=6.5)
    fig.tight_layout()
    return fig


def _require_meta(records: Iterable[Record]) -> list[Record]:
    records = list(records)
    missing = [r.image for r in records if not r.meta or "attributes" not in r.meta]
    if missing:
        raise ValueError(f"{len(missing)} record(s) have no synthetic sidecar entry (e.g. {missing[0]}); "
                         "attribute and mask views need a synthetic dataset")
    return records


def attribute_frequencies(records: Iterable[Record], attributes: Sequence[str] = ATTRIBUTES) -> pd.DataFrame:
    """Share of identities with each attribute value (one row per attribute and value)."""
    people: dict[int, dict] = {}
    for r in _require_meta(records):
        people.setdefault(r.pid, r.meta["attributes"])
    rows = []
    for attr in attributes:
        counts = Counter("n/a" if p.get(attr) is None else str(p[attr]) for p in people.values())
        rows += [(attr, value, c, c / len(people)) for value, c in counts.most_common()]
    return pd.DataFrame(rows, columns=["attribute", "value", "identities", "share"])


def plot_attribute_frequencies(freq: pd.DataFrame, attributes: Sequence[str] | None = None, cols: int = 3) -> Figure:
    """One bar chart per attribute: the share of identities with each value."""
    attributes = list(attributes or dict.fromkeys(freq["attribute"]))
    rows = int(np.ceil(len(attributes) / cols))
    fig = plt.figure(figsize=(cols * 3.6, rows * 2.4))
    for i, attr in enumerate(attributes):
        part = freq[freq["attribute"] == attr]
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.barh(part["value"][::-1], part["share"][::-1], color="tab:blue")
        ax.set_title(attr, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def plot_part_masks(ds: TBPSDataset, records: Sequence[Record], alpha: float = 0.55) -> Figure:
    """Each image, its part-label mask blended over it with the part boxes, and a legend of parts."""
    from tbps_lib.data.synthetic import load_mask, read_meta
    from tbps_lib.data.synthetic_render import MASK_PALETTE

    records = _require_meta(records)
    labels = read_meta(ds.root)["part_labels"]
    palette = np.asarray(MASK_PALETTE, dtype=float) / 255.0
    fig = plt.figure(figsize=(len(records) * 1.5, 4.2))
    for i, rec in enumerate(records):
        with Image.open(ds.image_path(rec)) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=float) / 255.0
        mask = load_mask(ds.root, rec.meta)
        over = np.where(mask[..., None] > 0, (1 - alpha) * rgb + alpha * palette[mask], rgb)
        for row, (pic, title) in enumerate(((rgb, rec.meta["view"]), (over, "parts"))):
            ax = fig.add_subplot(2, len(records), row * len(records) + i + 1)
            ax.imshow(pic, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 1:
                for name, (x0, y0, x1, y1) in rec.meta["boxes"].items():
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, linewidth=0.6,
                                           edgecolor=palette[labels[name]]))
    handles = [Rectangle((0, 0), 1, 1, color=palette[v]) for k, v in labels.items() if v]
    fig.legend(handles, [k for k, v in labels.items() if v], loc="lower center", ncol=6, fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def _difference_matrix(records: Iterable[Record]) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """Person ids, attribute names, value codes (ids x attributes) and pairwise counts of differing values."""
    people: dict[int, dict] = {}
    for r in _require_meta(records):
        people.setdefault(r.pid, r.meta["attributes"])
    pids = sorted(people)
    keys = sorted({k for p in people.values() for k in p})
    values: dict[tuple[str, str], int] = {}
    codes = np.array([[values.setdefault((k, str(people[pid].get(k))), len(values)) for k in keys]
                      for pid in pids], dtype=np.int64).reshape(len(pids), len(keys))
    return pids, keys, codes, (codes[:, None, :] != codes[None, :, :]).sum(-1)


def similar_pairs(records: Iterable[Record], max_diff: int = 1) -> pd.DataFrame:
    """Pairs of identities whose attributes differ in at most ``max_diff`` values ("similar people").

    Compares every attribute of the synthetic sidecar (type, colour, pattern, side ...); one row per
    pair with the number of differing attributes and their names.
    """
    pids, keys, codes, diff = _difference_matrix(records)
    rows = []
    for i, j in zip(*np.nonzero(np.triu(diff <= max_diff, k=1))):
        names = [k for k, a, b in zip(keys, codes[i], codes[j]) if a != b]
        rows.append((pids[i], pids[j], int(diff[i, j]), ", ".join(names)))
    return pd.DataFrame(rows, columns=["pid_a", "pid_b", "differences", "attributes"])


def nearest_differences(records: Iterable[Record]) -> pd.Series:
    """For each identity, how many attribute values separate it from the most similar other identity."""
    pids, _, _, diff = _difference_matrix(records)
    if len(pids) < 2:
        raise ValueError("need at least two identities to compare")
    np.fill_diagonal(diff, np.iinfo(diff.dtype).max)
    return pd.Series(diff.min(axis=1), index=pd.Index(pids, name="pid"), name="nearest_differences")
