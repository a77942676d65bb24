"""Per-run state (dtrain.runstate, dtrain.snapshot.client): private directories are checked with
lstat, records are created without following links, leftovers are cleared only when their owner is
dead, and a recorded PID is signalled only while it is still the recorded process. No ranks."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from dtrain import runstate
from dtrain.snapshot import client


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_private_dir_checks(tmp_path: Path) -> None:
    made = runstate.private_dir(tmp_path / "a")
    assert os.stat(made).st_mode & 0o777 == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o777)
    runstate.private_dir(loose)
    assert os.stat(loose).st_mode & 0o777 == 0o700  # our own directory: tightened
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(runstate.UnsafePathError, match="is a symlink"):
        runstate.private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(runstate.UnsafePathError, match="not a directory"):
        runstate.private_dir(tmp_path / "file")
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(runstate.UnsafePathError, match="owned by uid 65534"):
            runstate.private_dir(foreign)


def test_open_new_never_follows_or_reuses(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "key").symlink_to(target)
    with pytest.raises(FileExistsError):
        runstate.open_new(tmp_path / "key")
    assert target.read_text() == "keep"
    runstate.write_owner(tmp_path / "owner.json")
    with pytest.raises(FileExistsError):
        runstate.write_owner(tmp_path / "owner.json")
    assert os.stat(tmp_path / "owner.json").st_mode & 0o777 == 0o600
    assert runstate.read_record(tmp_path / "key") is None  # a symlink is not read


def test_owner_alive_tells_dead_and_reused_pids() -> None:
    assert runstate.owner_alive(runstate.owner_record())
    assert not runstate.owner_alive({"pid": _dead_pid(), "start": "1"})
    assert not runstate.owner_alive({"pid": os.getpid(), "start": "1"})  # same PID, another process
    assert runstate.owner_alive({"pid": "?"})  # unattributable: never cleared


def test_stale_runs_cleared_only_when_owner_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTRAIN_SHM_DIR", str(tmp_path))
    dead, live, foreign = client.run_dir("dead-run"), client.run_dir("live-run"), client.run_dir("torchrun-run")
    runstate.write_owner(dead / client.OWNER_FILE, {"pid": _dead_pid(), "start": "1"})
    runstate.write_owner(live / client.OWNER_FILE)
    mine = client.claim_run("new-run")
    assert not dead.exists() and live.exists() and foreign.exists() and mine.exists()
    client.remove_run("new-run")
    assert not mine.exists()


def test_stop_daemon_signals_only_the_recorded_process(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        node = tmp_path / "node0"
        node.mkdir()
        (node / "daemon.json").write_text(json.dumps({"pid": bystander.pid, "socket": "x"}))
        client.stop_daemon(node)  # not the snapshot process: neither recorded nor naming the directory
        time.sleep(0.2)
        assert bystander.poll() is None
        runstate.write_owner(node / client.DAEMON_RECORD, {"pid": bystander.pid, "start": "1"})
        client.stop_daemon(node)  # recorded, but with another start time: a reused PID
        time.sleep(0.2)
        assert bystander.poll() is None
        (node / client.DAEMON_RECORD).unlink()
        runstate.write_owner(node / client.DAEMON_RECORD, runstate.owner_record(bystander.pid))
        client.stop_daemon(node)
        assert bystander.wait(5) == -15
    finally:
        bystander.kill()
        bystander.wait()


def test_dead_snapshot_process_is_named(tmp_path: Path) -> None:
    node = tmp_path / "node3"
    node.mkdir()
    proc = subprocess.Popen(["sh", "-c", "echo 'daemon: out of memory' >&2; exit 7"],
                            stderr=open(node / "daemon.log", "wb"))
    proc.wait()
    (node / "daemon.json").write_text(json.dumps({"pid": proc.pid, "socket": str(node / "sock")}))
    (node / "key").write_bytes(b"k" * 32)
    daemon = client.DaemonClient(node)
    daemon.proc = proc
    with pytest.raises(client.SnapshotProcessDied,
                       match=r"snapshot process on node 3 died \(exit code 7\) during 'connect'; its log ends: "
                             r"daemon: out of memory"):
        daemon.call("status")


def test_connection_closed_mid_request_is_a_dead_snapshot_process(tmp_path: Path) -> None:
    import threading
    from multiprocessing.connection import Listener

    node = tmp_path / "node1"
    node.mkdir()
    key = b"k" * 32
    (node / "key").write_bytes(key)
    listener = Listener(str(node / "sock"), family="AF_UNIX", authkey=key)

    def serve_then_vanish() -> None:
        conn = listener.accept()
        conn.recv_bytes()  # the request arrives, then the process "crashes"
        conn.close()

    thread = threading.Thread(target=serve_then_vanish, daemon=True)
    thread.start()
    (node / "daemon.json").write_text(json.dumps({"pid": _dead_pid(), "socket": str(node / "sock")}))
    daemon = client.DaemonClient(node)
    with pytest.raises(client.SnapshotProcessDied,
                       match=r"snapshot process on node 1 died \(exit status unknown: started by another rank\) "
                             r"during 'status'"):
        daemon.call("status", _wait=10)
    thread.join(5)
    listener.close()
