"""Every collective dtrain issues goes through :class:`Comm`.

It owns three things: the choice of process group for a topology level, byte counters per level
(bytes this rank sends under a ring schedule, or directly for all-to-all, attributed to the
smallest level whose blocks contain the whole group), and timeouts. A collective's ``level`` is a
level name (``"node"``, ``"global"``, a declared level such as ``"pair"``) or an int: the
aligned block of that many ranks (a power of two; see :meth:`Comm.block_group`). The topology
model and the byte attribution are described in docs/topology.md. Each collective is issued asynchronously and waited for
with the configured timeout; one that does not complete raises :class:`CollectiveTimeout`
naming the rank, the operation, its sequence number and the group, instead of hanging.
Nothing here assumes a backend or a device: gloo on CPU and NCCL on CUDA take the same path.
"""
from __future__ import annotations

import datetime
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
import torch.distributed as dist

from dtrain.topology import Topology

Level = Union[str, int, tuple]
"""A level name, the size of an aligned block of ranks (a power of two), or the ranks of one
aligned block as a tuple (:meth:`Topology.range_group`: only that block's group is created)."""


class CollectiveError(RuntimeError):
    """A collective failed (a peer died or the group is broken)."""


class CollectiveTimeout(CollectiveError):
    """A collective did not complete within the configured timeout."""


@dataclass
class Handle:
    """An in-flight collective; :meth:`wait` applies the timeout and names the failure."""

    work: dist.Work | None
    comm: "Comm"
    op: str
    seq: int
    level: str
    ranks: list[int]
    then: Callable[[], None] | None = None  # local work that completes the collective's result

    def completed(self) -> bool:
        """The collective has finished, so :meth:`wait` would not block (works without a completion
        query count as unfinished)."""
        if self.work is None:
            return True
        is_completed = getattr(self.work, "is_completed", None)
        return bool(is_completed()) if is_completed is not None else False

    def wait(self) -> None:
        if self.work is None:
            return
        work, self.work = self.work, None
        start = time.perf_counter()
        try:
            ok = work.wait(timeout=datetime.timedelta(seconds=self.comm.timeout_s))
        except RuntimeError as exc:
            raise self.comm.failure(self, exc) from exc
        finally:
            self.comm.wait_s[f"{self.op}@{self.level}"] += time.perf_counter() - start
        if ok is False:
            raise self.comm.failure(self, None)
        if self.then is not None:
            then, self.then = self.then, None
            then()


class Comm:
    """Collectives over the groups of a :class:`Topology`, with byte counters and timeouts."""

    def __init__(self, topology: Topology, timeout_s: float) -> None:
        self.topology = topology
        self.timeout_s = timeout_s
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.wait_s: dict[str, float] = defaultdict(float)
        """Seconds callers spent blocked in :meth:`Handle.wait`, per ``op@group``."""
        self._seq = 0
        self._lock = threading.Lock()  # plugins may issue collectives from a background thread

    @property
    def rank(self) -> int:
        return self.topology.shape.rank

    def group_ranks(self, level: Level, peers: bool | str = False) -> list[int]:
        """The ranks of this rank's group: its block at ``level``, its peers of ``level``
        (``peers=True``), or its peers of ``level`` inside its block of the level named ``peers``."""
        shape = self.topology.shape
        if isinstance(level, tuple):
            if peers or self.rank not in level:
                raise ValueError(f"rank {self.rank} cannot use the rank block {level} (peers=False, a block "
                                 f"holding this rank)")
            return list(level)
        if isinstance(level, int):
            if peers:
                raise ValueError("peers=True needs a level name, not an aligned block size")
            return shape.aligned_block_of(level)
        if isinstance(peers, str):
            return shape.peers_within(level, peers)
        return shape.peers_of(level) if peers else shape.block_of(level)

    def size(self, level: Level, peers: bool | str = False) -> int:
        return len(self.group_ranks(level, peers))

    def block_group(self, size: int | str) -> dist.ProcessGroup | None:
        """The group of this rank's aligned block of ``size`` ranks (or of the level named ``size``).

        Creating a size's groups is collective (see :meth:`Topology.block_group`): every rank asks
        for the same sizes in the same order. The collectives here create them on first use
        too, so ``comm.all_to_all_single(out, inp, level=4)`` carries the same rule.
        """
        return self.topology.block_group(size)

    def all_reduce(self, tensor: torch.Tensor, level: Level = "global", *, peers: bool | str = False,
                   op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, async_op: bool = False) -> Handle:
        n = self.size(level, peers)
        return self._issue("all_reduce", level, peers, 2 * (n - 1) * _nbytes(tensor) // max(n, 1), async_op,
                           lambda g: dist.all_reduce(tensor, op=op, group=g, async_op=True))

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, level: Level = "global", *,
                       peers: bool | str = False, async_op: bool = False) -> Handle:
        """Sum-reduce ``input`` (n equal chunks) and leave chunk ``group rank`` in ``output``.

        On gloo it is an all-to-all plus a local sum in group order: torch's gloo reduce-scatter
        all-reduces the whole input (2(n-1)/n of it on the wire, not the (n-1)/n counted here).
        """
        n = self.size(level, peers)
        if n == 1:
            output.copy_(input)
        elif n == 2 and _gloo_pair(input, output):
            # a pair swaps the halves it does not keep and adds: one send and one receive, no full-size buffer
            me = self.group_ranks(level, peers).index(self.rank)
            halves, received = input.view(2, -1), torch.empty_like(output).view(-1)
            handle = self._issue("reduce_scatter", level, peers, _nbytes(input) // 2, True,
                                 lambda g: self._swap(halves[1 - me], received, level, peers, g))
            handle.then = lambda: torch.add(halves[me], received, out=output.view(-1))
            if not async_op:
                handle.wait()
            return handle
        elif dist.get_backend() == "gloo":
            chunks = torch.empty_like(input)
            handle = self._issue("reduce_scatter", level, peers, (n - 1) * _nbytes(input) // n, True,
                                 lambda g: dist.all_to_all_single(chunks, input, group=g, async_op=True))
            handle.then = lambda: torch.sum(chunks.view(n, -1), dim=0, out=output.view(-1))
            if not async_op:
                handle.wait()
            return handle
        return self._issue("reduce_scatter", level, peers, (n - 1) * _nbytes(input) // max(n, 1), async_op,
                           lambda g: _reduce_scatter_flat(output, input, group=g, async_op=True))

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, level: Level = "global", *,
                   peers: bool | str = False, async_op: bool = False) -> Handle:
        """Concatenate every group member's ``input`` into the flat ``output``."""
        n = self.size(level, peers)
        if n == 1 and output.data_ptr() != input.data_ptr():
            output.copy_(input)
        if n == 2 and _gloo_pair(output, input):
            # gloo's all-gather fills a temporary of the output's size and copies it out; a pair sends its
            # part and receives the other straight into ``output``
            me = self.group_ranks(level, peers).index(self.rank)
            halves = output.view(2, -1)
            if halves[me].data_ptr() != input.data_ptr():
                halves[me].copy_(input.view(-1))
            return self._issue("all_gather", level, peers, _nbytes(output) // 2, async_op,
                               lambda g: self._swap(input.view(-1), halves[1 - me], level, peers, g))
        return self._issue("all_gather", level, peers, (n - 1) * _nbytes(output) // max(n, 1), async_op,
                           lambda g: _all_gather_flat(output, input, group=g, async_op=True))

    def broadcast(self, tensor: torch.Tensor, src: int, level: Level = "global", *,
                  peers: bool | str = False, async_op: bool = False) -> Handle:
        """Broadcast from global rank ``src`` (a member of this rank's group at ``level``)."""
        sent = _nbytes(tensor) if self.rank == src else 0
        return self._issue("broadcast", level, peers, sent, async_op,
                           lambda g: dist.broadcast(tensor, src=src, group=g, async_op=True))

    def all_gather_json(self, obj: Any, level: Level = "global") -> list[Any]:
        """Every group member's JSON-serialisable ``obj``, in group order (small control data)."""
        data = json.dumps(obj).encode()
        n, device = self.size(level), self._device_hint()
        sizes = torch.zeros(n, dtype=torch.int64, device=device)
        self.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device), level)
        width = int(sizes.max())
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
        out = torch.zeros(n * width, dtype=torch.uint8, device=device)
        self.all_gather(out, mine.to(device), level)
        rows = out.cpu().view(n, width)
        return [json.loads(bytes(rows[i, :int(sizes[i])].tolist())) for i in range(n)]

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, level: Level = "global", *,
                          output_split_sizes: Sequence[int] | None = None,
                          input_split_sizes: Sequence[int] | None = None, async_op: bool = False) -> Handle:
        """Scatter ``input`` along dim 0 to the group's members, gather theirs into ``output``.

        Without split sizes both are cut into n equal chunks (chunk i goes to / comes from group
        member i); with them, ``input_split_sizes[i]`` rows go to member i and
        ``output_split_sizes[i]`` rows arrive from it. Counted bytes: what this rank sends to the
        other members (its own chunk stays local).
        """
        ranks = self.group_ranks(level)
        n, me = len(ranks), ranks.index(self.rank)
        if input_split_sizes is not None:
            row = _nbytes(input) // max(input.shape[0], 1)
            sent = (sum(input_split_sizes) - input_split_sizes[me]) * row
        else:
            sent = (n - 1) * _nbytes(input) // max(n, 1)
        if n == 1:
            output.copy_(input)
        out_splits = list(output_split_sizes) if output_split_sizes is not None else None
        in_splits = list(input_split_sizes) if input_split_sizes is not None else None
        return self._issue("all_to_all_single", level, False, sent, async_op,
                           lambda g: dist.all_to_all_single(output, input, out_splits, in_splits,
                                                            group=g, async_op=True))

    def _swap(self, send: torch.Tensor, recv: torch.Tensor, level: Level, peers: bool | str,
              group: dist.ProcessGroup | None) -> "_Works":
        """Send ``send`` to the other rank of a 2-rank group and receive its tensor into ``recv``."""
        ranks = self.group_ranks(level, peers)
        other = ranks[1 - ranks.index(self.rank)]
        return _Works([dist.isend(send, dst=other, group=group), dist.irecv(recv, src=other, group=group)])

    def barrier(self, level: Level = "global") -> None:
        self.all_reduce(torch.zeros(1, device=self._device_hint()), level)

    def _device_hint(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.is_initialized() and \
            dist.get_backend() == "nccl" else torch.device("cpu")

    def _issue(self, op: str, level: Level, peers: bool | str, nbytes: int, async_op: bool, launch) -> Handle:
        ranks = self.group_ranks(level, peers)
        # Aligned-block groups are created (collectively) before the sequence number is taken.
        group = None
        if isinstance(level, int) and len(ranks) > 1:
            group = self.topology.block_group(level)
        elif isinstance(level, tuple) and len(ranks) > 1:
            group = self.topology.range_group(level)
        label = (f"block{level}" if isinstance(level, int) else f"ranks{level[0]}-{level[-1]}"
                 if isinstance(level, tuple) else
                 level + (f" peers in {peers}" if isinstance(peers, str) else " peers" if peers else ""))
        with self._lock:
            self._seq += 1
            handle = Handle(None, self, op, self._seq, label, ranks)
            if len(ranks) > 1:
                self.bytes_sent[self.topology.shape.level_of_ranks(ranks)] += nbytes
        if len(ranks) > 1:
            if isinstance(level, str):
                group = (self.topology.peer_group(level, peers if isinstance(peers, str) else None) if peers
                         else self.topology.group(level))
            try:
                handle.work = launch(group)
            except RuntimeError as exc:
                raise self.failure(handle, exc) from exc
        if not async_op:
            handle.wait()
        return handle

    def failure(self, handle: Handle, exc: BaseException | None) -> CollectiveError:
        what = (f"rank {self.rank}: {handle.op} #{handle.seq} on group '{handle.level}' "
                f"(ranks {handle.ranks})")
        text = str(exc or "").strip()
        if exc is None or "timed out" in text.lower() or "timeout" in text.lower():
            return CollectiveTimeout(
                f"{what} did not complete within {self.timeout_s:g} s; a peer rank skipped this "
                f"collective, hung or died (raise comm.timeout_s if the step is just slow)"
            )
        return CollectiveError(f"{what} failed: {text.splitlines()[0] if text else type(exc).__name__}")


# torch >= 2.13 renames the flat-tensor collectives; older releases only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Works:
    """The point-to-point works that make up one collective, waited for as one."""

    def __init__(self, works: list[dist.Work]) -> None:
        self.works = works

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        done = [w.wait(timeout=timeout) if timeout is not None else w.wait() for w in self.works]
        return all(ok is not False for ok in done)


def _gloo_pair(whole: torch.Tensor, half: torch.Tensor) -> bool:
    """A 2-rank all-gather (into ``whole``) or reduce-scatter (of ``whole``) that :meth:`Comm._swap` can
    do on gloo: contiguous tensors, ``half`` one half of ``whole``."""
    return (dist.get_backend() == "gloo" and whole.is_contiguous() and half.is_contiguous()
            and whole.numel() == 2 * half.numel())


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
