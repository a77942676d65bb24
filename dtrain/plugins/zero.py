"""Layouts ``ddp`` and ``zero`` (stages 1/2/3, Rajbhandari et al.), one mechanism with per-kind levels.

:class:`FlatLayout` keeps every trainable parameter in a :class:`~dtrain.partition.FlatUnit` and
puts each kind of state (params, grads, optim, backward_params) at its own topology level
(docs/hierarchical.md; ``zero.params`` ... ``zero.preset``, resolved by dtrain/hierarchy.py): a rank
holds its part of the kind over that level's block, parts nest across the levels in use, and
every collective runs one level step at a time through ``Comm``. ``zero.stage`` is the shorthand
(the stage's kinds at the data-parallel level, the rest unsplit):

=========  ================  =====================================  ===================
stage      optimizer state   gradients                              parameters
=========  ================  =====================================  ===================
0 (ddp)    full (any optim)  full, all-reduced per bucket           full
1          shard             full, reduce-scattered per bucket      full, all-gathered
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

The optimizer runs on views of the fp32 parameters it owns (ZeRO-1/2: of the full parameters;
ZeRO-3: of the parameter part; no separate master copy), one view per optimizer param group present
in the part, so param groups (e.g. no weight decay on biases) survive flattening. ZeRO needs an
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
from types import SimpleNamespace
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from dtrain.checkpoint import _persistent_buffers
from dtrain.comm import Handle
from dtrain.hierarchy import INT8_BLOCK, KINDS, chain_index, resolve_levels
from dtrain.hostmem import default_policy, keep_freed_memory
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


class Chain:
    """Dependent collectives run one after another: the first starts now (after any local steps
    before it), the rest on :meth:`advance` or :meth:`wait`.

    Each step is a callable issuing one asynchronous collective (or doing local work) and returning
    its handle (or None); a step may read what the previous ones produced."""

    def __init__(self, steps: list[Callable[[], Handle | None]]) -> None:
        self.steps = list(steps)
        self.handle = None
        while self.steps and self.handle is None:  # local steps up to the first collective
            self.handle = self.steps.pop(0)()

    def done(self) -> bool:
        """Every step has run and the last collective has completed (never starts a collective: a
        rank must not start one because its own transfer happened to finish first)."""
        if self.steps:
            return False
        if self.handle is not None and self.handle.completed():
            self.handle.wait()  # completed: returns at once, running the handle's local ``then``
            self.handle = None
        return self.handle is None

    def advance(self) -> None:
        """Wait for the step in flight and start the next collective one (local steps run on the
        way). Called at points every rank reaches in the same order, so the collectives of all
        chains reach each group in the same order on every rank."""
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        while self.steps and self.handle is None:
            self.handle = self.steps.pop(0)()

    def wait(self) -> None:
        while self.handle is not None or self.steps:
            self.advance()


class StaleCopyError(RuntimeError):
    """The backward would read a secondary parameter copy older than the parameters (ZeRO++ #5059)."""


class FlatLayout(LayoutPlugin):
    shard_optim: ClassVar[bool] = False
    shard_grads: ClassVar[bool] = False
    shard_params: ClassVar[bool] = False
    level: str = "global"  # the data-parallel group the states are sharded over
    unit_reduced: Callable[[UnitSpec], None] | None = None  # on_unit_reduced's callback
    param_tier: Any = None  # place_params' tier: the parameter parts rest there between uses
    last_micro: bool = True

    @classmethod
    def stage(cls) -> int:
        return 3 if cls.shard_params else 2 if cls.shard_grads else 1 if cls.shard_optim else 0

    def setup(self, engine: Any) -> None:
        super().setup(engine)
        keep_mb = engine.config.zero.malloc_keep_mb
        if keep_mb > 0 and engine.device.type == "cpu":  # the default; a plugin may claim another
            default_policy(lambda: keep_freed_memory(int(keep_mb * 2**20)))

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
        self._resolve_levels(zcfg)
        pad_to = self.comm.topology.shape.world_size
        if self.split_params:
            self.units = module_units(model, groups, zcfg.unit_classes, pad_to)
        else:
            self.units = bucket_units(model, groups, int(zcfg.bucket_mb * 2**20), pad_to)
        self.unit_of = {id(s.param): u for u in self.units for s in u.slots}
        self._sync_buffers(model)
        self._buffers_mode = zcfg.sync_buffers
        self._step_buffers = [b for _, b in _persistent_buffers(model)]
        if self.device.type != "cuda":
            use_comm_sync_batchnorm(model, self.comm, self.level)
        self.master: dict[int, torch.Tensor] = {}
        self.master_grad: dict[int, torch.Tensor | None] = {}
        self.grad_released: set[int] = set()  # units whose gradient storage release_grad freed
        self.secondary: dict[int, torch.Tensor] = {}
        self.version = 0  # publishes of the parameters so far
        self.secondary_version: dict[int, int] = {}
        for unit in self.units:
            self._lay_out(unit)
        self.optimizer = probe if not self.split_optim else self._shard_optimizer(probe)
        if self.allocate_grads:
            for _, p in named:
                p.register_post_accumulate_grad_hook(self._on_grad)
        self.ready = {u.index: 0 for u in self.units}
        self.filled: dict[int, set[int]] = {}  # split grads: offsets of the slots written into grad_full
        self.reduced: set[int] = set()
        self.inflight: list[tuple[FlatUnit, Chain]] = []
        self.reduce_now = True
        self.last_micro = True
        if self.split_params:
            self._install_gather_hooks()

    # ---------------------------------------------------------------- levels
    def _resolve_levels(self, zcfg: Any) -> None:
        """Each kind's level (dtrain/hierarchy.py) and this rank's part of it at every size in use."""
        shape = self.comm.topology.shape
        section = SimpleNamespace(**{k: getattr(zcfg, k, None) for k in ("preset", *KINDS)}, stage=self.stage())
        auto = None
        if section.preset == "auto":
            from dtrain.planner.layout import choose_levels

            auto = choose_levels(self, shape)
        self.levels = resolve_levels(section, shape, self.level, auto)
        lv = self.levels
        self.s_p, self.s_g, self.s_o, self.s_b, self.s_d = (lv.size(k) for k in (*KINDS, "dp"))
        alone = self.s_d == 1  # world 1 (or a co2 worker): keep the stage's structure, parts of one
        self.split_params = self.s_p > 1 or (alone and self.shard_params)
        self.split_grads = self.s_g > 1 or (alone and self.shard_grads)
        self.split_optim = self.s_o > 1 or (alone and self.shard_optim)
        # one holder of the whole gradient (world 1): autograd's gradients are added into it at once,
        # with no per-unit staging buffer to reduce from
        self.direct_grads = self.split_grads and self.s_g == 1 and self.s_d == 1
        self.chain = lv.chain()
        self.name_of = {1: "rank", self.s_d: self.level}
        for kind in KINDS:
            self.name_of.setdefault(lv.size(kind), getattr(lv, kind))
        self.part = {s: chain_index(shape.rank, s, self.chain) for s in self.chain}
        dtype = getattr(zcfg, "gather_dtype", "auto")
        if dtype == "auto":
            dtype = "bf16" if engine_precision(self.engine) == "bf16" else "fp32"
        self.gather_dtype = dtype
        topo = self.comm.topology
        for small, big in self._steps(1, self.s_d):  # groups of the level steps (collective, same order)
            if small > 1 and big < shape.world_size:
                topo.build_peers_within(self.name_of[small], self.name_of[big])
        if 1 < self.s_o < self.s_d < shape.world_size:
            topo.build_peers_within(self.name_of[self.s_o], self.level)
        custom = any(getattr(zcfg, k, None) for k in ("preset", *KINDS))
        if custom and shape.rank == 0 and getattr(self.engine, "announce", True):
            print(f"dtrain: {lv.describe()}", flush=True)

    def _steps(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The level steps (small, big) between block sizes ``lo`` and ``hi``, smallest first."""
        used = [s for s in self.chain if lo <= s <= hi]
        if hi == self.s_d and self.s_d not in used and lo < hi:
            used.append(self.s_d)
        return list(zip(used, used[1:]))

    def _group(self, small: int, big: int) -> tuple[str, bool | str]:
        """Comm's (level, peers) for one level step: this rank's ``big`` block at its position in ``small``."""
        if small == 1:
            return self.name_of[big], False
        return self.name_of[small], self.name_of[big]

    def _rng(self, unit: FlatUnit, size: int) -> tuple[int, int]:
        """This rank's part [lo, hi) of ``unit`` at block size ``size`` (nested across sizes)."""
        return unit.shard_range(size, self.part.get(size, 0))

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
        p_lo, p_hi = self._rng(unit, self.s_p)
        o_lo, o_hi = self._rng(unit, self.s_o)
        # One holder of the whole unit (ZeRO-3 at world 1) gathers it in fp32 into the same values:
        # the part is the parameters' own buffer, not a second copy of the model
        unit.whole = self.split_params and self.s_p == 1 and self.gather_dtype == "fp32"
        unit.shard = (full if unit.whole else full[p_lo:p_hi].clone()) if self.split_params else None
        # The optimizer steps views of the parameters it owns: no separate fp32 copy.
        holder, base = (unit.shard, p_lo) if self.split_params else (full, 0)
        self.master[unit.index] = holder[o_lo - base:o_hi - base]
        if 1 < self.s_b < self.s_p and unit.module is not self.model:  # the root stays gathered for backward
            b_lo, b_hi = self._rng(unit, self.s_b)
            self.secondary[unit.index] = full[b_lo:b_hi].clone()
            self.secondary_version[unit.index] = self.version
        if self.split_params:
            unit.release()
        if not self.allocate_grads:  # a forward-only step strategy: no gradient is ever computed
            unit.grad_full, unit.grad_shard = None, None
            self.master_grad[unit.index] = None
        elif self.split_grads:
            g_lo, g_hi = self._rng(unit, self.s_g)
            unit.grad_full, unit.grad_shard = None, torch.zeros(g_hi - g_lo, device=self.device)
            self.master_grad[unit.index] = unit.grad_shard[o_lo - g_lo:o_hi - g_lo]
        else:
            unit.grad_full, unit.grad_shard = torch.zeros(unit.padded, device=self.device), None
            for s, view in zip(unit.slots, unit.views(unit.grad_full)):
                s.param.grad = view
            self.master_grad[unit.index] = unit.grad_full[o_lo:o_hi]

    def _shard_optimizer(self, probe: torch.optim.Optimizer) -> torch.optim.Optimizer:
        per_group: list[list[torch.Tensor]] = [[] for _ in probe.param_groups]
        self.opt_views: list[OptView] = []
        for unit in self.units:
            lo, hi = self._rng(unit, self.s_o)
            master, grad = self.master[unit.index], self.master_grad[unit.index]
            for g, a, b in unit.group_ranges():
                a, b = max(a, lo), min(b, hi)
                if a < b:
                    view = master[a - lo:b - lo]
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
        self.reduce_now = self.split_grads or last_micro_step
        self.last_micro = last_micro_step

    def on_unit_reduced(self, callback: Callable[[UnitSpec], None] | None) -> bool:
        """Call ``callback(unit)`` when a unit's last-micro-step reduction completes (waiting for
        reductions in order, at most ``MAX_INFLIGHT`` in flight, as split gradients always do)."""
        self.unit_reduced = callback
        return True

    def place_params(self, tier: Any) -> bool:
        """ZeRO-3 only, with the parameter part also the master (params and optim split alike) and
        no backward copy: the parts are read only by a gather's first step, ``full_parameters``
        and the optimizer's step (which the tier brings them in for)."""
        if not self.split_params or self.s_o != self.s_p or self.secondary:
            return False
        for unit in self.units:  # the tier frees the part between uses: the parameters need their own buffer
            if unit.whole:
                unit.whole = False
                unit.bind(unit.full.clone())
                unit.release()
        self.param_tier = tier
        return True

    def _gather_part(self, unit: FlatUnit, dtype: str) -> Chain:
        """All-gather the unit from its parameter part; a param tier brings the part in, a copy of it
        feeds the gather and the part is dropped at once (the chain's collectives read their input
        asynchronously, so they must not read the part itself once it is dropped)."""
        if self.param_tier is None:
            return self._gather_chain(unit, unit.shard, self.s_p, dtype)
        self.param_tier.fetch(unit.spec)
        try:
            if self.s_p == 1 and dtype == "fp32":  # one rank holds it all: the part is the unit, copy it in now
                unit.materialize()
                unit.full.copy_(unit.shard)
                return Chain([])
            source = unit.shard.clone()
        finally:
            self.param_tier.drop(unit.spec)
        return self._gather_chain(unit, source, self.s_p, dtype)

    def _on_grad(self, p: torch.Tensor) -> None:
        unit = self.unit_of[id(p)]
        if self.direct_grads:
            self._grad_back(unit)
            slot = unit.slot_of[id(p)]
            unit.grad_shard[slot.offset:slot.offset + slot.numel].add_(p.grad.reshape(-1))
            p.grad = None
        elif self.split_grads:
            if unit.grad_full is None:  # every slot is written below or zeroed in _reduce: only the tail here
                unit.grad_full = torch.empty(unit.padded, device=self.device)
                unit.grad_full[unit.numel:].zero_()
                self.filled[unit.index] = set()
            slot = unit.slot_of[id(p)]
            # pre-divided by the data-parallel size in the same pass as the copy (the reduction is a mean)
            torch.div(p.grad.reshape(-1), self.s_d, out=unit.grad_full[slot.offset:slot.offset + slot.numel])
            self.filled[unit.index].add(slot.offset)
            p.grad = None
        self.ready[unit.index] += 1
        if self.ready[unit.index] == len(unit.slots) and self.reduce_now:
            self._reduce(unit)

    def _reduce_steps(self, unit: FlatUnit, state: dict[str, torch.Tensor], lo: int, hi: int) -> list:
        """Reduce-scatter ``state["cur"]`` (this rank's part at size ``lo``) step by step up to ``hi``."""
        steps = []
        for small, big in self._steps(lo, hi):
            def step(small: int = small, big: int = big) -> Handle:
                cur = state["cur"]
                out = torch.empty(cur.numel() * small // big, device=self.device)
                state["cur"] = out
                level, peers = self._group(small, big)
                return self.comm.reduce_scatter(out, cur, level, peers=peers, async_op=True)
            steps.append(step)
        return steps

    def _finish_steps(self, unit: FlatUnit, state: dict[str, torch.Tensor], lo: int) -> list:
        """From this rank's part at size ``lo`` to its fully reduced master gradient."""
        steps = self._reduce_steps(unit, state, lo, self.s_o)
        if self.s_d > self.s_o:  # replicas of the optim part: all-reduce across them
            peers = False if self.s_o == 1 else self.level
            level = self.level if self.s_o == 1 else self.name_of[self.s_o]
            steps.append(lambda: self.comm.all_reduce(state["cur"], level, peers=peers, async_op=True))
        target = self.master_grad[unit.index]

        def store() -> None:
            if state["cur"].data_ptr() != target.data_ptr():
                target.copy_(state["cur"])
        steps.append(store)
        return steps

    def release_grad(self, spec: UnitSpec) -> bool:
        """Split gradients only: the unit's gradient part is this layout's alone (ddp and ZeRO-1
        hand views of the whole gradient to the parameters' ``.grad``, which autograd writes)."""
        if not self.split_grads or not self.allocate_grads:
            return False
        self.units[spec.index].grad_shard.untyped_storage().resize_(0)
        self.grad_released.add(spec.index)
        return True

    def _grad_back(self, unit: FlatUnit) -> None:
        """A released gradient part gets its storage back, zeroed (what ``zero_grad`` left it)."""
        if unit.index in self.grad_released:
            self.grad_released.discard(unit.index)
            grad = unit.grad_shard
            grad.untyped_storage().resize_(grad.numel() * grad.element_size())
            grad.zero_()

    def _reduce(self, unit: FlatUnit) -> None:
        self.reduced.add(unit.index)
        if self.split_grads:
            self._grad_back(unit)
        if self.split_params:
            unit.release()
        buf = unit.grad_full
        if self.direct_grads:  # already in the master gradient (_on_grad)
            buf = unit.grad_shard
        elif buf is None:  # no parameter of this unit received a gradient
            buf = torch.zeros(unit.padded, device=self.device)
        elif self.split_grads:  # already divided in _on_grad; zero the slots no gradient reached
            filled = self.filled.pop(unit.index)
            for s in unit.slots:
                if s.offset not in filled:
                    buf[s.offset:s.offset + s.numel].zero_()
        else:
            buf.div_(self.s_d)
        state = {"cur": buf}
        if self.direct_grads:
            steps = []
        elif self.split_grads:
            unit.grad_full = None
            steps = self._reduce_steps(unit, state, 1, self.s_g)
            steps.append(lambda: _local(unit.grad_shard.add_, state["cur"]))
            if self.last_micro and (self.s_o > self.s_g or self.s_d > self.s_o):
                after = {"cur": unit.grad_shard}
                steps.extend(self._finish_steps(unit, after, self.s_g))
        else:
            steps = self._finish_steps(unit, state, 1)
        # the chains reduced earlier move to their next level step now, one unit of backward after
        # they started: their later (cross-node) steps then overlap the backward instead of blocking
        # it when the chain is completed
        for _, earlier in self.inflight:
            earlier.advance()
        self.inflight.append((unit, Chain(steps)))
        if self.split_grads or self.unit_reduced is not None:
            while len(self.inflight) > MAX_INFLIGHT:
                self._complete(*self.inflight.pop(0))
        if self.unit_reduced is not None:  # report finished reductions now, not MAX_INFLIGHT units later
            while self.inflight and self.inflight[0][1].done():
                self._complete(*self.inflight.pop(0))

    def _complete(self, unit: FlatUnit, chain: Chain) -> None:
        chain.wait()
        if self.unit_reduced is not None and self.last_micro:
            self.unit_reduced(unit.spec)

    def finish_backward(self) -> None:
        if self.reduce_now:
            for unit in self.units:
                if unit.index not in self.reduced:
                    self._reduce(unit)
        while self.inflight:
            self._complete(*self.inflight.pop(0))
        if self.split_params:  # nothing gathered may outlive the step: the shards are about to change
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
        for unit in self.units:  # read between steps: released parts come back zeroed
            self._grad_back(unit)
        if self.split_optim:
            return [self.master_grad[u.index] for u in self.units]
        return [u.grad_full for u in self.units]

    def grad_norm_sq(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in self._grad_tensors():
            total += g.double().pow(2).sum()
        if self.split_optim and self.s_o > 1:
            self.comm.all_reduce(total, self.name_of[self.s_o])
        return total

    def scale_grads(self, factor: float) -> None:
        for g in self._grad_tensors():
            g.mul_(factor)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.publish()

    def publish(self) -> None:
        """All-gather the updated master parts level by level down to the parameters' level. The
        backward copies are now out of date: each is rebuilt by its unit's next forward gather."""
        self.version += 1
        if self.split_optim:
            for small, big in reversed(self._steps(self.s_p, self.s_o)):
                handles = []
                for unit in self.units:
                    holder, base = (unit.shard, self._rng(unit, self.s_p)[0]) if self.split_params else (unit.full, 0)
                    handles.append(self._gather_step(holder, base, unit, small, big))
                for h in handles:
                    h.wait()
        self._sync_step_buffers()

    def _gather_step(self, holder: torch.Tensor, base: int, unit: FlatUnit, small: int, big: int,
                     source: torch.Tensor | None = None) -> Handle:
        """One level step of an all-gather inside ``holder`` (unit elements from ``base``); its input
        is ``source`` when given (this rank's part at ``big``, held elsewhere), else that part of
        ``holder`` itself: the part sits at this rank's place in the step's output (parts nest), an
        in-place all-gather."""
        out_lo, out_hi = self._rng(unit, small)
        in_lo, in_hi = self._rng(unit, big)
        level, peers = self._group(small, big)
        if source is None:
            source = holder[in_lo - base:in_hi - base]
        return self.comm.all_gather(holder[out_lo - base:out_hi - base], source, level, peers=peers, async_op=True)

    def _refresh_backward_copy(self, unit: FlatUnit) -> None:
        """The last step of a forward gather (hpZ): keep this rank's part of the gathered unit at the
        backward level, with the parameter version it was gathered at. It runs only after every
        all-gather of the chain was waited for, so the copy never races the prefetch (ZeRO++ #5059)."""
        b_lo, b_hi = self._rng(unit, self.s_b)
        self.secondary[unit.index].copy_(unit.full[b_lo:b_hi])
        self.secondary_version[unit.index] = self.version

    def zero_grad(self) -> None:
        if not self.allocate_grads:
            return
        for u in self.units:
            if u.index not in self.grad_released:  # a released part comes back zeroed when first written
                (u.grad_shard if self.split_grads else u.grad_full).zero_()

    # ------------------------------------------------------------ descriptors
    def unit_specs(self) -> list[UnitSpec]:
        return [u.spec for u in self.units]

    def placement(self, kind: str) -> tuple[str, int, int]:
        if kind == "param":
            sharded, size, level = self.split_params, self.s_p, self.levels.params
        elif kind == "grad":
            sharded, size, level = self.split_grads, self.s_g, self.levels.grads
        else:
            sharded, size, level = self.split_optim, self.s_o, self.levels.optim
        return (level, size, self.part.get(size, 0)) if sharded else ("rank", 1, 0)

    def part_holders(self, kind: str) -> list[int]:
        level, parts, _ = self.placement(kind)
        if level == "rank":
            return [0]
        holders = [0] * parts
        for r in range(parts):  # rank 0's block: the ranks 0 .. parts-1
            holders[chain_index(r, parts, self.chain)] = r
        return holders

    def optimizer_pieces(self) -> list[tuple[UnitSpec, Piece]]:
        if self.split_optim:
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
                tensor = unit.grad_shard if self.split_grads else unit.grad_full
            elif kind == "param":
                tensor = unit.shard if self.split_params else unit.full
            else:
                tensor = self.master[unit.index] if self.split_optim else unit.full
            tier = "device"
            if self.param_tier is not None and kind != "grad":  # at rest in the tier's file
                tensor, tier = self.param_tier.home(unit.spec), self.param_tier.name
            pieces = (Piece(lo, hi, tensor),) if tensor is not None else ()
            out.append(Shard(unit.spec, kind, level, parts, index, lo, hi, pieces, tier=tier, primary=primary))
        return out

    # ------------------------------------------------------------- reporting
    def state_bytes(self) -> dict[str, int]:
        frozen = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.requires_grad)
        held = sum((u.shard if self.split_params else u.full).numel() for u in self.units)
        held += sum(t.numel() for t in self.secondary.values())
        params = frozen + 4 * held
        if not self.allocate_grads:
            grads = 0
        else:
            grads = 4 * sum((u.grad_shard if self.split_grads else u.grad_full).numel() for u in self.units)
        optim = sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                    for t in st.values() if torch.is_tensor(t))
        return {"params": params, "grads": grads, "optim": optim}

    def full_parameters(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for unit in self.units:
            gathered_here = self.split_params and not unit.materialized
            if gathered_here:
                self._gather_part(unit, "fp32").wait()
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
        self.pending: dict[FlatUnit, Chain] = {}
        self.order: list[FlatUnit] = []
        for unit in self.units:
            unit.module.register_forward_pre_hook(lambda m, a, u=unit: self._pre_forward(u))
            unit.module.register_forward_hook(lambda m, a, out, u=unit: self._post_forward(u, out))

    def _gather_chain(self, unit: FlatUnit, source: torch.Tensor, size: int, dtype: str) -> Chain:
        """Materialise ``unit.full`` from this rank's part at block size ``size`` (``source``),
        all-gathering one level step at a time, in ``dtype`` on the wire (``int8``: block-wise
        quantised with fp32 scales, dequantised on arrival)."""
        unit.materialize()
        full = unit.full
        if dtype == "int8":
            return self._gather_int8(unit, source, size)
        wire = full if dtype == "fp32" else torch.empty(unit.padded, dtype=torch.bfloat16, device=self.device)
        lo, hi = self._rng(unit, size)
        gathers = list(reversed(self._steps(1, size)))
        steps: list[Callable[[], Handle | None]] = []
        if not gathers:
            steps.append(lambda: _local(wire[lo:hi].copy_, source))
        for i, (small, big) in enumerate(gathers):
            # the first step's input is this rank's part itself (no copy into the wire buffer first)
            first = None if i else (lambda: source if dtype == "fp32" else source.to(wire.dtype))
            steps.append(lambda small=small, big=big, first=first:
                         self._gather_step(wire, 0, unit, small, big, first() if first else None))
        if wire is not full:
            steps.append(lambda: _local(full.copy_, wire))
        if size == self.s_p and unit.index in self.secondary:
            steps.append(lambda: self._refresh_backward_copy(unit))
        return Chain(steps)

    def _gather_int8(self, unit: FlatUnit, source: torch.Tensor, size: int) -> Chain:
        """int8 codes and one fp32 scale per block of every part at ``size``, gathered step by step."""
        lo, hi = self._rng(unit, size)
        per = hi - lo
        blocks = -(-per // INT8_BLOCK)
        codes = torch.empty(unit.padded, dtype=torch.int8, device=self.device)
        scales = torch.empty(blocks * size, device=self.device)

        def quantise() -> None:
            q, sc = quantize_int8(source)
            codes[lo:hi].copy_(q)
            scales[lo // per * blocks:hi // per * blocks].copy_(sc)

        def step(small: int, big: int) -> Handle:
            level, peers = self._group(small, big)
            (o_lo, o_hi), (i_lo, i_hi) = self._rng(unit, small), self._rng(unit, big)
            first = self.comm.all_gather(codes[o_lo:o_hi], codes[i_lo:i_hi], level, peers=peers, async_op=True)
            second = self.comm.all_gather(scales[o_lo // per * blocks:o_hi // per * blocks],
                                          scales[i_lo // per * blocks:i_hi // per * blocks],
                                          level, peers=peers, async_op=True)
            first.wait()
            return second

        def dequantise() -> None:
            for part in range(size):
                unit.full[part * per:(part + 1) * per].copy_(
                    dequantize_int8(codes[part * per:(part + 1) * per], scales[part * blocks:(part + 1) * blocks]))

        steps: list[Callable[[], Handle | None]] = [quantise]
        steps += [lambda small=small, big=big: step(small, big) for small, big in reversed(self._steps(1, size))]
        steps.append(dequantise)
        if size == self.s_p and unit.index in self.secondary:
            steps.append(lambda: self._refresh_backward_copy(unit))
        return Chain(steps)

    def _gather(self, unit: FlatUnit, async_op: bool = False, backward: bool = False) -> None:
        if unit in self.pending:
            chain = self.pending.pop(unit)
            if not async_op:
                chain.wait()
            else:
                self.pending[unit] = chain
            return
        if unit.materialized:
            return
        if backward and unit.index in self.secondary:
            if self.secondary_version[unit.index] != self.version:
                raise StaleCopyError(
                    f"unit {unit.name}: the backward copy was refreshed at parameter version "
                    f"{self.secondary_version[unit.index]}, the parameters are at version {self.version}; "
                    f"the copy was not refreshed by this step's forward gather (the ZeRO++ #5059 race)")
            chain = self._gather_chain(unit, self.secondary[unit.index], self.s_b, self.gather_dtype)
        else:
            chain = self._gather_part(unit, self.gather_dtype)
        if async_op:
            self.pending[unit] = chain
        else:
            chain.wait()

    def _neighbour(self, unit: FlatUnit, step: int) -> FlatUnit | None:
        if unit not in self.order:
            return None
        i = self.order.index(unit) + step
        return self.order[i] if 0 <= i < len(self.order) else None

    def _pre_forward(self, unit: FlatUnit) -> None:
        if unit not in self.order:
            self.order.append(unit)
        nxt = self._neighbour(unit, +1)
        prefetch = self.engine.config.zero.prefetch and nxt is not None
        early = prefetch and unit in self.pending
        if early:
            # the unit's first (widest) gather step is done before the next unit's starts, and the next
            # one's starts before this unit's narrower steps: the slowest link never waits for them
            self.pending[unit].advance()
            self._gather(nxt, async_op=True)
        self._gather(unit)
        if prefetch and not early:
            self._gather(nxt, async_op=True)

    def _post_forward(self, unit: FlatUnit, output: Any) -> None:
        if torch.is_grad_enabled():
            for t in tree_flatten(output)[0]:
                if torch.is_tensor(t) and t.requires_grad:
                    t.register_hook(lambda grad, u=unit: self._pre_backward(u))
        # backward starts at the root; with backward_params = rank every unit stays gathered, except
        # at world 1 under a parameter tier (there s_b is 1 by necessity, and the tier is for memory)
        keep_all = self.s_b == 1 and not (self.param_tier is not None and self.s_d == 1)
        keep = torch.is_grad_enabled() and (unit.module is self.model or keep_all)
        if not keep and unit not in self.pending:
            unit.release()

    def _pre_backward(self, unit: FlatUnit) -> None:
        if unit.index in self.reduced:
            return
        self._gather(unit, backward=True)
        prev = self._neighbour(unit, -1)
        if self.engine.config.zero.prefetch and prev is not None and prev.index not in self.reduced:
            self._gather(prev, async_op=True, backward=True)


def _local(fn: Callable[..., Any], *args: Any) -> None:
    """A chain step doing local work (no collective to wait for)."""
    fn(*args)


def engine_precision(engine: Any) -> str:
    train = getattr(getattr(engine, "config", None), "train", None)
    return getattr(train, "precision", "fp32")


def quantize_int8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise symmetric int8 (blocks of :data:`INT8_BLOCK`, the last one padded): codes, fp32 scales."""
    n = values.numel()
    blocks = -(-n // INT8_BLOCK)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32, device=values.device)
    padded[:n].copy_(values.reshape(-1))
    padded = padded.view(blocks, INT8_BLOCK)
    scales = padded.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    codes = torch.round(padded / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(-1)[:n], scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n = codes.numel()
    blocks = scales.numel()
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32, device=codes.device)
    padded[:n].copy_(codes.to(torch.float32))
    return (padded.view(blocks, INT8_BLOCK) * scales[:, None]).reshape(-1)[:n]


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
