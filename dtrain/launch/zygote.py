"""The local launcher's fork server: torch is imported once, and every rank is forked from it.

A rank started as a fresh interpreter spends about 3 s of CPU on imports before its first step
(torch ~1.8 s, and torch._dynamo ~1.3 s, which the optimizer imports on its first ``step``).
Under ``dtrain launch`` those imports happen once per job instead: :func:`start` launches
multiprocessing's fork server with them preloaded while the launcher itself is still importing
the elastic agent (the two overlap on separate cores), and each rank, and each rank of every
restart attempt, is a fork of that server running :func:`run_script`. Forking from a dedicated
single-threaded server process (not from the launcher, which runs threads and TCP stores) is
what makes this safe; CUDA is never initialised in the server.

The server inherits the launcher's environment as it is when :func:`start` runs, so variables
read while torch loads (``OMP_NUM_THREADS``) are set before that. Per-rank variables are set by
the elastic agent in each child before the script runs.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from collections.abc import Mapping

from dtrain.launch import bootstrap

__all__ = ["PRELOAD", "start", "run_script"]

PRELOAD: tuple[str, ...] = (
    "numpy", "torch", "torch._dynamo", "torch.distributed", "torch.distributed.elastic.multiprocessing.errors",
    "dtrain", "dtrain.engine", "dtrain.models",
)


def start(env_defaults: Mapping[str, str]) -> None:
    """Start the fork server (if not running) with :data:`PRELOAD` imported; returns at once.

    ``env_defaults`` are set in this process's environment where it has not chosen them, so the
    server and every rank see them from the first import on.
    """
    for key, value in env_defaults.items():
        os.environ.setdefault(key, value)
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    multiprocessing.forkserver.ensure_running()


def run_script(script: str, *args: str) -> None:
    """Run ``script`` as ``__main__`` with ``args`` through the rank bootstrap
    (:func:`dtrain.launch.bootstrap.run_script`: one rank event line on failure, a usage error as
    one line and exit status 2).

    ``atexit`` handlers run at the end, because a forked process leaves through ``os._exit``.
    """
    _threads_from_env()
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # its own process group: the launcher can stop it with all its children
    try:
        bootstrap.run_script(script, *args)
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


def _threads_from_env() -> None:
    """torch's intra-op threads as this rank's ``OMP_NUM_THREADS`` says, as in a fresh interpreter.

    The thread count was fixed when the server imported torch, from the server's environment; a
    rank's may differ (a Ray worker's environment says how many CPUs the actor has, the rank's 1).
    """
    torch = sys.modules.get("torch")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
