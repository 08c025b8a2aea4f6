"""The real ur-rtde library against the loopback UR controller (drivers.ur3.fake.controller).

ur-rtde hard-codes RTDE on 30004 and the script port on 30003, so each fake gets its own loopback
address (127.x.y.z) instead of its own ports; tests skip when no address can be bound.
ur-rtde constructors hold the GIL and block forever on a silent peer: a thread cannot be abandoned
(the whole interpreter stops), so a deadline needs a child process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

rtde_receive = pytest.importorskip("rtde_receive")
rtde_control = pytest.importorskip("rtde_control")
dashboard_client = pytest.importorskip("dashboard_client")

from armada.drivers.ur3.fake.launch import UR_PORTS, free_loopback_host

pytestmark = pytest.mark.hil


@pytest.fixture
def fake(ur_fake):
    return ur_fake


def construct_with_deadline(kind: str, host: str, deadline_s: float) -> str:
    """Construct a ur-rtde interface in a child process; return 'ok', 'error: ...' or 'timeout'.

    The pattern a backend's connect(timeout_s) must use: the constructor cannot be interrupted and
    holds the GIL, so it runs where it can be killed.
    """
    code = (
        "import sys, rtde_receive, rtde_control\n"
        f"i = {'rtde_receive.RTDEReceiveInterface' if kind == 'receive' else 'rtde_control.RTDEControlInterface'}"
        f"({host!r})\n"
        "print('CONNECTED', flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=5)
        return "timeout"
    return "ok" if "CONNECTED" in out else f"error: {err.strip()[-300:]}"


def _wait(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_dashboard_line_protocol(fake):
    d = dashboard_client.DashboardClient(fake.host)
    d.connect()
    try:
        assert d.isConnected()
        assert d.polyscopeVersion().startswith("5.11")
        assert d.getSerialNumber() == "20235300001"
        assert "RUNNING" in d.robotmode()
        assert "NORMAL" in d.safetymode()
        d.closePopup()
        d.unlockProtectiveStop()
    finally:
        d.disconnect()


def test_receive_reads_fake_joints(fake):
    q = [0.1, -1.2, 1.3, -1.4, -1.5, 0.6]
    assert fake.cmd("set_q " + " ".join(map(str, q))) == "ok"
    r = rtde_receive.RTDEReceiveInterface(fake.host)
    try:
        assert r.isConnected()
        assert r.getActualQ() == pytest.approx(q, abs=1e-9)
        assert r.getActualQd() == pytest.approx([0.0] * 6)
        assert len(r.getActualTCPPose()) == 6
        t0 = r.getTimestamp()
        assert _wait(lambda: r.getTimestamp() > t0 + 0.05, 1.0)
        assert r.getRobotMode() == 7 and r.getSafetyMode() == 1
        assert not r.isProtectiveStopped() and not r.isEmergencyStopped()
    finally:
        r.disconnect()


def test_control_servoj_loop_moves_joints(fake):
    r = rtde_receive.RTDEReceiveInterface(fake.host)
    c = rtde_control.RTDEControlInterface(fake.host)
    try:
        assert c.isConnected() and c.isProgramRunning()
        assert fake.state()["script_bytes"] > 1000
        q0 = r.getActualQ()
        target = [a + 0.3 for a in q0]
        for _ in range(125):  # 1 s at 125 Hz
            t = c.initPeriod()
            assert c.servoJ(target, 0.5, 0.5, 0.008, 0.1, 300)
            c.waitPeriod(t)
        c.servoStop()
        assert r.getActualQ() == pytest.approx(target, abs=0.01)
        assert 11 in fake.state()["commands"]  # servoJ's command id, read from input_int_register_0
    finally:
        c.stopScript()
        c.disconnect()
        r.disconnect()
    assert not fake.state()["program_running"]


def test_protective_stop_and_recovery(fake):
    r = rtde_receive.RTDEReceiveInterface(fake.host)
    c = rtde_control.RTDEControlInterface(fake.host)
    d = dashboard_client.DashboardClient(fake.host)
    d.connect()
    try:
        assert fake.cmd("pstop") == "ok"
        assert _wait(r.isProtectiveStopped, 1.0)
        assert r.getSafetyMode() == 3
        assert _wait(lambda: not c.isProgramRunning(), 1.0)
        assert not c.servoJ(r.getActualQ(), 0.5, 0.5, 0.008, 0.1, 300)
        d.unlockProtectiveStop()
        assert _wait(lambda: not r.isProtectiveStopped(), 1.0)
        fake.cmd("unlock_delay 5")  # a real controller refuses the unlock for 5 s
        fake.cmd("pstop")
        with pytest.raises(RuntimeError, match="5s after occurrence"):
            d.unlockProtectiveStop()
        fake.cmd("unlock_delay 0")
        d.unlockProtectiveStop()
        assert _wait(lambda: not r.isProtectiveStopped(), 1.0)
        assert c.reuploadScript()
        assert _wait(c.isProgramRunning, 2.0)
        assert c.servoJ(r.getActualQ(), 0.5, 0.5, 0.008, 0.1, 300)
    finally:
        c.stopScript()
        c.disconnect()
        d.disconnect()
        r.disconnect()


def test_emergency_stop(fake):
    r = rtde_receive.RTDEReceiveInterface(fake.host)
    try:
        assert fake.cmd("estop") == "ok"
        assert _wait(r.isEmergencyStopped, 1.0)
        assert r.getSafetyMode() == 7
        fake.cmd("clear")
        assert _wait(lambda: not r.isEmergencyStopped(), 1.0)
    finally:
        r.disconnect()


def test_dropped_connection_is_seen(fake):
    r = rtde_receive.RTDEReceiveInterface(fake.host)
    try:
        assert r.isConnected()
        assert fake.cmd("drop") == "ok"
        assert _wait(lambda: not r.isConnected(), 2.0)
    finally:
        r.disconnect()


def test_slow_answers(fake):
    fake.cmd("slow 0.3")
    d = dashboard_client.DashboardClient(fake.host)
    t0 = time.monotonic()
    d.connect()
    try:
        assert d.polyscopeVersion().startswith("5.11")
        assert time.monotonic() - t0 >= 0.3
    finally:
        d.disconnect()


def test_deadline_wrapper_connects_to_fake(fake):
    assert construct_with_deadline("receive", fake.host, 10.0) == "ok"


def test_silent_peer_is_abandoned_at_deadline():
    host = free_loopback_host()
    if host is None:
        pytest.skip("no loopback address with the UR ports free")
    silent = []
    try:
        for port in UR_PORTS:  # accepts (the kernel completes the handshake) and never answers
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(8)
            silent.append(s)
        for kind in ("receive", "control"):
            t0 = time.monotonic()
            assert construct_with_deadline(kind, host, 2.0) == "timeout"
            assert time.monotonic() - t0 < 4.0
    finally:
        for s in silent:
            s.close()


@pytest.mark.parametrize("version,cycle_s", [("5.11.1.0", 0.002), ("3.15.7.0", 0.008)])
def test_the_control_script_runs_once_per_controller_cycle(version, cycle_s):
    """e-Series 500 Hz, CB3 125 Hz: each cycle reads the command register once and is logged."""
    from armada.drivers.ur3.fake.launch import FakeUR

    host = free_loopback_host()
    if host is None:
        pytest.skip("no free loopback address")
    with FakeUR(host, ["--version", version]) as fake:
        c = rtde_control.RTDEControlInterface(host)
        try:
            fake.cycles()
            time.sleep(0.5)
            cycles = fake.cycles()
        finally:
            c.stopScript()
            c.disconnect()
    period = float(np.median(np.diff([row[0] for row in cycles])))
    assert abs(period - cycle_s) < 0.25 * cycle_s, period
    assert all(row[1] == 0 and row[2] == 0 for row in cycles)  # no command: no target taken
