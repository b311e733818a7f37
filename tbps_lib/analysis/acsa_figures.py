"""ACSA's figures: Figure 5 (attention saliency of the image regions for a caption and for each of its
noun phrases) and a pointing game of the phrase-to-region attention on the synthetic part masks.

Both read ACAM's text-to-image attention alpha'_ij (Eq. (9)): for phrase j, its weights over the visual
entities (the global image and the regions). A region is a band of feature rows (``Acsa.region_rows``), so
its saliency is painted over its rows; the global entity's weight is spread over the whole image. A
caption's saliency is the mean of its phrases' maps. The paper's Figure 5 shows heat maps "based on the
attention" without saying which; this is the attention ACAM computes, read for the matched pair only.

Pointing game (synthetic data, no paper has it): for each caption word naming a visible part (the words
of ``analysis.attention.pointing_targets``), the noun phrase holding it attends over the regions; the
*target* region is the one whose rows hold the largest share of that part's mask pixels. ``hit`` = the
most attended region is the target (the global entity excluded; chance 1 / number of regions);
``target_weight`` = alpha' on the target region; ``global_weight`` = alpha' on the global image.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from tbps_lib.models.acsa import REGION_NAMES

FigureResult = tuple[Figure | None, dict[str, pd.DataFrame]]


def _acsa_run(runs: Mapping[str, Any]) -> Any | None:
    """The first run of ``runs`` whose model runs ACAM (regions and phrases), else None."""
    for run in runs.values():
        if run.config.method == "acsa" and run.config.model.uses_acam and run.config.model.entities[1]:
            return run
    return None


def region_names(model: Any) -> list[str]:
    """Names of the model's regions: the four body regions, or ``part 1`` .. ``part n`` (six slices)."""
    n = len(model.region_rows)
    return list(REGION_NAMES) if model.cfg.model.local_parts == "partition" else [f"part {p + 1}" for p in range(n)]


@torch.no_grad()
def phrase_attention(run: Any, image: torch.Tensor, caption: str) -> dict[str, Any]:
    """ACAM's attention for one (image, caption) pair of ``run``: ``phrases`` (the noun phrases, as the
    batch field extracts them), ``spans`` (their word ranges), ``alpha_t`` [n_phrases, K] (Eq. (9)),
    ``global`` (whether entity 0 is the global image) and ``grid``. ``image``: normalised [3, H, W]."""
    from tbps_lib.analysis.attention import text_batch
    from tbps_lib.data.text import extract_noun_phrases
    from tbps_lib.losses.acsa import acam_attention

    model = run.model
    model.eval()
    device = next(model.parameters()).device
    batch = text_batch([caption], run.tokenizer, device, model)
    img, txt = model.encode_images(image.unsqueeze(0).to(device)), model.encode_texts(batch)
    m = model.cfg.model
    _, alpha_t = acam_attention(img["entities"], txt["entities"], txt["entity_mask"] > 0.5, m.lambda_i2t,
                                m.lambda_t2i)
    found = extract_noun_phrases(caption, m.max_phrases)
    offset = 1 if model.use_caption else 0  # relation IV: the caption is text entity 0
    n = len(found.phrases)
    return {"phrases": list(found.phrases), "spans": list(found.word_spans),
            "alpha_t": alpha_t[0, offset:offset + n].float().cpu(), "global": model.use_image,
            "grid": model.grid}


def entity_map(weights: torch.Tensor, model: Any, has_global: bool) -> torch.Tensor:
    """Entity weights [K] -> a map [h, w] on the feature grid: each region's weight over its rows, the
    global entity's weight over every cell."""
    h, w = model.grid
    rows = torch.zeros(h)
    regions = weights[1:] if has_global else weights
    if has_global:
        rows += weights[0]
    for weight, (a, b) in zip(regions, model.region_rows):
        rows[a:b] += weight
    return rows.unsqueeze(1).expand(h, w).clone()


def _examples(run: Any, split: str, n_examples: int, seed: int) -> list[tuple[Any, str]]:
    """``n_examples`` (record, caption) pairs of ``split``, drawn reproducibly, with at least two phrases."""
    from tbps_lib.data.text import extract_noun_phrases

    records = run.dataset.split(split)
    pairs = [(r, c) for r in records for c in r.captions]
    chosen = []
    for i in np.random.default_rng(seed).permutation(len(pairs)):
        if len(extract_noun_phrases(pairs[i][1], run.config.model.max_phrases).phrases) >= 2:
            chosen.append(pairs[i])
        if len(chosen) == n_examples:
            break
    return chosen


def saliency_figure(run: Any, split: str = "test", n_examples: int = 3, n_phrases: int = 4,
                    seed: int = 0) -> tuple[Figure, pd.DataFrame]:
    """Figure 5: per example, the image, the caption's saliency (mean of its phrases' maps) and the map of
    each of its first ``n_phrases`` phrases; and a table of every drawn phrase's attention over the entities."""
    import matplotlib.pyplot as plt

    from tbps_lib.analysis.attention import overlay
    from tbps_lib.analysis.figures import _display_image
    from tbps_lib.data.loaders import load_image, normalize_image

    model = run.model
    names = (["global"] if model.use_image else []) + region_names(model)
    examples = _examples(run, split, n_examples, seed)
    fig, axes = plt.subplots(len(examples), 2 + n_phrases, figsize=(1.6 * (2 + n_phrases), 3.4 * len(examples)),
                             squeeze=False)
    rows = []
    for r, (record, caption) in enumerate(examples):
        path = run.dataset.image_path(record)
        att = phrase_attention(run, normalize_image(load_image(path, tuple(run.config.image.img_size))), caption)
        raw = _display_image(path)
        maps = [entity_map(a, model, att["global"]) for a in att["alpha_t"]]
        panels = [("image", None), ("caption", torch.stack(maps).mean(0))]
        panels += [(p, mp) for p, mp in zip(att["phrases"], maps)][:n_phrases]
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= len(panels):
                continue
            title, heat = panels[c]
            ax.imshow(raw.permute(1, 2, 0).numpy() if heat is None else overlay(raw, heat))
            ax.set_title(title if len(title) < 24 else title[:22] + "..", fontsize=7)
        axes[r, 0].set_title("\n".join([caption[i:i + 40] for i in range(0, min(len(caption), 120), 40)]), fontsize=6)
        for phrase, weights in zip(att["phrases"], att["alpha_t"]):
            rows.append({"caption": caption, "phrase": phrase, **{n: float(v) for n, v in zip(names, weights)}})
    fig.suptitle(f"ACSA Fig. 5: text-to-image attention (Eq. (9)) over the regions ({run.name})", fontsize=9)
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


def _target_region(mask: np.ndarray, model: Any) -> tuple[int, float]:
    """The region (index) whose pixel rows hold the largest share of the boolean part ``mask``, and that share."""
    h_grid = model.grid[0]
    height = mask.shape[0]
    per_row = mask.sum(axis=1)
    total = max(1, int(per_row.sum()))
    shares = [per_row[(a * height) // h_grid:(b * height) // h_grid].sum() / total for a, b in model.region_rows]
    best = int(np.argmax(shares))
    return best, float(shares[best])


def phrase_pointing(run: Any, split: str = "test", n_captions: int = 120, seed: int = 0) -> pd.DataFrame:
    """The pointing game of the phrase-to-region attention (module docstring): one row per (caption, part
    word inside a phrase). Empty on data without part masks."""
    from tbps_lib.analysis.attention import part_mask, pointing_targets
    from tbps_lib.data.loaders import load_image, normalize_image
    from tbps_lib.data.synthetic import load_mask

    records = run.dataset.split(split)
    if not records or not run.dataset.has_part_masks:
        return pd.DataFrame()
    model = run.model
    names = region_names(model)
    pairs = [(r, c) for r in records for c in r.captions]
    rows = []
    for i in np.random.default_rng(seed).permutation(len(pairs))[:n_captions]:
        record, caption = pairs[i]
        targets = pointing_targets(caption, record.meta)
        if not targets:
            continue
        mask = load_mask(run.dataset.root, record.meta)
        path = run.dataset.image_path(record)
        att = phrase_attention(run, normalize_image(load_image(path, tuple(run.config.image.img_size))), caption)
        for index, word, slot in targets:
            j = next((k for k, (a, b) in enumerate(att["spans"]) if a <= index < b), None)
            part = part_mask(mask, slot, word)
            if j is None or j >= len(att["alpha_t"]) or not part.any():
                continue
            weights = att["alpha_t"][j]
            regions = weights[1:] if att["global"] else weights
            target, share = _target_region(part, model)
            attended = int(regions.argmax())
            rows.append({"caption": caption, "phrase": att["phrases"][j], "word": word, "slot": slot,
                         "target": names[target], "target_share": share, "attended": names[attended],
                         "hit": float(attended == target), "target_weight": float(regions[target]),
                         "global_weight": float(weights[0]) if att["global"] else 0.0,
                         "chance": 1.0 / len(regions)})
    return pd.DataFrame(rows)


def pointing_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per slot and overall: n, hit %, chance %, the mean attention on the target region and on the global
    image (in %)."""
    agg = {"n": ("hit", "size"), "hit_%": ("hit", "mean"), "chance_%": ("chance", "mean"),
           "target_weight_%": ("target_weight", "mean"), "global_weight_%": ("global_weight", "mean")}
    out = pd.concat([table.groupby("slot").agg(**agg), table.assign(slot="all").groupby("slot").agg(**agg)])
    pct = [c for c in out.columns if c.endswith("%")]
    out[pct] = 100.0 * out[pct]
    return out


def acsa_fig5(runs: Mapping[str, Any], *, split: str = "test", **_: Any) -> FigureResult:
    """Registered figure ``acsa_fig5_saliency``: :func:`saliency_figure` of the first ACSA run with ACAM."""
    run = _acsa_run(runs)
    if run is None:
        return None, {}
    fig, table = saliency_figure(run, split)
    return fig, {"acsa_fig5_attention": table}


def acsa_pointing_figure(runs: Mapping[str, Any], *, split: str = "test", n_captions: int = 120,
                         **_: Any) -> FigureResult:
    """Registered figure ``acsa_phrase_pointing``: hit rate of the phrase-to-region attention per part
    slot beside chance; None without an ACSA run or without part masks."""
    import matplotlib.pyplot as plt

    run = _acsa_run(runs)
    if run is None:
        return None, {}
    table = phrase_pointing(run, split, n_captions)
    if table.empty:
        return None, {}
    summary = pointing_summary(table)
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    x = np.arange(len(summary))
    ax.bar(x - 0.2, summary["hit_%"], 0.4, label="hit (most attended region = part's region)")
    ax.bar(x + 0.2, summary["chance_%"], 0.4, label="chance", color="lightgray")
    ax.set_xticks(x, [f"{s}\n(n={int(n)})" for s, n in zip(summary.index, summary["n"])], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title(f"ACSA: phrase-to-region attention on the part masks ({run.name})", fontsize=9)
    fig.tight_layout()
    return fig, {"acsa_pointing": summary, "acsa_pointing_rows": table}


__all__ = ["acsa_fig5", "acsa_pointing_figure", "entity_map", "phrase_attention", "phrase_pointing",
           "pointing_summary", "region_names", "saliency_figure"]
