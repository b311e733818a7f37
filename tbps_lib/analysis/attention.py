"""Attention and gradient heatmaps for every method, and a pointing game that checks them.

Maps of a dual encoder (the Sew paper's Figure 5), for any registered method: the model only needs an
``image_encoder`` submodule (returning ``ImageFeatures`` with ``tokens`` [B, N, C] and their ``grid``),
``encode_images`` / ``encode_texts`` and ``pair_scores``. Token features are captured by forward hooks,
never by method-specific code.

* Caption level (:func:`caption_maps`): a Grad-CAM-style map of the image-caption score over the image
  encoder's last tokens. Default ``weighting="hirescam"`` (Draelos & Carin 2020): ReLU of the
  element-wise gradient x feature, summed over channels. ``"gradcam"`` is the original Grad-CAM
  (Selvaraju et al., ICCV 2017): channel weights = the gradient averaged over the tokens. Why the
  default: heads that max-pool projected tokens (the smoke baseline) send each channel's gradient to
  one token, the averaged weights lose the position: on the smoke baseline (8x4 token grid, 120 test
  captions, 524 part words, ``pointing_game``) 52.5 % of Grad-CAM word maps came out all zero and 2.7 %
  of their peaks hit the named part, against no empty map and 17.7 % hits with HiResCAM (chance:
  5.8 %). For a ViT whose pooled feature is the [CLS] token, the final patch tokens do not reach the
  score, so the tokens are read at the input of the last block (its first LayerNorm), "the last ViT
  block's tokens".
* Word level (:func:`word_maps`): in a dual encoder a word meets the image only through the score, and
  the two encoders' token features live in unrelated spaces (of different widths in the smoke preset),
  so a raw cosine between a word's token and a patch means nothing. The word's share of the score
  does: ``delta_w = s(image, caption) - s(image, caption without word w)``, and the word's map is the
  same gradient map of ``delta_w`` over the same image tokens: where the image holds the evidence that
  this word adds to the match, in the context of the rest of the caption. A span (a whole noun phrase)
  can be removed instead of one word.
* Decoder cross-attention (:func:`cross_attention_maps`, the part-level paper's Figure 4 and the Sew MCM
  decoder): attention weights [..., n_queries, n_image_tokens] to one map per query on the token grid.
* :func:`bidirectional_attention`: LAIP's Eq. (4)-(7), forward attention times the positive gradient,
  head-averaged and normalised, with a forward-only option.
* :func:`overlay`: a map upsampled (bilinear) to its image and blended over it.

Pointing game (:func:`pointing_game`, synthetic data only, no paper has it): for each caption word that
names a body part or item (``hair``, ``shirt``, ``trousers``, ``shoes``, ``bag`` ...), is the peak of its
word map inside that part's mask? The map is on the model's own token grid (8x4 cells for the smoke
CNN at 64x32), so the peak is the centre of the strongest cell, scaled to the mask (where the bilinear
upsampled map peaks); beside each hit rate stand its chance levels: the share of the image the part
covers (a random pixel) and the share of grid cells whose centre lies in the part (a random peak cell),
plus the share of the map's mass inside the part (energy) and the caption-level map's hit rate on the
same part (is the word map more specific than the caption map?).
"""
from __future__ import annotations

import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from tbps_lib.data.loaders import collate, load_image, normalize_image
from tbps_lib.data.text import CaptionTokenizer, caption_words
from tbps_lib.models.base import RetrievalModel

WEIGHTINGS = ("gradcam", "hirescam")

# Part-mask labels (tbps_lib.data.synthetic_render.PART_LABELS) that a slot word points at.
SLOT_PARTS: dict[str, tuple[str, ...]] = {
    "hair": ("hair",), "headwear": ("headwear",), "eyewear": ("eyewear",), "upper": ("upper",),
    "lower": ("lower",), "shoes": ("shoes",), "bag": ("bag",), "held": ("held",),
}
WORD_PARTS: dict[str, tuple[str, ...]] = {"bald": ("head",)}  # a bald head shows no hair pixels


# ------------------------------------------------------------------------------------------------------
# Capturing image tokens


def image_token_layer(model: nn.Module) -> nn.Module:
    """The module whose output holds the image tokens a gradient map is read from.

    The image encoder itself (its ``ImageFeatures.tokens``), except for a timm ViT, whose final patch
    tokens do not reach a [CLS]-pooled score: there, the input of the last block (its ``norm1`` output).
    """
    encoder = getattr(model, "image_encoder", None)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"{type(model).__name__} has no image_encoder submodule; heatmaps need one")
    spec = getattr(encoder, "spec", None)
    if getattr(spec, "kind", None) == "vit":
        return encoder.model.blocks[-1].norm1
    return encoder


def _output_tensor(output: Any) -> Tensor:
    """The tensor of a hooked module's output that holds the tokens: ImageFeatures.tokens, [B, M, C] or
    [B, C, h, w] (kept as produced, so that it is a node of the score's autograd graph)."""
    tokens = getattr(output, "tokens", output)
    if not isinstance(tokens, Tensor) or tokens.dim() not in (3, 4):
        raise TypeError(f"the hooked layer returned {type(output).__name__}; expected ImageFeatures or a "
                        "[B, N, C] / [B, C, h, w] tensor")
    return tokens


class ImageTokenCapture:
    """Forward hooks that keep the image tokens (with their autograd graph) and the token grid.

    ``output`` is the hooked layer's token tensor (differentiate with respect to it); :meth:`grid_tokens`
    turns it, or a gradient of its shape, into [B, h*w, C]: the last ``h*w`` positions (a ViT's [CLS] and
    other prefix tokens dropped), or the flattened [B, C, h, w] map; ``grid`` = (h, w) comes from the image
    encoder's ``ImageFeatures``.

    Run the model inside :meth:`recording`. When the hooked layer is inside the image encoder (a ViT block)
    and returns a tensor, the graph is rooted there: everything before the layer runs without autograd,
    the hook swaps the output for a detached copy that requires grad and switches autograd on for the rest
    of the forward pass. Only what follows the layer can depend on its output, so the gradient is the same,
    and the backbone's forward pass costs no autograd bookkeeping (about half the time of a ViT-B map on
    a CPU). When the layer is the image encoder itself, its ``ImageFeatures.pooled`` was computed from the
    tokens inside the encoder, so the whole forward pass records a graph instead.
    """

    def __init__(self, model: nn.Module, layer: nn.Module | None = None) -> None:
        self.model = model
        self.layer = layer if layer is not None else image_token_layer(model)
        self.rooted = self.layer is not getattr(model, "image_encoder", None)
        self._raw: Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self._handles: list[Any] = []

    def recording(self) -> Any:
        """The autograd mode to run the model in: off until the hooked layer (rooted graph), else on."""
        return torch.no_grad() if self.rooted else torch.enable_grad()

    def __enter__(self) -> "ImageTokenCapture":
        def keep_tokens(_m: nn.Module, _i: Any, out: Any) -> Any:
            if not self.rooted:
                self._raw = _output_tensor(out)
                return None
            if not isinstance(out, Tensor):
                raise TypeError(f"the hooked layer {type(self.layer).__name__} returned {type(out).__name__}; "
                                "a layer inside the image encoder must return a token tensor")
            self._raw = out.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # record from here on; recording()'s no_grad restores the mode on exit
            return self._raw

        def keep_grid(_m: nn.Module, _i: Any, out: Any) -> None:
            grid = getattr(out, "grid", None)
            if grid is None:
                raise TypeError("model.image_encoder must return ImageFeatures (with a grid)")
            self.grid = (int(grid[0]), int(grid[1]))

        self._grad_mode = torch.is_grad_enabled()
        self._handles = [self.layer.register_forward_hook(keep_tokens),
                         self.model.image_encoder.register_forward_hook(keep_grid)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        torch.set_grad_enabled(self._grad_mode)  # whatever the hook switched on

    @property
    def output(self) -> Tensor:
        if self._raw is None or self.grid is None:
            raise RuntimeError(f"the hooked layer {type(self.layer).__name__} did not run while an image was "
                               "encoded (is it part of model.image_encoder?)")
        return self._raw

    def check(self, scores: Tensor) -> Tensor:
        """``scores``, after checking that the hooked layer ran and that the scores carry a gradient."""
        self.output  # noqa: B018 - raises if the hook did not fire
        if not scores.requires_grad:
            raise RuntimeError(f"{type(self.model).__name__}'s scores carry no gradient (encode_images, "
                               "encode_texts or pair_scores runs under no_grad?); gradient heatmaps need it")
        return scores

    def grid_tokens(self, tensor: Tensor) -> Tensor:
        """``output`` (or its gradient) as [B, h*w, C] grid tokens."""
        if tensor.dim() == 4:
            tensor = tensor.flatten(2).transpose(1, 2)
        n = self.grid[0] * self.grid[1]
        if tensor.shape[1] < n:
            raise ValueError(f"the hooked layer has {tensor.shape[1]} tokens, fewer than the grid "
                             f"{self.grid[0]}x{self.grid[1]}")
        return tensor[:, tensor.shape[1] - n:]

    def gradient_map(self, score: Tensor, weighting: str = "hirescam", retain_graph: bool = False) -> Tensor:
        """:func:`gradient_map` of ``score`` (a scalar) over the captured tokens: [B, h, w]."""
        grads, = torch.autograd.grad(score, self.output, retain_graph=retain_graph, allow_unused=True)
        if grads is None:
            raise ValueError(f"the score does not depend on the output of the hooked layer "
                             f"{type(self.layer).__name__}; pass layer= a module the score depends on (for a "
                             f"[CLS]-pooled ViT, the input of its last block)")
        return gradient_map(self.grid_tokens(self.output.detach()), self.grid_tokens(grads), self.grid, weighting)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics, no dropout); the training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------------
# Gradient maps


def gradient_map(tokens: Tensor, grads: Tensor, grid: tuple[int, int], weighting: str = "hirescam") -> Tensor:
    """Grad-CAM (or HiResCAM) of tokens [B, N, C] and the score's gradient [B, N, C] -> maps [B, h, w] >= 0.

    ``gradcam``: ReLU(sum_c alpha_c A_nc) with alpha_c = mean_n dS/dA_nc (Selvaraju et al. 2017, Eq. (1)-(2));
    ``hirescam``: ReLU(sum_c dS/dA_nc A_nc).
    """
    if tokens.shape != grads.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and gradients {tuple(grads.shape)} differ in shape")
    if weighting == "gradcam":
        cam = (grads.mean(dim=1, keepdim=True) * tokens).sum(dim=-1)
    elif weighting == "hirescam":
        cam = (grads * tokens).sum(dim=-1)
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    h, w = grid
    return F.relu(cam).reshape(tokens.shape[0], h, w)


def text_batch(captions: Sequence[str], tokenizer: CaptionTokenizer, device: torch.device,
               model: RetrievalModel | None = None) -> dict[str, Any]:
    """A query batch for ``encode_texts`` (the evaluation collate: ids, mask, lengths, captions, and, given
    the ``model``, its method's evaluation fields ``cfg.model.batch_fields(False)``)."""
    items = [{"caption": c, "pid": -1, "label": -1, "image_index": i} for i, c in enumerate(captions)]
    batch = collate(items, tokenizer, model.batch_fields(False) if model is not None else None)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _scores(model: nn.Module, images: Tensor, batch: Mapping[str, Any], cap: ImageTokenCapture) -> Tensor:
    """[n_texts, n_images] scores with autograd from the captured tokens (``pair_scores`` of the encodings).

    The texts are encoded first: with a rooted graph autograd is still off then (only the image tokens
    need gradients), which spares recording the text encoder."""
    if not cap.rooted:
        images = images.detach().requires_grad_(True)  # the tokens carry a graph even for frozen encoders
    text_feats = model.encode_texts(dict(batch))
    return cap.check(model.pair_scores(model.encode_images(images), text_feats))


@dataclass
class HeatmapResult:
    """Maps [K, h, w] (non-negative, on the token grid), the scores they explain [K] and the grid."""

    maps: Tensor
    scores: Tensor
    grid: tuple[int, int]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def caption_maps(model: nn.Module, images: Tensor, captions: Sequence[str], tokenizer: CaptionTokenizer,
                 weighting: str = "hirescam", layer: nn.Module | None = None) -> HeatmapResult:
    """Caption-level Grad-CAM of each (image i, caption i) pair: images [B, 3, H, W] (normalised), B captions.

    The B pairs run as one batch; the sum of the B matched scores is differentiated once (pair i's score
    depends on image i's tokens only, in eval mode).
    """
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions: pairs are (image i, caption i)")
    device = _model_device(model)
    with _eval_mode(model), ImageTokenCapture(model, layer) as cap, cap.recording():
        scores = _scores(model, images.to(device), text_batch(captions, tokenizer, device, model), cap).diagonal()
        maps = cap.gradient_map(scores.sum(), weighting)
    return HeatmapResult(maps, scores.detach(), cap.grid)


def without_span(caption: str, span: tuple[int, int]) -> str:
    """The caption with the words ``span = (start, end)`` (indices of :func:`caption_words`) removed,
    words re-joined by spaces (the tokenizer splits punctuation and lower-cases either way)."""
    words = caption_words(caption)
    start, end = span
    if not 0 <= start < end <= len(words):
        raise ValueError(f"word span {span} is outside the caption's {len(words)} words")
    return " ".join(words[:start] + words[end:])


def word_maps(model: nn.Module, image: Tensor, caption: str, spans: Sequence[tuple[int, int]],
              tokenizer: CaptionTokenizer, weighting: str = "hirescam",
              layer: nn.Module | None = None) -> tuple[HeatmapResult, HeatmapResult]:
    """Word-level maps of one image [3, H, W] (or [1, 3, H, W]) and caption, one per word span.

    Returns (caption-level result for the caption, word-level result: ``maps`` [K, h, w] and ``scores``
    [K] = delta_w, the score the span adds). The image is encoded once and the K + 1 captions in one
    batch; each map is one backward pass from delta_w to the image tokens (the image head only).
    """
    if not spans:
        raise ValueError("word_maps needs at least one word span")
    device = _model_device(model)
    image = image.unsqueeze(0) if image.dim() == 3 else image
    texts = [" ".join(caption_words(caption))] + [without_span(caption, s) for s in spans]
    with _eval_mode(model), ImageTokenCapture(model, layer) as cap, cap.recording():
        scores = _scores(model, image.to(device), text_batch(texts, tokenizer, device, model), cap)[:, 0]
        deltas = scores[0] - scores[1:]
        targets = [scores[0], *deltas]
        maps = torch.cat([cap.gradient_map(t, weighting, retain_graph=k < len(spans))
                          for k, t in enumerate(targets)])
    return (HeatmapResult(maps[:1], scores[:1].detach(), cap.grid),
            HeatmapResult(maps[1:], deltas.detach(), cap.grid))


# ------------------------------------------------------------------------------------------------------
# Attention maps of decoders and LAIP's bidirectional attention


def cross_attention_maps(weights: Tensor, grid: tuple[int, int], head_dim: int | None = None) -> Tensor:
    """Cross-attention weights [..., n_queries, n_keys] over image tokens -> maps [..., n_queries, h, w].

    ``n_keys`` may exceed ``h * w`` by prefix tokens ([CLS] first, as in a ViT): the last ``h * w`` keys
    are the grid, row-major. ``head_dim`` (e.g. 1 for [B, heads, Q, N]) is averaged first.
    """
    if head_dim is not None:
        weights = weights.mean(dim=head_dim)
    h, w = grid
    n = weights.shape[-1]
    if n < h * w:
        raise ValueError(f"{n} attention keys cannot cover a {h}x{w} token grid")
    return weights[..., n - h * w:].reshape(*weights.shape[:-1], h, w)


def has_decoder_attention(model: nn.Module) -> bool:
    """Whether the model exposes ``decoder_attention(images, batch) -> (weights [B, L, N], grid)``: the
    cross-attention of a (training-only) decoder from caption tokens to image tokens (the Sew MCM decoder)."""
    return callable(getattr(model, "decoder_attention", None))


def decoder_word_maps(model: nn.Module, image: Tensor, caption: str, word_indices: Sequence[int],
                      tokenizer: CaptionTokenizer) -> HeatmapResult:
    """Per-word maps from a decoder's cross-attention: the attention rows of a word's tokens (all its
    word pieces, averaged) on the image token grid. ``scores`` are the rows' total attention on the grid."""
    if not has_decoder_attention(model):
        raise TypeError(f"{type(model).__name__} has no decoder_attention(images, batch)")
    device = _model_device(model)
    image = image.unsqueeze(0) if image.dim() == 3 else image
    text = " ".join(caption_words(caption))
    words = tokenizer.encode_with_words([text])["word_ids"][0].to(device)
    with _eval_mode(model), torch.no_grad():
        weights, grid = model.decoder_attention(image.to(device), text_batch([text], tokenizer, device, model))
    select = torch.stack([(words == w).float() for w in word_indices])  # [K, L]
    rows = select @ weights[0].float() / select.sum(dim=1, keepdim=True).clamp_min(1.0)  # [K, N]
    maps = cross_attention_maps(rows, grid)
    return HeatmapResult(maps, maps.flatten(1).sum(dim=1), (int(grid[0]), int(grid[1])))


def bidirectional_attention(attention: Tensor, gradient: Tensor | None = None, head_dim: int = -3,
                            forward_only: bool = False, eps: float = 1e-12) -> Tensor:
    """LAIP's bidirectional attention, Eq. (4)-(7): norm(mean_h A * mean_h max(dS/dA, 0)).

    ``attention`` [..., heads, n_queries, n_keys] are forward attention weights (Eq. (3)); Eq. (4) takes
    the row of the phrase's [CLS] query, so pass ``attention[..., :1, :]`` for exactly that. ``gradient``
    has the same shape: the gradient of the prediction score with respect to those weights (the backward
    attention of Eq. (5)-(6)); only its positive part is kept, as in Grad-CAM (a patch that lowers the
    score is not evidence for the phrase). Both are averaged over ``head_dim``, multiplied, and
    normalised to sum to 1 over the keys (Eq. (7)). ``forward_only`` drops the gradient (the ForAtt
    baseline of LAIP's Table IV). A row whose product is all zero stays all zero.
    Returns [..., n_queries, n_keys].
    """
    forward = attention.mean(dim=head_dim)
    if forward_only:
        weights = forward
    else:
        if gradient is None:
            raise ValueError("bidirectional attention needs the gradient (or forward_only=True)")
        if gradient.shape != attention.shape:
            raise ValueError(f"gradient {tuple(gradient.shape)} and attention {tuple(attention.shape)} differ")
        weights = forward * gradient.mean(dim=head_dim).clamp_min(0.0)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(eps)


# ------------------------------------------------------------------------------------------------------
# Upsampling and overlays


def upsample_map(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Maps [h, w] or [K, h, w] -> [H, W] or [K, H, W], bilinear (half-pixel centres, no corner alignment)."""
    squeeze = maps.dim() == 2
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=tuple(size), mode="bilinear",
                        align_corners=False)[:, 0]
    return out[0] if squeeze else out


def _unit_range(m: Tensor) -> Tensor:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def overlay(image: Tensor | np.ndarray, heatmap: Tensor, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The heatmap [h, w] upsampled to the image, scaled to [0, 1], coloured and blended: RGB [H, W, 3] in [0, 1].

    ``image`` is uint8, [3, H, W] (a tensor from ``load_image``) or [H, W, 3].
    """
    img = torch.as_tensor(np.asarray(image)).detach().cpu()
    if img.dim() != 3:
        raise ValueError(f"image must be [3, H, W] or [H, W, 3], got shape {tuple(img.shape)}")
    if img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.permute(1, 2, 0)
    rgb = img.float().numpy() / 255.0
    heat = _unit_range(upsample_map(heatmap.detach().cpu(), rgb.shape[:2])).numpy()
    colored = plt.get_cmap(cmap)(heat)[..., :3]
    return (1.0 - alpha) * rgb + alpha * colored


# ------------------------------------------------------------------------------------------------------
# Pointing game on the synthetic benchmark


def peak_point(m: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Row and column (in an image of ``size``) of the centre of the strongest cell of a grid map [h, w]
    (first cell on ties): where the bilinear upsampled map peaks. Tensors on the map's device (no sync)."""
    h, w = m.shape[-2:]
    idx = m.reshape(-1).argmax()
    row = ((idx // w).float() + 0.5) * size[0] / h
    col = ((idx % w).float() + 0.5) * size[1] / w
    return row.long().clamp_max(size[0] - 1), col.long().clamp_max(size[1] - 1)


def cell_centre_share(part: Tensor, grid: tuple[int, int]) -> Tensor:
    """Share of the grid's cell centres that fall inside the boolean ``part`` mask [H, W]: the chance that a
    random peak cell hits the part."""
    H, W = part.shape
    h, w = grid
    rows = ((torch.arange(h, device=part.device) + 0.5) * H / h).long().clamp_max(H - 1)
    cols = ((torch.arange(w, device=part.device) + 0.5) * W / w).long().clamp_max(W - 1)
    return part[rows][:, cols].float().mean()


def point_scores(m: Tensor, part: Tensor) -> dict[str, Tensor]:
    """Pointing-game numbers of one map [h, w] and one boolean part mask [H, W] (0-d tensors, no sync):
    ``hit`` (peak in the part), ``energy`` (share of the upsampled map's mass in the part), ``empty`` (the
    map is all zero), ``chance_area`` (part share of the image), ``chance_grid`` (:func:`cell_centre_share`)."""
    size = tuple(part.shape)
    row, col = peak_point(m, size)
    up = upsample_map(m, size).clamp_min(0.0)
    total = up.sum()
    return {"hit": part[row, col].float(), "energy": (up * part).sum() / total.clamp_min(1e-12),
            "empty": (total <= 0).float(), "chance_area": part.float().mean(),
            "chance_grid": cell_centre_share(part, tuple(m.shape[-2:]))}


def pointing_targets(caption: str, meta: Mapping[str, Any] | None) -> list[tuple[int, str, str]]:
    """(word index, word, slot) of the caption words that name a slot (the words of
    ``synthetic_captions.SLOT_WORDS``), only slots visible in the image when the synthetic ``meta`` is given."""
    from tbps_lib.data.synthetic_captions import SLOT_WORDS

    visible = None if meta is None else set(meta.get("visible", ()))
    out = []
    for i, word in enumerate(caption_words(caption)):
        for slot, names in SLOT_WORDS.items():
            if word in names and (visible is None or slot in visible):
                out.append((i, word, slot))
    return out


def part_mask(mask: np.ndarray, slot: str, word: str) -> np.ndarray:
    """Boolean mask of the parts a slot word points at (``SLOT_PARTS``, ``WORD_PARTS``)."""
    from tbps_lib.data.synthetic_render import PART_LABELS

    labels = [PART_LABELS[p] for p in WORD_PARTS.get(word, SLOT_PARTS[slot])]
    return np.isin(mask, labels)


def phrase_span(caption: str, word_index: int) -> tuple[int, int]:
    """The noun phrase (``extract_noun_phrases``) holding a word, or the word alone if none does."""
    from tbps_lib.data.text import extract_noun_phrases

    for start, end in extract_noun_phrases(caption).word_spans:
        if start <= word_index < end:
            return (start, end)
    return (word_index, word_index + 1)


def pointing_game(model: nn.Module, tokenizer: CaptionTokenizer, dataset: Any, img_size: tuple[int, int],
                  split: str = "test", n_captions: int = 200, seed: int = 0, unit: str = "word",
                  weighting: str = "hirescam", source: str = "gradient") -> pd.DataFrame:
    """One row per (caption, slot word) of ``n_captions`` captions of ``split`` drawn reproducibly.

    ``dataset`` is a synthetic ``TBPSDataset`` (records with ``meta``); ``img_size`` the model's input
    (height, width). ``unit="word"`` removes the word alone for its map, ``"phrase"`` its noun phrase.
    ``source="decoder"`` scores :func:`decoder_word_maps` (a decoder's cross-attention) instead of the
    gradient word maps (the caption-level columns still come from the gradient map). Columns: record,
    caption, word, slot, hit, energy, empty, chance_area, chance_grid, caption_hit, caption_energy (the caption-level map scored on the same part), delta (the score the word adds; with
    ``source="decoder"``, the word's attention mass on the grid).
    """
    from tbps_lib.data.synthetic import load_mask

    if unit not in ("word", "phrase"):
        raise ValueError(f"unit must be 'word' or 'phrase', got {unit!r}")
    if source not in ("gradient", "decoder"):
        raise ValueError(f"source must be 'gradient' or 'decoder', got {source!r}")
    records = dataset.split(split)
    if not records or not dataset.has_part_masks:
        raise ValueError("the pointing game needs the synthetic benchmark (records with part masks in meta)")
    pairs = [(r, c) for r in records for c in r.captions]
    order = np.random.default_rng(seed).permutation(len(pairs))[:n_captions]
    device = _model_device(model)
    rows, values = [], []
    for i in order:
        record, caption = pairs[i]
        targets = pointing_targets(caption, record.meta)
        mask = load_mask(dataset.root, record.meta)
        parts = [(t, part_mask(mask, t[2], t[1])) for t in targets]
        parts = [(t, p) for t, p in parts if p.any()]
        if not parts:
            continue
        image = normalize_image(load_image(dataset.image_path(record), tuple(img_size)))
        spans = [(t[0], t[0] + 1) if unit == "word" else phrase_span(caption, t[0]) for t, _ in parts]
        whole, words = word_maps(model, image, caption, spans, tokenizer, weighting)
        if source == "decoder":
            words = decoder_word_maps(model, image, caption, [t[0] for t, _ in parts], tokenizer)
        for k, (t, p) in enumerate(parts):
            part = torch.from_numpy(p).to(device, non_blocking=True)
            word_s, cap_s = point_scores(words.maps[k], part), point_scores(whole.maps[0], part)
            rows.append({"record": record.image, "caption": caption, "word": t[1], "slot": t[2]})
            values.append(torch.stack([word_s["hit"], word_s["energy"], word_s["empty"], word_s["chance_area"],
                                       word_s["chance_grid"], cap_s["hit"], cap_s["energy"], words.scores[k]]))
    if not rows:
        raise ValueError(f"no caption of the {len(order)} drawn names a visible part")
    table = pd.DataFrame(rows)
    numbers = torch.stack(values).double().cpu().numpy()  # one transfer at the end; float64 like every table
    for j, col in enumerate(("hit", "energy", "empty", "chance_area", "chance_grid", "caption_hit",
                             "caption_energy", "delta")):
        table[col] = numbers[:, j]
    return table


def pointing_summary(table: pd.DataFrame, by: str = "slot") -> pd.DataFrame:
    """Per ``by`` (``slot`` or ``word``; grouped by ``method`` too when present): n, hit %, caption-level
    hit %, chance % (grid and area; the area share is also the chance level of the energy), energy % of
    the word and caption maps, and the share of empty maps; plus an ``all`` row."""
    keys = (["method"] if "method" in table else []) + [by]
    agg = {"n": ("hit", "size"), "hit_%": ("hit", "mean"), "caption_hit_%": ("caption_hit", "mean"),
           "chance_grid_%": ("chance_grid", "mean"), "chance_area_%": ("chance_area", "mean"),
           "energy_%": ("energy", "mean"), "caption_energy_%": ("caption_energy", "mean"),
           "empty_%": ("empty", "mean")}
    per = table.groupby(keys).agg(**agg)
    total = table.assign(**{by: "all"}).groupby(keys).agg(**agg)
    out = pd.concat([per, total]).sort_index()
    if "method" in table:  # the methods in the table's order (the registry's), each with its sorted rows
        out = out.reindex(pd.unique(table["method"]), level="method")
    pct = [c for c in out.columns if c.endswith("%")]
    out[pct] = 100.0 * out[pct]
    return out


# ------------------------------------------------------------------------------------------------------
# Figures


@dataclass
class AttentionExample:
    """One image-caption pair to draw: the raw image (uint8 [3, H, W]), the caption, the words to map
    (word index, word), per method the caption map [h, w] and the word maps [K, h, w], and the image file."""

    image: Tensor
    caption: str
    words: list[tuple[int, str]]
    caption_maps: dict[str, Tensor]
    word_maps: dict[str, Tensor]
    path: str | None = None


def clear_image_axes(axes: Any) -> None:
    """Hide the ticks of image panels and switch off the panels of a grid row that show no image."""
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
        if not ax.images:
            ax.axis("off")


def plot_attention_examples(examples: Sequence[AttentionExample], wrap: int = 34) -> Figure:
    """The Sew paper's Figure 5 for any number of methods: a block of columns per example (the image with
    its caption above, then one row per method: its caption-level map and its word-level maps), so that
    the figure grows downwards with the methods."""
    if not examples:
        raise ValueError("plot_attention_examples needs at least one example")
    methods = list(examples[0].caption_maps)
    n_words = max(len(e.words) for e in examples)
    block = 1 + n_words
    n_cols = len(examples) * block
    fig, axes = plt.subplots(1 + len(methods), n_cols, figsize=(1.35 * n_cols + 0.6, 2.5 * (1 + len(methods))),
                             squeeze=False)
    for e, ex in enumerate(examples):
        c0 = e * block
        axes[0, c0].imshow(ex.image.permute(1, 2, 0).numpy())
        axes[0, c0 + 1].text(0.0, 1.0, textwrap.fill(ex.caption, wrap * n_words // 2 + 4), fontsize=6,
                             va="top", ha="left", transform=axes[0, c0 + 1].transAxes)  # beside its image
        for row, m in enumerate(methods, start=1):
            axes[row, c0].imshow(overlay(ex.image, ex.caption_maps[m]))
            axes[row, c0].set_title(f"{m}\ncaption", fontsize=7)
            for k, (_, word) in enumerate(ex.words):
                axes[row, c0 + 1 + k].imshow(overlay(ex.image, ex.word_maps[m][k]))
                axes[row, c0 + 1 + k].set_title(f"{m}\n'{word}'", fontsize=7)
    for row in axes:
        clear_image_axes(row)
    fig.tight_layout()
    return fig


def plot_query_maps(image: Tensor, maps: Tensor, titles: Sequence[str] | None = None,
                    title: str | None = None) -> Figure:
    """One overlay per query map [Q, h, w] on one image (decoder cross-attention, BidirAtt per phrase)."""
    n = maps.shape[0]
    fig, axes = plt.subplots(1, n + 1, figsize=(1.4 * (n + 1), 2.9), squeeze=False)
    axes[0, 0].imshow(torch.as_tensor(image).permute(1, 2, 0).numpy())
    axes[0, 0].set_title("image", fontsize=7)
    for q in range(n):
        axes[0, q + 1].imshow(overlay(image, maps[q]))
        axes[0, q + 1].set_title(titles[q] if titles else f"query {q}", fontsize=7)
    for ax in axes[0]:
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["WEIGHTINGS", "SLOT_PARTS", "WORD_PARTS", "image_token_layer", "ImageTokenCapture", "gradient_map",
           "text_batch", "HeatmapResult", "caption_maps", "without_span", "word_maps", "cross_attention_maps",
           "has_decoder_attention", "decoder_word_maps", "clear_image_axes",
           "bidirectional_attention", "upsample_map", "overlay", "peak_point", "cell_centre_share",
           "point_scores", "pointing_targets", "part_mask", "phrase_span", "pointing_game", "pointing_summary",
           "AttentionExample", "plot_attention_examples", "plot_query_maps"]
