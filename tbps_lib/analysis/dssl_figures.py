"""DSSL's figures and analyses (notebook 07): Fig. 5's top-5 retrievals, the inference-score alternatives,
and what the paper cannot measure: how much of the person feature V_P and of the surroundings feature V_S
comes from the person's pixels and how much from the scene's.

Attribution (:func:`person_attribution`): for each image of a split the gradient of the feature's norm
||f(x)|| with respect to the input pixels (eval mode); the saliency of a pixel is the sum over colour
channels of |gradient|; ``person share`` = saliency on the person's pixels (the synthetic part mask, any
label but background) / all saliency; ``area share`` = the person's share of the pixels. A feature that
looks at the person more than at the scene has ``person share > area share`` (``enrichment`` > 1). The
synthetic benchmark's part masks make this measurable; on real data (no masks) the figure is skipped.

Scene swap (:func:`swap_changes`): the generator renders an image again with its surroundings swapped
(another camera's scene, crowd and clutter, same person, pose, camera look) and with its person swapped
(another test identity's person, same surroundings), :func:`tbps_lib.data.synthetic.rerender`. For each
feature, ``change`` = 1 - cos(feature of the image, feature of the swapped image); a feature of the person
should change much under a person swap and little under a scene swap (``scene / person`` well below 1), a
feature of the surroundings the other way round. Edge pixels of the person mix with the new scene (the
camera's blur), as they would in a photograph.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from tbps_lib.analysis.retrieval import plot_query_results, ranked_table, sample_queries
from tbps_lib.data.loaders import image_tensor, load_image, normalize_image
from tbps_lib.engine.metrics import rank_metrics
from tbps_lib.losses.dssl import cosine_matrix

FigureResult = tuple[Figure | None, dict[str, pd.DataFrame]]


# -- inference alternatives ------------------------------------------------------------------------------------

def similarity_terms(model: Any, image_feats: Mapping[str, Tensor], text_feats: Mapping[str, Tensor],
                     chunk_size: int = 1024) -> dict[str, Tensor]:
    """Every aligned similarity of a DSSL model [n_texts, n_images]: ``person`` cos(V_P, T_P), ``local_image``
    (Align IV), ``local_text`` (Align V), ``global`` cos(V_G, T_G) and, with PDM, ``described``
    cos(PDM(V_P), T_G) (Align III)."""
    rows: dict[str, list[Tensor]] = {}
    n = text_feats["global"].shape[0]
    with torch.no_grad():
        described = model.pdm(image_feats["global"].float()) if getattr(model, "pdm", None) is not None else None
        for start in range(0, n, chunk_size):
            chunk = {k: v[start:start + chunk_size] for k, v in text_feats.items()}
            terms = model.score_terms(image_feats, chunk)
            terms["global"] = cosine_matrix(chunk["text_global"].float(), image_feats["visual_global"].float())
            if described is not None:
                terms["described"] = cosine_matrix(chunk["text_global"].float(), described)
            for k, v in terms.items():
                rows.setdefault(k, []).append(v.float())
    return {k: torch.cat(v) for k, v in rows.items()}


#: The inference combinations compared in the notebook: {name: {term: weight}}; the first is the default.
SCORE_COMBINATIONS = {
    "Sim_TI = person + 0.5 IV + 0.5 V (default)": {"person": 1.0, "local_image": 0.5, "local_text": 0.5},
    "person only, cos(V_P, T_P)": {"person": 1.0},
    "Align IV only": {"local_image": 1.0},
    "Align V only": {"local_text": 1.0},
    "person + 0.5 IV": {"person": 1.0, "local_image": 0.5},
    "person + 0.5 V": {"person": 1.0, "local_text": 0.5},
    "Sim_TI + Align III, cos(PDM(V_P), T_G)": {"person": 1.0, "local_image": 0.5, "local_text": 0.5, "described": 1.0},
    "global only, cos(V_G, T_G)": {"global": 1.0},
}


def similarity_alternatives(run: Any, split: str = "val") -> pd.DataFrame:
    """R@1/5/10, mAP of each :data:`SCORE_COMBINATIONS` entry for a DSSL run on ``split`` (choose on ``val``)."""
    if run.config.method != "dssl" or run.config.model.baseline:
        raise ValueError(f"similarity_alternatives needs a DSSL run with its aligned features, got {run.name}")
    enc = run.embeddings(split)
    terms = similarity_terms(run.model, enc.image_feats, enc.text_feats)
    rows = []
    for name, weights in SCORE_COMBINATIONS.items():
        if not set(weights) <= set(terms):
            continue
        sim = sum(w * terms[k] for k, w in weights.items())
        metrics = rank_metrics(sim, enc.query_pids, enc.gallery_pids)
        rows.append({"score": name, **{k: metrics[k] for k in ("R1", "R5", "R10", "mAP")}})
    return pd.DataFrame(rows).assign(split=split)


# -- Fig. 5 ----------------------------------------------------------------------------------------------------

def dssl_fig5(runs: Mapping[str, Any], *, split: str = "test", n_queries: int = 4, **_: Any) -> FigureResult:
    """Fig. 5: the top-5 images of a few test captions (distinct people) retrieved by DSSL, green = the
    described person; table ``dssl_fig5_top5``. None without a DSSL run."""
    run = runs.get("dssl")
    if run is None:
        return None, {}
    enc = run.embeddings(split)
    sim = run.model.similarity(enc.image_feats, enc.text_feats)
    queries = sample_queries(enc, n_queries, seed=0)
    return plot_query_results(enc, sim, queries, k=5), {"dssl_fig5_top5": ranked_table(enc, sim, queries, k=5)}


# -- person vs surroundings ------------------------------------------------------------------------------------

def feature_functions(model: Any) -> dict[str, Callable[[Tensor], Tensor]]:
    """The image features to attribute: DSSL's V_P, V_S (with SPSM) and V_G; any other model's ``global``."""
    if getattr(model, "person_mlp", None) is not None:
        def vg(x: Tensor) -> Tensor:
            return model.image_features(x)[0]
        return {"V_P (person)": lambda x: model.person_mlp(vg(x)),
                "V_S (surroundings)": lambda x: model.surroundings_mlp(vg(x)), "V_G (global)": vg}
    return {"global": lambda x: model.encode_images(x)["global"]}


def _person_masks(dataset: Any, records: list[Any], size: tuple[int, int]) -> Tensor:
    from tbps_lib.data.synthetic import load_mask

    masks = []
    for r in records:
        mask = Image.fromarray(load_mask(dataset.root, r.meta).astype(np.uint8))
        masks.append(np.asarray(mask.resize((size[1], size[0]), Image.NEAREST)) != 0)
    return torch.from_numpy(np.stack(masks))


def person_attribution(model: Any, dataset: Any, img_size: tuple[int, int], split: str = "test",
                       n_images: int = 64, seed: int = 0) -> pd.DataFrame:
    """One row per (feature, image): ``person share`` of the gradient saliency of ||feature|| and the
    person's ``area share`` (module docstring). Empty on data without part masks."""
    records = dataset.split(split)
    if not records or not dataset.has_part_masks:
        return pd.DataFrame()
    pick = np.random.default_rng(seed).permutation(len(records))[:n_images]
    chosen = [records[i] for i in sorted(pick)]
    device = next(model.parameters()).device
    images = torch.stack([normalize_image(load_image(dataset.image_path(r), tuple(img_size))) for r in chosen])
    person = _person_masks(dataset, chosen, tuple(img_size))
    area = person.float().flatten(1).mean(1)
    was = model.training
    model.eval()
    rows = []
    try:
        for name, fn in feature_functions(model).items():
            x = images.clone().to(device).requires_grad_(True)
            with torch.enable_grad():
                fn(x).float().norm(dim=1).sum().backward()  # eval mode: each image's gradient is its own
            saliency = x.grad.detach().abs().sum(1).cpu()  # [n, H, W]
            share = (saliency * person).flatten(1).sum(1) / saliency.flatten(1).sum(1).clamp_min(1e-12)
            rows += [{"feature": name, "image": str(r.image), "person share": float(s), "area share": float(a)}
                     for r, s, a in zip(chosen, share, area)]
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was)
    table = pd.DataFrame(rows)
    return table.assign(enrichment=table["person share"] / table["area share"])


def attribution_table(runs: Mapping[str, Any], split: str = "test", n_images: int = 64) -> pd.DataFrame:
    """:func:`person_attribution` of every run, with a ``method`` column."""
    tables = [person_attribution(run.model, run.dataset, tuple(run.config.image.img_size), split, n_images)
              .assign(method=name) for name, run in runs.items()]
    tables = [t for t in tables if not t.empty]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def attribution_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (and standard error) person share, area share and enrichment per method and feature."""
    g = table.groupby(["method", "feature"], sort=False)
    out = g[["person share", "area share", "enrichment"]].mean()
    out["person share se"] = g["person share"].sem()
    out["n images"] = g.size()
    return out.reset_index()


def attribution_figure(runs: Mapping[str, Any], *, split: str = "test", n_captions: int = 64,
                       **_: Any) -> FigureResult:
    """Bars of the person share of each feature's gradient saliency (DSSL's V_P, V_S, V_G against the other
    runs' global features), the dashed line = the person's share of the pixels; tables
    ``dssl_attribution`` (per method and feature) . None without part masks or without a DSSL run."""
    if "dssl" not in runs:
        return None, {}
    table = attribution_table(runs, split, n_images=n_captions)
    if table.empty:
        return None, {}
    summary = attribution_summary(table)
    fig, ax = plt.subplots(figsize=(1.2 * len(summary) + 2.5, 3.2))
    labels = [f"{m}\n{f}" for m, f in zip(summary["method"], summary["feature"])]
    ax.bar(range(len(summary)), summary["person share"], yerr=2 * summary["person share se"],
           color=["#4575b4" if "person" in f or f == "global" else "#d73027" if "surround" in f else "#999999"
                  for f in summary["feature"]], capsize=3)
    ax.axhline(float(table["area share"].mean()), ls="--", color="k", lw=1, label="person's share of the pixels")
    ax.set_xticks(range(len(summary)), labels, fontsize=8)
    ax.set_ylabel("share of |gradient| on the person")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Where each image feature looks ({split}, {int(summary['n images'].iloc[0])} images)", fontsize=9)
    fig.tight_layout()
    return fig, {"dssl_attribution": summary}


# -- scene swap ------------------------------------------------------------------------------------------------

def swap_images(dataset: Any, split: str = "test", n_ids: int = 32, seed: int = 0
                ) -> tuple[list[str], dict[str, list[np.ndarray]]]:
    """One image of each of ``n_ids`` identities of ``split`` (seeded choice) and, rendered again by the
    generator, ``original``, ``scene swap`` (a camera of another scene type, the set's bank) and ``person
    swap`` (the person of the next chosen identity); uint8 H x W x 3 arrays. Empty without a synthetic sidecar."""
    from tbps_lib.data.formats import read_meta
    from tbps_lib.data.synthetic import rerender

    records = dataset.split(split)
    if not records or records[0].meta is None or "scene" not in records[0].meta:
        return [], {}
    meta = read_meta(dataset.root)
    first: dict[int, str] = {}
    for r in records:
        first.setdefault(r.pid, r.image)
    rng = np.random.default_rng(seed)
    pids = sorted(first)
    chosen = [first[pids[i]] for i in rng.permutation(len(pids))[:n_ids]]
    if len(chosen) < 2:
        raise ValueError(f"a person swap needs at least two identities in {split!r}, got {len(chosen)}")
    out: dict[str, list[np.ndarray]] = {"original": [], "scene swap": [], "person swap": []}
    for i, rel in enumerate(chosen):
        scene = meta["images"][rel]["scene"]
        others = [c["id"] for c in meta["cameras"] if c["scene"] != scene]
        out["original"].append(rerender(meta, rel).image)
        out["scene swap"].append(rerender(meta, rel, scene_camera=int(rng.choice(others)), scene_seed=seed).image)
        out["person swap"].append(rerender(meta, rel, person_from=chosen[(i + 1) % len(chosen)]).image)
    return chosen, out


def swap_changes(model: Any, dataset: Any, img_size: tuple[int, int], split: str = "test", n_ids: int = 32,
                 seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """One row per (feature, image, swap): ``change`` = 1 - cos(feature(original), feature(swapped)) for
    each of :func:`feature_functions` (module docstring). Empty on data the generator did not make."""
    chosen, images = swap_images(dataset, split, n_ids, seed)
    if not chosen:
        return pd.DataFrame()
    device = next(model.parameters()).device
    batches = {k: torch.stack([normalize_image(image_tensor(Image.fromarray(a), tuple(img_size))) for a in v])
               for k, v in images.items()}
    was = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for name, fn in feature_functions(model).items():
                feats = {k: torch.cat([fn(x[i:i + batch_size].to(device)).float().cpu()
                                       for i in range(0, len(x), batch_size)]) for k, x in batches.items()}
                for swap in ("scene swap", "person swap"):
                    change = 1.0 - torch.nn.functional.cosine_similarity(feats["original"], feats[swap], dim=1)
                    rows += [{"feature": name, "image": rel, "swap": swap, "change": float(c)}
                             for rel, c in zip(chosen, change)]
    finally:
        model.train(was)
    return pd.DataFrame(rows)


def swap_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and feature: mean change (and standard error) under the scene swap and the person swap,
    and ``scene / person`` = the ratio of the two means."""
    g = table.groupby(["method", "feature", "swap"], sort=False)["change"]
    wide = g.mean().unstack("swap")
    se = g.sem().unstack("swap")
    out = pd.DataFrame({"scene swap change": wide["scene swap"], "scene swap se": se["scene swap"],
                        "person swap change": wide["person swap"], "person swap se": se["person swap"]})
    out["scene / person"] = out["scene swap change"] / out["person swap change"]
    out["n images"] = table.groupby(["method", "feature"], sort=False)["image"].nunique()
    order = table[["method", "feature"]].drop_duplicates().itertuples(index=False, name=None)
    return out.loc[list(order)].reset_index()


def scene_swap_figure(runs: Mapping[str, Any], *, split: str = "test", n_captions: int = 64,
                      **_: Any) -> FigureResult:
    """Bars per feature (DSSL's V_P, V_S, V_G against the other runs' global features): the change of the
    feature when the scene is swapped and the person kept, beside its change when the person is swapped and
    the scene kept (error bars 2 s.e.); table ``dssl_scene_swap``. ``n_captions`` = number of identities.
    None without a DSSL run or on data the generator did not make."""
    if "dssl" not in runs:
        return None, {}
    tables = [swap_changes(run.model, run.dataset, tuple(run.config.image.img_size), split, n_ids=n_captions)
              .assign(method=name) for name, run in runs.items()]
    tables = [t for t in tables if not t.empty]
    if not tables:
        return None, {}
    summary = swap_summary(pd.concat(tables, ignore_index=True))
    x = np.arange(len(summary))
    fig, ax = plt.subplots(figsize=(1.2 * len(summary) + 2.5, 3.2))
    for offset, swap, color in ((-0.2, "scene swap", "#d73027"), (0.2, "person swap", "#4575b4")):
        ax.bar(x + offset, summary[f"{swap} change"], width=0.4, yerr=2 * summary[f"{swap} se"], capsize=3,
               color=color, label=f"{swap} ({'person' if swap == 'scene swap' else 'scene'} kept)")
    ax.set_xticks(x, [f"{m}\n{f}" for m, f in zip(summary["method"], summary["feature"])], fontsize=8)
    ax.set_ylabel("1 - cos(original, swapped)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"What moves each image feature ({split}, {int(summary['n images'].iloc[0])} identities)",
                 fontsize=9)
    fig.tight_layout()
    return fig, {"dssl_scene_swap": summary}


__all__ = ["SCORE_COMBINATIONS", "similarity_terms", "similarity_alternatives", "dssl_fig5", "feature_functions",
           "person_attribution", "attribution_table", "attribution_summary", "attribution_figure",
           "swap_images", "swap_changes", "swap_summary", "scene_swap_figure"]
