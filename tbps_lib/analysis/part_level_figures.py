"""Figures and measurements of the part-level method (Park et al., file 001), on the synthetic benchmark.

* :func:`token_part_table` / :func:`token_part_summary`: do the decoder's coarse tokens specialise to body
  parts? Each coarse token's cross-attention map on the image grid (and A_avg, the foreground map of Eq. (5))
  is scored with the pointing game's numbers (``analysis.attention.point_scores``: peak in the part, share of
  the map's mass in the part, the part's share of the image as chance) against the synthetic part masks,
  grouped into head / upper body / lower body / shoes / person (every body part).
* :func:`fig4_attention`: the paper's Figure 4 on a few test pairs: A_avg and each coarse token on the
  image, and the text tokens' (coarse, then fine) cross-attention over the caption's words.
* :func:`lookalike_table` / :func:`lookalike_figure`: the paper's Fig. 3 idea measured: test identities
  that differ from another test identity in one change unit of the generator (``synthetic_attributes.
  CHANGE_UNITS``: a sibling of the same family with one detail re-drawn) are the "look-alikes"; R@1 on their
  captions and how often the top-1 image is the look-alike's, per method.
* :func:`scoring_table`: R@1 of each run with each subset of Eq. (14)'s terms (which embeddings carry the
  ranking, and whether a step's loss comes from the scoring or from the training).

Builders registered for ``tbps figures`` take ``runs`` = ``{method: Run}`` and return None when the runs
have no part-level model (or, for look-alikes, no synthetic attributes).
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from tbps_lib.analysis.attention import overlay, point_scores
from tbps_lib.data.loaders import load_image, normalize_image

# Part-mask labels (synthetic_render.PART_LABELS) of each body region a coarse token may specialise to.
REGIONS: dict[str, tuple[str, ...]] = {
    "head": ("head", "hair", "headwear", "eyewear"), "upper": ("upper", "arms"), "lower": ("lower", "legs"),
    "shoes": ("shoes",), "person": ("head", "hair", "headwear", "eyewear", "upper", "arms", "lower", "legs",
                                    "shoes", "bag", "held"),
}
METHOD = "part_level"


def _has_parts(run: Any) -> bool:
    model = run.model
    return hasattr(model, "part_attention") and bool(model.cfg.model.coarse)


def _synthetic_records(run: Any, split: str) -> list[Any]:
    records = run.dataset.split(split)
    if not records or not run.dataset.has_part_masks:
        raise ValueError("the part masks of the synthetic benchmark are needed (records with meta['mask'])")
    return records


def _images(run: Any, records: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw uint8 images [n, 3, H, W], normalised model inputs on the model's device)."""
    size = tuple(run.config.image.img_size)
    raw = torch.stack([load_image(run.dataset.image_path(r), size) for r in records])
    device = next(run.model.parameters()).device
    return raw, normalize_image(raw).to(device)


@torch.no_grad()
def token_part_table(run: Any, split: str = "test", n_images: int = 60, seed: int = 0) -> pd.DataFrame:
    """One row per (image, map, region present in the image): ``map`` is ``coarse 1..D`` or ``A_avg``;
    columns hit, energy, chance_area, chance_grid (0/1 or shares, as ``point_scores``)."""
    from tbps_lib.data.synthetic import load_mask
    from tbps_lib.data.synthetic_render import PART_LABELS

    model = run.model
    model.eval()
    records = _synthetic_records(run, split)
    chosen = [records[i] for i in np.random.default_rng(seed).permutation(len(records))[:n_images]]
    _, images = _images(run, chosen)
    out = model.image_embeddings(images, with_attention=True)
    h, w = model.grid
    maps = torch.cat([out["attention"], out["foreground"].unsqueeze(1)], dim=1).reshape(len(chosen), -1, h, w)
    names = [f"coarse {i + 1}" for i in range(out["attention"].shape[1])] + ["A_avg"]
    rows, values = [], []
    for k, record in enumerate(chosen):
        mask = load_mask(run.dataset.root, record.meta)
        for region, parts in REGIONS.items():
            part = np.isin(mask, [PART_LABELS[p] for p in parts])
            if not part.any():
                continue
            part_t = torch.from_numpy(part).to(maps.device)
            for j, name in enumerate(names):
                s = point_scores(maps[k, j], part_t)
                rows.append({"image": record.image, "map": name, "region": region})
                values.append(torch.stack([s["hit"], s["energy"], s["chance_area"], s["chance_grid"]]))
    table = pd.DataFrame(rows)
    numbers = torch.stack(values).cpu().numpy()
    for j, col in enumerate(("hit", "energy", "chance_area", "chance_grid")):
        table[col] = numbers[:, j]
    return table


def token_part_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per map and region: n images, hit %, energy %, chance % (area), and energy - chance (percentage
    points: how much more of the map's mass lies on the region than a uniform map would put there)."""
    per = table.groupby(["map", "region"]).agg(n=("hit", "size"), hit=("hit", "mean"), energy=("energy", "mean"),
                                              chance=("chance_area", "mean"))
    per[["hit", "energy", "chance"]] *= 100.0
    per["energy - chance"] = per["energy"] - per["chance"]
    return per.rename(columns={"hit": "hit_%", "energy": "energy_%", "chance": "chance_%"})


def token_parts_figure(runs: Mapping[str, Any], *, split: str = "test", n_captions: int = 120,
                       **_: Any) -> tuple[Figure | None, dict[str, pd.DataFrame]]:
    """Heatmap of energy - chance (percentage points) per coarse token / A_avg and body region, with the
    ``part_level_token_parts`` table; None without a part-level run on synthetic data."""
    run = runs.get(METHOD)
    if run is None or not _has_parts(run):
        return None, {}
    try:
        summary = token_part_summary(token_part_table(run, split, n_images=max(20, n_captions // 2)))
    except ValueError:  # real data: no part masks
        return None, {}
    return plot_token_parts(summary), {"part_level_token_parts": summary}


def plot_token_parts(summary: pd.DataFrame) -> Figure:
    """The ``energy - chance`` column of :func:`token_part_summary` as a map x region heatmap."""
    grid = summary["energy - chance"].unstack("region").reindex(columns=list(REGIONS))
    fig, ax = plt.subplots(figsize=(5.2, 0.45 * len(grid) + 1.4))
    bound = max(1.0, float(np.nanmax(np.abs(grid.values))))
    im = ax.imshow(grid.values, cmap="coolwarm", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    for (i, j), v in np.ndenumerate(grid.values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="attention mass on region - region's area (pp)")
    ax.set_title("Do coarse tokens attend to body parts? (part-level decoder, synthetic part masks)", fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def fig4_attention(runs: Mapping[str, Any], *, split: str = "test", n_captions: int = 120, n_examples: int = 3,
                   seed: int = 0, **_: Any) -> tuple[Figure | None, dict[str, pd.DataFrame]]:
    """Figure 4: per example, the image, A_avg and each coarse token's map on the image (a), and the text
    tokens' cross-attention over the caption's words (b, rows: coarse tokens, then fine tokens); None without
    a part-level run with a decoder."""
    from tbps_lib.analysis.attention import text_batch

    run = runs.get(METHOD)
    if run is None or not _has_parts(run):
        return None, {}
    model = run.model
    model.eval()
    records = run.dataset.split(split)
    chosen = [records[i] for i in np.random.default_rng(seed).permutation(len(records))[:n_examples]]
    captions = [r.captions[0] for r in chosen]
    raw, images = _images(run, chosen)
    batch = text_batch(captions, run.tokenizer, images.device, model)
    maps = model.part_attention(images, batch)
    n_coarse = maps["image"].shape[1]
    n_text = maps["text"].shape[1]
    fig = plt.figure(figsize=(1.2 * (n_coarse + 2) + 6.5, 2.6 * n_examples))
    grid = fig.add_gridspec(n_examples, n_coarse + 3, width_ratios=[1] * (n_coarse + 2) + [5.5])
    for k in range(n_examples):
        panels = [("image", None), ("A_avg", maps["foreground"][k])] + [
            (f"coarse {i + 1}", maps["image"][k, i]) for i in range(n_coarse)]
        for j, (title, m) in enumerate(panels):
            ax = fig.add_subplot(grid[k, j])
            ax.imshow(raw[k].permute(1, 2, 0).numpy() if m is None else overlay(raw[k], m.cpu()))
            ax.set_title(title, fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
        ax = fig.add_subplot(grid[k, -1])
        n_tokens = int(batch["attention_mask"][k].sum())
        ax.imshow(maps["text"][k, :, :n_tokens].cpu().numpy(), cmap="Reds", aspect="auto")
        labels = run.tokenizer.convert_ids_to_tokens(batch["input_ids"][k, :n_tokens])
        ax.set_xticks(range(n_tokens), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n_text), [f"c{i + 1}" for i in range(n_coarse)] +
                      [f"f{i + 1}" for i in range(n_text - n_coarse)], fontsize=6)
    fig.suptitle("Part-level decoder cross-attention (Fig. 4): (a) image, per coarse token; (b) words, per text "
                 "token", fontsize=9)
    fig.tight_layout()
    return fig, {}


# ------------------------------------------------------------------------------------------------------
# Look-alike identities (the paper's Fig. 3 idea)


def _units(attributes: Mapping[str, Any]) -> dict[str, tuple]:
    from tbps_lib.data.synthetic_attributes import CHANGE_UNITS

    return {unit: tuple(attributes.get(k) for k in keys) for unit, keys in CHANGE_UNITS.items()}


def lookalike_pairs(records: list[Any], max_units: int = 1) -> dict[int, set[int]]:
    """``{pid: pids of the split that differ from it in 1..max_units change units}`` from the synthetic
    identities' attributes (``meta["attributes"]``); identities without look-alikes are left out."""
    people: dict[int, dict[str, tuple]] = {}
    for r in records:
        if r.meta is None or "attributes" not in r.meta:
            raise ValueError("look-alikes need the synthetic benchmark (records with meta['attributes'])")
        people.setdefault(int(r.pid), _units(r.meta["attributes"]))
    out: dict[int, set[int]] = {}
    for a, b in itertools.combinations(sorted(people), 2):
        diff = sum(people[a][u] != people[b][u] for u in people[a])
        if 1 <= diff <= max_units:
            out.setdefault(a, set()).add(b)
            out.setdefault(b, set()).add(a)
    return out


@torch.no_grad()
def lookalike_table(runs: Mapping[str, Any], split: str = "test", max_units: int = 1) -> pd.DataFrame:
    """Per run (keys of ``runs`` name the rows): ``queries`` (captions of identities with a look-alike in the
    split), their ``R1_%``, ``top1_lookalike_%`` (the top-1 image shows a look-alike), ``R1_all_%`` (every
    caption) and ``R1_pair_%`` (ranked among the images of the person and of its look-alikes only)."""
    rows = []
    for name, run in runs.items():
        records = run.dataset.split(split)
        pairs = lookalike_pairs(records, max_units)
        enc = run.embeddings(split)
        sim = run.model.similarity(enc.image_feats, enc.text_feats)
        q, g = enc.query_pids.long(), enc.gallery_pids.long()
        top1 = g[sim.argmax(dim=1)]
        has = torch.tensor([int(p) in pairs for p in q.tolist()])
        alike = torch.tensor([int(t) in pairs.get(int(p), ()) for p, t in zip(q.tolist(), top1.tolist())])
        pair_hits = []
        for i in torch.nonzero(has).flatten().tolist():
            allowed = torch.tensor([int(p) == int(q[i]) or int(p) in pairs[int(q[i])] for p in g.tolist()])
            best = sim[i].masked_fill(~allowed, float("-inf")).argmax()
            pair_hits.append(float(g[best] == q[i]))
        hit = (top1 == q).float()
        rows.append({"method": name, "queries": int(has.sum()), "R1_%": 100 * float(hit[has].mean()) if has.any()
                     else float("nan"), "top1_lookalike_%": 100 * float(alike[has].float().mean()) if has.any()
                     else float("nan"), "R1_pair_%": 100 * float(np.mean(pair_hits)) if pair_hits else float("nan"),
                     "R1_all_%": 100 * float(hit.mean()), "lookalike_ids": len(pairs)})
    return pd.DataFrame(rows).set_index("method")


def lookalike_figure(runs: Mapping[str, Any], *, split: str = "test", n_captions: int = 120,
                     **_: Any) -> tuple[Figure | None, dict[str, pd.DataFrame]]:
    """Bars of R@1 on look-alike captions, on all captions, and top-1-is-a-look-alike, per method (the
    part-level run beside the others asked for), with the ``part_level_lookalikes`` table."""
    if METHOD not in runs:
        return None, {}
    try:
        table = lookalike_table(runs, split)
    except ValueError:  # real data: no synthetic attributes
        return None, {}
    return plot_lookalikes(table), {"part_level_lookalikes": table}


def plot_lookalikes(table: pd.DataFrame) -> Figure:
    """Grouped bars of :func:`lookalike_table`'s percentages per method."""
    cols = ["R1_all_%", "R1_%", "R1_pair_%", "top1_lookalike_%"]
    labels = ["R@1, all captions", "R@1, look-alike captions", "R@1 among look-alikes", "top-1 is a look-alike"]
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    width = 0.8 / len(table)
    x = np.arange(len(cols))
    for i, (name, row) in enumerate(table.iterrows()):
        ax.bar(x + i * width, row[cols].to_numpy(dtype=float), width, label=str(name))
    ax.set_xticks(x + width * (len(table) - 1) / 2, labels, fontsize=7)
    ax.set_ylabel("%")
    ax.legend(fontsize=7)
    ax.set_title(f"Identities differing in one detail ({int(table['queries'].iloc[0])} captions)", fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def commonality_table(run: Any, split: str = "val") -> pd.DataFrame:
    """What Eq. (11)-(12) give on a trained model, from its cached embeddings of ``split``: per embedding
    (global, coarse i, fine j) and modality, the commonality C (mean, 10th and 90th percentile) and the mean
    CMR margin alpha (1 - C) with the run's base margin alpha (``model.margin``)."""
    from tbps_lib.losses import commonality

    enc = run.embeddings(split)
    weight = run.model.classifier.weight.detach().float().cpu()
    alpha = run.config.model.margin
    rows = []
    for modality, feats in (("image", enc.image_feats), ("text", enc.text_feats)):
        for kind in ("global", "coarse", "fine"):
            if kind not in feats:
                continue
            x = feats[kind].float()
            x = x.unsqueeze(1) if x.dim() == 2 else x
            for i in range(x.shape[1]):
                c = commonality(x[:, i] @ weight.T)
                rows.append({"embedding": kind if kind == "global" else f"{kind} {i + 1}", "modality": modality,
                             "C_mean": float(c.mean()), "C_p10": float(c.quantile(0.1)),
                             "C_p90": float(c.quantile(0.9)), "margin_mean": alpha * float((1 - c).mean())})
    return pd.DataFrame(rows)


#: The terms of Eq. (14) that :func:`scoring_table` sums, by name.
SCORINGS: dict[str, tuple[str, ...]] = {"global": ("global",), "coarse": ("coarse",), "fine": ("fine",),
                                        "global + coarse": ("global", "coarse"), "global + fine": ("global", "fine"),
                                        "Eq. (14): all": ("global", "coarse", "fine")}


@torch.no_grad()
def scoring_table(runs: Mapping[str, Any], split: str = "val") -> pd.DataFrame:
    """Which terms of Eq. (14) carry the ranking? For each labelled run and each :data:`SCORINGS` entry whose
    embeddings the run has, R1 / R5 / mAP (percent) of ranking ``split`` by the sum of those terms' cosines
    (``PartLevel.pair_scores`` on those of the run's cached embeddings; the last entry is the method's own
    scoring). It separates two explanations of a step that loses accuracy: embeddings that add noise to the
    sum (the global term alone scores better than the sum) and training that hurts the global embedding
    itself (it scores worse than the baseline's global term)."""
    from tbps_lib.engine.metrics import rank_metrics

    rows = []
    for label, run in runs.items():
        enc = run.embeddings(split)
        for name, terms in SCORINGS.items():
            if not all(t in enc.text_feats and t in enc.image_feats for t in terms):
                continue
            scores = run.model.pair_scores({t: enc.image_feats[t] for t in terms},  # Eq. (14) on these terms
                                           {t: enc.text_feats[t] for t in terms})
            m = rank_metrics(scores, enc.query_pids, enc.gallery_pids)
            rows.append({"run": label, "scoring": name, "R1": m["R1"], "R5": m["R5"], "mAP": m["mAP"]})
    return pd.DataFrame(rows)


__all__ = ["REGIONS", "SCORINGS", "token_part_table", "token_part_summary", "token_parts_figure", "plot_token_parts",
           "fig4_attention", "lookalike_pairs", "lookalike_table", "lookalike_figure", "plot_lookalikes",
           "commonality_table", "scoring_table"]
