"""Aligned direct I/O for the NVMe tier: 4096-byte aligned host buffers and the two engines that
move them to and from files opened with ``O_DIRECT``.

* :class:`IOPool` (``offload.io = "threads"``): a thread pool of ``preadv``/``pwritev`` calls.
* :class:`AsyncIO` (``offload.io = "async_io"``): DeepSpeed's ``async_io`` op (libaio), one handle
  for reads and one for writes, its staging buffers page-locked by the op's own allocator so it
  moves them without a bounce copy.

:class:`IOChoice` resolves ``offload.io`` once per rank (``"auto"``: the op where it loads and a
probe on the offload directory finds it faster, else the thread pool, and says why).
``O_DIRECT`` bypasses the page cache, so the bytes the tier reports are bytes the disk moved and
the tier's memory is only its buffers.
A filesystem that refuses it (tmpfs answers ``EINVAL``) falls back to buffered I/O through the
thread pool; :attr:`DirectFile.direct` and :attr:`DirectFile.why_buffered` say which one ran.
docs/offload.md ("NVMe data path") has the measurements behind the choice.
"""
from __future__ import annotations

import atexit
import errno
import os
import resource
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    name = "threads"

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
        self._count(regions, write)

    def _count(self, regions: list[tuple[torch.Tensor, int]], write: bool) -> None:
        """Add a finished transfer's bytes to ``read_bytes`` or ``write_bytes``."""
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

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A staging buffer this engine moves best (here: :func:`aligned_buffer`)."""
        return aligned_buffer(nbytes)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        self.write_pool.shutdown(wait=True)


AIO_BLOCK = 1 << 20  # bytes per libaio request (DeepSpeed's default aio block_size)
AIO_QUEUE_DEPTH = 16  # requests in flight per handle


class AsyncIO(IOPool):
    """DeepSpeed's ``async_io`` op: each region is one asynchronous request on the read or the
    write handle, all of a transfer's regions in flight at once, then one ``wait``.

    A handle's ``wait`` waits for everything queued on it, so each direction has its own handle
    and one caller at a time (a lock): a read never waits for a write. ``intra_op_parallelism``
    is 1 because the op splits a request evenly over its threads and ``O_DIRECT`` needs every
    piece 4096-aligned, which a 4096-byte region split in two is not; the parallelism comes from
    the queue depth instead. Files that refused ``O_DIRECT`` (the op always opens with it) go
    through the thread pool. The op checks each request's submission, not its completion status,
    so a completed count short of the requests is the only failure it can report (an ``OSError``
    here); files are preallocated at start-up, so a full disk fails there, not mid-step."""

    name = "async_io"

    def __init__(self, threads: int, op: Any) -> None:
        super().__init__(threads)
        self.handles = {w: op.aio_handle(AIO_BLOCK, AIO_QUEUE_DEPTH, False, True, 1) for w in (False, True)}
        self.locks = {w: threading.Lock() for w in (False, True)}
        self.locked: list[torch.Tensor] = []
        _LIVE.add(self)

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A 4096-aligned buffer page-locked by the op's allocator (the op moves it directly)."""
        t = self.handles[False].new_cpu_locked_tensor(round_up(max(nbytes, 1)), torch.empty(0, dtype=torch.uint8))
        t.zero_()
        self.locked.append(t)
        return t

    def transfer(self, f: DirectFile, regions: list[tuple[torch.Tensor, int]], write: bool) -> None:
        if not f.direct:
            return super().transfer(f, regions, write)
        handle, what = self.handles[write], "write" if write else "read"
        with self.locks[write]:
            queued = 0
            failed = None
            for buf, offset in regions:
                rc = (handle.async_pwrite(buf, f.fd, offset) if write else handle.async_pread(buf, f.path, offset))
                if rc != 0:
                    failed = offset
                    break
                queued += 1
            done = handle.wait() if queued else 0
        if failed is not None or done != queued:
            where = failed if failed is not None else regions[0][1]
            raise OSError(errno.EIO, f"async_io {what} of {f.path} at offset {where} failed "
                                     f"({done} of {len(regions)} requests completed)")
        self._count(regions, write)

    def shutdown(self) -> None:
        super().shutdown()
        for t in self.locked:
            self.handles[False].free_cpu_locked_tensor(t)
        self.locked = []
        self.handles = {}  # their destructors join the op's threads now, not at interpreter exit
        _LIVE.discard(self)


_LIVE: "weakref.WeakSet[AsyncIO]" = weakref.WeakSet()


@atexit.register
def _shutdown_live() -> None:
    """A process that never closed its engine (no ``engine.close()``): the op's handles must go
    before the interpreter finalizes, or their threads are destroyed joinable (std::terminate)."""
    for engine in list(_LIVE):
        engine.shutdown()


class AsyncIOUnavailable(RuntimeError):
    """DeepSpeed's async_io op cannot run here (the message says why)."""


_AIO_OP: list[Any] = []  # the loaded op, once per process (loading checks its build every time)


def _builder() -> Any:
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except Exception as exc:  # noqa: BLE001 - not installed, or an import-time failure of deepspeed
        raise AsyncIOUnavailable(f"deepspeed is not importable ({type(exc).__name__})") from None
    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        raise AsyncIOUnavailable("DeepSpeed's async_io op needs libaio (apt install libaio-dev)")
    return builder


def load_async_io() -> Any:
    """DeepSpeed's ``async_io`` op, built on first use (minutes, once per machine); raises
    :class:`AsyncIOUnavailable` with the reason where it cannot load."""
    if _AIO_OP:
        return _AIO_OP[0]
    builder = _builder()
    try:
        op = builder.load(verbose=False)
    except Exception as exc:  # noqa: BLE001 - a compiler error, a missing toolchain
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise AsyncIOUnavailable(f"DeepSpeed's async_io op did not build ({type(exc).__name__}: {first})") from None
    _AIO_OP.append(op)
    return op


def _op_is_built(builder: Any) -> bool:
    """Whether loading the op needs no compiler run: installed prebuilt, or in torch's JIT cache."""
    import importlib.util

    from torch.utils.cpp_extension import _get_build_directory

    try:
        if importlib.util.find_spec(builder.absolute_name()) is not None:
            return True
    except ModuleNotFoundError:
        pass
    return os.path.exists(os.path.join(_get_build_directory(builder.name, False), f"{builder.name}.so"))


def lockable_bytes() -> int | None:
    """How many bytes this process may page-lock (None: no limit, or root, who is not limited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or os.geteuid() == 0:
        return None
    return soft


PROBE_BYTES = 16 << 20  # per direction and engine in "auto"'s probe: ~20-60 ms of I/O here
PROBE_ROUNDS = 3
PROBE_TIMEOUT_S = 120
_PROBED: dict[tuple[int, int], dict[str, Any]] = {}  # (filesystem device, threads) -> probe_rates()


def probe_rates(directory: Path, threads: int) -> dict[str, Any]:
    """Both engines' bytes per second on ``directory`` ({"threads": ..., "async_io": ...}: a write
    then a read of ``PROBE_BYTES`` in 4 MiB regions, interleaved over ``PROBE_ROUNDS``, median),
    {} where the filesystem refuses ``O_DIRECT``, or {"unavailable": why} where the op is not
    installed or not built ("auto" never starts a build of minutes). Run in a child process, so
    the training process imports deepspeed (~32 MiB of RSS) only when the op wins. Once per
    filesystem and thread count in a process."""
    key = (os.stat(directory).st_dev, threads)
    if key in _PROBED:
        return _PROBED[key]
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None:
        found: dict[str, Any] = {"unavailable": "deepspeed is not installed"}
    else:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            proc = subprocess.run([sys.executable, "-c", "import sys; from dtrain.offload.aio import _probe_main; "
                                   "_probe_main(sys.argv[1], int(sys.argv[2]))", str(directory), str(threads)],
                                  env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
            found = (json.loads(lines[-1][6:]) if lines else
                     {"unavailable": f"the async_io probe failed ({(proc.stderr.strip().splitlines() or ['?'])[-1][:160]})"})
        except subprocess.TimeoutExpired:
            found = {"unavailable": f"the async_io probe took over {PROBE_TIMEOUT_S} s"}
    _PROBED[key] = found
    return found


def _probe_main(directory: str, threads: int) -> None:
    """The probe's child process: prints ``PROBE <json>`` (see :func:`probe_rates`)."""
    import json

    try:
        builder = _builder()
        limit = lockable_bytes()
        if limit is not None and limit < 2 * PROBE_BYTES:
            raise AsyncIOUnavailable(f"RLIMIT_MEMLOCK allows {limit / 2**20:.0f} MiB of page-locked buffers (ulimit -l)")
        if not _op_is_built(builder):
            raise AsyncIOUnavailable("DeepSpeed's async_io op is not built yet (offload.io = \"async_io\" builds it "
                                     "once, a few minutes)")
        found: dict[str, Any] = _probe(Path(directory), threads, load_async_io())
    except AsyncIOUnavailable as exc:
        found = {"unavailable": str(exc)}
    print("PROBE " + json.dumps(found), flush=True)
    os._exit(0)  # nothing of deepspeed's to tear down


def _probe(directory: Path, threads: int, op: Any) -> dict[str, float]:
    f = DirectFile(str(directory / "io-probe"), PROBE_BYTES)
    engines = [IOPool(threads), AsyncIO(threads, op)]
    try:
        if not f.direct:
            return {}
        bufs = [e.buffer(PROBE_BYTES) for e in engines]
        times: dict[str, list[float]] = {e.name: [] for e in engines}
        for _ in range(PROBE_ROUNDS):
            for e, buf in zip(engines, bufs):
                regions = [(buf[a:a + CHUNK], a) for a in range(0, PROBE_BYTES, CHUNK)]
                t0 = time.perf_counter()
                e.transfer(f, regions, write=True)
                e.transfer(f, regions, write=False)
                times[e.name].append(time.perf_counter() - t0)
        return {name: 2 * PROBE_BYTES / sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    finally:
        for e in engines:
            e.shutdown()
        f.close()
        os.unlink(f.path)


@dataclass
class IOChoice:
    """``offload.io`` for one rank: :meth:`resolve` picks the engine once, :meth:`engine` makes one
    per store (the optimizer state's, the parameters')."""

    mode: str
    """"auto", "async_io" or "threads"."""
    threads: int
    name: str = "threads"
    """The engine in use: "threads" or "async_io"."""
    why: str = ""
    """Why that engine (the probe's rates, or why the op cannot run)."""
    locked: int = 0
    """Bytes of staging buffers page-locked so far (async_io)."""

    def resolve(self, directory: Path) -> None:
        """Pick the engine: "threads" as asked; "async_io" if the op loads, building it if need be
        (else :class:`AsyncIOUnavailable` with the reason); "auto": the faster of the two on
        ``directory`` (:func:`probe_rates`) where the op is built, else the thread pool."""
        if self.mode == "threads":
            self.name, self.why = "threads", "offload.io = \"threads\""
            return
        if self.mode == "async_io":
            load_async_io()
            self.name, self.why = "async_io", "offload.io = \"async_io\""
            return
        rates = probe_rates(directory, self.threads)
        if "unavailable" in rates:
            self.name, self.why = "threads", rates["unavailable"]
        elif not rates:
            self.name, self.why = "threads", "O_DIRECT refused by offload.dir's filesystem"
        else:
            self.name = max(("threads", "async_io"), key=lambda k: rates[k])
            self.why = (f"probe on offload.dir: preadv/pwritev {rates['threads'] / 1e9:.2f} GB/s, "
                        f"async_io {rates['async_io'] / 1e9:.2f} GB/s")

    def engine(self, locked_bytes: int) -> IOPool:
        """An engine for a store whose staging buffers total ``locked_bytes``. async_io locks them
        in memory: past RLIMIT_MEMLOCK "auto" takes the thread pool, "async_io" raises :class:`AsyncIOUnavailable`."""
        if self.name == "async_io":
            limit = lockable_bytes()
            if limit is not None and self.locked + locked_bytes > limit:
                why = (f"its staging buffers ({(self.locked + locked_bytes) / 2**20:.0f} MiB) are page-locked "
                       f"and RLIMIT_MEMLOCK allows {limit / 2**20:.0f} MiB (raise it with ulimit -l)")
                if self.mode == "async_io":
                    raise AsyncIOUnavailable(why)
                self.name, self.why = "threads", why
            else:
                self.locked += locked_bytes
                return AsyncIO(self.threads, load_async_io())
        return IOPool(self.threads)

    def describe(self) -> str:
        """Which engine runs and why, for the start-up line."""
        what = "DeepSpeed's async_io op" if self.name == "async_io" else "a thread pool of preadv/pwritev"
        return f"{what} ({self.why})" if self.why else what


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
