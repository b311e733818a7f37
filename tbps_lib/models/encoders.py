"""Image encoders (timm) and text encoders (transformers BERT, a bi-GRU or bi-LSTM), built from the config.

Every image encoder returns :class:`ImageFeatures` (a pooled feature, the token / feature-map sequence and
the grid shape of the tokens), every text encoder :class:`TextFeatures` (the [CLS]-style pooled feature,
the token sequence and its attention mask). Methods need both: the baselines use the pooled feature or
max-pool the sequence, later methods attend over patch tokens, cut the grid into horizontal stripes, or
draw heatmaps on it.

Nothing here downloads. ``pretrained`` is a local path or ``None`` (random initialisation); asking for
weights that are not there, or that do not fit the architecture, is an error that names the path and the
keys that did not fit. ``encoder.pretrained_source`` says where the weights came from (``None`` = random
initialisation), so reports can say so.

Image architectures (``IMAGE_ARCHS``), all at any ``img_size`` (height, width):

* ``vit_base_patch16`` - ViT-B/16 built at ``img_size`` (384x128 gives a 24x8 patch grid); a checkpoint
  trained at another size has its absolute position embeddings resampled (bicubic, timm's helper).
* ``resnet50`` - ResNet-50; the sequence is the flattened stride-32 feature map (12x4 at 384x128).
* ``swin_tiny`` - Swin-T (patch 4, window 7). Constraint: height and width should be multiples of 32
  (patch 4 times three 2x patch merges); timm (>= 1.0) pads a grid that a window does not divide and
  shrinks a window larger than the grid, so other sizes run but attend over padding. A checkpoint's
  relative-position tables are resized when the window changes.
* ``vit_smoke`` / ``resnet_smoke`` / ``swin_smoke`` - small variants for CPU smoke runs (sizes in ``IMAGE_ARCHS``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from tbps_lib.config import ImageEncoderConfig, TextEncoderConfig

# ------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class ImageFeatures:
    """What an image encoder returns.

    ``pooled`` [B, D]: the [CLS] token (ViT) or the average-pooled feature map (ResNet, Swin).
    ``tokens`` [B, N, D]: patch tokens without [CLS] (ViT) or the flattened feature map, row-major.
    ``grid`` (h, w): the token grid, ``h * w == N``, rows from the top of the image.
    """

    pooled: Tensor
    tokens: Tensor
    grid: tuple[int, int]


@dataclass
class TextFeatures:
    """What a text encoder returns.

    ``pooled`` [B, D]: the [CLS] token (BERT) or the final forward and backward states (bi-GRU, bi-LSTM).
    ``tokens`` [B, L, D]: every position, [CLS] and [SEP] included. ``mask`` [B, L]: 1 on real tokens.
    """

    pooled: Tensor
    tokens: Tensor
    mask: Tensor


# ------------------------------------------------------------------------------------------------------
# Checkpoint files


def _resolve_weights_file(path: str, field_name: str, folder_files: tuple[str, ...]) -> Path:
    """The weights file at ``path`` (a file, or a folder holding one of ``folder_files``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in folder_files:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{field_name}={path!r} is a folder without weights: looked for "
                                f"{', '.join(folder_files)} in {p}")
    if not p.is_file():
        raise FileNotFoundError(f"{field_name}={path!r}: no such file or folder (looked at {p.resolve()}); "
                                f"expected a state-dict file (.safetensors, .pth, .pt, .bin) or a folder "
                                f"holding {' or '.join(folder_files)}")
    return p


def load_state_dict_file(path: Path, field_name: str) -> dict[str, Tensor]:
    """A state dict from ``path`` (safetensors, or ``torch.load(weights_only=True)``: no unpickling).

    A checkpoint that wraps its weights under ``"state_dict"`` or ``"model"`` is unwrapped, and a
    ``"module."`` prefix (DistributedDataParallel) is removed.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, or a pickle that is not plain tensors
        raise ValueError(f"{field_name}: cannot read weights from {path}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{field_name}: {path} does not hold a state dict of tensors")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_matching_state_dict(module: nn.Module, state: Mapping[str, Tensor], source: str,
                             field_name: str) -> None:
    """Load ``state`` into ``module`` only if it fits exactly: no missing, unexpected or mis-shaped key.

    Otherwise raise a ``ValueError`` that names the source and lists the keys that did not fit.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    problems = [f"{len(v)} {name} key(s): {_describe(v)}" for name, v in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if v]
    if problems:
        raise ValueError(f"{field_name}: the weights in {source} do not fit {type(module).__name__}: "
                         + "; ".join(problems))
    module.load_state_dict(dict(state), strict=True)


def resolve_weights(value: str | None, field_name: str) -> tuple[str | None, str | None]:
    """``(local path, provenance label)`` of a weights config value (``workbook:<name>`` is trained on first
    use by ``tbps_lib.pretrain.resolve_pretrained``; a path stays as it is): for methods that load weights
    of a whole model (LAIP's ``model.init_albef``) through the one allowed upward import."""
    from tbps_lib.pretrain import resolve_pretrained

    return resolve_pretrained(value, field_name)


# ------------------------------------------------------------------------------------------------------
# Image encoders


def _vit_filter(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    from timm.models.vision_transformer import checkpoint_filter_fn
    return checkpoint_filter_fn(state, model)


def _swin_filter(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    from timm.models.swin_transformer import checkpoint_filter_fn
    return checkpoint_filter_fn(state, model)


@dataclass(frozen=True, eq=False)
class ImageArch:
    """A named image architecture: the timm model it is built from, overrides, and how to read it."""

    timm_name: str
    kind: str  # "vit" (token sequence with [CLS]), "cnn" (NCHW feature map) or "swin" (NHWC feature map)
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_filter: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None


IMAGE_ARCHS: dict[str, ImageArch] = {
    "vit_base_patch16": ImageArch("vit_base_patch16_224", "vit", {}, _vit_filter),
    "resnet50": ImageArch("resnet50", "cnn", {}),
    "swin_tiny": ImageArch("swin_tiny_patch4_window7_224", "swin", {}, _swin_filter),
    # Smoke variants: forward+backward for 64 images takes about 0.24 s (vit_smoke, 128x64), 0.3 s
    # (swin_smoke, 128x64), 0.1 s (resnet_smoke, 64x32) of single-core CPU time.
    "vit_smoke": ImageArch("vit_base_patch16_224", "vit", {"embed_dim": 128, "depth": 4, "num_heads": 4},
                           _vit_filter),  # patch 16: an 8x4 grid at 128x64
    # One block per stage, narrow, output stride 8: an 8x4 grid of 128-d tokens at 64x32, fine enough for
    # part stripes and heatmaps.
    "resnet_smoke": ImageArch("resnet18", "cnn", {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128),
                                                  "stem_width": 16, "output_stride": 8}),
    "swin_smoke": ImageArch("swin_tiny_patch4_window7_224", "swin",
                            {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8),
                             "window_size": 4}, _swin_filter),
}


def checkpoint_grid(path: Path) -> tuple[int, int] | None:
    """The patch grid (rows, columns) a safetensors checkpoint records in its metadata (``"grid": "4x2"``,
    written by ``tbps_lib.pretrain`` for non-square ViTs), else ``None``."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        grid = (f.metadata() or {}).get("grid")
    return tuple(int(v) for v in grid.split("x")) if grid else None  # type: ignore[return-value]


def _resample_vit_pos_embed(state: dict[str, Tensor], model: nn.Module, source: str,
                            grid: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """Resize a ViT checkpoint's absolute position embeddings to the model's patch grid.

    The checkpoint's grid is ``grid`` when the checkpoint records it, else inferred as square (how ViTs
    are pretrained, e.g. 14x14 at 224x224); a non-square grid with another token count cannot be inferred
    and is an error.
    """
    from timm.layers import resample_abs_pos_embed

    pos = state.get("pos_embed")
    if pos is None or pos.shape == model.pos_embed.shape:
        return state
    prefix = model.num_prefix_tokens
    n_patches = pos.shape[1] - prefix
    side = math.isqrt(n_patches)
    old = list(grid) if grid and grid[0] * grid[1] == n_patches else [side, side]
    if old[0] * old[1] != n_patches or pos.shape[-1] != model.pos_embed.shape[-1]:
        raise ValueError(f"image.pretrained: cannot resize pos_embed {tuple(pos.shape)} in {source} to the "
                         f"model's {tuple(model.pos_embed.shape)} (grid {tuple(model.patch_embed.grid_size)}): "
                         f"its {n_patches} patch positions are not a square grid, or the width differs")
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                old_size=old, num_prefix_tokens=prefix)
    return state


class ImageEncoder(nn.Module):
    """A timm backbone without its classifier; ``forward(images) -> ImageFeatures``."""

    def __init__(self, arch: str, img_size: tuple[int, int], drop_path: float = 0.0) -> None:
        super().__init__()
        import timm

        if arch not in IMAGE_ARCHS:
            raise ValueError(f"image.arch: unknown image architecture {arch!r}; known: {sorted(IMAGE_ARCHS)}")
        if len(img_size) != 2 or min(img_size) <= 0:
            raise ValueError(f"image.img_size must be (height, width) > 0, got {img_size!r}")
        self.arch = arch
        self.spec = IMAGE_ARCHS[arch]
        self.img_size = (int(img_size[0]), int(img_size[1]))
        kwargs = dict(self.spec.kwargs, num_classes=0, drop_path_rate=drop_path)
        if self.spec.kind != "cnn":
            kwargs["img_size"] = self.img_size
        self.model = timm.create_model(self.spec.timm_name, pretrained=False, **kwargs)
        self.out_dim: int = int(self.model.num_features)
        self.pretrained_source: str | None = None

    def load_pretrained(self, path: str) -> None:
        """Load a timm checkpoint (file or folder); resize position embeddings / window tables to fit."""
        file = _resolve_weights_file(path, "image.pretrained", ("model.safetensors", "pytorch_model.bin"))
        state = load_state_dict_file(file, "image.pretrained")
        if self.spec.kind == "vit":
            state = _resample_vit_pos_embed(state, self.model, str(file), checkpoint_grid(file))
        if self.spec.checkpoint_filter is not None:
            try:
                state = self.spec.checkpoint_filter(state, self.model)
            except ValueError as e:  # e.g. a Swin table from a non-square window cannot be resized
                raise ValueError(f"image.pretrained: cannot adapt {file} to {self.arch} at {self.img_size}: {e}; "
                                 f"load it at the image size it was trained at") from e
        head = self.model.pretrained_cfg.get("classifier")  # the ImageNet classifier is not used here
        if head:
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        load_matching_state_dict(self.model, state, str(file), "image.pretrained")
        self.pretrained_source = str(file)

    def forward(self, images: Tensor) -> ImageFeatures:
        """Images [B, 3, H, W] at ``img_size`` -> pooled feature, token sequence and grid."""
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f"{self.arch} was built for images of (height, width) {self.img_size}, "
                             f"got a batch of shape {tuple(images.shape)}")
        feats = self.model.forward_features(images)
        if self.spec.kind == "vit":  # [B, prefix + N, D] after the final norm
            grid = tuple(self.model.patch_embed.grid_size)
            return ImageFeatures(feats[:, 0], feats[:, self.model.num_prefix_tokens:], grid)
        if self.spec.kind == "cnn":  # [B, C, h, w]
            grid = (feats.shape[2], feats.shape[3])
            tokens = feats.flatten(2).transpose(1, 2)
        else:  # swin: [B, h, w, C]
            grid = (feats.shape[1], feats.shape[2])
            tokens = feats.flatten(1, 2)
        return ImageFeatures(tokens.mean(dim=1), tokens, grid)


def build_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    """The image encoder of ``cfg`` (``arch``, ``img_size``, ``drop_path``), with weights from
    ``cfg.pretrained`` when given (else random initialisation: ``pretrained_source is None``).

    ``workbook:<arch>`` names the workbook's own pretrained weights (``tbps_lib.pretrain``), trained on first
    use; ``pretrained_source`` is then ``workbook:<arch>@<hash>``."""
    from tbps_lib.pretrain import resolve_pretrained

    encoder = ImageEncoder(cfg.arch, tuple(cfg.img_size), cfg.drop_path)
    path, label = resolve_pretrained(cfg.pretrained, "image.pretrained")
    if path is not None:
        encoder.load_pretrained(path)
        if label != path:
            encoder.pretrained_source = label
    return encoder


# ------------------------------------------------------------------------------------------------------
# Text encoders


@dataclass(frozen=True, eq=False)
class TextArch:
    """A named text architecture: ``kind`` "bert", or a recurrent cell of ``RECURRENT_CELLS`` ("bigru",
    "bilstm"), and its sizes."""

    kind: str
    sizes: Mapping[str, int]


_BERT_STRUCTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

TEXT_ARCHS: dict[str, TextArch] = {
    "bert_base": TextArch("bert", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                   "intermediate_size": 3072}),  # BERT-base-uncased
    "bert_smoke": TextArch("bert", {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "intermediate_size": 512}),
    # Any BERT-family folder (BERT-base/large, MiniLM, ...): its config.json decides the sizes; needs
    # text.pretrained. The named entries check that the folder has their sizes (paper presets: bert_base).
    "bert": TextArch("bert", {}),
    # Bi-GRU over word embeddings; out_dim = 2 * hidden_size (1024 for DSSL's p = 1024).
    "bigru": TextArch("bigru", {"embed_dim": 300, "hidden_size": 512}),
    "bigru_smoke": TextArch("bigru", {"embed_dim": 128, "hidden_size": 64}),
    # Bi-LSTM (ACSA's Table III text backbone; the paper gives no sizes): the bi-GRU's sizes, so the two
    # differ only in the cell.
    "bilstm": TextArch("bilstm", {"embed_dim": 300, "hidden_size": 512}),
    "bilstm_smoke": TextArch("bilstm", {"embed_dim": 128, "hidden_size": 64}),
}

# The recurrent kinds of ``TextArch``: the torch module of the cell (its attribute name in the encoder, hence
# in its state dict, is the module's name in lower case: ``gru.*``, ``lstm.*``).
RECURRENT_CELLS: dict[str, type[nn.RNNBase]] = {"bigru": nn.GRU, "bilstm": nn.LSTM}


def _replace_embeddings(words: Tensor, replace: Tensor, replacement: Tensor | None) -> Tensor:
    """``words`` [B, L, D] with the positions where ``replace`` [B, L] is true set to ``replacement`` [D]."""
    if replacement is None or replacement.shape != words.shape[-1:] or replace.shape != words.shape[:2]:
        raise ValueError(f"text encoder: replace must be [B, L] = {tuple(words.shape[:2])} and replacement a "
                         f"vector of {words.shape[-1]} values, got {tuple(replace.shape)} and "
                         f"{None if replacement is None else tuple(replacement.shape)}")
    return torch.where(replace.unsqueeze(-1), replacement.to(words.dtype), words)


class _Freezable(nn.Module):
    """A module whose parameters may be frozen; a frozen one also stays in eval mode (no dropout)."""

    frozen: bool = False

    def freeze(self) -> None:
        """Stop gradients to every parameter and switch to eval mode for good (e.g. a frozen BERT)."""
        self.frozen = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "_Freezable":
        """``nn.Module.train``, except that a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hugging Face's loading messages and progress bar off (restored afterwards): the library checks the
    loaded keys itself and reports what does not fit as one error."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class BertTextEncoder(_Freezable):
    """transformers ``BertModel`` without its pooler; ``pooled`` is the final [CLS] hidden state.

    A named arch (``bert_base``, ``bert_smoke``) refuses a pretrained folder of other sizes; ``arch="bert"``
    takes any BERT-family folder and its ``config.json`` decides the sizes.
    """

    def __init__(self, arch: str, vocab_size: int, max_length: int, pretrained: str | None = None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.arch = arch
        sizes = dict(TEXT_ARCHS[arch].sizes)
        self.pretrained_source: str | None = None
        if pretrained is None:
            if not sizes:
                raise ValueError(f"text.arch={arch!r} takes its sizes from a pretrained folder: set text.pretrained "
                                 f"to a Hugging Face BERT folder, or choose a sized arch "
                                 f"({', '.join(k for k, v in TEXT_ARCHS.items() if v.kind == 'bert' and v.sizes)})")
            if vocab_size <= 0:
                raise ValueError(f"text.vocab_size must be > 0, got {vocab_size}")
            config = BertConfig(vocab_size=vocab_size, max_position_embeddings=max(512, max_length),
                                pad_token_id=0, **sizes)
            self.bert = BertModel(config, add_pooling_layer=False)
        else:
            self.bert = self._load(pretrained, sizes)
            self.pretrained_source = str(Path(pretrained).expanduser())
        if max_length > self.bert.config.max_position_embeddings:
            raise ValueError(f"text.max_length={max_length} exceeds the {self.bert.config.max_position_embeddings} "
                             f"positions of {arch}")
        self.out_dim: int = int(self.bert.config.hidden_size)
        self.word_dim: int = int(self.bert.config.hidden_size)  # width of the input word embeddings
        self.vocab_size: int = int(self.bert.config.vocab_size)

    def _load(self, path: str, sizes: Mapping[str, int]) -> nn.Module:
        """``BertModel.from_pretrained(path, local_files_only=True)``, refusing weights that do not fit."""
        from transformers import BertConfig, BertModel

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"text.pretrained={path!r}: expected a Hugging Face BERT folder with "
                                    f"config.json and model.safetensors or pytorch_model.bin at {folder}; "
                                    f"{'the folder has no config.json' if folder.is_dir() else 'no such folder'}")
        _resolve_weights_file(str(folder), "text.pretrained", ("model.safetensors", "pytorch_model.bin"))
        config = BertConfig.from_pretrained(str(folder), local_files_only=True)
        wrong = {k: (getattr(config, k, None), v) for k, v in sizes.items() if getattr(config, k, None) != v}
        if config.model_type != "bert" or wrong:
            detail = ", ".join(f"{k} {got} (expected {want})" for k, (got, want) in wrong.items())
            raise ValueError(f"text.pretrained={path!r} (model_type {config.model_type!r}) does not fit text.arch="
                             f"{self.arch!r}: {detail or 'not a BERT model'}")
        try:
            with quiet_transformers():  # its load report and bar would repeat what is checked below
                model, info = BertModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False,
                                                        dtype=torch.float32, output_loading_info=True)
        except RuntimeError as e:  # transformers raises on mis-shaped tensors
            raise ValueError(f"text.pretrained: the weights in {folder} do not fit {self.arch!r}: {e}") from e
        ignorable = ("pooler.", "cls.", "embeddings.position_ids")  # pooler / pre-training heads, unused
        unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(ignorable))
        missing, mismatched = sorted(info["missing_keys"]), sorted(map(str, info["mismatched_keys"]))
        if missing or unexpected or mismatched:
            raise ValueError(f"text.pretrained: the weights in {folder} do not fit {self.arch!r}: missing "
                             f"{_describe(missing) or 'none'}; unexpected {_describe(unexpected) or 'none'}; "
                             f"mis-shaped {_describe(mismatched) or 'none'}")
        return model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, replace: Tensor | None = None,
                replacement: Tensor | None = None) -> TextFeatures:
        """Token ids and mask [B, L] -> [CLS] feature, hidden states, mask.

        ``replace`` (bool [B, L]) and ``replacement`` ([hidden_size]) swap the word embedding of the chosen
        positions for a given (learnable) vector before the position embeddings are added: how Masking
        Caption Modeling feeds masked captions (Sew paper, Section 3.2).
        """
        if replace is None:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            words = _replace_embeddings(self.bert.get_input_embeddings()(input_ids), replace, replacement)
            hidden = self.bert(inputs_embeds=words, attention_mask=attention_mask).last_hidden_state
        return TextFeatures(hidden[:, 0], hidden, attention_mask)


class RecurrentTextEncoder(_Freezable):
    """Word embeddings + a bi-directional recurrent network: a GRU (DSSL's text encoder) or an LSTM (ACSA's
    Table III Bi-LSTM), the cell given by the arch's kind (``RECURRENT_CELLS``).

    ``tokens`` are the recurrent outputs at every position (zero on padding); ``pooled`` concatenates the
    final forward hidden state (at the last real token) and the final backward one (at the first token); an
    LSTM's cell states are not part of the features. Padded positions are skipped with
    ``pack_padded_sequence``, which needs the lengths on the CPU: one host synchronisation per call,
    accepted for correctness of the backward direction.
    """

    def __init__(self, arch: str, vocab_size: int, pretrained: str | None = None) -> None:
        """``vocab_size`` words, or as many as the embedding of the ``pretrained`` checkpoint has."""
        super().__init__()
        file = None
        if pretrained is not None:  # the checkpoint's vocabulary decides the embedding size
            file = _resolve_weights_file(pretrained, "text.pretrained", ("model.safetensors", "pytorch_model.bin"))
            state = load_state_dict_file(file, "text.pretrained")
            if "embedding.weight" in state:
                vocab_size = int(state["embedding.weight"].shape[0])
        if vocab_size <= 0:
            raise ValueError(f"text.vocab_size must be > 0, got {vocab_size}")
        self.arch = arch
        sizes = TEXT_ARCHS[arch].sizes
        cell = RECURRENT_CELLS[TEXT_ARCHS[arch].kind]
        self.embedding = nn.Embedding(vocab_size, sizes["embed_dim"], padding_idx=0)
        self.cell_name = cell.__name__.lower()  # "gru" / "lstm": the attribute, so bi-GRU checkpoints keep "gru.*"
        self.add_module(self.cell_name, cell(sizes["embed_dim"], sizes["hidden_size"], batch_first=True,
                                             bidirectional=True))
        self.out_dim: int = 2 * sizes["hidden_size"]
        self.word_dim: int = sizes["embed_dim"]  # width of the input word embeddings
        self.vocab_size: int = vocab_size
        self.pretrained_source: str | None = None
        if file is not None:
            load_matching_state_dict(self, state, str(file), "text.pretrained")
            self.pretrained_source = str(file)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, replace: Tensor | None = None,
                replacement: Tensor | None = None) -> TextFeatures:
        """Token ids and mask [B, L] (padding at the end) -> final states, recurrent outputs, mask.

        ``replace`` / ``replacement``: as for :class:`BertTextEncoder` (masked positions get a given vector
        instead of their word embedding).
        """
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        lengths = attention_mask.sum(dim=1).cpu()
        if bool((lengths == 0).any()):
            raise ValueError(f"{self.arch} text encoder: a caption in the batch has no tokens (attention_mask all 0)")
        words = self.embedding(input_ids)
        if replace is not None:
            words = _replace_embeddings(words, replace, replacement)
        packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
        out, h_n = getattr(self, self.cell_name)(packed)
        if isinstance(h_n, tuple):  # an LSTM returns (hidden states, cell states)
            h_n = h_n[0]
        tokens, _ = pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        return TextFeatures(torch.cat([h_n[0], h_n[1]], dim=-1), tokens, attention_mask)


TextEncoder = BertTextEncoder | RecurrentTextEncoder


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The text encoder of ``cfg``: ``arch``, weights from ``cfg.pretrained`` (a BERT folder, or a
    state-dict file / folder for a recurrent encoder, or ``workbook:<arch>``: ``tbps_lib.pretrain``) else random
    initialisation with ``cfg.vocab_size`` words; frozen (no gradients, eval mode) when ``cfg.freeze``."""
    from tbps_lib.pretrain import resolve_pretrained

    if cfg.arch not in TEXT_ARCHS:
        raise ValueError(f"text.arch: unknown text architecture {cfg.arch!r}; known: {sorted(TEXT_ARCHS)}")
    path, label = resolve_pretrained(cfg.pretrained, "text.pretrained")
    if TEXT_ARCHS[cfg.arch].kind == "bert":
        encoder: TextEncoder = BertTextEncoder(cfg.arch, cfg.vocab_size, cfg.max_length, path)
    else:
        encoder = RecurrentTextEncoder(cfg.arch, cfg.vocab_size, path)
    if label != path:
        encoder.pretrained_source = label
    if cfg.freeze:
        encoder.freeze()
    return encoder
