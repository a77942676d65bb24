"""The per-node half of the Ray launcher: one actor per placed node that runs its N ranks.

Owns the rank processes of one node for one attempt. The actor starts every rank as a plain
subprocess (``python script.py args``, so the script runs unchanged), tied to the actor's life
with ``PR_SET_PDEATHSIG`` so a lost actor or node takes its ranks with it. Output is read from
pipes into per-rank buffers that the driver drains with :meth:`NodeAgent.poll`; exit statuses
are reported by the same call. :meth:`NodeAgent.stop` ends the ranks (SIGTERM, then SIGKILL).

This module is imported on every Ray node, so it needs nothing beyond the standard library
(plus psutil, a dtrain dependency) and never imports torch or ray.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["NodeAgent", "RankExit", "PollResult", "interface_of", "MAX_BUFFER_BYTES"]

MAX_BUFFER_BYTES = 4 << 20  # per rank and stream between two polls; the middle is dropped beyond
_PR_SET_PDEATHSIG = 1
_NOT_FOR_RANKS = frozenset({"RAY_AUTH_TOKEN"})  # ranks never need the cluster's credential


@dataclass
class RankExit:
    """How one rank process ended (``exitcode`` < 0: killed by that signal)."""

    rank: int
    exitcode: int
    timestamp: float
    """When the exit was noticed (unix time)."""
    alive_at: float | None = None
    """The last moment the rank was seen running: the earliest it can have died."""


@dataclass
class PollResult:
    """Output produced since the previous poll and the ranks that have exited so far."""

    stdout: dict[int, bytes] = field(default_factory=dict)
    stderr: dict[int, bytes] = field(default_factory=dict)
    exited: list[RankExit] = field(default_factory=list)
    running: int = 0
    spawn: list[str] | None = None
    """A rank's request for this node's snapshot process (its arguments; see dtrain.snapshot.ray_host)."""


def interface_of(address: str) -> str | None:
    """Name of the network interface that carries ``address`` on this host (``lo`` for 127.x)."""
    if address.startswith("127."):
        return "lo"
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    return None


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now (the store binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this rank when the actor that started it dies; own process group."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    os.setpgrp()


class _Pipe(threading.Thread):
    """Reads one pipe into a bounded buffer."""

    def __init__(self, stream: object, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stream = stream
        self.lock = threading.Lock()
        self.buf = bytearray()
        self.dropped = 0

    def run(self) -> None:
        read = self.stream.read1  # type: ignore[attr-defined]
        while chunk := read(1 << 16):
            with self.lock:
                self.buf += chunk
                if len(self.buf) > MAX_BUFFER_BYTES:  # keep head and tail, drop the middle
                    cut = len(self.buf) - MAX_BUFFER_BYTES // 2
                    self.dropped += cut
                    del self.buf[MAX_BUFFER_BYTES // 4 : MAX_BUFFER_BYTES // 4 + cut]

    def drain(self) -> bytes:
        with self.lock:
            data, self.buf = bytes(self.buf), bytearray()
            if self.dropped:
                data = data + f"\n[dtrain: {self.dropped} bytes of output dropped]\n".encode()
                self.dropped = 0
        return data


class NodeAgent:
    """Runs the ranks of one node; created by the driver as a Ray actor inside a placement bundle."""

    def __init__(self, node_index: int) -> None:
        self.node_index = node_index
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.pipes: dict[int, tuple[_Pipe, _Pipe]] = {}
        self.exits: dict[int, RankExit] = {}
        self.alive_at: dict[int, float] = {}  # rank -> start of the last poll that saw it running
        self.request_dir: Path | None = None  # where this node's ranks ask for a snapshot process

    def info(self) -> dict[str, object]:
        """Where this actor runs: node IP, host name, pid, and a free port on the node IP."""
        import ray

        ip = ray.util.get_node_ip_address()
        return {"ip": ip, "hostname": socket.gethostname(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "port": free_port(ip),
                "ifname": interface_of(ip), "cwd": os.getcwd()}

    def start(self, argv: list[str], rank_envs: dict[int, dict[str, str]]) -> list[int]:
        """Start one process per entry of ``rank_envs`` (global rank -> its extra environment)."""
        self.stop()
        self.exits, self.alive_at = {}, {}
        run_id = next(iter(rank_envs.values()), {}).get("DTRAIN_RUN_ID")
        if run_id is not None:  # only looked at, never created here: a job without snapshots leaves nothing
            from dtrain.snapshot.client import node_dir, run_dir  # torch-free

            self.request_dir = node_dir(run_dir(run_id, create=False), self.node_index, create=False)
        for rank, extra in sorted(rank_envs.items()):
            env = {k: v for k, v in {**os.environ, **extra}.items() if k not in _NOT_FOR_RANKS}
            started = time.time()
            proc = subprocess.Popen([sys.executable, *argv], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    preexec_fn=_die_with_parent, close_fds=True)
            self.procs[rank] = proc
            self.alive_at[rank] = started
            pipes = (_Pipe(proc.stdout, f"rank{rank}-out"), _Pipe(proc.stderr, f"rank{rank}-err"))
            for pipe in pipes:
                pipe.start()
            self.pipes[rank] = pipes
        return [p.pid for p in self.procs.values()]

    def poll(self) -> PollResult:
        """Drain new output; report ranks that exited (each exit is reported on every poll)."""
        result = PollResult()
        for rank, proc in self.procs.items():
            polled = time.time()
            code = proc.poll()
            if code is None:
                self.alive_at[rank] = polled
            elif rank not in self.exits:
                out, err = self.pipes[rank]
                out.join(1.0)  # the process is gone: collect the last bytes it wrote
                err.join(1.0)
                self.exits[rank] = RankExit(rank, code, time.time(), self.alive_at.get(rank))
            out, err = self.pipes[rank]
            result.stdout[rank] = out.drain()
            result.stderr[rank] = err.drain()
        result.exited = sorted(self.exits.values(), key=lambda e: e.rank)
        result.running = sum(1 for p in self.procs.values() if p.poll() is None)
        if self.request_dir is not None:
            from dtrain.snapshot.ray_host import read_request

            result.spawn = read_request(self.request_dir)
        return result

    def stop(self, grace_s: float = 3.0) -> PollResult:
        """End every rank (SIGTERM to its process group, SIGKILL after ``grace_s``); final output."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        result = self.poll() if self.procs else PollResult()
        self.procs, self.pipes = {}, {}
        return result

    def remove_run(self, run_id: str) -> None:
        """End the job's per-node helpers (snapshot processes) on this node and delete its run dir."""
        from dtrain.snapshot.client import remove_run  # torch-free

        remove_run(run_id)

    def kill_rank(self, rank: int, sig: int = int(signal.SIGKILL)) -> int:
        """Send ``sig`` to one rank process (fault injection and benchmarks); returns its pid."""
        proc = self.procs[rank]
        os.kill(proc.pid, sig)
        return proc.pid


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
