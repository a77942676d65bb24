"""The ``offload`` plugin: optimizer state on host memory or NVMe, each unit stepped inside backward.

It occupies the ``step`` slot (it changes *when* the optimizer runs: per unit, as soon as the
layout reports the unit's gradient reduced, instead of once after backward) and composes with
every layout that implements ``LayoutPlugin.on_unit_reduced`` (ddp, ZeRO 1/2/3): each rank
offloads only its own shard, read through ``layout.optimizer_pieces()``.

Step (docs/offload.md):

    zero_grad -> per micro-batch: start_micro_step -> forward -> [last micro-batch:
    before_update, pipeline.begin] -> backward (units reported reduced are read from the tier,
    stepped and written back on worker threads) -> finish_backward -> after_backward hooks ->
    [clipping or a late loss factor: scale_and_clip, then pipeline.go] -> pipeline.join -> publish

Exactness: without clipping (and with a loss normalisation known up front) each unit is stepped
as soon as it is reduced. Clipping needs the global norm before any update, so the steps are
*deferred*: during backward the tier only reads each reduced unit's state into the staging pool;
once backward ends the norm is taken exactly as the in-memory step takes it
(``scale_and_clip``) and the steps run. Either way the arithmetic per element is the in-memory
run's, so the result is bit-identical. With gradient accumulation only the last micro-step steps.
"""
from __future__ import annotations

import errno
import functools
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from dtrain.errors import UsageError
from dtrain.hostmem import claim_policy, limit_arenas, map_large_blocks
from dtrain.offload import cpu_adam
from dtrain.offload.aio import ALIGN, AsyncIO, AsyncIOUnavailable, IOChoice, aligned_buffer
from dtrain.offload.config import OffloadConfig
from dtrain.offload.params import ParamTier, ParamTierStore
from dtrain.offload.pipeline import StepPipeline
from dtrain.offload.placement import (CHUNK_BYTES_PER_KEY, MIN_CHUNK_BYTES_PER_KEY, POOL_SETS, UnitProfile,
                                      grad_window_applies, grad_window_bytes, place_units, staging_shape)
from dtrain.offload.store import F32, TierStore
from dtrain.plugins.base import OptimizerFactory, register
from dtrain.plugins.step import FirstOrderStep, StepOutcome, scale_and_clip

GB = 2**30
MALLOC_ARENAS = 1
"""glibc arenas while the tier runs (``M_ARENA_MAX``): its reader, stepper, writer and I/O threads
would each get an arena that keeps its own freed blocks (9 arenas measured); one shared arena cut
the benchmark's peak RSS by ~20 MiB at the same step time (BENCHMARKS.md, offload, fourth session)."""


def elementwise_state_keys(optimizer: torch.optim.Optimizer) -> list[str]:
    """The element-wise state keys the optimizer creates (Adam: exp_avg, exp_avg_sq), found by
    stepping a copy of its first param group on a 2-element probe parameter."""
    if cpu_adam._CLASS is not None and isinstance(optimizer, cpu_adam._CLASS):
        return ["exp_avg", "exp_avg_sq"]  # known; a probe copy would load the op and query the CPU again
    probe = torch.zeros(2, requires_grad=True)
    probe.grad = torch.zeros(2)
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    try:
        copy = type(optimizer)([{**group, "params": [probe]}])
        copy.step()
    except Exception as exc:  # noqa: BLE001 - any failure means the tier cannot drive this optimizer
        raise UsageError(f"offload: cannot step {type(optimizer).__name__} on a probe parameter ({exc}); "
                         f"the offload tier needs an element-wise optimizer (Adam, AdamW, SGD, ...)") from exc
    return sorted(k for k, v in copy.state[probe].items() if torch.is_tensor(v) and v.dim() > 0)


def check_offload_dir(directory: str, rank: int) -> Path:
    """Make this rank's run directory under ``directory`` and prove it takes an aligned write;
    a missing, read-only or full directory is one UsageError line."""
    run_dir = Path(directory) / f"dtrain-offload-{os.getpid()}-{secrets.token_hex(3)}-rank{rank}"
    probe = run_dir / "probe"
    try:
        run_dir.mkdir(parents=True)
        flags = os.O_RDWR | os.O_CREAT
        try:
            fd = os.open(probe, flags | getattr(os, "O_DIRECT", 0), 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fd = os.open(probe, flags, 0o600)
        try:
            os.pwrite(fd, memoryview(aligned_buffer(ALIGN).numpy()), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise UsageError(f"offload.dir = {directory!r} cannot hold the optimizer state: {exc.strerror or exc} "
                         f"({exc.filename or run_dir}); point offload.dir at a writable directory on a local "
                         f"disk") from None
    return run_dir


@register
class OffloadPlugin(FirstOrderStep):
    """Optimizer state on host/NVMe, stepped per unit while backward continues (docs/offload.md)."""

    name = "offload"
    slot: ClassVar[str] = "step"
    Config = OffloadConfig
    defer_serial_writes: bool = False
    """With ``offload.overlap = false``: let the last writes finish behind the next forward as the
    overlapped step does (the second session's intermediate order; benchmarks/offload.py's
    ``nvme-serial-defer``). False (the default) is ZeRO-Infinity's order: every write lands
    inside the step."""

    def setup(self, engine: Any) -> None:
        super().setup(engine)
        self.cfg: OffloadConfig = engine.config.offload
        if self.cfg.params != "device" and engine.device.type != "cpu":
            raise UsageError(f'offload.params = "{self.cfg.params}" is not implemented on an accelerator yet '
                             f'(parameters stay on {engine.device}); use offload.params = "device"')
        if self.cfg.cpu_adam and engine.device.type != "cpu":
            raise UsageError(f"offload.cpu_adam = true steps host tensors, but this run's parameters are on "
                             f"{engine.device}; set offload.cpu_adam = false (the user's optimizer steps on the device)")
        limit_arenas(MALLOC_ARENAS)  # before the tier's threads exist: they share the heap's free memory
        if self.cfg.malloc_mmap_mb > 0:  # the lean policy, stated over the layout's default (dtrain/hostmem.py)
            mmap_bytes = int(self.cfg.malloc_mmap_mb * 2**20)
            claim_policy(self.name, lambda: map_large_blocks(mmap_bytes))
        self.run_dir: Path | None = None  # made at start-up (restore): a wrap failing before leaves nothing
        self.params: ParamTier | None = None
        self.store: TierStore | None = None
        self.pipe: StepPipeline | None = None
        self.callback = False
        self._seen = {"read": 0, "write": 0, "optim_s": 0.0, "hidden_s": 0.0, "read_wait_s": 0.0,
                      "join_wait_s": 0.0}
        self._last: dict[str, float] = {}

    def optimizer_factory(self, factory: OptimizerFactory | None) -> OptimizerFactory:
        """The user's factory, or with ``offload.cpu_adam`` one returning DeepSpeedCPUAdam instead."""
        factory = super().optimizer_factory(factory)
        return cpu_adam.cpu_adam_factory(factory) if self.cfg.cpu_adam else factory

    # -------------------------------------------------------------- building
    def _build(self) -> None:
        """Lay the tier out over the layout's optimizer pieces (first step: the layout exists now)."""
        layout, cfg = self.engine.layout, self.cfg
        self.io = IOChoice(cfg.io, cfg.io_threads)
        if "nvme" in (cfg.optim, cfg.params):
            self.run_dir = check_offload_dir(cfg.dir, self.engine.comm.rank)
            self._io_call(self.io.resolve, self.run_dir)
        keys = elementwise_state_keys(layout.optimizer)
        held = layout.state_bytes()
        if cfg.params == "nvme":
            self.params = self._param_tier()
            held = dict(held, params=held["params"] - self.params.part_bytes() + self.params.resident_bytes())
        self.grad_window: GradWindow | None = None
        resident = held["params"] + held["grads"]
        elements = sum(p.hi - p.lo for _, p in layout.optimizer_pieces())
        optim_bytes = len(keys) * elements * F32
        on_cpu = self.engine.device.type == "cpu"
        self.buffer_sets = POOL_SETS
        chunk_elems = None
        unit_tiers: dict[int, str] = {}
        self.placement = None
        if cfg.optim == "nvme":
            largest_elems = max((_unit_range_bytes(layout, s) // F32 for s in layout.unit_specs()), default=0)
            smallest_set = len(keys) * min(MIN_CHUNK_BYTES_PER_KEY, -(-largest_elems * F32 // ALIGN) * ALIGN)
            room = None
            if cfg.memory_budget_gb is not None:
                budget = int(cfg.memory_budget_gb * GB)
                if budget < resident + smallest_set:  # too small for every gradient: count a window of them
                    self.grad_window = self._grad_window()
                    if self.grad_window is not None:
                        resident = held["params"] + self.grad_window.counted
                minimum = resident + smallest_set
                if budget < minimum:
                    grads = "a window of the gradients" if self.grad_window else "gradients"
                    raise UsageError(
                        f"offload.memory_budget_gb = {cfg.memory_budget_gb} is too small for rank "
                        f"{self.engine.comm.rank}: it needs at least {minimum / GB:.4f} GB (parameters and "
                        f"{grads} {resident / GB:.4f} GB + the smallest staging buffer set "
                        f"{smallest_set / GB:.4f} GB); raise offload.memory_budget_gb, use more ranks or "
                        f"offload the parameters")
                unit_tiers, kept = self._place(keys, budget, resident)
                room = budget - resident - kept
                largest_elems = max((_unit_range_bytes(layout, s) // F32 for s in layout.unit_specs()
                                     if s.index not in unit_tiers), default=0)
            if largest_elems:  # some unit on NVMe
                self.buffer_sets, chunk_elems = staging_shape(room, len(keys), largest_elems)
            free = shutil.disk_usage(self.run_dir).free
            need = sum(_aligned_unit_bytes(layout, s, keys) for s in layout.unit_specs())
            if need > free:
                raise UsageError(f"offload.dir = {cfg.dir!r} has {free / GB:.2f} GB free; rank "
                                 f"{self.engine.comm.rank} needs {need / GB:.2f} GB for its optimizer state; "
                                 f"free space or point offload.dir at a larger disk")
        elif cfg.memory_budget_gb is not None and cfg.optim == "host" and not on_cpu:
            unit_tiers, _ = self._place(keys, int(cfg.memory_budget_gb * GB), resident)
        elif cfg.memory_budget_gb is not None:
            in_memory = resident + (optim_bytes if cfg.optim == "device" or on_cpu else 0)
            if int(cfg.memory_budget_gb * GB) < in_memory:
                raise UsageError(
                    f"offload.memory_budget_gb = {cfg.memory_budget_gb} is too small for rank "
                    f"{self.engine.comm.rank} with offload.optim = {cfg.optim!r}: its state in memory is "
                    f"{in_memory / GB:.4f} GB; raise the budget or use offload.optim = \"nvme\"")
        args = (layout, cfg.optim, keys, self.run_dir, self.io, self.buffer_sets, unit_tiers, chunk_elems)
        self.store = self._io_call(TierStore if self.params is None else
                                   functools.partial(ParamTierStore, params=self.params), *args)
        self.pipe = StepPipeline(self.store)
        self.pipe.on_unit_stepped = self._stepped  # a stepped unit's gradient is not needed until its next one
        self.set_overlap(cfg.overlap)
        self.callback = layout.on_unit_reduced(self._on_reduced)
        if cfg.optim != "device" or self.params is not None:
            layout.place_optim_state(cfg.optim, self._tier_report)
        self.resident = resident
        self.optimizer_name = cpu_adam.describe(layout.optimizer)
        if self.engine.comm.rank == 0:
            io = f"; NVMe I/O: {self.io.describe()}" if self.run_dir is not None else ""
            print(f"dtrain: offload tier {cfg.optim!r}: the optimizer is {self.optimizer_name}{io}", file=sys.stderr)

    def _io_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; offload.io = "async_io" failing to run (the op does not load, the staging
        buffers cannot be page-locked) is one UsageError line."""
        try:
            return fn(*args)
        except AsyncIOUnavailable as exc:
            raise UsageError(f'offload.io = "async_io" cannot run on rank {self.engine.comm.rank}: {exc}; fix '
                             f'that or set offload.io = "auto" (the preadv/pwritev thread pool where the op '
                             f'cannot run)') from None

    def set_overlap(self, overlap: bool) -> None:
        """``offload.overlap`` from the next step on: the overlapped step or ZeRO-Infinity's order
        (the same state, files and pool either way; benchmarks/offload.py alternates the two in
        one process to compare them on the same machine state). A budget too small for every
        gradient was laid out with a window of them (the overlap's), which ZeRO-Infinity's order,
        holding them all until the update, exceeds."""
        self.cfg.overlap = overlap
        if self.pipe is not None:
            defer = overlap or self.defer_serial_writes
            self.pipe.defer_writes = max(0, self.buffer_sets - 1) if defer else 0

    def _param_tier(self) -> ParamTier:
        """``offload.params = "nvme"``: the parameter parts go to their files now (one UsageError
        line where the layout cannot, or the disk cannot hold them)."""
        layout, cfg = self.engine.layout, self.cfg
        need = sum(-(-s.nbytes // ALIGN) * ALIGN for s in layout.shards("param"))
        free = shutil.disk_usage(self.run_dir).free
        if need > free:
            raise UsageError(f"offload.dir = {cfg.dir!r} has {free / GB:.2f} GB free; rank {self.engine.comm.rank} "
                             f"needs {need / GB:.2f} GB for its parameters; free space or point offload.dir at a "
                             f"larger disk")
        tier = self._io_call(ParamTier, layout, self.run_dir, self.io)
        if not layout.place_params(tier):
            tier.close()
            raise UsageError(f'offload.params = "nvme" needs zero.stage = 3 (each rank rests only its parameter '
                             f"part; layout {layout.name!r} keeps full parameters on every rank), with parameters "
                             f'and optimizer state split alike and no zero.backward_params copy; use zero.stage = 3 '
                             f'or offload.params = "device"')
        tier.start()
        return tier

    def _place(self, keys: list[str], budget: int, resident: int) -> tuple[dict[int, str], int]:
        """Which units keep their state resident under the budget (dtrain/offload/placement.py);
        returns unit index -> "device" for those, and their bytes."""
        layout = self.engine.layout
        specs = list(reversed(layout.unit_specs()))  # backward reduces the last units first
        self.placement = place_units([(s.name, _aligned_unit_bytes(layout, s, keys)) for s in specs],
                                     self.cfg.optim, budget, resident, POOL_SETS,
                                     set_cap_bytes=len(keys) * CHUNK_BYTES_PER_KEY,
                                     min_set_bytes=len(keys) * MIN_CHUNK_BYTES_PER_KEY)
        chosen = {s.index: "device" for s in specs if self.placement.tiers[s.name] == "device"}
        return chosen, sum(_aligned_unit_bytes(layout, s, keys) for s in specs if s.index in chosen)

    def restore(self) -> None:
        """Start-up, once the layout exists and before any checkpoint is loaded: lay the tier out
        now, so budget and disk errors come before step 1 and a load writes through into the tier."""
        if self.store is None:
            try:
                self._build()
            except BaseException:
                self.teardown()  # nothing of the tier may outlive a failed start
                raise
        return None

    def _on_reduced(self, unit: Any) -> None:
        if self.pipe is not None and self.pipe.active:
            if self.params is not None and unit.index in self.store.units:
                self.params.read_for_step(unit.index)
            window = self.grad_window
            self.pipe.submit(unit.index, window.unit_bytes.get(unit.index, 0) if window else 0)
            if window is not None:
                window.sample()
                self.pipe.wait_unstepped(window.limit)

    def _stepped(self, spec: Any) -> None:
        """The stepper finished ``spec``'s unit: its gradient goes back to the layout."""
        if self.grad_window is not None:
            self.grad_window.sample()
        self.engine.layout.release_grad(spec)

    def _grad_window(self) -> "GradWindow | None":
        """For a budget too small for every gradient (docs/offload.md, "Gradient window"): a window
        of them, where every unit is stepped inside backward and its gradient freed after (overlap
        on, no clipping, one micro-batch, the batch-mean loss, and a layout that frees stepped
        gradients). The gradients are freed now (they come back zeroed when written), so step 1
        holds no more."""
        if not grad_window_applies(self.engine.config):
            return None
        layout = self.engine.layout
        shards = layout.shards("grad")
        probes = {s.unit.index: s.pieces[0].tensor for s in shards if s.pieces}
        unit_bytes = {s.unit.index: sum(p.tensor.numel() * p.tensor.element_size() for p in s.pieces) for s in shards}
        released = [layout.release_grad(spec) for spec in layout.unit_specs()]
        if not released or not all(released):
            return None
        return GradWindow(unit_bytes, probes)

    # ------------------------------------------------------------------ step
    def run(self, micro_batches: list[Any]) -> StepOutcome:
        if self.store is None:
            self._build()
        engine, layout, pipe = self.engine, self.engine.layout, self.pipe
        clip = engine.config.train.clip_grad_norm
        if self.params is not None:
            self.params.begin_step()
        losses = engine.step_loss(micro_batches)
        layout.zero_grad()
        last = len(micro_batches) - 1
        step_now = False
        try:
            for i, micro in enumerate(micro_batches):
                layout.start_micro_step(i, i == last)
                objective = engine.forward_objective(micro, i, losses)
                if i == last and self.cfg.overlap:
                    pipe.drain()  # the last step's deferred writes ran behind this forward
                    engine.before_update()
                    step_now = clip is None and not losses.scales_after_backward
                    pipe.begin(step_now)
                objective.backward()
                layout.finish_backward()
                for plugin in engine.plugins:
                    plugin.after_backward(i, i == last)
            backward_end = time.perf_counter()
            grad_norm = None
            if not step_now:
                grad_norm = scale_and_clip(layout, losses.finish(), clip)
                if not self.cfg.overlap:  # ZeRO-Infinity's order: reads start now, after backward
                    pipe.drain()
                    engine.before_update()
                    pipe.begin(True)
                pipe.go()
            pipe.join(backward_end)
            if self.params is not None:
                self.params.end_step()
        except BaseException:
            pipe.abort()
            if self.params is not None:
                self.params.abandon()
            raise
        layout.publish()
        return StepOutcome(losses.local_loss(), grad_norm)

    def unit_profiles(self) -> list[UnitProfile]:
        """The last step as :func:`dtrain.offload.placement.choose_placement` takes it: per unit of
        this rank, its optimizer state bytes, the backward time left after it was reported reduced
        and its optimizer seconds (with ``offload.overlap`` and no clipping, else windows are 0)."""
        assert self.store is not None and self.pipe is not None, "run a step first"
        out = []
        for index, unit in self.store.units.items():
            window, optim = self.pipe.profile.get(index, (0.0, 0.0))
            out.append(UnitProfile(unit.spec.name, unit.state_bytes, window, optim))
        return out

    # --------------------------------------------------------------- reporting
    def _tier_report(self) -> dict[str, dict[str, int]]:
        held = self.engine.layout.state_bytes()
        store = self.store
        device = {"params": held["params"], "grads": held["grads"],
                  "optim": store.bytes_at_rest("device") + store.pool_bytes()}
        out = {"device": device}
        if store.tier != "device":
            out[store.tier] = {"params": 0, "grads": 0, "optim": store.bytes_at_rest()}
        if self.params is not None:  # the parts rest in their files; their staging and read-ahead stay
            device["params"] += self.params.resident_bytes() - self.params.part_bytes()
            out.setdefault("nvme", {"params": 0, "grads": 0, "optim": 0})["params"] = self.params.part_bytes()
        return out

    def metrics(self) -> dict[str, float]:
        if self.store is None:
            return {}
        stats, io = self.pipe.stats, self.store.io
        now = {"read": io.read_bytes if io else 0, "write": io.write_bytes if io else 0, **stats}
        d = {k: now[k] - self._seen[k] for k in self._seen}
        self._seen = dict(now)
        out = {"offload_read_bytes": float(d["read"]), "offload_write_bytes": float(d["write"]),
               "optim_overlap": d["hidden_s"] / d["optim_s"] if d["optim_s"] > 0 else 0.0,
               "offload_optim_s": d["optim_s"], "offload_io_wait_s": d["read_wait_s"] + d["join_wait_s"],
               "offload_cpu_adam": float(self.cfg.cpu_adam)}
        if self.store.tier == "nvme":
            out["offload_direct_io"] = float(self.store.direct[0])
            out["offload_async_io"] = float(isinstance(self.store.io, AsyncIO))
        if self.params is not None:
            out.update(self.params.metrics())
        if self.grad_window is not None:
            out.update(self.grad_window.metrics())
        return out

    def before_update(self) -> None:
        """A load (or another plugin) is about to change the state: the deferred writes land first."""
        if self.pipe is not None:
            self.pipe.drain()

    def settle(self) -> None:
        """A save, an eval or ``full_parameters`` reads the state: the deferred writes land first."""
        if self.pipe is not None:
            self.pipe.drain()

    def on_failure(self, exc: BaseException) -> None:
        if self.pipe is not None:
            self.pipe.abort()
        if self.params is not None:
            self.params.abandon()

    def teardown(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
        if self.store is not None:
            self.store.close()
        if self.params is not None:
            self.params.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _unit_range_bytes(layout: Any, spec: Any) -> int:
    _, parts, index = layout.placement("master")
    lo, hi = spec.shard_range(parts, index)
    return (hi - lo) * F32


def _aligned_unit_bytes(layout: Any, spec: Any, keys: list[str]) -> int:
    """One unit's optimizer state on this rank as the tier stores it (4096-aligned per key): its
    state file's size, and what keeping the unit resident costs the budget."""
    return -(-_unit_range_bytes(layout, spec) // ALIGN) * ALIGN * len(keys)


class GradWindow:
    """The budget's gradient window: the bytes it counts, the wait limit, the measured peak."""

    def __init__(self, unit_bytes: dict[int, int], probes: dict[int, torch.Tensor]) -> None:
        self.unit_bytes = unit_bytes
        self.probes = probes
        """Per unit, one view of its gradient part (storage freed while released)."""
        self.counted = grad_window_bytes(list(unit_bytes.values()))
        self.limit = max(unit_bytes.values(), default=0)
        self.peak = 0
        self.warned = False

    def sample(self) -> None:
        """Note the gradient bytes held now (before a unit's release and at each report: between
        them gradients only come back, so the step's peak is one of these moments)."""
        live = sum(self.unit_bytes[i] for i, t in self.probes.items() if t.untyped_storage().nbytes())
        self.peak = max(self.peak, live)

    def metrics(self) -> dict[str, float]:
        peak, self.peak = self.peak, 0
        if peak > self.counted and not self.warned:
            self.warned = True
            print(f"dtrain: offload: this step held {peak / 2**20:.1f} MiB of gradients at once, above the "
                  f"{self.counted / 2**20:.1f} MiB offload.memory_budget_gb counts for them (the model's units fill "
                  f"their gradients out of order); leave room in the budget for it", file=sys.stderr)
        return {"offload_grad_peak_bytes": float(peak), "offload_grad_window_bytes": float(self.counted)}
