"""The optimizer inside backward: each unit is stepped on a worker thread once its gradient is
reduced, with the NVMe tier's reads and writes pipelined around it.

Three single-thread executors, fed in the order the layout reports units reduced, one
:class:`~dtrain.offload.store.Chunk` at a time (a whole unit, or an NVMe unit's chunk):

* the *reader* takes a staging buffer set from the bounded pool (blocking while all are in use)
  and reads chunk i+1's state while chunk i is stepped; at :meth:`StepPipeline.begin` it already
  reads the first ``buffer_sets - 1`` chunks in the order the last step reported its units
  (the state does not depend on this step's gradients), so the first reduced units find their
  state in memory; one set stays free, so a different order cannot stall the pipeline;
* the *stepper* waits for chunk i's read and for the step's "go" (at once when the update needs
  nothing more from the step; after the global norm is known when clipping), points the
  optimizer's state at the buffers and runs the user's optimizer on that chunk's pieces only;
* the *writer* writes chunk i-1 back and returns its buffer set to the pool.

So at most ``buffer_sets`` chunks' state is in memory, whatever the model size. The training
loop waits for every chunk's step (the parameters are then final) and for every write but the
last ``defer_writes`` (0 under ``offload.overlap = false``, ZeRO-Infinity's order: every write
lands inside the step): those finish behind the next step's forward and are waited for by
:meth:`StepPipeline.drain` before anything reads the state again (the next update, a save, a
load, an eval; the plugin calls it from ``before_update`` and ``settle``).
Running the optimizer on a subset of its parameters gives each element the same arithmetic as
one ``optimizer.step()`` over all of them (element-wise optimizers), so the result is bit-identical
to the in-memory run. ``torch`` runs one intra-op thread per rank here, so the stepper is a second
thread of compute next to the autograd thread.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from dtrain.offload.store import Chunk, TierStore
from dtrain.partition import UnitSpec


class OffloadError(RuntimeError):
    """The offload tier failed mid-step (a write to ``offload.dir`` failed, the disk filled up)."""


def step_subset(optimizer: torch.optim.Optimizer, per_group: list[list[torch.Tensor]]) -> None:
    """``optimizer.step()`` restricted to ``per_group[g]`` in param group ``g`` (same hyperparameters,
    same state dict): the other parameters are hidden from it for the duration of the call."""
    saved = [g["params"] for g in optimizer.param_groups]
    try:
        for g, params in zip(optimizer.param_groups, per_group):
            g["params"] = params
        optimizer.step()
    finally:
        for g, params in zip(optimizer.param_groups, saved):
            g["params"] = params


class StepPipeline:
    """One train step's per-chunk optimizer steps (``begin`` -> ``submit`` per unit -> ``go`` -> ``join``)."""

    def __init__(self, store: TierStore, defer_writes: int = 0) -> None:
        self.store = store
        self.optimizer = store.optimizer
        self.defer_writes = defer_writes
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="dtrain-offload-read")
        self.stepper = ThreadPoolExecutor(1, thread_name_prefix="dtrain-offload-step")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="dtrain-offload-write")
        self.free: queue.Queue = queue.Queue()
        for buf in store.pool:
            self.free.put(buf)
        self._go = threading.Event()
        self._abort = False
        self.steps: list[Future] = []
        self.writes: list[Future] = []
        self.pending: list[Future] = []
        """Writes of the last step still running (at most ``defer_writes``)."""
        self.active = False
        self.order: list[int] = []
        """The units in the order the last step reported them (the next step's read-ahead)."""
        self.prefetched: dict[int, Future] = {}
        """id(chunk) -> its read, issued at :meth:`begin` before the unit was reported."""
        self.stats = {"optim_s": 0.0, "hidden_s": 0.0, "read_wait_s": 0.0, "join_wait_s": 0.0}
        self.intervals: list[tuple[float, float]] = []
        self.on_unit_stepped: Callable[[UnitSpec], Any] | None = None
        """Called on the stepper thread once a unit's last chunk is stepped (its gradient is then
        consumed: the plugin hands it to ``layout.release_grad``)."""
        self.profile: dict[int, tuple[float, float]] = {}
        """The last step's per unit: (backward time left after it was reported reduced, optimizer seconds)."""
        self.unstepped: dict[int, int] = {}
        """Units reported this step and not yet stepped -> their gradient bytes (:meth:`wait_unstepped`)."""
        self._stepped = threading.Condition()

    # --------------------------------------------------------------- training thread
    def begin(self, step_now: bool) -> None:
        """Accept units for this step; ``step_now``: step each at once (else wait for :meth:`go`)."""
        self.active, self._abort = True, False
        self.intervals = []
        self.unstepped = {}
        self.submitted: dict[int, float] = {}  # unit index -> when it was reported reduced
        self.unit_s: dict[int, float] = {}
        self._go.clear()
        if step_now:
            self._go.set()
        ahead = len(self.store.pool) - 1
        for index in self.order:
            unit = self.store.units.get(index)
            for chunk in unit.chunks if unit is not None and unit.tier == "nvme" else ():
                if ahead <= 0:
                    return
                self.prefetched[id(chunk)] = self.reader.submit(self._read, chunk)
                ahead -= 1

    def submit(self, unit_index: int, grad_bytes: int = 0) -> None:
        """The unit's gradient of this step (``grad_bytes``) is complete and reduced: read, step
        and write it."""
        unit = self.store.units.get(unit_index)
        if not self.active or unit is None or unit_index in self.submitted:
            return
        self.submitted[unit_index] = time.perf_counter()
        with self._stepped:
            self.unstepped[unit_index] = grad_bytes
        for chunk in unit.chunks:
            read = None
            if unit.tier == "nvme":
                read = self.prefetched.pop(id(chunk), None) or self.reader.submit(self._read, chunk)
            self.steps.append(self.stepper.submit(self._step, chunk, read))

    def wait_unstepped(self, limit: int) -> None:
        """Block until the reported units not yet stepped hold at most ``limit`` gradient bytes
        (the budget's gradient window: backward waits for the stepper instead of piling up
        gradients). Only while the steps run (``go``), else nothing could free them."""
        with self._stepped:
            while self._go.is_set() and not self._abort and sum(self.unstepped.values()) > limit:
                self._stepped.wait()

    def go(self) -> None:
        """The gradients are final (scaled and clipped): the deferred steps may run."""
        self._go.set()

    def join(self, backward_end: float) -> None:
        """Wait for every chunk's step and all writes but the last ``defer_writes`` (at least
        one write is waited for, so a failing disk fails this step), then step the placeholders;
        raises the first failure."""
        for index in self.store.units:  # a unit the layout never reported (no callback support)
            self.submit(index)
        self._go.set()
        start = time.perf_counter()
        errors = wait_all(self.steps)
        writes, self.steps, self.writes = self.writes, [], []  # every write is submitted once its step is done
        keep = 0 if errors else min(self.defer_writes, max(len(writes) - 1, 0))
        errors += wait_all(writes[:len(writes) - keep])
        self.pending = writes[len(writes) - keep:]
        if errors:
            errors += wait_all(self.pending)
            self.pending = []
        self.active = False
        self.order = list(self.submitted)
        self.stats["join_wait_s"] += time.perf_counter() - start
        if errors:
            raise _failed(errors[0])
        if any(self.store.placeholders):
            step_subset(self.optimizer, self.store.placeholders)
        self.profile = {i: (max(0.0, backward_end - t), self.unit_s.get(i, 0.0)) for i, t in self.submitted.items()}
        for a, b in self.intervals:
            self.stats["optim_s"] += b - a
            self.stats["hidden_s"] += max(0.0, min(b, backward_end) - a)

    def drain(self) -> None:
        """Wait for the last step's deferred writes (the state is then at rest in the files)."""
        if self.pending:
            start = time.perf_counter()
            errors, self.pending = wait_all(self.pending), []
            self.stats["join_wait_s"] += time.perf_counter() - start
            if errors:
                raise _failed(errors[0])

    def abort(self) -> None:
        """The step failed on the training thread: release the waiting steps without running them."""
        self._abort = True
        self._go.set()
        with self._stepped:
            self._stepped.notify_all()
        for read in self.prefetched.values():  # read ahead for a unit that was never submitted
            try:
                self.free.put(read.result())
            except BaseException:  # noqa: BLE001 - _read returned its buffer itself
                pass
        self.prefetched = {}
        wait_all(self.steps)
        wait_all(self.writes)
        wait_all(self.pending)
        self.steps, self.writes, self.pending = [], [], []
        self.active = False

    def close(self) -> None:
        self.abort()
        for ex in (self.reader, self.stepper, self.writer):
            ex.shutdown(wait=True)

    # ----------------------------------------------------------------- worker threads
    def _read(self, chunk: Chunk) -> torch.Tensor:
        buf = self.free.get()
        try:
            if not self._abort:
                self.store.read(chunk, buf)
        except BaseException:
            self.free.put(buf)
            raise
        return buf

    def _step(self, chunk: Chunk, read: Future | None) -> None:
        buf = None
        try:
            if read is not None:
                t0 = time.perf_counter()
                buf = read.result()
                self.stats["read_wait_s"] += time.perf_counter() - t0
            self._go.wait()
            if self._abort:
                raise OffloadError("step aborted")
            t0 = time.perf_counter()
            step_subset(self.optimizer, self.store.bring_in(chunk, buf))
            self.store.take_out(chunk, buf)
            t1 = time.perf_counter()
            self.intervals.append((t0, t1))
            index = chunk.unit.spec.index
            self.unit_s[index] = self.unit_s.get(index, 0.0) + t1 - t0
            if chunk is chunk.unit.chunks[-1]:
                if self.on_unit_stepped is not None:
                    self.on_unit_stepped(chunk.unit.spec)
                self._done_stepping(index)
        except BaseException:
            self._done_stepping(chunk.unit.spec.index)
            for _, sub in chunk.subs.values():
                self.optimizer.state.pop(sub, None)
            chunk.subs = {}
            if buf is not None:
                self.free.put(buf)
            raise
        if buf is not None:
            self.writes.append(self.writer.submit(self._write, chunk, buf))

    def _done_stepping(self, index: int) -> None:
        with self._stepped:
            if self.unstepped.pop(index, None) is not None:
                self._stepped.notify_all()

    def _write(self, chunk: Chunk, buf: torch.Tensor) -> None:
        try:
            self.store.write(chunk, buf)
            self.store.settle(chunk)
        finally:
            self.free.put(buf)


def wait_all(futures: list[Future]) -> list[BaseException]:
    """Wait for all of ``futures``; their exceptions, in order."""
    errors = []
    for fut in futures:
        try:
            fut.result()
        except BaseException as exc:  # noqa: BLE001 - drain all, report the first
            errors.append(exc)
    return errors


def _failed(exc: BaseException) -> OffloadError:
    if isinstance(exc, OffloadError):
        return exc
    err = OffloadError(f"offload tier: {type(exc).__name__}: {exc}; the optimizer state in offload.dir is "
                       f"incomplete, resume from the last checkpoint")
    err.__cause__ = exc
    return err
