"""A rank's side of the snapshot process: find or start the node's daemon, and talk to it.

The run directory (``/dev/shm/dtrain-<uid>/<run key>``, mode 0700) is keyed by the launch, so
every attempt of one job (restarts included) finds the same daemons and every other job finds
none. The key comes from ``snapshot.run_id``, else ``DTRAIN_RUN_ID`` (``dtrain launch``), else
torchrun's ``TORCHELASTIC_RUN_ID``, else the rendezvous address.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dtrain.snapshot import wire

__all__ = ["run_dir", "node_dir", "DaemonClient", "daemon_pid", "remove_run", "stop_daemon", "SPAWN_VAR"]

SPAWN_VAR = "DTRAIN_SNAPSHOT_SPAWN"
"""``request``: ask the launcher to start the node's snapshot process (``dtrain launch --ray``)."""
_REQUEST_WAIT_S = 60.0


def run_dir(run_id: str | None = None, create: bool = True) -> Path:
    """This job's run directory (created, 0700, unless ``create`` is false) under /dev/shm (or
    ``DTRAIN_SHM_DIR``)."""
    key = run_id or os.environ.get("DTRAIN_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""
    if key in ("", "none"):
        key = f"{os.environ.get('MASTER_ADDR', 'local')}:{os.environ.get('MASTER_PORT', '0')}"
    base = Path(os.environ.get("DTRAIN_SHM_DIR", "/dev/shm")) / f"dtrain-{os.getuid()}"
    path = base / hashlib.sha256(key.encode()).hexdigest()[:12]
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(base, 0o700)
    return path


def remove_run(run_id: str) -> None:
    """Stop the job's snapshot processes (by the PIDs they recorded) and delete its run directory."""
    import shutil

    run = run_dir(run_id)
    for node in run.glob("node*"):
        stop_daemon(node)
    shutil.rmtree(run, ignore_errors=True)


def stop_daemon(directory: Path, sig: int = signal.SIGTERM) -> None:
    """Signal the daemon serving ``directory`` (if alive): SIGTERM stops it, SIGKILL simulates a loss."""
    pid = daemon_pid(directory)
    if pid is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def node_dir(run: Path, node: int, create: bool = True) -> Path:
    path = run / f"node{node}"
    if create:
        path.mkdir(mode=0o700, exist_ok=True)
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

    def ensure_started(self, node: int, nodes: int, k: int, m: int, host: str,
                       persist_dir: str | None, persist_every: int, idle_s: float) -> None:
        """Start the node's daemon unless one is alive (call on one rank per node)."""
        with open(self.dir / "spawn.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if daemon_pid(self.dir) is not None:
                return
            key_path = self.dir / "key"
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
            (self.dir / "daemon.json").unlink(missing_ok=True)
            args = ["--dir", str(self.dir), "--node", str(node), "--nodes", str(nodes), "--k", str(k), "--m", str(m),
                    "--host", host, "--persist-every", str(persist_every), "--idle-s", str(idle_s)]
            if persist_dir:
                args += ["--persist-dir", persist_dir]
            if os.environ.get(SPAWN_VAR) == "request":  # the launcher starts it (a Ray actor: ray_host)
                _request(self.dir, args, node)
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

    def connect(self) -> None:
        key = (self.dir / "key").read_bytes()
        sock = json.loads((self.dir / "daemon.json").read_text())["socket"]
        self.conn = wire.connect(sock, key)

    def call(self, op: str, _wait: float = 120.0, **fields: Any) -> dict[str, Any]:
        """Request ``op`` and wait up to ``_wait`` seconds for the reply."""
        if self.conn is None:
            self.connect()
        reply, _ = wire.request(self.conn, {"op": op, **fields}, timeout_s=_wait)
        return reply

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
