"""Framing for snapshot-process messages: a JSON header plus an optional raw payload.

Messages travel over :mod:`multiprocessing.connection` connections: a Unix socket between a rank
and its node's snapshot process (the node's private run directory; that module's HMAC handshake
with the node key), TCP between snapshot processes (a :class:`Channel`). Headers are JSON and
payloads raw bytes, so nothing received is ever unpickled.

A :class:`Channel` starts with a mutual HMAC-SHA256 challenge under the job secret
(:func:`connect_peer`, :func:`accept_peer`, each with a timeout) that also yields a session key;
then every message carries an HMAC-SHA256 tag under that key over its sequence number, header and
payload. The header names what the payload is (``run``, ``epoch`` = attempt, ``step``, ``from`` =
node, ``stripe``), so a chunk's tag binds its bytes to all of that; the sequence number keeps a
message from being replayed or reordered within a connection, the session key across
connections. A message whose tag fails raises :class:`TagError` naming the peer. The CRC-32C that
travels with the data still detects corruption at rest (a tag only covers the wire). See
SECURITY.md.

A header is one ``send_bytes`` message that says how many payload bytes follow (``_nbytes``). The
payload then goes straight over the connection's socket: written from the sender's buffers (a
chunk is sent from the shared-memory slots it lives in, as several pieces, without joining them)
and read into one preallocated buffer. ``Connection.recv_bytes`` would copy every byte twice more,
and a node's whole state crosses the wire every step.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client, Connection
from typing import Any, Optional, Union

__all__ = ["send", "recv", "request", "connect", "connect_peer", "accept_peer", "Channel", "TagError",
           "HandshakeError", "RemoteError", "Payload"]

_HELLO = b"DTRAIN-SNAPSHOT-1"
_NONCE = 32

Payload = Union[bytes, bytearray, memoryview, Sequence[Union[bytes, bytearray, memoryview]]]
Into = Callable[[dict[str, Any], int], Optional[memoryview]]
"""Given a header and its payload size, a writable buffer of exactly that size to receive into
(None: a new ``bytearray``)."""


class RemoteError(RuntimeError):
    """The other side answered a request with an error message."""


class TagError(ValueError):
    """A message's HMAC tag fails: forged or altered on the way (the message names the peer)."""


class HandshakeError(ValueError):
    """The other end of a snapshot connection does not hold the job secret, or did not answer."""


class Channel(Connection):
    """A TCP connection between two snapshot processes, after the handshake: messages are tagged
    (see the module docstring). ``peer`` describes the other end for error messages."""

    peer: str = "?"
    _session: bytes = b""
    _sent = 0
    _received = 0

    def _mac(self, seq: int, head: bytes) -> "hmac.HMAC":
        return hmac.new(self._session, struct.pack("<Q", seq) + head, hashlib.sha256)


def _timeouts(fd: int, recv_s: float | None, send_s: float | None) -> None:
    """Kernel-level receive/send timeouts on a socket fd (a blocked read or write then fails with
    EAGAIN, an OSError); None leaves that direction unchanged, 0 waits forever."""
    sock = socket.socket(fileno=fd)
    try:
        for opt, value in ((socket.SO_RCVTIMEO, recv_s), (socket.SO_SNDTIMEO, send_s)):
            if value is not None:
                sec = int(value)
                sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", sec, int((value - sec) * 1e6)))
    finally:
        sock.detach()


def _channel(sock: socket.socket, peer: str, timeout_s: float) -> Channel:
    sock.settimeout(None)  # blocking fd; the kernel timeouts below bound every read and write
    fd = sock.detach()
    _timeouts(fd, timeout_s, timeout_s)
    conn = Channel(fd)
    conn.peer = peer
    return conn


def _handshake(conn: Channel, key: bytes, server: bool) -> None:
    """Mutual challenge-response; both ends derive the session key from both nonces."""
    try:
        if server:
            mine = secrets.token_bytes(_NONCE)
            conn.send_bytes(_HELLO + mine)
            answer = conn.recv_bytes(2 * _NONCE + 64)
            theirs, proof = answer[:_NONCE], answer[_NONCE:]
            ns, nc = mine, theirs
            if not hmac.compare_digest(proof, hmac.new(key, b"client" + ns + nc, hashlib.sha256).digest()):
                raise HandshakeError(f"{conn.peer} does not hold this job's secret")
            conn.send_bytes(hmac.new(key, b"server" + ns + nc, hashlib.sha256).digest())
        else:
            hello = conn.recv_bytes(len(_HELLO) + _NONCE + 64)
            if not hello.startswith(_HELLO) or len(hello) != len(_HELLO) + _NONCE:
                raise HandshakeError(f"{conn.peer} is not a dtrain snapshot process of this version")
            ns, nc = hello[len(_HELLO):], secrets.token_bytes(_NONCE)
            conn.send_bytes(nc + hmac.new(key, b"client" + ns + nc, hashlib.sha256).digest())
            proof = conn.recv_bytes(64)
            if not hmac.compare_digest(proof, hmac.new(key, b"server" + ns + nc, hashlib.sha256).digest()):
                raise HandshakeError(f"{conn.peer} does not hold this job's secret")
    except (EOFError, OSError) as exc:
        raise HandshakeError(f"handshake with {conn.peer} failed: {type(exc).__name__}: {exc}") from None
    conn._session = hmac.new(key, b"session" + ns + nc, hashlib.sha256).digest()


def connect_peer(address: tuple[str, int], key: bytes, peer: str, timeout_s: float,
                 source: str | None = None) -> Channel:
    """A :class:`Channel` to the snapshot process at ``address``: connect, handshake, and every
    later read and write on it bounded by ``timeout_s``. ``source``: the local address to
    connect from (the one the peer knows this node by)."""
    try:
        sock = socket.create_connection(tuple(address), timeout=timeout_s,
                                        source_address=(source, 0) if source else None)
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {peer}: {exc.strerror or exc}") from None
    conn = _channel(sock, peer, timeout_s)
    try:
        _handshake(conn, key, server=False)
    except BaseException:
        conn.close()
        raise
    return conn


def accept_peer(sock: socket.socket, key: bytes, peer: str, handshake_s: float, send_s: float) -> Channel:
    """The server side of :func:`connect_peer` on an accepted socket: the handshake must finish
    within ``handshake_s``; afterwards reads wait as long as the peer is silent (it sends when
    it has a step to send), writes at most ``send_s``."""
    conn = _channel(sock, peer, handshake_s)
    try:
        _handshake(conn, key, server=True)
        _timeouts(conn.fileno(), 0, send_s)
    except BaseException:
        conn.close()
        raise
    return conn


def _pieces(payload: Payload | None) -> list[memoryview]:
    if payload is None:
        return []
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = [payload]
    return [memoryview(p).cast("B") for p in payload]


def send(conn: Connection, header: dict[str, Any], payload: Payload | None = None) -> None:
    pieces = _pieces(payload)
    nbytes = sum(p.nbytes for p in pieces) if payload is not None else None
    head = json.dumps({**header, "_nbytes": nbytes}).encode()
    mac = None
    if isinstance(conn, Channel):
        mac = conn._mac(conn._sent, head)
        conn._sent += 1
    conn.send_bytes(head)
    fd = conn.fileno()
    for piece in pieces:
        if mac is not None:
            mac.update(piece)
        while piece.nbytes:
            piece = piece[os.write(fd, piece):]
    if mac is not None:
        conn.send_bytes(mac.digest())


def recv(conn: Connection, into: Into | None = None) -> tuple[dict[str, Any], bytearray | memoryview | None]:
    head = conn.recv_bytes()
    header = json.loads(head)
    nbytes = header.pop("_nbytes")
    data = None
    if nbytes is not None:
        data = into(header, nbytes) if into is not None else None
        if data is None:
            data = bytearray(nbytes)
        view, got, fd = memoryview(data), 0, conn.fileno()
        while got < nbytes:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise EOFError(f"connection closed after {got} of {nbytes} payload bytes")
            got += n
    if isinstance(conn, Channel):
        mac = conn._mac(conn._received, head)
        conn._received += 1
        if data is not None:
            mac.update(data)
        if not hmac.compare_digest(conn.recv_bytes(64), mac.digest()):
            claim = f" (claims node {header['from']})" if "from" in header else ""
            raise TagError(f"{header.get('op', 'reply')!r} (step {header.get('step')}, stripe "
                           f"{header.get('stripe')}) from {conn.peer}{claim} fails its HMAC tag: forged or altered "
                           f"on the way; refused")
    return header, data


def request(conn: Connection, header: dict[str, Any], payload: Payload | None = None,
            timeout_s: float | None = None) -> tuple[dict[str, Any], bytearray | memoryview | None]:
    """Send one request and wait for its reply; an ``error`` reply raises :class:`RemoteError`."""
    send(conn, header, payload)
    if timeout_s is not None and not conn.poll(timeout_s):
        raise TimeoutError(f"no reply to {header.get('op')!r} within {timeout_s:g} s")
    answer, data = recv(conn)
    if "error" in answer:
        raise RemoteError(answer["error"])
    return answer, data


def connect(address: str, key: bytes) -> Connection:
    """A rank's connection to its node's snapshot process (Unix socket ``address``, node ``key``);
    snapshot processes reach each other with :func:`connect_peer`."""
    return Client(address, family="AF_UNIX", authkey=key)
