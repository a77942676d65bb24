"""Run a function on W ranks of a real gloo process group and collect each rank's result.

``run_world(fn, world, *args, nodes=1)`` spawns W fresh processes (one torch thread each), exports
the torchrun variables plus ``DTRAIN_NODES``/``DTRAIN_NPROC`` exactly as ``dtrain launch`` does,
calls ``fn(*args)`` on every rank and returns the list of per-rank return values. A rank that
raises makes ``run_world`` raise with that rank's traceback; a hang is bounded by ``timeout_s``.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, nodes: int, port: int, fn: Callable, args: tuple, queue) -> None:
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
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, nodes, port, fn, args, queue), daemon=True)
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
