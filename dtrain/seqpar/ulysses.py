"""Ulysses attention inside the rank's current sequence-parallel group (any planned size).

A group of ``d`` ranks holds one packed micro-batch of ``T`` tokens, each rank a contiguous slice
of ``T/d``. :func:`attention` takes this rank's ``q, k, v`` of shape ``[B, H, T/d, hd]`` (the
``scaled_dot_product_attention`` layout), and

1. one all-to-all over the group scatters heads and gathers the sequence: ``[B, H/d, T, hd]``;
2. runs causal attention within each packed sequence: sequences of similar length are padded
   to a common length and run as one batched kernel (:func:`packed_causal_attention`), so the
   cost stays near each sequence's own ``s^2`` (a block-diagonal mask would cost ``T^2``) without
   a kernel call per short sequence;
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


PAD_WASTE = 1.5
"""A bin of packed sequences may cost up to this many times their own ``sum s^2`` once padded to
its longest sequence (short sequences: one batched kernel beats one kernel per sequence)."""


def length_bins(lengths: list[int], waste: float = PAD_WASTE) -> list[list[int]]:
    """Segment indices in bins, longest first: a segment joins the current bin while the bin's
    padded cost ``count * longest^2`` stays within ``waste`` times its members' ``sum s^2``."""
    bins: list[list[int]] = []
    squares = 0
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] ** 2 <= waste * (squares + n * n):
            bins[-1].append(i)
            squares += n * n
        else:
            bins.append([i])
            squares = n * n
    return bins


@dataclass(frozen=True)
class _BinPlan:
    """How :func:`packed_causal_attention` runs one packing (the same for every layer of a
    micro-batch, so it is built once per ``bounds`` and device and reused)."""

    singles: tuple[tuple[int, int], ...]
    """Segments that run alone: ``(start, end)``, in output order first."""
    bins: tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]
    """Padded bins: ``(count, width, gather index [count * width], kept rows [valid])``."""
    inverse: torch.Tensor | None
    """Permutation from the concatenated outputs back to packed order (None: already in order)."""


_PLANS: dict[tuple[tuple[int, ...], str], _BinPlan] = {}


def _bin_plan(bounds: tuple[int, ...], device: torch.device) -> _BinPlan:
    key = (bounds, str(device))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    segments = list(zip(bounds, bounds[1:]))
    lengths = [b - a for a, b in segments]
    singles, bins, order = [], [], []
    for members in length_bins(lengths):
        if len(members) == 1:
            a, b = segments[members[0]]
            singles.append((a, b))
            continue
        width = lengths[members[0]]
        offsets = torch.arange(width)
        starts = torch.tensor([segments[m][0] for m in members])
        ends = torch.tensor([segments[m][1] for m in members])
        index = torch.minimum(starts[:, None] + offsets[None, :], ends[:, None] - 1)  # pad: repeat the last token
        valid = (offsets[None, :] < (ends - starts)[:, None]).reshape(-1).nonzero().squeeze(1)
        bins.append((len(members), width, index.reshape(-1).to(device), valid.to(device)))
        order.append(index.reshape(-1)[valid])
    order = [torch.arange(a, b) for a, b in singles] + order
    flat = torch.cat(order)
    inverse = None
    if not torch.equal(flat, torch.arange(flat.numel())):
        inverse = torch.empty_like(flat)
        inverse[flat] = torch.arange(flat.numel())
        inverse = inverse.to(device)
    if len(_PLANS) >= 256:  # one entry per micro-batch packing; keep the cache small
        _PLANS.clear()
    plan = _PLANS[key] = _BinPlan(tuple(singles), tuple(bins), inverse)
    return plan


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...],
                            dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each packed segment ``[bounds[i], bounds[i+1])`` of dim -2.

    Segments of similar length (:func:`length_bins`) run as one batched kernel: each is padded
    at its end to the bin's longest, which causal attention makes exact (a real query never sees a
    later, padded key; padded queries' outputs are dropped, so they get no gradient). The bins'
    gather indices are built once per packing (:func:`_bin_plan`) and ``q, k, v`` are gathered
    in one ``index_select``."""
    return _packed(torch.stack((q, k, v)), bounds, dropout_p, scale)


def _packed(qkv: torch.Tensor, bounds: tuple[int, ...], dropout_p: float, scale: float | None) -> torch.Tensor:
    """:func:`packed_causal_attention` of a stacked ``[3, B, H, T, hd]``."""
    if len(bounds) == 2:
        return F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True, dropout_p=dropout_p,
                                              scale=scale)
    plan = _bin_plan(bounds, qkv.device)
    outs = []
    for a, b in plan.singles:
        x = qkv[..., a:b, :]
        outs.append(F.scaled_dot_product_attention(x[0], x[1], x[2], is_causal=True, dropout_p=dropout_p,
                                                   scale=scale))
    batch = qkv.shape[1]
    for n, width, index, valid in plan.bins:
        x = qkv.index_select(-2, index).unflatten(-2, (n, width))  # [3, B, H, n, width, hd]
        x = x.movedim(-3, 1).flatten(1, 2)  # [3, n * B, H, width, hd]
        y = F.scaled_dot_product_attention(x[0], x[1], x[2], is_causal=True, dropout_p=dropout_p, scale=scale)
        y = y.unflatten(0, (n, batch)).movedim(0, -3).flatten(-3, -2)  # [B, H, n * width, hd]
        outs.append(y.index_select(-2, valid))
    packed = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]
    return packed if plan.inverse is None else packed.index_select(-2, plan.inverse)


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
    if d == 1 and len(ctx.bounds) == 2:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    qkv = torch.stack((q, k, v))
    if d == 1:
        return _packed(qkv, ctx.bounds, dropout_p, scale)
    return _gather_heads(_packed(_gather_sequence(qkv, ctx), ctx.bounds, dropout_p, scale), ctx)
