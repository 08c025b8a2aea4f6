"""A composite whose parts each run in their own worker process (drivers/core/isolated.py), under
the driver: a dead worker faults the whole robot, the fault ends every part's worker, and the
operator's clear_fault brings every part back. Starts worker processes, hence the hil mark.
"""

from __future__ import annotations

import os
import signal
import statistics
import time

import numpy as np
import pytest

from armada.drivers.core.composite import CompositeBackend, Part
from armada.drivers.core.driver import Driver, Mode
from armada.drivers.core.isolated import IsolatedBackend
from armada.runtime.config import load_embodiment
from armada.runtime.protocol import MessageFactory

pytestmark = pytest.mark.hil

EMB = load_embodiment("cobot_magic")  # 14 dofs: two 7-value parts
DT_NS = int(1e9 / EMB.control_rate_hz)
F = MessageFactory()


def worker_part(name: str, dofs: slice) -> Part:
    home = [float(v) for v in EMB.home[dofs]]
    backend = IsolatedBackend("tests.hil.isolated_targets:picky_arm", {"home": home, "refuse_above": 100.0},
                              f"{name} worker")
    return Part(name, dofs, backend)


def wait_dead(pid: int, timeout_s: float) -> bool:
    """Gone or a zombie (killed, to be reaped by a later call: on_fault does not wait)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def robot():
    comp = CompositeBackend([worker_part("left", slice(0, 7)), worker_part("right", slice(7, 14))], name="Robot")
    yield comp
    comp.close()


def test_a_dead_worker_faults_the_robot_ends_every_worker_and_clear_fault_brings_both_back(robot):
    drv = Driver(EMB, robot, lease_ttl_s=30.0)
    drv.connect(10.0)
    now = 0
    lease = drv.handle(F.make("acquire", client="t"), now)["lease"]
    drv.handle(F.make("arm", lease=lease), now)
    for _ in range(5):
        now += DT_NS
        drv.tick(now)
    assert drv.mode == Mode.ARMED, drv.reason
    left, right = (p.backend for p in robot.parts)
    right_pid = right._worker.pid
    os.kill(left._worker.pid, signal.SIGKILL)
    now += DT_NS
    drv.tick(now)
    assert drv.mode == Mode.FAULT
    assert "left" in drv.reason and "SIGKILL" in drv.reason and "right" not in drv.reason
    # The fault reached the other part too: its worker was ended, nothing can reach its device.
    assert right._worker is None
    assert wait_dead(right_pid, 2.0)
    drv.handle(F.make("clear_fault", lease=lease), now)
    assert drv.mode == Mode.IDLE, drv.reason
    assert robot.read().extras == {"left": {"recovered": 1}, "right": {"recovered": 1}}
    assert np.allclose(robot.read().position, EMB.home, atol=1e-3)


def test_estop_reaches_the_second_worker_when_the_first_is_gone(robot):
    robot.connect(10.0)
    left, right = (p.backend for p in robot.parts)
    os.kill(left._worker.pid, signal.SIGKILL)
    time.sleep(0.05)
    with pytest.raises(Exception, match="Robot e-stop failed on left: left worker: e-stop could not be sent"):
        robot.estop()
    assert right._worker is not None and right.read() is not None  # the right worker answered its estop


def test_read_cost_of_two_worker_parts(robot, capsys):
    """Each worker part is one round trip per read, made one after the other: the cost to expect."""
    robot.connect(10.0)
    single = robot.parts[0].backend
    for _ in range(50):
        robot.read()
    both, one = [], []
    for _ in range(400):
        t0 = time.perf_counter_ns()
        robot.read()
        t1 = time.perf_counter_ns()
        single.read()
        t2 = time.perf_counter_ns()
        both.append((t1 - t0) / 1e3)
        one.append((t2 - t1) / 1e3)
    q = lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))]  # noqa: E731
    with capsys.disabled():
        print(f"\ncomposite of 2 worker parts: read median {statistics.median(both):.0f} us, p99 {q(both, 0.99):.0f} us;"
              f" one worker part alone: median {statistics.median(one):.0f} us, p99 {q(one, 0.99):.0f} us")
    # Loose: two round trips, not more (a loaded 2-core host shifts both the same way).
    assert statistics.median(both) < 3 * statistics.median(one) + 200
