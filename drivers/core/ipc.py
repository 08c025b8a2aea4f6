"""Length-prefixed msgpack messages over a stream socket, between a driver and its worker processes.

4-byte big-endian length, then a msgpack map. Nothing but msgpack is ever decoded (no pickle), and
a message over MAX_MESSAGE bytes is refused before it is read.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

MAX_MESSAGE = 1 << 20


def send_message(sock: socket.socket, msg: dict[str, Any]) -> None:
    body = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv_message(sock: socket.socket) -> dict[str, Any] | None:
    """One message, or None when the peer closed. Uses the socket's own timeout."""
    header = _recv_exact(sock, 4)
    if header is None:
        return None
    (size,) = struct.unpack(">I", header)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes exceeds {MAX_MESSAGE}")
    body = _recv_exact(sock, size)
    if body is None:
        return None
    msg = msgpack.unpackb(body, raw=False)
    if not isinstance(msg, dict):
        raise ValueError(f"expected a map, got {type(msg).__name__}")
    return msg


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
