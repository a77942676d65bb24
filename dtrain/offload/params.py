"""``offload.params = "nvme"``: each rank's ZeRO-3 parameter part rests in a file between uses.

Owns :class:`ParamTier` (one file per unit, ``<dir>/u{i}.param``, its reads and write-backs and
the read-ahead) and :class:`ParamTierStore` (the optimizer tier's :class:`~dtrain.offload.store.TierStore`
that also brings a unit's parameter part in for its step and writes it back after). docs/offload.md
says how it fits the step.

Under ZeRO-3 a rank's parameter part of a unit (``layout.shards("param")``, one tensor per unit)
is also the fp32 master the optimizer steps (its pieces are views of it), so one part per unit
moves. Between uses its storage is freed (``untyped_storage().resize_(0)``: every view, the
optimizer's pieces included, keeps pointing at the same storage, as ZeRO-3's gathered buffers do)
and its values are in the file. A part is *resident* while it is used:

* **gathers** (forward, backward, ``full_parameters``): the layout calls :meth:`ParamTier.fetch`
  before it builds a unit's all-gather and :meth:`ParamTier.drop` after (the gather's first step
  copies the part out, so it is dropped at once). The read of the part fetched next is started
  in the background: the successor of each fetch is learned from the previous step's sequence
  (forward order, then backward order; a wrong guess is dropped at the next fetch);
* **the optimizer step**: when the layout reports a unit reduced, its part is read ahead on a
  step reader (at most ``STEP_SLOTS`` parts pinned for steps at once, so deferred steps under
  clipping stay bounded); the stepper pins it before the step, and after it the part is written
  back to its file and dropped on a writer thread. :meth:`ParamTier.flush` waits for the writes
  at the end of the step.

Each part has a lock held across its read or write, so a read never sees a file older than the
values in memory; the I/O is the optimizer tier's (:class:`~dtrain.offload.aio.DirectFile`,
:class:`~dtrain.offload.aio.IOPool` or ``AsyncIO``, per ``offload.io``: aligned ``O_DIRECT``, 4096-aligned
staging buffers; a part is copied between its staging buffer and its storage).

Descriptors: ``layout.shards("param")``/``("master")`` return, for each unit, a view of a memory
map of its file (tier ``nvme``), so checkpoints and snapshots read it, and a load writes it,
without the part in memory (O_DIRECT reads write dirty mapped pages back first; O_DIRECT writes
drop the cached ones).
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtrain.errors import UsageError
from dtrain.offload.aio import DirectFile, IOChoice, round_up
from dtrain.offload.param_plan import STAGING_BUFFERS, STEP_SLOTS, resident_bound, staging_bytes
from dtrain.offload.pipeline import OffloadError, wait_all
from dtrain.offload.store import F32, TierStore, UnitStore
from dtrain.partition import UnitSpec



@dataclass(eq=False)
class Part:
    """One unit's parameter part on this rank and its file."""

    index: int
    tensor: torch.Tensor
    """The layout's part (storage freed at rest); every view of it shares the storage."""
    nbytes: int
    file: DirectFile
    home: torch.Tensor
    """A float32 view of a memory map of the file: the part at rest, for the descriptors."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    pins: int = 0
    """Users holding it resident (a gather, a step)."""
    resident: bool = True
    dirty: bool = False
    """Its values in memory are newer than its file (stepped, not yet written)."""

    def release(self) -> None:
        self.tensor.untyped_storage().resize_(0)
        self.resident = False

    def materialize(self) -> None:  # noqa: D102
        self.tensor.untyped_storage().resize_(self.nbytes)
        self.resident = True


class ParamTier:
    """Every unit's parameter part on the NVMe tier (see the module docstring)."""

    name = "nvme"

    def __init__(self, layout: Any, directory: Path, io: IOChoice) -> None:
        self.parts: dict[int, Part] = {}
        for shard in layout.shards("param"):
            tensor = shard.pieces[0].tensor if len(shard.pieces) == 1 else None
            whole = (tensor is not None and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
                     and tensor.storage_offset() == 0 and tensor.numel() == shard.hi - shard.lo
                     and tensor.untyped_storage().nbytes() == tensor.numel() * F32)
            if not whole:
                raise UsageError(f'offload.params = "nvme" needs each unit\'s parameter part as one fp32 host '
                                 f"tensor of its own; unit {shard.unit.name} is not; use offload.params = \"device\"")
            nbytes = tensor.numel() * F32
            file = DirectFile(str(directory / f"u{shard.unit.index}.param"), nbytes)
            home = file.mapped()[:tensor.numel()]
            self.parts[shard.unit.index] = Part(shard.unit.index, tensor, nbytes, file, home)
        self.staging = staging_bytes([p.nbytes for p in self.parts.values()])
        buffers = STAGING_BUFFERS if self.parts else 0
        self.io = io.engine(buffers * self.staging)
        self.pool: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self.pool.put(self.io.buffer(self.staging))
        self.ahead_reader = ThreadPoolExecutor(1, thread_name_prefix="dtrain-param-ahead")
        self.step_reader = ThreadPoolExecutor(1, thread_name_prefix="dtrain-param-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="dtrain-param-write")
        self.slots = threading.Semaphore(STEP_SLOTS)
        self.step_reads: dict[int, Future] = {}
        self.writes: list[Future] = []
        self.ahead: tuple[int, Future] | None = None
        self.in_step = False
        self.successor: dict[tuple[int, int], int] = {}
        self.sequence: list[tuple[int, int]] = []
        self.seen: dict[int, int] = {}
        self.read_bytes = self.write_bytes = 0
        self._reported = (0, 0)
        self.ahead_hits = 0
        self.resident_peak = 0

    def start(self) -> None:
        """Once the layout took the tier (``place_params``): the parts' values go to their files
        and their memory is freed."""
        for part in self.parts.values():
            with part.lock:
                self._write_locked(part)

    # ------------------------------------------------------------------ I/O
    def _spans(self, part: Part) -> list[tuple[int, int, int]]:
        """(file offset, aligned bytes, bytes of the part) per staging-buffer-sized span."""
        total = round_up(part.nbytes)
        return [(a, min(self.staging, total - a), min(self.staging, part.nbytes - a))
                for a in range(0, total, self.staging)]

    def _read_locked(self, part: Part) -> None:
        buf = self.pool.get()
        try:
            part.materialize()
            raw = part.tensor.view(torch.uint8)
            for offset, n, m in self._spans(part):
                self.io.read(part.file, buf[:n], offset)
                raw[offset:offset + m].copy_(buf[:m])
        finally:
            self.pool.put(buf)
        self.read_bytes += round_up(part.nbytes)

    def _write_locked(self, part: Part) -> None:
        """Write the part to its file through a staging buffer, then free it unless pinned."""
        buf = self.pool.get()
        try:
            raw = part.tensor.view(torch.uint8)
            for offset, n, m in self._spans(part):
                buf[:m].copy_(raw[offset:offset + m])
                self.io.write(part.file, buf[:n], offset)
            if part.pins == 0:
                part.release()
            part.dirty = False
        finally:
            self.pool.put(buf)
        self.write_bytes += round_up(part.nbytes)

    def _bring(self, part: Part) -> None:
        with part.lock:
            if not part.resident:
                self._read_locked(part)
            part.pins += 1

    def _unpin(self, part: Part) -> None:
        with part.lock:
            part.pins -= 1
            if part.pins == 0 and not part.dirty and part.resident:
                part.release()

    # --------------------------------------------------------- layout's seam: gathers
    def fetch(self, spec: UnitSpec) -> None:
        """The layout is about to read the unit's part (all-gather it): make it resident."""
        part = self.parts[spec.index]
        pinned = False
        if self.ahead is not None:
            index, fut = self.ahead
            self.ahead = None
            fut.result()
            pinned = index == spec.index  # the read-ahead's pin is this fetch's
            self.ahead_hits += pinned
            if not pinned:  # a wrong guess: free it again
                self._unpin(self.parts[index])
        if not pinned:
            self._bring(part)
        if not self.in_step:  # gathers between steps (eval, full_parameters) read nothing ahead
            return
        key = (spec.index, self.seen.get(spec.index, 0))
        self.seen[spec.index] = key[1] + 1
        self.sequence.append(key)
        nxt = self.successor.get(key)
        if nxt is not None and nxt in self.parts:
            self.ahead = (nxt, self.ahead_reader.submit(self._bring, self.parts[nxt]))

    def drop(self, spec: UnitSpec) -> None:
        """The layout copied the part out (its gather's first step ran): free it."""
        self._unpin(self.parts[spec.index])

    def home(self, spec: UnitSpec) -> torch.Tensor:
        """The part at rest (a view of its file's memory map) for ``layout.shards``."""
        return self.parts[spec.index].home

    # ------------------------------------------------------------ the optimizer step
    def begin_step(self) -> None:
        """A train step starts: the last step's fetch sequence predicts this one's read-ahead."""
        if self.sequence:
            self.successor = {a: b[0] for a, b in zip(self.sequence, self.sequence[1:])}
        self.sequence, self.seen = [], {}
        self.in_step = True

    def end_step(self) -> None:
        """After the last unit's step: wait for the write-backs and drop a read-ahead, so between
        steps every part rests in its file (a checkpoint load writes the files through
        :meth:`home`); raises the first failed write."""
        self.in_step = False
        try:
            self._cancel_ahead()
        finally:
            self.flush()

    def _cancel_ahead(self) -> None:
        if self.ahead is not None:
            index, fut = self.ahead
            self.ahead = None
            fut.result()  # a failed read raises (it pinned nothing)
            self._unpin(self.parts[index])

    def read_for_step(self, index: int) -> None:
        """The unit was reported reduced: read its part ahead of its step (bounded by STEP_SLOTS)."""
        if index in self.parts and index not in self.step_reads:
            self.step_reads[index] = self.step_reader.submit(self._pin_for_step, self.parts[index])

    def _pin_for_step(self, part: Part) -> None:
        self.slots.acquire()
        try:
            self._bring(part)
        except BaseException:
            self.slots.release()
            raise

    def before_step(self, index: int) -> None:
        """Stepper thread: the part must be resident (and pinned) for the unit's step."""
        part = self.parts.get(index)
        if part is None:
            return
        fut = self.step_reads.pop(index, None)
        if fut is not None:
            fut.result()
        else:
            self._pin_for_step(part)

    def after_step(self, index: int) -> None:
        """Stepper thread: the part was updated; write it back and free it on the writer thread."""
        part = self.parts.get(index)
        if part is None:
            return
        with part.lock:
            part.dirty = True
        self.writes.append(self.writer.submit(self._write_back, part))

    def _write_back(self, part: Part) -> None:
        try:
            with part.lock:
                part.pins -= 1
                self._write_locked(part)
        finally:
            self.slots.release()

    def flush(self) -> None:
        """Wait for every write-back of this step; raises the first failure."""
        writes, self.writes = self.writes, []
        errors = wait_all(writes)
        if errors:
            exc = errors[0]
            raise OffloadError(f"offload tier: {type(exc).__name__}: {exc}; the parameters in offload.dir are "
                               f"incomplete, resume from the last checkpoint") from exc

    def abandon(self) -> None:
        """A step failed: drop the reads made for it (their units were never stepped)."""
        self.in_step = False
        try:
            self._cancel_ahead()
        except BaseException:  # noqa: BLE001 - the step's own error is the one to report
            pass
        reads, self.step_reads = self.step_reads, {}
        for index, fut in reads.items():
            try:
                fut.result()
                self._unpin(self.parts[index])
                self.slots.release()
            except BaseException:  # noqa: BLE001 - the step's own error is the one to report
                pass
        try:
            self.flush()
        except BaseException:  # noqa: BLE001
            pass

    # ----------------------------------------------------------------- accounting
    def part_bytes(self) -> int:
        """Bytes of every part (what rests in the files)."""
        return sum(p.nbytes for p in self.parts.values())

    def resident_bytes(self) -> int:
        """The most the tier holds in memory at once: the staging buffers and the resident parts
        (the one gathered and the one read ahead, and STEP_SLOTS for the steps)."""
        return resident_bound([p.nbytes for p in self.parts.values()])

    def disk_bytes(self) -> int:
        return sum(p.file.nbytes for p in self.parts.values())

    def metrics(self) -> dict[str, float]:
        now = (self.read_bytes, self.write_bytes)
        read, write = now[0] - self._reported[0], now[1] - self._reported[1]
        self._reported = now
        return {"offload_param_read_bytes": float(read), "offload_param_write_bytes": float(write)}

    def close(self) -> None:
        self.abandon()
        for ex in (self.ahead_reader, self.step_reader, self.writer):
            ex.shutdown(wait=True)
        self.io.shutdown()
        for part in self.parts.values():
            part.file.close()


class ParamTierStore(TierStore):
    """The optimizer tier's store with the parameter parts brought in for each unit's step and
    written back after it: the pipeline calls ``bring_in`` before and ``take_out`` after each step
    of a unit, or of each chunk of a unit where the store cuts units into chunks (the part is then
    brought in before the first and written back after the last)."""

    def __init__(self, *args: Any, params: ParamTier, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params = params

    @staticmethod
    def _unit_and_ends(item: Any) -> tuple[UnitStore, bool, bool]:
        unit = getattr(item, "unit", item)  # a chunk of a unit, or the unit
        chunks = getattr(unit, "chunks", None) or [item]
        return unit, item is chunks[0], item is chunks[-1]

    def bring_in(self, item: Any, buf: torch.Tensor | None) -> Any:
        unit, first, _ = self._unit_and_ends(item)
        if first:
            self.params.before_step(unit.spec.index)
        return super().bring_in(item, buf)

    def take_out(self, item: Any, buf: torch.Tensor | None) -> None:
        super().take_out(item, buf)
        unit, _, last = self._unit_and_ends(item)
        if last:
            self.params.after_step(unit.spec.index)

