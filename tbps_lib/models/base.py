"""The contract every method keeps (DESIGN.md, "Contracts every method keeps").

* ``model(batch)`` in training returns a dict of named loss terms and ``loss``, their weighted sum.
* ``encode_images(images)`` / ``encode_texts(batch)`` return dicts of embeddings.
* ``similarity(image_feats, text_feats)`` returns ``[n_texts, n_images]``, computed in chunks of texts.
  The default is the cosine similarity of the ``"global"`` embeddings (one matmul per chunk); methods
  with several embeddings or a pairwise scorer override :meth:`RetrievalModel.pair_scores`.
* Training-only modules (decoders, classifiers) are never used by ``encode_*`` or ``similarity``.
* Optional two-stage inference: ``rescore(image_feats, text_feats, candidates)`` re-scores the top-k
  gallery candidates of each text with a pairwise head (e.g. LAIP's / ALBEF's ITM head); default: not
  supported (``can_rescore`` is False). See the "Two-stage inference" block of :class:`RetrievalModel`.

A batch is a dict made by ``tbps_lib.data.loaders.collate``:
``images`` float [B, 3, H, W]; ``input_ids``, ``attention_mask`` long [B, L]; ``token_lengths`` long [B]
(non-special tokens per caption); ``word_lengths`` long [B] (words per caption, punctuation not counted);
``pids`` long [B] (original person ids); ``labels`` long [B] (contiguous training labels, -1 outside the
training split); ``image_index`` long [B] (index of the image in its split, so two pairs of the same image
are recognisable); ``captions`` list[str].
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RescoreNotSupported(NotImplementedError):
    """The model has no second-stage scorer (``rescore``), but re-scoring was asked for."""

    def __init__(self, model_name: str) -> None:
        super().__init__(
            f"{model_name} has no second-stage scorer: rerank='rescore' needs a method that implements "
            f"RetrievalModel.rescore (e.g. an ITM head); use rerank=None, 'visual_neighbors' or "
            f"'k_reciprocal' instead")


class RetrievalModel(nn.Module):
    """Base class of every method; subclasses implement ``forward``, ``encode_images``, ``encode_texts``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> losses")

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_texts(self, batch: dict[str, Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def pair_scores(self, image_feats: dict[str, Tensor], text_feats: dict[str, Tensor]) -> Tensor:
        """Scores of every text in ``text_feats`` against every image: [n_texts, n_images].

        Default: cosine similarity of the ``"global"`` embeddings.
        """
        return F.normalize(text_feats["global"].float(), dim=-1) @ F.normalize(image_feats["global"].float(), dim=-1).T

    @torch.no_grad()
    def similarity(self, image_feats: dict[str, Tensor], text_feats: dict[str, Tensor],
                   chunk_size: int = 1024) -> Tensor:
        """[n_texts, n_images] similarity, computed ``chunk_size`` texts at a time (float32)."""
        n_texts = next(iter(text_feats.values())).shape[0]
        rows = []
        for start in range(0, n_texts, chunk_size):
            chunk = {k: v[start:start + chunk_size] for k, v in text_feats.items()}
            rows.append(self.pair_scores(image_feats, chunk).float())
        return torch.cat(rows, dim=0)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the pretrained backbones (the optimiser gives them ``backbone_lr_factor``).

        Default: those of ``self.image_encoder`` and ``self.text_encoder`` when present.
        """
        params: list[nn.Parameter] = []
        for name in ("image_encoder", "text_encoder"):
            module = getattr(self, name, None)
            if module is not None:
                params.extend(p for p in module.parameters() if p.requires_grad)
        return params

    # ---- Two-stage inference (re-scoring the top-k) ---------------------------------------------------
    # Evaluation (``rerank="rescore"``), ``Run.evaluate``, the tables' eval-only rows and ``CaptionSearch``
    # rank the gallery by ``similarity`` first, then hand the ``eval.rescore_k`` best gallery indices of
    # each text to ``rescore`` (``eval.rescore_pairs`` text-image pairs per call at most, so a pairwise head
    # keeps a bounded working set); the re-scored candidates are placed ahead of the rest in their new order.

    @property
    def can_rescore(self) -> bool:
        """Whether this model re-scores candidates (its class overrides :meth:`rescore`)."""
        return type(self).rescore is not RetrievalModel.rescore

    def rescore(self, image_feats: dict[str, Tensor], text_feats: dict[str, Tensor],
                candidates: Tensor) -> Tensor:
        """Second-stage scores of ``candidates`` (LongTensor [n_texts, k] of gallery indices into
        ``image_feats``) for each text of ``text_feats`` (a chunk of n_texts texts): FloatTensor
        [n_texts, k], higher = better match. Called without gradients, in eval mode, on the model's device.

        Default: not supported (raises :class:`RescoreNotSupported`).
        """
        raise RescoreNotSupported(type(self).__name__)
