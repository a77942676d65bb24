"""The optimizer inside backward: each unit is stepped on a worker thread once its gradient is
reduced, with the NVMe tier's reads and writes pipelined around it.

Three single-thread executors, fed in the order the layout reports units reduced:

* the *reader* takes a staging buffer set from the bounded pool (blocking while all are in use)
  and reads unit i+1's state file while unit i is stepped;
* the *stepper* waits for unit i's read and for the step's "go" (at once when the update needs
  nothing more from the step; after the global norm is known when clipping), points the
  optimizer's state at the buffers and runs the user's optimizer on that unit's pieces only;
* the *writer* writes unit i-1 back and returns its buffer set to the pool.

So at most ``buffer_sets`` units' state is in memory, whatever the model size, and the only
thread the training loop waits for is the last unit's step and write (:meth:`StepPipeline.join`).
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

import torch

from dtrain.offload.store import TierStore, UnitStore


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
    """One train step's per-unit optimizer steps (``begin`` -> ``submit`` per unit -> ``go`` -> ``join``)."""

    def __init__(self, store: TierStore) -> None:
        self.store = store
        self.optimizer = store.optimizer
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="dtrain-offload-read")
        self.stepper = ThreadPoolExecutor(1, thread_name_prefix="dtrain-offload-step")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="dtrain-offload-write")
        self.free: queue.Queue = queue.Queue()
        for buf in store.pool:
            self.free.put(buf)
        self._go = threading.Event()
        self._abort = False
        self.futures: list[Future] = []
        self.active = False
        self.stats = {"optim_s": 0.0, "hidden_s": 0.0, "read_wait_s": 0.0, "join_wait_s": 0.0}
        self.intervals: list[tuple[float, float]] = []
        self.profile: dict[int, tuple[float, float]] = {}
        """The last step's per unit: (backward time left after it was reported reduced, optimizer seconds)."""

    # --------------------------------------------------------------- training thread
    def begin(self, step_now: bool) -> None:
        """Accept units for this step; ``step_now``: step each at once (else wait for :meth:`go`)."""
        self.active, self._abort = True, False
        self.intervals = []
        self.submitted: dict[int, float] = {}  # unit index -> when it was reported reduced
        self.unit_s: dict[int, float] = {}
        self._go.clear()
        if step_now:
            self._go.set()

    def submit(self, unit_index: int) -> None:
        """The unit's gradient of this step is complete and reduced: read, step and write it."""
        unit = self.store.units.get(unit_index)
        if not self.active or unit is None or unit_index in self.submitted:
            return
        self.submitted[unit_index] = time.perf_counter()
        read = self.reader.submit(self._read, unit) if unit.tier == "nvme" else None
        self.futures.append(self.stepper.submit(self._step, unit, read))

    def go(self) -> None:
        """The gradients are final (scaled and clipped): the deferred steps may run."""
        self._go.set()

    def join(self, backward_end: float) -> None:
        """Wait for every unit's step and write, then step the placeholders; raises the first failure."""
        for index in self.store.units:  # a unit the layout never reported (no callback support)
            self.submit(index)
        self._go.set()
        start = time.perf_counter()
        errors = []
        for fut in self.futures:
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001 - drain all, report the first
                errors.append(exc)
        self.futures = []
        self.active = False
        self.stats["join_wait_s"] += time.perf_counter() - start
        if errors:
            exc = errors[0]
            raise OffloadError(f"offload tier: {type(exc).__name__}: {exc}; the optimizer state in "
                               f"offload.dir is incomplete, resume from the last checkpoint") from exc
        if any(self.store.placeholders):
            step_subset(self.optimizer, self.store.placeholders)
        self.profile = {i: (max(0.0, backward_end - t), self.unit_s.get(i, 0.0)) for i, t in self.submitted.items()}
        for a, b in self.intervals:
            self.stats["optim_s"] += b - a
            self.stats["hidden_s"] += max(0.0, min(b, backward_end) - a)

    def abort(self) -> None:
        """The step failed on the training thread: release the waiting steps without running them."""
        self._abort = True
        self._go.set()
        for fut in self.futures:
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - the training thread's own error is the one to report
                pass
        self.futures = []
        self.active = False

    def close(self) -> None:
        self.abort()
        for ex in (self.reader, self.stepper, self.writer):
            ex.shutdown(wait=True)

    # ----------------------------------------------------------------- worker threads
    def _read(self, unit: UnitStore) -> torch.Tensor:
        buf = self.free.get()
        try:
            if not self._abort:
                self.store.read(unit, buf)
        except BaseException:
            self.free.put(buf)
            raise
        return buf

    def _step(self, unit: UnitStore, read: Future | None) -> None:
        buf = None
        if read is not None:
            t0 = time.perf_counter()
            buf = read.result()
            self.stats["read_wait_s"] += time.perf_counter() - t0
        try:
            self._go.wait()
            if self._abort:
                raise OffloadError("step aborted")
            t0 = time.perf_counter()
            self.store.bring_in(unit, buf)
            per_group: list[list[torch.Tensor]] = [[] for _ in self.optimizer.param_groups]
            for piece in unit.pieces:
                per_group[piece.group if piece.group is not None else 0].append(piece.tensor)
            step_subset(self.optimizer, per_group)
            self.store.take_out(unit, buf)
            self.intervals.append((t0, time.perf_counter()))
            self.unit_s[unit.spec.index] = self.intervals[-1][1] - t0
        except BaseException:
            if buf is not None:
                self.free.put(buf)
            raise
        if buf is not None:
            self.futures.append(self.writer.submit(self._write, unit, buf))

    def _write(self, unit: UnitStore, buf: torch.Tensor) -> None:
        try:
            self.store.write(unit, buf)
            self.store.settle(unit)
        finally:
            self.free.put(buf)
