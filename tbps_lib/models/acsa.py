"""Asymmetric Cross-Scale Alignment (ACSA; Ji, Hu, Liu, Wu, Zhao, IEEE TMM 2022; file 002 in
``../shared/papers/``).

A dual encoder (Swin-T + BERT in the paper) with multi-scale entities on both sides:

* Visual (Section III-A): the global image embedding I_g (the backbone's pooled stage-4 feature through
  the global projection) and k = 4 region embeddings I_r = [head, upper body, lower body, feet]: the
  stage-4 feature map is cut into six horizontal parts, grouped into regions, each pooled and passed
  through a fully connected layer to dimension d. I_m = [I_g, I_r] (k + 1 visual entities).
* Text (Section III-B): the caption embedding T_g ([CLS]) and up to M = 10 noun phrases, each encoded
  alone by the same text encoder (its [CLS]) into T_p = [t_1 .. t_M]. Phrases come from the framework's
  ``noun_phrases`` batch field (``data.text.extract_noun_phrases``: NLTK's chunker, or the workbook's own
  tagger offline; the paper uses TextBlob).
* Global alignment: CMPM + mu * CMPC on (I_g, T_g) (``losses.cmpm``).
* ACAM (Section III-C): image-to-text cross-attention Eq. (1)-(6) and text-to-image Eq. (7)-(11) between
  the visual entities and the phrases, inverse temperature 20 (``losses.acsa.acam_similarity``).
* Loss Eq. (17): L = L_cmpm + mu * L_cmpc + gamma * L_ACSA, with L_ACSA the KL form Eq. (12)-(16) over
  the ACAM similarities of every (image, caption) pair of the batch, mu = 4, gamma = 0.1.

Table V's relations are ``model.relations``: which entities enter ACAM (relation I, the global alignment,
is always trained).

=========================  =================================  ==========================  ==================
``relations``              visual entities (ACAM)             text entities (ACAM)        relations
=========================  =================================  ==========================  ==================
``"I"``                    (no ACAM)                          (no ACAM)                   image-text
``"I+II"``                 regions                            phrases                     + region-phrase
``"I+II+III"`` (ACSA)      global image + regions             phrases                     + image-phrase
``"I+II+III+IV"``          global image + regions             caption + phrases           + region-text
=========================  =================================  ==========================  ==================

Table IV's ``model.local_parts``: ``"partition"`` (the four body regions) or ``"six_slices"`` (the six
parts themselves as regions, k = 6, MIA's slicing).

Choices where the paper is silent or wrong (config fields where they are choices):

* **Lower body** (``model.partition``): the text lists head = parts 1-2, upper body = parts 2-3 and
  feet = part 6 and drops the lower body; here lower body = parts 4-5 (``"1-2,2-3,4-5,6"``, 1-based).
* **Part rows**: part p of six covers feature rows floor(p h / 6) .. ceil((p + 1) h / 6)
  (``layers.stripe_rows``; adaptive pooling's bins), so a map of 7 rows (Swin-T at 224x224) gives
  slightly overlapping parts; a region spans the rows of its first to its last part. A grid with fewer
  rows than ``model.n_slices`` is an error naming that field (checked when the model is built).
* **Region features**: the backbone tokens of a region are projected by *one* fully connected layer
  shared by all regions ("a fully connected layer"), then pooled over the region (``model.region_pool``:
  mean, as Swin's own global pooling, in the paper preset; max in the smoke preset, as the smoke
  baseline's pooling). The region FC is separate from the global projection.
* **Phrases** use the caption's text encoder and the caption's projection ("in a similar way to the
  above textual encoding"), pooled as the caption is (``model.pool``); a phrase is at most
  ``model.phrase_length`` tokens with [CLS] and [SEP] (paper silent: 12). A caption without any noun
  phrase takes its own caption embedding as its only phrase (so ACAM is defined for it).
* **Eq. (9)** is read with the weighted sum and the softmax over the visual entities (the printed index
  j is a typo; ``losses/acsa.py``). Eq. (8) normalises over the phrases, Eq. (2) over the visual entities,
  as printed (SCAN's two directions).
* **Which ACAM similarity enters the loss**: the two directions are averaged, S_ACAM = (S + S') / 2
  (Eq. (6) and Eq. (11)), and both directions of L_ACSA (Eq. (15), (16)) use it; the paper calls ACAM's
  output "a similarity score" without saying how its two directions combine.
* **Eq. (12)** as printed, p_ab = S_ab / sum S, is a probability only when every similarity in the row is
  positive; cosines are not. ``model.acsa_probability="softmax"`` (default) uses p_ab = softmax_b(20 S_ab),
  CMPM's form with the paper's softmax inverse temperature 20 (``model.acsa_scale``); ``"ratio"`` is the
  printed form (p = softmax of log S: equal to the printed form whenever it is defined, with non-positive
  similarities clamped to 1e-8). The normalisation index of Eq. (12) is read as the texts of image a.
* **Inference** (the paper never states its retrieval score): score(I, T) = cos(I_g, T_g) +
  ``model.acam_weight`` * S_ACAM(I, T) (weight 1: both are cosines in [-1, 1]); relation I uses the
  global cosine alone. ``encode_images`` returns the visual entities and ``encode_texts`` the text
  entities with their mask, so retrieval needs no image-text forward pass. "+RR" rows re-rank with the
  engine's ``visual_neighbors`` (NAFS) on the global embeddings.
* The identity classifier of CMPC is shared by both modalities and used in training only.
* **Backbones of Table III** in the smoke preset: ``resnet_smoke`` / ``vit_smoke`` / ``swin_smoke`` stand
  in for ResNet-50 / ViT / Swin-T and ``bilstm_smoke`` (the workbook's recurrent encoder with an LSTM
  cell, pretrained by the bi-GRU's masked-LM recipe: ``workbook:bilstm_smoke``) for the Bi-LSTM [53]; the
  rows are relation I (CMPM + CMPC on the global features: Table III's Swin + BERT row prints Table V's
  relation-I numbers). The Bi-LSTM's pooled feature is its final forward and backward hidden states
  (``model.pool`` "cls" takes it; the smoke preset's "max" max-pools its outputs). Rows with a transformer
  smoke encoder (``vit_smoke``, ``swin_smoke``, ``bert_smoke``) train their backbones at 0.1 x the
  learning rate (``optim.backbone_lr_factor``: the lead's measurement, the transformer smoke encoders do
  not train at Adam 1e-3), the ResNet + Bi-LSTM row at 1. The paper preset has ResNet-50, ViT-B/16,
  Swin-T, BERT-base and a Bi-LSTM (``bilstm``: the paper gives no sizes; 300-d word embeddings and 512
  hidden units per direction, the workbook's ``bigru`` sizes, random initialisation). XLNet (Table VI) is
  not available.
* **Smoke backbones**: ``swin_smoke`` at the smoke image size (64x32) ends in a 2x1 stage-4 grid, too few
  rows for six parts (192x96 would give 6x3 at about nine times the cost), so the smoke preset keeps the
  workbook's ``resnet_smoke`` (an 8x4 grid) for the full method; ``swin_smoke`` appears in Table III. The
  text side keeps ``bigru_smoke`` (phrases and captions max-pooled over the GRU outputs instead of a
  [CLS]): the lead's measurement (``/work/helpers/BACKBONES.md``, baseline smoke preset, validation R@1
  per epoch) has ``resnet_smoke + bert_smoke`` at 0.6 / 9.0 / 17.1 against 2.7 / 26.1 / 39.3 with the bi-GRU
  (``bert_smoke`` weights before the 15:35 re-pretraining on main; worth re-measuring with the new ones).
* **mu in the smoke preset**: 1, not the paper's 4. With mu = 4 the CMPC term drowns CMPM and the smoke
  encoders do not learn within the 5-epoch budget (measured on cuhk-like, seed 0, 2 threads under load:
  the full method's validation R@1 was 0.9 after epochs 1 and 2, against 2.7 / 26.1 for the baseline; 120
  training steps at lr 1e-3, relation I: training CMPM 27.5 -> 27.1 with mu = 4, 27.5 -> 22.3 with mu = 1;
  the full method with mu = 1: 27.5 -> 22.0, L_ACSA 27.5 -> 24.7). Relation I in the smoke preset is then
  the workbook's baseline (CMPM + CMPC with weight 1). The paper preset keeps mu = 4.
* Paper preset (Section IV-B): Swin-T at 224x224, BERT-base, 100 tokens, d = 768, AdamW for 30 epochs,
  cosine decay to 5e-6 with 5 warm-up epochs, batch 16, lr 1e-4. Not given: weight decay (0.01, AdamW's
  default), the sampler (identity-balanced, 2 pairs per person, as the baseline's preset), random flip
  (on, as the baseline's preset). ``image.pretrained`` / ``text.pretrained`` stay None: point them at
  local Swin-T / BERT weights with ``--set``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from tbps_lib.config import SMOKE_DEFAULTS, Config
from tbps_lib.losses import acam_similarity, acsa_loss, cmpc_loss, cmpm_loss
from tbps_lib.losses.acsa import PROBABILITIES
from tbps_lib.models import baseline
from tbps_lib.models.base import MethodConfig
from tbps_lib.models.dual_encoder import DualEncoder
from tbps_lib.models.layers import POOLS, pool_row_ranges, stripe_rows
from tbps_lib.models.registry import NotReproducible, register_method

RELATIONS = ("I", "I+II", "I+II+III", "I+II+III+IV")
LOCAL_PARTS = ("partition", "six_slices")
REGION_NAMES = ("head", "upper body", "lower body", "feet")
# ACAM's entities per relation set: (global image, regions, caption, phrases), Table V's check marks.
ENTITIES = {"I": (False, False, False, False), "I+II": (False, True, False, True),
            "I+II+III": (True, True, False, True), "I+II+III+IV": (True, True, True, True)}
_SCORE_ELEMENTS = 1 << 24  # texts x images x K x M per ACAM chunk at inference (~64 MB per float tensor)


def parse_partition(spec: str, n_slices: int) -> tuple[tuple[int, int], ...]:
    """``"1-2,2-3,4-5,6"`` -> ((0, 1), (1, 2), (3, 4), (5, 5)): each region's first and last part (0-based);
    errors name ``model.partition``."""
    regions = []
    for item in str(spec).split(","):
        first, _, last = item.strip().partition("-")
        try:
            a, b = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"model.partition must be comma-separated part ranges such as '1-2,2-3,4-5,6', "
                             f"got {spec!r}") from None
        if not 1 <= a <= b <= n_slices:
            raise ValueError(f"model.partition: range {item.strip()!r} must lie within parts 1..{n_slices} "
                             f"(model.n_slices) with first <= last, got {spec!r}")
        regions.append((a - 1, b - 1))
    return tuple(regions)


@dataclass(frozen=True)
class AcsaConfig(MethodConfig):
    """ACSA's own fields (``model.*``); defaults are the full method (relations I-III, body partition)."""

    relations: str = "I+II+III"  # Table V, see the module docstring
    local_parts: str = "partition"  # Table IV: "partition" (4 body regions) or "six_slices"
    n_slices: int = 6  # horizontal parts the feature map is cut into
    partition: str = "1-2,2-3,4-5,6"  # head, upper body, lower body, feet (1-based parts; lower: our choice)
    region_pool: str = "mean"  # pooling of a region's projected tokens: "mean" or "max"
    pool: str = "cls"  # global image / caption / phrase features: a layers.POOLS entry
    max_phrases: int = 10  # M
    phrase_length: int = 12  # tokens per phrase, [CLS] and [SEP] included (paper silent)
    lambda_i2t: float = 20.0  # lambda_1 of Eq. (4)
    lambda_t2i: float = 20.0  # lambda'_1 of Eq. (9)
    cmpm_weight: float = 1.0
    mu: float = 4.0  # CMPC weight, Eq. (17)
    gamma: float = 0.1  # L_ACSA weight, Eq. (17)
    acsa_probability: str = "softmax"  # Eq. (12): "softmax" (well-defined) or "ratio" (as printed)
    acsa_scale: float = 20.0  # inverse temperature of the "softmax" form
    acsa_eps: float = 1e-8  # epsilon of Eq. (14)
    acam_weight: float = 1.0  # weight of S_ACAM beside the global cosine at inference
    cmpm_eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (("relations", self.relations, RELATIONS),
                                     ("local_parts", self.local_parts, LOCAL_PARTS),
                                     ("region_pool", self.region_pool, ("mean", "max")),
                                     ("pool", self.pool, POOLS),
                                     ("acsa_probability", self.acsa_probability, PROBABILITIES)):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {list(allowed)}, got {value!r}")
        if self.n_slices < 1:
            raise ValueError(f"model.n_slices must be >= 1, got {self.n_slices}")
        regions = parse_partition(self.partition, self.n_slices)
        if self.local_parts == "partition" and len(regions) != len(REGION_NAMES):
            raise ValueError(f"model.partition must name {len(REGION_NAMES)} regions ({', '.join(REGION_NAMES)}), "
                             f"got {len(regions)} in {self.partition!r}")
        if self.max_phrases < 1:
            raise ValueError(f"model.max_phrases must be >= 1, got {self.max_phrases}")
        if self.phrase_length < 3:
            raise ValueError(f"model.phrase_length must be >= 3 ([CLS], a word, [SEP]), got {self.phrase_length}")
        for name in ("lambda_i2t", "lambda_t2i", "acsa_scale", "acsa_eps", "cmpm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        for name in ("cmpm_weight", "mu", "gamma", "acam_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def uses_acam(self) -> bool:
        return self.relations != "I"

    @property
    def entities(self) -> tuple[bool, bool, bool, bool]:
        """(global image, regions, caption, phrases) in ACAM (Table V's check marks)."""
        return ENTITIES[self.relations]

    @property
    def region_parts(self) -> tuple[tuple[int, int], ...]:
        """Each region's first and last part (0-based): the partition, or every part alone (six slices)."""
        if self.local_parts == "six_slices":
            return tuple((p, p) for p in range(self.n_slices))
        return parse_partition(self.partition, self.n_slices)

    def batch_fields(self, training: bool) -> Mapping[str, Mapping[str, Any]]:
        """The noun phrases (training and evaluation) when ACAM runs."""
        if not self.uses_acam:
            return {}
        return {"noun_phrases": {"max_phrases": self.max_phrases, "phrase_length": self.phrase_length}}


def smoke_preset(dataset: str) -> Mapping[str, Any]:
    """The shared smoke settings (``resnet_smoke`` + ``bigru_smoke``, pretrained; see the module docstring
    for why not ``swin_smoke`` / ``bert_smoke``) with max pooling of the global features and regions (as the
    smoke baseline) and mu = 1 (the paper's mu = 4 stalls the smoke encoders: module docstring)."""
    return {**SMOKE_DEFAULTS, "model.pool": "max", "model.region_pool": "max", "model.mu": 1.0}


def paper_preset(dataset: str) -> Mapping[str, Any]:
    """Section IV-B: Swin-T at 224x224 + BERT-base, 100 tokens, d = 768, AdamW 30 epochs, cosine to 5e-6 with
    5 warm-up epochs, batch 16, lr 1e-4, mu 4, gamma 0.1, lambda 20, M = 10 (open choices: module docstring)."""
    changes = {**baseline.paper_preset(dataset)}
    changes.pop("model.loss")
    changes.update({
        "image.arch": "swin_tiny", "image.img_size": (224, 224), "embed_dim": 768,
        "data.batch_size": 16, "optim.optimizer": "adamw", "optim.lr": 1e-4, "optim.min_lr": 5e-6,
        "optim.weight_decay": 0.01, "optim.schedule": "cosine", "optim.warmup_epochs": 5.0, "optim.epochs": 30,
        "model.pool": "cls", "model.region_pool": "mean",
    })
    return changes


_IMAGE_ARCHS = {"smoke": {"resnet50": "resnet_smoke", "vit": "vit_smoke", "swin_t": "swin_smoke"},
                "paper": {"resnet50": "resnet50", "vit": "vit_base_patch16", "swin_t": "swin_tiny"}}
_TEXT_ARCHS = {"smoke": {"bilstm": "bilstm_smoke", "bert": "bert_smoke"},
               "paper": {"bilstm": "bilstm", "bert": "bert_base"}}


def _backbone_changes(flags: Mapping[str, str], preset: str) -> dict[str, Any]:
    """Table III's image x text backbones (relation I); see the module docstring for the stand-ins."""
    image, text = flags.get("image_encoder", "swin_t"), flags.get("text_encoder", "bert")
    if image not in _IMAGE_ARCHS["paper"]:
        raise NotReproducible(f"image_encoder={image!r} is not a backbone of the ACSA paper")
    if text not in _TEXT_ARCHS[preset]:
        raise NotReproducible(f"text_encoder={text!r} is not a text backbone of the ACSA paper's Table III")
    changes: dict[str, Any] = {"model.relations": "I", "image.arch": _IMAGE_ARCHS[preset][image],
                               "text.arch": _TEXT_ARCHS[preset][text]}
    if preset == "smoke":
        changes.update({"image.pretrained": f"workbook:{changes['image.arch']}",
                        "text.pretrained": f"workbook:{changes['text.arch']}"})
        if image != "resnet50" or text != "bilstm":  # the transformer smoke encoders need it (module docstring)
            changes["optim.backbone_lr_factor"] = 0.1
    return changes


def paper_rows(flags: Mapping[str, str], preset: str) -> dict[str, Any]:
    """Config changes of an ACSA paper row from its ``config`` flags in ``reported/acsa.csv``.

    ``relations`` (Table V) -> ``model.relations`` (the image/region/text/phrase flags must agree with it);
    ``local_parts`` (Table IV) -> ``model.local_parts``; ``image_encoder`` + ``text_encoder`` (Table III) ->
    the backbones, relation I; ``text_encoder`` alone (Table VI): ``bert`` is the full method, ``xlnet`` is
    not reproducible (no XLNet weights here).
    """
    if preset not in _IMAGE_ARCHS:
        raise NotReproducible(f"unknown preset {preset!r}")
    if "image_encoder" in flags:
        return _backbone_changes(flags, preset)
    changes: dict[str, Any] = {}
    text = flags.get("text_encoder")
    if text == "xlnet":
        raise NotReproducible("XLNet weights are not available in the workbook (nothing downloads)")
    if text not in (None, "bert"):
        raise NotReproducible(f"text_encoder={text!r} is not a text backbone of the ACSA paper")
    if "relations" in flags:
        relations = flags["relations"]
        if relations not in RELATIONS:
            raise NotReproducible(f"relations={relations!r} is not a row of Table V")
        marks = tuple(flags.get(k, "") for k in ("image", "region", "text", "phrase"))
        expected = tuple("1" if on else "0" for on in ENTITIES[relations])
        if all(marks) and marks != expected:
            raise NotReproducible(f"relations={relations} with entities {marks} (image, region, text, phrase) "
                                  f"is not what the paper describes for it ({expected})")
        changes["model.relations"] = relations
    if "local_parts" in flags:
        if flags["local_parts"] not in LOCAL_PARTS:
            raise NotReproducible(f"local_parts={flags['local_parts']!r} is not a row of Table IV")
        changes["model.local_parts"] = flags["local_parts"]
    return changes


FIGURES = {"acsa_fig5_saliency": "tbps_lib.analysis.acsa_figures:acsa_fig5",
           "acsa_phrase_pointing": "tbps_lib.analysis.acsa_figures:acsa_pointing_figure"}


#: What notebook 05 trains per budget (``MethodSpec.trained_tables``): ``ci`` Table IV (the full method
#: and six slices); ``full`` (``make reproduce``) Table V's step "+ relation III" (I,II -> I,II,III = ACSA);
#: ``all`` every runnable row.
TRAINED_TABLES = {"ci": ("IV",), "full": {"V": ("I,II", "I,II,III"), "IV": ("Partition",)},
                  "all": ("V", "IV", "III", "II")}


@register_method("acsa", AcsaConfig, presets={"smoke": smoke_preset, "paper": paper_preset},
                 paper_rows=paper_rows, figures=FIGURES, trained_tables=TRAINED_TABLES)
class Acsa(DualEncoder):
    """The shared dual encoder + region embeddings, phrase embeddings, ACAM and the ACSA loss."""

    def __init__(self, cfg: Config) -> None:
        m: AcsaConfig = cfg.model
        super().__init__(cfg, pool=m.pool, batchnorm=False)
        self.use_image, self.use_regions, self.use_caption, self.use_phrases = m.entities
        self.region_proj: nn.Linear | None = None
        self.region_rows: list[tuple[int, int]] = []
        self.grid: tuple[int, int] | None = None
        if self.use_regions:
            self.region_proj = nn.Linear(self.image_encoder.out_dim, cfg.embed_dim)
            self.grid = self._feature_grid(cfg)
            if self.grid[0] < m.n_slices:
                raise ValueError(f"model.n_slices={m.n_slices}: the image encoder's feature map has only "
                                 f"{self.grid[0]} rows ({cfg.image.arch} at {tuple(cfg.image.img_size)} gives a "
                                 f"{self.grid[0]}x{self.grid[1]} grid); use fewer parts or larger images")
            parts = stripe_rows(self.grid[0], m.n_slices)
            self.region_rows = [(parts[a][0], parts[b][1]) for a, b in m.region_parts]

    @torch.no_grad()
    def _feature_grid(self, cfg: Config) -> tuple[int, int]:
        """The (rows, columns) of the image encoder's token grid at ``image.img_size`` (one blank image)."""
        was_training = self.image_encoder.training
        self.image_encoder.eval()
        grid = self.image_encoder(torch.zeros(1, 3, *cfg.image.img_size)).grid
        self.image_encoder.train(was_training)
        return tuple(grid)  # type: ignore[return-value]

    # -- entities --------------------------------------------------------------------------------------

    def image_entities(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """I_g [B, d] and ACAM's visual entities I_m [B, K, d] (None for relation I): the global embedding
        and/or the region embeddings (tokens through the shared region FC, pooled over each region's rows)."""
        feats = self.image_encoder(images)
        global_ = self.image_proj(feats.pooled, feats.tokens)
        if not self.cfg.model.uses_acam:
            return global_, None
        if tuple(feats.grid) != self.grid:
            raise ValueError(f"image grid {tuple(feats.grid)} differs from the grid the regions were built for "
                             f"{self.grid}")
        regions = pool_row_ranges(self.region_proj(feats.tokens), feats.grid, self.region_rows,
                                  self.cfg.model.region_pool)  # I_r: [B, k, d]
        visual = torch.cat([global_.unsqueeze(1), regions], dim=1) if self.use_image else regions
        return global_, visual

    def phrase_embeddings(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """T_p [B, M, d] (zeros where a caption has fewer phrases) and its mask [B, M] (bool): each noun
        phrase encoded alone by the text encoder and the caption projection."""
        ids, mask = batch["phrase_ids"], batch["phrase_attention_mask"]
        b, m, lp = ids.shape
        present = mask[..., 0].bool()  # a phrase slot is filled iff its [CLS] is attended
        flat = present.reshape(-1)
        out = torch.zeros(b * m, self.cfg.embed_dim, device=ids.device, dtype=self.image_proj.linear.weight.dtype)
        sel_ids, sel_mask = ids.reshape(b * m, lp)[flat], mask.reshape(b * m, lp)[flat]
        if sel_ids.shape[0]:
            feats = self.text_encoder(sel_ids, sel_mask)
            enc = self.text_proj(feats.pooled, feats.tokens, feats.mask)
            out = out.to(enc.dtype).index_put((flat.nonzero().squeeze(1),), enc)
        return out.view(b, m, -1), present

    def text_entities(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """T_g [B, d] and ACAM's text entities [B, M', d] with their mask (None, None for relation I): the
        phrases, preceded by the caption embedding in the full-scale variant (relation IV). A caption with
        no phrase takes its caption embedding as its one phrase."""
        global_ = self.embed_texts(batch)
        if not self.cfg.model.uses_acam:
            return global_, None, None
        phrases, present = self.phrase_embeddings(batch)
        if self.use_caption:
            ones = torch.ones_like(present[:, :1])
            return global_, torch.cat([global_.unsqueeze(1), phrases], dim=1), torch.cat([ones, present], dim=1)
        none = ~present.any(dim=1)
        first = torch.where(none.unsqueeze(1), global_, phrases[:, 0])
        phrases = torch.cat([first.unsqueeze(1), phrases[:, 1:]], dim=1)
        present = torch.cat([present[:, :1] | none.unsqueeze(1), present[:, 1:]], dim=1)
        return global_, phrases, present

    def acam_scores(self, visual: Tensor, texts: Tensor, text_mask: Tensor) -> Tensor:
        """S_ACAM = (S + S') / 2 of every (text, image) pair: [n_texts, n_images] (Eq. (6), Eq. (11))."""
        m: AcsaConfig = self.cfg.model
        s, s_prime = acam_similarity(visual, texts, text_mask, m.lambda_i2t, m.lambda_t2i)
        return 0.5 * (s + s_prime)

    # -- training --------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Eq. (17): the named terms (unweighted) and ``loss`` = cmpm + mu * cmpc + gamma * acsa."""
        m: AcsaConfig = self.cfg.model
        image, visual = self.image_entities(batch["images"])
        text, texts, text_mask = self.text_entities(batch)
        weight = self.classifier_weight(batch["labels"])
        terms = {"cmpm": cmpm_loss(image, text, batch["pids"], eps=m.cmpm_eps),
                 "cmpc": cmpc_loss(image, text, batch["labels"], weight)}
        factors = {"cmpm": m.cmpm_weight, "cmpc": m.mu}
        if visual is not None:
            scores = self.acam_scores(visual, texts, text_mask).T  # [image a, text b]
            terms["acsa"] = acsa_loss(scores, batch["pids"], m.acsa_probability, m.acsa_scale, m.acsa_eps)
            factors["acsa"] = m.gamma
        terms["loss"] = torch.stack([factors[k] * v for k, v in terms.items()]).sum()
        return terms

    # -- inference -------------------------------------------------------------------------------------

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """``global`` [B, d] and, with ACAM, ``entities`` [B, K, d] (not normalised)."""
        global_, visual = self.image_entities(images)
        return {"global": global_} if visual is None else {"global": global_, "entities": visual}

    def encode_texts(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``global`` [B, d] and, with ACAM, ``entities`` [B, M', d] and ``entity_mask`` [B, M']."""
        global_, texts, mask = self.text_entities(batch)
        if texts is None:
            return {"global": global_}
        return {"global": global_, "entities": texts, "entity_mask": mask.to(global_.dtype)}

    def pair_scores(self, image_feats: dict[str, Tensor], text_feats: dict[str, Tensor]) -> Tensor:
        """cos(I_g, T_g) + acam_weight * S_ACAM(I, T) (module docstring, "Inference"): [n_texts, n_images]."""
        score = super().pair_scores(image_feats, text_feats)
        if "entities" not in image_feats or self.cfg.model.acam_weight == 0:
            return score
        visual, texts = image_feats["entities"], text_feats["entities"]
        mask = text_feats["entity_mask"] > 0.5
        per_text = max(1, _SCORE_ELEMENTS // max(1, visual.shape[0] * visual.shape[1] * texts.shape[1]))
        acam = torch.cat([self.acam_scores(visual, texts[s:s + per_text], mask[s:s + per_text])
                          for s in range(0, texts.shape[0], per_text)])
        return score + self.cfg.model.acam_weight * acam


__all__ = ["Acsa", "AcsaConfig", "RELATIONS", "LOCAL_PARTS", "REGION_NAMES", "paper_rows", "parse_partition"]
