"""Sew calibration + Masking Caption Modeling (Wei et al., "Calibrating Cross-modal Features for Text-Based
Person Searching", the Sew paper, file 000 in ``../shared/papers/``).

A dual encoder (the baseline's encoders and projections) whose training objective is Eq. (12):
``L = lambda1 * L_sew + lambda2 * L_mcm`` with

* ``L_sew`` = Sew matching loss (pull Eq. (5) + push Eq. (6) = Eq. (7), and its text-to-image twin) + Sew ID
  loss (Eq. (8)-(9), both directions), with a fixed margin (Sew-F, 0.5) or the adaptive margin of Eq. (10)
  computed from each caption's length; ``model.matching="cmpm_cmpc"`` replaces it by the baseline's
  CMPM + CMPC (Table 4, Models 2 and 5; Table 5; Table 6);
* ``L_mcm`` (Eq. (11)): 10% of each caption's tokens are replaced by a learnable mask embedding before the
  text encoder; a decoder (self-attention over the text features, cross-attention to the image patch
  features, a vocabulary-sized linear layer) predicts the original tokens at the masked positions.

Algorithm 1: the CLS features pass a BatchNorm in training (``model.batchnorm``, in the projection) and are
L2-normalised by the losses; at inference only the dual encoder runs and the score is the cosine of the
CLS embeddings (``encode_*`` are the baseline's: no masking, no decoder).

Table 5's MCM components are the values of ``model.mcm``:

==================  ====  =========  ==============  ==========================================================
``mcm``             mask  attention  caption model.  what runs in training
==================  ====  =========  ==============  ==========================================================
``"none"``                                           the dual encoder only
``"mask_only"``     yes                              masked captions as augmentation (no decoder)
``"attention_only"``      yes                        decoder on unmasked captions, no reconstruction (below)
``"no_cross"``      yes              yes             decoder without cross-attention predicts masked tokens
``"full"``          yes   yes        yes             the full MCM of Section 3.2
==================  ====  =========  ==============  ==========================================================

Choices the paper leaves open (all config fields, documented here):

* "Attention only" has no reconstruction target, so some loss must reach the decoder. The paper explains the
  row as "the cross-attention brings details from sequence tokens to the CLS token", so here the decoder's
  output at the [CLS] position (text enriched by cross-attention to its own image) is projected to the joint
  space and classified into identities with the shared classifier (``id_loss``, weighted by lambda2). It is
  still training-only.
* Masking selects ``round(0.1 * T)`` (at least one) of a caption's T content tokens, uniformly, new draws every
  step; [CLS], [SEP] and padding are never masked. The mask embedding is one learnable vector of the word
  embedding width (initialised N(0, 0.02)) that replaces the word embedding at masked positions.
* The decoder is one post-norm transformer layer of the text encoder's width (``decoder_heads`` heads, 0 = one
  per 64 channels); image patch tokens are projected to that width by a linear layer. Eq. (11) sums over a
  caption's masked tokens; the batch loss is the mean over captions.
* The positives P(i) of Eq. (5)-(6) are the person's pairs that show *another image* than the anchor's: with
  two captions per image, the other caption of the anchor's own image is a second "perfect pair" of that
  image (Eq. (1)), not a positive to be kept a margin further away (``tbps_lib/losses/sew.py``, "Positives
  P(i)"). ``model.same_image_positives=true`` restores the literal reading (every other pair of the
  person); ``tbps_lib.analysis.diagnostics.sew_batch_diagnostic`` measures how much of Eq. (5) that
  reading spends on same-image captions.
* T_i in Eq. (10) is the caption's length in words (punctuation not counted, ``batch["word_lengths"]``).
  T_min/T_max are the paper's values for CUHK-PEDES (20-60), ICFG-PEDES (25-65) and RSTPReid (22-60); for
  other data (``t_min = t_max = 0`` in the config) the run fills them with the 5th and 95th percentiles of
  the training captions' lengths (``tbps_lib.data.text.length_bounds``) and records the values and their
  source in its config (``model.t_min``, ``model.t_max``, ``model.t_source``). Lengths outside [T_min, T_max]
  get the end margins (``adaptive_margin`` clamps).
* The smoke preset uses the shared smoke encoders (CNN + bi-GRU) with max pooling over tokens, as the
  baseline's smoke preset does; the paper preset uses the CLS features of ViT-B/16 + BERT-base at 224x224.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from tbps_lib.config import SMOKE_DEFAULTS, Config
from tbps_lib.data.text import IGNORE_INDEX, PAPER_LENGTH_BOUNDS, length_bounds, select_random_tokens
from tbps_lib.losses import (adaptive_margin, cmpc_loss, cmpm_loss, id_loss, masked_caption_loss, sew_id_loss,
                             sew_matching_loss)
from tbps_lib.models import baseline
from tbps_lib.models.base import MethodConfig
from tbps_lib.models.dual_encoder import DualEncoder
from tbps_lib.models.layers import POOLS, CrossAttentionBlock
from tbps_lib.models.registry import NotReproducible, register_method

MATCHINGS = ("sew", "cmpm_cmpc")
MARGINS = ("adaptive", "fixed")
MCM_VARIANTS = ("none", "mask_only", "attention_only", "no_cross", "full")
_MASKED = ("mask_only", "no_cross", "full")  # variants that mask the input captions
_DECODER = ("attention_only", "no_cross", "full")  # variants with a decoder
_RECONSTRUCT = ("no_cross", "full")  # variants that predict the masked tokens


@dataclass(frozen=True)
class SewMCMConfig(MethodConfig):
    """The method's own fields (``model.*``, plus ``num_classes`` from ``MethodConfig``); the defaults are the
    full method (Sew-A + MCM, Model 6)."""

    matching: str = "sew"  # "sew" (Sew calibration loss) or "cmpm_cmpc" (the baseline's losses)
    margin: str = "adaptive"  # "adaptive" (Sew-A, Eq. (10)) or "fixed" (Sew-F)
    fixed_margin: float = 0.5  # Sew-F's margin (Section 4.4.1)
    margin_min: float = 0.4  # M_min of Eq. (10)
    margin_max: float = 0.6  # M_max of Eq. (10)
    t_min: float = 0.0  # T_min of Eq. (10), words; 0 (with t_max 0) = from the training captions
    t_max: float = 0.0
    t_source: str = ""  # where t_min/t_max come from (filled with them)
    alpha: float = 32.0  # scale of Eq. (7) and Eq. (8)
    same_image_positives: bool = False  # True: the anchor's own image's other captions are in P(i) (module docstring)
    mcm: str = "full"  # Table 5 variant, see the module docstring
    mask_ratio: float = 0.1
    decoder_heads: int = 0  # 0 = text width // 64
    pool: str = "cls"
    batchnorm: bool = True  # Algorithm 1, line 8
    sew_weight: float = 1.0  # lambda1 of Eq. (12)
    mcm_weight: float = 1.0  # lambda2 of Eq. (12)
    cmpm_eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (("matching", self.matching, MATCHINGS), ("margin", self.margin, MARGINS),
                                     ("mcm", self.mcm, MCM_VARIANTS), ("pool", self.pool, POOLS)):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {list(allowed)}, got {value!r}")
        if not 0 <= self.margin_min <= self.margin_max:
            raise ValueError(f"model.margin_min/margin_max must satisfy 0 <= min <= max, got "
                             f"{self.margin_min}, {self.margin_max}")
        if (self.t_min, self.t_max) != (0, 0) and not 0 <= self.t_min < self.t_max:
            raise ValueError(f"model.t_min/t_max must satisfy 0 <= t_min < t_max (or both 0 = from the data), got "
                             f"{self.t_min}, {self.t_max}")
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"model.mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.alpha <= 0 or self.decoder_heads < 0:
            raise ValueError(f"model.alpha must be > 0 and model.decoder_heads >= 0, got "
                             f"{self.alpha}, {self.decoder_heads}")

    def resolve_from_data(self, ds: Any) -> "SewMCMConfig":
        """``num_classes`` (``MethodConfig``), then T_min/T_max (when both are 0) from the dataset: the
        paper's values for the real datasets, else percentiles of the training captions' lengths
        (``length_bounds``); the source is recorded."""
        cfg = super().resolve_from_data(ds)
        if (cfg.t_min, cfg.t_max) != (0, 0):
            return cfg
        t_min, t_max, source = length_bounds(ds)
        return dataclasses.replace(cfg, t_min=float(t_min), t_max=float(t_max), t_source=source)


def smoke_preset(dataset: str) -> Mapping[str, Any]:
    """The shared smoke settings, max pooling over tokens (as the baseline's smoke preset), 4 decoder heads."""
    return {**SMOKE_DEFAULTS, "model.pool": "max"}


def paper_preset(dataset: str) -> Mapping[str, Any]:
    """Section 4.2: ViT-B/16 + BERT-base at 224x224, dim 768, text length 100, batch 64, 60 epochs, Adam 1e-3,
    random flip, mask ratio 0.1, alpha 32, margins 0.4-0.6 and the dataset's T bounds (the baseline's paper
    preset supplies the shared fields; see its docstring for the schedule and sampler choices)."""
    changes = {**baseline.paper_preset(dataset), "image.img_size": (224, 224), "model.pool": "cls"}
    changes.pop("model.loss")
    if dataset in PAPER_LENGTH_BOUNDS:
        t_min, t_max = PAPER_LENGTH_BOUNDS[dataset]
        changes.update({"model.t_min": float(t_min), "model.t_max": float(t_max),
                        "model.t_source": f"Sew paper values for {dataset}"})
    return changes


_TABLE5 = {("1", "0", "0"): "mask_only", ("0", "1", "0"): "attention_only", ("1", "0", "1"): "no_cross",
           ("1", "1", "1"): "full", ("0", "0", "0"): "none"}


def paper_rows(flags: Mapping[str, str], preset: str) -> dict[str, Any]:
    """Config changes of a Sew paper row from its ``config`` flags in ``reported/sew_mcm.csv``.

    ``sew_margin`` none / fixed / adaptive -> ``model.matching`` cmpm_cmpc / sew + fixed / sew + adaptive;
    ``mcm`` 0/1 -> ``model.mcm`` none / full; Table 5's ``mcm_mask``, ``mcm_attention``, ``mcm_modeling``
    -> the ``model.mcm`` variant; ``image_encoder`` resnet50 / vit_b16 -> the image arch in the paper preset.
    The smoke preset has one small image encoder, so the ResNet-50 row (Table 4, Model 1) is not reproducible
    there; ``vit_b16`` rows use the smoke encoder.
    """
    changes: dict[str, Any] = {}
    encoder = flags.get("image_encoder", "vit_b16")
    if encoder not in ("vit_b16", "resnet50"):
        raise NotReproducible(f"image_encoder={encoder!r} is not an encoder of the Sew paper")
    if encoder == "resnet50":
        if preset != "paper":
            raise NotReproducible("the ResNet-50 vs ViT-B/16 comparison needs the paper preset (the smoke preset "
                                  "has one small CNN standing in for ViT-B/16)")
        changes["image.arch"] = "resnet50"
    sew = flags.get("sew_margin", "adaptive")
    if sew == "none":
        changes["model.matching"] = "cmpm_cmpc"
    elif sew in MARGINS:
        changes.update({"model.matching": "sew", "model.margin": sew})
        if sew == "fixed" and "margin" in flags:
            changes["model.fixed_margin"] = float(flags["margin"])
    else:
        raise NotReproducible(f"sew_margin={sew!r} is not a Sew paper setting")
    if "mcm_mask" in flags:
        key = (flags.get("mcm_mask", "0"), flags.get("mcm_attention", "0"), flags.get("mcm_modeling", "0"))
        if key not in _TABLE5:
            raise NotReproducible(f"MCM components {key} (mask, attention, modeling) are not a Table 5 row")
        changes["model.mcm"] = _TABLE5[key]
    else:
        changes["model.mcm"] = "full" if flags.get("mcm", "1") == "1" else "none"
    return changes


# The Sew paper's analysis figures (notebooks 09-11), drawn over every run asked for (the baseline beside
# Sew/MCM); builders live in tbps_lib.analysis.figures and are imported only when drawn.
FIG4, FIG5, FIG6 = "sew_fig4_singular_values", "sew_fig5_attention", "sew_fig6_tsne"
POINTING, DECODER = "pointing_game", "sew_mcm_decoder_cross_attention"
FIGURES = {name: f"tbps_lib.analysis.figures:{fn}" for name, fn in (
    (FIG4, "sew_fig4"), (FIG6, "sew_fig6"), (FIG5, "sew_fig5"), (POINTING, "pointing_game_figure"),
    (DECODER, "sew_decoder_figure"))}


#: What notebook 03 trains per budget (``MethodSpec.trained_tables``): ``full`` (``make reproduce``) the steps
#: + Sew-A (Model 2 -> 4) and + MCM on Sew-A (Model 4 -> 6) of Table 4; ``all`` every runnable row.
TRAINED_TABLES = {"ci": ("4",), "full": {"4": ("Model 2", "Model 4", "Model 6")}, "all": ("4", "5", "6")}


@register_method("sew_mcm", SewMCMConfig, presets={"smoke": smoke_preset, "paper": paper_preset},
                 paper_rows=paper_rows, figures=FIGURES, trained_tables=TRAINED_TABLES)
class SewMCM(DualEncoder):
    """The shared dual encoder (the baseline's) + Sew calibration losses + the MCM decoder (training only)."""

    def __init__(self, cfg: Config) -> None:
        m: SewMCMConfig = cfg.model
        super().__init__(cfg, pool=m.pool, batchnorm=m.batchnorm)
        width = self.text_encoder.out_dim
        self.mask_embedding = (nn.Parameter(torch.randn(self.text_encoder.word_dim) * 0.02)
                               if m.mcm in _MASKED else None)
        self.image_to_decoder: nn.Module | None = None
        self.decoder: CrossAttentionBlock | None = None
        self.vocab_head: nn.Linear | None = None
        self.decoder_cls_proj: nn.Linear | None = None
        if m.mcm in _DECODER:
            heads = m.decoder_heads or max(1, width // 64)
            cross = m.mcm != "no_cross"
            self.decoder = CrossAttentionBlock(width, heads, self_attention=True, cross_attention=cross)
            if cross:
                self.image_to_decoder = nn.Linear(self.image_encoder.out_dim, width)
            if m.mcm in _RECONSTRUCT:
                self.vocab_head = nn.Linear(width, self.text_encoder.vocab_size)
            else:
                self.decoder_cls_proj = nn.Linear(width, cfg.embed_dim)

    # -- pieces of the training step ---------------------------------------------------------------------

    def margins(self, batch: Mapping[str, Any]) -> float | Tensor:
        """M_i of each pair: the fixed margin (Sew-F) or Eq. (10) from the captions' word lengths (Sew-A)."""
        m: SewMCMConfig = self.cfg.model
        if m.margin == "fixed":
            return m.fixed_margin
        if (m.t_min, m.t_max) == (0, 0):
            raise ValueError("model.t_min/t_max are 0 (not resolved from the data): build the config through "
                             "train_or_load (resolve_config fills them) or set them")
        return adaptive_margin(batch["word_lengths"], m.t_min, m.t_max, m.margin_min, m.margin_max)

    def choose_masked(self, batch: Mapping[str, Any]) -> Tensor:
        """Bool [B, L]: the positions MCM masks (round(ratio * T_i) of the content tokens, at least one)."""
        ids = batch["input_ids"]
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        content = (positions >= 1) & (positions <= batch["token_lengths"].to(ids.device).unsqueeze(1))
        return select_random_tokens(content & batch["attention_mask"].bool(), self.cfg.model.mask_ratio)

    def decode(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor,
               need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """The MCM decoder: self-attention over the text features, cross-attention to the image tokens
        (projected to the text width) unless ``mcm == "no_cross"``; returns (decoded [B, L, D], weights)."""
        if self.decoder is None:
            raise ValueError(f"model.mcm={self.cfg.model.mcm!r} has no decoder")
        memory = self.image_to_decoder(image_tokens) if self.image_to_decoder is not None else None
        return self.decoder(text_tokens, memory, x_mask=text_mask, need_weights=need_weights)

    def _reconstruction_loss(self, decoded: Tensor, masked: Tensor, input_ids: Tensor) -> Tensor:
        """Eq. (11) on the masked positions, gathered to a fixed K per caption (no host synchronisation)."""
        k = max(1, math.floor(self.cfg.model.mask_ratio * input_ids.shape[1] + 0.5))  # >= masked per caption
        index = masked.float().topk(k, dim=1).indices  # masked positions first
        valid = masked.gather(1, index)
        targets = input_ids.gather(1, index).masked_fill(~valid, IGNORE_INDEX)
        picked = decoded.gather(1, index.unsqueeze(-1).expand(-1, -1, decoded.shape[-1]))
        return masked_caption_loss(self.vocab_head(picked), targets)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The named loss terms (unweighted) and ``loss`` = Eq. (12)."""
        m: SewMCMConfig = self.cfg.model
        masked = self.choose_masked(batch) if m.mcm in _MASKED else None
        img = self.image_encoder(batch["images"])
        txt = self.text_encoder(batch["input_ids"], batch["attention_mask"], replace=masked,
                                replacement=self.mask_embedding)
        image = self.image_proj(img.pooled, img.tokens)
        text = self.text_proj(txt.pooled, txt.tokens, txt.mask)
        weight = self.classifier_weight(batch["labels"])
        if m.matching == "sew":
            margin = self.margins(batch)
            same_image = None if m.same_image_positives else batch["image_index"]
            terms = {"match": sew_matching_loss(image, text, batch["pids"], margin, m.alpha,  # Eq. (5)-(7)
                                                image_index=same_image),
                     "id": sew_id_loss(image, text, batch["labels"], weight, margin, m.alpha)}  # Eq. (8)-(9)
        else:
            terms = {"cmpm": cmpm_loss(image, text, batch["pids"], eps=m.cmpm_eps),
                     "cmpc": cmpc_loss(image, text, batch["labels"], weight)}
        factors = {name: m.sew_weight for name in terms}  # lambda1 of Eq. (12)
        if self.decoder is not None:
            decoded, _ = self.decode(img.tokens, txt.tokens, txt.mask)
            if self.vocab_head is not None:
                terms["mcm"] = self._reconstruction_loss(decoded, masked, batch["input_ids"])  # Eq. (11)
            else:  # "attention only": identity classification of the decoded [CLS] (module docstring)
                terms["mcm"] = id_loss(self.decoder_cls_proj(decoded[:, 0]), batch["labels"], weight)
            factors["mcm"] = m.mcm_weight  # lambda2 of Eq. (12)
        terms["loss"] = torch.stack([factors[k] * v for k, v in terms.items()]).sum()
        return terms

    @torch.no_grad()
    def decoder_attention(self, images: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, tuple[int, int]]:
        """Cross-attention of the MCM decoder from every caption token to the image tokens of its own image,
        averaged over heads: ([B, L, n_image_tokens], image grid (h, w)); for attention maps. Captions are
        not masked here."""
        if self.image_to_decoder is None:
            raise ValueError(f"model.mcm={self.cfg.model.mcm!r} has no cross-attention")
        img = self.image_encoder(images)
        txt = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        _, weights = self.decode(img.tokens, txt.tokens, txt.mask, need_weights=True)
        return weights, img.grid
