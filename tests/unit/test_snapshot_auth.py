"""Authenticated snapshot traffic (SECURITY.md): real snapshot processes, real TCP on loopback.

Two snapshot processes (nodes 0 and 1, k = 1, m = 1) are started as the ranks' launcher would
start them, configured with one job secret, and fed rank blobs through their Unix sockets; the
checks then talk to their TCP ports the way a peer, an intruder or an on-path attacker would:

* an idle TCP connection (and a connection without the secret, and one from an address that is not
  a peer) does not stop the next step from committing within a few seconds;
* a chunk altered on the way with its CRC-32C fixed up (as an attacker who can rewrite the stream
  would do) is refused, named, and never stored; the same chunk unaltered is stored (so the check
  can fail);
* a tampered reply (what a node rebuilding from parity receives) raises :class:`TagError`;
* the job secret is read from the environment, a private file, or made once per run directory.

No tolerances: every check is exact. About 10 s, most of it starting the two processes.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dtrain.snapshot import wire
from dtrain.snapshot.client import DaemonClient
from dtrain.snapshot.coding import checksum
from dtrain.snapshot.secret import SECRET_FILE_VAR, SECRET_VAR, SecretError, job_secret, key_check

KEY = secrets.token_bytes(32)
BLOB = 256 << 10


def _start(run: Path, node: int) -> tuple[subprocess.Popen, DaemonClient]:
    d = run / f"node{node}"
    d.mkdir(mode=0o700, parents=True)
    fd = os.open(d / "key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secrets.token_bytes(32))
    os.close(fd)
    log = open(d / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dtrain.snapshot.daemon", "--dir", str(d), "--node", str(node),
                             "--nodes", "2", "--k", "1", "--m", "1", "--host", "127.0.0.1", "--idle-s", "60"],
                            stdout=log, stderr=log, start_new_session=True)
    return proc, DaemonClient(d)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    run = tmp_path_factory.mktemp("snapauth") / "run1"
    started = [_start(run, n) for n in (0, 1)]
    try:
        deadline = time.monotonic() + 60
        for _, client in started:
            while not (client.dir / "daemon.json").exists():
                assert time.monotonic() < deadline, (client.dir / "daemon.log").read_text()
                time.sleep(0.05)
        clients = [c for _, c in started]
        ports = [c.call("configure", epoch=0, job_key=KEY.hex(), local_ranks=[n], fingerprint="f")["port"]
                 for n, c in enumerate(clients)]
        for c in clients:
            c.call("peers", peers={str(n): ["127.0.0.1", p] for n, p in enumerate(ports)})
        yield clients, ports
    finally:
        for proc, client in started:
            client.close()
            proc.kill()
            proc.wait()


def _commit(clients: list[DaemonClient], step: int, timeout_s: float) -> float:
    """Hand both nodes a blob of ``step``; seconds until both say it committed."""
    start = time.monotonic()
    for rank, c in enumerate(clients):
        path = c.call("reserve", rank=rank, nbytes=BLOB, timeout_s=5.0)["path"]
        with open(path, "r+b") as f:
            f.write(bytes([step % 251]) * BLOB)
        c.call("written", rank=rank, step=step, path=path, nbytes=BLOB)
    for c in clients:
        assert c.call("wait_commit", _wait=timeout_s + 5, step=step, timeout_s=timeout_s)["committed"], step
    return time.monotonic() - start


def _log(client: DaemonClient) -> str:
    return (client.dir / "daemon.log").read_text()


def test_idle_and_unauthenticated_connections_do_not_stall_commits(pair):
    clients, ports = pair
    idle = [socket.create_connection(("127.0.0.1", p)) for p in ports for _ in range(3)]  # send nothing
    stranger = socket.socket()
    stranger.bind(("127.0.0.2", 0))  # loopback, but not an address of this job's nodes
    stranger.connect(("127.0.0.1", ports[1]))
    stranger.settimeout(10.0)
    try:
        with pytest.raises(wire.HandshakeError):  # a process without the job secret
            wire.connect_peer(("127.0.0.1", ports[1]), secrets.token_bytes(32), "node 1", 5.0)
        seconds = _commit(clients, 1, timeout_s=15.0)
        assert seconds < 15.0
        assert stranger.recv(1) == b""  # closed at once, unanswered
        assert "refused a connection from 127.0.0.2" in _log(clients[1])
        print(f"step committed {seconds:.2f} s after the blobs, with {len(idle)} idle connections open")
    finally:
        for s in idle + [stranger]:
            s.close()


def _send_altered(conn: wire.Channel, header: dict, genuine: bytes, altered: bytes) -> None:
    """What an on-path attacker makes of a tagged message: the tag of ``genuine``, the bytes of
    ``altered`` (same length, so the framing still holds)."""
    head = json.dumps({**header, "_nbytes": len(altered)}).encode()
    mac = conn._mac(conn._sent, head)
    conn._sent += 1
    mac.update(genuine)
    conn.send_bytes(head)
    os.write(conn.fileno(), altered)
    conn.send_bytes(mac.digest())


def test_forged_chunk_with_correct_crc_is_refused(pair):
    clients, ports = pair
    genuine = b"\x01" * 4096
    forged = b"\x02" * 4096

    def chunk(step: int, data: bytes) -> dict:  # node 0's chunk of stripe 1, whose parity node 1 holds
        return {"op": "chunk", "step": step, "stripe": 1, "table": [[0, len(data), checksum(data)]],
                "run": "run1", "epoch": 0, "from": 0, "_oneway": True}

    conn = wire.connect_peer(("127.0.0.1", ports[1]), KEY, "test", 5.0)
    _send_altered(conn, chunk(7, forged), genuine, forged)  # the CRC-32C in the table matches `forged`
    with pytest.raises((EOFError, OSError)):
        conn.recv_bytes()  # node 1 closes the connection
    conn.close()
    conn = wire.connect_peer(("127.0.0.1", ports[1]), KEY, "test", 5.0)
    wire.send(conn, chunk(8, genuine), genuine)
    wire.request(conn, {"op": "ping", "run": "run1", "epoch": 0, "from": 0}, timeout_s=10.0)  # after the chunk
    conn.close()
    steps = clients[1].call("status", timeout_s=5.0)["steps"]
    assert "7" not in steps, steps  # never stored
    assert steps["8"]["parity"] == [1], steps
    log = _log(clients[1])
    assert "'chunk' (step 7, stripe 1) from peer at 127.0.0.1:" in log and "fails its HMAC tag" in log, log


def test_tampered_reply_is_refused():
    a, b = socket.socketpair()
    ends: dict[str, wire.Channel] = {}

    def serve() -> None:
        ends["server"] = srv = wire.accept_peer(b, KEY, "client", 5.0, 5.0)
        wire.recv(srv)
        _send_altered(srv, {"node": 1, "step": 3, "stripe": 0}, b"parity", b"forged")

    thread = threading.Thread(target=serve)
    thread.start()
    conn = wire._channel(a, "node 1's snapshot process", 5.0)
    wire._handshake(conn, KEY, server=False)
    with pytest.raises(wire.TagError, match="from node 1's snapshot process fails its HMAC tag"):
        wire.request(conn, {"op": "get_parity", "step": 3, "stripe": 0}, timeout_s=5.0)
    thread.join()
    conn.close()
    ends["server"].close()


def test_job_secret_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_VAR, raising=False)
    monkeypatch.delenv(SECRET_FILE_VAR, raising=False)
    made = job_secret(tmp_path)  # no launcher: one secret per run directory, 0600
    assert job_secret(tmp_path) == made and (tmp_path / "job.secret").stat().st_mode & 0o777 == 0o600
    assert key_check(made, "r") != key_check(secrets.token_bytes(32), "r")
    monkeypatch.setenv(SECRET_VAR, "ab" * 32)
    assert job_secret(tmp_path) == bytes.fromhex("ab" * 32)
    monkeypatch.setenv(SECRET_VAR, "abc")
    with pytest.raises(SecretError, match="not hexadecimal"):
        job_secret(tmp_path)
    monkeypatch.delenv(SECRET_VAR)
    loose = tmp_path / "loose"
    loose.write_text("x" * 40)
    loose.chmod(0o644)
    monkeypatch.setenv(SECRET_FILE_VAR, str(loose))
    with pytest.raises(SecretError, match="chmod 600"):
        job_secret(tmp_path)
    loose.chmod(0o600)
    assert job_secret(tmp_path) == b"x" * 40
