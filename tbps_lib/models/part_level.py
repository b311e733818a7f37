"""Part-level coarse and fine embeddings with the commonality-based margin ranking loss (Park et al.,
"Improving Text-based Person Search via Part-level Cross-modal Correspondence", the part-level paper,
file 001 in ``../shared/papers/``).

Per modality m in {v (image), t (text)} the model computes the set S_m = {g_m, C_m, F_m} (Section 3.1-3.2):

* **Global** g_m: global max pooling over the backbone's token features (patch tokens / feature map; every
  real text position), each token first projected to the joint width d = ``embed_dim`` (the projections of
  the shared :class:`~tbps_lib.models.dual_encoder.DualEncoder`, the baseline's ``pool="max"``).
* **Modality-specific encoders**, Eq. (1)-(3): M = (projected tokens) + learnable position embeddings E^pos,
  then M~ = M + MHSA(M): one multi-head self-attention with a residual, nothing else (no LayerNorm, no FFN,
  as written). Text padding is masked out of every attention.
* **Modality-sharing decoder**, Eq. (4): D learnable tokens (``n_coarse``, 4 in the paper) are the queries of
  one multi-head attention (MHA) over M~ (keys and values); its D outputs are the coarse embeddings C_m. The
  tokens and the MHA are shared by both modalities; ``decoder="separated"`` (Table 4) gives the text its own
  MHA *and* its own token set.
* **Fine embeddings** (Section 3.2): A_avg = the decoder's image cross-attention weights averaged over the
  heads and the D tokens ([r], sums to 1); foreground features Eq. (5) M.. = M~ + A_avg (x) M~ (Hadamard,
  A_avg broadcast over channels); cut into P (``n_fine``, 4) horizontal stripes of token rows, global max
  pooling each: F_v. Text: P more learnable tokens through the decoder, Eq. (6): F_t = Decoder(D_t, M~_t).

Losses, Eq. (13) = L_ID(S_v) + L_ID(S_t) + L_R(S'_v, S'_t) + l_CMR(F_v, F_t):

* ``id``: Eq. (7)-(8), one classifier W_ID (no bias) shared by both modalities and by every embedding of S_m.
* ``global`` / ``coarse``: Eq. (9)-(10), the hardest-negative ranking loss on g and on each c^(i) (the i-th
  image token against the i-th text token), margin alpha (``margin``).
* ``fine``: Eq. (11)-(12), the CMR loss on each f^(j): margin alpha (1 - C(f)), C = normalised entropy of
  the identity prediction softmax(f W_ID) (``tbps_lib/losses/part_level.py``).

Inference, Eq. (14): S(I, T) = s(g_v, g_t) + sum_i s(c_v^(i), c_t^(i)) + sum_j s(f_v^(j), f_t^(j)), s the
cosine; ``encode_*`` return ``{"global": [n, d], "coarse": [n, D, d], "fine": [n, P, d]}`` (the parts the
config has) and :meth:`PartLevel.pair_scores` sums the cosines (one matmul of the concatenated normalised
embeddings, chunked by ``RetrievalModel.similarity``). Only the classifier is training-only.

Ablations (``paper_rows``): Table 2 ``coarse`` / ``fine`` / ``cmr`` (the "Baseline" row is this model with
global embeddings only: ID + ranking loss, the workbook's ``baseline`` with ``loss="id_ranking"`` by
another name); Table 3 ``cmr_coarse`` (CMR also on the coarse embeddings); Table 4 ``decoder``;
supplementary Table 2 ``n_coarse`` 2 / 4 / 6.

Choices where the paper is silent or loose (all config fields unless said otherwise):

* ``margin`` alpha (Eq. (9) and the base margin of Eq. (12)) is not given: 0.2, the VSE++ value the paper
  cites for its ranking loss [12] and the baseline's. CMR margins are therefore in [0, 0.2]; the notebook
  prints the commonality and margins a trained model actually has.
* Eq. (8) and Eq. (10) apply l_ID / l_R to the *sets* C_m and F_m without saying how the members combine:
  summed over the members (as Eq. (14) sums their similarities), each member a batch mean for l_ID (Eq. (7))
  and a batch sum for l_R (Eq. (9) as written, ``ranking_reduction="sum"``).
* The commonality C of Eq. (12) is a margin, so it is detached (``detach_commonality=True``): otherwise the
  CMR loss could shrink its margins by making the fine embeddings' identity prediction flatter, against the
  ID loss. ``false`` lets the gradient through.
* A_avg sums to 1 over the r image positions, so A_avg (x) M~ in Eq. (5) changes each feature by about 1/r
  (1/32 on the smoke 8x4 grid, 1/192 on ViT-B/16 at 384x128): taken literally the foreground emphasis is
  nearly invisible to the stripes' max pooling. ``foreground="literal"`` (default) is Eq. (5) as written;
  ``"max"`` divides A_avg by its maximum over the image first, so the most attended position is doubled.
* The widths: backbone tokens are projected to d (the paper writes both backbones' features with one d);
  heads n (``heads``, 0 = d / 64, ViT/BERT's head width) for the encoders and the decoder; position
  embeddings and tokens are initialised N(0, 0.02); the decoder is a bare MHA as Eq. (4) writes it (no
  residual to the queries, no FFN).
* P stripes of h token rows: ``torch.tensor_split`` of the rows, equal when P divides h (8 rows / 4 on the
  smoke grid, 24 / 4 for ViT-B/16 and 12 / 4 for ResNet-50 at 384x128), else the first stripes get one row
  more; more stripes than rows is an error naming ``model.n_fine``. The grid is read from one forward pass of
  the image encoder when the model is built (the image position embeddings need r).
* Fine embeddings need the decoder's attention (A_avg), so ``fine`` needs ``coarse``; ``cmr`` needs ``fine``
  and ``cmr_coarse`` needs ``coarse``.
* Table 4's separated variant separates the token sets as well as the decoders (the paper: "individual
  decoders for each modality"; the shared model shares "the decoder and the tokens").
* Paper preset: ViT-B/16 + BERT-base (frozen) at 384x128, d = 768, batch 32 drawn as 16 identities x 2
  pairs (the sampler is not given; the baseline's), Adam lr 5e-4 x0.1 at epochs 20/40/50/55, image
  backbone lr x0.1, flip, 60 epochs. The ablation tables use ResNet-50 (Section 4.4), so ``paper_rows``
  sets ``image.arch=resnet50`` in the paper preset.
* Smoke preset: the shared smoke encoders and schedule (``config.SMOKE_DEFAULTS``), text encoder trained and
  no backbone lr factor, as the other methods' smoke presets, so the ablation steps compare like with like.
  The image "patch features" are resnet_smoke's 8x4 token grid at 64x32 (stride 8; 4 stripes of 2 rows),
  the word features the bi-GRU's outputs: the mechanism needs a token grid and a word sequence, not a
  transformer backbone, and these smoke backbones learn where the smoke ViT/BERT barely do. d =
  ``embed_dim`` = 128 (the shared smoke default is 256): the paper's d is its backbones' width (768 for
  ViT-B/16 and BERT-base) and 128 is resnet_smoke's; it also keeps a smoke step within twice the
  baseline's (measured at d = 256 under load: about 2.2x, the encoders' and decoder's attention over every
  token at width d being most of the extra cost).
* Smoke preset, ``all_negatives_epochs=4`` (the paper, and the paper preset: 0): Eq. (9) / (10) / (12) sum
  their hinges over *every* negative of the batch (the sum-of-hinges loss VSE++ [12] compares its hardest
  negative with) for the first 4 of the 5 smoke epochs, then take the hardest negative as written. From
  the smoke start (pretrained smoke backbones, but fresh projections, modality encoders, decoder and
  800-way classifier) the hardest-negative losses collapse: every ranking term sits at its collapse value,
  about 2 alpha per pair (global 29.5 for 64 pairs), the ID term at chance (18 x log 800 = 120; ID alone,
  ``ranking_weight=0``, does not move in an epoch either: 120.6, val R@1 1.1) and val R@1 is 1.4 after
  one epoch (test R@1 1.62 after the full smoke schedule, issue 14). Measured (seed 0,
  synthetic:cuhk-like, validation split, OMP_NUM_THREADS=1, under load) with
  ``train_or_load(make_config("part_level", "smoke", changes={"model.all_negatives_epochs": E}))``: val
  R@1 12.1 after the first summed epoch; in 2-epoch runs (``optim.epochs=2``) the hardest negative in the
  second epoch gave 11.3 (its ranking terms back at the collapse value), summing throughout 16.2; over the
  5 smoke epochs E = 1 reached 13.4 (best epoch 3; hardest-negative terms at the collapse value in all 4
  epochs), E = 4 reached 24.2 after the summed epochs and 25.2 after the hardest-negative epoch (selected;
  test R@1 22.2, mAP 29.6; the baseline's CMPM+CMPC smoke run is at about 43). The hardest negative of
  Eq. (9) needs embeddings that already rank (VSE++ trains it on ImageNet features); 5 smoke epochs from
  fresh heads are too few for it to leave the collapse, so the smoke preset keeps it for the last,
  low-learning-rate epoch. Even there its terms stay near the collapse value (global 31.3), which is why
  the warm-up is not shorter. Every ablation row (Table 2's Baseline included) gets the same warm-up, so
  the steps still compare like with like. Wall time of that E = 4 run: 550 s, against 329 s for the
  baseline's smoke run (CMPM+CMPC, val / test R@1 42.9 / 43.0), both seed 0, one after the other, under
  load: 1.7x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps_lib.config import SMOKE_DEFAULTS, Config
from tbps_lib.losses import cmr_loss, commonality, id_loss
from tbps_lib.losses.part_level import ranking_loss
from tbps_lib.losses.ranking import REDUCTIONS
from tbps_lib.models import baseline
from tbps_lib.models.base import MethodConfig
from tbps_lib.models.dual_encoder import DualEncoder
from tbps_lib.models.layers import masked_max_pool
from tbps_lib.models.registry import NotReproducible, register_method

DECODERS = ("shared", "separated")
FOREGROUNDS = ("literal", "max")
EMBEDDINGS = ("global", "coarse", "fine")  # the members of S_m, in the order of Eq. (14)


@dataclass(frozen=True)
class PartLevelConfig(MethodConfig):
    """The method's own fields (``model.*``, plus ``num_classes``); defaults = the full method ("Ours")."""

    coarse: bool = True  # coarse embeddings (encoders + decoder, Eq. (1)-(4))
    fine: bool = True  # fine embeddings (Eq. (5)-(6))
    cmr: bool = True  # CMR loss Eq. (12) on the fine embeddings (False: plain ranking loss Eq. (9))
    cmr_coarse: bool = False  # CMR loss on the coarse embeddings too (Table 3, first row)
    decoder: str = "shared"  # "shared" or "separated" (Table 4)
    n_coarse: int = 4  # D, shared decoder tokens
    n_fine: int = 4  # P, stripes / text fine tokens
    heads: int = 0  # attention heads of the encoders and the decoder; 0 = embed_dim // 64
    margin: float = 0.2  # alpha of Eq. (9) and Eq. (12), not given by the paper
    ranking_reduction: str = "sum"  # Eq. (9) and Eq. (12) sum over the batch
    detach_commonality: bool = True  # C of Eq. (12) is a margin, no gradient through it
    foreground: str = "literal"  # Eq. (5) with A_avg as is ("literal") or divided by its maximum ("max")
    id_weight: float = 1.0  # Eq. (13) weighs every term 1
    ranking_weight: float = 1.0  # for the global, coarse and fine ranking / CMR terms
    all_negatives_epochs: float = 0.0  # warm-up: Eq. (9)/(12) sum over every negative for these epochs (paper: 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (("decoder", self.decoder, DECODERS), ("foreground", self.foreground, FOREGROUNDS),
                                     ("ranking_reduction", self.ranking_reduction, REDUCTIONS)):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {list(allowed)}, got {value!r}")
        for name in ("n_coarse", "n_fine"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.heads < 0:
            raise ValueError(f"model.heads must be >= 0 (0 = embed_dim // 64), got {self.heads}")
        if self.margin < 0:
            raise ValueError(f"model.margin must be >= 0, got {self.margin}")
        if self.all_negatives_epochs < 0:
            raise ValueError(f"model.all_negatives_epochs must be >= 0 (0 = the hardest negative from the start, "
                             f"as the paper), got {self.all_negatives_epochs}")
        if self.id_weight < 0 or self.ranking_weight < 0:
            raise ValueError(f"model.id_weight and model.ranking_weight must be >= 0, got "
                             f"{self.id_weight}, {self.ranking_weight}")
        for name, needs in (("fine", "coarse"), ("cmr", "fine"), ("cmr_coarse", "coarse")):
            if getattr(self, name) and not getattr(self, needs):
                raise ValueError(f"model.{name}=true needs model.{needs}=true (module docstring: fine embeddings "
                                 f"use the decoder's attention; CMR needs the embeddings it applies to)")


SMOKE_ALL_NEGATIVES_EPOCHS = 4.0
"""The smoke preset's warm-up of the ranking losses over every negative (module docstring: why, measured)."""


def smoke_preset(dataset: str) -> Mapping[str, Any]:
    """The shared smoke settings (encoders, images, schedule) with d = 128, the width of resnet_smoke's tokens,
    and the ranking losses summed over every negative for the first epochs (module docstring); the method's
    defaults are the full method."""
    return {**SMOKE_DEFAULTS, "embed_dim": 128, "model.all_negatives_epochs": SMOKE_ALL_NEGATIVES_EPOCHS}


def paper_preset(dataset: str) -> Mapping[str, Any]:
    """Section 4.1: ViT-B/16 + frozen BERT-base at 384x128, batch 32, Adam 5e-4 decayed x0.1 at epochs 20, 40,
    50, 55, image backbone lr x0.1, random flip, 60 epochs, D = P = 4 (module docstring for the open choices)."""
    changes = {**baseline.paper_preset(dataset), "text.freeze": True, "data.batch_size": 32,
               "optim.lr": 5e-4, "optim.schedule": "multistep", "optim.milestones": (20, 40, 50, 55),
               "optim.gamma": 0.1, "optim.warmup_epochs": 0.0, "optim.backbone_lr_factor": 0.1}
    changes.pop("model.loss")
    return changes


_FLAGS = ("coarse", "fine", "cmr", "cmr_coarse", "cmr_fine", "decoder", "n_coarse")


def _flag(flags: Mapping[str, str], name: str) -> bool:
    value = flags[name]
    if value not in ("0", "1"):
        raise NotReproducible(f"{name}={value!r} is not a part-level paper setting (0 or 1)")
    return value == "1"


def paper_rows(flags: Mapping[str, str], preset: str) -> dict[str, Any]:
    """Config changes of a part-level paper row from its ``config`` flags in ``reported/part_level.csv``.

    Table 2 ``coarse`` / ``fine`` / ``cmr`` 0/1 -> ``model.coarse`` / ``model.fine`` / ``model.cmr``; Table 3
    ``cmr_coarse`` / ``cmr_fine`` -> ``model.cmr_coarse`` / ``model.cmr``; Table 4 ``decoder`` shared /
    separated -> ``model.decoder``; supplementary Table 2 ``n_coarse`` -> ``model.n_coarse``. The paper's
    ablations use ResNet-50 (Section 4.4): in the paper preset every ablation row sets ``image.arch=resnet50``;
    the smoke preset's one small image encoder stands in for both backbones.
    """
    unknown = sorted(set(flags) - set(_FLAGS))
    if unknown:
        raise NotReproducible(f"flags {unknown} are not part-level paper settings (known: {list(_FLAGS)})")
    changes: dict[str, Any] = {"image.arch": "resnet50"} if preset == "paper" else {}
    if "coarse" in flags:
        changes.update({"model.coarse": _flag(flags, "coarse"), "model.fine": _flag(flags, "fine"),
                        "model.cmr": _flag(flags, "cmr")})
    if "cmr_coarse" in flags:
        changes.update({"model.cmr_coarse": _flag(flags, "cmr_coarse"), "model.cmr": _flag(flags, "cmr_fine")})
    if "decoder" in flags:
        if flags["decoder"] not in DECODERS:
            raise NotReproducible(f"decoder={flags['decoder']!r} is not a Table 4 row ({list(DECODERS)})")
        changes["model.decoder"] = flags["decoder"]
    if "n_coarse" in flags:
        changes["model.n_coarse"] = int(flags["n_coarse"])
    return changes


# Figure 4 (decoder cross-attention on the image and the words, with the pointing game on the synthetic
# part masks) and the paper's Fig. 3 idea measured on look-alike identities; builders are imported when drawn.
FIGURES = {name: f"tbps_lib.analysis.part_level_figures:{fn}" for name, fn in (
    ("part_level_fig4_attention", "fig4_attention"), ("part_level_token_parts", "token_parts_figure"),
    ("part_level_lookalikes", "lookalike_figure"))}


def _tokens(n: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, dim) * 0.02)


def horizontal_stripes(tokens: Tensor, grid: tuple[int, int], n_stripes: int) -> Tensor:
    """Section 3.2: tokens [B, h*w, d] (row-major on the grid) cut into ``n_stripes`` bands of rows from the
    top, global max pooling each: [B, n_stripes, d]."""
    h, w = grid
    rows = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])
    return torch.stack([band.amax(dim=(1, 2)) for band in torch.tensor_split(rows, n_stripes, dim=1)], dim=1)


#: What notebook 04 trains per budget (``MethodSpec.trained_tables``): ``ci`` and ``full`` (``make
#: reproduce``) Table 2's Baseline (the figures' reference), + coarse + fine and Ours (the step + CMR) on the
#: CUHK-PEDES stand-in; ``all`` every runnable row.
TRAINED_TABLES = {"ci": {"2@CUHK-PEDES": ("Baseline", "Baseline+Coarse+Fine", "Ours")},
                  "full": {"2@CUHK-PEDES": ("Baseline", "Baseline+Coarse+Fine", "Ours")},
                  "all": ("2", "3", "4", "S2", "1", "5")}


@register_method("part_level", PartLevelConfig, presets={"smoke": smoke_preset, "paper": paper_preset},
                 paper_rows=paper_rows, figures=FIGURES, trained_tables=TRAINED_TABLES)
class PartLevel(DualEncoder):
    """The shared dual encoder (max pooling of projected tokens = the global embeddings) + the modality-specific
    encoders, the modality-sharing decoder and the fine embeddings of the part-level paper."""

    def __init__(self, cfg: Config) -> None:
        m: PartLevelConfig = cfg.model
        super().__init__(cfg, pool="max", batchnorm=False)
        d = cfg.embed_dim
        heads = m.heads or max(1, d // 64)
        if d % heads:
            raise ValueError(f"model.heads={heads} does not divide embed_dim={d}")
        self.grid = self._image_grid()
        if m.fine and m.n_fine > self.grid[0]:
            raise ValueError(f"model.n_fine={m.n_fine} stripes but the image encoder's token grid has only "
                             f"{self.grid[0]} rows ({self.grid[0]}x{self.grid[1]} at image.img_size="
                             f"{tuple(cfg.image.img_size)})")
        self.image_pos = self.text_pos = self.image_encoder_attn = self.text_encoder_attn = None
        self.decoder = self.text_decoder = self.coarse_tokens = self.text_coarse_tokens = self.fine_text_tokens = None
        if not m.coarse:
            return
        mha = lambda: nn.MultiheadAttention(d, heads, batch_first=True)  # noqa: E731
        self.image_pos = _tokens(self.grid[0] * self.grid[1], d)  # E_v^pos, Eq. (3)'s input M_v
        self.text_pos = _tokens(cfg.text.max_length, d)  # E_t^pos
        self.image_encoder_attn, self.text_encoder_attn = mha(), mha()  # MHSA_v / MHSA_t, Eq. (1)-(3)
        self.decoder = mha()  # Eq. (4)
        self.coarse_tokens = _tokens(m.n_coarse, d)  # D
        if m.decoder == "separated":  # Table 4: the text has its own decoder and tokens
            self.text_decoder, self.text_coarse_tokens = mha(), _tokens(m.n_coarse, d)
        if m.fine:
            self.fine_text_tokens = _tokens(m.n_fine, d)  # D_t, Eq. (6)

    @torch.no_grad()
    def _image_grid(self) -> tuple[int, int]:
        """The image encoder's token grid at ``image.img_size`` (one forward pass in eval mode)."""
        was_training = self.image_encoder.training
        self.image_encoder.eval()
        probe = torch.zeros(1, 3, *self.cfg.image.img_size)
        grid = self.image_encoder(probe).grid
        self.image_encoder.train(was_training)
        return (int(grid[0]), int(grid[1]))

    # -- the embeddings of S_m ------------------------------------------------------------------------------

    @staticmethod
    def _self_attend(attn: nn.MultiheadAttention, m: Tensor, pad: Tensor | None) -> Tensor:
        """Eq. (3): M~ = M + MHSA(M) (``pad``: True on padding, left out as keys)."""
        return m + attn(m, m, m, key_padding_mask=pad, need_weights=False)[0]

    def _decode(self, attn: nn.MultiheadAttention, queries: Tensor, memory: Tensor, pad: Tensor | None,
                need_weights: bool = True) -> tuple[Tensor, Tensor | None]:
        """Eq. (4): MHA with the learnable ``queries`` [Q, d] over ``memory`` [B, N, d]; returns the outputs
        [B, Q, d] and the cross-attention weights averaged over heads [B, Q, N] (None without ``need_weights``)."""
        q = queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        return attn(q, memory, memory, key_padding_mask=pad, need_weights=need_weights, average_attn_weights=True)

    def image_embeddings(self, images: Tensor, with_attention: bool = False) -> dict[str, Tensor]:
        """S_v: ``global`` [B, d], ``coarse`` [B, D, d], ``fine`` [B, P, d] (those the config has);
        ``with_attention`` adds ``attention`` [B, D, r] (the decoder's) and ``foreground`` [B, r] (A_avg)."""
        m: PartLevelConfig = self.cfg.model
        feats = self.image_encoder(images)
        tokens = self.image_proj.linear(feats.tokens)  # V-bar projected to d
        out = {"global": masked_max_pool(tokens)}  # g_v, GMP
        if not m.coarse:
            return out
        if tuple(feats.grid) != self.grid:
            raise ValueError(f"image token grid {tuple(feats.grid)} differs from the {self.grid} the model was "
                             f"built for")
        encoded = self._self_attend(self.image_encoder_attn, tokens + self.image_pos, None)  # M~_v, Eq. (1)-(3)
        out["coarse"], attention = self._decode(self.decoder, self.coarse_tokens, encoded, None)  # C_v, Eq. (4)
        foreground = attention.mean(dim=1)  # A_avg [B, r]
        if m.fine:
            weight = foreground / foreground.amax(dim=1, keepdim=True) if m.foreground == "max" else foreground
            emphasised = encoded + weight.unsqueeze(-1) * encoded  # M.._v, Eq. (5)
            out["fine"] = horizontal_stripes(emphasised, self.grid, m.n_fine)  # F_v
        if with_attention:
            out.update(attention=attention, foreground=foreground)
        return out

    def text_embeddings(self, batch: Mapping[str, Any], with_attention: bool = False) -> dict[str, Tensor]:
        """S_t: ``global`` [B, d], ``coarse`` [B, D, d], ``fine`` [B, P, d] (those the config has);
        ``with_attention`` adds ``attention`` [B, D + P, L] (coarse then fine text tokens over the words)."""
        m: PartLevelConfig = self.cfg.model
        feats = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        tokens = self.text_proj.linear(feats.tokens)
        valid = feats.mask.bool()
        out = {"global": masked_max_pool(tokens, valid)}  # g_t, GMP over real tokens
        if not m.coarse:
            return out
        length = tokens.shape[1]
        if length > self.text_pos.shape[0]:
            raise ValueError(f"captions of {length} tokens exceed text.max_length={self.text_pos.shape[0]} (the "
                             f"text position embeddings)")
        pad = ~valid
        encoded = self._self_attend(self.text_encoder_attn, tokens + self.text_pos[:length], pad)  # M~_t
        shared = self.text_decoder is None
        queries = self.coarse_tokens if shared else self.text_coarse_tokens
        if m.fine:  # the decoder's queries do not attend to each other: one pass serves Eq. (4) and Eq. (6)
            queries = torch.cat([queries, self.fine_text_tokens])
        decoded, attention = self._decode(self.decoder if shared else self.text_decoder, queries, encoded, pad,
                                          need_weights=with_attention)  # training needs no text weights
        out["coarse"] = decoded[:, :m.n_coarse]  # C_t, Eq. (4)
        if m.fine:
            out["fine"] = decoded[:, m.n_coarse:]  # F_t, Eq. (6)
        if with_attention:
            out["attention"] = attention
        return out

    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        """S_v without normalisation (retrieval uses cosines, Eq. (14))."""
        return self.image_embeddings(images)

    def encode_texts(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """S_t without normalisation (retrieval uses cosines, Eq. (14))."""
        return self.text_embeddings(batch)

    def pair_scores(self, image_feats: dict[str, Tensor], text_feats: dict[str, Tensor]) -> Tensor:
        """Eq. (14): the sum of the cosines of g, of each c^(i) and of each f^(j) ([n_texts, n_images]); the
        dot product of the concatenated L2-normalised embeddings."""
        def joint(feats: dict[str, Tensor]) -> Tensor:
            return torch.cat([F.normalize(feats[k].float(), dim=-1).flatten(1) for k in EMBEDDINGS if k in feats], 1)
        return joint(text_feats) @ joint(image_feats).T

    # -- training --------------------------------------------------------------------------------------------

    def negatives(self) -> str:
        """``"all"`` during the ``model.all_negatives_epochs`` warm-up of a training forward (every negative
        summed, module docstring), else ``"hardest"`` (Eq. (9) and (12) as written)."""
        ctx, epochs = self.training_context, self.cfg.model.all_negatives_epochs
        warm = self.training and ctx is not None and ctx.step < epochs * ctx.steps_per_epoch
        return "all" if warm else "hardest"

    def _pair_loss(self, image: Tensor, text: Tensor, pids: Tensor, weight: Tensor, cmr: bool) -> Tensor:
        """l_R, Eq. (9), or l_CMR, Eq. (12), of one embedding pair [B, d]."""
        m: PartLevelConfig = self.cfg.model
        if not cmr:
            return ranking_loss(image, text, pids, m.margin, m.ranking_reduction, self.negatives())
        c_image, c_text = commonality(image @ weight.T), commonality(text @ weight.T)  # Eq. (11)
        if m.detach_commonality:
            c_image, c_text = c_image.detach(), c_text.detach()
        return cmr_loss(image, text, pids, c_image, c_text, m.margin, m.ranking_reduction, self.negatives())

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The named loss terms (unweighted) and ``loss`` = Eq. (13)."""
        m: PartLevelConfig = self.cfg.model
        image, text = self.image_embeddings(batch["images"]), self.text_embeddings(batch)
        labels, pids = batch["labels"], batch["pids"]
        weight = self.classifier_weight(labels)
        members = {k: ([image[k]], [text[k]]) if k == "global" else (image[k].unbind(1), text[k].unbind(1))
                   for k in EMBEDDINGS if k in image}
        # Eq. (8) for both modalities: l_ID of every member of S_m, with the one shared classifier
        terms = {"id": torch.stack([id_loss(e, labels, weight) for v, t in members.values() for e in (*v, *t)]).sum()}
        cmr = {"global": False, "coarse": m.cmr_coarse, "fine": m.cmr}
        for k, (v, t) in members.items():  # Eq. (10) on g and C, Eq. (12) on F (or Eq. (9): Table 2, row 3)
            terms[k] = torch.stack([self._pair_loss(a, b, pids, weight, cmr[k]) for a, b in zip(v, t)]).sum()
        factors = {k: (m.id_weight if k == "id" else m.ranking_weight) for k in terms}
        terms["loss"] = torch.stack([factors[k] * v for k, v in terms.items()]).sum()
        return terms

    # -- analysis --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def part_attention(self, images: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Figure 4's maps: ``image`` [B, D, h, w] (each coarse token's cross-attention on the image grid),
        ``foreground`` [B, h, w] (A_avg), ``text`` [B, D + P, L] (coarse, then fine text tokens over the
        words; zero on padding). Needs ``model.coarse``."""
        if not self.cfg.model.coarse:
            raise ValueError("model.coarse=false: this model has no decoder, so no cross-attention to draw")
        img = self.image_embeddings(images, with_attention=True)
        txt = self.text_embeddings(batch, with_attention=True)
        h, w = self.grid
        return {"image": img["attention"].reshape(-1, img["attention"].shape[1], h, w),
                "foreground": img["foreground"].reshape(-1, h, w), "text": txt["attention"]}
