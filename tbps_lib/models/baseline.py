"""The shared baseline: a dual encoder with projection heads, trained with one of two loss choices.

* ``loss="cmpm_cmpc"`` - CMPM + CMPC (Zhang & Lu, ECCV 2018) on the [CLS] features: the Sew paper's
  baseline ("Model 2", its Table 4) and ACSA's relation-I row (with Swin-T and ``cmpc_weight=4``).
* ``loss="id_ranking"`` - ID loss with one classifier shared by both modalities (Eq. (7)) + the
  hardest-negative bidirectional ranking loss (Eq. (9)) on global-max-pooled features: the part-level
  paper's "Baseline" row (its Table 2).

Embeddings: ``encode_images`` / ``encode_texts`` return ``{"global": [n, embed_dim]}``, NOT L2-normalised
(the CMPM/CMPC projections use the raw norms; analyses such as the singular-value spectrum see the raw
features); retrieval uses their cosine similarity (``RetrievalModel.pair_scores``). The classifier is used
in training only.

Choices the papers leave open (documented here, all config fields):

* ``pool="auto"`` resolves to ``"cls"`` for CMPM+CMPC (the Sew paper uses CLS features) and ``"max"`` for
  ID+ranking (the part-level paper's global max pooling). The smoke preset sets ``"max"`` for both
  losses: with randomly initialised encoders a [CLS]/final-state feature barely depends on the input.
  For ``"max"`` each token is projected to
  ``embed_dim`` first and then max-pooled, because the part-level paper pools features of width d shared
  by both modalities; image tokens are the patch tokens / feature map ([CLS] excluded), text tokens every
  real position ([CLS] and [SEP] included).
* ``batchnorm=False``: the Sew paper's Algorithm 1 puts a BatchNorm on the CLS features in training; it is
  available here (``batchnorm=True``) but off, since Table 4 attributes the BatchNorm to no row.
* The ranking margin alpha is not given by the part-level paper: 0.2 (the VSE++ value it cites).
  Eq. (9) sums over the batch (``ranking_reduction="sum"``); the ID loss is a batch mean.
* ``num_classes`` (the classifier size, from :class:`~tbps_lib.models.base.MethodConfig`) is data, not a
  hyperparameter: 0 means "not known yet"; ``train_or_load`` sets it to the number of training identities
  before building the model. A model with 0 builds (encoders and heads only) but refuses to compute a loss
  that needs the classifier.

The paper preset follows the Sew paper, Section 4.2: ViT-B/16 + BERT-base-uncased, representation
dimension 768, text length 100, batch 64, 60 epochs, Adam with initial lr 1e-3, random horizontal flip.
Deviations and open choices: images are 384x128 (the person-search convention the other papers use; the
Sew paper resizes to 224x224 - set ``image.img_size=224x224`` for that), the schedule (not given) is a
cosine decay with 5 warm-up epochs, the sampler is identity-balanced (2 pairs per id, as the Sew losses
need in-batch positives, so the baseline and Sew rows differ only in their losses), and
``text.vocab_size`` is BERT-base's 30522 for a WordPiece trained on the captions when no pretrained BERT
is given. ``image.pretrained`` / ``text.pretrained`` stay None: point them at local weights with ``--set``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from tbps_lib.config import SMOKE_DEFAULTS, Config
from tbps_lib.losses import cmpc_loss, cmpm_loss, hardest_negative_ranking_loss, id_loss
from tbps_lib.losses.ranking import REDUCTIONS
from tbps_lib.models.base import MethodConfig
from tbps_lib.models.dual_encoder import DualEncoder
from tbps_lib.models.layers import POOLS
from tbps_lib.models.registry import register_method

LOSSES = ("cmpm_cmpc", "id_ranking")
_AUTO_POOL = {"cmpm_cmpc": "cls", "id_ranking": "max"}


@dataclass(frozen=True)
class BaselineConfig(MethodConfig):
    """The baseline's own fields (``model.*``, plus ``num_classes`` from ``MethodConfig``); see the module
    docstring for the choices."""

    loss: str = "cmpm_cmpc"  # "cmpm_cmpc" (Sew baseline) or "id_ranking" (part-level baseline)
    pool: str = "auto"  # "auto", "cls", "max" or "mean"
    batchnorm: bool = False  # BatchNorm1d after pooling (Sew Algorithm 1, line 8)
    cmpm_weight: float = 1.0
    cmpc_weight: float = 1.0  # ACSA's mu = 4
    cmpm_eps: float = 1e-8
    id_weight: float = 1.0
    ranking_weight: float = 1.0
    margin: float = 0.2  # alpha of Eq. (9), not given by the part-level paper
    ranking_reduction: str = "sum"  # Eq. (9) sums over the batch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.pool != "auto" and self.pool not in POOLS:
            raise ValueError(f"model.pool must be 'auto' or one of {list(POOLS)}, got {self.pool!r}")
        if self.ranking_reduction not in REDUCTIONS:
            raise ValueError(f"model.ranking_reduction must be one of {list(REDUCTIONS)}, "
                             f"got {self.ranking_reduction!r}")
        if self.cmpm_eps <= 0 or self.margin < 0:
            raise ValueError(f"model.cmpm_eps must be > 0 and model.margin >= 0, got {self.cmpm_eps}, {self.margin}")

    @property
    def resolved_pool(self) -> str:
        """The pooling actually used: ``pool``, or the loss's paper choice when ``pool == "auto"``."""
        return _AUTO_POOL[self.loss] if self.pool == "auto" else self.pool


def smoke_preset(dataset: str) -> Mapping[str, Any]:
    """The shared smoke settings (small encoders, CPU minutes) with the CMPM+CMPC loss."""
    # Max pooling over tokens: from random initialisation the bi-GRU's final states (and a [CLS]) are
    # nearly the same for every caption, which stalls CMPM; the token-wise maximum picks out the
    # distinctive words (colours, garments) from the first steps.
    return {**SMOKE_DEFAULTS, "model.loss": "cmpm_cmpc", "model.pool": "max"}


def paper_preset(dataset: str) -> Mapping[str, Any]:
    """The Sew paper's Section 4.2 settings for its CMPM+CMPC baseline (choices: module docstring)."""
    return {
        "model.loss": "cmpm_cmpc",
        "image.arch": "vit_base_patch16",
        "image.img_size": (384, 128),
        "text.arch": "bert_base",
        "text.max_length": 100,
        "text.vocab_size": 30522,
        "embed_dim": 768,
        "data.batch_size": 64,
        "data.sampler": "identity",
        "data.instances_per_id": 2,
        "data.flip": True,
        "optim.optimizer": "adam",
        "optim.lr": 1e-3,
        "optim.schedule": "cosine",
        "optim.warmup_epochs": 5.0,
        "optim.epochs": 60,
    }


@register_method("baseline", BaselineConfig, presets={"smoke": smoke_preset, "paper": paper_preset})
class Baseline(DualEncoder):
    """The shared :class:`DualEncoder` with the pooling of ``model.pool`` and the CMPM+CMPC or ID+ranking losses."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, pool=cfg.model.resolved_pool, batchnorm=cfg.model.batchnorm)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The named loss terms (unweighted) and ``loss``, their weighted sum."""
        m: BaselineConfig = self.cfg.model
        image = self.embed_images(batch["images"])
        text = self.embed_texts(batch)
        weight = self.classifier_weight(batch["labels"])
        if m.loss == "cmpm_cmpc":
            terms = {"cmpm": cmpm_loss(image, text, batch["pids"], eps=m.cmpm_eps),
                     "cmpc": cmpc_loss(image, text, batch["labels"], weight)}
            factors = {"cmpm": m.cmpm_weight, "cmpc": m.cmpc_weight}
        else:
            # Eq. (8) for the global embeddings of each modality, Eq. (10) for the global embeddings.
            terms = {"id": id_loss(image, batch["labels"], weight) + id_loss(text, batch["labels"], weight),
                     "ranking": hardest_negative_ranking_loss(image, text, batch["pids"], m.margin,
                                                              m.ranking_reduction)}
            factors = {"id": m.id_weight, "ranking": m.ranking_weight}
        terms["loss"] = torch.stack([factors[k] * v for k, v in terms.items()]).sum()
        return terms
