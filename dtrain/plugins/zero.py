"""Layouts ``ddp`` and ``zero`` (stages 1/2/3, Rajbhandari et al.), one mechanism with three switches.

:class:`FlatLayout` keeps every trainable parameter in a :class:`~dtrain.partition.FlatUnit` and
decides, per state kind, whether this rank holds all of it or a 1/N shard:

=========  ================  =====================================  ===================
stage      optimizer state   gradients                              parameters
=========  ================  =====================================  ===================
0 (ddp)    full (any optim)  full, all-reduced per bucket           full
1          shard             full, all-reduced per bucket           full, all-gathered
2          shard             shard: reduce-scattered per bucket     full, all-gathered
3          shard             shard: reduce-scattered per unit       shard, gathered per
                                                                    module on demand
=========  ================  =====================================  ===================

Gradient reduction overlaps backward: a post-accumulate-grad hook counts the parameters of each
unit and launches the unit's asynchronous collective as soon as its last gradient lands (at most
``MAX_INFLIGHT`` transient buckets alive at once). Gradients are pre-divided by the data-parallel
size, so the reduction is a mean. With gradient accumulation, stages 0/1 accumulate locally and
reduce on the last micro-batch; stages 2/3 reduce every micro-batch into the shard (which is what
keeps their gradient memory at 1/N).

Stage 3 gathers a unit's parameters (all-gather into a buffer whose storage is freed after use and
re-grown before the next use) in a forward pre-hook, prefetches the next unit in recorded forward
order, frees after forward, re-gathers when the gradient reaches the unit's outputs, prefetches
the previous unit, and frees again once all of the unit's gradients have been accumulated. A
module called twice in one forward is simply gathered twice; its parameters' gradients are
accumulated by autograd before the post-accumulate hook fires, so reduction happens once.

The optimizer runs on views of the fp32 shard, one view per optimizer param group present in the
shard, so param groups (e.g. no weight decay on biases) survive flattening. ZeRO needs an
element-wise optimizer (Adam, AdamW, SGD, ...); shape-aware optimizers need ``ddp``. The
optimizer factory gets the trainable parameters, or ``(name, parameter)`` pairs when its first
parameter is called ``named``, ``named_params`` or ``named_parameters`` (:func:`call_factory`).

Buffers (BatchNorm running statistics) start as rank 0's and, after every optimizer step, follow
``zero.sync_buffers`` over the layout's data-parallel group: ``"rank0"`` (default, what DDP users
expect) broadcasts rank 0's persistent buffers, so between steps every rank holds rank 0's (DDP
broadcasts before each forward instead: the values at every forward of the next step are the same,
and eval steps and checkpoints see identical buffers on every rank); ``"mean"`` all-reduces the
floating-point ones to their mean and broadcasts the others (``num_batches_tracked``) from rank 0;
``"none"`` leaves each rank its own (a checkpoint then keeps rank 0's). Non-persistent buffers
(masks, rotary tables) are derived, not trained, and are left alone. ``nn.SyncBatchNorm`` on a
non-CUDA device (torch's refuses CPU input) runs :mod:`dtrain.sync_batchnorm` over the same group.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from dtrain.checkpoint import _persistent_buffers
from dtrain.comm import Handle
from dtrain.partition import (FlatUnit, Piece, Shard, UnitSpec, bucket_units, module_units, param_group_index,
                              trainable_params)
from dtrain.plugins.base import LayoutPlugin, OptimizerFactory, register
from dtrain.sync_batchnorm import use_comm_sync_batchnorm

MAX_INFLIGHT = 2


@dataclass(frozen=True)
class OptView:
    """An optimizer parameter: flat range [lo, hi) of ``unit`` that this rank owns, in group ``group``."""

    unit: FlatUnit
    group: int
    lo: int
    hi: int
    tensor: torch.Tensor

    def shard_slice(self, shard_lo: int) -> slice:
        return slice(self.lo - shard_lo, self.hi - shard_lo)


class FlatLayout(LayoutPlugin):
    shard_optim: ClassVar[bool] = False
    shard_grads: ClassVar[bool] = False
    shard_params: ClassVar[bool] = False
    level: str = "global"  # the data-parallel group the states are sharded over
    unit_reduced: Callable[[UnitSpec], None] | None = None  # on_unit_reduced's callback
    last_micro: bool = True

    def wrap_model(self, model: nn.Module, factory: OptimizerFactory) -> None:
        engine = self.engine
        self.comm, self.device, self.model = engine.comm, engine.device, model
        self.parts = self.comm.size(self.level)
        self.index = self.comm.group_ranks(self.level).index(self.comm.rank)
        named = trainable_params(model)
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to train")
        probe = call_factory(factory, named)
        groups = param_group_index(probe)
        missing = [n for n, p in named if id(p) not in groups]
        if missing:
            raise ValueError(f"the optimizer factory left out trainable parameter {missing[0]!r}; "
                             f"pass every trainable parameter (or freeze it with requires_grad_(False))")
        zcfg = engine.config.zero
        pad_to = self.comm.topology.shape.world_size
        if self.shard_params:
            self.units = module_units(model, groups, zcfg.unit_classes, pad_to)
        else:
            self.units = bucket_units(model, groups, int(zcfg.bucket_mb * 2**20), pad_to)
        self.unit_of = {id(s.param): u for u in self.units for s in u.slots}
        self._sync_buffers(model)
        self._buffers_mode = zcfg.sync_buffers
        self._step_buffers = [b for _, b in _persistent_buffers(model)]
        if self.device.type != "cuda":
            use_comm_sync_batchnorm(model, self.comm, self.level)
        for unit in self.units:
            self._lay_out(unit)
        self.optimizer = probe if not self.shard_optim else self._shard_optimizer(probe)
        if self.allocate_grads:
            for _, p in named:
                p.register_post_accumulate_grad_hook(self._on_grad)
        self.ready = {u.index: 0 for u in self.units}
        self.reduced: set[int] = set()
        self.inflight: list[tuple[FlatUnit, Handle, torch.Tensor | None]] = []
        self.reduce_now = True
        if self.shard_params:
            self._install_gather_hooks()

    # ---------------------------------------------------------------- layout
    def _sync_buffers(self, model: nn.Module) -> None:
        src = self.comm.group_ranks("global")[0]
        for b in model.buffers():
            self.comm.broadcast(b, src)
        for p in model.parameters():
            if not p.requires_grad:
                self.comm.broadcast(p.data, src)

    def _sync_step_buffers(self) -> None:
        """``zero.sync_buffers`` after an optimizer step (see the module docstring)."""
        if self._buffers_mode == "none" or self.parts == 1 or not self._step_buffers:
            return
        src = self.comm.group_ranks(self.level)[0]
        mean = self._buffers_mode == "mean"
        for dtype in dict.fromkeys(b.dtype for b in self._step_buffers):  # same order on every rank
            same = [b for b in self._step_buffers if b.dtype == dtype]
            flat = torch.cat([b.detach().reshape(-1) for b in same])
            if mean and dtype.is_floating_point:
                self.comm.all_reduce(flat, self.level)
                flat.div_(self.parts)
            else:
                self.comm.broadcast(flat, src, self.level)
            with torch.no_grad():
                for b, part in zip(same, flat.split([b.numel() for b in same])):
                    b.copy_(part.view_as(b))

    def _lay_out(self, unit: FlatUnit) -> None:
        full = unit.flatten_params(self.device)
        self.comm.broadcast(full, self.comm.group_ranks("global")[0])  # identical start on every rank
        unit.bind(full)
        lo, hi = unit.shard_range(self.parts, self.index)
        unit.shard = full[lo:hi].clone() if self.shard_optim else None
        if self.shard_params:
            unit.release()
        if not self.allocate_grads:  # a forward-only step strategy: no gradient is ever computed
            unit.grad_full, unit.grad_shard = None, None
        elif self.shard_grads:
            unit.grad_full, unit.grad_shard = None, torch.zeros(hi - lo, device=self.device)
        else:
            unit.grad_full, unit.grad_shard = torch.zeros(unit.padded, device=self.device), None
            for s, view in zip(unit.slots, unit.views(unit.grad_full)):
                s.param.grad = view

    def _shard_optimizer(self, probe: torch.optim.Optimizer) -> torch.optim.Optimizer:
        per_group: list[list[torch.Tensor]] = [[] for _ in probe.param_groups]
        self.opt_views: list[OptView] = []
        for unit in self.units:
            lo, hi = unit.shard_range(self.parts, self.index)
            if not self.allocate_grads:
                grad = None
            else:
                grad = unit.grad_shard if self.shard_grads else unit.grad_full[lo:hi]
            for g, a, b in unit.group_ranges():
                a, b = max(a, lo), min(b, hi)
                if a < b:
                    view = unit.shard[a - lo:b - lo]
                    view.grad = None if grad is None else grad[a - lo:b - lo]
                    per_group[g].append(view)
                    self.opt_views.append(OptView(unit, g, a, b, view))
        for ps in per_group:  # a rank whose shard misses a group still needs a valid group
            if not ps:
                empty = torch.zeros(0, device=self.device)
                empty.grad = torch.zeros(0, device=self.device)
                ps.append(empty)
        # Every param-group dict carries all hyperparameters, so the groups alone rebuild it.
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps}
                  for g, ps in zip(probe.param_groups, per_group)]
        try:
            optimizer = type(probe)(groups)
        except TypeError as exc:
            raise ValueError(f"ZeRO rebuilds the optimizer on parameter shards, but "
                             f"{type(probe).__name__}(param_groups) failed: {exc}") from exc
        optimizer.defaults = dict(probe.defaults)
        return optimizer

    # ----------------------------------------------------- gradient reduction
    def start_micro_step(self, micro_step: int, last_micro_step: bool) -> None:
        self.reduce_now = self.shard_grads or last_micro_step
        self.last_micro = last_micro_step

    def on_unit_reduced(self, callback: Callable[[UnitSpec], None] | None) -> bool:
        """Call ``callback(unit)`` when a unit's last-micro-step reduction completes (waiting for
        reductions in order, at most ``MAX_INFLIGHT`` in flight, as stage 2/3 always do)."""
        self.unit_reduced = callback
        return True

    def _on_grad(self, p: torch.Tensor) -> None:
        unit = self.unit_of[id(p)]
        if self.shard_grads:
            if unit.grad_full is None:
                unit.grad_full = torch.zeros(unit.padded, device=self.device)
            slot = unit.slot_of[id(p)]
            unit.grad_full[slot.offset:slot.offset + slot.numel].copy_(p.grad.reshape(-1))
            p.grad = None
        self.ready[unit.index] += 1
        if self.ready[unit.index] == len(unit.slots) and self.reduce_now:
            self._reduce(unit)

    def _reduce(self, unit: FlatUnit) -> None:
        self.reduced.add(unit.index)
        if self.shard_params:
            unit.release()
        buf = unit.grad_full
        if buf is None:  # no parameter of this unit received a gradient
            buf = torch.zeros(unit.padded, device=self.device)
        buf.div_(self.parts)
        if self.shard_grads:
            out = torch.empty_like(unit.grad_shard)
            handle = self.comm.reduce_scatter(out, buf, self.level, async_op=True)
            unit.grad_full = None
        else:
            out = None
            handle = self.comm.all_reduce(buf, self.level, async_op=True)
        self.inflight.append((unit, handle, out))
        if self.shard_grads or self.unit_reduced is not None:
            while len(self.inflight) > MAX_INFLIGHT:
                self._complete(*self.inflight.pop(0))

    def _complete(self, unit: FlatUnit, handle: Handle, out: torch.Tensor | None) -> None:
        handle.wait()
        if out is not None:
            unit.grad_shard.add_(out)
        if self.unit_reduced is not None and self.last_micro:
            self.unit_reduced(unit.spec)

    def finish_backward(self) -> None:
        if self.reduce_now:
            for unit in self.units:
                if unit.index not in self.reduced:
                    self._reduce(unit)
        while self.inflight:
            self._complete(*self.inflight.pop(0))
        if self.shard_params:  # nothing gathered may outlive the step: the shards are about to change
            while self.pending:
                self.pending.popitem()[1].wait()
            for unit in self.units:
                if unit.materialized:
                    unit.release()
        self.ready = {u.index: 0 for u in self.units}
        self.reduced.clear()

    # ------------------------------------------------------------- optimizer
    def _grad_tensors(self) -> list[torch.Tensor]:
        """The reduced gradient this rank is responsible for (padding is zero)."""
        if not self.allocate_grads:
            raise RuntimeError("this layout holds no gradients: the step strategy set allocate_grads = False")
        if self.shard_grads:
            return [u.grad_shard for u in self.units]
        if self.shard_optim:
            return [u.grad_full[slice(*u.shard_range(self.parts, self.index))] for u in self.units]
        return [u.grad_full for u in self.units]

    def grad_norm_sq(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in self._grad_tensors():
            total += g.double().pow(2).sum()
        if self.shard_optim:
            self.comm.all_reduce(total, self.level)
        return total

    def scale_grads(self, factor: float) -> None:
        for g in self._grad_tensors():
            g.mul_(factor)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.publish()

    def publish(self) -> None:
        if self.shard_optim and not self.shard_params:
            handles = [self.comm.all_gather(u.full, u.shard, self.level, async_op=True) for u in self.units]
            for h in handles:
                h.wait()
        self._sync_step_buffers()

    def zero_grad(self) -> None:
        if not self.allocate_grads:
            return
        for u in self.units:
            (u.grad_shard if self.shard_grads else u.grad_full).zero_()

    # ------------------------------------------------------------ descriptors
    def unit_specs(self) -> list[UnitSpec]:
        return [u.spec for u in self.units]

    def placement(self, kind: str) -> tuple[str, int, int]:
        sharded = {"param": self.shard_params, "grad": self.shard_grads}.get(kind, self.shard_optim)
        return (self.level, self.parts, self.index) if sharded else ("rank", 1, 0)

    def optimizer_pieces(self) -> list[tuple[UnitSpec, Piece]]:
        if self.shard_optim:
            return [(v.unit.spec, Piece(v.lo, v.hi, v.tensor, v.group)) for v in self.opt_views]
        return [(u.spec, Piece(s.offset, s.offset + s.numel, s.param, s.group)) for u in self.units for s in u.slots]

    def shards(self, kind: str) -> list[Shard]:
        if kind.startswith("optim."):
            return self.optim_shards(kind[len("optim."):])
        if kind not in ("param", "grad", "master"):
            raise ValueError(f"unknown kind of state {kind!r}; use param, grad, master or optim.<key>")
        level, parts, index = self.placement(kind)
        primary = self.comm.rank == 0 if level == "rank" else 0 in self.comm.group_ranks(level)
        out = []
        for unit in self.units:
            lo, hi = unit.shard_range(parts, index)
            if kind == "grad":
                tensor = unit.grad_shard if self.shard_grads else unit.grad_full
            elif kind == "param":
                tensor = unit.shard if self.shard_params else unit.full
            else:
                tensor = unit.shard if self.shard_optim else unit.full
            pieces = (Piece(lo, hi, tensor),) if tensor is not None else ()
            out.append(Shard(unit.spec, kind, level, parts, index, lo, hi, pieces, primary=primary))
        return out

    # ------------------------------------------------------------- reporting
    def state_bytes(self) -> dict[str, int]:
        shard = sum(u.shard.numel() for u in self.units) * 4 if self.shard_optim else 0
        full = sum(u.padded for u in self.units) * 4
        frozen = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.requires_grad)
        params = frozen + shard + (0 if self.shard_params else full)
        grads = 0 if not self.allocate_grads else shard if self.shard_grads else full
        optim = sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                    for t in st.values() if torch.is_tensor(t))
        return {"params": params, "grads": grads, "optim": optim}

    def full_parameters(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for unit in self.units:
            gathered_here = self.shard_params and not unit.materialized
            if gathered_here:
                unit.materialize()
                self.comm.all_gather(unit.full, unit.shard, self.level)
            for s in unit.slots:
                out[s.name] = s.param.detach().to("cpu", torch.float32, copy=True)
            if gathered_here:
                unit.release()
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                out[name] = p.detach().to("cpu", torch.float32, copy=True)
        return out

    # ------------------------------------------------------- stage-3 gathering
    def _install_gather_hooks(self) -> None:
        self.pending: dict[FlatUnit, Handle] = {}
        self.order: list[FlatUnit] = []
        for unit in self.units:
            unit.module.register_forward_pre_hook(lambda m, a, u=unit: self._pre_forward(u))
            unit.module.register_forward_hook(lambda m, a, out, u=unit: self._post_forward(u, out))

    def _gather(self, unit: FlatUnit, async_op: bool = False) -> None:
        if unit in self.pending:
            handle = self.pending.pop(unit)
            if not async_op:
                handle.wait()
            else:
                self.pending[unit] = handle
            return
        if unit.materialized:
            return
        unit.materialize()
        handle = self.comm.all_gather(unit.full, unit.shard, self.level, async_op=True)
        if async_op:
            self.pending[unit] = handle
        else:
            handle.wait()

    def _neighbour(self, unit: FlatUnit, step: int) -> FlatUnit | None:
        if unit not in self.order:
            return None
        i = self.order.index(unit) + step
        return self.order[i] if 0 <= i < len(self.order) else None

    def _pre_forward(self, unit: FlatUnit) -> None:
        if unit not in self.order:
            self.order.append(unit)
        self._gather(unit)
        nxt = self._neighbour(unit, +1)
        if self.engine.config.zero.prefetch and nxt is not None:
            self._gather(nxt, async_op=True)

    def _post_forward(self, unit: FlatUnit, output: Any) -> None:
        if torch.is_grad_enabled():
            for t in tree_flatten(output)[0]:
                if torch.is_tensor(t) and t.requires_grad:
                    t.register_hook(lambda grad, u=unit: self._pre_backward(u))
        keep = torch.is_grad_enabled() and unit.module is self.model  # backward starts at the root
        if not keep and unit not in self.pending:
            unit.release()

    def _pre_backward(self, unit: FlatUnit) -> None:
        if unit.index in self.reduced:
            return
        self._gather(unit)
        prev = self._neighbour(unit, -1)
        if self.engine.config.zero.prefetch and prev is not None and prev.index not in self.reduced:
            self._gather(prev, async_op=True)


@register
class DDPPlugin(FlatLayout):
    """Plain data parallelism: full replicas, bucketed all-reduce overlapped with backward."""

    name = "ddp"


@register
class Zero1Plugin(FlatLayout):
    name = "zero1"
    shard_optim = True


@register
class Zero2Plugin(FlatLayout):
    name = "zero2"
    shard_optim = shard_grads = True


@register
class Zero3Plugin(FlatLayout):
    name = "zero3"
    shard_optim = shard_grads = shard_params = True


NAMED_FACTORY_ARGS = ("named", "named_params", "named_parameters")


def call_factory(factory: OptimizerFactory | Callable[[list[tuple[str, torch.Tensor]]], torch.optim.Optimizer],
                 named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """Build the optimizer: ``factory(named)`` with ``(name, parameter)`` pairs when the factory's
    first parameter is called one of :data:`NAMED_FACTORY_ARGS`, else ``factory(parameters)``."""
    try:
        first = next(iter(inspect.signature(factory).parameters), None)
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        first = None
    return factory(list(named) if first in NAMED_FACTORY_ARGS else [p for _, p in named])


def layout_name(stage: int) -> str:
    return "ddp" if stage == 0 else f"zero{stage}"
