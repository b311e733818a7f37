"""LAIP: Bidirectional Attention-weighted local alignment (BidirAtt) and Mask Phrase Modeling (MPM) on ALBEF
(Wang, Wu et al., "LAIP: Learning Local Alignment from Image-Phrase Modeling for Text-based Person Search",
file 003 in ``../shared/papers/``; the ALBEF equations are numbered as in its appendix).

Architecture (appendix B): a ViT image encoder; a BERT text encoder (the first ``model.text_layers``
layers); a fusion encoder of ``model.fusion_layers`` BERT-style layers (self-attention, cross-attention to
the image tokens [CLS; patches], feed-forward; post-norm) over the text encoder's output; linear projections
G_I, G_T to ``embed_dim`` (Eq. (13)-(15)); momentum copies (``model.momentum`` = 0.995) of the encoders and
projections, with queues of their features; a scalar ITM head (Eq. (18), W^O in R^{d x 1}); an MLP
vocabulary head for MPM / MLM.

Training, Eq. (12): L = L_itc + L_itm + L_tri (Eq. (1)) + sum over phrases (L_biatt + L_mpm):

* ``itc`` Eq. (16)-(17): cosine similarities / a learnable temperature against the momentum features of
  the batch and the queue (``tbps_lib.losses.laip.itc_loss``);
* ``itm`` Eq. (18)-(19): the fusion encoder's [CLS] through the ITM head, on the B positive pairs and on 2B
  in-batch hard negatives (for each text an image and for each image a text, drawn with probability
  softmax of the ITC similarity, other persons only, as ALBEF does);
* ``ftri`` Eq. (20): squared-hinge triplet on the same ITM scores with margin ``model.delta`` (0.6);
* ``biatt`` Eq. (4)-(10): each noun phrase (``noun_phrases`` batch field) runs through the text encoder and
  the fusion encoder with its caption's image; at fusion layer ``model.attention_layer`` (L, 1-based) the
  [CLS] row of the cross-attention map is the forward attention (Eq. (4)); the gradient of the masked
  word's score (the MPM head's logit of the true token at the masked position) with respect to that row is
  the backward attention (Eq. (5)-(6)); Eq. (7) multiplies their head means and normalises; Eq. (8) weighs
  the image encoder's patch features; Eq. (9)-(10) is 1 - cosine of the projected phrase-guided image
  feature and the projected phrase feature;
* ``mpm`` Eq. (11): the cross-entropy of the masked phrase word from the fused phrase tokens.

Table IV's switches are config fields: ``ftri``, ``foratt``, ``backatt`` (both = BidirAtt), and
``masked_modeling`` ("phrase" = MPM, "caption" = Table V's MLM, "none").

Inference (appendix D): ``encode_*`` run only the unimodal encoders and the projections; ``similarity``
is the cosine of the projected [CLS] features (Eq. (15)); ``rescore`` runs the fusion encoder and the ITM
head on the top-k candidates of each text (``eval.rescore_k``; 128 in the paper preset). The momentum
encoders, queues, MPM head and the phrase stream are training only.

Choices where the paper is silent or wrong (config fields where they are settings):

* Two stages (Sec. III-A: 30 epochs ITC + ITM, then 15 epochs with all losses) are one run with a staged
  loss schedule: until ``model.stage1_share`` of the training steps (default 30/45) only ITC + ITM are on
  (``TrainingContext.progress``), so each Table IV row is one config. A forward without a training
  context (tests) is stage 2.
* Eq. (20) is printed with the hinge reversed ([s(I,T) - s(I_neg,T) + delta]_+); the text says the positive
  should score higher, so the loss is [delta - s(I,T) + s(I_neg,T)]_+^2 + [delta - s(I,T) + s(I,T_neg)]_+^2,
  with the negatives of the ITM loss, on the ITM logit (Eq. (18) is the score itself).
* Eq. (18)-(19): the ITM head is one logit (W^O in R^{d x 1}) and Eq. (19) is a binary cross-entropy; an
  ALBEF checkpoint's two-way head maps exactly onto it (logit = z_1 - z_0).
* Eq. (17)'s labels: every same-person entry of the batch and the queue is a positive (as ALBEF's
  retrieval fine-tuning does with image ids), the target mass shared among them; no momentum distillation
  (the paper's Eq. (17) has hard labels). Queues start as random unit vectors of no person (ALBEF), and
  each process enqueues the gathered momentum features (``all_gather_no_grad``).
* ``model.itc_batch``: Eq. (16) contrasts with "the representations both from the original encoder and the
  paired momentum one"; ALBEF's code puts the batch's *momentum* features first in the banks
  ("momentum", the default). "online" puts the batch's online features there instead (gradients on both
  sides, CLIP-like), for runs from encoders that were never aligned, where momentum targets of 0.995 move
  little in a few hundred steps.
* Which row of the attention is "forward": the paper's Eq. (4) uses row 0 ([CLS]) and Eq. (6) the
  gradient with respect to it; the score s of Eq. (5) is the masked-word logit of the true token at the
  fusion output. As the paper notes, at the last fusion layer that gradient is zero; a zero row falls back
  to uniform weights (``losses.laip.attention_weights``). The image [CLS] column is dropped (Eq. (8) sums
  over patches j = 1..L_I) before normalising.
* Eq. (7)'s norm of a product with a signed gradient: the positive part of the head-averaged gradient is
  kept (Grad-CAM, the paper's refs. [2], [22]; as ``analysis.attention.bidirectional_attention``).
* Gradients: the backward attention is computed with ``torch.autograd.grad`` inside the training step
  *without* ``create_graph``: it is a constant weight, so L_biatt trains the forward attention (through
  w^Fa), the image patches and the phrase features, not second derivatives (the paper gives no reason to
  differentiate through a gradient; this halves the cost).
* The momentum encoders run in eval mode (no dropout; ``LAIP.train``): they only produce the targets of
  Eq. (16)-(17) under ``no_grad``; ALBEF's code leaves them in train mode, the paper is silent. Dropout
  (``bernoulli_``) was 40% of the momentum BERT's forward time in a CPU profile of a smoke step.
* ``model.itm_pairs`` (0 = every pair of the batch, the paper and ALBEF): Eq. (19)-(20) on that many pairs
  drawn at random from the batch, each with its image and text hard negatives drawn from the whole batch;
  an unbiased estimate of the same loss on fewer fusion passes (3k rows instead of 3B). Smoke deviation:
  16 of 64 (see the smoke preset's measurement below).
* One fusion pass per image-phrase pair serves BidirAtt and MPM: it gets the masked phrase P^ when MPM or
  BackAtt is on (the score s needs a masked word), the phrase P otherwise; f^P of Eq. (9) is the text
  encoder's [CLS] of the unmasked phrase. G_I and G_P of Eq. (9) are the ITC projections (the paper
  writes the same symbols as in Eq. (15)).
* MPM masks one WordPiece token of the phrase (not [CLS]/[SEP]) with [MASK] (``model.mask_token_id``: 4 in
  the workbook vocabularies, 103 in bert-base-uncased), drawn from the global generator (saved with
  checkpoints). MLM (Table V) masks ``model.mlm_ratio`` of each caption's tokens with [MASK] (no 80/10/10)
  and fuses the caption with its image; its loss is BERT's (the paper's ref. [5]): the mean over the masked
  tokens (``losses.laip.mlm_loss``), not Eq. (11)'s sum per caption.
* Eq. (12) sums over all phrases of a caption; ``model.max_phrases`` caps them (the first M noun phrases,
  ``data.text.extract_noun_phrases``) to bound the cost; L_biatt and L_mpm are summed over a caption's
  phrases and averaged over captions.
* The MPM head is ALBEF's MLM head shape (dense, GELU, LayerNorm, vocabulary layer). It exists whenever
  BackAtt or masked modelling is on; in BackAtt-only rows it scores the masked word without being trained
  by a loss (its weights come from the initialisation: ALBEF's MLM head or the workbook's VLP stage).
* Fusion layers: no dropout; their heads = the text encoder's. ``model.init_albef``: an ALBEF state dict
  (local file) loaded over the whole model through :func:`albef_to_laip` (retrieval or pretraining
  checkpoints: ``text_encoder.`` or ``text_encoder.bert.`` prefixes); momentum copies are re-made from the
  loaded weights.
* The smoke preset: the workbook's resnet_smoke and bert_smoke (2 layers = the text encoder) and 2 new
  fusion layers; L = 1 (the last layer's backward attention is zero, as the paper says of its 6th); the whole
  model starts from the workbook's ALBEF-style vision-language pretraining (``workbook:vlp_smoke``:
  ITC + ITM + MLM on the disjoint pretraining corpus, ``tbps_lib.pretrain``), which also stands in for
  the paper's COCO pre-finetuning in ``paper_rows`` (``coco=1``: from it; ``coco=0``: from the unimodal
  encoders alone). In the paper preset ``coco=1`` rows are not reproducible (no COCO, no LAIP weights) and
  ``model.init_albef`` must name a local ALBEF checkpoint for the paper's initialisation (unset: random).
* Smoke deviations from the paper (the paper preset keeps ALBEF's ViT, momentum banks, every ITM pair and
  lr 1e-5), each measured on the cuhk-like validation split, seed 0, on the shared 2-core machine:

  - Image encoder resnet_smoke, not a ViT: its 8x4 feature map is the patch tokens the fusion encoder
    cross-attends to and BidirAtt weighs (Eq. (3)-(8)), its mean the global feature (ALBEF's image side
    needs only [CLS] + patch tokens). vit_smoke is a 4x2 grid at 64x32 and learns far less: baseline
    smoke val R@1 16.4 with the bi-GRU vs 42.9 for resnet_smoke (lead's measurement, 5 epochs), and the
    earlier vit_smoke LAIP smoke runs and its VLP stage ended at chance (test R@1 ~1).
  - ``model.itc_batch="online"``: 1-epoch LAIP runs (resnet_smoke, unimodal init) with the momentum banks
    kept the ITC loss at chance (5.79 at the end; ln(64 + 256) = 5.77: the frozen-ish momentum targets of
    never-aligned encoders carry no signal in a few hundred steps), with the online batch features it
    fell to 4.65.
  - AdamW at 1e-3 on every parameter (no backbone factor): with it an ITC + ITM run reached val R@1 3.0
    after 1 epoch and 5.5 after 2 (R@10 29.6; chance ~0.6), where the earlier preset (5e-4, encoders
    x0.1, momentum banks) stayed at chance (val R@1 1.3 after 1 epoch). resnet_smoke and bert_smoke are
    trained at 1e-3 by the baseline smoke preset too.
  - ``model.itm_pairs=16`` of the 64 pairs of a batch in Eq. (19)-(20): the ITM fusion passes (3B rows of
    ~50 tokens) were the largest cost of a step; in a profile of one stage-2 step the fusion forward went
    from 0.77 s to 0.32 s (under load). With all of this, runs of the same length one after the other on
    the loaded machine: 77 steps, baseline 91 s, LAIP 145 s (1.6x); the full smoke run (385 steps, 5
    epochs), baseline 132 s, LAIP 296 s (2.2x; 3.8x before; stage-1 epochs ~50 s, stage-2 ~70 s, the
    baseline's ~25 s). That full LAIP run reached val R@1 16.0, test 16.4 (ITC ranking; before: ~1).
  - ``optim.epochs=3`` (the other methods' smoke runs: 5), stage 1 = the first 2, stage 2 = the last
    (``stage1_share`` 30/45 as the paper). The speed rule (a smoke run at most 2x the baseline's wall time
    on 2 cores) does not hold at 5 epochs: 2.83x in the previous measurement. Once the VLP stage aligned
    the modalities (its MLM averaged over masked tokens, 800 steps: ``tbps_lib.pretrain``), 5 epochs
    reached val R@1 39.5 and 3 epochs 35.7 (two runs side by side, 1 thread each). Alone on 2 threads, one
    after the other (seed 11): baseline 35.7 s, LAIP at 3 epochs 66.0 s (1.85x). Cheaper steps were not
    enough: ``model.momentum=0`` (the queue filled with the online features, no
    momentum copies) saves about 15% of a step and cost far more, val R@1 31.3 at 5 epochs.
* Paper preset batch (128 = 32 per GPU x 4) and queue (65536) follow ALBEF's retrieval fine-tuning: the
  paper gives neither. ``max_phrases`` 8 per caption there (the paper takes all).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps_lib.config import SMOKE_DEFAULTS, Config
from tbps_lib.data.text import IGNORE_INDEX, select_random_tokens
from tbps_lib.engine.distributed import all_gather_no_grad
from tbps_lib.losses.laip import (attention_weights, biatt_loss, fusion_triplet_loss, itc_loss, itm_loss,
                                  mask_phrase_loss, mlm_loss, phrase_guided_feature)
from tbps_lib.models.base import MethodConfig, RetrievalModel
from tbps_lib.models.encoders import (build_image_encoder, build_text_encoder, load_state_dict_file,
                                     resolve_weights)
from tbps_lib.models.registry import NotReproducible, register_method

MASKED_MODELING = ("phrase", "caption", "none")
ITC_BATCH = ("momentum", "online")


@dataclass(frozen=True)
class LAIPConfig(MethodConfig):
    """``model.*`` of LAIP; the defaults are the full method (Table IV row 8) at smoke sizes."""

    text_layers: int = 0  # BERT layers kept as the text encoder; 0 = all of text.arch
    fusion_layers: int = 2  # cross-attention layers (ALBEF: the last 6 of BERT-base)
    attention_layer: int = 1  # L of Fig. 6, 1-based, <= fusion_layers (paper: 3 of 6)
    ftri: bool = True  # Eq. (20)
    delta: float = 0.6  # margin of Eq. (20)
    foratt: bool = True  # Eq. (4) in Eq. (7)
    backatt: bool = True  # Eq. (6) in Eq. (7)
    masked_modeling: str = "phrase"  # "phrase" (MPM, Eq. (11)), "caption" (MLM, Table V) or "none"
    mlm_ratio: float = 0.15
    max_phrases: int = 3  # noun phrases per caption in the phrase stream
    phrase_length: int = 8  # tokens per phrase, [CLS]/[SEP] included
    mask_token_id: int = 4  # [MASK] of the vocabulary
    queue_size: int = 256  # M_Q of Eq. (16)
    momentum: float = 0.995  # alpha of the momentum update
    temperature: float = 0.07  # initial tau of Eq. (16) (learnable, clamped to [0.001, 0.5] as ALBEF)
    stage1_share: float = 30 / 45  # share of the steps with ITC + ITM only (Sec. III-A: 30 + 15 epochs)
    init_albef: str | None = None  # ALBEF state dict (local path) loaded over the whole model
    itc_batch: str = "momentum"  # the batch's entries of Eq. (16)'s banks: "momentum" (ALBEF) or "online"
    itm_pairs: int = 0  # pairs of the batch (drawn at random) that enter Eq. (19)-(20); 0 = all (the paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.itc_batch not in ITC_BATCH:
            raise ValueError(f"model.itc_batch must be one of {list(ITC_BATCH)}, got {self.itc_batch!r}")
        if self.masked_modeling not in MASKED_MODELING:
            raise ValueError(f"model.masked_modeling must be one of {list(MASKED_MODELING)}, got {self.masked_modeling!r}")
        for name in ("text_layers", "queue_size", "mask_token_id", "itm_pairs"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.fusion_layers < 1:
            raise ValueError(f"model.fusion_layers must be >= 1, got {self.fusion_layers}")
        if not 1 <= self.attention_layer <= self.fusion_layers:
            raise ValueError(f"model.attention_layer must be in [1, model.fusion_layers={self.fusion_layers}], "
                             f"got {self.attention_layer}")
        if self.queue_size < 1:
            raise ValueError(f"model.queue_size must be >= 1, got {self.queue_size}")
        if self.max_phrases < 1 or self.phrase_length < 3:
            raise ValueError(f"model.max_phrases must be >= 1 and model.phrase_length >= 3, got "
                             f"{self.max_phrases}, {self.phrase_length}")
        if self.delta < 0:
            raise ValueError(f"model.delta must be >= 0, got {self.delta}")
        if not 0 < self.mlm_ratio <= 1:
            raise ValueError(f"model.mlm_ratio must be in (0, 1], got {self.mlm_ratio}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"model.momentum must be in [0, 1), got {self.momentum}")
        if not 0.001 <= self.temperature <= 0.5:
            raise ValueError(f"model.temperature must be in [0.001, 0.5], got {self.temperature}")
        if not 0 <= self.stage1_share < 1:
            raise ValueError(f"model.stage1_share must be in [0, 1), got {self.stage1_share}")

    @property
    def phrase_stream(self) -> bool:
        """Whether training runs image-phrase pairs (BidirAtt or MPM)."""
        return self.foratt or self.backatt or self.masked_modeling == "phrase"

    @property
    def attention_mode(self) -> str | None:
        """Eq. (7)'s factors: "bidirectional", "forward", "backward", or None (no L_biatt)."""
        if self.foratt and self.backatt:
            return "bidirectional"
        return "forward" if self.foratt else "backward" if self.backatt else None

    def batch_fields(self, training: bool) -> Mapping[str, Mapping[str, Any]]:
        if training and self.phrase_stream:
            return {"noun_phrases": {"max_phrases": self.max_phrases, "phrase_length": self.phrase_length}}
        return {}


# ------------------------------------------------------------------------------------------------------
# The fusion encoder


class FusionAttention(nn.Module):
    """BERT multi-head attention (+ output dense, residual, LayerNorm) whose keys/values may come from another
    modality of width ``kv_dim``; returns the attention probabilities [B, H, Lq, Lk] as a tensor of the graph
    (BidirAtt differentiates with respect to them). Parameter names follow ALBEF's BERT layers."""

    def __init__(self, dim: int, heads: int, kv_dim: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion attention: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, lq, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(memory)), split(self.value(memory))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # Eq. (3)
        if memory_mask is not None:
            scores = scores.masked_fill(~memory_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(b, lq, d)
        return self.norm(x + self.dense(context)), probs


class FusionLayer(nn.Module):
    """One cross-modal encoder layer of ALBEF: self-attention over the text, cross-attention to the image
    tokens, feed-forward (post-norm)."""

    def __init__(self, dim: int, heads: int, image_dim: int) -> None:
        super().__init__()
        self.self_attn = FusionAttention(dim, heads, dim)
        self.cross_attn = FusionAttention(dim, heads, image_dim)
        self.intermediate = nn.Linear(dim, 4 * dim)
        self.output = nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: Tensor, x_mask: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """-> (updated text tokens, cross-attention probabilities [B, H, Lq, n_image_tokens])."""
        x, _ = self.self_attn(x, x, x_mask)
        x, probs = self.cross_attn(x, image)
        return self.norm(x + self.output(F.gelu(self.intermediate(x)))), probs


# ------------------------------------------------------------------------------------------------------
# Presets and the paper's rows


# What LAIP is during the workbook's VLP stage (``tbps_lib.pretrain``, ``workbook:vlp_smoke``): ALBEF's
# pretraining losses ITC + ITM + MLM, no phrase stream, from the start.
VLP_CHANGES: dict[str, Any] = {"model.init_albef": None, "model.ftri": False, "model.foratt": False,
                               "model.backatt": False, "model.masked_modeling": "caption", "model.stage1_share": 0.0,
                               "model.itc_batch": "online", "model.itm_pairs": 16}


def smoke_preset(dataset: str) -> Mapping[str, Any]:
    """resnet_smoke (its 8x4 feature map as the patch tokens) + bert_smoke (pretrained by the workbook) under
    the workbook's VLP weights, 2 fusion layers, L = 1, ITC against the online batch features, ITM on 16 pairs
    of the batch, AdamW at 1e-3 on everything, 3 epochs (2 + 1), top 16 re-scored (smoke deviations, each
    measured in the module docstring)."""
    return {**SMOKE_DEFAULTS, "image.arch": "resnet_smoke", "image.pretrained": "workbook:resnet_smoke",
            "text.arch": "bert_smoke", "text.pretrained": "workbook:bert_smoke", "optim.optimizer": "adamw",
            "optim.lr": 1e-3, "optim.weight_decay": 0.02, "eval.rescore_k": 16,
            "model.init_albef": "workbook:vlp_smoke", "model.itc_batch": "online", "model.itm_pairs": 16,
            "optim.epochs": 3}


def paper_preset(dataset: str) -> Mapping[str, Any]:
    """Appendix E: ALBEF (ViT-B/16 at 384x384, BERT-base split 6 + 6), 50 tokens, 768-d features, 256-d
    projections, AdamW lr 1e-5 cosine with warm-up, momentum 0.995, delta 0.6, L = 3, 45 epochs (30 + 15),
    re-scoring the top 128. Batch and queue: ALBEF's retrieval fine-tuning (batch 32 per GPU on 4 GPUs,
    queue 65536); the ALBEF weights come from ``model.init_albef`` (a local file)."""
    return {"image.arch": "vit_base_patch16", "image.img_size": (384, 384), "image.pretrained": None,
            "text.arch": "bert_base", "text.pretrained": None, "text.max_length": 50, "text.vocab_size": 30522,
            "embed_dim": 256, "data.batch_size": 128, "data.sampler": "identity", "data.instances_per_id": 2,
            "data.flip": True, "optim.optimizer": "adamw", "optim.lr": 1e-5, "optim.weight_decay": 0.02,
            "optim.schedule": "cosine", "optim.warmup_epochs": 1.0, "optim.epochs": 45,
            "eval.rescore_k": 128, "model.text_layers": 6, "model.fusion_layers": 6, "model.attention_layer": 3,
            "model.max_phrases": 8, "model.mask_token_id": 103, "model.queue_size": 65536}


def paper_rows(flags: Mapping[str, str], preset: str) -> dict[str, Any]:
    """Config changes of a Table IV / VI row from its flags (``reported/laip.csv``): ``ftri``, ``foratt``,
    ``backatt``, ``mpm`` (0/1), ``mlm`` (Table V's alternative: 1 = MLM instead of MPM) and ``coco``.

    ``coco`` (COCO pre-finetuning of ALBEF before the person-search training): in the paper preset
    ``coco=1`` needs LAIP's COCO-finetuned ALBEF weights and COCO, so it is not reproducible, and ``coco=0``
    starts from the ALBEF file of ``model.init_albef``. In the smoke preset the workbook's vision-language
    pretraining stage on its disjoint corpus (``workbook:vlp_smoke``) stands in for that extra image-text
    stage: ``coco=1`` starts from it, ``coco=0`` from the unimodal smoke encoders alone (new fusion layers).
    So smoke "Baseline" vs "Baseline+" measures what the VLP stage adds, not COCO.
    """
    changes: dict[str, Any] = {}
    if flags.get("coco", "1") == "1":
        if preset == "paper":
            raise NotReproducible("COCO pre-finetuning needs LAIP's COCO-finetuned ALBEF weights and the COCO "
                                  "dataset, which the workbook does not have (offline)")
        changes["model.init_albef"] = "workbook:vlp_smoke"
    elif preset != "paper":
        changes["model.init_albef"] = None
    if flags.get("itc_itm", "1") != "1":
        raise NotReproducible("every LAIP row trains ITC + ITM")
    on = lambda key, default="1": flags.get(key, default) == "1"  # noqa: E731
    modeling = "caption" if on("mlm", "0") else "phrase" if on("mpm") else "none"
    return {**changes, "model.ftri": on("ftri"), "model.foratt": on("foratt"), "model.backatt": on("backatt"),
            "model.masked_modeling": modeling}


# ------------------------------------------------------------------------------------------------------
# ALBEF checkpoints

_ALBEF_PARTS = {"attention.self.": "self_attn.", "attention.output.dense.": "self_attn.dense.",
                "attention.output.LayerNorm.": "self_attn.norm.", "crossattention.self.": "cross_attn.",
                "crossattention.output.dense.": "cross_attn.dense.",
                "crossattention.output.LayerNorm.": "cross_attn.norm.", "intermediate.dense.": "intermediate.",
                "output.dense.": "output.", "output.LayerNorm.": "norm."}
_ALBEF_HEAD = {"cls.predictions.transform.dense.": "mpm_head.0.", "cls.predictions.transform.LayerNorm.": "mpm_head.2.",
               "cls.predictions.decoder.": "mpm_head.3.", "cls.predictions.bias": "mpm_head.3.bias"}


def albef_to_laip(state: Mapping[str, Tensor], text_layers: int) -> tuple[dict[str, Tensor], list[str]]:
    """ALBEF's state dict (``visual_encoder.*``, ``text_encoder.[bert.]embeddings|encoder.layer.N.*``,
    ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, ``text_encoder.cls.predictions.*``) -> this
    model's names: BERT layers below ``text_layers`` stay in the text encoder, the others become
    ``fusion.(N - text_layers)``; the two-way ITM head becomes one logit (row 1 - row 0). Returns (mapped
    state, ignored keys: momentum copies, queues and anything unknown)."""
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        name = key
        if name.startswith("visual_encoder."):
            out["image_encoder.model." + name[len("visual_encoder."):]] = value
            continue
        if name in ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp"):
            out[name] = value
            continue
        if name in ("itm_head.weight", "itm_head.bias"):
            out[name] = (value[1] - value[0]).unsqueeze(0) if name.endswith("weight") else (value[1] - value[0]).reshape(1)
            continue
        if not name.startswith("text_encoder."):
            ignored.append(key)
            continue
        name = name[len("text_encoder."):]
        name = name[len("bert."):] if name.startswith("bert.") else name
        head = next((k for k in _ALBEF_HEAD if name.startswith(k)), None)
        if head is not None:
            out[_ALBEF_HEAD[head] + name[len(head):]] = value
        elif name.startswith("embeddings."):
            if not name.endswith("position_ids"):
                out["text_encoder.bert." + name] = value
        elif name.startswith("encoder.layer."):
            index, _, rest = name[len("encoder.layer."):].partition(".")
            if int(index) < text_layers:
                out[f"text_encoder.bert.encoder.layer.{index}.{rest}"] = value
            else:
                part = next((k for k in _ALBEF_PARTS if rest.startswith(k)), None)
                if part is None:
                    ignored.append(key)
                    continue
                out[f"fusion.{int(index) - text_layers}.{_ALBEF_PARTS[part]}{rest[len(part):]}"] = value
        else:
            ignored.append(key)
    return out, ignored


def laip_to_albef(state: Mapping[str, Tensor], text_layers: int) -> dict[str, Tensor]:
    """The inverse of :func:`albef_to_laip` for the weights it maps (momentum copies and queues are left out):
    how the workbook's VLP stage (``tbps_lib.pretrain``, ``workbook:vlp_smoke``) saves, so that one loader
    reads both. The one-logit ITM head becomes ALBEF's two rows (0, w)."""
    parts = {v: k for k, v in _ALBEF_PARTS.items()}
    heads = {v: k for k, v in _ALBEF_HEAD.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("image_encoder.model."):
            out["visual_encoder." + key[len("image_encoder.model."):]] = value
        elif key in ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp"):
            out[key] = value
        elif key in ("itm_head.weight", "itm_head.bias"):
            out[key] = torch.cat([torch.zeros_like(value), value])
        elif key.startswith("text_encoder.bert."):
            out["text_encoder." + key[len("text_encoder.bert."):]] = value
        elif key.startswith("fusion."):
            index, _, rest = key[len("fusion."):].partition(".")
            part = next(p for p in sorted(parts, key=len, reverse=True) if rest.startswith(p))
            out[f"text_encoder.encoder.layer.{int(index) + text_layers}.{parts[part]}{rest[len(part):]}"] = value
        elif key.startswith("mpm_head."):
            name = "mpm_head.3.bias" if key == "mpm_head.3.bias" else next(h for h in heads if key.startswith(h) and h != "mpm_head.3.bias")
            out["text_encoder." + heads[name] + ("" if name == "mpm_head.3.bias" else key[len(name):])] = value
    return out


# ------------------------------------------------------------------------------------------------------
# The model

FIGURES = {"laip_fig7_attention_maps": "tbps_lib.analysis.laip_figures:laip_attention_figure",
           "laip_pointing_game": "tbps_lib.analysis.laip_figures:laip_pointing_figure"}


#: What notebook 06 trains per budget (``MethodSpec.trained_tables``): ``ci`` Table IV's Baseline+ and LAIP;
#: ``full`` (``make reproduce``) Table IV's step + fusion triplet loss (+BidirAtts+MPM -> LAIP); ``all``
#: every runnable row of Tables IV and VI.
TRAINED_TABLES = {"ci": {"IV": ("Baseline+", "LAIP (Ours)")}, "full": {"IV": ("+BidirAtts+MPM", "LAIP (Ours)")},
                  "all": ("IV", "VI")}


@register_method("laip", LAIPConfig, presets={"smoke": smoke_preset, "paper": paper_preset},
                 paper_rows=paper_rows, figures=FIGURES, trained_tables=TRAINED_TABLES)
class LAIP(RetrievalModel):
    """ALBEF (unimodal encoders, fusion encoder, momentum encoders and queues, ITM head) + BidirAtt + MPM."""

    _MOMENTUM_PAIRS = (("image_encoder", "image_encoder_m"), ("text_encoder", "text_encoder_m"),
                       ("vision_proj", "vision_proj_m"), ("text_proj", "text_proj_m"))

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m: LAIPConfig = cfg.model
        self.image_encoder = build_image_encoder(cfg.image)
        self.text_encoder = build_text_encoder(cfg.text)
        bert = getattr(self.text_encoder, "bert", None)
        if bert is None:
            raise ValueError(f"text.arch={cfg.text.arch!r}: LAIP needs a BERT text encoder (ALBEF's)")
        if m.text_layers:
            if m.text_layers > len(bert.encoder.layer):
                raise ValueError(f"model.text_layers={m.text_layers} exceeds the {len(bert.encoder.layer)} layers "
                                 f"of {cfg.text.arch}")
            bert.encoder.layer = bert.encoder.layer[:m.text_layers]
            bert.config.num_hidden_layers = m.text_layers
        width, image_dim = self.text_encoder.out_dim, self.image_encoder.out_dim
        heads = int(bert.config.num_attention_heads)
        self.fusion = nn.ModuleList(FusionLayer(width, heads, image_dim) for _ in range(m.fusion_layers))
        self.vision_proj = nn.Linear(image_dim, cfg.embed_dim)  # G_I, Eq. (13)/(15)
        self.text_proj = nn.Linear(width, cfg.embed_dim)  # G_T (= G_P of Eq. (9)), Eq. (14)/(15)
        self.temp = nn.Parameter(torch.tensor(float(m.temperature)))
        self.itm_head = nn.Linear(width, 1)  # W^O of Eq. (18)
        self.mpm_head: nn.Module | None = None
        if m.backatt or m.masked_modeling != "none":
            self.mpm_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12),
                                          nn.Linear(width, self.text_encoder.vocab_size))
        if m.init_albef:
            self.load_albef(m.init_albef)
        for online, target in self._MOMENTUM_PAIRS:
            self.add_module(target, copy.deepcopy(getattr(self, online)).requires_grad_(False))
        g = torch.Generator().manual_seed(0)
        self.register_buffer("image_queue", F.normalize(torch.randn(m.queue_size, cfg.embed_dim, generator=g), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(m.queue_size, cfg.embed_dim, generator=g), dim=1))
        self.register_buffer("pid_queue", torch.full((m.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None

    def train(self, mode: bool = True) -> "LAIP":
        """``nn.Module.train``, except that the momentum encoders always run in eval mode (no dropout): they
        only produce targets under ``no_grad`` (module docstring)."""
        super().train(mode)
        for _, target in self._MOMENTUM_PAIRS:
            getattr(self, target).eval()
        return self

    def load_albef(self, path: str) -> None:
        """Load an ALBEF checkpoint (local file) over the model (:func:`albef_to_laip`); every key of the
        model must be given except the MPM head (absent from ALBEF's retrieval checkpoints)."""
        from pathlib import Path

        local, label = resolve_weights(path, "model.init_albef")  # workbook:vlp_smoke: the VLP stage
        file = Path(str(local)).expanduser()
        file = file / "model.safetensors" if file.is_dir() else file
        state = load_state_dict_file(file, "model.init_albef")
        mapped, _ = albef_to_laip(state, len(self.text_encoder.bert.encoder.layer))
        if self.mpm_head is None:  # a variant without the MLM/MPM head: the checkpoint's head is not used
            mapped = {k: v for k, v in mapped.items() if not k.startswith("mpm_head.")}
        own = self.state_dict()
        missing = sorted(k for k in own if k not in mapped and not k.startswith("mpm_head."))
        unexpected = sorted(k for k in mapped if k not in own)
        shaped = sorted(k for k in mapped if k in own and mapped[k].shape != own[k].shape)
        if missing or unexpected or shaped:
            raise ValueError(f"model.init_albef: {path} does not fit LAIP: missing {missing[:8]}, unexpected "
                             f"{unexpected[:8]}, mis-shaped {shaped[:8]}")
        self.load_state_dict(mapped, strict=False)
        self.image_encoder.pretrained_source = self.text_encoder.pretrained_source = f"albef:{label}"

    # -- encoders ------------------------------------------------------------------------------------------

    @staticmethod
    def _image_tokens(img: Any) -> Tensor:
        """[CLS; patches] [B, 1 + N, D]: what the fusion encoder cross-attends to."""
        return torch.cat([img.pooled.unsqueeze(1), img.tokens], dim=1)

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        img = self.image_encoder(images)
        return {"global": self.vision_proj(img.pooled), "tokens": self._image_tokens(img)}

    def encode_texts(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        txt = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        return {"global": self.text_proj(txt.pooled), "tokens": txt.tokens, "mask": txt.mask}

    def fuse(self, text: Tensor, text_mask: Tensor, image: Tensor, keep: int | None = None
             ) -> tuple[Tensor, Tensor | None]:
        """The fusion encoder: text tokens [B, L, D] (mask [B, L]) cross-attending to image tokens
        [B, 1 + N, D'] -> (fused tokens, cross-attention probabilities of layer ``keep`` (1-based) or None)."""
        kept = None
        for index, layer in enumerate(self.fusion, start=1):
            text, probs = layer(text, text_mask, image)
            if index == keep:
                kept = probs
        return text, kept

    def itm_score(self, fused: Tensor) -> Tensor:
        """sim_fine of Eq. (18): the ITM logit of the fused [CLS] [B]."""
        return self.itm_head(fused[:, 0]).squeeze(-1)

    @torch.no_grad()
    def rescore(self, image_feats: dict[str, Tensor], text_feats: dict[str, Tensor], candidates: Tensor) -> Tensor:
        """Appendix D: sim_fine (Eq. (18)) of each text with each of its ``candidates`` [n, k] -> [n, k]."""
        n, k = candidates.shape
        images = image_feats["tokens"][candidates.reshape(-1)]
        text = text_feats["tokens"].repeat_interleave(k, dim=0)
        mask = text_feats["mask"].repeat_interleave(k, dim=0)
        fused, _ = self.fuse(text.to(images.dtype), mask, images)
        return self.itm_score(fused).float().view(n, k)

    # -- training ------------------------------------------------------------------------------------------

    def _in_stage2(self) -> bool:
        ctx = self.training_context
        return ctx is None or ctx.progress >= self.cfg.model.stage1_share

    def _content(self, mask: Tensor) -> Tensor:
        """Bool [n, L]: real tokens other than [CLS] (position 0) and [SEP] (the last real one)."""
        positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        return (positions >= 1) & (positions < mask.sum(dim=1, keepdim=True) - 1)

    def mask_tokens(self, ids: Tensor, mask: Tensor, ratio: float | None = None) -> tuple[Tensor, Tensor]:
        """[MASK] one content token per row (MPM) or ``ratio`` of them (MLM) -> (masked ids, labels with
        ``IGNORE_INDEX`` off the masked positions)."""
        chosen = select_random_tokens(self._content(mask), ratio if ratio is not None else 1e-9)
        masked = ids.masked_fill(chosen, self.cfg.model.mask_token_id)
        return masked, ids.masked_fill(~chosen, IGNORE_INDEX)

    def _hard_negatives(self, image: Tensor, text: Tensor, pids: Tensor) -> tuple[Tensor, Tensor]:
        """For each text an image and for each image a text of another person, drawn with probability
        softmax(ITC similarity) (ALBEF's hard negatives for Eq. (19))."""
        with torch.no_grad():
            sim = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T / self.temp.clamp(0.001, 0.5)
            same = pids[:, None] == pids[None, :]
            eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
            floor = 1e-12 * (~eye).float()  # a batch of one person still draws another pair
            w_t2i = sim.float().softmax(dim=1).masked_fill(same, 0) + floor
            w_i2t = sim.T.float().softmax(dim=1).masked_fill(same, 0) + floor
            return torch.multinomial(w_t2i, 1).squeeze(1), torch.multinomial(w_i2t, 1).squeeze(1)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The named loss terms (unweighted) and ``loss`` = Eq. (12) (stage 1: ITC + ITM)."""
        m: LAIPConfig = self.cfg.model
        pids, ids, mask = batch["pids"], batch["input_ids"], batch["attention_mask"]
        if ids.device.type == "cpu":  # drop the batch's common padding (a host sync: CPU only; same losses)
            width = int(mask.sum(dim=1).max())
            ids, mask = ids[:, :width], mask[:, :width]
        img = self.image_encoder(batch["images"])
        image_tokens = self._image_tokens(img)
        txt = self.text_encoder(ids, mask)
        image_feat, text_feat = self.vision_proj(img.pooled), self.text_proj(txt.pooled)
        with torch.no_grad():
            image_m = self.vision_proj_m(self.image_encoder_m(batch["images"]).pooled)
            text_m = self.text_proj_m(self.text_encoder_m(ids, mask).pooled)
            image_m, text_m = F.normalize(image_m.float(), dim=-1), F.normalize(text_m.float(), dim=-1)
        self._pending = (image_m, text_m, pids)
        temp = self.temp.clamp(0.001, 0.5)
        bank_pids = torch.cat([pids, self.pid_queue])
        pos = pids[:, None] == bank_pids[None, :]
        # Eq. (16)-(17): the batch part of the banks is the momentum features (ALBEF) or the online ones
        batch_image, batch_text = (image_m, text_m) if m.itc_batch == "momentum" else (image_feat, text_feat)
        terms = {"itc": itc_loss(image_feat, text_feat, torch.cat([batch_image, self.image_queue.clone()]),
                                 torch.cat([batch_text, self.text_queue.clone()]), pos, pos, temp)}
        b = len(pids)
        # Eq. (19)-(20) on model.itm_pairs random pairs of the batch (all by default): the positive, an image
        # negative and a text negative of each, in one fusion call; the negatives come from the whole batch
        k = min(m.itm_pairs or b, b)
        sel = torch.randperm(b, device=pids.device)[:k] if k < b else torch.arange(b, device=pids.device)
        neg_image, neg_text = (n[sel] for n in self._hard_negatives(image_feat, text_feat, pids))
        fused, _ = self.fuse(torch.cat([txt.tokens[sel], txt.tokens[sel], txt.tokens[neg_text]]),
                             torch.cat([mask[sel], mask[sel], mask[neg_text]]),
                             torch.cat([image_tokens[sel], image_tokens[neg_image], image_tokens[sel]]))
        scores = self.itm_score(fused)  # Eq. (18)
        s_pos, s_neg_image, s_neg_text = scores[:k], scores[k:2 * k], scores[2 * k:]
        terms["itm"] = itm_loss(s_pos, scores[k:])  # Eq. (19)
        if self._in_stage2():
            if m.ftri:
                terms["ftri"] = fusion_triplet_loss(s_pos, s_neg_image, s_neg_text, m.delta)  # Eq. (20)
            if m.phrase_stream:
                terms.update(self._phrase_stream(batch, img, image_tokens))
            if m.masked_modeling == "caption":  # Table V's MLM
                masked, labels = self.mask_tokens(ids, mask, m.mlm_ratio)
                fused_m, _ = self.fuse(self.text_encoder(masked, mask).tokens, mask, image_tokens)
                terms["mlm"] = mlm_loss(self.mpm_head(fused_m), labels)  # BERT's MLM: mean over masked tokens
        terms["loss"] = torch.stack(list(terms.values())).sum()  # Eq. (1) + Eq. (12), unweighted
        return terms

    def _phrase_stream(self, batch: Mapping[str, Any], img: Any, image_tokens: Tensor) -> dict[str, Tensor]:
        """L_biatt (Eq. (4)-(10)) and L_mpm (Eq. (11)) of every (image, noun phrase) pair of the batch."""
        m: LAIPConfig = self.cfg.model
        ids, pmask = batch["phrase_ids"], batch["phrase_attention_mask"]
        b, n_phr, lp = ids.shape
        valid = (torch.arange(n_phr, device=ids.device)[None] < batch["phrase_counts"].to(ids.device)[:, None]).reshape(-1)
        ids, pmask = ids.reshape(-1, lp), pmask.reshape(-1, lp).clone()
        pmask[:, 0] = 1  # padding rows attend to their [CLS] slot (their losses are masked out)
        rows = torch.arange(b, device=ids.device).repeat_interleave(n_phr)
        masking = m.backatt or m.masked_modeling == "phrase"
        inputs, labels = self.mask_tokens(ids, pmask) if masking else (ids, None)
        mode = m.attention_mode
        phrase_cls = None
        if masking and mode is not None:  # P^ (fused) and P (f^P of Eq. (9)) in one text-encoder call
            both = self.text_encoder(torch.cat([inputs, ids]), torch.cat([pmask, pmask]))
            phrase_tok, phrase_cls = both.tokens[:len(ids)], both.pooled[len(ids):]
        else:
            phrase_tok = self.text_encoder(inputs, pmask).tokens
        fused, probs = self.fuse(phrase_tok, pmask, image_tokens[rows], keep=m.attention_layer if mode else None)
        terms: dict[str, Tensor] = {}
        logits = target = None
        if labels is not None:  # one masked token per phrase: the head runs at that position only
            where = (labels != IGNORE_INDEX).float().argmax(dim=1)
            target = labels.gather(1, where[:, None]).squeeze(1).masked_fill(~valid, IGNORE_INDEX)
            logits = self.mpm_head(fused[torch.arange(len(where), device=where.device), where])
        if m.masked_modeling == "phrase":
            terms["mpm"] = mask_phrase_loss(logits, target, b)  # Eq. (11), summed over phrases (Eq. (12))
        if mode is not None:
            forward = probs[:, :, 0, 1:]  # Eq. (4): the phrase [CLS] row, image patches only
            backward = None
            if m.backatt:
                picked = logits.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                score = (picked * (target != IGNORE_INDEX)).sum()  # Eq. (5): the true word's score
                # Eq. (6): ds/dA of the [CLS] row; not create_graph: a constant weight (module docstring)
                backward = torch.autograd.grad(score, probs, retain_graph=True)[0][:, :, 0, 1:]
            weights = attention_weights(forward, backward, mode)  # Eq. (7)
            guided = phrase_guided_feature(weights, img.tokens[rows])  # Eq. (8)
            phrase_cls = phrase_tok[:, 0] if phrase_cls is None else phrase_cls  # f^P of the unmasked P
            terms["biatt"] = biatt_loss(self.vision_proj(guided), self.text_proj(phrase_cls), valid, b)  # Eq. (9)-(10)
        return terms

    def after_optimizer_step(self, ctx: Any) -> None:
        """EMA of the momentum encoders and projections; the batch's momentum features enter the queues."""
        m: LAIPConfig = self.cfg.model
        for online, target in self._MOMENTUM_PAIRS:
            for p, q in zip(getattr(self, online).parameters(), getattr(self, target).parameters()):
                q.mul_(m.momentum).add_(p.detach(), alpha=1 - m.momentum)
        if self._pending is None:
            return
        image_m, text_m, pids = (all_gather_no_grad(t) for t in self._pending)
        slots = (self.queue_ptr + torch.arange(len(pids), device=pids.device)) % m.queue_size
        self.image_queue[slots] = image_m.to(self.image_queue.dtype)
        self.text_queue[slots] = text_m.to(self.text_queue.dtype)
        self.pid_queue[slots] = pids
        self.queue_ptr.copy_((self.queue_ptr + len(pids)) % m.queue_size)
        self._pending = None

    # -- attention maps (figures) -------------------------------------------------------------------------

    def phrase_attention(self, images: Tensor, phrase_ids: Tensor, phrase_mask: Tensor, masked_position: Tensor
                         ) -> dict[str, Tensor]:
        """Forward, backward and bidirectional maps (Eq. (4), (6), (7)) over the image patches of each
        (image, phrase) pair, the phrase's token at ``masked_position`` [P] masked: {"forward",
        "backward", "bidirectional"} -> [P, N] (weights summing to 1). Runs with gradients, in eval mode."""
        m: LAIPConfig = self.cfg.model
        if self.mpm_head is None:
            raise ValueError("phrase_attention needs the MPM head (model.backatt or model.masked_modeling)")
        with torch.enable_grad():
            img = self.image_encoder(images)
            chosen = torch.zeros_like(phrase_ids, dtype=torch.bool)
            chosen[torch.arange(len(phrase_ids)), masked_position] = True
            inputs = phrase_ids.masked_fill(chosen, m.mask_token_id)
            labels = phrase_ids.masked_fill(~chosen, IGNORE_INDEX)
            tokens = self.text_encoder(inputs, phrase_mask).tokens
            fused, probs = self.fuse(tokens, phrase_mask, self._image_tokens(img), keep=m.attention_layer)
            logits = self.mpm_head(fused)
            score = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[chosen].sum()
            backward = torch.autograd.grad(score, probs)[0][:, :, 0, 1:]
        forward = probs.detach()[:, :, 0, 1:]
        return {mode: attention_weights(forward, backward, mode).detach()
                for mode in ("forward", "backward", "bidirectional")}
