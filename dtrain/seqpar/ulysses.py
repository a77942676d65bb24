"""Ulysses attention inside the rank's current sequence-parallel group (any planned size).

A group of ``d`` ranks holds one packed micro-batch of ``T`` tokens, each rank a contiguous slice
of ``T/d``. :func:`attention` takes this rank's ``q, k, v`` of shape ``[B, H, T/d, hd]`` (the
``scaled_dot_product_attention`` layout), and

1. one all-to-all over the group scatters heads and gathers the sequence: ``[B, H/d, T, hd]``;
2. runs causal attention within each packed sequence (a loop over the sequences: on CPU this
   costs only each sequence's own ``s^2``, where a block-diagonal mask would cost ``T^2``);
3. the inverse all-to-all gives back this rank's slice with all heads: ``[B, H, T/d, hd]``.

Backward runs the same all-to-alls through the same group (:class:`_AllToAll`; an all-to-all of
equal chunks is its own adjoint). A group of one rank does no communication. With no active
context (:func:`current` is None) it is plain causal attention, so a model may call it always.

The context of the micro-batch being computed is set by the seqpar plugin before each forward
(:func:`activate`); backward needs none (the group is saved with the autograd graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dtrain.errors import UsageError

if TYPE_CHECKING:
    from dtrain.comm import Comm


class SeqParError(UsageError):
    """A plan or batch sequence parallelism cannot run (one line naming what and how to fix it)."""


@dataclass(frozen=True)
class SeqParContext:
    """What the attention of one micro-batch needs: this rank's group and the packing."""

    comm: "Comm | None"
    ranks: tuple[int, ...]
    """The group (an aligned block of ranks); one rank: no communication."""
    bounds: tuple[int, ...]
    """Packed boundaries ``0 = b0 < b1 < ... < bn = T`` (every segment is one sequence or padding)."""

    @property
    def size(self) -> int:
        return len(self.ranks)


_ACTIVE: SeqParContext | None = None


def activate(ctx: SeqParContext | None) -> None:
    """Make ``ctx`` the context of the forwards that follow (None: plain attention)."""
    global _ACTIVE
    _ACTIVE = ctx


def current() -> SeqParContext | None:
    """The active context, or None when sequence parallelism is not running."""
    return _ACTIVE


class _AllToAll(torch.autograd.Function):
    """``Comm.all_to_all_single`` over dim 0 (``d`` equal chunks) of a rank block, with its adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: "Comm", ranks: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.ranks = comm, ranks
        x = x.contiguous()
        out = torch.empty_like(x)
        comm.all_to_all_single(out, x, ranks)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        ctx.comm.all_to_all_single(out, grad, ctx.ranks)
        return out, None, None


def all_to_all(x: torch.Tensor, comm: "Comm", ranks: tuple[int, ...]) -> torch.Tensor:
    """Differentiable all-to-all of ``x``'s ``len(ranks)`` equal dim-0 chunks inside ``ranks``."""
    return _AllToAll.apply(x, comm, ranks)


def _gather_sequence(qkv: torch.Tensor, ctx: SeqParContext) -> torch.Tensor:
    """``[3, B, H, T/d, hd]`` -> ``[3, B, H/d, T, hd]``: heads scattered, sequence gathered."""
    d = ctx.size
    three, b, h, t, hd = qkv.shape
    x = qkv.view(three, b, d, h // d, t, hd).permute(2, 0, 1, 3, 4, 5)  # chunk j: heads for member j
    y = all_to_all(x, ctx.comm, ctx.ranks)  # chunk j: my heads of member j's sequence slice
    return y.permute(1, 2, 3, 0, 4, 5).reshape(three, b, h // d, d * t, hd)


def _gather_heads(y: torch.Tensor, ctx: SeqParContext) -> torch.Tensor:
    """``[B, H/d, T, hd]`` -> ``[B, H, T/d, hd]``: the inverse of :func:`_gather_sequence`."""
    d = ctx.size
    b, hl, t, hd = y.shape
    x = y.view(b, hl, d, t // d, hd).permute(2, 0, 1, 3, 4)  # chunk j: member j's sequence slice
    z = all_to_all(x, ctx.comm, ctx.ranks)  # chunk j: head group j of my slice
    return z.permute(1, 0, 2, 3, 4).reshape(b, d * hl, t // d, hd)


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...],
                            dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each packed segment ``[bounds[i], bounds[i+1])`` of dim -2."""
    outs = [F.scaled_dot_product_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], is_causal=True,
                                           dropout_p=dropout_p, scale=scale)
            for a, b in zip(bounds, bounds[1:])]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
              scale: float | None = None) -> torch.Tensor:
    """Causal self-attention of this rank's ``[B, H, T_local, hd]`` slice under the active context.

    Without a context: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``. With one of
    ``d`` ranks: Ulysses as in the module docstring; ``H`` must be divisible by ``d``.
    """
    ctx = _ACTIVE
    if ctx is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    d, heads = ctx.size, q.shape[1]
    if heads % d:
        raise SeqParError(f"seqpar: a group of {d} ranks cannot split {heads} attention heads; every planned "
                          f"group size must divide the head count")
    if d == 1:
        return packed_causal_attention(q, k, v, ctx.bounds, dropout_p, scale)
    full = _gather_sequence(torch.stack((q, k, v)), ctx)
    y = packed_causal_attention(full[0], full[1], full[2], ctx.bounds, dropout_p, scale)
    return _gather_heads(y, ctx)
