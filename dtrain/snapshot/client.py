"""A rank's side of the snapshot process: find or start the node's daemon, and talk to it.

The run directory (``/dev/shm/dtrain-<uid>/<run key>``, mode 0700) is keyed by the launch, so
every attempt of one job (restarts included) finds the same daemons and every other job finds
none. The key comes from ``snapshot.run_id``, else ``DTRAIN_RUN_ID`` (``dtrain launch``), else
torchrun's ``TORCHELASTIC_RUN_ID``, else the rendezvous address.

Shared paths follow dtrain.runstate: ``/dev/shm/dtrain-<uid>`` and the run and node directories
are checked with ``lstat`` (ours, 0700, no symlink) before use; the key file is created with
``O_CREAT|O_EXCL|O_NOFOLLOW`` and read without following links; ``dtrain launch`` records itself as
a run's owner (:func:`claim_run`), and a run directory is cleared by another launch only when its
owner has died; :func:`stop_daemon` signals a PID only while it is still the snapshot process
that was recorded (its start time). The snapshot processes listen on ports the kernel picks per
process (port 0), so jobs never share one.

A rank's requests have deadlines: connecting (and the key handshake), sending and waiting for a
reply; a snapshot process that died mid-request is reported as ``snapshot process on node N
died (exit ...)`` (:class:`SnapshotProcessDied`), not as the socket's ``EOFError``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dtrain import runstate
from dtrain.snapshot import wire

__all__ = ["run_dir", "node_dir", "DaemonClient", "daemon_pid", "remove_run", "stop_daemon", "SPAWN_VAR",
           "claim_run", "check_base_dir", "SnapshotProcessDied"]

OWNER_FILE = "owner.json"
"""In a run directory: the launcher that owns it (dtrain.runstate owner record)."""
DAEMON_RECORD = "daemon.owner"
"""In a node directory: the snapshot process's PID and start time, written by the rank that started it."""
CONNECT_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 30.0


class SnapshotProcessDied(RuntimeError):
    """The node's snapshot process is gone (it crashed or was killed) while a rank talked to it."""

SPAWN_VAR = "DTRAIN_SNAPSHOT_SPAWN"
"""``request``: ask the launcher to start the node's snapshot process (``dtrain launch --ray``)."""
_REQUEST_WAIT_S = 60.0


def run_dir(run_id: str | None = None, create: bool = True) -> Path:
    """This job's run directory (created, 0700, unless ``create`` is false) under /dev/shm (or
    ``DTRAIN_SHM_DIR``)."""
    key = run_id or os.environ.get("DTRAIN_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""
    if key in ("", "none"):
        key = f"{os.environ.get('MASTER_ADDR', 'local')}:{os.environ.get('MASTER_PORT', '0')}"
    base = _base_dir()
    path = base / hashlib.sha256(key.encode()).hexdigest()[:12]
    if create:
        runstate.private_dir(base)
        runstate.private_dir(path, parents=False)
    return path


def _base_dir() -> Path:
    return Path(os.environ.get("DTRAIN_SHM_DIR", "/dev/shm")) / f"dtrain-{os.getuid()}"


def check_base_dir() -> Path:
    """This user's directory of run directories, created or checked (dtrain.runstate.private_dir);
    the launcher calls it before anything starts, so an unsafe one is one line up front."""
    return runstate.private_dir(_base_dir())


def claim_run(run_id: str) -> Path:
    """Record this process (the launcher) as the owner of ``run_id``'s run directory, after
    clearing the run directories of launchers that have died (:func:`sweep_stale_runs`)."""
    sweep_stale_runs()
    run = run_dir(run_id)
    runstate.write_owner(run / OWNER_FILE)
    return run


def sweep_stale_runs() -> list[Path]:
    """Delete the run directories whose recorded owner is dead (their snapshot processes are
    stopped first); directories without an owner record (torchrun jobs) are left alone."""
    base = _base_dir()
    if not base.is_dir() or base.is_symlink():
        return []
    runstate.private_dir(base)
    cleared = []
    for run in base.iterdir():
        if run.is_symlink() or not run.is_dir():
            continue
        record = runstate.read_record(run / OWNER_FILE)
        if record is None or runstate.owner_alive(record):
            continue
        _remove_dir(run)
        cleared.append(run)
    return cleared


def remove_run(run_id: str) -> None:
    """Stop the job's snapshot processes (by the PIDs they recorded) and delete its run directory."""
    run = run_dir(run_id, create=False)
    if run.is_dir() and not run.is_symlink():
        _remove_dir(run)


def _remove_dir(run: Path) -> None:
    for node in run.glob("node*"):
        stop_daemon(node)
    shutil.rmtree(run, ignore_errors=True)


def stop_daemon(directory: Path, sig: int = signal.SIGTERM) -> None:
    """Signal the daemon serving ``directory`` (if alive): SIGTERM stops it, SIGKILL simulates a loss.

    The PID is signalled only while it is the process recorded when it started (same start time
    in ``daemon.owner``; without that record, its command line must name this directory)."""
    pid = daemon_pid(directory)
    if pid is None or not _is_daemon(directory, pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _is_daemon(directory: Path, pid: int) -> bool:
    record = runstate.read_record(directory / DAEMON_RECORD)
    if record is not None and record.get("pid") == pid:
        return runstate.same_process(pid, record.get("start"))
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(directory).encode() in cmdline


def node_dir(run: Path, node: int, create: bool = True) -> Path:
    path = run / f"node{node}"
    if create:
        runstate.private_dir(path, parents=False)
    return path


def daemon_pid(directory: Path) -> int | None:
    """PID of the live daemon serving ``directory``, or None."""
    try:
        pid = int(json.loads((directory / "daemon.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie does not (a killed daemon whose parent rank died too stays
    one until init reaps it, which can take seconds, while ``kill(pid, 0)`` still succeeds)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill()
    return stat[stat.rindex(")") + 2] not in "ZX"


def _request(directory: Path, args: list[str], node: int) -> None:
    """Leave the daemon's arguments for the launcher (:mod:`dtrain.snapshot.ray_host`), wait for it."""
    from dtrain.snapshot.ray_host import REQUEST

    tmp = directory / (REQUEST + ".tmp")
    tmp.write_text(json.dumps({"argv": args}))
    os.replace(tmp, directory / REQUEST)
    deadline = time.monotonic() + _REQUEST_WAIT_S
    while daemon_pid(directory) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the launcher did not start the snapshot process of node {node} within "
                               f"{_REQUEST_WAIT_S:g} s ({SPAWN_VAR}=request; unset it to start one per node "
                               f"from the ranks)")
        time.sleep(0.05)


class DaemonClient:
    """One connection from a rank to its node's snapshot process."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.conn: Any = None
        self.proc: subprocess.Popen | None = None  # the snapshot process, when this rank started it
        found = re.fullmatch(r"node(\d+)", directory.name)
        self.node = int(found.group(1)) if found else -1

    def ensure_started(self, node: int, nodes: int, k: int, m: int, host: str,
                       persist_dir: str | None, persist_every: int, idle_s: float) -> None:
        """Start the node's daemon unless one is alive (call on one rank per node)."""
        with open(self.dir / "spawn.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if daemon_pid(self.dir) is not None:
                return
            key_path = self.dir / "key"
            key_path.unlink(missing_ok=True)  # never write through a file or link left there
            with os.fdopen(runstate.open_new(key_path), "wb") as f:
                f.write(secrets.token_bytes(32))
            for name in ("daemon.json", DAEMON_RECORD):
                (self.dir / name).unlink(missing_ok=True)
            args = ["--dir", str(self.dir), "--node", str(node), "--nodes", str(nodes), "--k", str(k), "--m", str(m),
                    "--host", host, "--persist-every", str(persist_every), "--idle-s", str(idle_s)]
            if persist_dir:
                args += ["--persist-dir", persist_dir]
            if os.environ.get(SPAWN_VAR) == "request":  # the launcher starts it (a Ray actor: ray_host)
                _request(self.dir, args, node)
                self._record_daemon()
                return
            with open(self.dir / "daemon.log", "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "dtrain.snapshot.daemon", *args],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True, close_fds=True)
            deadline = time.monotonic() + 30.0
            while not (self.dir / "daemon.json").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.dir / "daemon.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the snapshot process of node {node} did not start:\n{tail}")
                time.sleep(0.05)
            self.proc = proc
            self._record_daemon()

    def _record_daemon(self) -> None:
        pid = daemon_pid(self.dir)
        if pid is not None:
            runstate.write_owner(self.dir / DAEMON_RECORD, runstate.owner_record(pid))

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect to the node's snapshot process (key handshake included) within ``timeout_s``."""
        fd = os.open(self.dir / "key", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            key = fh.read()
        try:
            sock = json.loads((self.dir / "daemon.json").read_text())["socket"]
        except (OSError, ValueError, KeyError):
            raise self._died("connect") or RuntimeError(f"no daemon.json in {self.dir}") from None
        result: dict[str, Any] = {}

        def attempt() -> None:
            try:
                result["conn"] = wire.connect(sock, key)
            except BaseException as exc:  # handed to the caller below
                result["error"] = exc

        thread = threading.Thread(target=attempt, name="dtrain-snapshot-connect", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            died = self._died("connect")
            if died is not None:
                raise died
            raise TimeoutError(f"the snapshot process on node {self.node} did not accept a connection within "
                               f"{timeout_s:g} s (see {self.dir / 'daemon.log'})")
        if "error" in result:
            died = self._died("connect") if isinstance(result["error"], (EOFError, OSError)) else None
            raise (died or result["error"]) from result["error"]
        self.conn = result["conn"]

    def call(self, op: str, _wait: float = 120.0, **fields: Any) -> dict[str, Any]:
        """Request ``op`` and wait up to ``_wait`` seconds for the reply; sending has a deadline too."""
        if self.conn is None:
            self.connect()
        try:
            if not _writable(self.conn.fileno(), SEND_TIMEOUT_S):
                raise TimeoutError(f"could not send {op!r} to the snapshot process on node {self.node} "
                                   f"within {SEND_TIMEOUT_S:g} s")
            reply, _ = wire.request(self.conn, {"op": op, **fields}, timeout_s=_wait)
        except (EOFError, ConnectionError, OSError) as exc:
            died = self._died(op)
            if died is None:  # it runs: a real timeout or an error of this connection
                raise
            self.close()
            raise died from exc
        return reply

    def _died(self, op: str) -> SnapshotProcessDied | None:
        """The error for a snapshot process found gone during ``op`` (None while it runs): its exit
        status when this rank started it, and the last line of its log."""
        deadline = time.monotonic() + 1.0
        while daemon_pid(self.dir) is not None and time.monotonic() < deadline:
            time.sleep(0.02)  # a process still exiting after it closed its socket
        if daemon_pid(self.dir) is not None:
            return None
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                how = "exit status unknown"
            elif code < 0:
                how = f"exit: killed by {_signal_name(-code)}"
            else:
                how = f"exit code {code}"
        else:
            how = "exit status unknown: started by another rank"
        try:
            lines = (self.dir / "daemon.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        last = f"; its log ends: {lines[-1].strip()[:200]}" if lines else ""
        return SnapshotProcessDied(f"snapshot process on node {self.node} died ({how}) during {op!r}{last}")

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None


def _writable(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` can take a write within ``timeout_s`` (poll: no FD_SETSIZE limit, unlike select)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(timeout_s * 1000))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
