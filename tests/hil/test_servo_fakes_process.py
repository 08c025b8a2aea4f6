"""The servo-bus fakes run as their own processes (what `armada fake` will start), and the SDKs reach them."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.hil


def _serve(module: str, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True)
    port = proc.stdout.readline().strip()
    assert port.startswith("/dev/"), f"{module} printed {port!r}"
    return proc, port


def _end(proc: subprocess.Popen) -> None:
    proc.terminate()
    assert proc.wait(timeout=5) == 0


def test_feetech_fake_process_answers_scservo_sdk():
    scs = pytest.importorskip("scservo_sdk")
    proc, port = _serve("armada.drivers.so101.fake.feetech", "--ids", "1", "2", "3")
    try:
        ph = scs.PortHandler(port)
        assert ph.openPort()
        pk = scs.PacketHandler(0)
        assert [pk.ping(ph, i)[:2] for i in (1, 2, 3)] == [(777, scs.COMM_SUCCESS)] * 3
        assert pk.ping(ph, 4)[1] == scs.COMM_RX_TIMEOUT
        ph.closePort()
    finally:
        _end(proc)


def test_dynamixel_fake_process_answers_dynamixel_sdk():
    dx = pytest.importorskip("dynamixel_sdk")
    proc, port = _serve("armada.drivers.aloha.fake.dynamixel", "--ids", "1", "2", "--model", "xm540-w270")
    try:
        ph = dx.PortHandler(port)
        assert ph.openPort()
        pk = dx.PacketHandler(2.0)
        assert [pk.ping(ph, i)[:2] for i in (1, 2)] == [(1120, dx.COMM_SUCCESS)] * 2
        assert pk.read4ByteTxRx(ph, 2, 132) == (2048, dx.COMM_SUCCESS, 0)
        ph.closePort()
    finally:
        _end(proc)
