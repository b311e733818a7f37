"""The contract every method keeps (DESIGN.md, "Contracts every method keeps").

* ``model(batch)`` in training returns a dict of named loss terms and ``loss``, their weighted sum.
* ``encode_images(images)`` / ``encode_texts(batch)`` return dicts of embeddings.
* ``similarity(image_feats, text_feats)`` returns ``[n_texts, n_images]``, computed in chunks of texts.
  The default is the cosine similarity of the ``"global"`` embeddings (one matmul per chunk); methods
  with several embeddings or a pairwise scorer override :meth:`RetrievalModel.pair_scores`.
* Training-only modules (decoders, classifiers) are never used by ``encode_*`` or ``similarity``.

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
