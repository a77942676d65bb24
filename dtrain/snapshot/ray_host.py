"""Under ``dtrain launch --ray`` a node's snapshot process is a Ray actor on that node.

The ranks find their node's snapshot process the same way under either launcher (its
``daemon.json`` in the node's run directory, see :mod:`dtrain.snapshot.client`); only who starts
it differs. Under the local launcher the node's first rank starts it as a process of its own
session. Under Ray (the launcher sets ``DTRAIN_SNAPSHOT_SPAWN=request``) that rank writes the
daemon's arguments to ``spawn.request`` instead; the node's agent reports the request with its next
poll, and the driver starts a :class:`SnapshotHost` actor pinned to that Ray node, which runs the
daemon in a thread until the job ends. So the snapshot process lives in Ray's process tree: it
outlives the ranks and their restarts (the driver owns it, not the per-attempt agents), it is
gone with its node, and the driver kills it when the job is over.

Torch-free and ray-free at import (the driver wraps the class with ``ray.remote``).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from dtrain.snapshot import daemon

__all__ = ["SnapshotHost", "REQUEST", "read_request"]

REQUEST = "spawn.request"


def read_request(node_dir: Path) -> list[str] | None:
    """The daemon arguments a rank asked for in ``node_dir``, if a request is pending."""
    try:
        return list(json.loads((node_dir / REQUEST).read_text())["argv"])
    except (OSError, ValueError, KeyError):
        return None


class SnapshotHost:
    """One node's snapshot process, as a Ray actor (see the module docstring)."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None

    def start(self, argv: list[str], timeout_s: float = 30.0) -> int:
        """Run the snapshot process for ``argv`` (the daemon's command-line arguments) in this
        actor; return once it serves (its ``daemon.json`` is written). Returns this process's pid."""
        args = daemon.parse_args(argv)
        ready = Path(args.dir) / "daemon.json"
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=daemon.run, args=(args,), name="dtrain-snapshot", daemon=True)
            self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the snapshot process of node {args.node} did not start in its Ray actor")
            time.sleep(0.02)
        (Path(args.dir) / REQUEST).unlink(missing_ok=True)
        return os.getpid()
