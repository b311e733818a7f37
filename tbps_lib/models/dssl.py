"""DSSL: Deep Surroundings-person Separation Learning (Zhu et al., ACM MM 2021, file 004 in
``../shared/papers/``).

What runs (equation numbers of the paper):

* Features (Section 3.1.1). Image: the backbone's last feature map; V_G = average pool -> GroupNorm -> FC
  (p = ``embed_dim``); M_V = k horizontal strips (adaptive average pooling of the map to k x 1), each
  GN -> FC -> ReLU -> FC. Text: a bi-GRU over the sentence (final forward + backward states; see
  ``model.text_pool`` below) -> GN -> FC = T_G;
  the same bi-GRU over each noun phrase (framework batch field ``noun_phrases``, at most ``max_phrases``)
  -> GN -> FC -> ReLU -> FC = the rows of M_T.
* SDM, Eq. (1)-(3): T_P = Dec(Enc(Z(T_G, r))), T_L = the same for each phrase; trained with the ranking loss
  Eq. (3) (cosine, margin alpha, summed over all in-batch mismatched pairs) or, Table 5, the Euclidean
  distance (``model.sdm_loss``).
* SPSM, Eq. (4): two parallel MLPs p -> 2p -> p + tanh give V_P (person) and V_S (surroundings) from V_G;
  MEC, Eq. (6): ||P^T S||.
* Align I Eq. (5): L_rank(V_P, T_P). Align II Eq. (7)-(8): V_R = SPFM(T_P, V_S) (addition or concatenation,
  Table 3, then an MLP like SPSM's), L_rank(V_G, V_R). Align III Eq. (9)-(10): T_R = PDM(V_P) (MLP + tanh),
  L_rank(T_G, T_R). Align IV Eq. (11)-(13): SAM gates M_V with V_P into V_L; L_rank over the scores
  cos(CA(V_L, T_P), T_P). Align V Eq. (14)-(15): L_rank over cos(CA(T_L, V_P), V_P).
* Losses: stage 1, Eq. (16)-(18): ID loss (shared GN + shared FC without bias) on V_G and T_G, backbone
  fixed; stage 2, Eq. (19)-(21): ID loss on V_G, T_G, V_P, T_P, V_R, T_R + the five alignments + MEC
  (+ the SDM loss Eq. (2), which the paper defines but leaves out of Eq. (21); see below).

Choices where the paper is silent or inconsistent (all config fields where they are choices):

* Two stages in ONE run (``model.stage1_fraction``, default 0.25 = 10 of the paper's 40 epochs): while
  ``TrainingContext.progress < stage1_fraction`` the image backbone runs without gradients and in eval mode
  (its BatchNorm statistics stay fixed too) and the loss is Eq. (18) only; afterwards everything trains
  with Eq. (21). One run per table row keeps ``paper_rows`` one config per row and the tables' run lookup
  unchanged (chained runs would need stage 1's run name inside stage 2's config). The learning rate is the
  trainer's per-run schedule, so the paper preset cannot give stage 2 its own initial lr: it uses lr 1e-3
  with x0.1 at epochs 10, 20, 30, i.e. stage 2 runs at 1e-4 / 1e-5 / 1e-6 instead of 2e-4 / 2e-5 / 2e-6.
  The exact schedule is two chained runs (``CONTRIBUTING.md``): stage 1 with ``model.stage1_fraction=1``,
  ``optim.epochs=10``; stage 2 with ``model.stage1_fraction=0``, ``init.from_run=<stage 1>``,
  ``optim.lr=2e-4``, ``optim.milestones=10,20``, ``optim.epochs=30``. The text encoder trains in stage 1
  (the paper fixes only the ResNet-50). Stage 1 leaves the heads of stage 2 without gradients: multi-GPU
  (DDP) training would need ``find_unused_parameters``, which the trainer does not set (single-process
  training, CPU or one GPU, is unaffected).
* Inference, Sim_TI (lambda1 = lambda2 = 0.5, the formula is not given): ``cos(V_P, T_P) +
  lambda1 * cos(CA(V_L, T_P), T_P) + lambda2 * cos(CA(T_L, V_P), V_P)``, the global person score plus
  the two attention-based local scores (as in IMG-Net, the paper's baseline). Training-only modules: the
  surroundings MLP of SPSM, SPFM, PDM, the ID classifier. ``tbps_lib.analysis.dssl_figures
  .similarity_alternatives`` evaluates the other combinations (each term alone, + cos(T_R, T_G), V_G/T_G).
* CA keeps parts with alpha_i >= 1/n (ties kept): with the literal ">" a caption with one phrase, or
  exactly uniform weights, would keep nothing. A caption without phrases scores 0 in Align V.
* The ranking loss (Eq. (3)) sums over every mismatched pair, decided by person id; per matched pair the
  sums are averaged over the batch (``model.rank_reduction="mean"``; "sum" = Eq. (3) summed over the
  batch, which makes each alignment ~B times the ID loss). The same margin 0.2 everywhere.
* Eq. (2) sums the local SDM term over i = 1..k (the number of image strips); the phrases are n, so here it
  runs over every real phrase of the batch (one ranking loss over all phrases, negatives = phrases of
  other persons). The SDM loss joins Eq. (21) with weight 1 (``model.sdm_weight``): without it Table 5's
  choice of the SDM loss would change nothing.
* SDM: Enc = FC(p -> p/2) + ReLU, Dec = FC(p/2 -> p) (``model.sdm_hidden``); Z(x, r) zeroes exactly
  round(r * p) randomly chosen elements of each vector (no rescaling), in training only (a denoising
  autoencoder); inference passes T_G unchanged through Enc and Dec. Two SDMs, one for T_G and one for the
  phrases ("separately handled").
* MLPs "p -> 2p -> p" are FC-ReLU-FC; SPFM's MLP ends with tanh like SPSM's. With concatenation SPFM's
  first layer takes 2p inputs. PDM is the same MLP shape as SPSM's.
* SAM, Eq. (11): W1 is p -> p, W2 p -> p: one p-channel sigmoid gate computed from V_P multiplies every
  strip (the equation has no strip index in the gate). Without SAM (Table 2) V_L = M_V.
* GroupNorm: ``model.gn_groups`` groups (32, the GroupNorm paper's default; it must divide the widths).
  The strip head and the phrase head are shared by all strips / phrases. The ID loss's GN (Eq. (16)) is
  one layer shared by all six inputs, like W_id.
* ID losses of the ablations: L_id(V_R) joins Eq. (19) only when Align II runs, L_id(T_R) only with Align
  III; without SPSM + SPFM (Table 2, row 1) V_P = V_G (no V_S, SPFM, MEC or Align II), without SDM
  T_P = T_G; a feature that is another one is not counted twice in Eq. (19).
* Table 1's "Baseline" (IMG-Net without its inner-modal self-attention) is approximated by the global
  branch: L_rank(V_G, T_G) + the ID loss of Eq. (17) in both stages, scored by cos(V_G, T_G).
* Images with fewer feature rows than ``num_strips`` are an error (``model.num_strips``), checked when the
  model is built.
* The smoke preset uses the workbook's pretrained smoke ResNet and bi-GRU (the paper's architectures,
  smaller) with the shared smoke schedule; p = 256. Its text features are the maximum over the bi-GRU's
  outputs (``model.text_pool="max"``, as the baseline's smoke preset) instead of the last hidden states
  (``"final"``, the paper's and the paper preset's): measured in a full smoke run of the full method with
  "final" (seed 0, cuhk-like, validation split): the nearest other caption shows the same person for 9.6%
  of the captions (images: 38%) and test R@1 was 2.9; the final states of the small bi-GRU barely depend
  on the caption.
* The paper preset: ResNet-50 at 384x128 (the size is not given; the person-search convention), bi-GRU
  with 512 hidden units per direction (p = 1024), 5000 words (the paper's CUHK-PEDES vocabulary has 4984),
  batch 32 drawn at random (the sampler is not given; no loss needs two pairs of a person in a batch),
  random horizontal flips. ``image.pretrained`` / ``text.pretrained`` stay None: point them at local
  weights (an ImageNet ResNet-50) with ``--set``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps_lib.config import SMOKE_DEFAULTS, Config
from tbps_lib.losses import (attended_cosine, cosine_ranking_loss, euclidean_reconstruction_loss, id_loss,
                             mutual_exclusion_loss, ranking_loss_from_scores)
from tbps_lib.losses.dssl import REDUCTIONS, cosine_matrix
from tbps_lib.models.base import MethodConfig, RetrievalModel
from tbps_lib.models.encoders import build_image_encoder, build_text_encoder
from tbps_lib.models.layers import masked_max_pool
from tbps_lib.models.registry import NotReproducible, register_method

FUSIONS = ("add", "concat")
SDM_LOSSES = ("ranking", "euclidean")
ALIGNS = ("align1", "align2", "align3", "align4", "align5")
TEXT_POOLS = ("final", "max")


@dataclass(frozen=True)
class DSSLConfig(MethodConfig):
    """DSSL's own fields (``model.*``); the defaults are the full method (Table 1's last row)."""

    baseline: bool = False  # Table 1 "Baseline": the global branch only (module docstring)
    align1: bool = True  # Eq. (5)
    align2: bool = True  # Eq. (8)
    align3: bool = True  # Eq. (10)
    align4: bool = True  # Eq. (13)
    align5: bool = True  # Eq. (14)
    separation: bool = True  # SPSM + SPFM (Table 2)
    mec: bool = True  # Eq. (6) (Table 2)
    sam: bool = True  # Eq. (11) (Table 2)
    sdm: bool = True  # Eq. (1)-(2) (Table 2)
    fusion: str = "add"  # SPFM: "add" or "concat" (Table 3)
    zero_rate: float = 0.5  # r of Eq. (1) (Table 4)
    sdm_loss: str = "ranking"  # "ranking" (Eq. (2)-(3)) or "euclidean" (Table 5)
    sdm_hidden: float = 0.5  # SDM bottleneck width / p
    margin: float = 0.2  # alpha of Eq. (3)
    rank_reduction: str = "mean"  # over matched pairs (module docstring)
    num_strips: int = 6  # k
    max_phrases: int = 26  # n's upper bound
    phrase_length: int = 8  # tokens per phrase, [CLS]/[SEP] included
    gn_groups: int = 32
    text_pool: str = "final"  # "final": the bi-GRU's last states (Sec. 3.1.1); "max": max over its outputs
    stage1_fraction: float = 0.25  # share of the training steps in stage 1 (10 of 40 epochs)
    lambda1: float = 0.5  # Sim_TI weight of the Align IV score
    lambda2: float = 0.5  # Sim_TI weight of the Align V score
    id_weight: float = 1.0
    align_weight: float = 1.0
    mec_weight: float = 1.0
    sdm_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (("fusion", self.fusion, FUSIONS), ("sdm_loss", self.sdm_loss, SDM_LOSSES),
                                     ("rank_reduction", self.rank_reduction, REDUCTIONS),
                                     ("text_pool", self.text_pool, TEXT_POOLS)):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {list(allowed)}, got {value!r}")
        for name in ("baseline", *ALIGNS, "separation", "mec", "sam", "sdm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        if not 0 <= self.zero_rate < 1:
            raise ValueError(f"model.zero_rate must be in [0, 1), got {self.zero_rate}")
        if not 0 < self.sdm_hidden <= 4:
            raise ValueError(f"model.sdm_hidden must be in (0, 4] (a fraction of p), got {self.sdm_hidden}")
        if not 0 <= self.stage1_fraction <= 1:
            raise ValueError(f"model.stage1_fraction must be in [0, 1], got {self.stage1_fraction}")
        for name in ("margin", "lambda1", "lambda2", "id_weight", "align_weight", "mec_weight", "sdm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        for name, low in (("num_strips", 1), ("max_phrases", 1), ("phrase_length", 3), ("gn_groups", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"model.{name} must be >= {low}, got {getattr(self, name)}")
        aligns = [name for name in ALIGNS if getattr(self, name)]
        if self.baseline and aligns:
            raise ValueError(f"model.baseline trains the global branch only; it excludes {aligns}")
        if not self.baseline and not aligns:
            raise ValueError("model.align1..align5 are all off: set at least one, or model.baseline=true")
        if not self.separation and (self.align2 or self.mec):
            raise ValueError("model.align2 and model.mec need model.separation (SPSM + SPFM) to be on")

    def batch_fields(self, training: bool) -> Mapping[str, Mapping[str, Any]]:
        """The noun phrases of every caption (training and evaluation: T_L enters the score)."""
        if self.baseline:
            return {}
        return {"noun_phrases": {"max_phrases": self.max_phrases, "phrase_length": self.phrase_length}}


def smoke_preset(dataset: str) -> Mapping[str, Any]:
    """The shared smoke settings (the pretrained smoke ResNet and bi-GRU, p = embed_dim = 256) with the text
    features max-pooled over the bi-GRU's outputs (module docstring)."""
    return {**SMOKE_DEFAULTS, "model.text_pool": "max"}


def paper_preset(dataset: str) -> Mapping[str, Any]:
    """Section 4.1.2: ResNet-50 + bi-GRU, p = 1024, k = 6, at most 26 phrases, Adam, batch 32, margin 0.2,
    stage 1 10 epochs at 1e-3 then stage 2 30 epochs with x0.1 every 10 (the lr deviation: module docstring)."""
    return {
        "image.arch": "resnet50",
        "image.img_size": (384, 128),
        "text.arch": "bigru",
        "text.max_length": 100,
        "text.vocab_size": 5000,  # the paper's CUHK-PEDES vocabulary: 4984 words seen at least twice
        "embed_dim": 1024,
        "data.batch_size": 32,
        "data.sampler": "random",
        "data.flip": True,
        "optim.optimizer": "adam",
        "optim.lr": 1e-3,
        "optim.schedule": "multistep",
        "optim.milestones": (10, 20, 30),
        "optim.gamma": 0.1,
        "optim.warmup_epochs": 0.0,
        "optim.epochs": 40,
        "model.stage1_fraction": 0.25,
    }


def paper_rows(flags: Mapping[str, str], preset: str) -> dict[str, Any]:
    """Config changes of a DSSL paper row from its ``config`` flags in ``reported/dssl.csv``.

    Table 1: ``baseline``, ``align1``..``align5`` -> the same fields. Table 2: ``mec``, ``spsm_spfm``
    (-> ``model.separation``; off also turns Align II off), ``sam``, ``sdm``. Table 3: ``spfm_fusion`` ->
    ``model.fusion``. Table 4: ``sdm_zero_rate`` -> ``model.zero_rate``. Table 5: ``sdm_loss``.
    """
    changes: dict[str, Any] = {}
    known = {"baseline", *ALIGNS, "mec", "spsm_spfm", "sam", "sdm", "spfm_fusion", "sdm_zero_rate", "sdm_loss"}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise NotReproducible(f"DSSL row flags {unknown} are not settings of the DSSL paper")
    on = lambda key: flags[key] == "1"  # noqa: E731
    if "baseline" in flags:
        changes["model.baseline"] = on("baseline")
    for name in ALIGNS:
        if name in flags:
            changes[f"model.{name}"] = on(name)
    if "mec" in flags:
        changes["model.mec"] = on("mec")
    if "spsm_spfm" in flags:
        changes["model.separation"] = on("spsm_spfm")
        if not on("spsm_spfm"):
            changes["model.align2"] = False  # Align II needs SPFM
    for flag in ("sam", "sdm"):
        if flag in flags:
            changes[f"model.{flag}"] = on(flag)
    if "spfm_fusion" in flags:
        changes["model.fusion"] = flags["spfm_fusion"]
    if "sdm_zero_rate" in flags:
        changes["model.zero_rate"] = float(flags["sdm_zero_rate"])
    if "sdm_loss" in flags:
        changes["model.sdm_loss"] = flags["sdm_loss"]
    return changes


def _mlp(in_dim: int, hidden: int, out_dim: int, tanh: bool) -> nn.Sequential:
    """FC -> ReLU -> FC (-> tanh)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)]
    return nn.Sequential(*layers, nn.Tanh()) if tanh else nn.Sequential(*layers)


def _group_norm(groups: int, width: int, where: str) -> nn.GroupNorm:
    if width % groups:
        raise ValueError(f"model.gn_groups={groups} does not divide the {where} width {width}")
    return nn.GroupNorm(groups, width)


def _rows(module: nn.Module, x: Tensor) -> Tensor:
    """Apply ``module`` (expects [N, C]) to every row of x [..., C]."""
    return module(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def zero_elements(x: Tensor, rate: float) -> Tensor:
    """Z(x, r) of Eq. (1): exactly round(r * d) randomly chosen elements of each row of x [..., d] set to 0
    (no rescaling)."""
    n_zero = round(rate * x.shape[-1])
    if n_zero == 0:
        return x
    ranks = torch.rand(x.shape, device=x.device).argsort(dim=-1).argsort(dim=-1)  # a random permutation per row
    return x.masked_fill(ranks < n_zero, 0.0)


FIGURES = {name: f"tbps_lib.analysis.dssl_figures:{fn}" for name, fn in (
    ("dssl_fig5_top5", "dssl_fig5"), ("dssl_person_surroundings_attribution", "attribution_figure"),
    ("dssl_scene_swap", "scene_swap_figure"))}


#: What notebook 07 trains per budget (``MethodSpec.trained_tables``): ``ci`` Table 3; ``full`` (``make
#: reproduce``) Table 2's step "+ MEC"; ``all`` every runnable row.
TRAINED_TABLES = {"ci": ("3",), "full": {"2": ("SPSM+SPFM+SAM+SDM", "MEC+SPSM+SPFM+SAM+SDM")},
                  "all": ("1", "2", "3", "4", "5")}


@register_method("dssl", DSSLConfig, presets={"smoke": smoke_preset, "paper": paper_preset},
                 paper_rows=paper_rows, figures=FIGURES, trained_tables=TRAINED_TABLES)
class DSSL(RetrievalModel):
    """Image and text encoders, DSSL's heads (module docstring) and the shared ID classifier (training only)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m: DSSLConfig = cfg.model
        p, g = cfg.embed_dim, m.gn_groups
        self.image_encoder = build_image_encoder(cfg.image)
        self.text_encoder = build_text_encoder(cfg.text)
        c_img, c_txt = self.image_encoder.out_dim, self.text_encoder.out_dim
        self._check_strips(m.num_strips)
        self.global_image_head = nn.Sequential(_group_norm(g, c_img, "image feature"), nn.Linear(c_img, p))
        self.global_text_head = nn.Sequential(_group_norm(g, c_txt, "text feature"), nn.Linear(c_txt, p))
        self.strip_head = nn.Sequential(_group_norm(g, c_img, "image feature"), _mlp(c_img, p, p, tanh=False))
        self.phrase_head = nn.Sequential(_group_norm(g, c_txt, "text feature"), _mlp(c_txt, p, p, tanh=False))
        hidden = max(1, round(m.sdm_hidden * p))
        self.sdm_global = _mlp(p, hidden, p, tanh=False) if m.sdm and not m.baseline else None  # Enc, Dec
        self.sdm_local = _mlp(p, hidden, p, tanh=False) if m.sdm and not m.baseline else None
        use_spsm = m.separation and not m.baseline
        self.person_mlp = _mlp(p, 2 * p, p, tanh=True) if use_spsm else None  # SPSM, Eq. (4)
        self.surroundings_mlp = _mlp(p, 2 * p, p, tanh=True) if use_spsm else None
        self.spfm = _mlp(p * (2 if m.fusion == "concat" else 1), 2 * p, p, tanh=True) if m.align2 else None
        self.pdm = _mlp(p, 2 * p, p, tanh=True) if m.align3 else None  # Eq. (9)
        self.sam = (nn.Sequential(nn.Linear(p, p), nn.ReLU(), _group_norm(g, p, "embedding"), nn.Linear(p, p),
                                  nn.Sigmoid()) if m.sam and not m.baseline else None)  # Eq. (11)
        self.id_norm = _group_norm(g, p, "embedding")  # GN of Eq. (16)
        self.classifier = nn.Linear(p, m.num_classes, bias=False) if m.num_classes > 0 else None  # W_id

    def _check_strips(self, k: int) -> None:
        h, w = self.cfg.image.img_size
        was = self.image_encoder.training
        self.image_encoder.eval()
        with torch.no_grad():
            rows = self.image_encoder(torch.zeros(1, 3, h, w)).grid[0]
        self.image_encoder.train(was)
        if k > rows:
            raise ValueError(f"model.num_strips={k} is more than the {rows} rows of the image feature map "
                             f"({self.cfg.image.arch} at {h}x{w})")

    # -- features --------------------------------------------------------------------------------------------

    def in_stage1(self) -> bool:
        """Whether the current training step is in stage 1 (``model.stage1_fraction`` of the steps)."""
        ctx = self.training_context
        return self.training and ctx is not None and ctx.progress < self.cfg.model.stage1_fraction

    def image_features(self, images: Tensor, frozen: bool = False) -> tuple[Tensor, Tensor]:
        """(V_G [B, p], M_V [B, k, p]); ``frozen``: the backbone without gradients, in eval mode (stage 1)."""
        if frozen:
            was = self.image_encoder.training
            self.image_encoder.eval()
            with torch.no_grad():
                feats = self.image_encoder(images)
            self.image_encoder.train(was)
        else:
            feats = self.image_encoder(images)
        h, w = feats.grid
        fmap = feats.tokens.transpose(1, 2).reshape(feats.tokens.shape[0], -1, h, w)
        strips = F.adaptive_avg_pool2d(fmap, (self.cfg.model.num_strips, 1)).squeeze(-1).transpose(1, 2)
        return self.global_image_head(feats.pooled), _rows(self.strip_head, strips)

    def _text_vector(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The bi-GRU's final states (``text_pool="final"``) or the max over its outputs at real tokens."""
        feats = self.text_encoder(input_ids, attention_mask)
        return feats.pooled if self.cfg.model.text_pool == "final" else masked_max_pool(feats.tokens, feats.mask)

    def text_global(self, batch: Mapping[str, Any]) -> Tensor:
        """T_G [B, p]: GN -> FC of the sentence's bi-GRU feature."""
        return self.global_text_head(self._text_vector(batch["input_ids"], batch["attention_mask"]))

    def phrase_features(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(M_T [B, M, p], phrase mask [B, M] bool): the bi-GRU over each real phrase; padding rows are 0."""
        ids, mask = batch["phrase_ids"], batch["phrase_attention_mask"]
        b, n_max, length = ids.shape
        real = mask.sum(dim=-1) > 0  # [B, M]
        out = torch.zeros(b, n_max, self.cfg.embed_dim, device=ids.device)
        flat = real.flatten()
        if bool(flat.any()):
            feats = self._text_vector(ids.reshape(-1, length)[flat], mask.reshape(-1, length)[flat])
            out = out.masked_scatter(real.unsqueeze(-1), self.phrase_head(feats).to(out.dtype))
        return out, real

    def denoise(self, sdm: nn.Module | None, x: Tensor) -> Tensor:
        """Eq. (1): Dec(Enc(Z(x, r))); zeroing in training only; identity without SDM."""
        if sdm is None:
            return x
        return sdm(zero_elements(x, self.cfg.model.zero_rate) if self.training else x)

    def person(self, vg: Tensor) -> Tensor:
        """V_P of Eq. (4) (V_G itself without SPSM)."""
        return self.person_mlp(vg) if self.person_mlp is not None else vg

    def salient(self, vp: Tensor, strips: Tensor) -> Tensor:
        """V_L of Eq. (11): the strips gated by a p-channel sigmoid of V_P (M_V itself without SAM)."""
        return strips * self.sam(vp).unsqueeze(1) if self.sam is not None else strips

    def fuse(self, tp: Tensor, vs: Tensor) -> Tensor:
        """V_R = SPFM(T_P, V_S), Eq. (7): addition or concatenation, then the MLP."""
        return self.spfm(tp + vs if self.cfg.model.fusion == "add" else torch.cat([tp, vs], dim=-1))

    # -- inference -------------------------------------------------------------------------------------------

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """``global`` = V_P, ``strips`` = V_L [B, k, p], ``visual_global`` = V_G (baseline: ``global`` = V_G)."""
        vg, strips = self.image_features(images)
        if self.cfg.model.baseline:
            return {"global": vg}
        vp = self.person(vg)
        return {"global": vp, "strips": self.salient(vp, strips), "visual_global": vg}

    def encode_texts(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``global`` = T_P, ``phrases`` = T_L [B, M, p], ``phrase_mask`` [B, M] (float), ``text_global`` = T_G
        (baseline: ``global`` = T_G)."""
        tg = self.text_global(batch)
        if self.cfg.model.baseline:
            return {"global": tg}
        mt, real = self.phrase_features(batch)
        return {"global": self.denoise(self.sdm_global, tg), "phrases": self.denoise(self.sdm_local, mt),
                "phrase_mask": real.float(), "text_global": tg}

    def score_terms(self, image_feats: Mapping[str, Tensor], text_feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The aligned similarities [n_texts, n_images]: ``person`` cos(V_P, T_P), ``local_image`` (Align IV)
        cos(CA(V_L, T_P), T_P), ``local_text`` (Align V) cos(CA(T_L, V_P), V_P)."""
        vp, tp = image_feats["global"].float(), text_feats["global"].float()
        return {"person": cosine_matrix(tp, vp),
                "local_image": attended_cosine(image_feats["strips"].float(), tp).T,
                "local_text": attended_cosine(text_feats["phrases"].float(), vp, text_feats["phrase_mask"])}

    def pair_scores(self, image_feats: dict[str, Tensor], text_feats: dict[str, Tensor]) -> Tensor:
        """Sim_TI = cos(V_P, T_P) + lambda1 * Align IV score + lambda2 * Align V score (module docstring)."""
        if self.cfg.model.baseline:
            return super().pair_scores(image_feats, text_feats)
        m: DSSLConfig = self.cfg.model
        s = self.score_terms(image_feats, text_feats)
        return s["person"] + m.lambda1 * s["local_image"] + m.lambda2 * s["local_text"]

    # -- training --------------------------------------------------------------------------------------------

    def id_term(self, x: Tensor, labels: Tensor) -> Tensor:
        """L_id(X) of Eq. (16): cross entropy of W_id GN(X)."""
        if self.classifier is None:
            raise ValueError("model.num_classes is 0, but DSSL's ID loss (Eq. (16)) needs the identity classifier: "
                             "set model.num_classes to the number of training identities (train_or_load does)")
        return id_loss(self.id_norm(x), labels, self.classifier.weight)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Stage 1: ``id`` = Eq. (17). Stage 2: ``id`` (Eq. (19)), ``align1``..``align5`` (Eq. (20)), ``mec``,
        ``sdm`` (Eq. (2)); ``loss`` = their weighted sum. Terms of switched-off parts are absent."""
        m: DSSLConfig = self.cfg.model
        labels, pids = batch["labels"], batch["pids"]
        stage1 = self.in_stage1()
        vg, strips = self.image_features(batch["images"], frozen=stage1)
        tg = self.text_global(batch)
        ids = {"vg": self.id_term(vg, labels), "tg": self.id_term(tg, labels)}
        if stage1:  # Eq. (18)
            return {"id": ids["vg"] + ids["tg"], "loss": m.id_weight * (ids["vg"] + ids["tg"])}
        rank = lambda a, b: cosine_ranking_loss(a, b, pids, m.margin, m.rank_reduction)  # noqa: E731
        terms: dict[str, Tensor] = {}
        factors: dict[str, float] = {}
        if m.baseline:
            terms["align"] = rank(vg, tg)
            factors["align"] = m.align_weight
        else:
            mt, real = self.phrase_features(batch)
            tp, tl = self.denoise(self.sdm_global, tg), self.denoise(self.sdm_local, mt)
            if self.sdm_global is not None:  # Eq. (2)
                flat_pids = pids.unsqueeze(1).expand_as(real)[real]
                if m.sdm_loss == "ranking":
                    terms["sdm"] = rank(tg, tp) + (cosine_ranking_loss(mt[real], tl[real], flat_pids, m.margin,
                                                                       m.rank_reduction) if bool(real.any()) else 0.0)
                else:
                    terms["sdm"] = euclidean_reconstruction_loss(tg, tp) + (
                        euclidean_reconstruction_loss(mt[real], tl[real]) if bool(real.any()) else 0.0)
                factors["sdm"] = m.sdm_weight
            vp = self.person(vg)
            if self.person_mlp is not None:
                ids.update(vp=self.id_term(vp, labels))
            if self.sdm_global is not None:
                ids["tp"] = self.id_term(tp, labels)
            if m.align1:
                terms["align1"] = rank(vp, tp)  # Eq. (5)
            if self.surroundings_mlp is not None:
                vs = self.surroundings_mlp(vg)
                if m.mec:
                    terms["mec"] = mutual_exclusion_loss(vp, vs)  # Eq. (6)
                    factors["mec"] = m.mec_weight
                if m.align2:
                    vr = self.fuse(tp, vs)
                    terms["align2"] = rank(vg, vr)  # Eq. (8)
                    ids["vr"] = self.id_term(vr, labels)
            if m.align3:
                tr = self.pdm(vp)
                terms["align3"] = rank(tg, tr)  # Eq. (10)
                ids["tr"] = self.id_term(tr, labels)
            if m.align4:  # Eq. (12)-(13): scores [images, texts]
                scores = attended_cosine(self.salient(vp, strips), tp)
                terms["align4"] = ranking_loss_from_scores(scores, pids, m.margin, m.rank_reduction)
            if m.align5:  # Eq. (14)-(15): scores [texts, images] -> [images, texts]
                scores = attended_cosine(tl, vp, real).T
                terms["align5"] = ranking_loss_from_scores(scores, pids, m.margin, m.rank_reduction)
            factors.update({k: m.align_weight for k in ALIGNS if k in terms})
        terms["id"] = torch.stack(list(ids.values())).sum()  # Eq. (19)
        factors["id"] = m.id_weight
        terms["loss"] = torch.stack([factors[k] * v for k, v in terms.items()]).sum()  # Eq. (21)
        return terms


__all__ = ["DSSL", "DSSLConfig", "paper_rows", "smoke_preset", "paper_preset", "zero_elements"]
