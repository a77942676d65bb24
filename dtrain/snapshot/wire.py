"""Framing for snapshot-process messages: a JSON header plus an optional raw payload.

Messages travel over :mod:`multiprocessing.connection` (Unix sockets between a rank and its node's
snapshot process, TCP between snapshot processes), authenticated with HMAC keys by that module.
Headers are JSON and payloads raw bytes, so nothing received is ever unpickled.

A header is one ``send_bytes`` message that says how many payload bytes follow (``_nbytes``). The
payload then goes straight over the connection's socket: written from the sender's buffers (a
chunk is sent from the shared-memory slots it lives in, as several pieces, without joining them)
and read into one preallocated buffer. ``Connection.recv_bytes`` would copy every byte twice more,
and a node's whole state crosses the wire every step.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client, Connection
from typing import Any, Optional, Union

__all__ = ["send", "recv", "request", "connect", "RemoteError", "Payload"]

Payload = Union[bytes, bytearray, memoryview, Sequence[Union[bytes, bytearray, memoryview]]]
Into = Callable[[dict[str, Any], int], Optional[memoryview]]
"""Given a header and its payload size, a writable buffer of exactly that size to receive into
(None: a new ``bytearray``)."""


class RemoteError(RuntimeError):
    """The other side answered a request with an error message."""


def _pieces(payload: Payload | None) -> list[memoryview]:
    if payload is None:
        return []
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = [payload]
    return [memoryview(p).cast("B") for p in payload]


def send(conn: Connection, header: dict[str, Any], payload: Payload | None = None) -> None:
    pieces = _pieces(payload)
    nbytes = sum(p.nbytes for p in pieces) if payload is not None else None
    conn.send_bytes(json.dumps({**header, "_nbytes": nbytes}).encode())
    fd = conn.fileno()
    for piece in pieces:
        while piece.nbytes:
            piece = piece[os.write(fd, piece):]


def recv(conn: Connection, into: Into | None = None) -> tuple[dict[str, Any], bytearray | memoryview | None]:
    header = json.loads(conn.recv_bytes())
    nbytes = header.pop("_nbytes")
    if nbytes is None:
        return header, None
    data = into(header, nbytes) if into is not None else None
    if data is None:
        data = bytearray(nbytes)
    view, got, fd = memoryview(data), 0, conn.fileno()
    while got < nbytes:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError(f"connection closed after {got} of {nbytes} payload bytes")
        got += n
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


def connect(address: Any, key: bytes) -> Connection:
    family = "AF_UNIX" if isinstance(address, str) else "AF_INET"
    return Client(tuple(address) if family == "AF_INET" else address, family=family, authkey=key)
