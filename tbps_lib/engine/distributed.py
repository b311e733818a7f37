"""Process-group helpers in one place: joining ``torchrun``'s group, (world size, rank), a barrier, and the
differentiable feature gather that losses needing negatives from every process use (ITC across GPUs,
queues filled with the global batch).

Outside DDP every helper is the identity / a no-op, so a loss written with :func:`all_gather_with_grad`
runs unchanged on one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1) once; return (world_size, rank).

    NCCL on CUDA (each process on ``cuda:LOCAL_RANK``), gloo on CPU. Without torchrun: (1, 0).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_world_size(), dist.get_rank()


def world_info() -> tuple[int, int]:
    """(world_size, rank) of the current process group, (1, 0) outside DDP."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def barrier() -> None:
    """Wait for every process (no-op outside DDP)."""
    if world_info()[0] > 1:
        dist.barrier()


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for each slice and returns this process's."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world, rank = world_info()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss depends on every slice
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [n, ...] of every process along dim 0 (rank order): [world * n, ...].

    Differentiable: the gradient reaching this process's slice is the sum over processes of their losses'
    gradients, so with DDP's gradient averaging the update is that of the mean of the per-process losses,
    as on one process with the global batch. Every process must pass the same shape. Identity outside DDP.
    """
    if world_info()[0] == 1:
        return x
    return _AllGather.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """As :func:`all_gather_with_grad` without gradient: for queues and momentum features."""
    world = world_info()[0]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


__all__ = ["init_distributed", "world_info", "barrier", "all_gather_with_grad", "all_gather_no_grad"]
