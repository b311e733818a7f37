"""Caption search over a gallery: type a description, get the gallery ranked by a trained model.

:class:`CaptionSearch` keeps one split's gallery encoded by a run's model (the run's cached embeddings) and
answers free-text queries with :meth:`CaptionSearch.search`, which returns the top-k images as a table.
The demo app (``tbps_lib.demo``) and ``tbps search`` use it.

Scoring keeps the method contract (``CONTRIBUTING.md``, "The method contract"): the caption is encoded with
``model.encode_texts`` (a batch made by the shared ``collate``, as in evaluation) and scored with
``model.similarity``, so methods with several embeddings or a pairwise scorer rank exactly as they do in
evaluation. Methods that keep the default scoring (cosine of the ``"global"`` embeddings) take a fast
path: a :class:`GalleryIndex` of the L2-normalised gallery, searched by one matrix product and a top-k in
torch, or by faiss (``IndexFlatIP``, exact) when it is installed and the gallery is large.

Re-ranking reuses the engine's functions: ``visual_neighbors`` (NAFS style) with the gallery's image-image
cosine similarities computed once per gallery and kept, and the k-reciprocal forms (``k_reciprocal``, the
released code's, and ``k_reciprocal_paper``) through ``engine.evaluate.rerank_similarity``. A free-text query is re-ranked on its own, so for
``visual_neighbors`` (which treats each caption independently) the scores equal the evaluation's row for
that caption; for ``k_reciprocal`` the other test captions are not part of the neighbourhood graph, so its
scores differ from the all-queries evaluation.

Galleries: a dataset split of a run (:meth:`CaptionSearch.from_run`), or any folder of images
(``from_run(run, gallery=DIR)``, :meth:`CaptionSearch.from_folder`, and :meth:`CaptionSearch.from_file` for
a run exported with ``tbps export``), indexed and cached by ``tbps_lib.gallery``; scoring does not depend on
where the gallery came from (it is an :class:`~tbps_lib.engine.evaluate.Encoded` either way). A folder
gallery has no person ids (-1) and no captions, so results have no ``match`` and there is no random query.

Two-stage inference (``rerank="rescore"``, methods with ``RetrievalModel.rescore``): the caption's first-stage
row is re-scored for its ``eval.rescore_k`` best images with ``engine.evaluate.rescore_topk``, exactly as in
evaluation, so the ranking equals the evaluation's re-scored row for that caption; the ``score`` column holds
the second-stage score for the re-scored ranks and the first-stage score below them (``attrs["rescored"]``
says how many of the table's rows were re-scored).

Ties are broken by the lower gallery index, as in ``engine.metrics`` (the faiss path excepted: faiss orders
exact ties its own way).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from tbps_lib.data.loaders import collate
from tbps_lib.data.text import CaptionTokenizer, caption_words
from tbps_lib.engine import rerank as rerank_lib
from tbps_lib.engine.evaluate import (RERANKERS, RESCORE, Encoded, autocast_context, model_inputs,
                                     rerank_similarity, rescore_topk, rescored_ranking, to_device)
from tbps_lib.engine.rerank import stable_topk
from tbps_lib.gallery import FolderGallery, index_folder
from tbps_lib.models.base import RetrievalModel
from tbps_lib.utils import cache_home

#: Galleries at least this large use faiss (when installed) on the fast path; below it torch is as fast
#: (benchmarks/search_latency.py measures both).
FAISS_MIN_GALLERY = 100_000
#: Re-ranking keeps the n x n image-image similarities; refuse galleries whose matrix exceeds 1 GiB.
RERANK_MAX_GALLERY = 16_384
#: Columns of a search result, in order.
RESULT_COLUMNS = ("rank", "image", "pid", "score", "match", "gallery_index")
#: Folder-gallery embeddings of a run are cached in ``<run>/galleries/``; those of an exported file under
#: ``<cache home>/galleries/<weights hash>/``.
GALLERY_CACHE_DIR = "galleries"


class SearchInputError(ValueError):
    """The query cannot be searched (empty caption, only unknown words, bad k or re-ranking); the message
    is meant for the person who typed it."""


def faiss_available() -> bool:
    """Whether ``faiss`` (the ``[faiss]`` extra, ``pip install faiss-cpu``) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class GalleryIndex:
    """Exact maximum-inner-product search over L2-normalised gallery embeddings (cosine similarity).

    ``backend``: ``"torch"`` (one matmul + top-k, on the embeddings' device), ``"faiss"`` (``IndexFlatIP``
    on the CPU; the gallery is copied into the index) or ``"auto"``: faiss when installed, the embeddings
    are on the CPU and there are at least ``faiss_min`` of them, torch otherwise.
    """

    def __init__(self, embeddings: Tensor, backend: str = "auto", faiss_min: int = FAISS_MIN_GALLERY) -> None:
        if embeddings.dim() != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"gallery embeddings must be a non-empty [n, dim] matrix, got {tuple(embeddings.shape)}")
        if backend not in ("auto", "torch", "faiss"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        if backend == "auto":
            large = self.embeddings.shape[0] >= faiss_min and self.embeddings.device.type == "cpu"
            backend = "faiss" if large and faiss_available() else "torch"
        elif backend == "faiss" and not faiss_available():
            raise ImportError("backend='faiss' needs the faiss package: pip install faiss-cpu (the [faiss] extra)")
        self.backend = backend
        self._faiss = self._build_faiss() if backend == "faiss" else None

    def _build_faiss(self) -> Any:
        import faiss

        matrix = np.ascontiguousarray(self.embeddings.cpu().numpy(), dtype=np.float32)
        index = faiss.IndexFlatIP(matrix.shape[1])
        index.add(matrix)
        return index

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def scores(self, queries: Tensor) -> Tensor:
        """Cosine similarity of each query with every gallery item: [n_queries, n_gallery] (torch)."""
        return F.normalize(queries.float(), dim=-1).to(self.embeddings.device) @ self.embeddings.T

    def top_k(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Scores and gallery indices of the ``k`` most similar items per query, best first (CPU tensors)."""
        k = min(int(k), len(self))
        if self._faiss is not None:
            q = np.ascontiguousarray(F.normalize(queries.float(), dim=-1).cpu().numpy(), dtype=np.float32)
            scores, idx = self._faiss.search(q, k)
            return torch.from_numpy(scores), torch.from_numpy(idx).long()
        sim = self.scores(queries)
        idx = stable_topk(sim, k)
        return sim.gather(1, idx).cpu(), idx.cpu()


def uses_default_scoring(model: torch.nn.Module) -> bool:
    """True when ``model`` scores with the base class's cosine of the ``"global"`` embeddings (it overrides
    neither ``pair_scores`` nor ``similarity``), so a :class:`GalleryIndex` ranks exactly as it does."""
    cls = type(model)
    return (isinstance(model, RetrievalModel) and cls.pair_scores is RetrievalModel.pair_scores
            and cls.similarity is RetrievalModel.similarity)


class CaptionSearch:
    """A gallery encoded by one model, searchable by free-text captions.

    Build it with :meth:`from_run`. ``encoded`` is the split's :class:`~tbps_lib.engine.evaluate.Encoded`
    (gallery features, paths and person ids; its captions tell which person a dataset caption describes).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: CaptionTokenizer, encoded: Encoded,
                 backend: str = "auto", name: str = "", folder_gallery: FolderGallery | None = None) -> None:
        self.model = model.eval()
        self.folder_gallery = folder_gallery  # the folder's files and skip report (folder galleries only)
        self.tokenizer = tokenizer
        self.encoded = encoded
        self.name = name
        self.device = next(model.parameters()).device
        self.image_feats = {k: v.to(self.device) for k, v in encoded.image_feats.items()}
        fast = uses_default_scoring(model) and "global" in self.image_feats
        self.index = GalleryIndex(self.image_feats["global"], backend) if fast else None
        self._image_image: Tensor | None = None
        self._truth = _caption_truth(encoded.captions, encoded.query_pids.tolist())

    @classmethod
    def from_run(cls, run: Any, split: str = "test", backend: str = "auto",
                 gallery: str | os.PathLike | None = None, fit: str = "stretch",
                 progress: bool = True) -> "CaptionSearch":
        """The gallery of ``split`` (every image of the split) with the run's selected model and tokenizer;
        the encodings come from the run's embedding cache (computed once).

        ``gallery``: a folder of images searched instead of the split (``split`` is then unused), indexed at
        the run's ``image.img_size`` with ``fit`` and cached in ``<run>/galleries/`` (see ``tbps_lib.gallery``);
        ``progress`` shows a progress bar while files are encoded.
        """
        if gallery is None:
            return cls(run.model, run.tokenizer, run.embeddings(split), backend=backend, name=f"{run.name}/{split}")
        ckpt = run._checkpoint_id()
        return cls.from_folder(run.model, run.tokenizer, gallery, run.config.image.img_size,
                               cache_dir=run.dir / GALLERY_CACHE_DIR,
                               model_key=f"{run.name}@epoch{ckpt['epoch']}-step{ckpt['step']}", fit=fit,
                               backend=backend, name=run.name, progress=progress)

    @classmethod
    def from_folder(cls, model: torch.nn.Module, tokenizer: CaptionTokenizer, folder: str | os.PathLike,
                    img_size: Sequence[int], cache_dir: str | os.PathLike | None = None, model_key: str = "",
                    fit: str = "stretch", backend: str = "auto", name: str = "", progress: bool = True,
                    batch_size: int = 64, num_workers: int = 0) -> "CaptionSearch":
        """Every usable image under ``folder`` (``tbps_lib.gallery.index_folder``: recursive, bad files skipped
        and listed in ``.folder_gallery.skipped``, embeddings cached in ``cache_dir`` under ``model_key``)."""
        found = index_folder(model, folder, img_size, cache_dir, model_key, fit, batch_size, num_workers, progress)
        label = f"{name}/{found.folder.name}" if name else str(found.folder)
        return cls(model, tokenizer, found.to_encoded(), backend=backend, name=label, folder_gallery=found)

    @classmethod
    def from_file(cls, path: str | os.PathLike, gallery: str | os.PathLike, device: str | None = None,
                  backend: str = "auto", fit: str = "stretch", cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> "CaptionSearch":
        """A folder ``gallery`` searched with a run exported by ``tbps export`` (``tbps_lib.export``); no run
        registry or dataset is needed. The folder's embeddings are cached in ``cache_dir``, by default
        ``$TBPS_CACHE/galleries/<weights hash>`` (``~/.cache/tbps_lib/...``)."""
        from tbps_lib.export import load_exported

        exported = load_exported(path, device)
        key = f"sha256:{exported.weights_sha256}"
        cache = Path(cache_dir) if cache_dir is not None else (
            cache_home() / GALLERY_CACHE_DIR / exported.weights_sha256[:16])
        return cls.from_folder(exported.model, exported.tokenizer, gallery, exported.config.image.img_size,
                               cache_dir=cache, model_key=key, fit=fit, backend=backend, name=exported.name,
                               progress=progress)

    def __repr__(self) -> str:
        return (f"CaptionSearch({self.name!r}, gallery={self.gallery_size}, "
                f"scoring={self.scoring!r})")

    @property
    def gallery_size(self) -> int:
        return self.encoded.n_gallery

    @property
    def scoring(self) -> str:
        """How queries are scored: ``"cosine/torch"``, ``"cosine/faiss"`` or ``"<Model>.similarity"``."""
        return f"cosine/{self.index.backend}" if self.index is not None else f"{type(self.model).__name__}.similarity"

    # -- queries --------------------------------------------------------------------------------
    def unknown_words(self, caption: str) -> list[str]:
        """Words of ``caption`` that are not whole entries of the tokenizer's vocabulary: they map to
        ``[UNK]`` or are spelled out of word pieces (``##...``), so the model never saw them as words."""
        unk = self.tokenizer.convert_ids_to_tokens([self.tokenizer.unk_id])[0]
        return [w for w in dict.fromkeys(caption_words(caption, punctuation=False))
                if any(p == unk or p.startswith("##") for p in self.tokenizer.tokenize(w))]

    def check_caption(self, caption: str) -> list[str]:
        """Raise :class:`SearchInputError` for an empty caption or one made only of unknown words; return
        the unknown words otherwise."""
        if not isinstance(caption, str) or not caption.strip():
            raise SearchInputError("Type a description of a person, e.g. 'a woman in a red coat with a black bag'.")
        words = caption_words(caption, punctuation=False)
        unknown = self.unknown_words(caption)
        if not words or len(unknown) == len(set(words)):
            shown = ", ".join(repr(w) for w in unknown) or repr(caption.strip())
            raise SearchInputError(f"None of the words of this caption is known to the model ({shown}); "
                                   f"describe clothes, colours, hair or bags in plain words.")
        return unknown

    def truth_of(self, caption: str) -> int | None:
        """The person id ``caption`` describes when it is a caption of the split (of one person only)."""
        return self._truth.get(caption.strip())

    def random_query(self, rng: np.random.Generator) -> tuple[str, int]:
        """A caption of the split drawn with ``rng`` and the id of the person it describes (a folder
        gallery has no captions: :class:`SearchInputError`)."""
        if self.encoded.n_queries == 0:
            raise SearchInputError("this gallery has no captions to draw from (a folder of images); type one")
        i = int(rng.integers(self.encoded.n_queries))
        return self.encoded.captions[i], int(self.encoded.query_pids[i])

    @torch.no_grad()
    def encode_caption(self, caption: str) -> dict[str, Tensor]:
        """``model.encode_texts`` of one caption, batched by the shared ``collate`` with the method's
        evaluation fields, as in evaluation."""
        batch = collate([{"caption": caption, "pid": -1, "label": -1, "image_index": -1}], self.tokenizer,
                        fields=self.model.batch_fields(False))
        with autocast_context(self.device):
            feats = self.model.encode_texts(to_device(model_inputs(batch), self.device))
        return {k: v.float() for k, v in feats.items()}

    @torch.no_grad()
    def scores(self, text_feats: Mapping[str, Tensor]) -> Tensor:
        """[n_gallery] scores of one encoded caption against every gallery image (the model's own
        ``similarity``, or the equal cosine of the fast path)."""
        if self.index is not None:
            return self.index.scores(text_feats["global"])[0]
        return self.model.similarity(self.image_feats, dict(text_feats), chunk_size=1)[0].float()

    def image_image(self) -> Tensor:
        """The gallery's image-image cosine similarities ("global" embeddings), computed once and kept:
        the visual neighbourhoods of ``visual_neighbors`` re-ranking."""
        if self._image_image is None:
            if self.gallery_size > RERANK_MAX_GALLERY:
                raise SearchInputError(f"re-ranking keeps the {self.gallery_size} x {self.gallery_size} image "
                                       f"similarities; galleries above {RERANK_MAX_GALLERY} images are not supported")
            if "global" not in self.image_feats:
                raise SearchInputError(f"re-ranking needs a 'global' image embedding; the model returns "
                                       f"{sorted(self.image_feats)}")
            img = F.normalize(self.image_feats["global"].float(), dim=-1)
            self._image_image = img @ img.T
        return self._image_image

    def _reranked(self, caption_feats: Mapping[str, Tensor], row: Tensor, method: str,
                  params: Mapping[str, Any] | None) -> Tensor:
        if method == "visual_neighbors":
            return rerank_lib.visual_neighbors(row[None], self.image_image(), **dict(params or {}))[0]
        query = Encoded(split=self.encoded.split, image_feats=self.image_feats, text_feats=dict(caption_feats),
                        query_pids=torch.tensor([-1]), gallery_pids=self.encoded.gallery_pids,
                        image_paths=self.encoded.image_paths, captions=[""], query_image_index=torch.tensor([-1]))
        return rerank_similarity(self.model, query, row[None], method, params)[0]

    def search(self, caption: str, k: int = 10, rerank: str | None = None,
               rerank_params: Mapping[str, Any] | None = None, true_pid: int | None = None) -> pd.DataFrame:
        """The ``k`` best gallery images for ``caption`` (fewer if the gallery is smaller).

        ``rerank``: None, one of ``engine.evaluate.RERANKERS`` (``rerank_params`` go to the engine's
        function) or ``"rescore"`` (the model's second stage on the top ``eval.rescore_k``; ``rerank_params``
        may hold ``k`` and ``max_pairs``); ``.attrs["rerank"]`` names the one used. ``true_pid``: the person the caption describes; by default looked up when the caption is
        one of the split's. Returns one row per rank with the columns of ``RESULT_COLUMNS`` (``match`` is
        None when the truth is unknown); ``.attrs`` holds caption, k, rerank, scoring, true_pid,
        unknown_words, latency_ms (encoding + scoring + top-k), the gallery name and ``rescored`` (leading rows whose
        score is the second-stage one; 0 unless ``rerank="rescore"``).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchInputError(f"k must be a positive integer, got {k!r}")
        if rerank is not None and rerank not in RERANKERS + (RESCORE,):
            raise SearchInputError(f"unknown re-ranking {rerank!r}; choose one of {list(RERANKERS + (RESCORE,))} "
                                   f"or None")
        if rerank == RESCORE and not getattr(self.model, "can_rescore", False):
            raise SearchInputError(f"{type(self.model).__name__} has no second-stage scorer (rescore); "
                                   f"choose another re-ranking")
        unknown = self.check_caption(caption)
        if rerank in RERANKERS:
            self.image_image()  # once per gallery, outside the timed part
        start = time.perf_counter()
        feats = self.encode_caption(caption)
        k = min(int(k), self.gallery_size)
        n_rescored = 0
        if rerank is None and self.index is not None:
            scores, idx = (t[0] for t in self.index.top_k(feats["global"], k))
        else:
            row = self.scores(feats)
            shown = row
            if rerank == RESCORE:
                cand, second = rescore_topk(self.model, self.image_feats, feats, row[None], **dict(rerank_params or {}))
                shown = row.float().clone().scatter_(0, cand[0], second[0])
                row = rescored_ranking(row[None], cand, second)[0]
                n_rescored = min(k, cand.shape[1])
            elif rerank is not None:
                row = shown = self._reranked(feats, row, rerank, rerank_params)
            top = stable_topk(row[None], k)[0]
            scores, idx = shown[top].cpu(), top.cpu()
        latency_ms = (time.perf_counter() - start) * 1000
        truth = self.truth_of(caption) if true_pid is None else int(true_pid)
        return self._table(caption, scores, idx, truth, {
            "caption": caption, "k": k, "rerank": rerank, "scoring": self.scoring, "true_pid": truth,
            "unknown_words": unknown, "latency_ms": latency_ms, "gallery": self.name, "rescored": n_rescored})

    def _table(self, caption: str, scores: Tensor, idx: Tensor, truth: int | None,
               attrs: dict[str, Any]) -> pd.DataFrame:
        pids = self.encoded.gallery_pids[idx].tolist()
        table = pd.DataFrame({
            "rank": np.arange(1, len(pids) + 1), "image": [str(self.encoded.image_paths[i]) for i in idx.tolist()],
            "pid": pids, "score": scores.float().numpy().astype(np.float64),
            "match": pd.Series([None if truth is None else p == truth for p in pids], dtype=object),
            "gallery_index": idx.numpy()})
        table.attrs.update(attrs)
        return table


def true_rank(table: pd.DataFrame) -> int | None:
    """The rank of the first image of the true person in a :meth:`CaptionSearch.search` result (None when
    it is not in the table or the truth is unknown)."""
    hits = table.loc[table["match"] == True, "rank"]  # noqa: E712 (object column of True/False/None)
    return int(hits.iloc[0]) if len(hits) else None


def summary_line(table: pd.DataFrame) -> str:
    """One line about a :meth:`CaptionSearch.search` result, for the app and the CLI:
    ``10 results in 12.3 ms (cosine/torch) · true person 123 at rank 2 · not in the vocabulary: ...``."""
    a = table.attrs
    parts = [f"{len(table)} results in {a['latency_ms']:.1f} ms ({a['scoring']}"
             + (f" + {a['rerank']}" if a.get("rerank") else "") + ")"]
    if a.get("true_pid") is not None:
        rank = true_rank(table)
        parts.append(f"true person {a['true_pid']} at rank {rank}" if rank is not None
                     else f"true person {a['true_pid']} not in the top {len(table)}")
    if a.get("unknown_words"):
        parts.append("not in the vocabulary: " + ", ".join(a["unknown_words"]))
    return " · ".join(parts)


def _caption_truth(captions: Sequence[str], pids: Sequence[int]) -> dict[str, int]:
    """Caption text -> person id, for captions that describe exactly one person of the split."""
    seen: dict[str, set[int]] = {}
    for caption, pid in zip(captions, pids):
        seen.setdefault(caption.strip(), set()).add(int(pid))
    return {c: next(iter(p)) for c, p in seen.items() if len(p) == 1}


__all__ = ["FAISS_MIN_GALLERY", "RERANK_MAX_GALLERY", "RESULT_COLUMNS", "GALLERY_CACHE_DIR", "SearchInputError", "faiss_available",
           "GalleryIndex", "uses_default_scoring", "CaptionSearch", "true_rank",
           "summary_line"]
