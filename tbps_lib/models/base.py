"""The contract every method keeps; ``CONTRIBUTING.md`` ("The method contract") explains it with examples.

A method is a config class (``model.*`` fields, a subclass of :class:`MethodConfig`) and a model class (a
subclass of :class:`RetrievalModel`), registered together with ``models.registry.register_method``.

Required of the model:

* ``model(batch)`` in training returns a dict of named scalar loss terms and ``loss``, their weighted sum.
* ``encode_images(images)`` / ``encode_texts(batch)`` return dicts of embeddings (``"global"`` at least for
  the default scorer).

Optional hooks, each with its default (nothing to write when the default fits):

==========================================  ===================================================
A batch is a dict made by ``tbps_lib.data.loaders.collate``:
``images`` float [B, 3, H, W]; ``input_ids``, ``attention_mask`` long [B, L]; ``token_lengths`` long [B]
(non-special tokens per caption); ``word_lengths`` long [B] (words per caption, punctuation not counted);
``pids`` long [B] (original person ids); ``labels`` long [B] (contiguous training labels, -1 outside the
training split); ``image_index`` long [B] (index of the image in its split, so two pairs of the same image
are recognisable); ``captions`` list[str]; plus the fields of ``cfg.model.batch_fields(training)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TrainingContext:
    """Where training is: ``step`` (finished optimiser steps before this one, 0-based), ``epoch`` (0-based),
    ``total_steps`` of the run and ``steps_per_epoch``. Given to :meth:`RetrievalModel.set_training_context`
    before each training forward and to :meth:`RetrievalModel.after_optimizer_step` after the step."""

    step: int
    epoch: int
    total_steps: int
    steps_per_epoch: int

    @property
    def progress(self) -> float:
        """``step / total_steps`` in [0, 1]: for loss-weight warm-ups and momentum schedules."""
        return min(1.0, self.step / max(1, self.total_steps))


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config dataclass (``model.*``); subclasses are frozen dataclasses too.

    ``num_classes``: the identity classifier's size. It is data, not a hyperparameter: 0 means "not known
    yet" and :meth:`resolve_from_data` (called by ``engine.runs.resolve_config``) sets it to the number of
    training identities. Methods without a classifier simply ignore it.
    """

    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0, got {self.num_classes}")

    def resolve_from_data(self, ds: Any) -> "MethodConfig":
        """The config with its data-derived fields filled from ``ds`` (a ``TBPSDataset``); the resolved
        config names the run. Default: ``num_classes`` (when 0) = number of training identities.
        Override to fill more, calling ``super().resolve_from_data(ds)`` first."""
        if self.num_classes == 0:
            return dataclasses.replace(self, num_classes=len(ds.train_labels()))
        return self

    def batch_fields(self, training: bool) -> Mapping[str, Mapping[str, Any]]:
        """Extra batch fields: ``{builder name: its keyword arguments}`` with builders of
        ``tbps_lib.data.loaders.BATCH_FIELDS`` (e.g. ``{"noun_phrases": {"max_phrases": 6,
        "phrase_length": 8}}``). ``training=False`` asks for what ``encode_texts`` needs in evaluation.
        Default: none."""
        return {}
class RescoreNotSupported(NotImplementedError):
    """The model has no second-stage scorer (``rescore``), but re-scoring was asked for."""

    def __init__(self, model_name: str) -> None:
        super().__init__(
            f"{model_name} has no second-stage scorer: rerank='rescore' needs a method that implements "
            f"RetrievalModel.rescore (e.g. an ITM head); use rerank=None, 'visual_neighbors' or "
            f"'k_reciprocal' instead")


class RetrievalModel(nn.Module):
    """Base class of every method; subclasses implement ``forward``, ``encode_images``, ``encode_texts``.

    The optional hooks (module docstring) have defaults here.
    """

    # Optional: ``decoder_attention(images, batch) -> (weights [B, L, n_image_tokens], grid (h, w))``, the
    # cross-attention of a training decoder for attention maps; None = the model has none.
    decoder_attention: Callable[..., tuple[Tensor, tuple[int, int]]] | None = None

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.training_context: TrainingContext | None = None

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> losses")

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_texts(self, batch: dict[str, Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- scoring --------------------------------------------------------------------------------------
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

    # -- training -------------------------------------------------------------------------------------
    def set_training_context(self, ctx: TrainingContext) -> None:
        """Called by the trainer before each training forward. Default: keep it in ``self.training_context``
        (read it in ``forward`` for loss-weight warm-ups or stage switches)."""
        self.training_context = ctx

    def after_optimizer_step(self, ctx: TrainingContext) -> None:
        """Called by the trainer after each optimiser step (outside autograd). Default: nothing. Momentum
        encoders (EMA) and feature queues update here; keep their state in buffers so checkpoints hold it."""

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

    def batch_fields(self, training: bool) -> Mapping[str, Mapping[str, Any]]:
        """The extra batch fields of the method (``cfg.model.batch_fields``; not a hook, override it on the
        config); none for a model built without a ``MethodConfig`` (tests)."""
        method_cfg = getattr(self.cfg, "model", None)
        return method_cfg.batch_fields(training) if isinstance(method_cfg, MethodConfig) else {}

    # -- reports --------------------------------------------------------------------------------------
    def pretrained_sources(self) -> dict[str, str | None]:
        """Where each encoder's weights came from (None = random initialisation), for run provenance.

        Default: the ``pretrained_source`` attribute of ``image_encoder`` / ``text_encoder``, else the
        config's ``image.pretrained`` / ``text.pretrained``.
        """
        out: dict[str, str | None] = {}
        for key, name, section in (("image", "image_encoder", "image"), ("text", "text_encoder", "text")):
            module = getattr(self, name, None)
            if module is not None and hasattr(module, "pretrained_source"):
                out[key] = module.pretrained_source
            else:
                out[key] = getattr(getattr(self.cfg, section, None), "pretrained", None)
        return out

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


__all__ = ["TrainingContext", "MethodConfig", "RetrievalModel", "RescoreNotSupported"]
