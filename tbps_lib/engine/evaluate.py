"""Evaluation: encode a split's gallery and queries, score them in chunks, rank, optionally re-rank.

The protocol (``CONTRIBUTING.md``, "Protocol rules"): queries are every caption of the split, the gallery is
every image of the split, a hit is an image of the same person. The model sees images and caption inputs
only: the ground-truth fields of a batch (:data:`GROUND_TRUTH_KEYS`) are kept for scoring and never reach
``encode_texts`` (tests/test_protocol.py). :func:`encode` runs the model in eval mode without gradients
(bf16 autocast on CUDA) and returns an :class:`Encoded`, whose feature dicts live on the CPU as float32 so
they can be cached on disk. :func:`evaluate` scores texts against images with the
method's own ``model.similarity`` (chunked) and computes ``rank_metrics``.

Re-ranking ("+R" in the papers) uses the same model's ``"global"`` embeddings for the extra similarities
it needs: image-image cosine for ``visual_neighbors`` (NAFS style), and image-image plus text-text cosine
for the k-reciprocal forms (Zhong et al. 2017): ``"k_reciprocal"`` is the authors' released code (distance
columns divided by their maximum, V rows by their sum), the form behind re-id and TBPS papers' "+R"
numbers; ``"k_reciprocal_paper"`` is the paper text's form without those normalisations
(``tbps_lib.engine.rerank.k_reciprocal``, ``form=``). Both treat scores as cosines (their distance is
2 - 2s), so text-image scores outside [-1, 1] (methods that add several cosines) are divided by their
largest magnitude first; ranking by the unscaled scores is unchanged by this. A re-ranked metrics dict
names the re-ranking it used under ``"rerank"`` (:data:`RERANK_FORMS` describes each name).

Two-stage inference (``rerank="rescore"``, methods that implement ``RetrievalModel.rescore``, e.g. an ITM
head as in ALBEF / LAIP appendix D): rank by the first-stage ``similarity``, hand the ``eval.rescore_k``
best gallery indices of each query to ``model.rescore`` (:func:`rescore_topk`, at most
``eval.rescore_pairs`` text-image pairs per call, so the pairwise head's working set is bounded), and
compute the metrics on the re-scored ranking: the re-scored candidates come first in their new order,
the rest of the gallery follows in its first-stage order (:func:`rescored_ranking`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from tbps_lib.data.formats import TBPSDataset
from tbps_lib.data.loaders import build_eval_loaders
from tbps_lib.data.text import CaptionTokenizer
from tbps_lib.engine import rerank as rerank_lib
from tbps_lib.engine.metrics import rank_metrics
from tbps_lib.engine.rerank import stable_topk
from tbps_lib.models.base import RescoreNotSupported
from tbps_lib.utils import progress as progress_bar

RERANKERS = ("visual_neighbors", "k_reciprocal", "k_reciprocal_paper")
#: What each re-ranking name means (shown wherever a re-ranked number is reported).
RERANK_FORMS = {
    "visual_neighbors": "NAFS-style overlap of textual and visual neighbourhoods",
    "k_reciprocal": "k-reciprocal, released code (distance columns / max, V rows / sum)",
    "k_reciprocal_paper": "k-reciprocal, paper text (no normalisations)",
    "rescore": "the method's second stage (e.g. an ITM head) re-scores the top eval.rescore_k",
}
_K_RECIPROCAL_FORM = {"k_reciprocal": "released", "k_reciprocal_paper": "paper"}
#: The ``rerank`` name of two-stage inference (the method's own ``rescore`` of the top-k).
RESCORE = "rescore"


@dataclass
class Encoded:
    """A split encoded by one model: features on the CPU (float32) and the ids that line them up.

    ``query_image_index[i]`` is the gallery index of the image caption ``i`` describes.
    """

    split: str
    image_feats: dict[str, Tensor]
    text_feats: dict[str, Tensor]
    query_pids: Tensor
    gallery_pids: Tensor
    image_paths: list[str]
    captions: list[str]
    query_image_index: Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_queries(self) -> int:
        return int(self.query_pids.numel())

    @property
    def n_gallery(self) -> int:
        return int(self.gallery_pids.numel())

    def to_state(self) -> dict[str, Any]:
        """A dict of tensors, strings and lists that ``torch.load(..., weights_only=True)`` accepts."""
        return {"split": self.split, "image_feats": self.image_feats, "text_feats": self.text_feats,
                "query_pids": self.query_pids, "gallery_pids": self.gallery_pids,
                "image_paths": list(self.image_paths), "captions": list(self.captions),
                "query_image_index": self.query_image_index, "extra": dict(self.extra)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Encoded":
        missing = sorted({"split", "image_feats", "text_feats", "query_pids", "gallery_pids", "image_paths",
                          "captions", "query_image_index"} - set(state))
        if missing:
            raise ValueError(f"encoded state lacks {missing}")
        return cls(**{k: state[k] for k in state})


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing (fp32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: Batch fields that carry the ground truth (the person a caption shows, its training label, the image it
#: describes): evaluation keeps them for scoring and never gives them to ``encode_texts``.
GROUND_TRUTH_KEYS = ("pids", "labels", "image_index")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an evaluation caption batch a model may see: all but :data:`GROUND_TRUTH_KEYS`."""
    return {k: v for k, v in batch.items() if k not in GROUND_TRUTH_KEYS}


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch to ``device`` (non-blocking); other values stay as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _check_feats(feats: Any, what: str, method: str) -> dict[str, Tensor]:
    if not isinstance(feats, Mapping) or not feats or not all(isinstance(v, Tensor) for v in feats.values()):
        raise TypeError(f"{method}.{what} must return a non-empty dict of tensors, got {type(feats).__name__}")
    return dict(feats)


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([p[k] for p in parts]).float().cpu() for k in parts[0]}


@torch.no_grad()
def encode_loaders(model: torch.nn.Module, images: DataLoader, captions: DataLoader, split: str,
                   device: torch.device | None = None, progress: bool = False) -> Encoded:
    """Encode every batch of ``images`` and ``captions`` (from ``build_eval_loaders``)."""
    device = device or next(model.parameters()).device
    method = type(model).__name__
    was_training = model.training
    model.eval()
    try:
        img_parts, gallery_pids = [], []
        for batch in progress_bar(images, enabled=progress, desc=f"encode {split} images", leave=False):
            with autocast_context(device):
                feats = model.encode_images(batch["images"].to(device, non_blocking=True))
            img_parts.append(_check_feats(feats, "encode_images", method))
            gallery_pids.append(batch["pids"])
        txt_parts, query_pids, query_image, texts = [], [], [], []
        for batch in progress_bar(captions, enabled=progress, desc=f"encode {split} captions", leave=False):
            with autocast_context(device):
                feats = model.encode_texts(to_device(model_inputs(batch), device))
            txt_parts.append(_check_feats(feats, "encode_texts", method))
            query_pids.append(batch["pids"])
            query_image.append(batch["image_index"])
            texts.extend(batch["captions"])
    finally:
        model.train(was_training)
    return Encoded(split=split, image_feats=_concat(img_parts), text_feats=_concat(txt_parts),
                   query_pids=torch.cat(query_pids), gallery_pids=torch.cat(gallery_pids),
                   image_paths=list(images.dataset.paths), captions=texts,
                   query_image_index=torch.cat(query_image))


def encode(model: torch.nn.Module, dataset: TBPSDataset, split: str, tokenizer: CaptionTokenizer, cfg: Any,
           device: torch.device | None = None, progress: bool = False) -> Encoded:
    """Encode the gallery (every image of ``split``) and the queries (every caption) with ``model``.

    Eval mode, batches of ``cfg.eval.batch_size``, bf16 autocast on CUDA, no gradients; the model's
    training mode is restored afterwards.
    """
    device = device or next(model.parameters()).device
    images, captions = build_eval_loaders(dataset, split, cfg, tokenizer, pin_memory=device.type == "cuda")
    return encode_loaders(model, images, captions, split, device, progress)


def _feats_on(feats: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in feats.items()}


@torch.no_grad()
def similarity(model: torch.nn.Module, encoded: Encoded, chunk_size: int | None = None) -> Tensor:
    """[n_queries, n_gallery] text-to-image scores from ``model.similarity`` (on the model's device)."""
    device = next(model.parameters()).device
    chunk_size = chunk_size or _cfg_chunk(model)
    sim = model.similarity(_feats_on(encoded.image_feats, device), _feats_on(encoded.text_feats, device),
                           chunk_size=chunk_size)
    expected = (encoded.n_queries, encoded.n_gallery)
    if tuple(sim.shape) != expected:
        raise ValueError(f"{type(model).__name__}.similarity returned shape {tuple(sim.shape)}, "
                         f"expected [n_texts, n_images] = {list(expected)}")
    return sim


def _cfg_eval(model: torch.nn.Module, name: str, default: int) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(getattr(cfg, "eval", None), name, default))


def _cfg_chunk(model: torch.nn.Module) -> int:
    return _cfg_eval(model, "chunk_size", 1024)


def _global(feats: Mapping[str, Tensor], what: str, device: torch.device) -> Tensor:
    if "global" not in feats:
        raise ValueError(f"re-ranking needs a 'global' {what} embedding; the model returns {sorted(feats)}")
    return F.normalize(feats["global"].to(device).float(), dim=-1)


def _chunked_cosine(a: Tensor, b: Tensor, chunk_size: int) -> Tensor:
    return torch.cat([a[i:i + chunk_size] @ b.T for i in range(0, a.shape[0], chunk_size)])


def rerank_similarity(model: torch.nn.Module, encoded: Encoded, sim: Tensor, method: str,
                      params: Mapping[str, Any] | None = None, chunk_size: int | None = None) -> Tensor:
    """Re-ranked text-to-image scores: ``method`` is one of :data:`RERANKERS` (``k_reciprocal`` the released
    code's form, ``k_reciprocal_paper`` the paper text's); ``params`` go to the function of
    ``tbps_lib.engine.rerank`` (k, weight / k1, k2, lambda_value)."""
    if method not in RERANKERS:
        raise ValueError(f"unknown re-ranking {method!r}; choose one of {list(RERANKERS)} or None")
    params = dict(params or {})
    chunk_size = chunk_size or _cfg_chunk(model)
    img = _global(encoded.image_feats, "image", sim.device)
    image_image = _chunked_cosine(img, img, chunk_size)
    if method == "visual_neighbors":
        return rerank_lib.visual_neighbors(sim, image_image, **params)
    txt = _global(encoded.text_feats, "text", sim.device)
    text_text = _chunked_cosine(txt, txt, chunk_size)
    scale = sim.abs().max().clamp(min=1.0)  # k_reciprocal assumes cosine scores in [-1, 1]
    return rerank_lib.k_reciprocal(sim / scale, text_text, image_image, **params,
                                   form=_K_RECIPROCAL_FORM[method])


def check_can_rescore(model: torch.nn.Module) -> None:
    """Raise :class:`~tbps_lib.models.base.RescoreNotSupported` when ``model`` has no ``rescore``."""
    if not getattr(model, "can_rescore", False):
        raise RescoreNotSupported(type(model).__name__)


@torch.no_grad()
def rescore_topk(model: torch.nn.Module, image_feats: Mapping[str, Tensor], text_feats: Mapping[str, Tensor],
                 sim: Tensor, k: int | None = None, max_pairs: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` best gallery indices of each text by ``sim`` (first stage; ties to the lower index) and
    their second-stage scores from ``model.rescore``: (candidates LongTensor [n_texts, k], scores
    FloatTensor [n_texts, k]), both on ``sim``'s device, candidates in first-stage order.

    ``image_feats`` / ``text_feats`` are on the model's device; ``text_feats`` lines up with the rows of
    ``sim``. Texts are re-scored in chunks of ``max(1, max_pairs // k)`` rows, so one call to
    ``model.rescore`` sees at most ``max_pairs`` pairs (or ``k`` when ``k > max_pairs``). Defaults:
    ``model.cfg.eval.rescore_k`` and ``model.cfg.eval.rescore_pairs``; k is capped at the gallery size.
    """
    check_can_rescore(model)
    k = _cfg_eval(model, "rescore_k", 16) if k is None else int(k)
    max_pairs = _cfg_eval(model, "rescore_pairs", 512) if max_pairs is None else int(max_pairs)
    if k < 1:
        raise ValueError(f"eval.rescore_k must be a positive integer, got {k}")
    if max_pairs < 1:
        raise ValueError(f"eval.rescore_pairs must be a positive integer, got {max_pairs}")
    n_texts, n_gallery = sim.shape
    k = min(k, n_gallery)
    rows = max(1, max_pairs // k)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # the first-stage top-k of many rows at once (few large ops), then the head on small chunks of them
    cands = torch.cat([stable_topk(sim[s:s + 1024], k) for s in range(0, n_texts, 1024)])
    scores = torch.empty(cands.shape, dtype=torch.float32, device=sim.device)
    try:
        for start in range(0, n_texts, rows):
            cand = cands[start:start + rows]
            chunk = {name: v[start:start + rows] for name, v in text_feats.items()}
            with autocast_context(device):
                out = model.rescore(dict(image_feats), chunk, cand.to(device))
            if not isinstance(out, Tensor) or tuple(out.shape) != tuple(cand.shape):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"{type(model).__name__}.rescore returned {got}, expected a tensor of shape "
                                 f"[n_texts, k] = {list(cand.shape)}")
            scores[start:start + rows] = out.float()
    finally:
        model.train(was_training)
    return cands, scores


def rescored_ranking(sim: Tensor, candidates: Tensor, scores: Tensor) -> Tensor:
    """Ranking scores [n_texts, n_gallery] (float32) in which each row's ``candidates`` come first, ordered
    by their second-stage ``scores`` (ties: first-stage order), and the other gallery entries follow in
    their first-stage order. Only the order is meaningful: candidate entries hold ``top + step * (k - p)``
    for new position ``p``, with ``top`` the row's largest first-stage score and ``step = 1 + |top|``, so
    they are distinct and above every other entry (what ``rank_metrics`` needs).
    """
    out = sim.float().clone()
    k = candidates.shape[1]
    new_order = scores.sort(dim=1, descending=True, stable=True).indices  # stable: first-stage order on ties
    top = out.max(dim=1, keepdim=True).values
    step = 1.0 + top.abs()
    place = top + step * torch.arange(k, 0, -1, device=out.device, dtype=out.dtype)[None, :]
    out.scatter_(1, candidates.gather(1, new_order), place)
    return out


def rescore_similarity(model: torch.nn.Module, encoded: Encoded, sim: Tensor, k: int | None = None,
                       max_pairs: int | None = None) -> Tensor:
    """:func:`rescored_ranking` of ``sim`` after :func:`rescore_topk` over the whole of ``encoded``."""
    device = next(model.parameters()).device
    cand, scores = rescore_topk(model, _feats_on(encoded.image_feats, device),
                                _feats_on(encoded.text_feats, device), sim, k, max_pairs)
    return rescored_ranking(sim, cand, scores)


def evaluate(model: torch.nn.Module, encoded: Encoded, rerank: str | None = None,
             rerank_params: Mapping[str, Any] | None = None, chunk_size: int | None = None,
             ks: Iterable[int] = (1, 5, 10)) -> dict[str, Any]:
    """R1/R5/R10/mAP/mINP (percent) of text-to-image retrieval on ``encoded``.

    ``rerank``: None, one of :data:`RERANKERS` or ``"rescore"`` (see the module docstring; for
    ``"rescore"``, ``rerank_params`` may hold ``k`` and ``max_pairs``, defaults ``eval.rescore_k`` /
    ``eval.rescore_pairs``); a re-ranked result also holds ``"rerank"``: the name, so the form of the
    re-ranking travels with the numbers. ``chunk_size``: text rows per similarity chunk (default
    ``model.cfg.eval.chunk_size``).
    """
    if rerank == RESCORE:
        check_can_rescore(model)  # before the first stage, so the error comes at once
    sim = similarity(model, encoded, chunk_size)
    if rerank == RESCORE:
        sim = rescore_similarity(model, encoded, sim, **dict(rerank_params or {}))
    elif rerank is not None:
        sim = rerank_similarity(model, encoded, sim, rerank, rerank_params, chunk_size)
    metrics: dict[str, Any] = rank_metrics(sim, encoded.query_pids, encoded.gallery_pids, ks=tuple(ks))
    if rerank is not None:
        metrics["rerank"] = rerank
    return metrics


__all__ = ["RERANKERS", "RERANK_FORMS", "RESCORE", "Encoded", "GROUND_TRUTH_KEYS", "model_inputs",
           "autocast_context", "to_device", "encode_loaders", "encode", "similarity", "rerank_similarity",
           "check_can_rescore", "rescore_topk", "rescored_ranking", "rescore_similarity", "evaluate"]
