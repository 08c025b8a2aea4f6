"""What the UR3 worker's backend (drivers/ur3/rtde_backend.py) puts on the wire, in-process with the
real ur-rtde against the loopback controller: socket options and the command register per cycle."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest

pytest.importorskip("rtde_control")

from armada.drivers.core.backend import BackendError  # noqa: E402
from armada.drivers.ur3.rtde_backend import RTDE_PORT, UR3RtdeBackend, _socket_fds  # noqa: E402

pytestmark = pytest.mark.hil

RATE_HZ = 500.0


@pytest.fixture
def backend(ur_fake):
    b = UR3RtdeBackend(ur_fake.host, 29999, rate_hz=RATE_HZ, watchdog_min_hz=10.0, stop_deceleration=8.0,
                       lookahead_s=0.1, gain=300.0)
    b.connect(5.0)
    yield b
    b.close()


def _rtde_sockets(host: str) -> list[socket.socket]:
    found = []
    for fd in _socket_fds():
        s = socket.socket(fileno=os.dup(fd))
        try:
            if s.family == socket.AF_INET and s.getpeername() == (host, RTDE_PORT):
                found.append(s)
                continue
        except OSError:
            pass
        s.close()
    return found


def test_every_rtde_socket_has_nagle_off(backend, ur_fake):
    """ur-rtde 1.6.5 sets TCP_NODELAY before connecting, on a socket that connect then replaces."""
    socks = _rtde_sockets(ur_fake.host)
    try:
        assert len(socks) >= 2  # the receive interface's and the control interface's
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)
    finally:
        for s in socks:
            s.close()


def _read(backend) -> None:
    try:
        backend.read()
    except BackendError as exc:  # a late RTDE package on a loaded host: not what these tests are about
        assert exc.transient, exc


def _stream(backend, q0: np.ndarray, seconds: float) -> None:
    """One read and one servoJ per tick, as the driver's loop does."""
    period = 1.0 / RATE_HZ
    n = int(seconds * RATE_HZ)
    t0 = time.monotonic()
    for i in range(n):
        _read(backend)
        backend.write(q0 + 0.2 * np.sin(np.pi * i / n) * np.ones(6))
        pause = t0 + (i + 1) * period - time.monotonic()
        if pause > 0:
            time.sleep(pause)


def test_no_watchdog_kick_reaches_the_command_register_while_servoing(backend, ur_fake):
    """A kick is "no command" in servoJ's register: a cycle that sees it takes no target."""
    q0 = backend.read().position
    ur_fake.cycles()
    _stream(backend, q0, 1.0)
    cycles = ur_fake.cycles()
    fresh = [i for i, c in enumerate(cycles) if c[2]]
    window = cycles[fresh[0]:fresh[-1] + 1]
    no_command = sum(1 for c in window if c[1] == 0)
    print(f"{len(window)} cycles while servoing: {len(fresh)} fresh targets, {no_command} saw 'no command'")
    assert len(window) > 300
    assert no_command == 0


def test_the_watchdog_is_still_kicked_when_no_servoj_is_sent(backend, ur_fake):
    """Disarmed, the driver only reads: those reads must keep the watchdog fed."""
    backend.control.setWatchdog(2.0)  # 0.5 s: a loaded host can stall this process for 0.1 s
    q0 = backend.read().position
    _stream(backend, q0, 0.2)  # streaming, then reading only (servoJ stopped)
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        _read(backend)
        time.sleep(1.0 / RATE_HZ)
    state = ur_fake.state()
    assert state["program_running"] and state["watchdog_trips"] == 0, state
