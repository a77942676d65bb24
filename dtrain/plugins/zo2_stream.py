"""Block streaming for the ``zo2`` step strategy (``zo2.stream = "host" | "nvme"``): the transformer
blocks live off the device and one pass per step carries each block through it once.

* **Blocks** are the largest ``nn.ModuleList`` of identically-typed modules (or ``zo2.blocks``, a
  dotted path). Their trainable parameters move into a :class:`BlockStore` (host RAM, or an aligned
  file mapped into memory for ``"nvme"``); between steps each block parameter's ``.data`` is a
  view of its stored block, and the layout sees block parameters as frozen (``requires_grad`` is
  switched off), so it holds only the *residents*: embeddings, final norm and head.
* **One pass, two forwards.** Each micro-batch and sign (+eps, -eps) is a *lane*: a thread running
  an ordinary model forward. A forward pre-hook on every block parks the lane there, so the lanes
  advance in lock-step, one at a time: block j is uploaded once, the + lanes run it on
  theta+ = theta + eps z, the working copy becomes theta- = theta+ - 2 eps z in place, the - lanes
  run it, and the copy is dropped (the stored block was never perturbed: the restore is exact).
  Each lane computes exactly what a plain forward computes, so losses and parameters are
  bit-identical to ``stream = "off"``.
* **Residents** (parameters outside the blocks) stay in the layout and are perturbed in place
  around the blocks (theta+ / theta- before the first block, again after the last), while their
  theta and z wait in host memory; theta is restored by a copy (:class:`_Residents`).
* **Fused update.** The step's projected gradient is known only after the head, so the update of
  the blocks is applied in the next step's pass, as each block is uploaded (then written back once:
  a step reads and writes every block exactly once). The generator state at the first block of
  each step is kept for that; residents are updated at the end of their own step.
* **Prefetch.** A producer thread prepares up to ``zo2.prefetch_blocks`` blocks ahead (upload,
  deferred update, write-back, theta+) while the lanes compute; a semaphore bounds the blocks alive
  on the device to ``prefetch_blocks + 1``.

On a CPU "device" the upload is a copy out of the store, so the resident block bytes reported
(``zo2_block_bytes_peak``) are real allocations. The ``"nvme"`` store is this module's own
(one file, each block at a 4096-byte-aligned offset, ``numpy.memmap``; the file is unlinked once
mapped): dtrain's offload tier (dtrain/offload/) is not used yet. docs/zo2.md.
"""
from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from dtrain.plugins.zo2 import decays, draw, generator, zo_update_

if TYPE_CHECKING:
    from dtrain.engine import Engine
    from dtrain.plugins.zo2 import ZO2Plugin

ALIGN = 4096


def find_blocks(model: nn.Module, path: str | None) -> tuple[str, nn.ModuleList]:
    """The blocks to stream: ``model.<path>``, else the largest ModuleList of identically-typed modules."""
    if path:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"zo2.blocks = {path!r}: the model has no submodule at that path") from None
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(f"zo2.blocks = {path!r} is a {type(found).__name__}, not a non-empty nn.ModuleList")
        return path, found
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 0
                and len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1]))):
            best = (name, module)
    if best is None:
        raise ValueError("zo2.stream needs the model's transformer blocks in an nn.ModuleList; none was found "
                         "(set zo2.blocks to the list's dotted path, or zo2.stream = \"off\")")
    return best


class BlockStore:
    """Flat fp32 blocks off the device: host RAM (pinned when the device is CUDA) or one aligned file."""

    def __init__(self, sizes: list[int], kind: str, device: torch.device, directory: str | None, rank: int):
        self.device, self.kind = device, kind
        self.bytes_read = self.bytes_written = 0
        if kind == "host":
            pin = device.type == "cuda"
            self.flats = [torch.empty(n, dtype=torch.float32, pin_memory=pin) for n in sizes]
            self.path = None
            return
        import numpy as np

        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n * 4 // ALIGN) * ALIGN // 4
        directory = directory or tempfile.gettempdir()
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"dtrain-zo2-rank{rank}-{os.getpid()}.blocks")
        self._map = np.memmap(self.path, dtype=np.float32, mode="w+", shape=(max(total, 1),))
        os.unlink(self.path)  # the mapping keeps the file alive; nothing is left behind on exit
        self.flats = [torch.from_numpy(self._map[o:o + n]) for o, n in zip(offsets, sizes)]

    def read(self, j: int) -> torch.Tensor:
        """Upload block ``j``: a device copy of it."""
        self.bytes_read += self.flats[j].numel() * 4
        return self.flats[j].to(self.device, copy=True)

    def write(self, j: int, flat: torch.Tensor) -> None:
        """Offload block ``j``'s new values."""
        self.bytes_written += flat.numel() * 4
        self.flats[j].copy_(flat)


class _Aborted(Exception):
    pass


class _Lane(threading.Thread):
    """One forward (a micro-batch at one sign) that parks at every block until the pass lets it on."""

    def __init__(self, owner: "BlockStream", fn: Callable[[], Any], threads: int) -> None:
        super().__init__(daemon=True, name="dtrain-zo2-lane")
        self.owner, self.fn, self.threads = owner, fn, threads
        self.go, self.parked = threading.Event(), threading.Event()
        self.at: int | None = None
        self.done, self.abort = False, False
        self.error: BaseException | None = None

    def run(self) -> None:
        torch.set_num_threads(self.threads)  # the same kernels' splitting as the main thread: same bits
        self.go.wait()
        self.go.clear()
        try:
            if self.abort:
                raise _Aborted
            with torch.no_grad():
                self.fn()
        except BaseException as exc:  # handed to the pass, which raises it
            self.error = exc
        finally:
            self.done, self.at = True, None
            self.parked.set()

    def park(self, index: int) -> None:
        self.at = index
        self.parked.set()
        self.go.wait()
        self.go.clear()
        if self.abort:
            raise _Aborted

    def advance(self) -> None:
        """Let the lane run until it parks at the next block or finishes (main thread)."""
        self.parked.clear()
        self.go.set()
        self.parked.wait()


@dataclass
class _Prepared:
    index: int
    flat: torch.Tensor
    state: torch.Tensor
    """Generator state before this block's z (to regenerate z for theta-)."""
    trailing: torch.Tensor | None
    """After the last block: the generator state at the first resident listed after the blocks."""


class _Producer:
    """Prepares blocks in order (upload, deferred update + write-back, theta+), ahead or on demand."""

    def __init__(self, stream: "BlockStream", gen: torch.Generator, pending: dict[str, Any] | None,
                 ahead: int) -> None:
        self.stream, self.gen, self.pending, self.ahead = stream, gen, pending, ahead
        self.update_gen = None
        if pending is not None:
            self.update_gen = torch.Generator(device="cpu")
            self.update_gen.set_state(pending["first_state"])
        self.next_index, self.waited_s = 0, 0.0
        self.stopping = False
        if ahead > 0:
            self.slots = threading.Semaphore(ahead + 1)
            self.queue: queue.Queue = queue.Queue()
            self.thread = threading.Thread(target=self._run, args=(torch.get_num_threads(),), daemon=True,
                                           name="dtrain-zo2-prefetch")
            self.thread.start()

    def _prepare(self, j: int) -> _Prepared:
        s = self.stream
        eps, device = s.plugin.cfg.eps, s.device
        flat = s.store.read(j)
        s.track(flat.numel() * 4)
        views = s.views(j, flat)
        if self.pending is not None:
            grad, lr, wd = self.pending["grad"], self.pending["lr"], s.plugin.cfg.weight_decay
            for v in views:
                zo_update_(v, draw(v.shape, self.update_gen, device), grad, lr, wd if decays(v) else 0.0)
            s.store.write(j, flat)
        state = self.gen.get_state()
        for v in views:
            v.add_(draw(v.shape, self.gen, device), alpha=eps)
        trailing = self.gen.get_state() if j == len(s.blocks) - 1 else None
        return _Prepared(j, flat, state, trailing)

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            for j in range(len(self.stream.blocks)):
                self.slots.acquire()
                if self.stopping:
                    return
                self.queue.put(self._prepare(j))
        except BaseException as exc:
            self.queue.put(exc)

    def next(self) -> _Prepared:
        j, self.next_index = self.next_index, self.next_index + 1
        if self.ahead == 0:
            return self._prepare(j)
        started = time.perf_counter()
        item = self.queue.get()
        self.waited_s += time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, item: _Prepared) -> None:
        self.stream.track(-item.flat.numel() * 4)
        if self.ahead > 0:
            self.slots.release()

    def stop(self) -> None:
        if self.ahead > 0:
            self.stopping = True
            for _ in range(self.ahead + 1):
                self.slots.release()
            self.thread.join()
            while not self.queue.empty():
                item = self.queue.get()
                if isinstance(item, _Prepared):
                    self.stream.track(-item.flat.numel() * 4)


class _Residents:
    """The resident parameters of one step, perturbed in place in their own (device) storage.

    Each holds theta, theta+ or theta- as the lanes need it; theta and z wait in host memory, so
    theta+ is recomputed exactly (copy theta, add eps z) when the lanes come back to the head
    after holding theta-, and theta is restored by a copy, never by arithmetic."""

    def __init__(self, device: torch.device, eps: float) -> None:
        self.device, self.eps = device, eps
        self.held: list[list[Any]] = []  # [param, theta (host), z (host), state: 0 theta, 1 plus, 2 minus]

    def add(self, params: list[nn.Parameter], gen: torch.Generator) -> None:
        for p in params:
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            self.held.append([p, p.detach().to("cpu", copy=True), z, 0])

    def _z(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.device.type == "cpu" else z.to(self.device, non_blocking=True)

    def to_sign(self, sign: int) -> None:
        """Every held parameter at theta+ (sign 0) or theta- (sign 1)."""
        for entry in self.held:
            p, theta, z, state = entry
            if state != 1 and (sign == 0 or state != 2):
                if state == 2:
                    p.copy_(theta)
                p.add_(self._z(z), alpha=self.eps)
                state = 1
            if sign == 1 and state == 1:
                p.add_(self._z(z), alpha=-2 * self.eps)
                state = 2
            entry[3] = state

    def restore(self) -> None:
        for entry in self.held:
            if entry[3] != 0:
                entry[0].copy_(entry[1])
                entry[3] = 0

    def update(self, grad: float, lr: float, wd: float) -> None:
        for p, _, z, _ in self.held:
            zo_update_(p, self._z(z), grad, lr, wd if decays(p) else 0.0)
        self.held = []


class BlockStream:
    """The streamed blocks of one model and the per-step pass over them (see the module docstring)."""

    def __init__(self, plugin: "ZO2Plugin", engine: "Engine") -> None:
        self.plugin, self.engine, self.device = plugin, engine, engine.device
        model = engine.model
        self.path, module_list = find_blocks(model, plugin.cfg.blocks)
        self.blocks = list(module_list)
        index = {id(p): i for i, (_, p) in enumerate(plugin.named)}
        self.block_params: list[list[nn.Parameter]] = []
        spans = []
        for j, block in enumerate(self.blocks):
            ps = sorted((p for p in block.parameters() if id(p) in index), key=lambda p: index[id(p)])
            if not ps:
                raise ValueError(f"zo2.stream: block {j} of {self.path} has no trainable parameter to stream")
            lo, hi = index[id(ps[0])], index[id(ps[-1])] + 1
            if hi - lo != len(ps) or (spans and spans[-1][1] != lo):
                raise ValueError(f"zo2.stream: the trainable parameters of {self.path} are not contiguous, block "
                                 f"by block, in model.named_parameters() order; set zo2.stream = \"off\"")
            spans.append((lo, hi))
            self.block_params.append(ps)
        self.leading = [p for _, p in plugin.named[:spans[0][0]]]
        self.trailing = [p for _, p in plugin.named[spans[-1][1]:]]
        self.sizes = [sum(p.numel() for p in ps) for ps in self.block_params]
        self.store = BlockStore(self.sizes, plugin.cfg.stream, self.device, plugin.cfg.nvme_dir, engine.runtime.rank)
        self.host_views = []
        with torch.no_grad():
            for j, ps in enumerate(self.block_params):
                views = self.views(j, self.store.flats[j])
                for p, v in zip(ps, views):
                    v.copy_(p.detach())
                    p.data = v  # the device copy is dropped: between steps the block lives in the store
                    p.requires_grad_(False)  # the layout keeps residents only
                self.host_views.append(views)
        self.resident_bytes = sum(p.numel() * 4 for p in self.leading + self.trailing)
        self.live = self.peak = 0
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._last_step: dict[str, float] = {}
        self._hooks = [b.register_forward_pre_hook(self._make_pre_hook(j)) for j, b in enumerate(self.blocks)]
        self._hooks += [b.register_forward_hook(self._make_post_hook(j)) for j, b in enumerate(self.blocks)]
        trailing_ids, leading_ids = {id(p) for p in self.trailing}, {id(p) for p in self.leading}
        self._trailing_owners = set()
        for m in model.modules():
            own = {id(p) for p in m.parameters(recurse=False)}
            if own & trailing_ids:
                self._trailing_owners.add(id(m))
            if own & (trailing_ids | leading_ids):
                self._hooks.append(m.register_forward_pre_hook(self._check_resident))

    # ------------------------------------------------------------ helpers
    def views(self, j: int, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.block_params[j]:
            out.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out

    def _bind(self, j: int, views: list[torch.Tensor]) -> None:
        for p, v in zip(self.block_params[j], views):
            p.data = v

    def track(self, nbytes: int) -> None:
        with self._lock:
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def _make_pre_hook(self, j: int):
        def hook(module: nn.Module, args: Any) -> None:
            lane = threading.current_thread()
            if isinstance(lane, _Lane) and lane.owner is self:
                lane.park(j)
            elif self.device.type != "cpu":  # eval outside a zo2 step: upload on demand
                self._bind(j, self.views(j, self.store.read(j)))
        return hook

    def _make_post_hook(self, j: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(threading.current_thread(), _Lane) and self.device.type != "cpu":
                self._bind(j, self.host_views[j])
        return hook

    def _check_resident(self, module: nn.Module, args: Any) -> None:
        """Residents hold theta+/theta- only before the first block (those listed before the blocks)
        and after the last one; a lane using one elsewhere would see the wrong values."""
        if not isinstance(threading.current_thread(), _Lane):
            return
        if self._phase == "blocks" or (self._phase == "pre" and id(module) in self._trailing_owners):
            where = "inside the blocks" if self._phase == "blocks" else "before the last block"
            raise RuntimeError(f"zo2.stream: {type(module).__name__} holds resident parameters but runs {where}; "
                               f"streaming needs the modules outside {self.path} to run before its first block "
                               f"(those listed before it in named_parameters()) or after its last; "
                               f"set zo2.stream = \"off\"")

    def _first_state(self, step: int) -> torch.Tensor:
        """The generator state of ``step`` at the first block (after the leading residents' z)."""
        gen = generator(self.plugin.cfg.seed, step)
        for p in self.leading:
            torch.randn(p.shape, generator=gen, dtype=torch.float32)
        return gen.get_state()

    # --------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, micro_batches: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        plugin, engine = self.plugin, self.engine
        cfg, step = plugin.cfg, engine.step
        eps = cfg.eps
        read0, written0 = self.store.bytes_read, self.store.bytes_written
        pending = plugin.pending
        if pending is not None and pending["first_state"] is None:
            pending["first_state"] = self._first_state(pending["step"])
        gen = generator(cfg.seed, step)
        residents = _Residents(self.device, eps)
        residents.add(self.leading, gen)
        first_state = gen.get_state()
        losses = (engine.step_loss(micro_batches), engine.step_loss(micro_batches))
        threads = torch.get_num_threads()
        lanes = [[_Lane(self, (lambda m=m, i=i, L=losses[sign]: engine.forward_objective(m, i, L)), threads)
                  for i, m in enumerate(micro_batches)] for sign in (0, 1)]
        n = len(self.blocks)
        producer = _Producer(self, gen, pending, cfg.prefetch_blocks)
        started = time.perf_counter()
        self._phase = "pre"
        try:
            for lane in lanes[0] + lanes[1]:
                lane.start()
            for sign in (0, 1):
                residents.to_sign(sign)
                for lane in lanes[sign]:
                    self._advance(lane, 0)
            self._phase = "blocks"
            for j in range(n):
                item = producer.next()
                if item.trailing is not None:
                    gen.set_state(item.trailing)
                    residents.add(self.trailing, gen)
                views = self.views(j, item.flat)
                self._bind(j, views)
                if j == n - 1:  # the + lanes run on into the head: every resident at theta+
                    self._phase = "post"
                    residents.to_sign(0)
                for lane in lanes[0]:
                    self._advance(lane, j + 1)
                regen = torch.Generator(device="cpu")
                regen.set_state(item.state)
                for v in views:
                    v.add_(draw(v.shape, regen, self.device), alpha=-2 * eps)
                if j == n - 1:
                    residents.to_sign(1)
                for lane in lanes[1]:
                    self._advance(lane, j + 1)
                self._bind(j, self.host_views[j])
                del views
                producer.release(item)
                del item
        except BaseException:
            for lane in lanes[0] + lanes[1]:
                lane.abort = True
                lane.go.set()
            raise
        finally:
            self._phase = None
            producer.stop()
            residents.restore()
            for j in range(n):
                self._bind(j, self.host_views[j])
            for lane in lanes[0] + lanes[1]:
                lane.join(timeout=60)
        pass_s = time.perf_counter() - started
        plus, minus = losses[0].local_loss(), losses[1].local_loss()
        grad, lr = plugin.projected_grad(plus, minus), plugin.lr()
        residents.update(grad, lr, cfg.weight_decay)
        plugin.pending = {"grad": grad, "step": step, "lr": lr, "first_state": first_state}
        self._last_step = {"zo2_bytes_moved": float(self.store.bytes_read - read0 + self.store.bytes_written - written0),
                           "zo2_prefetch_wait_s": producer.waited_s, "zo2_pass_s": pass_s}
        return plus, minus

    def _advance(self, lane: _Lane, expect: int) -> None:
        lane.advance()
        if lane.error is not None:
            raise lane.error
        if expect < len(self.blocks) and (lane.done or lane.at != expect):
            got = "finished" if lane.done else f"called block {lane.at}"
            raise RuntimeError(f"zo2.stream: the forward {got} where block {expect} of {self.path} was due; "
                               f"streaming needs every block called once per forward, in order "
                               f"(or set zo2.stream = \"off\")")
        if expect == len(self.blocks) and not lane.done:
            raise RuntimeError(f"zo2.stream: the forward called block {lane.at} of {self.path} again after the "
                               f"last block; set zo2.stream = \"off\"")

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the deferred update to every block now (a read and a write per block)."""
        pending = self.plugin.pending
        if pending is None:
            return
        state = pending["first_state"] if pending["first_state"] is not None else self._first_state(pending["step"])
        gen = torch.Generator(device="cpu")
        gen.set_state(state)
        wd = self.plugin.cfg.weight_decay
        for j in range(len(self.blocks)):
            flat = self.store.read(j)
            for v in self.views(j, flat):
                zo_update_(v, draw(v.shape, gen, self.device), pending["grad"], pending["lr"], wd if decays(v) else 0.0)
            self.store.write(j, flat)
        self.plugin.pending = None

    def metrics(self) -> dict[str, float]:
        return {**self._last_step, "zo2_block_bytes_peak": float(self.peak),
                "zo2_block_bytes": float(max(self.sizes) * 4),
                "zo2_resident_param_bytes_peak": float(self.peak + self.resident_bytes)}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
