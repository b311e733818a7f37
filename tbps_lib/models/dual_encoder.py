"""The dual encoder the baseline and Sew/MCM share: image and text encoders, each followed by a
:class:`~tbps_lib.models.layers.PooledProjection` to ``cfg.embed_dim``, and one identity classifier shared by
both modalities (training only; built when ``model.num_classes > 0``).

Methods pass their pooling and BatchNorm choice to the constructor, so their configs carry only their own
fields. Embeddings are not L2-normalised (losses such as CMPM use the raw norms); retrieval uses their
cosine (``RetrievalModel.pair_scores``).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from tbps_lib.models.base import RetrievalModel
from tbps_lib.models.encoders import build_image_encoder, build_text_encoder
from tbps_lib.models.layers import PooledProjection


class DualEncoder(RetrievalModel):
    """Image encoder + text encoder with projections (``pool``: a ``layers.POOLS`` entry; ``batchnorm``:
    BatchNorm1d after pooling) and the shared identity classifier of ``cfg.model.num_classes`` classes."""

    def __init__(self, cfg: Any, pool: str, batchnorm: bool) -> None:
        super().__init__(cfg)
        self.image_encoder = build_image_encoder(cfg.image)
        self.text_encoder = build_text_encoder(cfg.text)
        self.image_proj = PooledProjection(self.image_encoder.out_dim, cfg.embed_dim, pool, batchnorm)
        self.text_proj = PooledProjection(self.text_encoder.out_dim, cfg.embed_dim, pool, batchnorm)
        num_classes = cfg.model.num_classes
        self.classifier = nn.Linear(cfg.embed_dim, num_classes, bias=False) if num_classes > 0 else None

    def embed_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> joint-space embeddings [B, embed_dim] (not normalised)."""
        feats = self.image_encoder(images)
        return self.image_proj(feats.pooled, feats.tokens)

    def embed_texts(self, batch: Mapping[str, Any]) -> Tensor:
        """``input_ids`` / ``attention_mask`` of ``batch`` -> joint-space embeddings [B, embed_dim]."""
        feats = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        return self.text_proj(feats.pooled, feats.tokens, feats.mask)

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """``{"global": [B, embed_dim]}``, not normalised (retrieval uses the cosine)."""
        return {"global": self.embed_images(images)}

    def encode_texts(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``{"global": [B, embed_dim]}``, not normalised (retrieval uses the cosine)."""
        return {"global": self.embed_texts(batch)}

    def classifier_weight(self, labels: Tensor) -> Tensor:
        """The classifier weight, after checking that it exists and (on CPU, without a device sync) that
        ``labels`` are training labels in [0, num_classes)."""
        if self.classifier is None:
            raise ValueError(f"model.num_classes is 0, but the {self.cfg.method} losses need an identity "
                             f"classifier: set model.num_classes to the number of training identities "
                             f"(len(TBPSDataset.train_labels()); train_or_load does this)")
        n = self.classifier.out_features
        if labels.device.type == "cpu" and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise ValueError(f"batch['labels'] must be training labels in [0, {n}) (model.num_classes={n}); got "
                             f"values from {int(labels.min())} to {int(labels.max())} (-1 marks pairs outside "
                             f"the training split)")
        return self.classifier.weight


__all__ = ["DualEncoder"]
