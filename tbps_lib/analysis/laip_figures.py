"""LAIP's figures: forward, backward and bidirectional activation maps of noun phrases (the paper's Figures 2
and 7) from the trained model's real cross-attention, and their pointing game on the synthetic part masks.

For an (image, phrase) pair, the phrase's word that names a part (``hair``, ``bag``, ``shoes`` ...) is
masked and the three maps of Eq. (4), (6) and (7) are read at fusion layer L (``models.laip.LAIP.
phrase_attention``): forward = the phrase [CLS] row of the cross-attention (heads averaged), backward = the
positive part of the gradient of the masked word's score with respect to that row, bidirectional = their
normalised product. The paper shows such maps qualitatively and says the bidirectional map lands more on
"the object described by the input phrase"; the pointing game measures it: is the peak of the map inside
the part the phrase names (``analysis.attention.point_scores``), against chance (a random peak cell) and
with the map's mass inside the part (energy). Synthetic data only (part masks).

Choice: the masked word is the part word itself (the paper masks a random phrase word in training; for a
map of "where is the bag", the score of predicting "bag" is the natural one).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from tbps_lib.analysis.attention import (overlay, part_mask, phrase_span, point_scores, pointing_targets)

MODES = ("forward", "backward", "bidirectional")

#: Table V (MPM vs MLM) and Figure 6 (fusion layer L, margin delta) at smoke scale: variants of the default
#: run (config changes over it), one seed each, that notebook 06 trains in the ``full`` and ``all`` budgets
#: (``analysis.tables.notebook_extras``: ``tbps reproduce`` trains them before the notebooks run).
SWEEPS: dict[str, dict[str, Any]] = {"MLM instead of MPM": {"model.masked_modeling": "caption"},
                                     "delta 0.2": {"model.delta": 0.2}, "delta 1.0": {"model.delta": 1.0},
                                     "L = 2": {"model.attention_layer": 2}, "LAIP": {}}


def _laip_runs(runs: Mapping[str, Any]) -> dict[str, Any]:
    from tbps_lib.models.laip import LAIP

    return {name: run for name, run in runs.items() if isinstance(run.model, LAIP) and run.model.mpm_head is not None}


def phrase_maps(run: Any, record: Any, caption: str, word_indices: list[int]) -> dict[str, Any]:
    """The three maps of the noun phrase around each part word of ``caption`` on ``record``'s image:
    ``{"phrases": [str], "maps": {mode: [P, h, w]}, "grid": (h, w)}`` (:func:`image_phrase_maps`)."""
    from tbps_lib.data.loaders import load_image, normalize_image

    image = normalize_image(load_image(run.dataset.image_path(record), tuple(run.config.image.img_size)))
    return image_phrase_maps(run.model, run.tokenizer, image, caption, word_indices)


def image_phrase_maps(model: Any, tokenizer: Any, image: torch.Tensor, caption: str,
                      word_indices: list[int]) -> dict[str, Any]:
    """:func:`phrase_maps` on a normalised image tensor [3, H, W] (any image: the caption-search demo's
    gallery too): for each word index of ``caption``, its noun phrase (``phrase_span``) with that word masked,
    and LAIP's forward, backward and bidirectional maps (``LAIP.phrase_attention``) over the image grid."""
    from tbps_lib.data.text import caption_words

    words = caption_words(caption)
    phrases, positions = [], []
    for index in word_indices:
        start, end = phrase_span(caption, index)
        phrases.append(" ".join(words[start:end]))
        positions.append(index - start)
    enc = tokenizer.encode_with_words(phrases)
    length = min(enc["input_ids"].shape[1], int(enc["attention_mask"].sum(1).max()))
    ids, mask, word_ids = (enc[k][:, :length] for k in ("input_ids", "attention_mask", "word_ids"))
    masked = torch.stack([(w == p).long().argmax() for w, p in zip(word_ids, positions)])  # first piece
    device = next(model.parameters()).device
    images = image.unsqueeze(0).expand(len(phrases), -1, -1, -1).to(device)
    was_training = model.training
    model.eval()
    try:
        maps = model.phrase_attention(images, ids.to(device), mask.to(device), masked.to(device))
        grid = model.image_encoder(images[:1]).grid
    finally:
        model.train(was_training)
    return {"phrases": phrases, "maps": {k: v.reshape(len(phrases), *grid).cpu() for k, v in maps.items()},
            "grid": tuple(grid)}


def phrase_pointing_game(run: Any, split: str = "test", n_captions: int = 120, seed: int = 0) -> pd.DataFrame:
    """One row per (caption, part word, mode): the pointing-game numbers of the phrase's forward, backward and
    bidirectional maps. Columns: record, caption, phrase, word, slot, mode, hit, energy, chance_grid,
    chance_area. Empty on data without part masks."""
    from tbps_lib.data.synthetic import load_mask

    records = run.dataset.split(split)
    if not records or not run.dataset.has_part_masks:
        return pd.DataFrame()
    pairs = [(r, c) for r in records for c in r.captions]
    rows = []
    for i in np.random.default_rng(seed).permutation(len(pairs))[:n_captions]:
        record, caption = pairs[i]
        mask = load_mask(run.dataset.root, record.meta)
        targets = [(t, part_mask(mask, t[2], t[1])) for t in pointing_targets(caption, record.meta)]
        targets = [(t, p) for t, p in targets if p.any()]
        if not targets:
            continue
        out = phrase_maps(run, record, caption, [t[0] for t, _ in targets])
        for k, ((_, word, slot), part) in enumerate(targets):
            part_t = torch.from_numpy(part)
            for mode in MODES:
                s = point_scores(out["maps"][mode][k], part_t)
                rows.append({"record": record.image, "caption": caption, "phrase": out["phrases"][k], "word": word,
                             "slot": slot, "mode": mode, **{c: float(s[c]) for c in
                                                            ("hit", "energy", "chance_grid", "chance_area")}})
    return pd.DataFrame(rows)


def itm_separation(run: Any, split: str = "val", n_queries: int = 256, seed: int = 0) -> pd.DataFrame:
    """Does the ITM head (Eq. (18)) tell a caption's own image from another person's? For ``n_queries``
    captions of ``split``: the ITM logit with its image, with the other person's image the ITC similarity
    ranks highest (the kind of hard negative Eq. (19) trains on) and with a random other person's image.
    One row per kind: mean and std of the logit, and for the negatives how often the positive scores
    higher (0.5 = no separation). A head stuck at the prior gives the same logit to all three."""
    model = run.model.eval()
    enc = run.embeddings(split)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randperm(len(enc.query_pids), generator=gen)[:n_queries]
    pids, gallery = enc.query_pids[q], enc.gallery_pids
    other = pids[:, None] != gallery[None, :]
    text = {k: v[q] for k, v in enc.text_feats.items()}
    with torch.no_grad():
        hard = model.similarity(enc.image_feats, text).masked_fill(~other, float("-inf")).argmax(dim=1)
        rand = torch.multinomial(other.float(), 1, generator=gen).squeeze(1)
        scores = {}
        for kind, images in (("own image", enc.query_image_index[q]), ("ITC-hardest other person", hard),
                             ("random other person", rand)):
            scores[kind] = model.rescore(enc.image_feats, text, images[:, None]).squeeze(1)
    own = scores["own image"]
    return pd.DataFrame([{"pair": kind, "n": len(s), "ITM logit mean": float(s.mean()), "std": float(s.std()),
                          "own image higher": float((own > s).float().mean()) if kind != "own image" else np.nan}
                         for kind, s in scores.items()]).set_index("pair")


def phrase_pointing_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per mode (and an ``all``-slots view per slot): n, hit %, energy %, chance % (random cell, area)."""
    agg = {"n": ("hit", "size"), "hit_%": ("hit", "mean"), "energy_%": ("energy", "mean"),
           "chance_grid_%": ("chance_grid", "mean"), "chance_area_%": ("chance_area", "mean")}
    per = table.groupby(["mode", "slot"]).agg(**agg)
    total = table.assign(slot="all").groupby(["mode", "slot"]).agg(**agg)
    out = pd.concat([per, total]).sort_index()
    pct = [c for c in out.columns if c.endswith("%")]
    out[pct] = 100.0 * out[pct]
    return out.reindex(MODES, level=0)


def laip_pointing_figure(runs: Mapping[str, Any], *, split: str = "test", n_captions: int = 120,
                         **_: Any) -> tuple[Any, dict[str, pd.DataFrame]]:
    """Bars: hit rate of the forward / backward / bidirectional phrase maps per part, chance as markers; the
    ``laip_pointing`` table. None for runs without LAIP's MPM head or data without part masks."""
    import matplotlib.pyplot as plt

    chosen = _laip_runs(runs)
    if not chosen:
        return None, {}
    name, run = next(iter(chosen.items()))
    table = phrase_pointing_game(run, split, n_captions)
    if table.empty:
        return None, {}
    summary = phrase_pointing_summary(table)
    slots = list(dict.fromkeys(summary.loc["forward"].index))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(slots), 3.2))
    x = np.arange(len(slots))
    for i, mode in enumerate(MODES):
        rows = summary.loc[mode].reindex(slots)
        ax.bar(x - 0.3 + 0.2 * (i + 0.5), rows["hit_%"], 0.2, label=mode)
    chance = summary.loc["forward"].reindex(slots)["chance_grid_%"]
    ax.scatter(x, chance, marker="x", color="k", zorder=3, label="chance (random cell)")
    ax.set_xticks(x, [f"{s}\n(n={int(summary.loc['forward'].loc[s, 'n'])})" for s in slots], fontsize=7)
    ax.set_ylabel("peak inside the named part (%)")
    ax.set_title(f"{name}: phrase maps at fusion layer L={run.config.model.attention_layer}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, {"laip_pointing": summary}


def laip_attention_figure(runs: Mapping[str, Any], *, split: str = "test", n_examples: int = 4, seed: int = 0,
                          **_: Any) -> tuple[Any, dict[str, pd.DataFrame]]:
    """Figures 2/7: for ``n_examples`` (image, part phrase) pairs of ``split``, the image and its forward,
    backward and bidirectional maps. None for runs without LAIP's MPM head."""
    import matplotlib.pyplot as plt

    from tbps_lib.data.loaders import load_image

    chosen = _laip_runs(runs)
    if not chosen:
        return None, {}
    _, run = next(iter(chosen.items()))
    records = run.dataset.split(split)
    pairs = [(r, c) for r in records for c in r.captions]
    examples = []
    for i in np.random.default_rng(seed).permutation(len(pairs)):
        record, caption = pairs[i]
        targets = pointing_targets(caption, record.meta if record.meta else None)
        if targets:
            examples.append((record, caption, targets[0][0]))
        if len(examples) == n_examples:
            break
    fig, axes = plt.subplots(len(examples), 4, figsize=(5.0, 2.3 * len(examples)), squeeze=False)
    for row, (record, caption, index) in zip(axes, examples):
        out = phrase_maps(run, record, caption, [index])
        raw = load_image(run.dataset.image_path(record), tuple(run.config.image.img_size))
        row[0].imshow(raw.permute(1, 2, 0).numpy())
        row[0].set_title(f'"{out["phrases"][0]}"', fontsize=7)
        for ax, mode in zip(row[1:], MODES):
            ax.imshow(overlay(raw, out["maps"][mode][0]))
            ax.set_title(mode, fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig, {}
