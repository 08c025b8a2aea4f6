"""Check that a UR controller answers, with a deadline, before handing it to ur-rtde.

ur-rtde's constructors block forever on a peer that accepts TCP connections and never answers,
and they hold the GIL while they do: the whole driver process would freeze. These plain sockets
have timeouts, so a dead, silent or wrong host fails here with a clear message instead.

What is checked, each answer within the deadline:
  * the dashboard server (29999 by default) sends its welcome line,
  * the RTDE server (30004) accepts protocol version 2,
  * the script port (30003) accepts a connection.
A peer that passes can still die in the instant between this probe and ur-rtde's connect; that
window is milliseconds wide, against the unbounded hang it replaces.
"""

from __future__ import annotations

import socket
import struct
import time

RTDE_PORT = 30004  # fixed in ur-rtde
SCRIPT_PORT = 30003  # fixed in ur-rtde
RTDE_REQUEST_PROTOCOL_VERSION = ord("V")


class ProbeError(Exception):
    pass


def probe_controller(host: str, dashboard_port: int, timeout_s: float) -> None:
    """Raise ProbeError naming the port that failed, or return once all three answered."""
    deadline = time.monotonic() + timeout_s
    _check_dashboard(host, dashboard_port, deadline)
    _check_rtde(host, deadline)
    with _connect(host, SCRIPT_PORT, "script", deadline):
        pass


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ProbeError(f"{what}: no answer before the deadline")
    return left


def _connect(host: str, port: int, what: str, deadline: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=_remaining(deadline, f"{what} port {port}"))
    except ProbeError:
        raise
    except OSError as exc:
        raise ProbeError(f"{what} port {port}: cannot connect ({exc})") from None


def _check_dashboard(host: str, port: int, deadline: float) -> None:
    with _connect(host, port, "dashboard", deadline) as sock:
        line = _recv_until(sock, b"\n", deadline, f"dashboard port {port}")
    if b"Dashboard" not in line and b"Connected" not in line:
        raise ProbeError(f"dashboard port {port}: unexpected welcome {line[:80]!r} (is this a UR controller?)")


def _check_rtde(host: str, deadline: float) -> None:
    with _connect(host, RTDE_PORT, "RTDE", deadline) as sock:
        sock.sendall(struct.pack(">HBH", 5, RTDE_REQUEST_PROTOCOL_VERSION, 2))
        header = _recv_exact(sock, 3, deadline, f"RTDE port {RTDE_PORT}")
        size, kind = struct.unpack(">HB", header)
        body = _recv_exact(sock, max(0, size - 3), deadline, f"RTDE port {RTDE_PORT}")
    if kind != RTDE_REQUEST_PROTOCOL_VERSION or not body or body[0] != 1:
        raise ProbeError(f"RTDE port {RTDE_PORT}: protocol version 2 refused (controller software too old?)")


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    buf = b""
    while len(buf) < n:
        buf += _recv_some(sock, n - len(buf), deadline, what)
    return buf


def _recv_until(sock: socket.socket, end: bytes, deadline: float, what: str) -> bytes:
    buf = b""
    while end not in buf:
        buf += _recv_some(sock, 4096, deadline, what)
    return buf


def _recv_some(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    sock.settimeout(_remaining(deadline, what))
    try:
        chunk = sock.recv(n)
    except TimeoutError:
        raise ProbeError(f"{what}: connected but no answer before the deadline (a silent peer)") from None
    except OSError as exc:
        raise ProbeError(f"{what}: {exc}") from None
    if not chunk:
        raise ProbeError(f"{what}: the peer closed the connection")
    return chunk
