"""Exec wrapper: enter a network namespace, then run a script or module as ``__main__``.

    python dtrain/launch/netns_exec.py NAMESPACE script.py [args...]   (by path: imports nothing)
    python -m dtrain.launch.netns_exec NAMESPACE script.py [args...]
    python -m dtrain.launch.netns_exec NAMESPACE -m package.module [args...]
    python -m dtrain.launch.netns_exec --by-rank script.py [args...]   # DTRAIN_NETNS_PREFIX + node

The namespace is joined with ``setns(2)`` (ctypes; Python 3.11 has no ``os.setns``) before
torch.distributed is imported or any socket exists, so every connection of the rank, gloo's
included, lives in that namespace. ``--by-rank`` picks ``{DTRAIN_NETNS_PREFIX}-n{RANK //
DTRAIN_NPROC}`` (what ``dtrain launch --net`` uses, since its agent starts every worker alike).
"""
from __future__ import annotations

import ctypes
import os
import runpy
import sys

CLONE_NEWNET = 0x40000000


def enter(namespace: str) -> None:
    """Move the calling process into ``/var/run/netns/{namespace}``."""
    path = namespace if namespace.startswith("/") else f"/var/run/netns/{namespace}"
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)
    os.environ["DTRAIN_NETNS"] = os.path.basename(path)


def main(argv: list[str]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:  # run by path: no package shadowing
        sys.path.pop(0)
    if len(argv) < 2:
        raise SystemExit("usage: python -m dtrain.launch.netns_exec NAMESPACE|--by-rank script.py|-m module [args]")
    target, rest = argv[0], argv[1:]
    if target == "--by-rank":
        node = int(os.environ["RANK"]) // int(os.environ.get("DTRAIN_NPROC", "1"))
        target = f"{os.environ['DTRAIN_NETNS_PREFIX']}-n{node}"
    enter(target)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(rest)
        sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
