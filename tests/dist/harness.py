"""Run a function on W ranks of a real gloo process group and collect each rank's result.

``run_world(fn, world, *args, nodes=1)`` starts W fresh processes (one torch thread each), exports
the torchrun variables plus ``DTRAIN_NODES``/``DTRAIN_NPROC`` exactly as ``dtrain launch`` does,
calls ``fn(*args)`` on every rank and returns the list of per-rank return values. A rank that
raises makes ``run_world`` raise with that rank's traceback; a hang is bounded by ``timeout_s``.

Ranks are forked from a fork server that has imported torch and dtrain once (importing torch costs
~3 s of CPU per process on the 2-core CI machine, and the suite starts several hundred ranks). The
server is a fresh interpreter, not a fork of pytest, and each rank takes the caller's current
environment, so a rank sees what a spawned one would. ``DTRAIN_TEST_START=spawn`` starts every
rank as a fresh interpreter instead.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp
from multiprocessing import reduction


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "dtrain.engine", "tests.dist.harness"]
_context: Any = None


def _start_context() -> Any:
    """The multiprocessing context ranks start from (one fork server for the whole test session)."""
    global _context
    if _context is None:
        method = os.environ.get("DTRAIN_TEST_START", "forkserver")
        _context = mp.get_context(method)
        if method == "forkserver":
            _context.set_forkserver_preload(PRELOAD)
    return _context


def _received_fd(wrapped: Any) -> int:
    return wrapped.detach()


class _CallerFd:
    """One of the caller's file descriptors, sent to the rank when the rank is started (as a spawned
    child inherits it), so pytest's ``capfd`` sees what the ranks write, as it does with spawn."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple:
        return _received_fd, (reduction.DupFd(self.fd),)


def _worker(rank: int, world: int, nodes: int, port: int, fn: Callable, args: tuple, queue,
            environ: dict[str, str], stdio: tuple[int, int] | None) -> None:
    for target, fd in zip((1, 2), stdio or ()):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(environ)  # the caller's environment now, not the fork server's at its start
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank % (world // nodes)), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DTRAIN_NODES=str(nodes), DTRAIN_NPROC=str(world // nodes), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(*args)
        queue.put((rank, "ok", pickle.dumps(result)))  # plain pickle: no shared-memory handles
    except BaseException as exc:  # report every failure, including CollectiveTimeout
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        from dtrain.runtime import shutdown

        try:
            shutdown()
        except Exception:
            pass


def run_world(fn: Callable, world: int, *args: Any, nodes: int = 1, timeout_s: float = 240,
              allow_errors: bool = False) -> list[Any]:
    """Per-rank results of ``fn(*args)``; with ``allow_errors`` a failing rank yields its error text."""
    ctx = _start_context()
    queue = ctx.Queue()
    port = free_port()
    forked = ctx.get_start_method() == "forkserver"  # a spawned rank inherits the caller's stdio itself
    environ, stdio = dict(os.environ), ((_CallerFd(1), _CallerFd(2)) if forked else None)
    procs = [ctx.Process(target=_worker, args=(r, world, nodes, port, fn, args, queue, environ, stdio),
                         daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout_s
    dead_since: dict[int, float] = {}
    try:
        while len(results) + len(errors) < world:
            try:
                rank, status, value = queue.get(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            except queue_mod.Empty:
                pending = sorted(set(range(world)) - results.keys() - errors.keys())
                # A rank that died before reporting (import error, abort) would otherwise hold the
                # test until the deadline; its result may still be in the pipe, hence the grace.
                dead = [r for r in pending if procs[r].exitcode not in (None, 0)]
                if dead and time.monotonic() > dead_since.setdefault(dead[0], time.monotonic()) + 5:
                    raise RuntimeError(f"rank {dead[0]} died (exit {procs[dead[0]].exitcode}) without a result; "
                                       f"its stderr is above") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"ranks {pending} did not finish within {timeout_s} s") from None
                continue
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors and not allow_errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
    return [results.get(r, errors.get(r)) for r in range(world)]
