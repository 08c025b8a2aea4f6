"""The sd_notify helper: the right datagrams to a socket we bind, path or abstract, and nothing without one."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from armada.drivers.core.notify import Notifier, WatchdogPacer, notify_address


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_address(address))
    sock.settimeout(1.0)
    return sock


def _received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, decoded."""
    out = []
    sock.settimeout(0.05)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except (TimeoutError, BlockingIOError):
        return out


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path: Path):
    address = str(tmp_path / "notify") if request.param == "path" else f"@armada-test-{uuid.uuid4().hex}"
    sock = _bind(address)
    yield address, sock
    sock.close()


def test_datagrams_of_each_message(listener) -> None:
    address, sock = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("idle")
    assert n.status("estop: operator\npressed it")
    assert n.watchdog()
    assert n.stopping()
    assert _received(sock) == ["READY=1\nSTATUS=idle", "STATUS=estop: operator pressed it", "WATCHDOG=1",
                               "STOPPING=1\nSTATUS=stopping"]
    assert n.sent == 4 and n.dropped == 0
    n.close()


def test_nothing_without_notify_socket(tmp_path: Path) -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_ns is None
    assert not n.ready("idle") and not n.watchdog() and not n.stopping()
    assert n.sent == 0 and n._sock is None  # not even a socket is made


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000"})
    assert n.watchdog_ns == 1_000_000_000
    # Another process's watchdog (WATCHDOG_PID) is not ours; nonsense is ignored.
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"},
                             pid=4242).watchdog_ns is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"},
                             pid=4242).watchdog_ns == 1_000_000_000
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "soon"}).watchdog_ns is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/x"}).watchdog_ns is None


def test_relative_notify_socket_is_refused() -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": "relative/sock"}).enabled


def test_no_listener_drops_and_never_raises(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not n.watchdog() and not n.watchdog()
    assert n.dropped == 2 and n.sent == 0


def test_full_queue_does_not_block(tmp_path: Path) -> None:
    """A service manager that does not read: sends fail at once (dropped), the caller never waits."""
    address = str(tmp_path / "slow")
    sock = _bind(address)
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    for _ in range(5000):
        n.watchdog()
    assert n.dropped > 0 and n.sent > 0
    sock.close()


def test_pacer_pings_once_per_interval(listener) -> None:
    address, sock = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    pacer = WatchdogPacer(n)
    assert pacer.interval_ns == 100_000_000
    for t_ms in range(0, 1000, 2):  # a 500 Hz loop for one second
        pacer.tick(t_ms * 1_000_000)
    assert _received(sock) == ["WATCHDOG=1"] * 10


def test_pacer_without_watchdog_sends_nothing(listener) -> None:
    address, sock = listener
    pacer = WatchdogPacer(Notifier.from_env({"NOTIFY_SOCKET": address}))
    for t in range(100):
        pacer.tick(t * 10**9)
    assert _received(sock) == []


def test_env_is_read_not_kept(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    monkeypatch.setenv("WATCHDOG_USEC", "500000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env()
    assert n.address == str(tmp_path / "n") and n.watchdog_ns == 250_000_000
