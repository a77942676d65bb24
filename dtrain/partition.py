"""Flat parameter units: the partitioner every layout (ddp, ZeRO 1/2/3) is built on.

A :class:`FlatUnit` lays a set of trainable parameters back to back in one flat buffer (ordered by
optimizer param group, then registration order) padded to a multiple of ``pad_to``. Shards are
computed for *any* number of parts (``shard_range(parts, index)``), so the group size, and with
it the topology level, can be chosen per state kind: a hierarchical layout may keep the
parameter shard at the node level while gradients and optimizer state are split globally.

Units are formed by :func:`bucket_units` (size-capped buckets in reverse registration order, for
overlapped gradient reduction) or :func:`module_units` (one unit per wrapped module, for ZeRO-3
gathering). The ``owner`` of a parameter shared by two modules (tied weights) is their common
ancestor, so the unit that gathers it is alive whenever either module runs.

The public descriptors (:class:`UnitSpec`, :class:`Shard`, :class:`Piece`) say where each kind of
state of each unit lives on a rank without exposing a layout's storage objects; checkpoints,
snapshots and plugins read state only through them (``LayoutPlugin.shards``; docs/layouts.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Slot:
    """One parameter's place in its unit's flat buffer."""

    name: str
    param: nn.Parameter
    offset: int
    group: int  # optimizer param-group index

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> torch.Size:
        return self.param.shape


Tier = Literal["device", "host", "nvme"]


@dataclass(frozen=True)
class SlotSpec:
    """A parameter's place in its unit's flat space: ``[offset, offset + numel)``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    group: int  # optimizer param-group index

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class UnitSpec:
    """A unit's flat space: its parameters back to back, padded to ``padded`` elements."""

    index: int
    name: str
    padded: int
    slots: tuple[SlotSpec, ...]

    def shard_range(self, parts: int, index: int) -> tuple[int, int]:
        """Elements [lo, hi) of part ``index`` when the unit is split evenly into ``parts``."""
        if self.padded % parts:
            raise ValueError(f"unit {self.name}: {parts} parts do not divide padded size {self.padded}")
        size = self.padded // parts
        return index * size, (index + 1) * size


@dataclass(frozen=True)
class Piece:
    """A tensor holding elements [lo, hi) of a unit's flat space (``tensor.numel() == hi - lo``).

    For the optimizer's pieces (``LayoutPlugin.optimizer_pieces``) ``tensor`` is the optimizer's
    parameter object itself (its key in ``optimizer.state``), flat or shaped like the parameter."""

    lo: int
    hi: int
    tensor: torch.Tensor
    group: int | None = None  # optimizer param group, for master and optimizer pieces

    def flat(self) -> torch.Tensor:
        return self.tensor.detach().reshape(-1)


@dataclass(frozen=True)
class Shard:
    """Where one kind of state of one unit lives on this rank.

    ``kind`` is ``param`` (the working parameters), ``grad``, ``master`` (the fp32 values the
    optimizer updates) or ``optim.<key>`` (an element-wise optimizer state, e.g. ``optim.exp_avg``).
    The kind is split evenly into ``parts`` over the ranks of this rank's group at ``level``
    (``rank``: not split, every rank holds all of it); this rank holds part ``index``, elements
    ``[lo, hi)``, in ``pieces`` (gaps between pieces are padding). ``primary``: this rank is the
    first holder of its part (the one a checkpoint stores it from).
    """

    unit: UnitSpec
    kind: str
    level: str
    parts: int
    index: int
    lo: int
    hi: int
    pieces: tuple[Piece, ...]
    tier: Tier = "device"
    primary: bool = True

    def view(self) -> torch.Tensor:
        """The whole range [lo, hi) as one flat tensor sharing storage with the state."""
        if len(self.pieces) == 1 and (self.pieces[0].lo, self.pieces[0].hi) == (self.lo, self.hi):
            return self.pieces[0].flat()
        raise ValueError(f"{self.kind} of unit {self.unit.name} is held in {len(self.pieces)} pieces, "
                         f"not one tensor; read its pieces")

    @property
    def nbytes(self) -> int:
        return sum(p.tensor.numel() * p.tensor.element_size() for p in self.pieces)


@dataclass(eq=False)  # identity semantics: units are dict keys
class FlatUnit:
    """A flat, paddable view of a set of parameters. Storage is attached by the layout."""

    index: int
    name: str
    slots: list[Slot]
    pad_to: int
    module: nn.Module | None = None
    full: torch.Tensor | None = field(default=None, repr=False)
    shard: torch.Tensor | None = field(default=None, repr=False)
    grad_full: torch.Tensor | None = field(default=None, repr=False)
    grad_shard: torch.Tensor | None = field(default=None, repr=False)
    whole: bool = False
    """The layout's part of this unit is the whole unit and ``full`` is that part itself (one holder
    of the parameters, e.g. ZeRO-3 at world 1): nothing to gather, nothing to release."""

    def __post_init__(self) -> None:
        self.slot_of = {id(s.param): s for s in self.slots}

    @cached_property
    def numel(self) -> int:  # a unit's parameters are fixed when it is built
        return sum(s.numel for s in self.slots)

    @property
    def padded(self) -> int:
        return -(-self.numel // self.pad_to) * self.pad_to

    @cached_property
    def spec(self) -> UnitSpec:
        return UnitSpec(self.index, self.name, self.padded,
                        tuple(SlotSpec(s.name, tuple(s.shape), s.offset, s.group) for s in self.slots))

    def shard_range(self, parts: int, index: int) -> tuple[int, int]:
        return self.spec.shard_range(parts, index)

    def group_ranges(self) -> list[tuple[int, int, int]]:
        """(group, lo, hi) flat ranges of each optimizer param group present in the unit."""
        out: list[tuple[int, int, int]] = []
        for s in self.slots:
            if out and out[-1][0] == s.group:
                out[-1] = (s.group, out[-1][1], s.offset + s.numel)
            else:
                out.append((s.group, s.offset, s.offset + s.numel))
        return out

    def flatten_params(self, device: torch.device) -> torch.Tensor:
        """A new padded fp32 flat tensor holding the current parameter values."""
        flat = torch.zeros(self.padded, dtype=torch.float32, device=device)
        for s in self.slots:
            flat[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))
        return flat

    def bind(self, full: torch.Tensor) -> None:
        """Make every parameter a view of ``full`` (same storage; released/restored in place)."""
        self.full = full
        for s in self.slots:
            s.param.data = full[s.offset:s.offset + s.numel].view(s.shape)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[s.offset:s.offset + s.numel].view(s.shape) for s in self.slots]

    # ZeRO-3: the full buffer's storage is freed after use and re-materialised before the next
    # use. Parameters (and tensors autograd saved from them) keep pointing at the same storage.
    def release(self) -> None:
        assert self.full is not None
        if not self.whole:
            self.full.untyped_storage().resize_(0)

    def materialize(self) -> None:
        assert self.full is not None
        storage = self.full.untyped_storage()
        nbytes = self.padded * self.full.element_size()
        if storage.nbytes() != nbytes:
            storage.resize_(nbytes)

    @property
    def materialized(self) -> bool:
        return self.full is not None and self.full.untyped_storage().nbytes() > 0


def trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_group_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(param) -> index of its optimizer param group."""
    return {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}


def _ordered_slots(named: list[tuple[str, nn.Parameter]], groups: dict[int, int]) -> list[Slot]:
    named = sorted(named, key=lambda np_: groups[id(np_[1])])  # stable: keeps registration order
    slots, offset = [], 0
    for name, p in named:
        slots.append(Slot(name, p, offset, groups[id(p)]))
        offset += p.numel()
    return slots


def bucket_units(model: nn.Module, groups: dict[int, int], bucket_bytes: int, pad_to: int) -> list[FlatUnit]:
    """Size-capped buckets in reverse registration order (the order gradients usually arrive)."""
    buckets: list[list[tuple[str, nn.Parameter]]] = [[]]
    size = 0
    for name, p in reversed(trainable_params(model)):
        nbytes = p.numel() * 4
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, p))
        size += nbytes
    return [FlatUnit(i, f"bucket{i}", _ordered_slots(b, groups), pad_to)
            for i, b in enumerate(buckets) if b]


def module_units(model: nn.Module, groups: dict[int, int], unit_classes: list[str], pad_to: int) -> list[FlatUnit]:
    """One unit per wrapped module plus the root for the rest; tied params go to the common owner."""
    wrapped: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if module is model or any(name.startswith(w + ".") for w, _ in wrapped):
            continue
        if unit_classes:
            chosen = type(module).__name__ in unit_classes
        else:
            parent_name = name.rpartition(".")[0]
            chosen = isinstance(model.get_submodule(parent_name), nn.ModuleList)
        if chosen:
            wrapped.append((name, module))
    prefixes = [w for w, _ in wrapped]

    # A parameter belongs to the deepest wrapped module that contains *every* use of it.
    users: dict[int, set[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            users.setdefault(id(p), set()).add(mod_name)

    def owner(p: nn.Parameter) -> str:
        owners = {next((w for w in prefixes if u == w or u.startswith(w + ".")), "") for u in users[id(p)]}
        return owners.pop() if len(owners) == 1 else ""

    per_owner: dict[str, list[tuple[str, nn.Parameter]]] = {w: [] for w in ["", *prefixes]}
    for name, p in trainable_params(model):
        per_owner[owner(p)].append((name, p))
    modules = {"": model, **dict(wrapped)}
    units = []
    for w in [*prefixes, ""]:
        if per_owner[w]:
            units.append(FlatUnit(len(units), w or "<root>", _ordered_slots(per_owner[w], groups),
                                  pad_to, modules[w]))
    return units
