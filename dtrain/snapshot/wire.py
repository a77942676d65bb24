"""Framing for snapshot-process messages: a JSON header plus an optional raw payload.

Messages travel over :mod:`multiprocessing.connection` (Unix sockets between a rank and its node's
snapshot process, TCP between snapshot processes), authenticated with HMAC keys by that module.
Headers are JSON and payloads raw bytes, so nothing received is ever unpickled.
"""
from __future__ import annotations

import json
from multiprocessing.connection import Client, Connection
from typing import Any

__all__ = ["send", "recv", "request", "connect", "RemoteError"]


class RemoteError(RuntimeError):
    """The other side answered a request with an error message."""


def send(conn: Connection, header: dict[str, Any], payload: bytes | memoryview | None = None) -> None:
    conn.send_bytes(json.dumps({**header, "_payload": payload is not None}).encode())
    if payload is not None:
        conn.send_bytes(payload)


def recv(conn: Connection) -> tuple[dict[str, Any], bytes | None]:
    header = json.loads(conn.recv_bytes())
    payload = conn.recv_bytes() if header.pop("_payload") else None
    return header, payload


def request(conn: Connection, header: dict[str, Any], payload: bytes | memoryview | None = None,
            timeout_s: float | None = None) -> tuple[dict[str, Any], bytes | None]:
    """Send one request and wait for its reply; an ``error`` reply raises :class:`RemoteError`."""
    send(conn, header, payload)
    if timeout_s is not None and not conn.poll(timeout_s):
        raise TimeoutError(f"no reply to {header.get('op')!r} within {timeout_s:g} s")
    reply, data = recv(conn)
    if "error" in reply:
        raise RemoteError(reply["error"])
    return reply, data


def connect(address: Any, key: bytes) -> Connection:
    family = "AF_UNIX" if isinstance(address, str) else "AF_INET"
    return Client(tuple(address) if family == "AF_INET" else address, family=family, authkey=key)
