"""A bounded stop: after SIGINT/SIGTERM the launcher and every process it started are gone in seconds.

The orderly path (the elastic agent sends SIGTERM to its workers, waits, then SIGKILLs them) relies
on the workers and on the launcher's own clean-up returning. A rank blocked in a collective, one
that ignores SIGTERM, a child a rank started, or a clean-up step that blocks must not keep the job
alive. :class:`Reaper` therefore runs a watchdog thread from the first signal on:

* at once it records the launcher's descendants and their process groups (every rank is the
  leader of its own group: forked ranks call ``os.setpgid`` in dtrain/launch/zygote.py, spawned
  ones are session leaders), so the children of a rank that dies first are still found;
* after ``grace_s`` (or at a second signal) it SIGKILLs those groups and every descendant;
* if the launcher has still not returned ``exit_after_s`` after the signal, it runs the last
  clean-up it was given (network namespaces, the run directory) and ends the process with
  ``os._exit(128 + signal)``;
* :meth:`Reaper.exit_if_signalled` lets the launcher end the same way once its own clean-up is
  done: the interpreter's finalisation (torch's stores and process groups) takes seconds on a busy
  machine and has nothing left to do.

The snapshot processes of the job are in their own sessions and are stopped by the launcher's
clean-up (dtrain.snapshot.client.remove_run), or killed here when they are still descendants.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

__all__ = ["Reaper", "kill_tree", "descendants"]


def descendants() -> dict[int, int]:
    """PID -> process group of every live descendant of this process."""
    import psutil

    out: dict[int, int] = {}
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return out
    for child in children:
        try:
            out[child.pid] = os.getpgid(child.pid)
        except OSError:
            pass
    return out


def kill_tree(known: dict[int, int] | None = None, sig: int = signal.SIGKILL, everything: bool = False) -> None:
    """Send ``sig`` to every process group led by a descendant (a rank and what it started) and to
    its members among the descendants. Descendants in this process's own group (the fork server,
    multiprocessing's resource tracker) are left to exit with it, unless ``everything``."""
    own_group = os.getpgrp()
    procs = {**(known or {}), **descendants()}
    for pgid in set(procs.values()):
        if pgid != own_group and pgid > 1:
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
    for pid, pgid in procs.items():
        if pgid != own_group or everything:
            try:
                os.kill(pid, sig)
            except OSError:
                pass


class Reaper:
    """Watchdog that bounds how long a stop signal takes (see the module docstring)."""

    def __init__(self, grace_s: float = 2.0, exit_after_s: float = 6.0,
                 last_cleanup: Callable[[], None] | None = None) -> None:
        self.grace_s = grace_s
        self.exit_after_s = exit_after_s
        self.last_cleanup = last_cleanup
        self.signal: int | None = None
        self._known: dict[int, int] = {}
        self._now = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()

    def on_signal(self, sig: int) -> bool:
        """Arm the watchdog (first signal: returns True) or kill at once (any later one: False)."""
        with self._lock:
            if self.signal is not None:
                self._now.set()
                return False
            self.signal = sig
        self._known = descendants()
        threading.Thread(target=self._watch, name="dtrain-reaper", daemon=True).start()
        return True

    def done(self) -> None:
        """The launcher has finished its clean-up: nothing more to force. After a signal, what is
        left of the ranks' process groups (a child a rank started) is killed now."""
        self._done.set()
        if self.signal is not None:
            kill_tree(self._known)

    def exit_if_signalled(self, status: int) -> None:
        """After a stop signal and a finished clean-up: flush the std streams and ``os._exit``."""
        if self.signal is None:
            return
        import sys

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)

    def _watch(self) -> None:
        start = time.monotonic()
        self._now.wait(self.grace_s)
        if self._done.is_set():
            return
        kill_tree(self._known)
        if self._done.wait(max(0.0, self.exit_after_s - (time.monotonic() - start))):
            return
        kill_tree(self._known, everything=True)
        try:
            if self.last_cleanup is not None:
                self.last_cleanup()
        finally:
            os._exit(128 + int(self.signal or signal.SIGTERM))
