"""Aligned direct I/O for the NVMe tier: 4096-byte aligned host buffers and a thread pool of
``preadv``/``pwritev`` calls on files opened with ``O_DIRECT``.

``O_DIRECT`` bypasses the page cache, so the bytes the tier reports are bytes the disk moved and
the tier's memory is only its buffers. A filesystem that refuses it (tmpfs answers ``EINVAL``)
falls back to buffered I/O on the same code path; :attr:`DirectFile.direct` and
:attr:`DirectFile.why_buffered` say which one ran. DeepSpeed's ``async_io`` op is not used (an
optional dependency this path does not need). Torch-free apart from the buffer view.
"""
from __future__ import annotations

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

ALIGN = 4096
CHUNK = 4 << 20  # bytes per preadv/pwritev call: large enough for the disk, small enough to spread over threads


def round_up(nbytes: int, align: int = ALIGN) -> int:
    return -(-nbytes // align) * align


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 host tensor of ``round_up(nbytes)`` bytes whose address is 4096-aligned."""
    size = round_up(max(nbytes, 1))
    raw = np.zeros(size + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return torch.from_numpy(raw[start:start + size])


class DirectFile:
    """One state file opened for aligned reads and writes at aligned offsets."""

    def __init__(self, path: str, nbytes: int) -> None:
        self.path, self.nbytes = path, round_up(nbytes)
        self.direct, self.why_buffered = True, ""
        flags = os.O_RDWR | os.O_CREAT
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, flags, 0o600)
            self.direct, self.why_buffered = False, f"O_DIRECT refused by the filesystem ({exc.strerror})"
        try:
            os.posix_fallocate(self.fd, 0, self.nbytes)  # ENOSPC now rather than mid-run
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                os.close(self.fd)
                raise
            os.ftruncate(self.fd, self.nbytes)

    def mapped(self) -> torch.Tensor:
        """The whole file as a flat fp32 tensor mapped from the page cache (for reading and writing
        state at rest, e.g. by checkpoints, without a copy in memory)."""
        return torch.from_numpy(np.memmap(self.path, dtype=np.float32, mode="r+", shape=(self.nbytes // 4,)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class IOPool:
    """Reads and writes of whole aligned regions, split into ``CHUNK``-byte calls over ``threads``."""

    def __init__(self, threads: int) -> None:
        """``threads`` for reads and as many for writes: a read never queues behind a slow write."""
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dtrain-offload-io")
        self.write_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dtrain-offload-iow")
        self.read_bytes = 0
        self.write_bytes = 0

    def _chunks(self, nbytes: int) -> list[tuple[int, int]]:
        return [(a, min(a + CHUNK, nbytes)) for a in range(0, nbytes, CHUNK)]

    def transfer(self, f: DirectFile, regions: list[tuple[torch.Tensor, int]], write: bool) -> None:
        """Read (or write) each ``(buffer, file offset)`` region, all regions' ``CHUNK``-byte calls
        in flight at once over the threads; blocks until every one is done. Buffers are aligned
        and a multiple of 4096 bytes, offsets 4096-aligned."""
        calls = []
        for buf, offset in regions:
            view = memoryview(buf.numpy())
            calls += [(self.write_pool if write else self.pool).submit(_pwrite if write else _pread, f.fd,
                                                                      view[a:b], offset + a)
                      for a, b in self._chunks(buf.numel())]
        for c in calls:
            c.result()
        moved = sum(buf.numel() for buf, _ in regions)
        if write:
            self.write_bytes += moved
        else:
            self.read_bytes += moved

    def read(self, f: DirectFile, buf: torch.Tensor | list[tuple[torch.Tensor, int]], offset: int = 0) -> None:
        """Fill ``buf`` (aligned, a multiple of 4096 bytes) from ``f`` at ``offset``, or each region
        of a list of ``(buffer, offset)``; blocks."""
        self.transfer(f, buf if isinstance(buf, list) else [(buf, offset)], write=False)

    def write(self, f: DirectFile, buf: torch.Tensor | list[tuple[torch.Tensor, int]], offset: int = 0) -> None:
        """Write ``buf`` to ``f`` at ``offset`` (or each ``(buffer, offset)`` region); blocks until
        the data reached the file."""
        self.transfer(f, buf if isinstance(buf, list) else [(buf, offset)], write=True)

    def submit(self, fn, *args) -> Future:
        return self.pool.submit(fn, *args)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        self.write_pool.shutdown(wait=True)


def _pread(fd: int, view: memoryview, offset: int) -> None:
    _whole(os.preadv, fd, view, offset, "read")


def _pwrite(fd: int, view: memoryview, offset: int) -> None:
    _whole(os.pwritev, fd, view, offset, "write")


def _whole(op, fd: int, view: memoryview, offset: int, what: str) -> None:
    """Repeat ``op`` (preadv/pwritev) until all of ``view`` is transferred; a short one is EIO."""
    done = 0
    while done < len(view):
        n = op(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short {what} at offset {offset + done}")
        done += n
