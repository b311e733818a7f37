"""Layers shared by the methods: masked poolers and the projection of backbone features to the joint space.

Kept in one place (``CONTRIBUTING.md``, "Nothing is written twice"), so every method pools and projects the same way.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

POOLS = ("cls", "max", "mean")


def _check_mask(tokens: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match tokens {tuple(tokens.shape)}")
    return mask.bool()


def masked_max_pool(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Global max pooling over the positions where ``mask`` is 1: [B, N, D] -> [B, D].

    Padding never wins the max. A row without any real position is an error upstream (the encoders
    refuse empty captions); here it would give ``-inf``, so it is not guarded silently.
    """
    keep = _check_mask(tokens, mask)
    return tokens.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1)


def masked_mean_pool(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the positions where ``mask`` is 1: [B, N, D] -> [B, D]."""
    keep = _check_mask(tokens, mask).unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class PooledProjection(nn.Module):
    """Backbone features -> one joint-space vector per sample.

    ``pool``: ``"cls"`` projects the encoder's own pooled feature ([CLS] for ViT and BERT, average pool for
    CNN/Swin, final states for the bi-GRU); ``"max"`` projects every token and max-pools over real tokens
    (global max pooling as in the part-level paper, where both modalities' features share the width d
    before pooling); ``"mean"`` projects and averages real tokens. ``batchnorm`` adds a BatchNorm1d after
    pooling (the Sew paper's Algorithm 1, line 8); it uses running statistics in eval mode.
    """

    def __init__(self, in_dim: int, out_dim: int, pool: str = "cls", batchnorm: bool = False) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; pools: {list(POOLS)}")
        self.pool = pool
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm: nn.Module = nn.BatchNorm1d(out_dim) if batchnorm else nn.Identity()

    def forward(self, pooled: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pooled [B, D_in] and tokens [B, N, D_in] (mask [B, N] or None) -> [B, D_out]."""
        if self.pool == "cls":
            out = self.linear(pooled)
        elif self.pool == "max":
            out = masked_max_pool(self.linear(tokens), mask)
        else:
            out = masked_mean_pool(self.linear(tokens), mask)
        return self.norm(out)


class CrossAttentionBlock(nn.Module):
    """A transformer decoder layer over a query sequence: self-attention, cross-attention to a memory
    sequence (the other modality), feed-forward; each with a residual connection and LayerNorm (post-norm).

    Either attention can be switched off (the Sew paper's Table 5 removes the cross-attention; the
    part-level decoder has learnable queries that only cross-attend). ``forward`` can return the
    cross-attention weights (averaged over heads, [B, n_queries, n_memory]) for attention maps.
    Masks are bool with True = a real position (the opposite of ``nn.MultiheadAttention``'s padding mask).
    """

    def __init__(self, dim: int, heads: int, self_attention: bool = True, cross_attention: bool = True,
                 ffn_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"CrossAttentionBlock: width {dim} is not divisible by {heads} heads")
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if self_attention else None
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if cross_attention else None
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.norm_cross = nn.LayerNorm(dim) if cross_attention else None
        hidden = int(dim * ffn_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(self, x: Tensor, memory: Tensor | None = None, x_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Queries ``x`` [B, N, D] and ``memory`` [B, M, D] -> (updated queries [B, N, D], cross-attention
        weights [B, N, M] or None)."""
        pad = None if x_mask is None else ~_check_mask(x, x_mask)
        if self.self_attn is not None:
            out, _ = self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)
            x = self.norm_self(x + out)
        weights = None
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError("CrossAttentionBlock with cross-attention needs a memory sequence")
            memory_pad = None if memory_mask is None else ~_check_mask(memory, memory_mask)
            out, weights = self.cross_attn(x, memory, memory, key_padding_mask=memory_pad,
                                           need_weights=need_weights, average_attn_weights=True)
            x = self.norm_cross(x + out)
        return self.norm_ffn(x + self.ffn(x)), weights


def stripe_rows(height: int, n: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, end)`` of ``n`` horizontal stripes of a feature map ``height`` rows tall, top
    first: stripe p covers rows floor(p h / n) .. ceil((p + 1) h / n) (adaptive pooling's bins), so stripes
    are equal when n divides h and overlap by a row where it does not. Needs ``1 <= n <= height``."""
    if not 1 <= n <= height:
        raise ValueError(f"cannot cut {height} feature rows into {n} horizontal stripes (need 1 <= n <= rows)")
    return [((p * height) // n, -((-(p + 1) * height) // n)) for p in range(n)]


def pool_row_ranges(tokens: Tensor, grid: tuple[int, int], ranges: list[tuple[int, int]],
                    pool: str = "mean") -> Tensor:
    """Tokens [B, h*w, D] of a row-major ``grid`` (h, w) -> one pooled feature per band of rows
    ``[start, end)`` in ``ranges`` (e.g. :func:`stripe_rows`): [B, len(ranges), D], ``pool`` "mean" or
    "max" over the band's cells."""
    h, w = grid
    if tokens.dim() != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fill the grid {grid}")
    if pool not in ("mean", "max"):
        raise ValueError(f"row pool must be 'mean' or 'max', got {pool!r}")
    if any(not 0 <= a < b <= h for a, b in ranges):
        raise ValueError(f"row ranges {ranges} do not lie within the {h} rows of the grid")
    rows = tokens.view(tokens.shape[0], h, w, tokens.shape[-1])
    if pool == "mean":
        return torch.stack([rows[:, a:b].mean(dim=(1, 2)) for a, b in ranges], dim=1)
    return torch.stack([rows[:, a:b].amax(dim=(1, 2)) for a, b in ranges], dim=1)
